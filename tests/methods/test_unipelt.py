"""UniPELT (no PEFT oracle: PEFT lacks it). Its parts are fastpeft's Prefix Tuning (checked against
real peft in test_prefix_tuning.py), LoRA (test_lora.py) and bottleneck adapter (test_adapter.py);
here: the gates and the composition. Placement, identity at init (exact: Prefix Tuning with the
prefix values halved), the gates' arithmetic, training touches only UniPELT's parameters,
bit-exact save/load in the documented layout, generate, the adapter lifecycle, the errors."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.unipelt import GatedAdapterLayer, GatedLoraLinear

ARCHS = ["llama", "gpt2"]
LORA = {"llama": ["model.layers.{}.self_attn.q_proj", "model.layers.{}.self_attn.v_proj"],
        "gpt2": ["transformer.h.{}.attn.c_attn"]}
FFN = {"llama": "model.layers.{}.mlp.down_proj", "gpt2": "transformer.h.{}.mlp.c_proj"}


def unipelt(make_model, arch, **kwargs):
    config = fastpeft.UniPELTConfig(**{"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "reduction_factor": 4,
                                       "r": 4, **kwargs})
    return fastpeft.get_peft_model(make_model(arch), config).eval()


def prefix_twin(make_model, arch, model, value_scale):
    """Prefix Tuning holding `model`'s prefix with every layer's values times `value_scale`."""
    twin = fastpeft.get_peft_model(
        make_model(arch), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    ).eval()
    config = model.active_peft_config
    flat = model.prompt_encoder["default"].embedding.weight.detach()
    kv = flat.view(3, 2 * config.num_layers, config.token_dim).clone()
    kv[:, 1::2] *= value_scale
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.copy_(kv.view(3, -1))
    return twin


def perturb(model, seed=0):
    """Random values in every trainable tensor (zero B / up-projections would hide LoRA and the adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def set_gates(model, kind, logit):
    """Saturate every gate of one kind: the bias (LoRA, adapter) or the logit (prefix) to +-inf."""
    with torch.no_grad():
        if kind == "prefix":
            model.prefix_gate["default"].weight.fill_(logit)
            return
        layers = model.lora if kind == "lora" else model.bottleneck
        for _, layer in layers.adapter_layers():
            getattr(layer, f"{kind if kind == 'lora' else 'adapter'}_gate")["default"].bias.fill_(logit)


@pytest.mark.parametrize("arch", ARCHS)
def test_placement_and_trainable_parameters(arch, make_model):
    model = unipelt(make_model, arch)
    loras = dict(model.lora.adapter_layers())
    assert set(loras) == {p.format(i) for p in LORA[arch] for i in range(2)}
    assert all(isinstance(m, GatedLoraLinear) for m in loras.values())
    adapters = dict(model.bottleneck.adapter_layers())
    assert set(adapters) == {FFN[arch].format(i) for i in range(2)}
    assert all(isinstance(m, GatedAdapterLayer) and m.mode == "serial" for m in adapters.values())
    first = loras[LORA[arch][0].format(0)]
    assert first.lora_A["default"].weight.shape == (4, 32) and first.lora_gate["default"].weight.shape == (1, 32)
    assert adapters[FFN[arch].format(0)].adapter_gate["default"].weight.shape == (1, 32)
    assert model.prefix_gate["default"].weight.shape == (2,)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"prompt_encoder.default.embedding.weight", "prefix_gate.default.weight"}
    expected |= {f"base_model.{k}.{w}.default.{t}" for k in loras for w, ts in
                 (("lora_A", ("weight",)), ("lora_B", ("weight",)), ("lora_gate", ("weight", "bias"))) for t in ts}
    expected |= {f"base_model.{k}.adapter_{w}.default.{t}" for k in adapters for w in ("down", "up", "gate")
                 for t in ("weight", "bias")}
    assert trainable == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_at_init_it_is_prefix_tuning_with_gated_values(arch, make_model, pl_inputs):
    """Exact: LoRA B = 0 and adapter up = 0 add exactly zero whatever their gates, so a fresh model is
    Prefix Tuning with each layer's prefix values times sigmoid(0) = 1/2, and with the prefix
    gate saturated open it is Prefix Tuning with the very same prefix."""
    inputs = pl_inputs(arch)
    model = unipelt(make_model, arch)
    assert torch.equal(logits(model, inputs), logits(prefix_twin(make_model, arch, model, 0.5), inputs))
    set_gates(model, "prefix", math.inf)
    assert torch.equal(logits(model, inputs), logits(prefix_twin(make_model, arch, model, 1.0), inputs))
    assert not torch.equal(logits(model, inputs), logits(make_model(arch), inputs))  # the prefix does act


@pytest.mark.parametrize("arch", ARCHS)
def test_closed_gates_switch_their_part_off_exactly(arch, make_model, pl_inputs):
    """With random LoRA and adapters both act; closing a part's gates (sigmoid(-inf) = 0) removes
    exactly that part: all LoRA and adapter gates closed leaves gated Prefix Tuning."""
    inputs = pl_inputs(arch)
    model = unipelt(make_model, arch, init_lora_weights=False, init_adapter_weights=False)
    perturb(model)
    twin = prefix_twin(make_model, arch, model, torch.sigmoid(model.prefix_gate["default"].weight.detach())[:, None])
    full = logits(model, inputs)
    set_gates(model, "lora", -math.inf)
    no_lora = logits(model, inputs)
    set_gates(model, "adapter", -math.inf)
    assert torch.equal(logits(model, inputs), logits(twin, inputs))
    assert (full - no_lora).abs().max() > 1e-3 and (no_lora - logits(twin, inputs)).abs().max() > 1e-3


def test_gate_arithmetic_per_token(make_model):
    """The layers compute y = base(x) + sigmoid(x w + b) * change, one gate per token."""
    model = unipelt(make_model, "llama", init_lora_weights=False, init_adapter_weights=False)
    perturb(model)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    lora = dict(model.lora.adapter_layers())["model.layers.0.self_attn.q_proj"]
    gate = torch.sigmoid(x @ lora.lora_gate["default"].weight.T + lora.lora_gate["default"].bias)
    assert gate.shape == (2, 3, 1) and gate.std() > 0
    low_rank = x @ lora.lora_A["default"].weight.T @ lora.lora_B["default"].weight.T * lora.scaling["default"]
    with torch.no_grad():
        torch.testing.assert_close(lora(x), lora.base_layer(x) + gate * low_rank)
    adapter = dict(model.bottleneck.adapter_layers())["model.layers.0.mlp.down_proj"]
    h = torch.randn(2, 3, 56, generator=torch.Generator().manual_seed(2))
    out = adapter.base_layer(h)
    down, up, g = (getattr(adapter, f"adapter_{n}")["default"] for n in ("down", "up", "gate"))
    with torch.no_grad():
        expected = out + torch.sigmoid(g(out)) * up(torch.relu(down(out)))
        torch.testing.assert_close(adapter(h), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_reduces_the_loss_and_changes_only_unipelt_parameters(arch, make_model, pl_inputs):
    model = unipelt(make_model, arch).train()
    inputs = pl_inputs(arch, pad=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=3e-2)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        graded = {n for n, p in model.named_parameters() if p.grad is not None}
        assert graded == {n for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert all(n.startswith(("prompt_encoder.default.", "prefix_gate.")) or ".lora_" in n or ".adapter_" in n
               for n in changed)
    for part in ("prefix_gate", ".lora_B.", ".lora_gate.", ".adapter_up.", ".adapter_gate."):
        assert any(part in n for n in changed), part


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_bit_exact(arch, make_model, pl_inputs, tmp_path):
    model = unipelt(make_model, arch, prefix_projection=True, non_linearity="gelu", bottleneck_size=5)
    perturb(model)
    inputs = pl_inputs(arch)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    ffn, proj = FFN[arch].format(1), LORA[arch][0].format(1)
    out_f = 96 if arch == "gpt2" else 32
    assert saved["prompt_embeddings"].shape == (3, 2 * 2 * model.active_peft_config.token_dim)
    assert saved["prefix_gate"].shape == (2,)
    assert saved[f"base_model.{proj}.lora_A.weight"].shape == (4, 32)
    assert saved[f"base_model.{proj}.lora_B.weight"].shape == (out_f, 4)
    assert saved[f"base_model.{proj}.lora_gate.weight"].shape == (1, 32)
    assert saved[f"base_model.{ffn}.adapter_down.weight"].shape == (5, 32)
    assert saved[f"base_model.{ffn}.adapter_gate.weight"].shape == (1, 32)
    n_lora = 2 * len(LORA[arch])
    assert len(saved) == 2 + 4 * n_lora + 6 * 2 and all(v.dtype == torch.float32 for v in saved.values())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "UNIPELT" and config["bottleneck_size"] == 5 and config["r"] == 4
    assert config["inference_mode"] is True

    loaded = fastpeft.PeftModel.from_pretrained(make_model(arch), tmp_path)
    assert isinstance(loaded, fastpeft.UniPELTModel) and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(logits(loaded, inputs), expected)
    again = loaded._adapter_state_dict("default")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)

    model.load_adapter(tmp_path, adapter_name="copy")  # a second adapter, switched to by name
    model.set_adapter("copy")
    assert torch.equal(logits(model, inputs), expected)


def test_a_checkpoint_that_does_not_fit_is_refused_with_the_model_unchanged(make_model, tmp_path):
    unipelt(make_model, "llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 6}))
    base = make_model("llama")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="shape mismatches .*lora_A.weight: checkpoint \\(4, 32\\) vs model \\(6, 32\\)"):
        fastpeft.PeftModel.from_pretrained(base, tmp_path)
    assert base.state_dict().keys() == state.keys() and all(torch.equal(base.state_dict()[k], v) for k, v in state.items())
    model = unipelt(make_model, "llama")
    with pytest.raises(ValueError, match="does not fit"):
        model.load_adapter(tmp_path, adapter_name="bad")
    assert list(model.peft_config) == ["default"] and list(model.prefix_gate) == ["default"]
    assert all(m.adapters == ["default"] for _, m in model._layers())


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_greedy_decoding_by_forward(arch, make_model, pl_greedy_by_forward):
    """First and later steps: the gated prefix sits in the cache once, gated LoRA and adapters run at every step."""
    model = unipelt(make_model, arch, init_lora_weights=False, init_adapter_weights=False)
    perturb(model)
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(7))
    expected, step_logits = pl_greedy_by_forward(model, ids, 4)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    for step, (score, ref) in enumerate(zip(out.scores, step_logits)):
        torch.testing.assert_close(score, ref, rtol=1e-4, atol=1e-5, msg=f"step {step}")


def test_adapter_lifecycle(make_model, pl_inputs):
    """Disable, switch, delete and unload act on the prefix, its gate, LoRA and the adapters together."""
    inputs = pl_inputs("llama")
    base = logits(make_model("llama"), inputs)
    model = unipelt(make_model, "llama", init_lora_weights=False, init_adapter_weights=False)
    perturb(model)
    default = logits(model, inputs)
    with model.disable_adapter():
        assert torch.equal(logits(model, inputs), base)
    assert torch.equal(logits(model, inputs), default)

    model.add_adapter("other", fastpeft.UniPELTConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, bottleneck_size=3, r=2))
    assert model.active_adapter == "default"
    model.set_adapter("other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    assert "prefix_gate.other.weight" in trainable
    model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.prefix_gate) == ["default"]
    assert torch.equal(logits(model, inputs), default)

    plain = model.unload()
    assert not any(isinstance(m, (GatedLoraLinear, GatedAdapterLayer)) for m in plain.modules())
    assert torch.equal(logits(plain, inputs), base)


def test_errors(make_model, pl_inputs):
    with pytest.raises(ValueError, match="UniPELTConfig needs its prefix part"):
        fastpeft.UniPELTConfig()
    with pytest.raises(ValueError, match="`r` should be a positive integer value but the value passed is 0"):
        fastpeft.UniPELTConfig(num_virtual_tokens=2, r=0)
    with pytest.raises(ValueError, match="bottleneck_size must be a positive integer, got 0"):
        fastpeft.UniPELTConfig(num_virtual_tokens=2, bottleneck_size=0)
    with pytest.raises(ValueError, match="non_linearity must be one of"):
        fastpeft.UniPELTConfig(num_virtual_tokens=2, non_linearity="swish")
    base = make_model("llama")
    for bad, message in (({"reduction_factor": 64}, "reduction_factor=64 leaves a zero-width bottleneck for hidden size 32"),
                         ({"target_modules": ["nope"]}, "nope")):
        with pytest.raises(ValueError, match=message):
            fastpeft.get_peft_model(base, fastpeft.UniPELTConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, **bad))
        assert not any(isinstance(m, (GatedLoraLinear, GatedAdapterLayer)) for m in base.modules())

    model = unipelt(make_model, "llama")
    for call in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="UniPELT adapters cannot be merged"):
            call()
    with pytest.raises(NotImplementedError, match="mixed-adapter batches"):
        model(**pl_inputs("llama"), adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="cannot add a MAM adapter to a model holding UNIPELT adapters"):
        model.add_adapter("m", fastpeft.MAMConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="reduction_factor=64 leaves a zero-width bottleneck"):
        model.add_adapter("z", fastpeft.UniPELTConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, reduction_factor=64))
    assert list(model.peft_config) == ["default"] and list(model.prompt_encoder) == ["default"]
    assert all(m.adapters == ["default"] for _, m in model._layers())
    prefix = fastpeft.get_peft_model(make_model("llama"), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="a UNIPELT adapter needs its own model class"):
        prefix.add_adapter("u", fastpeft.UniPELTConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
