"""QLoRA: LoRA over an NF4 base, against real peft over the same codes in bitsandbytes layers."""
import pytest
import torch

import fastpeft
from fastpeft.methods.lora import NF4LoraLinear
from fastpeft.quant.nf4 import Linear4bit

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def qlora(nf4):
    model = fastpeft.get_peft_model(nf4.llama(), fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    _randomize_lora(model)
    return model


def test_layers_are_fused_nf4_lora(qlora):
    layers = [m for m in qlora.modules() if isinstance(m, NF4LoraLinear)]
    assert len(layers) == 6 and all(isinstance(m.base_layer, Linear4bit) for m in layers)


def test_matches_real_peft_on_bnb_layers(qlora, nf4, make_inputs, run_model, tmp_path):
    inputs = make_inputs("llama")
    theirs = peft.get_peft_model(nf4.bnb_copy(nf4.base(qlora)),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
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
    fresh = peft.PeftModel.from_pretrained(nf4.bnb_copy(nf4.base(qlora)), tmp_path).train()
    torch.testing.assert_close(run_model(fresh, inputs), run_model(qlora, inputs), atol=1e-5, rtol=1e-5)


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
