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
import tempfile
from typing import Any

from huggingface_hub import HfApi
from torch import nn

from fastpeft import checkpoint, multi, registry, validation
from fastpeft.config import PeftConfig
from fastpeft.errors import ConfigError, InputTypeError
from fastpeft.methods.base import AdapterLayer, BaseTuner, Wrapper
from fastpeft.quant.nf4 import Linear4bit
from fastpeft.transaction import transaction
from fastpeft.utils.model_card import write_model_card
from fastpeft.utils.save_and_load import IncompatibleKeys

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
        raise InputTypeError(f"{where}: unsupported keyword arguments {unknown}")


def _tuner_class(config: PeftConfig) -> type[BaseTuner]:
    try:
        return registry.tuner(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class PeftModel(Wrapper):
    """A model with named adapters injected; forward and generate go straight to the model."""

    INNER = "base_model"  # unknown attributes are the tuner's (and so the model's)

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
        return [] if self.active_adapter is None else [self.active_adapter]  # PEFT: [] once all are deleted

    @property
    def active_peft_config(self) -> PeftConfig:
        if self.active_adapter is None:
            raise validation.AdapterNotFoundError("the model holds no adapter (all were deleted): add one first")
        return self.peft_config[self.active_adapter]

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Inject a new adapter; the first one becomes active, later ones do not (PEFT's rule).
        The name and the whole config are checked first; if injection still fails, the model (and
        the config) are restored as they were."""
        validation.check_new_adapter_name(adapter_name, self.peft_config)
        validation.check_config(peft_config)
        if _tuner_class(peft_config) is not type(self.base_model):
            held = next(iter(self.peft_config.values()), None)
            raise ConfigError(
                f"peft_config: cannot add a {peft_config.peft_type} adapter to a model holding "
                f"{held.peft_type if held else type(self.base_model).__name__} adapters"
            )
        with transaction(self, dicts=[self.peft_config], objects=[peft_config],
                         adapters_untouched=self.base_model.settles_new(adapter_name)):
            if peft_config.task_type == "SEQ_CLS" and hasattr(peft_config, "modules_to_save"):
                heads = [n for n in SEQ_CLS_HEADS if hasattr(self.base_model.model, n)]
                peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | set(heads)) or None
            if peft_config.base_model_name_or_path is None:
                peft_config.base_model_name_or_path = getattr(self.base_model.model, "name_or_path", None) or None
            self.peft_config[adapter_name] = peft_config
            self.base_model.inject_adapter(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        with transaction(self, dicts=[self.peft_config]):
            self.base_model.delete_adapter(adapter_name)

    def _check_known(self, adapter_name: str) -> None:
        validation.check_known_adapter(adapter_name, self.peft_config)

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
        """Fold adapters into the weights, all layers or none (`safe_merge`: refuse NaN/inf)."""
        self._check_merge(adapter_names, safe_merge)
        with self._merge_transaction():
            self.base_model.merge_adapter(adapter_names, safe_merge)

    def _check_merge(self, adapter_names: Any, safe_merge: Any) -> None:
        validation.check_bool(safe_merge, "safe_merge")
        if adapter_names is not None:
            validation.check_adapter_list(adapter_names, self.peft_config)

    def _merge_transaction(self):
        """A merge writes base weights in place layer by layer: keep them to undo a failed one."""
        values = [t for m in self.modules() if isinstance(m, AdapterLayer)
                  for t in [*m.base_layer.parameters(), *m.base_layer.buffers()]]
        return transaction(self, dicts=[self.peft_config], values=values)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Fold the active adapter (or `adapter_names`) into the weights and return the plain model."""
        self._check_merge(adapter_names, safe_merge)
        with self._merge_transaction():
            return self.base_model.unload(merge=True, adapter_names=adapter_names, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Return the plain model, adapters dropped (not merged)."""
        return self.base_model.unload(merge=False)

    # -- running -------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        """`adapter_names` (LoRA, eval mode): row i runs adapter `adapter_names[i]` ("__base__":
        none), all adapters in one launch per layer (fastpeft/multi.py); without autograd."""
        if adapter_names is not None:
            validation.check_mixed_names(adapter_names, self.peft_config, self.training, _batch_size(args, kwargs))
            with multi.mixed_batch(self, adapter_names):
                return self.base_model(*args, **kwargs)
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        """transformers' generate; `adapter_names` as in forward, repeated num_beams times (PEFT)."""
        if adapter_names is not None:
            validation.check_mixed_names(adapter_names, self.peft_config, self.training, _batch_size(args, kwargs))
            with multi.mixed_batch(self, adapter_names, num_beams=kwargs.get("num_beams")):
                return self.base_model.model.generate(*args, **kwargs)
        return self.base_model.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # -- parameters ----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters. A 4-bit base weight's frozen uint8 storage counts as its
        packed bytes times two, as PEFT counts bnb's Params4bit; its absmax bytes do not count."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        nf4 = [m for m in self.modules() if isinstance(m, Linear4bit)]
        storage = {id(p) for m in nf4 for p in (m.weight, m.weight_absmax, m.weight_nested_absmax) if p is not None}
        dense = sum(p.numel() for p in self.parameters() if id(p) not in storage)
        return trainable, dense + sum(m.nbytes_packed * 2 for m in nf4)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None, **kwargs: Any
    ) -> None:
        """PEFT's layout: "default" in `save_directory`, any other adapter in a subfolder of its name."""
        _accept_noop("save_pretrained", kwargs)
        save_directory = validation.check_directory(save_directory, "save_directory")
        names = list(self.peft_config) if selected_adapters is None else selected_adapters
        names = validation.check_adapter_list(names, self.peft_config, "selected_adapters")
        items = []  # everything is built (and the configs serialized) before the first write
        for name in names:
            validation.check_adapter_name(name, "selected_adapters")
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            text = config.to_json_string(argument=f"peft_config[{name!r}]", **self._auto_mapping(config))
            items.append((out, checkpoint.to_cpu(self._adapter_state_dict(name)), text))
        checkpoint.save_checkpoints(items)
        for (out, _, _), name in zip(items, names):  # PEFT's model card, beside each adapter
            write_model_card(out, self.peft_config[name].base_model_name_or_path, self.peft_config[name].PEFT_TYPE)

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload model", private: bool | None = None,
                    token: str | None = None, **kwargs: Any):
        """Save the adapters to a temporary folder and upload it to the hub repo `repo_id` (created
        if missing), as PEFT's push_to_hub does through transformers."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)

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
        if not isinstance(model, nn.Module):
            raise InputTypeError(f"model={type(model).__name__}: expected a torch.nn.Module")
        validation.check_adapter_name(adapter_name)
        validation.check_bool(is_trainable, "is_trainable")
        if subfolder is not None and not isinstance(subfolder, str):
            raise InputTypeError(f"subfolder={subfolder!r}: expected a str or None")
        directory = os.path.join(validation.check_directory(model_id, "model_id"), subfolder or "")
        if config is not None:
            config = copy.deepcopy(validation.check_config(config, "config"))
        else:
            config = PeftConfig.from_pretrained(directory)
        validation.check_config(config, f"config of {os.fspath(directory)!r}")
        load = registry.family(config).load  # prompt learning: PEFT's other layout (fastpeft/prompting.py)
        if load is not None:
            with transaction(model):
                return load(model, directory, config, adapter_name, is_trainable)
        config.inference_mode = not is_trainable
        state = checkpoint.read_adapter(directory)
        source = repr(os.fspath(directory))
        validation.check_adapter_tensors(state, source)
        planner = _tuner_class(config)(model, {})
        validation.check_fits(state, planner.expected_state_shapes(adapter_name, config), source, checkpoint.PREFIX)
        with transaction(model, objects=[config]):
            peft_model = cls(model, config, adapter_name)
            checkpoint.load_into(peft_model.base_model, adapter_name, state)
            if not is_trainable:
                peft_model.eval()
        return peft_model

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **kwargs: Any
    ) -> IncompatibleKeys:
        """Add the adapter stored in `model_id` as `adapter_name` (not activated, as in PEFT)."""
        _accept_noop("load_adapter", kwargs)
        validation.check_new_adapter_name(adapter_name, self.peft_config)
        validation.check_bool(is_trainable, "is_trainable")
        model_id = validation.check_directory(model_id, "model_id")
        config = validation.check_config(PeftConfig.from_pretrained(model_id), f"config of {model_id!r}")
        validation.check_peft_type(config, self.peft_config.values(), f"load_adapter({model_id!r})")
        config.inference_mode = not is_trainable
        state = checkpoint.read_adapter(model_id)
        validation.check_adapter_tensors(state, repr(model_id))
        expected = self.base_model.expected_state_shapes(adapter_name, copy.deepcopy(config))
        validation.check_fits(state, expected, repr(model_id), checkpoint.PREFIX)
        with transaction(self, dicts=[self.peft_config]):
            self.add_adapter(adapter_name, config)
            checkpoint.load_into(self.base_model, adapter_name, state)
        # PEFT returns the adapter's missing/unexpected keys; check_fits refused any before loading
        return IncompatibleKeys(missing_keys=[], unexpected_keys=[])

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict, checked first (keys when `strict`, shapes and dtype kinds
        always) so a state dict that does not fit changes nothing; all or nothing."""
        validation.check_state_dict(state_dict)
        validation.check_bool(strict, "strict")
        own = self.state_dict()
        expected = {k: tuple(v.shape) for k, v in own.items()}
        if strict:
            validation.check_fits(state_dict, expected, "state_dict", "", {k: v.dtype for k, v in own.items()})
        else:
            known = {k: v for k, v in state_dict.items() if k in own}
            validation.check_fits(known, {k: expected[k] for k in known}, "state_dict", "",
                                  {k: own[k].dtype for k in known})
        with transaction(self, values=[own[k] for k in state_dict if k in own]):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _batch_size(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The rows of a forward's main input (input_ids or inputs_embeds), if it is a tensor."""
    x = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    return x.shape[0] if hasattr(x, "shape") and len(x.shape) >= 1 else None


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
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model={type(model).__name__}: expected a torch.nn.Module")
    validation.check_config(peft_config)
    validation.check_adapter_name(adapter_name)
    # the family's builder: `_build` below, or fastpeft/prompting.py's for prompt learning
    return registry.family(peft_config).build(model, peft_config, adapter_name)


def _build(model: nn.Module, peft_config: PeftConfig, adapter_name: str) -> PeftModel:
    return TASK_MODELS.get(peft_config.task_type, PeftModel)(model, peft_config, adapter_name)


registry.register_family("layers", build=_build)
