"""Under torch.autocast(device, dtype) fastpeft's LoRA, IA3 and bottleneck-adapter layers compute in
the autocast dtype and return what real PEFT's return (bf16 under CPU bf16 autocast, fp16 under
fp16), within that dtype's tolerance."""
import copy
import types

import peft
import pytest
import torch

import fastpeft


def test_lora_under_cpu_bf16_autocast_matches_peft(make_model):
    base = make_model("qv")
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)).eval()
    ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**kw)).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", torch.bfloat16):
        want, got = ref(x), ours(x)
    assert want.dtype == torch.bfloat16 and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", torch.bfloat16):
        layer_out = ours.base_model.model.q_proj(x)
    assert layer_out.dtype == torch.bfloat16


def _pair(base, peft_cls, ours_cls, **kw):
    torch.manual_seed(0)
    ref = peft.get_peft_model(copy.deepcopy(base), peft_cls(**kw)).eval()
    ours = fastpeft.get_peft_model(copy.deepcopy(base), ours_cls(**kw)).eval()
    with torch.no_grad():  # IA3 starts at ones: move off them so the scales matter
        for p in ref.parameters():
            if p.requires_grad:
                p.mul_(torch.rand_like(p) + 0.5)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("feedforward", [[], ["v_proj"]])
def test_ia3_under_cpu_autocast_matches_peft(make_model, dtype, feedforward):
    ref, ours = _pair(make_model("qv"), peft.IA3Config, fastpeft.IA3Config, target_modules=["q_proj", "v_proj"],
                      feedforward_modules=feedforward)
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype):
        want, got = ref(x), ours(x)
        layer_out = ours.base_model.model.v_proj(x)
    assert want.dtype == dtype and got.dtype == dtype and layer_out.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["houlsby", "parallel"])
def test_bottleneck_adapter_under_cpu_autocast(make_model, dtype, variant):
    """No PEFT oracle (PEFT has no bottleneck adapters): the layer returns the autocast dtype, as
    the linear it wraps does, within its tolerance of the fp32 result, and trains under autocast."""
    base = make_model("qv")
    torch.manual_seed(0)
    base.config = types.SimpleNamespace(hidden_size=32)  # the parallel variant's width
    model = fastpeft.get_peft_model(base, fastpeft.AdapterConfig(
        variant=variant, target_modules=["q_proj"], bottleneck_size=4, init_adapter_weights=False))
    x = torch.randn(2, 5, 32)
    want = model(x)
    with torch.autocast("cpu", dtype):
        got = model(x)
        layer_out = model.base_model.model.q_proj(x)
    assert layer_out.dtype == dtype and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    got.float().square().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
