"""Multi-adapter LoRA for mixed-adapter batches: `multi_lora_linear`, one launch per layer for a
batch whose rows use different adapters (inference only). Kernels: `fastpeft/kernels/multi_lora.py`
(grouped SGMV-style and gathered BGMV-style); reference: `fastpeft/kernels/reference.py`.

A bank (`fastpeft.multi.AdapterBank`, read here by its fields: lora_a [R, K], lora_b [R, N],
offsets/ranks int32 [I], scalings fp32 [I], spans {id: (offset, rank)}, version) holds a layer's
adapters; the batch metadata (`fastpeft.batching.TokenGroups`: token_ids, perm, seg_start,
seg_adapter, num_segments, max_segment) is built once per forward and shared by every layer.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from fastpeft import batching
from fastpeft.kernels import reference
from fastpeft.ops._backend import FLOAT_DTYPES, check_types, describe, kernels, resolve_backend
from fastpeft.ops.nf4 import flat_nf4, nf4_args, unflat_nf4

__all__ = ["multi_lora_linear"]

_MULTI_PATHS = (None, "grouped", "gathered")


class _Derived:
    """What `multi_lora_linear` derives from a bank or a batch and reuses, held by the op itself
    (never written into the bank or the batch): keyed weakly by that object, so an entry goes with
    it, and stamped with a key (a bank's `version`) that a change of the object invalidates.
    Per call the bank's reference tables would cost ~10 small ops per layer."""

    def __init__(self):
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, owner, what: str, stamp, build):
        """`build()`, or the value it returned for (`owner`, `what`) while `stamp` was the same."""
        entries = self._entries.get(owner)
        if entries is None:
            entries = self._entries[owner] = {}
        hit = entries.get(what)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = build()
        entries[what] = (stamp, value)
        return value


_derived = _Derived()


def _bank_tables(bank, max_rank: int) -> tuple[Tensor, Tensor]:
    """`reference.multi_lora_tables` of the bank at `max_rank`, until the bank's `version` changes."""
    return _derived.get(bank, ("tables", max_rank), bank.version, lambda: reference.multi_lora_tables(
        bank.offsets, bank.ranks, bank.scalings, max_rank))


def _check_bank(bank, K: int, N: int, x: Tensor) -> None:
    """The bank's buffers fit x (K in, N out, x's dtype and device); checked once per bank change
    (a bank changes through its methods only, each bumping `version`), not on every call (traced
    by torch.compile: checked while tracing)."""
    if torch.compiler.is_compiling():
        _check_bank_now(bank, K, N, x)
        return
    _derived.get(bank, "checked", (bank.version, K, N, x.dtype, x.device),
                 lambda: _check_bank_now(bank, K, N, x))


def _check_bank_now(bank, K: int, N: int, x: Tensor) -> bool:
    R = bank.lora_a.shape[0] if isinstance(bank.lora_a, Tensor) else 0
    for name, want in (("lora_a", (R, K)), ("lora_b", (R, N))):
        t = getattr(bank, name)
        check_types("multi_lora_linear", {f"bank.{name}": t})
        if t.shape != want or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"multi_lora_linear: bank.{name} must be {list(want)} {x.dtype} on {x.device} "
                             f"(K = x.shape[-1], N = weight.shape[0]); got bank.{name} {describe(t)}")
    return True


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, bank, token_adapter_ids, *,
                      backend: str | None = None, path: str | None = None) -> Tensor:
    """y[m] = x[m] W^T + b + s_i (x[m] A_i^T) B_i^T with i = token m's adapter (-1: base only).

    x: [..., K] fp32|fp16|bf16 (its rows flatten to M tokens); weight: [N, K] x.dtype any strides
    (``Conv1D.weight.T`` read in place), or an NF4 weight (see `nf4_linear`; x is then in the
    compute dtype): the 4-bit base decoded inside the same launch (multi-tenant QLoRA; the torch
    backend dequantizes it first); bias: [N] x.dtype or None; bank: the layer's adapters,
    in x.dtype on x.device; token_adapter_ids: a `fastpeft.batching.TokenGroups` for these M tokens
    (built once per forward and shared by all layers: no host sync here), or an integer tensor
    [M] of ids in [-1, bank.num_ids) (then grouped here, reading the ids on the host) -> [..., N].
    `path`: "grouped" (SGMV-style, tokens sorted into segments: prefill), "gathered" (BGMV-style,
    one id per token: decode), or None: gathered when segments average under 16 tokens (Triton);
    the torch path gathers per row when rows are at least rank-long or all on distinct adapters.

    Inference only (PEFT refuses `adapter_names` in training mode): no autograd; an input that
    requires grad while grad mode is on is an error rather than a silently detached result.
    """
    check_types("multi_lora_linear", {"x": x})
    if x.dtype not in FLOAT_DTYPES or x.dim() < 1:
        raise ValueError(f"multi_lora_linear: x must be [..., K] float32|float16|bfloat16, got {describe(x)}")
    which = resolve_backend(x, backend)
    weight, qargs = _base_weight(weight, x, which)
    if weight is None:
        raise TypeError("multi_lora_linear: weight must be a torch.Tensor, got NoneType")
    check_types("multi_lora_linear", {"weight": weight, "bias": bias})
    K, N = x.shape[-1], weight.shape[0]
    for name, t, want in (("weight", weight, (N, K)), ("bias", bias, (N,))):
        if t is not None and (t.shape != want or t.dtype != x.dtype or (
                t.device != x.device and t.device.type != "meta")):
            raise ValueError(f"multi_lora_linear: {name} must be {list(want)} {x.dtype} on {x.device} "
                             f"(K = x.shape[-1], N = weight.shape[0]); got {name} {describe(t)}")
    _check_bank(bank, K, N, x)
    if path not in _MULTI_PATHS:
        raise ValueError(f"multi_lora_linear: path must be 'grouped', 'gathered' or None, got {path!r}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, bank.lora_a, bank.lora_b)):
        raise ValueError("multi_lora_linear is inference only (no backward): run it under torch.no_grad() "
                         "or with inputs that do not require grad")
    x2d = x.reshape(-1, K)
    groups = _batch_groups(token_adapter_ids, x, x2d.shape[0], bank)
    y = _launch(kernels(which, "multi_lora"), x, x2d, weight, qargs, bias, bank, groups, path)
    return y if y.shape[:-1] == x.shape[:-1] else y.reshape(*x.shape[:-1], N)


def _base_weight(weight, x: Tensor, which: str):
    """(weight, NF4 args): a dense weight as given (args None); an NF4 weight dequantized on the
    torch path, else a meta tensor of its shape and x's dtype (for the checks) and its args."""
    if isinstance(weight, Tensor) or not hasattr(weight, "packed"):
        return weight, None
    qargs = nf4_args(weight)
    packed, absmax, shape, blocksize, nested, _ = qargs
    if packed.device != x.device:
        raise ValueError(f"multi_lora_linear: the NF4 weight is on {packed.device}, x is {describe(x)}")
    if which == "torch":  # the reference path: a dense weight
        return reference.nf4_dequantize(packed, absmax, shape, blocksize, x.dtype, nested), None
    return torch.empty(shape, dtype=x.dtype, device="meta"), qargs


def _batch_groups(token_adapter_ids, x: Tensor, M: int, bank) -> batching.TokenGroups:
    """The batch metadata for x's M tokens: as given, or grouped here from per-token ids."""
    groups = token_adapter_ids
    if isinstance(groups, Tensor):
        if groups.dim() != 1 or groups.shape[0] != M or groups.dtype.is_floating_point or groups.dtype == torch.bool:
            raise ValueError(f"multi_lora_linear: token_adapter_ids must be integer [{M}] (one per token of x "
                             f"{list(x.shape)}), got {describe(groups)}")
        groups = batching.TokenGroups.from_token_ids(groups.to(x.device))
        if groups.min_id < -1:
            raise ValueError(f"multi_lora_linear: adapter id {groups.min_id} out of range [-1, {bank.num_ids})")
    if groups.M != M or groups.device != x.device:
        raise ValueError(f"multi_lora_linear: the batch metadata is for {groups.M} tokens on {groups.device}, "
                         f"x has {M} on {x.device}")
    if groups.max_id >= bank.num_ids:
        raise ValueError(f"multi_lora_linear: adapter id {groups.max_id} out of range [-1, {bank.num_ids}) "
                         f"of the bank")
    return groups


def _launch(launchers, x, x2d, weight, qargs, bias, bank, groups, path) -> Tensor:
    """Pick the grouped or gathered form and run it as `torch.ops.fastpeft.multi_lora_linear`
    (checked inputs). Eager calls hand the reference its tables and slots from the caches of
    `_derived`; a traced call (torch.compile) computes them inside the op."""
    (M, K), N = x2d.shape, weight.shape[0]  # weight: dense, or a meta tensor shaped like the NF4 one
    S, T = groups.num_segments, groups.tokens_per_row
    # the rank tile fits this batch's adapters, not every adapter registered (host ints: no sync)
    spans = bank.spans
    max_rank = 1
    for i in groups.adapters:
        if i in spans and spans[i][1] > max_rank:
            max_rank = spans[i][1]
    # gathered (one adapter per token) when segments are short: on a GPU when they average under
    # 16 tokens (the grouped kernel's row tile). The CPU path gathers each ROW's factors and
    # multiplies its T tokens in place, which copies less than sorting tokens into segments when
    # a row has at least as many tokens as the rank, or when no two rows share an adapter.
    on_reference = launchers is reference
    short = M < 16 * S if not on_reference else (max_rank <= T or groups.rows <= S)
    grouped = path == "grouped" or (path is None and not short)
    cache: list[Tensor] = []
    traced = torch.compiler.is_compiling()
    if on_reference and not traced:
        cache.extend(_bank_tables(bank, max_rank))
        if grouped and M and S and groups.max_segment:  # per batch
            cache.extend(_derived.get(groups, "slots", None, lambda: reference.multi_lora_segment_slots(
                groups.perm, groups.seg_start, S, groups.max_segment)))
        elif not grouped:
            cache.append(_derived.get(groups, "row_slots", None, lambda: groups.row_ids.long() + 1))
    flat = flat_nf4(qargs) if qargs else (None, None, 0, 0, 0, None, None, None, None)
    packed, absmax, _, _, blocksize, code4, code8, nested_absmax, offset = flat
    weight = None if qargs else weight
    head = (bias, bank.lora_a, bank.lora_b, bank.offsets, bank.ranks, bank.scalings, max_rank, N)
    tail = (backend_of(launchers), packed, absmax, blocksize, code4, code8, nested_absmax, offset, cache)
    if not grouped and on_reference:  # per row (x as [rows, T, K]), or per token when T == 1
        rows = x if x.shape[:-1] == (groups.rows, T) else x2d.reshape(groups.rows, T, K) if T > 1 else x2d
        return torch.ops.fastpeft.multi_lora_linear(rows, weight, *head, groups.row_ids, None, None, None, 0, 0,
                                                    *tail)
    if not grouped:
        return torch.ops.fastpeft.multi_lora_linear(x2d, weight, *head, groups.token_ids, None, None, None, 0, 0,
                                                    *tail)
    return torch.ops.fastpeft.multi_lora_linear(x2d, weight, *head, groups.token_ids, groups.perm, groups.seg_start,
                                                groups.seg_adapter, S, groups.max_segment, *tail)


def backend_of(launchers) -> str:
    return "torch" if launchers is reference else "triton"


# -- torch.library: `torch.ops.fastpeft.multi_lora_linear`, one opaque node per layer under
# torch.compile, with a fake kernel; inference only, so no autograd formula.
@torch.library.custom_op("fastpeft::multi_lora_linear", mutates_args=())
def _multi_lora_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                   offsets: Tensor, ranks: Tensor, scalings: Tensor, max_rank: int, N: int, ids: Tensor,
                   perm: Tensor | None, seg_start: Tensor | None, seg_adapter: Tensor | None,
                   num_segments: int, max_segment: int, backend: str, packed: Tensor | None,
                   absmax: Tensor | None, blocksize: int, code4: Tensor | None, code8: Tensor | None,
                   nested_absmax: Tensor | None, offset: Tensor | None, cache: list[Tensor]) -> Tensor:
    """[..., K] -> [..., N]: the grouped form when `perm` is given (ids: token ids, perm, seg_start,
    seg_adapter, num_segments, max_segment as in `TokenGroups`), else the gathered form (ids: one
    adapter id per row of x, x [M, K] or, on the torch backend, [rows, T, K]). The base is `weight`
    [N, K], or the NF4 weight given flat (`packed` .. `offset`, Triton only). `cache`: empty, or the
    reference's `multi_lora_tables` followed by its `multi_lora_segment_slots` (grouped) or the
    table slots ids + 1 (gathered)."""
    launchers = kernels(backend, "multi_lora")
    extra: dict = {}
    if packed is not None:
        K = x.shape[-1]
        extra["nf4"] = unflat_nf4(packed, absmax, N, K, blocksize, code4, code8, nested_absmax, offset)
    if cache:
        extra["tables"] = tuple(cache[:3])
    common = (x, weight, bias, lora_a, lora_b, offsets, ranks, scalings, max_rank)
    if perm is None:
        if len(cache) > 3:
            extra["table_slots"] = cache[3]
        return launchers.multi_lora_gathered_fwd(*common, ids, **extra)
    if len(cache) > 3:
        extra["slots"] = tuple(cache[3:5])
    return launchers.multi_lora_grouped_fwd(*common, perm, seg_start, seg_adapter, num_segments, max_segment,
                                            **extra)


@_multi_lora_op.register_fake
def _(x, weight, bias, lora_a, lora_b, offsets, ranks, scalings, max_rank, N, ids, perm, seg_start, seg_adapter,
      num_segments, max_segment, backend, packed, absmax, blocksize, code4, code8, nested_absmax, offset, cache):
    return x.new_empty((*x.shape[:-1], N))
