"""transformers' `Trainer` with a fastpeft model: `PeftSaveCallback` saves the adapter in PEFT's
format wherever Trainer saves the model.

Trainer trains a fastpeft model unchanged, `remove_unused_columns` at its default included (the
model's forward shows the wrapped model's parameters). It saves through `save_pretrained` only
instances of `transformers.PreTrainedModel` or of PEFT's own `peft.PeftModel`; anything else,
a fastpeft model too, gets a bare `model.safetensors` of its whole state dict (which
`resume_from_checkpoint` reads back). Add the callback to write `adapter_config.json` +
`adapter_model.safetensors` beside it, which PEFT and fastpeft load:

    from fastpeft.integrations.transformers import PeftSaveCallback
    trainer = Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[PeftSaveCallback()])
    trainer.train()          # every checkpoint-N/ holds the adapter, and so does args.output_dir
    trainer.save_model()     # at the end of training; its model.safetensors joins the adapter there

`trainer.save_model(other_dir)` still writes only the state dict: call
`peft_model.save_pretrained(other_dir)` for the adapter there. docs/ecosystem.md weighs the options.
"""

from __future__ import annotations

import logging
import os

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from fastpeft.model import PeftModel

__all__ = ["PeftSaveCallback"]

logger = logging.getLogger(__name__)


def _fastpeft_model(model: nn.Module | None) -> PeftModel:
    """The fastpeft model inside Trainer's (unwrapped from DDP's `.module` and compile's `_orig_mod`)."""
    seen = model
    while not isinstance(seen, PeftModel) and isinstance(seen, nn.Module):
        inner = getattr(seen, "module", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(seen, "_orig_mod", None)
        if inner is None:
            break
        seen = inner
    if not isinstance(seen, PeftModel):
        raise TypeError(f"PeftSaveCallback: the Trainer's model must be a fastpeft PeftModel "
                        f"(fastpeft.get_peft_model), got {type(model).__name__}")
    return seen


class PeftSaveCallback(TrainerCallback):
    """Write the adapters (PEFT's `save_pretrained` layout) into every checkpoint Trainer saves,
    and into `args.output_dir` when training ends. Only the process that saves (`args.should_save`)
    writes. `selected_adapters` as in `PeftModel.save_pretrained` (default: all)."""

    def __init__(self, selected_adapters: list[str] | None = None):
        self.selected_adapters = selected_adapters

    def on_init_end(self, args, state, control, model=None, **kwargs):
        _fastpeft_model(model)  # fail at Trainer(...), not at the first save

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):  # a hyperparameter search writes under a run folder of its own
            logger.warning("PeftSaveCallback: no checkpoint folder %s; the adapter is not saved there", folder)
            return
        self._save(args, model, folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(args, model, args.output_dir)

    def _save(self, args, model, folder: str) -> None:
        if args.should_save:
            _fastpeft_model(model).save_pretrained(folder, selected_adapters=self.selected_adapters)
