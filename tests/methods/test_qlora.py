"""QLoRA: LoRA over an NF4 base, against real peft over the same codes in bitsandbytes layers."""
import copy

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.methods.lora import NF4LoraLinear
from fastpeft.quant.nf4 import Linear4bit, NF4Config, quantize_model

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "v_proj", "down_proj"]
# blocksize 32: with the tiny llama's K = 32, blocksize 64 hits bnb 0.50's CPU dequantize bug
# (tests/quant/test_nf4.py::test_bnb_cpu_dequantize_bug_is_theirs).
CONFIG = NF4Config(blocksize=32, double_quant=True, compute_dtype=torch.float32)


def _bnb_copy(quantized: nn.Module) -> nn.Module:
    """The same model with each fastpeft Linear4bit replaced by a bnb Linear4bit loaded from its
    state dict (the very same codes and statistics), as transformers loads a prequantized model."""
    model = copy.deepcopy(quantized)
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            sd = module.state_dict()
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
            stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
            layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
            if module.bias is not None:
                layer.bias = nn.Parameter(sd["bias"])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    return model


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def qlora(make_model):
    base = quantize_model(make_model("llama"), CONFIG)
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    _randomize_lora(model)
    return model


def test_layers_are_fused_nf4_lora(qlora):
    layers = [m for m in qlora.modules() if isinstance(m, NF4LoraLinear)]
    assert len(layers) == 6 and all(isinstance(m.base_layer, Linear4bit) for m in layers)


def test_matches_real_peft_on_bnb_layers(qlora, make_inputs, run_model, tmp_path):
    inputs = make_inputs("llama")
    bnb_base = _bnb_copy(qlora.base_model.model)  # still has our LoRA layers: unwrap them
    for name, module in list(bnb_base.named_modules()):
        if isinstance(module, NF4LoraLinear):
            parent, _, child = name.rpartition(".")
            setattr(bnb_base.get_submodule(parent), child, module.base_layer)
    theirs = peft.get_peft_model(bnb_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    # peft 0.21 on a CPU wraps bnb's Linear4bit in its generic lora.Linear (base_layer(x) + LoRA,
    # the same forward as its bnb layer); what matters is that the base layers are bnb's
    wrapped = [m.base_layer for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(wrapped) == 6 and all(isinstance(b, bnb.nn.Linear4bit) for b in wrapped)
    assert qlora.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()  # 4-bit weights count
    ours_sd = {k: v for k, v in qlora.state_dict().items() if "lora_" in k}
    missing = theirs.load_state_dict(ours_sd, strict=False)
    assert not missing.unexpected_keys
    theirs.train()  # bnb's exact CPU path (eval repacks to a bf16 GEMV); no dropout anywhere
    torch.testing.assert_close(run_model(qlora, inputs), run_model(theirs, inputs), atol=1e-5, rtol=1e-5)

    # a PEFT-format adapter written here loads in real peft on the bnb-quantized base
    qlora.save_pretrained(tmp_path)
    fresh = peft.PeftModel.from_pretrained(_bnb_copy(quantize_model_base(qlora)), tmp_path).train()
    torch.testing.assert_close(run_model(fresh, inputs), run_model(qlora, inputs), atol=1e-5, rtol=1e-5)


def quantize_model_base(qlora):
    """The NF4 base alone (adapter layers unwrapped), a deep copy."""
    model = copy.deepcopy(qlora.base_model.model)
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4LoraLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base_layer)
    return model


def test_training_step_changes_only_adapters(qlora, make_inputs):
    qlora.train()
    before = {k: v.clone() for k, v in qlora.state_dict().items()}
    trainable = {n for n, p in qlora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    inputs = make_inputs("llama")
    opt = torch.optim.SGD([p for p in qlora.parameters() if p.requires_grad], lr=0.1)
    loss = qlora(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    opt.step()
    after = qlora.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert {k for k in changed} >= {k for k in after if "lora_B" in k}


def test_merge_and_unload_requantizes_and_reports_the_error(qlora, make_inputs, run_model):
    inputs = make_inputs("llama")
    with torch.no_grad():
        want = run_model(qlora, inputs)
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = qlora.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, Linear4bit)
    got = run_model(merged, inputs)
    # the merged weights are re-quantized: close to the adapter's output, not equal
    assert 0 < (got - want).abs().max() < 0.2


# DoRA and AdaLoRA over an NF4 base: tests/methods/test_qlora_variants.py


def test_generate_equals_greedy_decoding_by_full_forwards(qlora):
    """QLoRA generates: the cached decode path (M=1 steps through the NF4 decode kernel on a GPU)
    gives the tokens that re-running the whole sequence picks greedily."""
    qlora.eval()
    ids = torch.randint(1, 96, (1, 4), generator=torch.Generator().manual_seed(4))
    tokens = qlora.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = ids
    with torch.no_grad():
        for _ in range(5):
            nxt = qlora(input_ids=expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], dim=1)
    assert torch.equal(tokens, expected)
