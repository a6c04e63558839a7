"""Paged AdamWs: optimizer state in pinned host memory, paged onto the GPU for each step.

QLoRA's third part. Optimizer state never occupies device memory between steps, so a long
sequence's activation spike cannot run out of memory because of it. The mechanism is explicit
(no CUDA managed memory): every state tensor of a CUDA parameter is allocated in page-locked
(pinned) host memory, which the GPU's copy engines move asynchronously. A step cuts each
parameter into pages of `page_size` elements (rounded up to whole 8-bit blocks, so a block never
straddles two pages) and pipelines the pages through two device staging buffers:

  copy stream (side):  load page i+1 (host -> device, non_blocking) | store page i-1 (device -> host)
  compute stream:      wait for load i (event) | update page i | record done i (event)

A store waits for its page's update (event); a load reuses a buffer only after the store that
emptied it, which the in-order copy stream guarantees. The update of page i overlaps the
transfers of its neighbours. The staging buffers (two pages of state) are taken from torch's
allocator for the step and handed back after it. `step()` returns without waiting for the host:
the compute stream waits for the copy stream, and `state_dict()` / `load_state_dict()` wait for
the last copies to land before they touch the host state.

A parameter that is not on CUDA keeps its state in ordinary host memory, and each page is updated
in place: on a CPU the results are bit-identical to the unpaged twins, torch.optim.AdamW for
`PagedAdamW` and `AdamW8bit` for `PagedAdamW8bit`, step for step.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import Tensor

from fastpeft.optim.adamw import AdamW8bit, _AdamWBase, adamw_update, flat_param, flat_state

__all__ = ["PagedAdamW", "PagedAdamW8bit"]

_ALIGN = 16  # bytes: each state tensor starts on this boundary inside a staging buffer


def _page_slice(t: Tensor, start: int, end: int, n: int, block_size: int) -> Tensor:
    """The part of a flat state tensor that belongs to elements [start, end) of an n-element
    parameter: an element-wise state is sliced as is, a per-block one (absmax) by block."""
    if t.numel() == n:
        return t[start:end]
    return t[start // block_size: -(-end // block_size)]


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _carve(buffer: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Views of a uint8 device buffer shaped and typed as the host tensors `like`."""
    views, offset = {}, 0
    for k, t in like.items():
        nbytes = t.numel() * t.element_size()
        views[k] = buffer[offset: offset + nbytes].view(t.dtype)
        offset += _padded(nbytes)
    return views


class _Paged:
    """Mixin for an `_AdamWBase`: state in (pinned) host memory, paged through the device per step."""

    def _init_paging(self, page_size: int) -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"{type(self).__name__}: page_size must be a positive int, got {page_size!r}")
        self.page_size = page_size
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._landed = None  # CUDA event: the last step's copies to the host are done

    def _state_home(self, p: Tensor) -> dict:
        return {"device": "cpu", "pin_memory": p.is_cuda}

    def _sync(self) -> None:
        """Wait until the host state holds the last step's result."""
        if self._landed is not None:
            self._landed.synchronize()
            self._landed = None

    def state_dict(self) -> dict:
        self._sync()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._sync()
        super().load_state_dict(state_dict)

    def _run(self, jobs: list) -> None:
        with contextlib.ExitStack() as writebacks:
            pages: dict[torch.device, list] = {}
            for p, group, state in jobs:
                pf, gf = writebacks.enter_context(flat_param(p))
                n, block = pf.numel(), group.get("block_size", 1)
                size = -(-self.page_size // block) * block
                host, step = flat_state(state), int(state["step"])
                for s in range(0, n, size):
                    e = min(s + size, n)
                    part = {k: _page_slice(t, s, e, n, block) for k, t in host.items()}
                    pages.setdefault(pf.device, []).append((pf[s:e], gf[s:e], part, group, step))
            for device, todo in pages.items():
                if device.type == "cuda":
                    self._page_through(device, todo)
                else:  # the state is already here: update it in place
                    for page in todo:
                        self._update(*page)

    def _page_through(self, device: torch.device, pages: list) -> None:
        """Double-buffered host -> device -> host pipeline over `pages` (module docstring)."""
        compute = torch.cuda.current_stream(device)
        if device not in self._copy_streams:
            self._copy_streams[device] = torch.cuda.Stream(device)
        copy = self._copy_streams[device]
        capacity = max(sum(_padded(t.numel() * t.element_size()) for t in host.values()) for _, _, host, _, _ in pages)
        buffers = [torch.empty(capacity, dtype=torch.uint8, device=device) for _ in range(2)]
        copy.wait_stream(compute)  # the buffers' memory is free, and the last step's work is done

        def load(i: int) -> tuple[dict[str, Tensor], torch.cuda.Event]:
            host = pages[i][2]
            staged = _carve(buffers[i % 2], host)
            with torch.cuda.stream(copy):
                for k, t in host.items():
                    staged[k].copy_(t, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(copy)
            return staged, ready

        upcoming = load(0)
        for i, (pf, gf, host, group, step) in enumerate(pages):
            staged, ready = upcoming
            if i + 1 < len(pages):
                upcoming = load(i + 1)  # overlaps this page's update
            compute.wait_event(ready)
            self._update(pf, gf, staged, group, step)
            done = torch.cuda.Event()
            done.record(compute)
            with torch.cuda.stream(copy):
                copy.wait_event(done)
                for k, t in host.items():
                    t.copy_(staged[k], non_blocking=True)
        compute.wait_stream(copy)  # later work (and the buffers' next owner) comes after the copies
        self._landed = torch.cuda.Event()
        self._landed.record(copy)


class PagedAdamW(_Paged, _AdamWBase):
    """torch.optim.AdamW with its state paged from pinned host memory (see the module docstring).

    Same arguments, defaults, arithmetic and state (``step``, ``exp_avg``, ``exp_avg_sq`` in the
    parameter's dtype and shape) as torch.optim.AdamW, so state_dicts load either way; page_size:
    elements per page.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, page_size: int = 1 << 22) -> None:
        self._init_paging(page_size)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _state_spec(self, p: Tensor, group: dict) -> dict[str, tuple[tuple, torch.dtype]]:
        return {"exp_avg": (p.shape, p.dtype), "exp_avg_sq": (p.shape, p.dtype)}

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Tensor], group: dict, step: int) -> None:
        beta1, beta2 = group["betas"]
        adamw_update(p, g, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"], beta1=beta1, beta2=beta2,
                     eps=group["eps"], weight_decay=group["weight_decay"], step=step)


class PagedAdamW8bit(_Paged, AdamW8bit):
    """`AdamW8bit` with its state paged from pinned host memory (see the module docstring).

    Same arguments, defaults, update and state as AdamW8bit; page_size: elements per page,
    rounded up to a multiple of block_size.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, block_size: int = 256, *,
                 page_size: int = 1 << 22) -> None:
        self._init_paging(page_size)
        super().__init__(params, lr, betas, eps, weight_decay, block_size)
