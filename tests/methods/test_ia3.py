"""IA3 against real `peft` as the oracle: structure, checkpoints both ways, merge, training, on the
tiny Llama and GPT-2 and the real MiniLM BERT, with PEFT's default targets per architecture."""


import pytest
import torch
from safetensors.torch import load_file

import fastpeft

peft = pytest.importorskip("peft")

ARCHS = ["llama", "gpt2", "bert"]
TOL = dict(rtol=1e-5, atol=1e-5)


def twins(arch, oracle_twins, **kwargs):
    """(ours, theirs) on identical bases with identical random (non-identity) IA3 vectors."""
    torch.manual_seed(0)
    return oracle_twins(arch, "IA3Config", init_ia3_weights=False, **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_modules_parameters_and_outputs_as_peft(arch, make_model, make_inputs, run_model, oracle_twins):
    ours, theirs = twins(arch, oracle_twins)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    inputs = make_inputs(arch)
    with torch.no_grad():
        expected = run_model(theirs, inputs)
        torch.testing.assert_close(run_model(ours, inputs), expected, **TOL)
        assert not torch.allclose(expected, run_model(make_model(arch), inputs), atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init(arch, make_model, make_inputs, run_model):
    ours = fastpeft.get_peft_model(make_model(arch), fastpeft.IA3Config())
    inputs = make_inputs(arch)
    with torch.no_grad():
        torch.testing.assert_close(run_model(ours.eval(), inputs), run_model(make_model(arch), inputs))


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoints_both_ways(arch, make_model, make_inputs, run_model, tmp_path, oracle_twins,
                               check_files_match_peft, check_peft_loads_ours):
    ours, theirs = twins(arch, oracle_twins)
    mine, ref = check_files_match_peft(ours, theirs, tmp_path)
    assert mine.keys() == ref.keys() and all(k.endswith(".ia3_l") for k in mine)

    inputs = make_inputs(arch)
    loaded = fastpeft.PeftModel.from_pretrained(make_model(arch), tmp_path / "theirs")
    in_peft = check_peft_loads_ours(ours, arch, tmp_path / "ours")
    with torch.no_grad():
        expected = run_model(theirs, inputs)
        torch.testing.assert_close(run_model(loaded, inputs), expected, **TOL)
        torch.testing.assert_close(run_model(in_peft, inputs), expected, **TOL)
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.save_pretrained(tmp_path / "again")  # bit-exact round trip
    again = load_file(tmp_path / "again/adapter_model.safetensors")
    assert again.keys() == ref.keys() and all(torch.equal(again[k], ref[k]) for k in ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_and_unload_match_peft(arch, oracle_twins, check_merge_matches_peft):
    merged, theirs_merged = check_merge_matches_peft(*twins(arch, oracle_twins), arch, "ia3_",
                                                     unmerge_tol=dict(rtol=1e-4, atol=1e-5))
    for (n, p), (n2, q) in zip(merged.state_dict().items(), theirs_merged.state_dict().items()):
        assert n == n2
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_step_matches_peft_and_touches_only_ia3(arch, oracle_twins, check_training_step_matches_peft):
    ours, theirs = twins(arch, oracle_twins)
    changed = check_training_step_matches_peft(ours.train(), theirs.train(), arch)
    assert changed and all(".ia3_l." in n for n in changed)


def test_training_reduces_loss_through_the_kernels(make_model, make_inputs, triton_backend, adam_steps):
    """A few steps through the Triton kernels (interpreter) on the tiny Llama: loss goes down."""
    model = fastpeft.get_peft_model(make_model("llama"), fastpeft.IA3Config()).train()
    adam_steps(model, make_inputs("llama", batch=1, seq=5), lr=0.05, steps=3)  # asserts the loss goes down


def test_bad_configs():
    with pytest.raises(ValueError, match="subset"):
        fastpeft.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="not found"):
        from transformers import LlamaConfig, LlamaForCausalLM

        base = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))
        fastpeft.get_peft_model(base, fastpeft.IA3Config(target_modules=["nope"], feedforward_modules=[]))
