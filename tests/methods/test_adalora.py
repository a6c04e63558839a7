"""AdaLoRA against real `peft` as the oracle: structure, checkpoints both ways, the rank
allocator over a short training run, the orthogonal regulariser, shrunk saves, bad input."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import fastpeft

peft = pytest.importorskip("peft")

ARCHS = {
    # CAUSAL_LM: PEFT adds the orthogonal regulariser only through its task models' forward
    "llama": dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"]),
    "bert": dict(target_modules=["query", "value"]),
}
TOL = dict(rtol=1e-5, atol=1e-5)


def ada_kwargs(arch, **extra):
    return {**dict(init_r=6, target_r=2, lora_alpha=8, total_step=10, **ARCHS[arch]), **extra}


def set_singular_values(model, seed=0):
    """E is zero at init (A, B ~ N(0, 0.02)): give it trained-looking values, a few masked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_E." in name:
                p.copy_(torch.randn(p.shape, generator=g) * (torch.rand(p.shape, generator=g) > 0.2))


def pair(arch, oracle_twins, nontrivial=True, **extra):
    return oracle_twins(arch, "AdaLoraConfig", prepare=set_singular_values if nontrivial else None,
                        **ada_kwargs(arch, **extra))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_same_parameters_as_peft(arch, make_model, peft_oracle):
    ours = fastpeft.get_peft_model(make_model(arch), fastpeft.AdaLoraConfig(**ada_kwargs(arch)))
    theirs = peft_oracle(make_model(arch), "AdaLoraConfig", **ada_kwargs(arch))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert any(".ranknum.default" in k for k in ours.state_dict())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_checkpoint_loads_here(arch, make_model, peft_oracle, tmp_path, check_peft_checkpoint_loads_here):
    theirs = peft_oracle(make_model(arch), "AdaLoraConfig", **ada_kwargs(arch))
    set_singular_values(theirs)
    check_peft_checkpoint_loads_here(theirs, arch, tmp_path)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_checkpoint_loads_in_peft(arch, oracle_twins, tmp_path, check_files_match_peft, check_peft_loads_ours):
    ours, theirs = pair(arch, oracle_twins)
    mine, ref = check_files_match_peft(ours, theirs, tmp_path)
    assert mine.keys() == ref.keys() and not any("ranknum" in k for k in mine)
    check_peft_loads_ours(ours, arch, tmp_path / "ours")


def test_merge_and_unload_match_peft(oracle_twins, make_inputs, run_model):
    ours, theirs = pair("llama", oracle_twins)
    inputs = make_inputs("llama")
    with torch.no_grad():
        unmerged = run_model(ours, inputs)
        torch.testing.assert_close(unmerged, run_model(theirs, inputs), **TOL)
        ours.merge_adapter()
        torch.testing.assert_close(run_model(ours, inputs), unmerged, rtol=1e-4, atol=1e-5)
        ours.unmerge_adapter()
        torch.testing.assert_close(run_model(ours, inputs), unmerged, **TOL)
        torch.testing.assert_close(run_model(ours.merge_and_unload(), inputs),
                                   run_model(theirs.merge_and_unload(), inputs), **TOL)


def test_fused_kernel_path_matches_peft(triton_backend, oracle_twins, check_fused_path_matches_peft):
    check_fused_path_matches_peft(*pair("llama", oracle_twins), grad_atol=1e-6)


def test_orthogonal_regulariser_is_added_like_peft(oracle_twins, make_inputs):
    ours, theirs = pair("llama", oracle_twins, orth_reg_weight=0.7)
    inputs = make_inputs("llama")
    with torch.no_grad():
        mine = ours(**inputs, labels=inputs["input_ids"]).loss
        ref = theirs(**inputs, labels=inputs["input_ids"]).loss
        torch.testing.assert_close(mine, ref, **TOL)
        # the regulariser is really there: the loss differs from the task loss alone
        ours.base_model.peft_config["default"].orth_reg_weight = 0.0
        assert not torch.allclose(ours(**inputs, labels=inputs["input_ids"]).loss, mine)


def test_training_run_allocates_the_same_ranks_as_peft(make_model, oracle_twins, make_inputs, run_model, tmp_path):
    """Same init, data and plain SGD: same budget each step, same masks, same shrunk checkpoint."""
    arch = "llama"
    kwargs = ada_kwargs(arch, tinit=2, tfinal=3, total_step=10, deltaT=2, target_modules=["q_proj", "v_proj"])
    ours, theirs = pair(arch, oracle_twins, nontrivial=False, **kwargs)  # PEFT's init: E = 0
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (ours, theirs)]
    allocators = ours.base_model.rankallocator, theirs.base_model.rankallocator
    assert (allocators[0].init_bgt, allocators[0].target_bgt) == (allocators[1].init_bgt, allocators[1].target_bgt) == (24, 8)
    ours.train()
    theirs.train()
    masked_some = False
    for step in range(kwargs["total_step"] + 1):
        inputs = make_inputs(arch, seed=100 + step)
        losses = []
        for model, opt in zip((ours, theirs), opts):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
        assert allocators[0].budget_schedule(step) == allocators[1].budget_schedule(step)
        pattern = ours.peft_config["default"].rank_pattern
        assert pattern == theirs.peft_config["default"].rank_pattern, f"step {step}"
        e_ours = {n: p == 0 for n, p in ours.named_parameters() if ".lora_E." in n}
        e_theirs = {n: p == 0 for n, p in theirs.named_parameters() if ".lora_E." in n}
        assert all(torch.equal(e_ours[n], e_theirs[n]) for n in e_theirs), f"step {step}"
        masked_some |= pattern is not None and not all(all(m) for m in pattern.values())
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(dict(ours.named_parameters())[n], p, rtol=1e-4, atol=1e-5)
    assert masked_some
    final = ours.peft_config["default"].rank_pattern
    assert sum(sum(m) for m in final.values()) <= allocators[0].target_bgt

    ours.eval()
    theirs.eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine, ref = load_file(tmp_path / "ours/adapter_model.safetensors"), load_file(tmp_path / "theirs/adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in ref.items()}
    assert sum(v.shape[0] for k, v in mine.items() if k.endswith("lora_E")) == sum(sum(m) for m in final.values())
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], rtol=1e-4, atol=1e-5)
    saved = json.loads((tmp_path / "ours/adapter_config.json").read_text())["rank_pattern"]
    assert saved == json.loads((tmp_path / "theirs/adapter_config.json").read_text())["rank_pattern"]
    assert all(k.endswith(".lora_E") for k in saved)

    inputs = make_inputs(arch)
    with torch.no_grad():
        expected = run_model(theirs, inputs)
        torch.testing.assert_close(run_model(ours, inputs), expected, rtol=1e-4, atol=1e-5)
        here = fastpeft.PeftModel.from_pretrained(make_model(arch), tmp_path / "theirs")
        torch.testing.assert_close(run_model(here, inputs), expected, rtol=1e-4, atol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            there = peft.PeftModel.from_pretrained(make_model(arch), tmp_path / "ours").eval()
        torch.testing.assert_close(run_model(there, inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(total_step=None), "total_step"),
    (dict(total_step=10, tinit=6, tfinal=4), "tinit"),
    (dict(total_step=10, target_r=8, init_r=4), "target_r"),
    (dict(total_step=10, use_dora=True), "DoRA"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastpeft.AdaLoraConfig(target_modules=["q_proj"], **kwargs)


def test_second_trainable_adapter_is_refused_and_changes_nothing(make_model):
    ours = fastpeft.get_peft_model(make_model("llama"), fastpeft.AdaLoraConfig(**ada_kwargs("llama")))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="only 1 trainable adapter"):
        ours.add_adapter("other", fastpeft.AdaLoraConfig(**ada_kwargs("llama")))
    assert list(ours.peft_config) == ["default"]
    assert ours.state_dict().keys() == before.keys()
    frozen = fastpeft.AdaLoraConfig(**ada_kwargs("llama"), inference_mode=True)
    ours.add_adapter("other", frozen)  # a second adapter for inference is fine
    assert ours.base_model.trainable_adapter_name == "default"


def test_update_and_allocate_needs_gradients(make_model):
    ours = fastpeft.get_peft_model(make_model("llama"), fastpeft.AdaLoraConfig(**ada_kwargs("llama")))
    with pytest.raises(ValueError, match="no gradient"):
        ours.update_and_allocate(1)
