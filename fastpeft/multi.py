"""Mixed-adapter batches for LoRA, the model-level side: PEFT's `adapter_names=` contract, one
kernel launch per layer. The per-batch metadata (`TokenGroups`, `MixedBatch`) is
`fastpeft.batching`'s (re-exported here).

  `AdapterBank`   one per LoRA layer: every adapter's A rows stacked in one ``lora_a [R, in]``
                  buffer and its B^T rows in ``lora_b [R, out]``, each adapter at its OWN rank
                  (no padding to the largest rank), with per-adapter ``offsets``, ``ranks``,
                  ``scalings`` tables indexed by a model-wide adapter id. Adding an adapter
                  writes only its rows (into a freed span or at the end); deleting one frees its
                  rows; the others are never re-packed (growing the buffer copies it once per
                  doubling, offsets unchanged).
  `AdapterIds`    model-wide adapter ids, stable while an adapter lives.
  `mixed_batch`   the context manager behind ``PeftModel.forward/generate(adapter_names=...)``:
                  PEFT's checks and errors, beam-search expansion of the names, bank refresh
                  (under the model's lock), and the batch's `MixedBatch` with each layer's bank
                  bound to the layers for this call only (`fastpeft.batching.activate`): threads
                  running mixed batches on one model at once never see each other's.

Banks are copies of the adapters' parameters, refreshed when a parameter's storage or version
counter changes (load_state_dict, an optimizer step and merges all bump it), so they never go
stale, and refreshing one adapter leaves the others alone. Mixed batches are inference only, as
in PEFT (which refuses them in training mode); here the forward also runs without autograd.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from fastpeft.batching import MixedBatch, TokenGroups, activate
from fastpeft.methods.base import ModulesToSaveWrapper
from fastpeft.methods.lora import LoraLinear, LoraModel, NF4LoraLinear

__all__ = ["BASE", "AdapterBank", "AdapterIds", "MixedBatch", "TokenGroups", "check_mixed_batch",
           "mixed_batch", "sync_banks"]  # MixedBatch, TokenGroups: per batch, from fastpeft.batching

BASE = "__base__"  # PEFT's row name for "no adapter"


class AdapterBank:
    """One layer's adapters packed for the multi-adapter kernels (see the module docstring).

    lora_a: [capacity, in] and lora_b: [capacity, out] in the layer's compute dtype and device;
    offsets, ranks: int32 [num_ids]; scalings: fp32 [num_ids]; a rank of 0 marks an id this
    layer does not hold (its rows get the base layer only); spans: {id: (offset, rank)} on the
    host; version: an int that every change bumps. Change a bank through its methods only.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device):
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.device = dtype, torch.device(device)
        self.lora_a = torch.zeros(0, in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(0, out_features, dtype=dtype, device=device)
        self.offsets = torch.zeros(0, dtype=torch.int32, device=device)
        self.ranks = torch.zeros(0, dtype=torch.int32, device=device)
        self.scalings = torch.zeros(0, dtype=torch.float32, device=device)
        self.used = 0                               # rows in use at the end of the buffers
        self.free: list[tuple[int, int]] = []       # (start, size) spans freed by removals
        self.spans: dict[int, tuple[int, int]] = {}  # id -> (offset, rank), host copy of the tables
        # id -> what its rows were copied from: weak references to the two tensors (a tensor freed
        # and another allocated at its address must not pass for it), then their version counters
        # and data pointers (an in-place update; a `.data =` swap) and the scaling
        self.stamps: dict[int, tuple | None] = {}
        self.version = 0  # bumped by every change to the tables or rows (caches of them key on it)

    @property
    def num_ids(self) -> int:
        return self.offsets.shape[0]

    def reserve_ids(self, n: int) -> None:
        if n > self.num_ids:
            grow = max(n, 2 * self.num_ids) - self.num_ids
            self.offsets = torch.cat([self.offsets, self.offsets.new_zeros(grow)])
            self.ranks = torch.cat([self.ranks, self.ranks.new_zeros(grow)])
            self.scalings = torch.cat([self.scalings, self.scalings.new_zeros(grow)])
            self.version += 1

    def _allocate(self, rank: int) -> int:
        """First freed span that fits, else the end (the buffers double when full)."""
        for i, (start, size) in enumerate(self.free):
            if size >= rank:
                self.free[i : i + 1] = [(start + rank, size - rank)] if size > rank else []
                return start
        start = self.used
        self.used += rank
        if self.used > self.lora_a.shape[0]:
            grow = max(self.used, 2 * self.lora_a.shape[0]) - self.lora_a.shape[0]
            self.lora_a = torch.cat([self.lora_a, self.lora_a.new_zeros(grow, self.in_features)])
            self.lora_b = torch.cat([self.lora_b, self.lora_b.new_zeros(grow, self.out_features)])
        return start

    def add(self, adapter_id: int, lora_A: Tensor, lora_B: Tensor, scaling: float, stamp: tuple | None = None) -> None:
        """Store adapter `adapter_id`: lora_A [r, in], lora_B [out, r] (any float dtype), its scale."""
        if adapter_id in self.spans:
            raise ValueError(f"adapter id {adapter_id} is already in the bank: remove it first")
        r = self._check(adapter_id, lora_A, lora_B)
        offset = self._allocate(r)
        self.reserve_ids(adapter_id + 1)
        self.spans[adapter_id] = (offset, r)
        self.offsets[adapter_id] = offset
        self.ranks[adapter_id] = r
        self._write(adapter_id, lora_A, lora_B, scaling, stamp)

    def update(self, adapter_id: int, lora_A: Tensor, lora_B: Tensor, scaling: float,
               stamp: tuple | None = None) -> None:
        """Overwrite the rows of an adapter already in the bank, at the rank it was added with."""
        if adapter_id not in self.spans:
            raise ValueError(f"adapter id {adapter_id} is not in the bank: add it first")
        r = self._check(adapter_id, lora_A, lora_B)
        if r != self.spans[adapter_id][1]:
            raise ValueError(f"adapter id {adapter_id}: rank {r} differs from the bank's record "
                             f"{self.spans[adapter_id][1]}; remove and add it again")
        self._write(adapter_id, lora_A, lora_B, scaling, stamp)

    def remove(self, adapter_id: int) -> None:
        """Free an adapter's rows; its id then gets the base layer only."""
        offset, r = self.spans.pop(adapter_id)
        self.stamps.pop(adapter_id, None)
        self.free.append((offset, r))
        self.ranks[adapter_id] = 0
        self.scalings[adapter_id] = 0.0
        self.version += 1

    def _check(self, adapter_id: int, lora_A: Tensor, lora_B: Tensor) -> int:
        if not isinstance(adapter_id, int) or adapter_id < 0:
            raise ValueError(f"adapter ids are ints >= 0, got {adapter_id!r}")
        r = lora_A.shape[0] if lora_A.dim() == 2 else -1
        if r < 1 or lora_A.shape[1] != self.in_features or tuple(lora_B.shape) != (self.out_features, r):
            raise ValueError(f"adapter id {adapter_id}: expected lora_A [r, {self.in_features}] and lora_B "
                             f"[{self.out_features}, r], got {list(lora_A.shape)} and {list(lora_B.shape)}")
        return r

    def _write(self, adapter_id: int, lora_A: Tensor, lora_B: Tensor, scaling: float, stamp: tuple | None) -> None:
        offset, r = self.spans[adapter_id]
        with torch.no_grad():
            self.lora_a[offset : offset + r].copy_(lora_A)
            self.lora_b[offset : offset + r].copy_(lora_B.t())
        self.scalings[adapter_id] = float(scaling)
        self.stamps[adapter_id] = stamp
        self.version += 1

    def sync(self, adapters: list[tuple[int, Tensor, Tensor, float]]) -> None:
        """Bring `adapters` ([(id, lora_A, lora_B, scaling)]) up to date, adding new ids. An adapter
        is re-copied only when its rows are not a copy of exactly these tensors as they are now
        (same objects, versions, storage, scaling); inference tensors have no version counter, so
        they are re-copied every time. Other ids are left alone (a mixed batch syncs only its own
        adapters: its host cost does not grow with the number registered); `remove` drops one.
        Every mixed forward runs this for every (layer, adapter) pair of its batch, so the check
        is inlined: a method call per pair cost ~3% of a CPU prefill."""
        spans, stamps = self.spans, self.stamps
        for adapter_id, a, b, scaling in adapters:
            try:
                now = (a._version, b._version, a.data_ptr(), b.data_ptr(), scaling)
            except RuntimeError:  # an inference tensor: no stamp, never fresh
                now = None
            s = stamps.get(adapter_id)
            if now is not None and s is not None and s[0]() is a and s[1]() is b and s[2] == now:
                continue
            stamp = None if now is None else (weakref.ref(a), weakref.ref(b), now)
            if adapter_id in spans and spans[adapter_id][1] != a.shape[0]:
                self.remove(adapter_id)
            if adapter_id not in spans:
                self.add(adapter_id, a, b, scaling, stamp)
            else:
                self.update(adapter_id, a, b, scaling, stamp)


class AdapterIds:
    """Model-wide adapter ids for the banks: stable while an adapter lives, reused after."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.names: tuple[str, ...] = ()  # the names of the last sync: unchanged -> nothing to do

    def sync(self, names: list[str]) -> dict[str, int]:
        if tuple(names) == self.names:
            return self.ids
        keep = set(names)
        for gone in [n for n in self.ids if n not in keep]:
            del self.ids[gone]
        taken = set(self.ids.values())
        free = (i for i in range(len(names) + len(taken)) if i not in taken)
        for name in names:
            if name not in self.ids:
                self.ids[name] = next(free)
        self.names = tuple(names)
        return self.ids


def _walk(peft_model: nn.Module) -> tuple[list[nn.Module], bool]:
    """The model's LoRA layers and whether it has modules_to_save wrappers, in one module walk."""
    # not nn.Module.modules(): every call of a mixed forward walks the model, and a LoRA layer
    # holds ~3 submodules per adapter that can hold neither kind, so the walk stops at it
    layers, wrapped, stack = [], False, [peft_model.base_model.model]
    while stack:
        module = stack.pop()
        if isinstance(module, LoraLinear):
            layers.append(module)
            continue
        wrapped = wrapped or isinstance(module, ModulesToSaveWrapper)
        stack.extend(reversed(module._modules.values()))
    return layers, wrapped


def check_mixed_batch(peft_model: nn.Module, adapter_names: Any, walk=None) -> list[str]:
    """PEFT's checks for `adapter_names`, before anything runs; returns the names as a list."""
    tuner = peft_model.base_model
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
    if type(tuner) is not LoraModel:
        raise NotImplementedError(f"adapter_names= (mixed-adapter batches) is supported for LoRA models, "
                                  f"not {type(tuner).__name__}")
    if peft_model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    layers, has_wrappers = walk or _walk(peft_model)
    wanted = set(adapter_names) - {BASE}
    # per name, not a set of every layer's adapters: the check must not grow with the number registered
    unknown = sorted(n for n in wanted if not any(n in layer.lora_A._modules for layer in layers))
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
    for layer in layers:
        if type(layer) not in (LoraLinear, NF4LoraLinear):
            raise NotImplementedError(f"mixed-adapter batches over {type(layer).__name__} layers are not implemented")
        if layer.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        if not wanted.isdisjoint(layer.lora_magnitude_vector._modules):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
    if has_wrappers:
        raise NotImplementedError("mixed-adapter batches with modules_to_save (e.g. SEQ_CLS heads) are not "
                                  "implemented yet")
    return list(adapter_names)


def sync_banks(peft_model: nn.Module, layers: list[nn.Module] | None = None,
               names: set[str] | None = None) -> dict[str, int]:
    """Bring every LoRA layer's bank up to date with its adapters (only `names` of them when given:
    a mixed batch's own, so its cost does not grow with the number registered); returns {name: id}.
    A bank drops the ids of adapters its layer no longer holds whenever the layer's set changes."""
    tuner = peft_model.base_model
    registry = tuner.__dict__.get("_adapter_ids") or tuner.__dict__.setdefault("_adapter_ids", AdapterIds())
    ids = registry.sync(list(peft_model.peft_config))
    # every bank takes every id the batch may name, held by its layer or not (those rows: base only)
    num_ids = 1 + max((ids[n] for n in (ids if names is None else names)), default=-1)
    for layer in layers if layers is not None else _walk(peft_model)[0]:
        # plain dict lookups, not nn.Module.__getattr__: every mixed call runs this for every layer
        state = layer.__dict__
        modules = state["_modules"]
        base = modules["base_layer"]  # the bank is in the compute dtype: an NF4 base's, or the weight's
        weight = base.weight  # a parameter, or an NF4 layer's buffer
        # __dict__: a Linear4bit's plain attribute; getattr would raise and catch on an nn.Linear
        dtype, device = base.__dict__.get("compute_dtype") or weight.dtype, weight.device
        bank = state.get("multi_bank")
        stale = bank is not None and bank.lora_a.is_inference() and not torch.is_inference_mode_enabled()
        if bank is None or stale or bank.dtype != dtype or bank.device != device:
            bank = state["multi_bank"] = AdapterBank(layer.in_features, layer.out_features, dtype, device)
            state["multi_bank_holds"] = ()
        lora_A, lora_B, scaling = modules["lora_A"]._modules, modules["lora_B"]._modules, state["scaling"]
        holds = tuple(lora_A)
        if holds != state["multi_bank_holds"]:  # adapters added or deleted here since the last sync
            kept = {ids[n] for n in holds}
            for gone in [i for i in bank.spans if i not in kept]:
                bank.remove(gone)
            state["multi_bank_holds"] = holds
        bank.reserve_ids(num_ids)
        bank.sync([(ids[n], a._parameters["weight"], lora_B[n]._parameters["weight"], scaling[n])
                   for n in (holds if names is None else names) if (a := lora_A.get(n)) is not None])
    return ids


@contextlib.contextmanager
def mixed_batch(peft_model: nn.Module, adapter_names: Any, num_beams: Any = None) -> Iterator[MixedBatch]:
    """Run the block with row i of every batch on adapter `adapter_names[i]` (``"__base__"``: none).

    PEFT's contract: its errors (wrong type, training mode, unknown names, merged adapters, DoRA),
    and with ``num_beams > 1`` each name repeated num_beams times (generate's beam expansion).
    The block runs without autograd (mixed batches are inference only)."""
    walk = _walk(peft_model)
    names = check_mixed_batch(peft_model, adapter_names, walk)
    if isinstance(num_beams, int) and num_beams > 1:
        names = [n for n in names for _ in range(num_beams)]
    layers = walk[0]
    with _sync_lock(peft_model):  # bank changes one at a time; a running forward reads its own banks
        ids = sync_banks(peft_model, layers, set(names) - {BASE})
        banks = [(layer, layer.__dict__["multi_bank"]) for layer in layers]
    batch = MixedBatch(names, [-1 if n == BASE else ids[n] for n in names])
    with activate(batch, banks), torch.no_grad():
        yield batch


def _sync_lock(peft_model: nn.Module) -> threading.RLock:
    """The model's bank lock (one per tuner, made on first use; dict.setdefault is atomic)."""
    state = peft_model.base_model.__dict__
    return state.get("_multi_lock") or state.setdefault("_multi_lock", threading.RLock())
