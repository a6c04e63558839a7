"""Issue 18 item 7: deleting the only adapter follows PEFT (no KeyError(None)): the model holds
no adapter, active_adapters is [], and asking for the active config says so clearly."""
import pytest
import torch

import fastpeft as peft
from fastpeft.errors import FastPeftError


def test_delete_only_adapter(make_model):
    model = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    base_out = make_model("llama")(torch.arange(5)[None]).logits
    model.delete_adapter("default")
    assert model.peft_config == {} and model.active_adapters == []
    with pytest.raises(FastPeftError, match="no adapter"):
        model.active_peft_config
    assert torch.equal(model(torch.arange(5)[None]).logits, base_out)
    model.add_adapter("again", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.active_adapter == "again"
