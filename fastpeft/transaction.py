"""All-or-nothing model edits: `with transaction(model): ...` undoes the block's changes to the
module tree if it raises.

A snapshot records, for every module reachable from the root, its child modules, parameters,
buffers and plain attributes (dicts, lists and sets shallow-copied: adapter layers keep ranks and
scalings there), every parameter's `requires_grad`, the given dicts (e.g. `peft_config`), and, for
the tensors named in `values`, a copy of their data (merges and loads write in place). Restoring
puts all of it back, so the modules, the state dict and the trainable set are what they were.

`adapters_untouched=True` (an add that settles only its own adapter, issue 24): the adapters
already registered are neither walked nor their `requires_grad` recorded (an adapter layer's
per-adapter ModuleDicts are kept shallowly: an entry added is removed on restore), so the
snapshot's cost does not grow with the number of adapters registered.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterable, Iterator

import torch
from torch import nn

_OWN = ("_modules", "_parameters", "_buffers")


class Snapshot:
    def __init__(self, root: nn.Module, dicts: Iterable[dict] = (), values: Iterable[torch.Tensor] = (),
                 objects: Iterable[object] = (), adapters_untouched: bool = False):
        self.objects = [(o, dict(vars(o))) for o in objects]  # e.g. a config the block may edit
        self.modules = []
        seen: set[int] = set()
        stack = [root]
        while stack:
            module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            self.modules.append(_record(module))
            if adapters_untouched:  # an adapter layer's per-adapter dicts: their own entries only
                leaves = getattr(type(module), "adapter_layer_names", ())
                for name in leaves:
                    held = module._modules.get(name)
                    if held is not None and id(held) not in seen:
                        seen.add(id(held))
                        self.modules.append(_record(held))
            stack.extend(m for m in module._modules.values() if m is not None and id(m) not in seen)
        self.grads = [(p, p.requires_grad) for m in self.modules for p in m[2].values() if p is not None]
        self.dicts = [(d, dict(d)) for d in dicts]
        with torch.no_grad():
            self.values = [(t, t.detach().clone()) for t in _unique(values)]

    def restore(self) -> None:
        for module, children, params, buffers, attrs in self.modules:
            for own, saved in zip(_OWN, (children, params, buffers)):
                current = module.__dict__[own]
                current.clear()
                current.update(saved)
            for key in [k for k in module.__dict__ if k not in _OWN and k not in attrs]:
                del module.__dict__[key]
            for key, (value, contents) in attrs.items():
                module.__dict__[key] = value  # the same object (a dict shared with the wrapper stays shared)
                _put_back(value, contents)
        for param, flag in self.grads:
            param.requires_grad_(flag)
        for obj, saved in self.objects:
            vars(obj).clear()
            vars(obj).update(saved)
        for d, saved in self.dicts:
            d.clear()
            d.update(saved)
        with torch.no_grad():
            for tensor, saved in self.values:
                tensor.copy_(saved)


def _record(module: nn.Module) -> tuple:
    """(module, its children, parameters, buffers, plain attributes with their contents)."""
    attrs = {k: (v, _contents(v)) for k, v in module.__dict__.items() if k not in _OWN}
    return module, dict(module._modules), dict(module._parameters), dict(module._buffers), attrs


def _contents(value: Any) -> Any:
    return copy.copy(value) if type(value) in (dict, list, set) else None


def _put_back(value: Any, contents: Any) -> None:
    """Restore a dict, list or set in place, so every holder of it sees the old contents."""
    if contents is None:
        return
    if isinstance(value, list):
        value[:] = contents
    else:
        value.clear()
        value.update(contents)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    out, seen = [], set()
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


@contextlib.contextmanager
def transaction(root: nn.Module, dicts: Iterable[dict] = (), values: Iterable[torch.Tensor] = (),
                objects: Iterable[object] = (), adapters_untouched: bool = False) -> Iterator[None]:
    """Run the block; if it raises, restore `root` (and `dicts`, the `values` tensors' data and the
    attributes of `objects`). `adapters_untouched`: see the module docstring."""
    snapshot = Snapshot(root, dicts, values, objects, adapters_untouched)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise
