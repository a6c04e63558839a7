"""AdaLoRA (Zhang et al. 2023): config, SVD-form layer, rank allocator, injection rule.

The update is kept in SVD form, ``delta W = B diag(E) A * alpha / (ranknum + 1e-5)`` with
``A: [r, in]`` (right singular vectors), ``E: [r, 1]`` (singular values), ``B: [out, r]``, and
``ranknum`` the initial rank (a frozen parameter, as in PEFT). Training prunes it: after every
backward pass `AdaLoraModel.update_and_allocate(step)` scores each triplet (A row, E entry,
B column) by smoothed sensitivity times uncertainty of ``|p * grad|`` and zeroes the E entries
of the least important ones until a global budget is met, which shrinks from ``init_r`` per
module to ``target_r`` on average along PEFT's cubic schedule. An orthogonality penalty on A and
B is added to the loss in the tuner's forward. Saving writes the final `rank_pattern` and only
the kept ranks, so the adapter shrinks on disk; loading rebuilds the shrunk layers.

Over an NF4 base (a fastpeft `Linear4bit`, PEFT's `SVDLinear4bit`) the forward is the fused
dequant kernel with the same per-rank scale (`ops.nf4_linear(rank_scale=)`). PEFT cannot merge
there; here a merge dequantizes, adds the delta and re-quantizes, as the QLoRA merge does, and
warns with the rounding error that adds.

The forward runs on the fused LoRA kernel: ``E * alpha / (ranknum + 1e-5)`` is its per-rank
scale (`ops.lora_linear(rank_scale=)`), so masked ranks contribute nothing and no [r, in]
product ``A * E`` is formed per call; the scale is a tensor, so no host sync either.

Names, defaults, init, checkpoint keys (``<path>.lora_A`` etc., no ``.weight``, no ``ranknum``)
and the allocator's arithmetic are PEFT's (`peft/tuners/adalora/`). Divergences, each on bad
input PEFT accepts: ``target_r > init_r`` is refused (the budget would grow, and PEFT fails later
in `torch.kthvalue`); a masking step whose budget equals the initial one masks nothing (PEFT's
`kthvalue(k=0)` raises); `update_and_allocate` without gradients says so. And one PEFT quirk
not copied: PEFT's plain `PeftModel` (no task_type) calls the base model directly and so skips
the regulariser, which only its task models (`PeftModelForCausalLM`, ...) add; here every
PeftModel runs the tuner's forward, so the regulariser is always added when there is a loss.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fastpeft import ops, registry
from fastpeft.methods.base import AdapterLayer, acc, adapter_dtype
from fastpeft.methods.lora import LoraConfig, LoraModel, _is_conv1d, check_finite, requantize_into
from fastpeft.quant.nf4 import Linear4bit

_CHECKPOINT_NAMES = ("lora_A", "lora_B", "lora_E")


@dataclass
class AdaLoraConfig(LoraConfig):
    """PEFT's `AdaLoraConfig`: LoraConfig's fields plus the schedule; `r` is unused (init_r is)."""

    PEFT_TYPE: ClassVar[str] = "ADALORA"

    target_r: int = field(default=8, metadata={"help": "Target average rank per module after pruning."})
    init_r: int = field(default=12, metadata={"help": "Initial rank of every module."})
    tinit: int = field(default=0, metadata={"help": "Warm-up steps before pruning starts."})
    tfinal: int = field(default=0, metadata={"help": "Final steps that fine-tune the pruned ranks."})
    deltaT: int = field(default=1, metadata={"help": "Steps between two budget allocations."})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity."})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty."})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "Weight of the orthogonal regulariser."})
    total_step: int | None = field(default=None, metadata={"help": "Total training steps (required)."})
    rank_pattern: dict[str, list[bool]] | None = field(
        default=None, metadata={"help": "Kept ranks per module (`<path>.lora_E` -> mask), set by training."}
    )

    def __post_init__(self):
        pattern, self.rank_pattern = self.rank_pattern, {}  # LoRA's rank_pattern means ranks, not masks
        super().__post_init__()
        self.rank_pattern = pattern
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA.")
        if self.r != 8:
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored. "
                          "If you intended to set the initial rank, use `init_r` instead.", stacklevel=2)
        if self.total_step is None or self.total_step <= 0:
            raise ValueError("AdaLoRA does not work when `total_step` is None, supply a value > 0.")
        if self.orth_reg_weight < 0:
            raise ValueError(f"`orth_reg_weight` should be >= 0, but the value passed is {self.orth_reg_weight}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit={self.tinit} >= total_step - tfinal = {self.total_step - self.tfinal}: the schedule leaves "
                "no budgeting phase. Decrease `tfinal`/`tinit` or increase `total_step`."
            )
        if isinstance(self.init_r, bool) or not isinstance(self.init_r, int) or self.init_r < 1:
            raise ValueError(f"init_r must be a positive integer, got {self.init_r!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} > init_r={self.init_r}: AdaLoRA only prunes ranks")

    def to_dict(self) -> dict[str, Any]:
        """PEFT writes `rank_pattern` keys without the adapter name (`<path>.lora_E`)."""
        out = super().to_dict()
        if self.rank_pattern:
            out["rank_pattern"] = {re.sub(r"\.lora_E\.[^.]+$", ".lora_E", k): v for k, v in self.rank_pattern.items()}
        return out

    def kept_ranks(self, key: str) -> list[bool] | None:
        """The rank mask `rank_pattern` holds for module `key` (with or without the adapter name)."""
        for name, mask in (self.rank_pattern or {}).items():
            if name == f"{key}.lora_E" or name.rpartition(".")[0] == f"{key}.lora_E":
                return [bool(m) for m in mask]
        return None

    def rank_for(self, key: str) -> int:
        mask = self.kept_ranks(key)
        return self.init_r if mask is None else sum(mask)


class SVDLinear(AdapterLayer):
    """An nn.Linear (or Conv1D) with AdaLoRA adapters; PEFT's `adalora.SVDLinear` layout
    (ParameterDicts, so model keys are `<path>.lora_A.<adapter>`)."""

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_E", "ranknum")
    other_param_names: ClassVar[tuple[str, ...]] = ("r", "lora_alpha", "scaling", "lora_dropout", "kept_ranks")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdaLoraConfig, key: str):
        super().__init__(base_layer)
        self.fan_in_fan_out = _is_conv1d(base_layer)
        self.out_features, self.in_features = _features(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        # The rank mask a save shrinks this adapter to (the tuner keeps it in step with rank_pattern).
        self.kept_ranks: dict[str, list[bool]] = {}
        self.update_layer(adapter_name, config, key)

    def update_layer(self, adapter_name: str, config: AdaLoraConfig, key: str) -> None:
        mask = config.kept_ranks(key)
        r = config.rank_for(key)
        device = self.base_layer.weight.device
        # fp32 like PEFT's adapters; random unless init_lora_weights (then E = 0, A, B ~ N(0, 0.02)).
        dtype = adapter_dtype(self.base_layer.weight)
        a = torch.randn(r, self.in_features, dtype=dtype)
        e = torch.randn(r, 1, dtype=dtype)
        b = torch.randn(self.out_features, r, dtype=dtype)
        if config.init_lora_weights:
            nn.init.zeros_(e)
            nn.init.normal_(a, mean=0.0, std=0.02)
            nn.init.normal_(b, mean=0.0, std=0.02)
        self.lora_A[adapter_name] = nn.Parameter(a.to(device))
        self.lora_E[adapter_name] = nn.Parameter(e.to(device))
        self.lora_B[adapter_name] = nn.Parameter(b.to(device))
        # A layer rebuilt from a rank_pattern keeps the scale of the full-rank one (PEFT resizes a
        # full-rank layer and copies its ranknum back), unless nothing is left of it.
        ranknum = config.init_r if (mask is not None and r > 0) else r
        self.ranknum[adapter_name] = nn.Parameter(torch.full((1,), float(ranknum), device=device, dtype=dtype), requires_grad=False)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha if config.lora_alpha > 0 else float(r)
        self.lora_dropout[adapter_name] = config.lora_dropout
        if mask is not None:
            self.kept_ranks[adapter_name] = mask

    # -- parameters and checkpoints ------------------------------------------------------------
    def adapter_parameters(self, adapter_name: str):
        for name in _CHECKPOINT_NAMES:
            params = getattr(self, name)
            if adapter_name in params:
                yield params[adapter_name]

    def adapter_state_dict(self, adapter_name: str) -> dict[str, Any]:
        """PEFT's file layout: `lora_A`, `lora_B`, `lora_E` (no ranknum), cut to the kept ranks."""
        a, b, e = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        mask = self.kept_ranks.get(adapter_name)
        if mask is not None and sum(mask) != a.shape[0]:
            keep = torch.tensor(mask, dtype=torch.bool, device=a.device)
            a, b, e = a[keep], b[:, keep], e[keep]
        return {"lora_A": a, "lora_B": b, "lora_E": e}

    def load_adapter_state_dict(self, adapter_name: str, state: dict[str, Any]) -> None:
        if set(state) != set(_CHECKPOINT_NAMES):
            raise ValueError(f"AdaLoRA layer expects {list(_CHECKPOINT_NAMES)}, got {sorted(state)}")
        with torch.no_grad():
            for name in _CHECKPOINT_NAMES:
                getattr(self, name)[adapter_name].copy_(state[name])

    # -- math ----------------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The base weight as `[out, in]` (a view for Conv1D: never a copy; dequantized fp32, a new
        tensor, over an NF4 base)."""
        if isinstance(self.base_layer, Linear4bit):
            return self.base_layer.dequantize(torch.float32)
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def rank_scale(self, adapter_name: str) -> torch.Tensor:
        """``E * alpha / (ranknum + 1e-5)`` as [r] fp32: the kernel's per-rank scale."""
        return self.lora_E[adapter_name].view(-1) * (self.scaling[adapter_name] / (self.ranknum[adapter_name] + 1e-5))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``B diag(E) A * alpha / (ranknum + 1e-5)`` as `[out, in]`, fp32."""
        a, b = acc(self.lora_A[adapter_name]), acc(self.lora_B[adapter_name])
        return (b * acc(self.rank_scale(adapter_name))) @ a

    def write_base_weight(self, weight: torch.Tensor, adapter_name: str, safe_merge: bool = False) -> float | None:
        """Store a merged/unmerged weight: copied into W, or re-quantized into an NF4 base (then
        the added rounding error is returned)."""
        if isinstance(self.base_layer, Linear4bit):
            return requantize_into(self.base_layer, weight, adapter_name, safe_merge)
        check_finite(weight, adapter_name, safe_merge)
        self.base_weight().copy_(weight)
        return None

    def merge(self, adapter_name: str, safe_merge: bool = False) -> None:
        with torch.no_grad():
            weight = self.base_weight()
            error = self.write_base_weight(weight + self.get_delta_weight(adapter_name).to(weight.dtype),
                                            adapter_name, safe_merge)
        if error is not None:
            warnings.warn(f"Merging AdaLoRA adapter {adapter_name!r} into a 4-bit (NF4) base re-quantizes the "
                          f"weight: max added rounding error {error:.3g} (generations may differ slightly)")
        self.merged_adapters.append(adapter_name)

    def _unmerge_one(self, adapter_name: str) -> None:
        with torch.no_grad():
            weight = self.base_weight()
            self.write_base_weight(weight - self.get_delta_weight(adapter_name).to(weight.dtype), adapter_name, False)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        name = self.active_adapter
        if self.disable_adapters or self.merged or name is None or self.lora_A[name].shape[0] == 0:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        if isinstance(base, Linear4bit):  # QLoRA-style: the fused NF4 kernel, E as its rank scale
            dtype = base.compute_dtype
            return ops.nf4_linear(
                x.to(dtype),
                base.nf4_weight(),
                None if base.bias is None else base.bias.to(dtype),
                self.lora_A[name].to(dtype),
                self.lora_B[name].to(dtype),
                1.0,
                dropout=self.lora_dropout[name] if self.training else 0.0,
                rank_scale=self.rank_scale(name).to(dtype),
            ).to(x.dtype)
        dtype = base.weight.dtype
        return ops.lora_linear(
            x,
            self.base_weight(),
            self.base_layer.bias,
            self.lora_A[name].to(dtype),
            self.lora_B[name].to(dtype),
            1.0,
            dropout=self.lora_dropout[name] if self.training else 0.0,
            rank_scale=self.rank_scale(name).to(dtype),
        )

    def extra_repr(self) -> str:
        ranks = {n: self.r[n] for n in self.adapters}
        return f"in={self.in_features}, out={self.out_features}, r={ranks}, {super().extra_repr()}"


def _features(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear, a Conv1D (weight stored [in, out]) or an NF4 Linear4bit (its
    `weight` is the packed buffer)."""
    if isinstance(layer, Linear4bit):
        return layer.out_features, layer.in_features
    out_f, in_f = layer.weight.shape
    return (in_f, out_f) if _is_conv1d(layer) else (out_f, in_f)


class RankAllocator:
    """PEFT's AdaLoRA budget: importance scores of the trainable adapter's triplets, the cubic
    budget schedule, and masking of E. Works on parameter names relative to the tuner's model
    (`<path>.lora_E.<adapter>`), which are the keys of `rank_pattern`."""

    def __init__(self, model: nn.Module, peft_config: AdaLoraConfig, adapter_name: str):
        self.peft_config = peft_config  # beta1, beta2 in (0, 1): checked by the tuner before injection
        self.adapter_name = adapter_name
        self.beta1 = peft_config.beta1
        self.beta2 = peft_config.beta2
        self.reset_ipt()
        self._set_budget_scheduler(model)

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _params(self, model: nn.Module, which: str):
        suffix = f".{which}.{self.adapter_name}"
        return [(n, p) for n, p in model.named_parameters() if n.endswith(suffix)]

    def _set_budget_scheduler(self, model: nn.Module) -> None:
        a_params = self._params(model, "lora_A")
        self.init_bgt = sum(p.shape[0] for _, p in a_params)
        self.name_set = sorted(n.replace("lora_A", "%s") for n, _ in a_params)
        self.target_bgt = self.peft_config.target_r * len(self.name_set)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether this step masks): flat during tinit, cubic decay, flat for tfinal."""
        cfg = self.peft_config
        if step <= cfg.tinit:
            return self.init_bgt, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_bgt, True
        progress = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (progress**3) + self.target_bgt)
        return budget, step % cfg.deltaT == 0

    def update_ipt(self, model: nn.Module) -> None:
        """Sensitivity |p * grad|, smoothed by beta1; its uncertainty, smoothed by beta2."""
        for which in ("lora_A", "lora_B", "lora_E"):
            for n, p in self._params(model, which):
                if p.grad is None:
                    raise ValueError(f"update_and_allocate: {n} has no gradient; call it after loss.backward()")
                if n not in self.ipt:
                    self.ipt[n] = torch.zeros_like(p)
                    self.exp_avg_ipt[n] = torch.zeros_like(p)
                    self.exp_avg_unc[n] = torch.zeros_like(p)
                with torch.no_grad():
                    self.ipt[n] = (p * p.grad).abs().detach()
                    self.exp_avg_ipt[n] = self.beta1 * self.exp_avg_ipt[n] + (1 - self.beta1) * self.ipt[n]
                    self.exp_avg_unc[n] = (
                        self.beta2 * self.exp_avg_unc[n] + (1 - self.beta2) * (self.ipt[n] - self.exp_avg_ipt[n]).abs()
                    )

    def _score(self, n: str) -> torch.Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    def triplet_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per module, `<path>.lora_E.<adapter>` -> [r, 1] importance of each rank's triplet:
        E's score plus the mean score of its A row and of its B column."""
        out = {}
        for n_e, _ in self._params(model, "lora_E"):
            a_score = self._score(n_e.replace(".lora_E.", ".lora_A.")).mean(dim=1)
            b_score = self._score(n_e.replace(".lora_E.", ".lora_B.")).mean(dim=0)
            out[n_e] = (self._score(n_e).view(-1) + (a_score + b_score)).view(-1, 1)
        return out

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero E where the triplet score is at or below the (init_bgt - budget)-th smallest."""
        scores = self.triplet_scores(model)
        k = self.init_bgt - budget
        threshold = torch.kthvalue(torch.cat([s.view(-1) for s in scores.values()]), k=k)[0].item() if k > 0 else -float("inf")
        rank_pattern = {}
        with torch.no_grad():
            for n, p in self._params(model, "lora_E"):
                dropped = scores[n] <= threshold
                p.masked_fill_(dropped, 0.0)
                rank_pattern[n] = (~dropped).view(-1).tolist()
        return rank_pattern

    def update_and_allocate(self, model: nn.Module, global_step: int, force_mask: bool = False):
        if global_step < self.peft_config.total_step - self.peft_config.tfinal:
            self.update_ipt(model)
        budget, mask_ind = self.budget_schedule(global_step)
        rank_pattern = self.mask_to_budget(model, budget) if (mask_ind or force_mask) else None
        return budget, rank_pattern

    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict[str, list[bool]]) -> None:
        """Re-apply a final pattern (keys with or without the adapter name) to E."""
        with torch.no_grad():
            for n, p in self._params(model, "lora_E"):
                mask = rank_pattern.get(n, rank_pattern.get(n.removesuffix(f".{self.adapter_name}")))
                keep = torch.tensor(mask, dtype=torch.bool, device=p.device).view(-1, 1)
                p.masked_fill_(~keep, 0.0)


class AdaLoraModel(LoraModel):
    """Injects `SVDLinear` into the targets of an `AdaLoraConfig`; PEFT's `AdaLoraModel`.

    One adapter trains (the others must be loaded with inference_mode); it owns the
    `rankallocator`. Call `update_and_allocate(step)` after each backward (PEFT calls it as
    `model.base_model.update_and_allocate(step)`; `model.update_and_allocate` reaches it too).
    """

    layer_cls: ClassVar[type[AdapterLayer]] = SVDLinear

    def inject_adapter(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        trainable = [name for name, c in self.peft_config.items() if not c.inference_mode]
        if len(trainable) > 1:
            raise ValueError(
                f"AdaLoraModel supports only 1 trainable adapter, got {trainable}. When using multiple adapters, "
                "set inference_mode to True for all adapters except the one you want to train."
            )
        if not config.inference_mode and not (0 < config.beta1 < 1 and 0 < config.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in (0, 1), got {config.beta1}, {config.beta2}")
        super().inject_adapter(adapter_name)
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(self.model, config, adapter_name)

    def _create_layer(self, target: nn.Module, adapter_name: str, config: AdaLoraConfig, key: str) -> SVDLinear:
        if config.fan_in_fan_out != _is_conv1d(target):  # PEFT corrects the flag to the layer type, loudly
            warnings.warn(f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(target).__name__}: flipped")
            config.fan_in_fan_out = _is_conv1d(target)
        return SVDLinear(target, adapter_name, config, key)

    def _adapter_shapes(self, target: nn.Module, config: AdaLoraConfig, key: str) -> dict[str, tuple[int, ...]]:
        out_f, in_f = _features(target)
        r = config.rank_for(key)
        return {"lora_A": (r, in_f), "lora_B": (out_f, r), "lora_E": (r, 1)}

    def _trainable(self) -> str:
        name = getattr(self, "trainable_adapter_name", None)
        if name is None or name not in self.peft_config:
            raise ValueError("AdaLoRA has no trainable adapter (all were loaded with inference_mode=True)")
        return name

    def orth_regularizer(self, adapter_name: str) -> torch.Tensor | float:
        """Mean over A and B matrices of ``||A A^T - I||_F`` and ``||B^T B - I||_F``."""
        total, count = 0.0, 0
        for _, layer in self.adapter_layers():
            if adapter_name not in layer.lora_A:
                continue
            for cov in (layer.lora_A[adapter_name] @ layer.lora_A[adapter_name].T,
                        layer.lora_B[adapter_name].T @ layer.lora_B[adapter_name]):
                eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                total = total + torch.norm(cov - eye, p="fro")
                count += 1
        return total / count if count else 0.0

    def forward(self, *args: Any, **kwargs: Any):
        """The model's forward; when it returns a loss, the orthogonal regulariser is added (PEFT)."""
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        name = getattr(self, "trainable_adapter_name", None)
        if isinstance(loss, torch.Tensor) and name in self.peft_config:
            outputs.loss = loss + self.peft_config[name].orth_reg_weight * self.orth_regularizer(name)
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """Update importance and mask E to the step's budget; after `total_step - tfinal`, keep
        re-applying the final rank_pattern (PEFT's schedule, call after every backward)."""
        name = self._trainable()
        config = self.peft_config[name]
        final = config.total_step - config.tfinal
        if global_step < final:
            _, rank_pattern = self.rankallocator.update_and_allocate(self.model, global_step)
            if rank_pattern:
                config.rank_pattern = rank_pattern
        elif global_step == final:
            _, rank_pattern = self.rankallocator.update_and_allocate(self.model, global_step, force_mask=True)
            config.rank_pattern = rank_pattern
            self.rankallocator.reset_ipt()
        else:
            self.rankallocator.mask_using_rank_pattern(self.model, config.rank_pattern)
        self._sync_kept_ranks(name)

    def _sync_kept_ranks(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        for key, layer in self.adapter_layers():
            mask = config.kept_ranks(key)
            if adapter_name in layer.lora_A and mask is not None:
                layer.kept_ranks[adapter_name] = mask


registry.register(AdaLoraConfig, tuner=AdaLoraModel)
