"""LoRA against real `peft` as the oracle: structure, checkpoints both ways, merge, training."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import fastpeft

peft = pytest.importorskip("peft")

ARCHS = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "gpt2": dict(target_modules=["c_attn", "c_fc"]),  # Conv1D: weights stored [in, out]
    "bert": dict(target_modules=["query", "value", "dense"], exclude_modules=["pooler.dense"]),
}


def lora_kwargs(arch, **extra):
    return dict(r=4, lora_alpha=8, init_lora_weights=False, **ARCHS[arch], **extra)


@pytest.fixture
def peft_model(peft_oracle):
    """`peft_model(base, **kwargs)`: peft's LoRA model of those settings."""
    return lambda base, **kwargs: peft_oracle(base, "LoraConfig", **kwargs)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_same_modules_and_parameters_as_peft(arch, make_model, peft_model):
    kwargs = lora_kwargs(arch)
    ours = fastpeft.get_peft_model(make_model(arch), fastpeft.LoraConfig(**kwargs))
    theirs = peft_model(make_model(arch), **kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_checkpoint_loads_here(arch, make_model, peft_model, tmp_path, check_peft_checkpoint_loads_here):
    check_peft_checkpoint_loads_here(peft_model(make_model(arch), **lora_kwargs(arch)), arch, tmp_path)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_checkpoint_loads_in_peft(arch, make_model, peft_model, tmp_path, check_files_match_peft,
                                  check_peft_loads_ours):
    kwargs = lora_kwargs(arch, use_rslora=True)
    ours = fastpeft.get_peft_model(make_model(arch), fastpeft.LoraConfig(**kwargs))
    check_files_match_peft(ours, peft_model(make_model(arch), **kwargs), tmp_path, exact=False)  # other weights
    check_peft_loads_ours(ours.eval(), arch, tmp_path / "ours")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_disable_and_unload_match_peft(arch, oracle_twins, check_merge_matches_peft):
    check_merge_matches_peft(*oracle_twins(arch, "LoraConfig", **lora_kwargs(arch)), arch, "lora_")


def test_multiple_adapters_switch_like_peft(make_model, make_inputs, run_model, tmp_path, peft_model):
    arch = "llama"
    a = peft_model(make_model(arch), **lora_kwargs(arch))
    a.save_pretrained(tmp_path / "a")
    torch.manual_seed(5)
    b = peft_model(make_model(arch), r=2, lora_alpha=16, init_lora_weights=False, target_modules=["k_proj", "o_proj"])
    b.save_pretrained(tmp_path / "b")
    inputs = make_inputs(arch)
    ours = fastpeft.PeftModel.from_pretrained(make_model(arch), tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    assert ours.active_adapter == "a"
    with torch.no_grad():
        torch.testing.assert_close(run_model(ours, inputs), run_model(a, inputs), rtol=1e-5, atol=1e-5)
        ours.set_adapter("b")
        torch.testing.assert_close(run_model(ours, inputs), run_model(b, inputs), rtol=1e-5, atol=1e-5)
    ours.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both/adapter_model.safetensors").exists() is False  # no "default" adapter
    assert json.loads((tmp_path / "both/b/adapter_config.json").read_text())["r"] == 2
    ours.delete_adapter("b")
    assert ours.active_adapter == "a" and list(ours.peft_config) == ["a"]
    assert not any(".b." in n for n, _ in ours.named_parameters())


CONFIGS = {
    "bias_all": ("gpt2", dict(target_modules=["c_attn"], bias="all")),
    "bias_lora_only": ("bert", dict(target_modules=["query", "value"], bias="lora_only")),
    "modules_to_save": ("llama", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    "rank_alpha_pattern": (
        "llama", dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    ),
    "layers_to_transform": (
        "llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers")
    ),
    "all_linear": ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj"])),
    "all_linear_gpt2": ("gpt2", dict(target_modules="all-linear")),
    "regex": ("llama", dict(target_modules=r".*\.1\.self_attn\.(q|k)_proj")),
    "gaussian_init": ("llama", dict(target_modules=["v_proj"], init_lora_weights="gaussian")),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_semantics_match_peft(name, make_model, make_inputs, run_model, tmp_path, peft_model):
    arch, extra = CONFIGS[name]
    kwargs = dict(r=4, lora_alpha=8, **extra)
    ours = fastpeft.get_peft_model(make_model(arch), fastpeft.LoraConfig(**kwargs))
    theirs = peft_model(make_model(arch), **kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    with torch.no_grad():  # make every adapter non-trivial, then round-trip through peft's files
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path)
    loaded = fastpeft.PeftModel.from_pretrained(make_model(arch), tmp_path)
    inputs = make_inputs(arch)
    with torch.no_grad():
        torch.testing.assert_close(run_model(loaded, inputs), run_model(theirs, inputs), rtol=1e-5, atol=1e-5)
    loaded.save_pretrained(tmp_path / "again")
    mine, ref = load_file(tmp_path / "again/adapter_model.safetensors"), load_file(tmp_path / "adapter_model.safetensors")
    assert mine.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_step_matches_peft_and_touches_only_adapters(arch, oracle_twins, check_training_step_matches_peft):
    ours, theirs = oracle_twins(arch, "LoraConfig", **lora_kwargs(arch, lora_dropout=0.0))
    changed = check_training_step_matches_peft(ours.train(), theirs.train(), arch)
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)


def test_sequence_classification_saves_the_head_like_peft(make_model, tmp_path, peft_model):
    from transformers import BertConfig, BertForSequenceClassification

    def fresh():
        torch.manual_seed(0)
        return BertForSequenceClassification(
            BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
        ).eval()

    kwargs = dict(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], init_lora_weights=False)
    ours = fastpeft.get_peft_model(fresh(), fastpeft.LoraConfig(**kwargs))
    theirs = peft_model(fresh(), **kwargs)
    assert isinstance(ours, fastpeft.PeftModelForSequenceClassification)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert load_file(tmp_path / "ours/adapter_model.safetensors").keys() == load_file(
        tmp_path / "theirs/adapter_model.safetensors"
    ).keys()


def test_second_all_linear_adapter_targets_the_wrapped_layers_like_peft(make_model, peft_model):
    kwargs = dict(r=4, target_modules=["q_proj", "v_proj"])
    ours = fastpeft.get_peft_model(make_model("llama"), fastpeft.LoraConfig(**kwargs))
    theirs = peft_model(make_model("llama"), **kwargs)
    ours.add_adapter("b", fastpeft.LoraConfig(r=2, target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_adapter("b", peft.LoraConfig(r=2, target_modules="all-linear"))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
