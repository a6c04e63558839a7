"""DoRA and AdaLoRA over an NF4 base, against real peft over the same codes in bitsandbytes layers.

The oracle is `nf4.bnb_copy` (tests/methods/conftest.py): the same model with every fastpeft
`Linear4bit` swapped for a `bitsandbytes.nn.Linear4bit` holding the very same codes and statistics
(blocksize 32, and peft's side runs in train mode, bnb's exact CPU path; nothing drops out unless
a test asks for lora_dropout). peft 0.21 on a CPU wraps bnb's layers in its generic `lora.Linear` /
`adalora.SVDLinear`, whose DoRA and SVD maths run on the dequantized bnb weight. peft cannot merge
either there (its DoRA merge fails on a CPU `Params4bit`, its `SVDLinear4bit` has no merge): our
merges are checked against the exact merge formula re-quantized.
"""
import warnings

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft import ops
from fastpeft.methods.adalora import SVDLinear
from fastpeft.methods.lora import NF4LoraLinear
from fastpeft.quant.nf4 import Linear4bit

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")  # every oracle here is bnb layers (nf4.bnb_copy)

TARGETS = ["q_proj", "v_proj", "down_proj"]
TOL = dict(rtol=1e-5, atol=1e-5)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _train_step(model, inputs):
    torch.manual_seed(0)  # the same lora_dropout masks on both sides
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return loss.detach()


# -- DoRA ----------------------------------------------------------------------------------------
def dora_kwargs(**extra):
    return {**dict(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, target_modules=TARGETS), **extra}


def dora_pair(nf4, **extra):
    """Our NF4 DoRA model (m moved off its init) and peft's on bnb layers, same adapter weights."""
    ours = fastpeft.get_peft_model(nf4.llama(), fastpeft.LoraConfig(**dora_kwargs(**extra))).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    theirs = _quiet(peft.get_peft_model, nf4.bnb_copy(nf4.base(ours)), peft.LoraConfig(**dora_kwargs(**extra)))
    result = theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    assert not result.unexpected_keys
    return ours, theirs.train()


def test_dora_layers_and_initial_magnitude_match_peft(nf4):
    kwargs = dora_kwargs(init_lora_weights=True)  # B = 0: m = ||dequant(W)|| whatever A is
    ours = fastpeft.get_peft_model(nf4.llama(), fastpeft.LoraConfig(**kwargs))
    theirs = _quiet(peft.get_peft_model, nf4.bnb_copy(nf4.llama()), peft.LoraConfig(**kwargs))
    layers = [m for m in ours.modules() if isinstance(m, NF4LoraLinear)]
    assert len(layers) == 6 and all("default" in m.lora_magnitude_vector for m in layers)
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    ref = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in ref.items()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad}
    for key in (k for k in ref if "lora_magnitude_vector" in k):
        torch.testing.assert_close(mine[key], ref[key], rtol=1e-6, atol=1e-6)


def test_dora_outputs_match_peft(nf4, make_inputs, run_model):
    ours, theirs = dora_pair(nf4)
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = run_model(theirs, inputs)
        torch.testing.assert_close(run_model(ours, inputs), expected, **TOL)  # eval: cached norm
        ours.train()
        torch.testing.assert_close(run_model(ours, inputs), expected, **TOL)  # train: recomputed
        with ours.disable_adapter():
            plain = run_model(ours, inputs)
    assert not torch.allclose(plain, expected, atol=1e-3), "the DoRA adapter must change the output"


def test_dora_checkpoints_both_ways(nf4, make_inputs, run_model, tmp_path):
    ours, theirs = dora_pair(nf4)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine, ref = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert mine.keys() == ref.keys() and any(k.endswith(".lora_magnitude_vector") for k in mine)
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], rtol=0, atol=0)
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = run_model(ours.eval(), inputs)
        here = fastpeft.PeftModel.from_pretrained(nf4.llama(), tmp_path / "theirs")
        assert any(isinstance(m, NF4LoraLinear) for m in here.modules())
        torch.testing.assert_close(run_model(here, inputs), expected, **TOL)
        there = _quiet(peft.PeftModel.from_pretrained, nf4.bnb_copy(nf4.llama()), tmp_path / "ours").train()
        torch.testing.assert_close(run_model(there, inputs), expected, **TOL)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_dora_training_gradients_match_peft(dropout, nf4, make_inputs):
    ours, theirs = dora_pair(nf4, lora_dropout=dropout)
    ours.train()
    inputs = make_inputs("llama")
    torch.testing.assert_close(_train_step(ours, inputs), _train_step(theirs, inputs), **TOL)
    mine, ref = _grads(ours), _grads(theirs)
    assert mine.keys() == ref.keys() and any("lora_magnitude_vector" in n for n in mine)
    assert not any("base_layer" in n for n in mine), "the 4-bit base never trains"
    for name, grad in ref.items():
        torch.testing.assert_close(mine[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_dora_fused_kernel_path_matches_peft(triton_backend, nf4, check_fused_path_matches_peft):
    """Forward and a training step through the NF4 Triton kernel (interpreter on a CPU)."""
    check_fused_path_matches_peft(*dora_pair(nf4), grad_atol=1e-5)


def test_dora_eval_cache_is_keyed_on_the_codes(nf4, make_inputs, run_model, monkeypatch):
    ours, theirs = dora_pair(nf4)
    inputs = make_inputs("llama")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    magnitude = layer.lora_magnitude_vector["default"]
    with torch.no_grad():
        run_model(ours, inputs)
        cached = magnitude._factor[1]
        calls = []
        real = Linear4bit.dequantize
        monkeypatch.setattr(Linear4bit, "dequantize", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
        run_model(ours, inputs)
        assert magnitude._factor[1] is cached and not calls, "eval mode must reuse the norm, not dequantize"
        for model in (ours, theirs):  # an optimizer step on m or A, in place
            for name, p in model.named_parameters():
                if "layers.0.self_attn.q_proj.lora_" in name:
                    p.mul_(1.1)
        torch.testing.assert_close(run_model(ours, inputs), run_model(theirs, inputs), **TOL)
        assert magnitude._factor[1] is not cached and calls


def test_dora_merge_and_unmerge_requantize(nf4, make_inputs, run_model):
    ours, _ = dora_pair(nf4)
    inputs, layer, unmerged = _merge_setup(ours, make_inputs, run_model)
    with torch.no_grad():
        w = layer.base_weight()
        direction = w + layer.get_delta_weight("default")
        m = layer.lora_magnitude_vector["default"].weight
        exact = (m / torch.linalg.norm(direction, dim=1))[:, None] * direction  # DoRA's merged weight
        got = _merge_requantized(ours, layer, exact, run_model, inputs, unmerged)  # DoRA's exact merge
        assert layer.merge_error["default"] == pytest.approx((got - exact).abs().max().item())
        ours.unmerge_adapter()
        assert (layer.base_weight() - w).abs().max() < 0.1  # back, up to two re-quantizations
        after = run_model(ours, inputs)
        for module in ours.modules():  # a stale cached norm would show up here
            if isinstance(module, NF4LoraLinear):
                module.lora_magnitude_vector["default"].clear_cache()
        torch.testing.assert_close(run_model(ours, inputs), after, rtol=0, atol=0)
        assert (after - unmerged).abs().max() < 0.2
        with pytest.warns(UserWarning, match="re-quantizes"):
            plain = ours.merge_and_unload()
        assert isinstance(plain.model.layers[0].self_attn.q_proj, Linear4bit)


def _merge_setup(ours, make_inputs, run_model):
    """(inputs, the first layer's q_proj, the unmerged output) for a merge test."""
    inputs = make_inputs("llama")
    with torch.no_grad():
        return inputs, ours.base_model.model.model.layers[0].self_attn.q_proj, run_model(ours, inputs)


def _merge_requantized(ours, layer, exact, run_model, inputs, unmerged):
    """Merge (warned: it re-quantizes): `layer` then stores the NF4 codes of the `exact` merged
    weight, and the output moves, but little; returns the stored weight, dequantized."""
    with pytest.warns(UserWarning, match="re-quantizes"):
        ours.merge_adapter()
    got = layer.base_layer.dequantize(torch.float32)
    want = ops.nf4_dequantize(_requantized(layer.base_layer, exact))
    assert torch.equal(got, want), "the merge must store the NF4 codes of the exact merge"
    assert 0 < (run_model(ours, inputs) - unmerged).abs().max() < 0.2  # re-quantized: close, not equal
    return got


def _requantized(base, weight):
    """An NF4 weight holding the codes of `weight` with `base`'s settings (a copy of `base`)."""
    layer = Linear4bit(base.in_features, base.out_features, base.bias is not None, base.blocksize,
                       base.double_quant, base.compute_dtype, base.weight_dtype)
    layer.requantize_(weight)
    return layer.nf4_weight()


# -- AdaLoRA -------------------------------------------------------------------------------------
def ada_kwargs(**extra):
    return {**dict(init_r=6, target_r=2, lora_alpha=8, total_step=10, task_type="CAUSAL_LM",
                   target_modules=TARGETS), **extra}


def ada_pair(nf4, nontrivial=True, **extra):
    ours = fastpeft.get_peft_model(nf4.llama(), fastpeft.AdaLoraConfig(**ada_kwargs(**extra))).eval()
    if nontrivial:  # E is zero at init: trained-looking singular values, some masked
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if ".lora_E." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * (torch.rand(p.shape, generator=g) > 0.2))
    theirs = _quiet(peft.get_peft_model, nf4.bnb_copy(nf4.llama()), peft.AdaLoraConfig(**ada_kwargs(**extra)))
    result = theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k or "ranknum" in k},
                                    strict=False)
    assert not result.unexpected_keys
    return ours, theirs.train()


def test_adalora_layers_outputs_and_checkpoints_match_peft(nf4, make_inputs, run_model, tmp_path):
    ours, theirs = ada_pair(nf4)
    layers = [m for m in ours.modules() if isinstance(m, SVDLinear)]
    assert len(layers) == 6 and all(isinstance(m.base_layer, Linear4bit) for m in layers)
    mine = {k: v.shape for k, v in ours.state_dict().items() if "lora_" in k or "ranknum" in k}
    assert mine == {k: v.shape for k, v in theirs.state_dict().items() if "lora_" in k or "ranknum" in k}
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = run_model(theirs, inputs)
        torch.testing.assert_close(run_model(ours, inputs), expected, **TOL)
        with ours.disable_adapter():
            assert not torch.allclose(run_model(ours, inputs), expected, atol=1e-3)
        ours.save_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")
        a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
        here = fastpeft.PeftModel.from_pretrained(nf4.llama(), tmp_path / "theirs")
        torch.testing.assert_close(run_model(here, inputs), expected, **TOL)
        there = _quiet(peft.PeftModel.from_pretrained, nf4.bnb_copy(nf4.llama()), tmp_path / "ours").train()
        torch.testing.assert_close(run_model(there, inputs), expected, **TOL)


def test_adalora_training_allocates_the_same_ranks_as_peft(nf4, make_inputs, run_model, tmp_path):
    """Same init, data and SGD: same losses, gradients, budgets and masks at every step."""
    kwargs = dict(tinit=1, tfinal=2, total_step=6, deltaT=1, target_modules=["q_proj", "v_proj"])
    ours, theirs = ada_pair(nf4, nontrivial=False, **kwargs)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (ours, theirs)]
    ours.train()
    masked_some = False
    for step in range(kwargs["total_step"] + 1):
        inputs = make_inputs("llama", seed=100 + step)
        losses = []
        for model, opt in zip((ours, theirs), opts):
            losses.append(_train_step(model, inputs))
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
        pattern = ours.peft_config["default"].rank_pattern
        assert pattern == theirs.peft_config["default"].rank_pattern, f"step {step}"
        masked_some |= bool(pattern) and not all(all(m) for m in pattern.values())
        ref = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p, ref[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{step} {n}: {m}")
    assert masked_some
    ours.save_pretrained(tmp_path)
    inputs = make_inputs("llama")
    with torch.no_grad():
        there = _quiet(peft.PeftModel.from_pretrained, nf4.bnb_copy(nf4.llama()), tmp_path).train()
        torch.testing.assert_close(run_model(there, inputs), run_model(ours.eval(), inputs), rtol=1e-4, atol=1e-5)


def test_adalora_fused_kernel_path_matches_peft(triton_backend, nf4, check_fused_path_matches_peft):
    check_fused_path_matches_peft(*ada_pair(nf4), grad_atol=1e-6)


def test_adalora_merge_on_nf4_requantizes(nf4, make_inputs, run_model):
    """peft's SVDLinear4bit cannot merge; here the merge re-quantizes like the QLoRA merge."""
    ours, _ = ada_pair(nf4)
    inputs, layer, unmerged = _merge_setup(ours, make_inputs, run_model)
    with torch.no_grad():
        exact = layer.base_weight() + layer.get_delta_weight("default")
        _merge_requantized(ours, layer, exact, run_model, inputs, unmerged)
        ours.unmerge_adapter()
        assert (run_model(ours, inputs) - unmerged).abs().max() < 0.2
