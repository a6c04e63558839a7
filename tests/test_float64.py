"""float64 models (issue 18 item 6): every method runs a float64 model on the reference (torch)
path and computes in float64; where PEFT has the method, outputs and grads match real PEFT to
1e-10. The Triton kernels have no float64 path: forcing them on a float64 input is a clear
ValueError before any kernel runs."""

import warnings

import pytest
import torch

import fastpeft
from fastpeft import ops

peft = pytest.importorskip("peft")

TOL = 1e-10
ATTN = ["q_proj", "v_proj"]
PEFT_METHODS = {
    "lora": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=ATTN, init_lora_weights=False)),
    "rslora": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                                  init_lora_weights=False)),
    "dora": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=ATTN, use_dora=True, init_lora_weights=False)),
    "adalora": ("AdaLoraConfig", dict(init_r=4, target_r=2, total_step=10, target_modules=ATTN,
                                      init_lora_weights=False)),
    "ia3": ("IA3Config", dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                              init_ia3_weights=False)),
    "prompt": ("PromptTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "prefix": ("PrefixTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "ptuning": ("PromptEncoderConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16)),
}


def _double(model):
    return model.to(torch.float64)


def _perturb(model, seed=0):
    """Non-trivial adapter weights (every trainable tensor), the same for a twin."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _loss_and_grads(model, inputs):
    """Logits and the grads of a loss on them (no `labels`: AdaLoRA's orthogonality term is not
    the subject here)."""
    model.zero_grad()
    logits = model(**inputs).logits
    ids = inputs["input_ids"]  # prompt tuning / P-tuning logits start with the virtual tokens' rows
    pred = logits[:, -ids.shape[1]:-1].flatten(0, 1)
    torch.nn.functional.cross_entropy(pred, ids[:, 1:].flatten()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("method", sorted(PEFT_METHODS))
def test_float64_matches_peft(method, make_model, make_inputs):
    config_name, kwargs = PEFT_METHODS[method]
    ours = fastpeft.get_peft_model(_double(make_model("llama")), getattr(fastpeft, config_name)(**kwargs)).eval()
    _perturb(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_double(make_model("llama")), getattr(peft, config_name)(**kwargs)).eval()
    theirs.load_state_dict(ours.state_dict())
    inputs = make_inputs("llama")
    y_ours, g_ours = _loss_and_grads(ours, inputs)
    y_theirs, g_theirs = _loss_and_grads(theirs, inputs)
    assert y_ours.dtype == torch.float64 and y_theirs.dtype == torch.float64
    torch.testing.assert_close(y_ours, y_theirs, atol=TOL, rtol=0)
    # PEFT's fp64 cast re-wraps AdaLoRA's frozen `ranknum` as a trainable Parameter (a PEFT quirk,
    # not copied): it is the one extra grad there
    g_theirs = {n: g for n, g in g_theirs.items() if ".ranknum." not in n}
    assert g_ours.keys() == g_theirs.keys() and g_ours
    for name in g_ours:
        assert g_ours[name].dtype == g_theirs[name].dtype  # fp64 adapters (prompt encoders: fp32, as PEFT's)
        torch.testing.assert_close(g_ours[name], g_theirs[name], atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")


def _fp32_vs_fp64(make_model, make_inputs, arch, config):
    """(fp32 logits, fp64 logits) of one model with the same (perturbed) weights."""
    model = fastpeft.get_peft_model(make_model(arch), config).eval()
    _perturb(model)
    inputs = make_inputs(arch)
    with torch.no_grad():
        y32 = model(**inputs).logits
    _double(model)
    y64, grads = _loss_and_grads(model, inputs)
    assert grads and all(g.dtype == torch.float64 and torch.isfinite(g).all() for g in grads.values())
    return y32, y64


@pytest.mark.parametrize("arch, make_config", [
    ("llama", lambda: fastpeft.AdapterConfig()),
    ("gpt2", lambda: fastpeft.BitFitConfig()),
    ("llama", lambda: fastpeft.MAMConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    ("llama", lambda: fastpeft.UniPELTConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
], ids=["adapter", "bitfit", "mam", "unipelt"])
def test_float64_methods_without_a_peft_oracle(arch, make_config, make_model, make_inputs):
    """No PEFT oracle (PEFT lacks them): the fp64 model runs in fp64 and agrees with its fp32 self
    to fp32 rounding, so the fp64 maths are the same maths."""
    y32, y64 = _fp32_vs_fp64(make_model, make_inputs, arch, make_config())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, atol=1e-4, rtol=1e-4)


def test_float64_mam_at_init_matches_peft_prefix_tuning(make_model, make_inputs):
    """MAM at init is its prefix (the parallel adapter adds exactly 0): equal to real PEFT's
    Prefix Tuning holding the same prefix, in fp64."""
    ours = fastpeft.get_peft_model(_double(make_model("llama")),
                                   fastpeft.MAMConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_double(make_model("llama")),
                                     peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    theirs.prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())
    inputs = make_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=TOL, rtol=0)


def test_float64_save_and_load_round_trip_in_peft(make_model, make_inputs, tmp_path):
    """A float64 LoRA checkpoint written here loads in real PEFT with the same outputs (fp64 kept)."""
    config = dict(r=4, lora_alpha=8, target_modules=ATTN, init_lora_weights=False)
    ours = fastpeft.get_peft_model(_double(make_model("llama")), fastpeft.LoraConfig(**config)).eval()
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_double(make_model("llama")), tmp_path).eval()
    inputs = make_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=TOL, rtol=0)


def _lora_args(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, generator=g, dtype=dtype), torch.randn(7, 5, generator=g, dtype=dtype)
    a, b = torch.randn(2, 5, generator=g, dtype=dtype), torch.randn(7, 2, generator=g, dtype=dtype)
    return x, w, None, a, b, 0.5


def test_float64_ops_compute_in_float64():
    x, w, _, a, b, s = _lora_args()
    y = ops.lora_linear(x, w, None, a, b, s)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x @ w.T + s * (x @ a.T) @ b.T, atol=1e-13, rtol=0)  # fp32 maths would miss by ~1e-7
    scale = torch.rand(7, dtype=torch.float64) + 0.5
    torch.testing.assert_close(ops.ia3_linear(x, w, None, scale, feedforward=False), scale * (x @ w.T),
                               atol=1e-13, rtol=0)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_triton_refuses_float64_clearly(how, monkeypatch):
    """The Triton kernels have no fp64 path: forcing them is a ValueError naming float64 and the
    way out, raised before any kernel runs (the CPU interpreter here, the GPU in production)."""
    x, w, _, a, b, s = _lora_args()
    kwargs = {"backend": "triton"}
    if how == "environment":
        monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
        kwargs = {}
    with pytest.raises(ValueError, match=r"lora_linear: x is float64.*Triton.*backend='torch'"):
        ops.lora_linear(x, w, None, a, b, s, **kwargs)
    with pytest.raises(ValueError, match=r"ia3_linear: x is float64"):
        ops.ia3_linear(x, w, None, torch.ones(7, dtype=torch.float64), feedforward=False, **kwargs)
    with pytest.raises(ValueError, match=r"bottleneck_adapter: x is float64"):
        ops.bottleneck_adapter(x, a, None, a.T.contiguous(), None, 1.0, "relu", **kwargs)


def test_auto_backend_picks_the_reference_for_float64():
    from fastpeft.ops._backend import resolve_backend

    assert resolve_backend(torch.zeros(1, dtype=torch.float64), "auto") == "torch"
    assert resolve_backend(torch.zeros(1, dtype=torch.float64, device="meta"), "auto") == "torch"
