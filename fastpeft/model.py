"""PeftModel: PEFT's wrapper, with its names and semantics.

`PeftModel.base_model` is the method's tuner and `base_model.model` the user's model, so every
parameter name (and so every checkpoint key) is the one PEFT gives it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
from typing import Any

from torch import nn

from fastpeft import checkpoint, multi, registry
from fastpeft.config import PeftConfig
from fastpeft.methods.base import BaseTuner
from fastpeft.quant.nf4 import Linear4bit

SEQ_CLS_HEADS = ["classifier", "score"]
# Keyword arguments of PEFT's methods that change nothing here (device placement, memory tricks,
# serialization switches): accepted so PEFT code runs unchanged. Any other keyword is an error.
PEFT_NOOP_KWARGS = frozenset(
    {"autocast_adapter_dtype", "low_cpu_mem_usage", "torch_device", "safe_serialization", "is_main_process",
     "save_embedding_layers", "ephemeral_gpu_offload", "mixed", "revision"}
)


def _accept_noop(where: str, kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - PEFT_NOOP_KWARGS)
    if unknown:
        raise TypeError(f"{where}: unsupported keyword arguments {unknown}")


def _tuner_class(config: PeftConfig) -> type[BaseTuner]:
    return registry.tuner(config)


class PeftModel(nn.Module):
    """A model with named adapters injected; forward and generate go straight to the model."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default"):
        super().__init__()
        self.peft_config: dict[str, PeftConfig] = {}
        self.base_model = _tuner_class(peft_config)(model, self.peft_config)
        self.add_adapter(adapter_name, peft_config)
        self.forward = _signed_forward(self)

    # -- adapters ------------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Inject a new adapter; the first one becomes active, later ones do not (PEFT's rule)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or choose another name")
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter names are non-empty strings without '.', got {adapter_name!r}")
        if self.peft_config and _tuner_class(peft_config) is not type(self.base_model):
            raise ValueError(
                f"cannot add a {peft_config.peft_type} adapter to a model holding "
                f"{next(iter(self.peft_config.values())).peft_type} adapters"
            )
        if peft_config.task_type == "SEQ_CLS" and hasattr(peft_config, "modules_to_save"):
            heads = [n for n in SEQ_CLS_HEADS if hasattr(self.base_model.model, n)]
            peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | set(heads)) or None
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(self.base_model.model, "name_or_path", None) or None
        self.peft_config[adapter_name] = peft_config
        try:
            self.base_model.inject_adapter(adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise

    def set_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        self.base_model.delete_adapter(adapter_name)

    def _check_known(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str):
            raise TypeError(f"one adapter name (a str) is active at a time, got {adapter_name!r}")
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; adapters: {sorted(self.peft_config)}")

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (merged adapters are unmerged first)."""
        self.base_model.enable_adapter_layers(False)
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers(True)

    # -- merging -------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Fold the active adapter (or `adapter_names`) into the weights and return the plain model."""
        return self.base_model.unload(merge=True, adapter_names=adapter_names, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Return the plain model, adapters dropped (not merged)."""
        return self.base_model.unload(merge=False)

    # -- running -------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        """`adapter_names` (LoRA, eval mode): row i runs adapter `adapter_names[i]` ("__base__":
        none), all adapters in one launch per layer (fastpeft/multi.py); without autograd."""
        if adapter_names is not None:
            with multi.mixed_batch(self, adapter_names):
                return self.base_model(*args, **kwargs)
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        """transformers' generate; `adapter_names` as in forward, repeated num_beams times (PEFT)."""
        if adapter_names is not None:
            with multi.mixed_batch(self, adapter_names, num_beams=kwargs.get("num_beams")):
                return self.base_model.model.generate(*args, **kwargs)
        return self.base_model.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- parameters ----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters. A 4-bit base weight is a uint8 buffer here, not a
        parameter; it counts as its two weights per byte, as PEFT counts bnb's Params4bit."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        packed = sum(m.weight.numel() * 2 for m in self.modules() if isinstance(m, Linear4bit))
        return trainable, sum(p.numel() for p in self.parameters()) + packed

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None, **kwargs: Any
    ) -> None:
        """PEFT's layout: "default" in `save_directory`, any other adapter in a subfolder of its name."""
        _accept_noop("save_pretrained", kwargs)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file, not a directory")
        names = list(self.peft_config) if selected_adapters is None else selected_adapters
        for name in names:
            self._check_known(name)
        for name in names:
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            checkpoint.save_adapter(out, self._adapter_state_dict(name))
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            config.save_pretrained(out, **self._auto_mapping(config))

    def _adapter_state_dict(self, adapter_name: str) -> dict[str, Any]:
        """One adapter's tensors under PEFT's checkpoint keys (the prompt-learning model overrides it)."""
        return checkpoint.adapter_state_dict(self.base_model, adapter_name)

    def _auto_mapping(self, config: PeftConfig) -> dict[str, Any]:
        """PEFT records the base model's class when no task_type names it."""
        if config.task_type is not None:
            return {}
        cls = type(self.get_base_model())
        return {"auto_mapping": {"base_model_class": cls.__name__, "parent_library": cls.__module__}}

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load a PEFT-format directory onto `model`; on any mismatch raise with `model` untouched."""
        _accept_noop("from_pretrained", kwargs)
        directory = os.path.join(model_id, subfolder or "")
        config = copy.deepcopy(config) if config is not None else PeftConfig.from_pretrained(directory)
        load = registry.family(config).load  # prompt learning: PEFT's other layout (fastpeft/prompting.py)
        if load is not None:
            return load(model, directory, config, adapter_name, is_trainable)
        config.inference_mode = not is_trainable
        state = checkpoint.read_adapter(directory)
        planner = _tuner_class(config)(model, {})
        checkpoint.check_fits(state, planner.expected_state_shapes(adapter_name, config), repr(os.fspath(directory)))
        peft_model = cls(model, config, adapter_name)
        checkpoint.load_into(peft_model.base_model, adapter_name, state)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **kwargs: Any
    ) -> None:
        """Add the adapter stored in `model_id` as `adapter_name` (not activated, as in PEFT)."""
        _accept_noop("load_adapter", kwargs)
        config = PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or choose another name")
        state = checkpoint.read_adapter(model_id)
        expected = self.base_model.expected_state_shapes(adapter_name, config)
        checkpoint.check_fits(state, expected, repr(os.fspath(model_id)))
        self.add_adapter(adapter_name, config)
        checkpoint.load_into(self.base_model, adapter_name, state)


def _signed_forward(peft_model: PeftModel) -> functools.partial:
    """`peft_model.forward`, showing the wrapped model's parameters (plus `adapter_names`) to
    `inspect.signature`: transformers' Trainer keeps only the batch columns that the forward
    names (`remove_unused_columns`), and reads the base model's signature itself only for PEFT's
    own classes. See docs/ecosystem.md."""
    bound = functools.partial(type(peft_model).forward, peft_model)
    try:
        params = list(inspect.signature(peft_model.base_model.model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward inspect cannot read: keep our own signature
        return bound
    if "adapter_names" not in {p.name for p in params}:
        at = len(params) - (bool(params) and params[-1].kind is inspect.Parameter.VAR_KEYWORD)
        params.insert(at, inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None))
    bound.__signature__ = inspect.Signature(params)
    return bound


class PeftModelForCausalLM(PeftModel):
    """PEFT's name for task_type CAUSAL_LM; same behaviour."""


class PeftModelForSequenceClassification(PeftModel):
    """PEFT's name for task_type SEQ_CLS; the classifier head is trained and saved in full."""


class PeftModelForTokenClassification(PeftModel):
    """PEFT's name for task_type TOKEN_CLS; same behaviour."""


class PeftModelForFeatureExtraction(PeftModel):
    """PEFT's name for task_type FEATURE_EXTRACTION; same behaviour."""


TASK_MODELS = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """Wrap `model` with a new adapter made from `peft_config` (PEFT's entry point)."""
    _accept_noop("get_peft_model", kwargs)
    # the family's builder: `_build` below, or fastpeft/prompting.py's for prompt learning
    return registry.family(peft_config).build(model, peft_config, adapter_name)


def _build(model: nn.Module, peft_config: PeftConfig, adapter_name: str) -> PeftModel:
    return TASK_MODELS.get(peft_config.task_type, PeftModel)(model, peft_config, adapter_name)


registry.register_family("layers", build=_build)
