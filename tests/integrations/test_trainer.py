"""transformers' Trainer with default arguments trains a fastpeft LoRA model (MiniLM sequence
classification), and what it saves, `save_model` and every checkpoint, loads in real PEFT with
equal logits (PeftSaveCallback)."""
import copy
import json
import os

import pytest
import torch

import fastpeft
from fastpeft.integrations.transformers import PeftSaveCallback

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

def _dataset(path):
    """Rows as a tokenizer gives them, plus a raw text column the model does not take."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["a good movie", "a bad film", "great plot", "awful acting", "loved it", "hated it", "fine", "dull"]
    enc = tok(texts, padding="max_length", max_length=8, truncation=True)
    return [{**{k: enc[k][i] for k in enc}, "labels": i % 2, "text": texts[i]} for i in range(len(texts))]


def _logits(model, rows):
    batch = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_trainer_with_default_arguments_saves_a_peft_adapter(task_type, tmp_path, minilm_seq_cls):
    """MiniLM sequence classification with 2 labels."""
    base, path = minilm_seq_cls(2)
    config = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                 modules_to_save=["classifier"], task_type=task_type)
    model = fastpeft.get_peft_model(base, config)
    rows = _dataset(path)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, save_steps=2, learning_rate=1e-2,
                                          per_device_train_batch_size=4, report_to="none", use_cpu=True)
    assert args.remove_unused_columns  # the default: Trainer keeps the columns the forward names
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[PeftSaveCallback()])
    trainer.train()
    trainer.save_model()
    lora_b = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    assert lora_b.abs().max() > 0  # it trained

    for folder, ours in [(tmp_path / "checkpoint-2", None), (tmp_path / "checkpoint-4", None), (tmp_path, model)]:
        assert (folder / "adapter_model.safetensors").is_file(), sorted(os.listdir(folder))
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
        if ours is None:  # the state at that step: the full state dict Trainer wrote beside the adapter
            from safetensors.torch import load_file

            ours = fastpeft.get_peft_model(minilm_seq_cls(2)[0], copy.deepcopy(config))
            ours.load_state_dict(load_file(folder / "model.safetensors"))
        theirs = peft.PeftModel.from_pretrained(minilm_seq_cls(2)[0], str(folder))
        torch.testing.assert_close(_logits(theirs, rows), _logits(ours, rows), atol=1e-5, rtol=1e-5)
    step2 = peft.PeftModel.from_pretrained(minilm_seq_cls(2)[0], str(tmp_path / "checkpoint-2"))
    assert not torch.allclose(_logits(step2, rows), _logits(model, rows))  # each checkpoint is its step's


def test_forward_signature_names_the_wrapped_model_parameters(minilm_seq_cls):
    import inspect

    model = fastpeft.get_peft_model(minilm_seq_cls(2)[0], fastpeft.LoraConfig(target_modules=["query"]))
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "token_type_ids", "labels", "adapter_names"} <= set(params)


def test_callback_refuses_a_model_that_is_not_fastpeft(tmp_path, minilm_seq_cls):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="fastpeft PeftModel"):
        transformers.Trainer(model=minilm_seq_cls(2)[0], args=args, callbacks=[PeftSaveCallback()])
