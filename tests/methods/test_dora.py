"""DoRA (`LoraConfig(use_dora=True)`) against real `peft` as the oracle: structure, checkpoints
both ways, merge / unmerge, training gradients, the eval-mode norm cache, the fused kernel path."""

import warnings

import pytest
import torch

import fastpeft

peft = pytest.importorskip("peft")

ARCHS = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "gpt2": dict(target_modules=["c_attn", "c_fc"]),  # Conv1D: weights stored [in, out]
    "bert": dict(target_modules=["query", "value", "dense"], exclude_modules=["pooler.dense"]),
}
TOL = dict(rtol=1e-5, atol=1e-5)


def dora_kwargs(arch, **extra):
    return {**dict(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, **ARCHS[arch]), **extra}


def perturb_magnitudes(model, seed=0):
    """Move m away from its init (= the norm) so the DoRA factor is not 1 anywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))


def pair(arch, oracle_twins, **extra):
    """Our DoRA model and peft's, eval mode, holding the same (non-trivial) adapter weights."""
    return oracle_twins(arch, "LoraConfig", prepare=perturb_magnitudes, **dora_kwargs(arch, **extra))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_same_parameters_and_initial_magnitude_as_peft(arch, make_model, peft_oracle):
    kwargs = dora_kwargs(arch, init_lora_weights=True)  # B = 0: m = ||W|| whatever A is
    ours = fastpeft.get_peft_model(make_model(arch), fastpeft.LoraConfig(**kwargs))
    theirs = peft_oracle(make_model(arch), "LoraConfig", **kwargs)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in ref.items()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    magnitudes = [k for k in ref if "lora_magnitude_vector" in k]
    assert magnitudes
    for key in magnitudes:
        torch.testing.assert_close(mine[key], ref[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_checkpoint_loads_here(arch, oracle_twins, tmp_path, check_peft_checkpoint_loads_here):
    check_peft_checkpoint_loads_here(pair(arch, oracle_twins)[1], arch, tmp_path)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_checkpoint_loads_in_peft(arch, oracle_twins, tmp_path, check_files_match_peft, check_peft_loads_ours):
    ours, theirs = pair(arch, oracle_twins)
    mine, _ = check_files_match_peft(ours, theirs, tmp_path)
    assert any(k.endswith(".lora_magnitude_vector") for k in mine)
    check_peft_loads_ours(ours, arch, tmp_path / "ours")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_unmerge_and_unload_match_peft(arch, make_model, make_inputs, run_model, oracle_twins):
    ours, theirs = pair(arch, oracle_twins)
    inputs = make_inputs(arch)
    with torch.no_grad():
        unmerged = run_model(ours, inputs)
        torch.testing.assert_close(unmerged, run_model(theirs, inputs), **TOL)
        weights = {k: v.clone() for k, v in ours.state_dict().items()}
        ours.merge_adapter()
        theirs.merge_adapter()
        torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(run_model(ours, inputs), unmerged, rtol=1e-4, atol=1e-5)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours.state_dict(), weights, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(run_model(ours, inputs), unmerged, **TOL)
        with ours.disable_adapter():
            torch.testing.assert_close(run_model(ours, inputs), run_model(make_model(arch), inputs))
        merged = ours.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        theirs.unmerge_adapter()
        torch.testing.assert_close(run_model(merged, inputs), run_model(theirs.merge_and_unload(), inputs), **TOL)


def test_merging_dora_after_another_adapter_uses_the_unmerged_norm(make_model, make_inputs, run_model):
    """Two adapters merged in turn into one layer: the second DoRA norm ignores the first merge (PEFT)."""
    arch = "llama"
    kwargs = dora_kwargs(arch)
    plain = dict(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj"])
    ours = fastpeft.get_peft_model(make_model(arch), fastpeft.LoraConfig(**plain), adapter_name="a").eval()
    ours.add_adapter("b", fastpeft.LoraConfig(**kwargs))
    perturb_magnitudes(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_model(arch), peft.LoraConfig(**plain), adapter_name="a").eval()
        theirs.add_adapter("b", peft.LoraConfig(**kwargs))
    theirs.load_state_dict(ours.state_dict())
    weights = {k: v.clone() for k, v in ours.state_dict().items()}
    with torch.no_grad():
        ours.merge_adapter(["a", "b"])
        theirs.merge_adapter(["a", "b"])
        torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=1e-5, atol=1e-6)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours.state_dict(), weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch,dropout", [("llama", 0.0), ("gpt2", 0.0), ("bert", 0.0), ("llama", 0.25)])
def test_training_step_gradients_match_peft(arch, dropout, oracle_twins, make_inputs):
    ours, theirs = pair(arch, oracle_twins, lora_dropout=dropout)
    ours.train()
    theirs.train()
    inputs = make_inputs(arch)
    losses = []
    for model in (ours, theirs):
        torch.manual_seed(0)  # the same dropout masks in both (model dropouts and lora_dropout)
        out = model(**inputs, labels=inputs["input_ids"]) if arch != "bert" else model(**inputs)
        loss = out.loss if arch != "bert" else out.last_hidden_state.square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert mine.keys() == grads.keys() and any("lora_magnitude_vector" in n for n in mine)
    for name, grad in grads.items():
        torch.testing.assert_close(mine[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_eval_cache_is_reused_and_invalidated_by_every_input(oracle_twins, make_inputs, run_model):
    ours, theirs = pair("llama", oracle_twins)
    inputs = make_inputs("llama")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    magnitude = layer.lora_magnitude_vector["default"]
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    with torch.no_grad():
        torch.testing.assert_close(run_model(ours, inputs), run_model(theirs, inputs), **TOL)
        cached = magnitude._factor[1]
        run_model(ours, inputs)
        assert magnitude._factor[1] is cached, "eval mode must reuse the factor"
        for suffix in ("base_layer.weight", "lora_A.default.weight", "lora_B.default.weight",
                       "lora_magnitude_vector.default.weight"):
            for model in (ours, theirs):  # in-place, as an optimizer step or load_state_dict does
                dict(model.named_parameters())[prefix + suffix].mul_(1.1)
            torch.testing.assert_close(run_model(ours, inputs), run_model(theirs, inputs), **TOL,
                                       msg=lambda m, s=suffix: f"stale cache after changing {s}: {m}")
            assert magnitude._factor[1] is not cached
            cached = magnitude._factor[1]
    ours.train()
    assert magnitude._factor is None and magnitude._norm is None


def test_fused_kernel_path_matches_peft(triton_backend, oracle_twins, check_fused_path_matches_peft):
    """Forward and a training step through the Triton kernel (interpreter on a CPU)."""
    check_fused_path_matches_peft(*pair("llama", oracle_twins), grad_atol=1e-5)


def test_mixed_adapter_batch_with_dora_is_refused(oracle_twins, make_inputs):
    ours, _ = pair("llama", oracle_twins)
    inputs = make_inputs("llama")
    with pytest.raises((NotImplementedError, ValueError), match="adapter_names"):
        ours(**inputs, adapter_names=["default", "__base__"])
