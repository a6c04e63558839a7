"""AdamW with 8-bit blockwise states (`AdamW8bit`), and what all of fastpeft's AdamWs share.

`AdamW8bit` is bitsandbytes' ``bnb.optim.AdamW8bit`` (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization"): both moments of every tensor of at least 4,096 elements (bnb's
``min_8bit_size``) are uint8 codes of bnb's signed / unsigned dynamic maps with an fp32 absmax per
block of `block_size` elements, about 2.03 bytes per parameter instead of torch.optim.AdamW's 8;
smaller tensors keep fp32 moments. The update is torch.optim.AdamW's: decoupled weight decay
``p *= 1 - lr * weight_decay`` first, then the bias-corrected Adam step, in fp32 for every
parameter dtype. One divergence from bnb: the default weight_decay is 0.0, not bnb's 1e-2.

State (per parameter, all tensors, so ``torch.load(weights_only=True)`` reads a saved state_dict):
``step`` (fp32 0-d, as torch.optim.AdamW), and either ``exp_avg_codes`` / ``exp_avg_sq_codes``
(uint8, the parameter's shape) with ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` (fp32
[ceil(numel / block_size)]), or fp32 ``exp_avg`` / ``exp_avg_sq``. `load_state_dict` keeps every
state tensor's dtype: torch's casts floating state to the parameter's dtype, which would round
the absmaxes and fp32 moments of a bf16 model.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastpeft.ops import optim as optim_ops

__all__ = ["AdamW8bit", "MIN_8BIT_SIZE", "adamw_update"]

MIN_8BIT_SIZE = 4096  # bnb's min_8bit_size: smaller tensors keep fp32 moments


def adamw_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float,
                 beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """One AdamW step in place, with torch.optim.AdamW's own arithmetic (its single-tensor path,
    op for op, so the results are bit-identical to it). All tensors: one shape and dtype."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _check_hyperparameters(owner: str, group: dict) -> None:
    """ValueError naming the argument, for values torch.optim.AdamW or bnb would reject."""
    lr, betas, eps, wd = (group[k] for k in ("lr", "betas", "eps", "weight_decay"))
    if not lr >= 0:  # also rejects NaN
        raise ValueError(f"{owner}: lr must be >= 0, got {lr}")
    if len(betas) != 2:
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{owner}: betas[{i}] must be in [0, 1), got {beta}")
    if not eps >= 0:
        raise ValueError(f"{owner}: eps must be >= 0, got {eps}")
    if not wd >= 0:
        raise ValueError(f"{owner}: weight_decay must be >= 0, got {wd}")
    for flag, supported in (("amsgrad", False), ("maximize", False), ("decoupled_weight_decay", True)):
        if flag in group and bool(group[flag]) != supported:  # e.g. a torch.optim state_dict's group
            raise ValueError(f"{owner}: {flag}={group[flag]!r} is not supported")
    bs = group.get("block_size", 1)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1 or bs & (bs - 1):
        raise ValueError(f"{owner}: block_size must be a positive power of two, got {bs!r}")


class _AdamWBase(Optimizer):
    """An AdamW whose state tensors may differ in dtype and device from the parameter.

    Subclasses say what a parameter's state is (`_state_spec`: name -> (shape, dtype), besides
    ``step``), where it lives (`_state_home`) and how one flat piece is updated (`_update`);
    `_run` applies `_update` to each parameter (the paged optimizers page it instead).
    """

    def __init__(self, params: Iterable, defaults: dict) -> None:
        defaults["betas"] = tuple(defaults["betas"])
        _check_hyperparameters(type(self).__name__, defaults)
        self._maps: dict[torch.device, tuple] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        _check_hyperparameters(type(self).__name__, {**self.defaults, **param_group})
        super().add_param_group(param_group)

    # -- what subclasses define -----------------------------------------------------------------
    def _state_spec(self, p: Tensor, group: dict) -> dict[str, tuple[tuple, torch.dtype]]:
        raise NotImplementedError

    def _state_home(self, p: Tensor) -> dict:
        """torch.zeros keyword arguments (device, pin_memory) for `p`'s state tensors."""
        return {"device": p.device}

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Tensor], group: dict, step: int) -> None:
        """One step on flat, contiguous `p`, `g` [n] with `state`'s tensors as flat views."""
        raise NotImplementedError

    # -- the step -------------------------------------------------------------------------------
    def _new_state(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        home = self._state_home(p)
        state = {k: torch.zeros(shape, dtype=dtype, **home) for k, (shape, dtype) in self._state_spec(p, group).items()}
        return {"step": torch.tensor(0.0), **state}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns closure() when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        jobs = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                local = local_param(p)
                if not state:
                    state.update(self._new_state(local, group))
                state["step"] += 1
                jobs.append((local, group, state))
        self._run(jobs)
        return loss

    def _run(self, jobs: list) -> None:
        for p, group, state in jobs:
            with flat_param(p) as (pf, gf):
                self._update(pf, gf, flat_state(state), group, int(state["step"]))

    # -- state_dict: dtype-preserving load ------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load `state_dict` (from `state_dict()`); every state tensor keeps its saved dtype.

        Checked before anything changes: the groups' sizes and hyperparameters, and each state
        tensor's name, shape and dtype against what this optimizer would create for the parameter.
        """
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)):
            raise ValueError("loaded state dict does not match this optimizer's parameter groups")
        restored = {}
        for group, saved in zip(self.param_groups, saved_groups):
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            _check_hyperparameters(type(self).__name__, merged)
            for p, pid in zip(group["params"], saved["params"]):
                if pid in saved_state:
                    restored[p] = self._restore(p, merged, saved_state[pid])
        super().load_state_dict({**state_dict, "state": {}})
        for p, state in restored.items():
            self.state[p] = state

    def _restore(self, p: Tensor, group: dict, saved: dict) -> dict[str, Tensor]:
        p = local_param(p)
        spec = self._state_spec(p, group)
        if set(saved) != {"step", *spec}:
            raise ValueError(f"{type(self).__name__}.load_state_dict: a state with keys {sorted(spec)} and "
                             f"'step' was expected for a parameter of shape {list(p.shape)}, got {sorted(saved)}")
        for k, (shape, dtype) in spec.items():
            t = saved[k]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{type(self).__name__}.load_state_dict: state {k!r} must be {list(shape)} "
                                 f"{dtype}, got {list(t.shape)} {t.dtype}")
        state = self._new_state(p, group)
        for k, t in state.items():
            t.copy_(torch.as_tensor(saved[k]))
        return state

    def _maps_on(self, device: torch.device) -> tuple:
        """The 8-bit maps on `device`, built once per optimizer and device."""
        if device not in self._maps:
            self._maps[device] = optim_ops.adamw8bit_maps(device)
        return self._maps[device]


def local_param(p: Tensor) -> Tensor:
    """A DTensor parameter (an FSDP2 shard) as the plain tensor of this rank's shard, sharing its
    storage, its gradient's shard as `.grad`: the state is kept per shard. Others: `p` itself."""
    if not hasattr(p, "to_local"):
        return p
    local = p.detach().to_local()
    if p.grad is not None:
        local.grad = p.grad.to_local()
    return local


@contextlib.contextmanager
def flat_param(p: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """(param, grad) as flat contiguous tensors; a non-contiguous param is updated in a contiguous
    copy, written back at the end."""
    work = p.detach().contiguous()
    yield work.view(-1), p.grad.contiguous().view(-1)
    if work.data_ptr() != p.data_ptr():
        p.detach().copy_(work)


def flat_state(state: dict) -> dict[str, Tensor]:
    """A parameter's state tensors (all but ``step``) as flat views."""
    return {k: v.view(-1) for k, v in state.items() if k != "step"}


class AdamW8bit(_AdamWBase):
    """AdamW with 8-bit blockwise moments, bitsandbytes' AdamW8bit (see the module docstring).

    params: an iterable of tensors or param-group dicts; lr >= 0; betas in [0, 1); eps >= 0;
    weight_decay >= 0 (decoupled); block_size: a positive power of two, the elements per fp32
    absmax (bnb: 256). Every one of them may be set per param group. Parameters: fp32, fp16 or
    bf16 on any device; on CUDA (or with FASTPEFT_BACKEND=triton) the step runs one fused Triton
    kernel per parameter, elsewhere its PyTorch reference.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, block_size: int = 256) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block_size=block_size))

    def _state_spec(self, p: Tensor, group: dict) -> dict[str, tuple[tuple, torch.dtype]]:
        if p.numel() < MIN_8BIT_SIZE:
            return {"exp_avg": (p.shape, torch.float32), "exp_avg_sq": (p.shape, torch.float32)}
        blocks = (math.ceil(p.numel() / group["block_size"]),)
        return {"exp_avg_codes": (p.shape, torch.uint8), "exp_avg_absmax": (blocks, torch.float32),
                "exp_avg_sq_codes": (p.shape, torch.uint8), "exp_avg_sq_absmax": (blocks, torch.float32)}

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Tensor], group: dict, step: int) -> None:
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], step=step)
        if "exp_avg_codes" in state:
            optim_ops.adamw8bit_update(p, g, state["exp_avg_codes"], state["exp_avg_absmax"],
                                     state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"],
                                     self._maps_on(p.device), block_size=group["block_size"], **hyper)
        else:  # a small tensor: fp32 moments and fp32 math, whatever the parameter's dtype
            work = p if p.dtype == torch.float32 else p.float()
            adamw_update(work, g.float(), state["exp_avg"], state["exp_avg_sq"], **hyper)
            if work is not p:
                p.copy_(work)
