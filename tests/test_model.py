"""PeftModel's contract beyond parity: bad input, untouched models on failure, the kernel path."""

import json
import os

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.methods.lora import LoraLinear


def lora(**kwargs):
    return fastpeft.LoraConfig(**{"r": 4, "init_lora_weights": False, "target_modules": ["q_proj", "v_proj"], **kwargs})


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def test_unknown_target_modules_name_the_candidates(make_model):
    model = make_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"not found in the base model.*q_proj"):
        fastpeft.get_peft_model(model, lora(target_modules=["qkv"]))
    assert [type(m) for m in model.modules()] == before[1]


def test_unsupported_target_type_is_refused_before_any_swap(make_model):
    model = make_model("llama")
    with pytest.raises(ValueError, match="input_layernorm of type LlamaRMSNorm is not supported"):
        fastpeft.get_peft_model(model, lora(target_modules=["q_proj", "input_layernorm"]))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(r=0), "positive integer"),
        (dict(rank_pattern={"q_proj": -1}), "positive integers"),
        (dict(bias="some"), "bias must be"),
        (dict(init_lora_weights="pissa"), "init_lora_weights"),
        (dict(lora_dropout=1.5), "lora_dropout"),
        (dict(layers_pattern="layers"), "layers_to_transform"),
    ],
)
def test_bad_config_values_raise(kwargs, error):
    with pytest.raises(ValueError, match=error):
        lora(**kwargs)


def test_checkpoint_that_does_not_fit_leaves_the_model_unchanged(make_model, tmp_path):
    fastpeft.get_peft_model(make_model("llama"), lora(r=4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 8  # the tensors on disk say 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = make_model("llama")
    state, types = snapshot(model)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(ValueError, match=rf"{key}: checkpoint \(4, 32\) vs model \(8, 32\)"):
        fastpeft.PeftModel.from_pretrained(model, tmp_path)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_load_adapter_with_missing_keys_changes_nothing(make_model, tmp_path):
    fastpeft.get_peft_model(make_model("llama"), lora(target_modules=["k_proj"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["k_proj", "o_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = fastpeft.get_peft_model(make_model("llama"), lora())
    state, types = snapshot(model)
    with pytest.raises(ValueError, match=r"missing keys .*o_proj\.lora_A\.weight"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert list(model.peft_config) == ["default"]
    assert [type(m) for m in model.modules()] == types
    assert model.state_dict().keys() == state.keys()


def test_unsupported_peft_fields_in_a_checkpoint_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "lora_bias": True})
    )
    with pytest.raises(NotImplementedError, match="lora_bias=True"):
        fastpeft.PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "r": 4}))
    with pytest.raises(ValueError, match="unknown peft_type 'VERA'"):
        fastpeft.PeftConfig.from_pretrained(tmp_path)


def test_adapter_name_errors(make_model):
    model = fastpeft.get_peft_model(make_model("llama"), lora())
    with pytest.raises(ValueError, match="Adapter 'nope' not found; adapters: \\['default'\\]"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="not found"):
        model.delete_adapter("nope")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", lora())
    with pytest.raises(TypeError, match="unsupported keyword arguments \\['adapter_name_typo'\\]"):
        model.save_pretrained("/tmp/unused", adapter_name_typo=1)
    with pytest.raises(ValueError, match="non-existing adapter\\(s\\): nope"):  # mixed batches: tests/test_multi.py
        model.eval()(torch.zeros(1, 3, dtype=torch.long), adapter_names=["nope"])


def test_merged_adapter_cannot_be_deleted_and_safe_merge_refuses_nan(make_model):
    model = fastpeft.get_peft_model(make_model("llama"), lora())
    model.add_adapter("b", lora(target_modules=["q_proj"]))
    model.merge_adapter(["b"])
    with pytest.raises(ValueError, match="unmerge it"):
        model.delete_adapter("b")
    model.unmerge_adapter()
    model.delete_adapter("b")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)


def test_input_dtype_mismatch_is_a_clear_error(make_model):
    layer = fastpeft.get_peft_model(nn.Sequential(nn.Linear(8, 6)), lora(target_modules=["0"])).base_model.model[0]
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(2, 8, dtype=torch.float64))


def test_bf16_base_keeps_fp32_adapters_and_runs(make_model):
    model = make_model("llama").to(torch.bfloat16)
    peft_model = fastpeft.get_peft_model(model, lora())
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    out = peft_model(torch.randint(0, 96, (2, 5))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_generate_matches_the_merged_model(make_model):
    model = fastpeft.get_peft_model(make_model("llama"), lora(lora_alpha=64))
    ids = torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(tokens, model.merge_and_unload().generate(input_ids=ids, **kwargs))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_triton_kernels_inside_a_model_match_the_torch_path(arch, make_model, make_inputs, run_model, monkeypatch):
    """The fused kernel (interpreted on a CPU) in a real model, Conv1D's transposed weights included."""
    model = fastpeft.get_peft_model(
        make_model(arch), lora(target_modules=["q_proj", "down_proj"] if arch == "llama" else ["c_attn"])
    ).eval()
    inputs = make_inputs(arch, batch=1, seq=5)
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    with torch.no_grad():
        expected = run_model(model, inputs)
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    with torch.no_grad():
        torch.testing.assert_close(run_model(model, inputs), expected, rtol=1e-4, atol=1e-5)


def test_save_pretrained_refuses_a_file(make_model, tmp_path):
    model = fastpeft.get_peft_model(make_model("llama"), lora())
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(target)
    model.save_pretrained(tmp_path / "dir")
    assert sorted(os.listdir(tmp_path / "dir")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # PEFT writes a model card too
