"""BitFit (no PEFT oracle: PEFT lacks the method): which biases it selects, identity at init,
training touches only biases, bit-exact save/load in our documented layout, exact merge."""

import json

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.bitfit import role


def bias_keys(model):
    """Plain-model keys of every bias parameter (the oracle for biases='all')."""
    return {n for n, p in model.named_parameters() if n.endswith(".bias")}


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_all_selects_every_bias_and_only_biases_train(arch, make_model, make_inputs, run_model):
    base = make_model(arch)
    expected = bias_keys(base)
    model = fastpeft.get_peft_model(make_model(arch), fastpeft.BitFitConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{k[:-len('.bias')]}.bitfit_bias.default" for k in expected}
    assert model.get_nb_trainable_parameters()[0] == sum(p.numel() for n, p in base.named_parameters() if n in expected)
    inputs = make_inputs(arch)
    with torch.no_grad():  # the trained copies start as the base biases: output unchanged
        torch.testing.assert_close(run_model(model.eval(), inputs), run_model(base, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("arch,which", [("gpt2", "attention"), ("bert", "mlp"), ("bert", "attention")])
def test_role_selection(arch, make_model, which):
    model = fastpeft.get_peft_model(make_model(arch), fastpeft.BitFitConfig(biases=which))
    keys = [k for k, _ in model.base_model.adapter_layers()]
    assert keys and all(role(k) == which for k in keys)
    assert not any("LayerNorm" in k and "output" not in k for k in keys)  # embeddings' norm has no role


def test_no_bias_without_add_bias_is_a_clear_error(make_model):
    base = make_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="no bias matches.*add_bias=True"):
        fastpeft.get_peft_model(base, fastpeft.BitFitConfig(biases="mlp"))
    assert base.state_dict().keys() == before.keys()  # nothing was wrapped
    with pytest.raises(ValueError, match="biases must be"):
        fastpeft.BitFitConfig(biases="ffn")


def test_add_bias_on_llama_identity_training_merge(make_model, make_inputs, run_model, adam_steps):
    arch = "llama"
    model = fastpeft.get_peft_model(make_model(arch), fastpeft.BitFitConfig(add_bias=True, biases="attention"))
    layers = dict(model.base_model.adapter_layers())
    assert set(layers) == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    assert "lm_head" not in layers
    inputs = make_inputs(arch)
    with torch.no_grad():
        torch.testing.assert_close(run_model(model.eval(), inputs), run_model(make_model(arch), inputs), rtol=0, atol=0)

    model.train()
    changed = adam_steps(model, inputs, lr=0.05)  # (asserts the loss goes down)
    assert changed and all(".bitfit_bias.default" in n for n in changed)

    model.eval()
    with torch.no_grad():
        trained = run_model(model, inputs)
        with model.disable_adapter():
            torch.testing.assert_close(run_model(model, inputs), run_model(make_model(arch), inputs), rtol=0, atol=0)
        model.merge_adapter()
        torch.testing.assert_close(run_model(model, inputs), trained, rtol=0, atol=0)
        model.unmerge_adapter()
        assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias is None
        torch.testing.assert_close(run_model(model, inputs), trained, rtol=0, atol=0)
        merged = model.merge_and_unload()
        assert type(merged) is type(make_model(arch)) and merged.model.layers[0].self_attn.q_proj.bias is not None
        torch.testing.assert_close(run_model(merged, inputs), trained, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_save_load_bit_exact_in_documented_layout(arch, make_model, make_inputs, run_model, tmp_path):
    model = fastpeft.get_peft_model(make_model(arch), fastpeft.BitFitConfig(exclude_modules=["pooler.dense"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT" and config["biases"] == "all"
    saved = load_file(tmp_path / "adapter_model.safetensors")
    plain = {f"base_model.model.{k}" for k in bias_keys(make_model(arch)) if not k.startswith("pooler.")}
    assert set(saved) == plain  # the keys the biases have in the plain model

    loaded = fastpeft.PeftModel.from_pretrained(make_model(arch), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    inputs = make_inputs(arch)
    with torch.no_grad():
        torch.testing.assert_close(run_model(loaded, inputs), run_model(model.eval(), inputs), rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again/adapter_model.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)

    bad = dict(saved)
    bad.pop(next(iter(bad)))
    from safetensors.torch import save_file

    save_file(bad, tmp_path / "adapter_model.safetensors")
    untouched = make_model(arch)
    with pytest.raises(ValueError, match="missing keys"):
        fastpeft.PeftModel.from_pretrained(untouched, tmp_path)
    assert all(type(m).__name__ != "BitFitLayer" for m in untouched.modules())
