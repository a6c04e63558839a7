"""Under torch.autocast(device, dtype) fastpeft's LoRA layers compute in the autocast dtype and
return what real PEFT's return (bf16 under CPU bf16 autocast), within bf16 tolerance."""
import copy

import peft
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
