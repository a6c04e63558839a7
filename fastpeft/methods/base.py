"""What every injected method shares: the adapter layer, the modules_to_save copy, the tuner.

Adapters sit in `nn.ModuleDict`s keyed by adapter name (PEFT's layout), so module paths and
state-dict keys are PEFT's: `<path>.lora_A.<adapter>.weight`, `<path>.base_layer.weight`,
`<path>.modules_to_save.<adapter>.weight`.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from fastpeft import inject


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """The dtype adapter weights live in (PEFT's): fp32 on a 16- or 32-bit base (autocast up),
    fp64 on a float64 base (which runs on the fp64 reference path)."""
    return torch.float64 if base_weight.dtype == torch.float64 else torch.float32


def acc(t: torch.Tensor) -> torch.Tensor:
    """`t` in the dtype merges and norms compute in: fp32, or fp64 for fp64 tensors."""
    return t if t.dtype == torch.float64 else t.float()


class AdapterLayer(nn.Module):
    """A wrapped `base_layer` plus named adapters; one adapter is active at a time.

    Subclasses list their per-adapter ModuleDicts in `adapter_layer_names` and per-adapter
    plain dicts (ranks, scalings) in `other_param_names`, and implement `update_layer`,
    `merge` / `unmerge` and `forward`.
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = ()
    other_param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.merged_adapters: list[str] = []

    @property
    def adapters(self) -> list[str]:
        return list(getattr(self, self.adapter_layer_names[0]).keys())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def adapter_parameters(self, adapter_name: str):
        for layer_name in self.adapter_layer_names:
            modules = getattr(self, layer_name)
            if adapter_name in modules:
                yield from modules[adapter_name].parameters()

    def adapter_state_dict(self, adapter_name: str) -> dict[str, Any]:
        """`{<layer_name>.<param>: tensor}` for one adapter: the adapter name is not in the keys."""
        out = {}
        for layer_name in self.adapter_layer_names:
            modules = getattr(self, layer_name)
            if adapter_name in modules:
                for key, value in modules[adapter_name].state_dict().items():
                    out[f"{layer_name}.{key}"] = value
        return out

    def load_adapter_state_dict(self, adapter_name: str, state: dict[str, Any]) -> None:
        for layer_name in self.adapter_layer_names:
            modules = getattr(self, layer_name)
            if adapter_name in modules:
                sub = {k[len(layer_name) + 1 :]: v for k, v in state.items() if k.startswith(f"{layer_name}.")}
                modules[adapter_name].load_state_dict(sub, strict=True)

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop one adapter (the tuner refuses merged ones before calling this)."""
        for layer_name in self.adapter_layer_names:
            modules = getattr(self, layer_name)
            if adapter_name in modules:
                del modules[adapter_name]
        for name in self.other_param_names:
            getattr(self, name).pop(adapter_name, None)
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    def _unmerge_one(self, adapter_name: str) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, active={self.active_adapter!r}, merged={self.merged_adapters}"


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full for some adapters (e.g. a classifier head): one copy per adapter.

    PEFT's layout: the untouched module is `original_module`, the copies `modules_to_save.<name>`.
    """

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.add(adapter_name)

    @property
    def adapters(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module(), name)  # e.g. `.weight` of a wrapped head


def delete_saved_copies(model: nn.Module, wrappers, adapter_name: str) -> None:
    """Drop `adapter_name`'s modules_to_save copies from `wrappers` ((key, wrapper) pairs in
    `model`); a wrapper left with no copy is swapped back for its original module."""
    for key, wrapper in list(wrappers):
        if adapter_name in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter_name]
        if not wrapper.modules_to_save:
            inject.replace_module(model, key, wrapper.original_module)


class Wrapper(nn.Module):
    """A module whose unknown attributes are those of the module it wraps, held as `INNER` (PEFT's
    chain: PeftModel -> tuner -> the user's model)."""

    INNER: ClassVar[str] = "model"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.INNER:
                raise
            return getattr(getattr(self, self.INNER), name)


class BaseTuner(Wrapper):
    """Holds the user's model as `.model` and injects one method's layers into it (PEFT's `*Model`).

    Subclasses set `prefix` (the parameter-name prefix of the method, e.g. "lora_"), `layer_cls`,
    and implement `_create_layer` (return a new layer for a target, or None when unsupported)
    and `_adapter_shapes` (what one adapter's parameters look like on a target).
    """

    prefix: ClassVar[str] = ""
    layer_cls: ClassVar[type[AdapterLayer]] = AdapterLayer

    def __init__(self, model: nn.Module, peft_config: dict):
        super().__init__()
        self.model = model
        self.peft_config = peft_config  # shared with the PeftModel: {adapter name: config}
        self.active_adapter: str | None = None

    # -- subclass hooks ------------------------------------------------------------------------
    def _create_layer(self, target: nn.Module, adapter_name: str, config: Any, key: str) -> AdapterLayer | None:
        raise NotImplementedError

    def _update_layer(self, layer: AdapterLayer, adapter_name: str, config: Any, key: str) -> None:
        raise NotImplementedError

    def _adapter_shapes(self, target: nn.Module, config: Any, key: str) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    SUPPORTED: ClassVar[str] = "nn.Linear and transformers' Conv1D"

    def supports(self, target: nn.Module) -> bool:
        """Whether this method can adapt a module of `target`'s type (default: linear layers)."""
        return inject.is_linear(target)

    # -- injection -----------------------------------------------------------------------------
    def _walk(self):
        return inject.walk(self.model, (self.layer_cls, ModulesToSaveWrapper))

    def adapter_layers(self):
        for name, module in self._walk():
            if isinstance(module, self.layer_cls):
                yield name, module

    def wrappers(self):
        for name, module in self._walk():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def targets(self, config: Any) -> list[tuple[str, nn.Module]]:
        """(name, module) pairs `config` puts an adapter on; raises before anything is changed."""
        keys = inject.find_targets(self.model, config, skip=(self.layer_cls, ModulesToSaveWrapper))
        out = []
        for key in keys:
            module = self.model.get_submodule(key)
            base = module.base_layer if isinstance(module, self.layer_cls) else module
            if not self.supports(base):
                raise ValueError(
                    f"Target module {key} of type {type(base).__name__} is not supported: fastpeft's "
                    f"{type(self).__name__} adapts {self.SUPPORTED}"
                )
            out.append((key, module))
        return out

    def save_targets(self, config: Any) -> list[str]:
        """Names of the modules that `config.modules_to_save` copies (PEFT's suffix rule)."""
        names = getattr(config, "modules_to_save", None) or []
        return [key for key, _ in self._walk() if any(key.endswith(n) for n in names)]

    def expected_state_shapes(self, adapter_name: str, config: Any) -> dict[str, tuple[int, ...]]:
        """Checkpoint keys (PEFT format, adapter name stripped) and shapes that `config` produces."""
        out = {}
        for key, module in self.targets(config):
            base = module.base_layer if isinstance(module, self.layer_cls) else module
            for name, shape in self._adapter_shapes(base, config, key).items():
                out[f"{key}.{name}"] = shape
        for key in self.save_targets(config):
            module = self.model.get_submodule(key)
            source = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
            for name, tensor in source.state_dict().items():
                out[f"{key}.{name}"] = tuple(tensor.shape)
        for key, shape in self._bias_keys(config, [k for k, _ in self.targets(config)]).items():
            out[key] = shape
        return out

    def _bias_keys(self, config: Any, target_keys: list[str]) -> dict[str, tuple[int, ...]]:
        """Model keys of the biases `config.bias` trains and saves ("all" or "<method>_only"), as
        they read once the targets are wrapped (`<target>.base_layer.bias`, PEFT's keys).
        Biases inside modules_to_save wrappers are saved with their copies, not here."""
        bias = getattr(config, "bias", "none")
        if bias == "none":
            return {}
        targets = set(target_keys)
        wrapped = [key for key, _ in self.wrappers()]
        out = {}
        for path, module in self.model.named_modules():
            param = module._parameters.get("bias")
            if param is None or any(path.startswith(f"{w}.") for w in wrapped):
                continue
            owner = path.removesuffix(".base_layer")
            if owner in targets:
                out[f"{owner}.base_layer.bias"] = tuple(param.shape)
            elif bias == "all":
                out[f"{path}.bias" if path else "bias"] = tuple(param.shape)
        return out

    def inject_adapter(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        targets = self.targets(config)  # validates everything before the first swap
        for key, module in targets:
            if isinstance(module, self.layer_cls):
                self._update_layer(module, adapter_name, config, key)
            else:
                layer = self._create_layer(module, adapter_name, config, key)
                inject.replace_module(self.model, key, layer)
        for key in self.save_targets(config):
            module = self.model.get_submodule(key)
            if isinstance(module, ModulesToSaveWrapper):
                module.add(adapter_name)
            else:
                inject.replace_module(self.model, key, ModulesToSaveWrapper(module, adapter_name))
        if self.settles_new(adapter_name):
            self._settle_new(adapter_name, [k for k, _ in targets], self.save_targets(config))
        else:
            self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config else adapter_name)

    def settles_new(self, adapter_name: str) -> bool:
        """Whether adding `adapter_name` leaves every other adapter as it is (`_settle_new`): an
        active adapter is kept and it trains no bias, so set_adapter need not run again."""
        active = self.active_adapter
        return (active is not None and active != adapter_name and active in self.peft_config
                and getattr(self.peft_config[active], "bias", "none") == "none")

    def _settle_new(self, adapter_name: str, keys: list[str], saved: list[str]) -> None:
        """`set_adapter(active)` for an added, inactive adapter, touching only what it changed
        (its layers and wrappers, its own parameters frozen): the cost of an add does not grow with
        the number of adapters registered (issue 24). Everything else is as the last set_adapter
        left it."""
        active = self.active_adapter
        for module in (self.model.get_submodule(k) for k in keys):
            module.active_adapter = active if active in module.adapters else None
            for param in module.adapter_parameters(adapter_name):
                param.requires_grad_(False)
        for key in saved:
            wrapper = self.model.get_submodule(key)
            wrapper.active_adapter = active if active in wrapper.adapters else None
            wrapper.modules_to_save[adapter_name].requires_grad_(False)

    # -- adapter state -------------------------------------------------------------------------
    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; adapters: {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        for _, module in [*self.adapter_layers(), *self.wrappers()]:
            module.active_adapter = adapter_name if adapter_name in module.adapters else None
        self._mark_trainable()

    def _mark_trainable(self) -> None:
        """Only the active adapter trains (unless loaded for inference), plus the biases it asks for."""
        for param in self.model.parameters():
            param.requires_grad_(False)
        config = self.peft_config[self.active_adapter]
        if config.inference_mode:
            return
        for _, layer in self.adapter_layers():
            for param in layer.adapter_parameters(self.active_adapter):
                param.requires_grad_(True)
        for _, wrapper in self.wrappers():
            if self.active_adapter in wrapper.modules_to_save:
                wrapper.modules_to_save[self.active_adapter].requires_grad_(True)
        bias_keys = set(self._bias_keys(config, [k for k, _ in self.adapter_layers()]))
        for name, param in self.model.named_parameters():
            if name in bias_keys:
                param.requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; adapters: {sorted(self.peft_config)}")
        layers = [m for _, m in self.adapter_layers()]
        if any(adapter_name in m.merged_adapters for m in layers):
            raise ValueError(f"adapter {adapter_name!r} is merged into the weights: unmerge it before deleting it")
        for layer in layers:
            layer.delete_adapter(adapter_name)
        delete_saved_copies(self.model, self.wrappers(), adapter_name)
        for key, layer in list(self.adapter_layers()):
            if not layer.adapters:
                inject.replace_module(self.model, key, layer.base_layer)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
        if self.active_adapter is not None:
            self.set_adapter(self.active_adapter)

    def enable_adapter_layers(self, enabled: bool) -> None:
        for _, module in [*self.adapter_layers(), *self.wrappers()]:
            module.disable_adapters = not enabled

    # -- merging -------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights; `safe_merge` refuses a result with NaN/inf (PEFT's)."""
        names = adapter_names or [self.active_adapter]
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name!r} not found; adapters: {sorted(self.peft_config)}")
        for _, layer in self.adapter_layers():
            for name in names:
                if name in layer.adapters and name not in layer.merged_adapters:
                    layer.merge(name, safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def unload(self, merge: bool, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
        """Swap every adapter layer back to its base layer (merged first if `merge`): PEFT's unload."""
        if merge:
            self.merge_adapter(adapter_names, safe_merge)
        for key, layer in list(self.adapter_layers()):
            inject.replace_module(self.model, key, layer.base_layer)
        for key, wrapper in list(self.wrappers()):
            inject.replace_module(self.model, key, wrapper.active_module())
        return self.model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
