"""Per-batch metadata of mixed-adapter batches: everything the multi-adapter kernels need to know
about ONE forward (which adapter each row and token uses, tokens sorted into per-adapter
segments), built once per batch and shared by every layer of that forward.

  `TokenGroups`  the metadata of one forward over rows x tokens_per_row tokens: adapter id per
                 token and per row, tokens sorted by adapter into segments (the grouped kernel),
                 built on the host from the rows' ids (which the host already knows) and copied
                 to the device once, so no layer synchronises with the device.
  `MixedBatch`   the rows' adapter ids of one ``adapter_names=`` call; hands each layer the
                 `TokenGroups` for its input's (tokens per row, device), built by the first layer.

Which batch a layer runs belongs to the CALL, never to the model: `activate` binds a batch (and
each layer's bank as the batch synced it) to the layers in a context variable, so threads (and
asyncio tasks) running mixed batches on one model at once each see only their own, and
`batch_for(layer)` reads it back (None outside a mixed call).

The model-level side (each layer's `AdapterBank`, model-wide adapter ids, PEFT's checks) is
`fastpeft.multi`; the op that reads both is `fastpeft.ops.multi_lora_linear`.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
import threading
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor


class TokenGroups:
    """The metadata of one forward over `rows` rows of `tokens_per_row` tokens each (token m is
    in row m // tokens_per_row), all on `device`, built from host ints with one copy:

    token_ids int32 [M] (adapter id per token, -1 base); row_ids int32 [rows] (per row); perm
    int32 [M] (tokens sorted by id, stable); seg_start int32 [S + 1] and seg_adapter int32 [S]
    (segments of perm sharing an id); host ints rows, tokens_per_row, M, num_segments S,
    max_segment (longest segment), min_id, max_id, and the segments' ids as a host list `adapters`.
    """

    def __init__(self, row_ids: Tensor | list[int], tokens_per_row: int, device: torch.device | str):
        # per row on the host in plain Python (a batch has few rows: a handful of torch ops would
        # cost more), per token by torch; one copy to the device
        ids = row_ids.flatten().tolist() if isinstance(row_ids, Tensor) else [int(i) for i in row_ids]
        T, n = int(tokens_per_row), len(ids)
        self.rows, self.tokens_per_row, self.M = n, T, n * T
        order = sorted(range(n), key=ids.__getitem__)  # stable
        seg_ids, counts = [], []
        for i in order:
            if seg_ids and seg_ids[-1] == ids[i]:
                counts[-1] += 1
            else:
                seg_ids.append(ids[i])
                counts.append(1)
        seg_start = [0, *itertools.accumulate(c * T for c in counts)]
        self.num_segments = S = len(seg_ids)
        self.adapters = seg_ids
        self.max_segment = max(counts, default=0) * T
        self.max_id, self.min_id = max(ids, default=-1), min(ids, default=-1)
        host = torch.tensor(ids + ids + order + seg_start + seg_ids, dtype=torch.int32)
        if T != 1:  # rows -> tokens: row i's id for each of its tokens, and tokens i*T .. i*T+T-1
            tokens = torch.arange(T, dtype=torch.int32)
            host = torch.cat([host[:n], host[:n].repeat_interleave(T),
                              (host[2 * n : 3 * n, None] * T + tokens).flatten(), host[3 * n :]])
        packed = host.to(device, non_blocking=True)
        M = self.M
        self.row_ids, packed = packed[:n], packed[n:]
        self.token_ids, self.perm = packed[:M], packed[M : 2 * M]
        self.seg_start, self.seg_adapter = packed[2 * M : 2 * M + S + 1], packed[2 * M + S + 1 :]
        self.device = packed.device

    @classmethod
    def from_token_ids(cls, token_ids: Tensor) -> TokenGroups:
        """Metadata for a 1-D tensor of per-token ids (one token per row); reads it on the host."""
        return cls(token_ids.detach().cpu(), 1, token_ids.device)


class MixedBatch:
    """The rows' adapter ids of one mixed forward or generate call; hands each layer the
    `TokenGroups` for its input, built by the first layer that sees a (tokens per row, device)
    and shared by all later layers and forwards of the call (a generate call builds its decode
    metadata once)."""

    def __init__(self, names: list[str], row_ids: list[int]):
        self.names, self.row_ids = names, row_ids
        self._groups: dict[tuple[int, torch.device], TokenGroups] = {}

    def groups_for(self, x: Tensor) -> TokenGroups:
        rows, shape = len(self.row_ids), x.shape
        if len(shape) < 2 or shape[0] != rows:
            raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{rows} and {shape[0] if shape else 0} respectively.")
        key = (math.prod(shape[1:-1]), x.device)  # (tokens per row, device)
        groups = self._groups.get(key)
        if groups is None:
            groups = self._groups[key] = TokenGroups(self.row_ids, key[0], key[1])
        return groups



# {id(layer): (batch, bank)} of the mixed calls running in this thread / task (None: none)
_ACTIVE: contextvars.ContextVar[dict[int, tuple[MixedBatch, Any]] | None] = contextvars.ContextVar(
    "fastpeft_mixed_batches", default=None)


# How many mixed calls are bound right now, in any thread. While none is, batch_for answers without
# touching the context variable, which torch.compile cannot trace: a plain forward stays one graph.
_bound_calls = 0
_bound_lock = threading.Lock()


def batch_for(layer: object) -> tuple[MixedBatch, Any] | None:
    """(batch, bank) that the calling thread's mixed call bound to `layer`, or None."""
    if not _bound_calls:
        return None
    active = _ACTIVE.get()
    return None if active is None else active.get(id(layer))


@contextlib.contextmanager
def activate(batch: MixedBatch, banks: Iterable[tuple[object, Any]]) -> Iterator[MixedBatch]:
    """Bind `batch` and each layer's bank ([(layer, bank)]) for the block, in this context only
    (another thread's forward on the same layers sees its own binding or none). Nests: an inner
    call over other layers keeps the outer bindings."""
    outer = _ACTIVE.get()
    bound = dict(outer) if outer else {}
    bound.update((id(layer), (batch, bank)) for layer, bank in banks)
    global _bound_calls
    token = _ACTIVE.set(bound)
    with _bound_lock:
        _bound_calls += 1
    try:
        yield batch
    finally:
        with _bound_lock:
            _bound_calls -= 1
        _ACTIVE.reset(token)
