"""UniPELT (no PEFT oracle: PEFT lacks it). Its parts are fastpeft's Prefix Tuning (checked against
real peft in test_prefix_tuning.py), LoRA (test_lora.py) and bottleneck adapter (test_adapter.py);
here: the gates and the composition. The gated prefix attention against its definition (per-query
gated keys and values), identity at init (exact: gated Prefix Tuning; Prefix Tuning itself with the
gate open, a zero prefix with it closed), causality and cached decoding, placement, the gates'
arithmetic, training touches only UniPELT's parameters, bit-exact save/load in the documented layout
(tiny Llama, tiny GPT-2, the real MiniLM BERT), generate, the adapter lifecycle, the errors."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft.methods.unipelt import GATE_STASH, GatedAdapterLayer, GatedLoraLinear, attention_sites, prefix_gated_attention

ARCHS = ["llama", "gpt2"]
ALL = [*ARCHS, "bert"]
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
LAYERS = {"llama": 2, "gpt2": 2, "bert": 6}
HIDDEN = {"llama": 32, "gpt2": 32, "bert": 384}
LORA = {"llama": ["model.layers.{}.self_attn.q_proj", "model.layers.{}.self_attn.v_proj"],
        "gpt2": ["transformer.h.{}.attn.c_attn"],
        "bert": ["bert.encoder.layer.{}.attention.self.query", "bert.encoder.layer.{}.attention.self.value"]}
FFN = {"llama": "model.layers.{}.mlp.down_proj", "gpt2": "transformer.h.{}.mlp.c_proj",
       "bert": "bert.encoder.layer.{}.output.dense"}


def unipelt(make_model, arch, **kwargs):
    """`make_model` is the `pl_base_model` fixture for BERT (a SEQ_CLS head), or `make_model`."""
    config = fastpeft.UniPELTConfig(**{"task_type": TASK[arch], "num_virtual_tokens": 3, "reduction_factor": 4,
                                       "r": 4, **kwargs})
    return fastpeft.get_peft_model(make_model(arch), config).eval()


def eager(model):
    """The model on transformers' eager attention: the arithmetic the gated attention reproduces."""
    model.set_attn_implementation("eager")
    return model


def prefix_twin(make_model, arch, model, scale=1.0):
    """Prefix Tuning (on the eager attention) holding `model`'s prefix times `scale`."""
    twin = fastpeft.get_peft_model(
        eager(make_model(arch)), fastpeft.PrefixTuningConfig(task_type=TASK[arch], num_virtual_tokens=3)
    ).eval()
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.copy_(model.prompt_encoder["default"].embedding.weight * scale)
    return twin


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def set_gates(model, kind, logit):
    """Saturate every gate of one kind: its bias to `logit` (+-inf or +-1e4), the prefix gate's weight to 0."""
    with torch.no_grad():
        if kind == "prefix":
            model.prefix_gate["default"].weight.zero_()
            model.prefix_gate["default"].bias.fill_(logit)
            return
        layers = model.lora if kind == "lora" else model.bottleneck
        for _, layer in layers.adapter_layers():
            getattr(layer, f"{kind if kind == 'lora' else 'adapter'}_gate")["default"].bias.fill_(logit)


def record_gates(model):
    """{layer: [(attention input, g)]} for each call, read after fastpeft's pre-hook left g on the module."""
    seen, hooks = {}, []
    for site in attention_sites(model.base_model):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(module.layer_idx, []).append((x.detach(), module.__dict__[GATE_STASH][0].detach()))
        hooks.append(site.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, hooks


def reference_attention(q, k, v, allowed, gate, prefix, scaling):
    """The definition, one query at a time in float64: query t sees the prefix keys and values times g_t."""
    q, k, v, gate = (t.double() for t in (q, k, v, gate))
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=torch.float64)
    for t in range(q.shape[2]):
        g = gate[:, t, None, None, None]
        kt, vt = (torch.cat((g * x[:, :, :prefix], x[:, :, prefix:]), dim=2) for x in (k, v))
        scores = torch.einsum("bhd,bhsd->bhs", q[:, :, t], kt) * scaling
        probs = scores.masked_fill(~allowed[:, :, t], -math.inf).softmax(-1)
        out[:, t] = torch.einsum("bhs,bhsd->bhd", probs, vt)
    return out


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
    assert model.prefix_gate["default"].weight.shape == (2, 32) and model.prefix_gate["default"].bias.shape == (2,)
    sites = attention_sites(model.base_model)
    assert [s.layer_idx for s in sites] == [0, 1] and model.base_model.config._attn_implementation == "fastpeft_unipelt_sdpa"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"prompt_encoder.default.embedding.weight", "prefix_gate.default.weight", "prefix_gate.default.bias"}
    expected |= {f"base_model.{k}.{w}.default.{t}" for k in loras for w, ts in
                 (("lora_A", ("weight",)), ("lora_B", ("weight",)), ("lora_gate", ("weight", "bias"))) for t in ts}
    expected |= {f"base_model.{k}.adapter_{w}.default.{t}" for k in adapters for w in ("down", "up", "gate")
                 for t in ("weight", "bias")}
    assert trainable == expected


@pytest.mark.parametrize(
    "kv_heads, mask", [(4, "none"), (2, "none"), (2, "bool"), (1, "float")], ids=["mha", "gqa-causal", "gqa-bool", "mqa-float"]
)
def test_gated_attention_matches_its_definition(kv_heads, mask):
    """Each query's prefix keys and values times its own gate; GQA; a None mask is causal, bottom-right
    aligned as under a cache; boolean and additive padding masks; gradients; dropout like eager's."""
    g = torch.Generator().manual_seed(0)
    batch, heads, tokens, prefix, dim = 2, 4, 5, 3, 8
    q = torch.randn(batch, heads, tokens, dim, generator=g, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, prefix + tokens, dim, generator=g) for _ in range(2))
    gate = torch.rand(batch, tokens, generator=g)
    allowed = torch.arange(prefix + tokens) <= torch.arange(tokens)[:, None] + prefix  # causal after the prefix
    allowed = allowed.expand(batch, 1, tokens, prefix + tokens).clone()
    passed = None
    if mask != "none":
        allowed[0, :, :, prefix : prefix + 2] = False  # row 0 left-padded by 2 (the prefix stays visible)
        passed = allowed if mask == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out, probs = prefix_gated_attention(q, k, v, passed, gate, prefix, scaling=0.3, causal=True)
    expected = reference_attention(q.detach(), k, v, allowed, gate, prefix, 0.3)
    assert out.shape == (batch, tokens, heads, dim) and probs.shape == (batch, heads, tokens, prefix + tokens)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    q2 = q.detach().double().requires_grad_(True)
    reference_attention(q2, k, v, allowed, gate, prefix, 0.3).sum().backward()
    torch.testing.assert_close(q.grad.double(), q2.grad, rtol=1e-5, atol=1e-6)
    bare, _ = prefix_gated_attention(q.detach(), k, v, passed, gate, prefix, scaling=0.3, causal=False)
    assert mask != "none" or not torch.allclose(bare, out)  # no mask and not causal: every position attends
    torch.manual_seed(0)
    dropped, dropped_probs = prefix_gated_attention(q.detach(), k, v, passed, gate, prefix, 0.3, dropout=0.5,
                                                    training=True, causal=True)
    torch.manual_seed(0)
    torch.testing.assert_close(dropped_probs, torch.nn.functional.dropout(probs.detach(), 0.5, training=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_at_init_it_is_prefix_tuning_gated_per_query(arch, make_model, pl_inputs):
    """Exact: LoRA B = 0 and adapter up = 0 add exactly zero whatever their gates, so a fresh model is
    Prefix Tuning with each query's prefix gated by g_t; with the prefix gate saturated open (g = 1) it
    is Prefix Tuning with the very same prefix, and closed (g = 0) Prefix Tuning with a zero prefix."""
    inputs = pl_inputs(arch)
    model = unipelt(lambda a: eager(make_model(a)), arch)
    assert model.base_model.config._attn_implementation == "fastpeft_unipelt_eager"
    fresh = logits(model, inputs)
    for tuner in (model.lora, model.bottleneck):
        tuner.enable_adapter_layers(False)
    assert torch.equal(logits(model, inputs), fresh)
    for tuner in (model.lora, model.bottleneck):
        tuner.enable_adapter_layers(True)
    set_gates(model, "prefix", 1e4)
    opened = logits(model, inputs)
    assert torch.equal(opened, logits(prefix_twin(make_model, arch, model), inputs))
    set_gates(model, "prefix", -1e4)
    torch.testing.assert_close(logits(model, inputs), logits(prefix_twin(make_model, arch, model, 0.0), inputs),
                               rtol=0, atol=1e-6)
    assert (fresh - opened).abs().max() > 1e-3 and not torch.equal(opened, logits(make_model(arch), inputs))


@pytest.mark.parametrize("arch", ARCHS)
def test_closed_gates_switch_their_part_off_exactly(arch, make_model, pl_inputs, pl_perturb):
    """With random LoRA and adapters both act; closing a part's gates (sigmoid(-inf) = 0) removes
    exactly that part: all LoRA and adapter gates closed, prefix gate open, leaves Prefix Tuning."""
    inputs = pl_inputs(arch)
    model = unipelt(lambda a: eager(make_model(a)), arch, init_lora_weights=False, init_adapter_weights=False)
    pl_perturb(model)
    set_gates(model, "prefix", 1e4)
    twin = prefix_twin(make_model, arch, model)
    full = logits(model, inputs)
    set_gates(model, "lora", -math.inf)
    no_lora = logits(model, inputs)
    set_gates(model, "adapter", -math.inf)
    assert torch.equal(logits(model, inputs), logits(twin, inputs))
    assert (full - no_lora).abs().max() > 1e-3 and (no_lora - logits(twin, inputs)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ALL)
def test_the_prefix_gate_is_per_token_and_reads_the_attention_input(arch, pl_base_model, pl_inputs):
    """g [B, T] = sigmoid(x_t w_l + b_l) from layer l's attention input; two inputs give two gates."""
    model = unipelt(pl_base_model, arch)
    seen, hooks = record_gates(model)
    first = pl_inputs(arch)
    second = {**first, "input_ids": first["input_ids"].flip(1)}
    logits(model, first)
    logits(model, second)
    for hook in hooks:
        hook.remove()
    gate = model.prefix_gate["default"]
    assert sorted(seen) == list(range(LAYERS[arch]))
    for layer, calls in seen.items():
        assert len(calls) == 2
        for x, g in calls:
            assert g.shape == (2, 5) and g.dtype == torch.float32
            torch.testing.assert_close(g, torch.sigmoid(x @ gate.weight[layer].detach() + gate.bias[layer].detach()))
        assert (calls[0][1] - calls[1][1]).abs().max() > 1e-4
    assert all(GATE_STASH not in s.__dict__ for s in attention_sites(model.base_model))  # cleared after each call


@pytest.mark.parametrize("arch", ARCHS)
def test_the_prefix_gate_is_causal_and_exact_under_cached_decoding(arch, make_model, pl_perturb):
    """Changing later tokens leaves the earlier tokens' logits alone; feeding the rest of the sequence
    through the cache a first forward returned gives the full forward's logits."""
    model = unipelt(make_model, arch, init_lora_weights=False, init_adapter_weights=False)
    pl_perturb(model)
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 7) % 96
    full = logits(model, {"input_ids": ids})
    torch.testing.assert_close(logits(model, {"input_ids": changed})[:, :4], full[:, :4], rtol=0, atol=1e-6)
    assert (logits(model, {"input_ids": changed})[:, 4:] - full[:, 4:]).abs().max() > 1e-3
    with torch.no_grad():
        head = model(input_ids=ids[:, :4], use_cache=True)
        steps = [head.logits]
        cache = head.past_key_values  # the prefix cache, tagged with the gate, now holding 4 tokens too
        for t in range(4, 7):
            mask = torch.ones(2, 3 + t + 1, dtype=torch.long)
            out = model.base_model(input_ids=ids[:, t : t + 1], attention_mask=mask, cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_gate_arithmetic_per_token(make_model, pl_perturb):
    """The layers compute y = base(x) + sigmoid(x w + b) * change, one gate per token."""
    model = unipelt(make_model, "llama", init_lora_weights=False, init_adapter_weights=False)
    pl_perturb(model)
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


@pytest.mark.parametrize("arch", ALL)
def test_training_reduces_the_loss_and_changes_only_unipelt_parameters(arch, pl_base_model, pl_train):
    changed = pl_train(unipelt(pl_base_model, arch), arch)
    assert all(n.startswith(("prompt_encoder.default.", "prefix_gate.")) or ".lora_" in n or ".adapter_" in n
               or ".modules_to_save.default." in n for n in changed)
    for part in ("prefix_gate.default.weight", "prefix_gate.default.bias", ".lora_B.", ".lora_gate.", ".adapter_up.",
                 ".adapter_gate."):
        assert any(part in n for n in changed), part


@pytest.mark.parametrize("arch", ALL)
def test_save_load_round_trip_is_bit_exact(arch, pl_base_model, tmp_path, pl_round_trip):
    model = unipelt(pl_base_model, arch, prefix_projection=True, non_linearity="gelu", bottleneck_size=5)

    def check_saved(saved, config):
        layers, hidden = LAYERS[arch], HIDDEN[arch]
        ffn, proj = FFN[arch].format(1), LORA[arch][0].format(1)
        out_f = 3 * hidden if arch == "gpt2" else hidden
        assert saved["prompt_embeddings"].shape == (3, 2 * layers * model.active_peft_config.token_dim)
        assert saved["prefix_gate.weight"].shape == (layers, hidden) and saved["prefix_gate.bias"].shape == (layers,)
        assert saved[f"base_model.{proj}.lora_A.weight"].shape == (4, hidden)
        assert saved[f"base_model.{proj}.lora_B.weight"].shape == (out_f, 4)
        assert saved[f"base_model.{proj}.lora_gate.weight"].shape == (1, hidden)
        assert saved[f"base_model.{ffn}.adapter_down.weight"].shape == (5, hidden)
        assert saved[f"base_model.{ffn}.adapter_gate.weight"].shape == (1, hidden)
        heads = 2 if arch == "bert" else 0  # the SEQ_CLS classifier copy
        n_lora = layers * len(LORA[arch])
        assert len(saved) == 3 + 4 * n_lora + 6 * layers + heads and all(v.dtype == torch.float32 for v in saved.values())
        assert config["peft_type"] == "UNIPELT" and config["bottleneck_size"] == 5 and config["r"] == 4
        assert config["inference_mode"] is True

    pl_round_trip(model, arch, tmp_path, fastpeft.UniPELTModel, check_saved)


def test_a_checkpoint_with_the_old_scalar_prefix_gate_is_refused(make_model, tmp_path):
    """Before the input-dependent gate, `prefix_gate` was [num_layers] logits: it must not half-load."""
    unipelt(make_model, "llama").save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    state = {k: v for k, v in state.items() if not k.startswith("prefix_gate.")}
    save_file({**state, "prefix_gate": torch.zeros(2)}, tmp_path / "adapter_model.safetensors")
    base = make_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit the model: missing keys prefix_gate.bias, prefix_gate.weight; "
                                         "unexpected keys prefix_gate$"):
        fastpeft.PeftModel.from_pretrained(base, tmp_path)
    assert base.state_dict().keys() == before.keys() and all(torch.equal(base.state_dict()[k], v) for k, v in before.items())
    assert base.config._attn_implementation == "sdpa" and not any(s._forward_pre_hooks for s in attention_sites(base))


def test_a_checkpoint_that_does_not_fit_is_refused_with_the_model_unchanged(make_model, tmp_path,
                                                                             pl_check_refused_checkpoint):
    model = unipelt(make_model, "llama")
    pl_check_refused_checkpoint(unipelt(make_model, "llama"), make_model("llama"), model, tmp_path, {"r": 6},
                                "shape mismatches .*lora_A.weight: checkpoint \\(4, 32\\) vs model \\(6, 32\\)")
    assert list(model.peft_config) == ["default"] and list(model.prefix_gate) == ["default"]
    assert all(m.adapters == ["default"] for _, m in model._layers())


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_greedy_decoding_by_forward(arch, make_model, pl_perturb, pl_check_own_generate):
    """First and later steps: the prefix sits in the cache once, each step's query gates it with its own g,
    gated LoRA and adapters run at every step."""
    model = unipelt(make_model, arch, init_lora_weights=False, init_adapter_weights=False)
    pl_perturb(model)
    pl_check_own_generate(model)


def test_adapter_lifecycle(make_model, pl_inputs, pl_check_lifecycle):
    """Disable, switch, delete and unload act on the prefix, its gate, LoRA and the adapters together;
    the attention hooks and implementation go when the last adapter does (delete or unload)."""
    inputs = pl_inputs("llama")
    base = logits(make_model("llama"), inputs)
    model = unipelt(make_model, "llama", init_lora_weights=False, init_adapter_weights=False)
    # (disabled, no prefix: the gated attention runs the original sdpa, exactly)
    trainable = pl_check_lifecycle(
        model, inputs, base, fastpeft.UniPELTConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, bottleneck_size=3, r=2))
    assert {"prefix_gate.other.weight", "prefix_gate.other.bias"} <= trainable
    assert list(model.prefix_gate) == ["default"]
    sites = attention_sites(model.base_model)
    assert all(len(s._forward_pre_hooks) == len(s._forward_hooks) == 1 for s in sites)

    plain = model.unload()
    assert not any(isinstance(m, (GatedLoraLinear, GatedAdapterLayer)) for m in plain.modules())
    assert plain.config._attn_implementation == "sdpa" and not any(s._forward_pre_hooks or s._forward_hooks for s in sites)
    assert torch.equal(logits(plain, inputs), base)

    model = unipelt(make_model, "llama")
    model.delete_adapter("default")
    assert model.base_model.config._attn_implementation == "sdpa"
    assert not any(s._forward_pre_hooks for s in attention_sites(model.base_model))


def test_errors(make_model, pl_inputs, pl_check_composite_refusals):
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

    model = unipelt(make_model, "llama")  # (the error strings: "UniPELT adapters cannot be merged", "cannot add a
    # MAM adapter to a model holding UNIPELT adapters", "a UNIPELT adapter needs its own model class")
    pl_check_composite_refusals(model, "UniPELT", fastpeft.MAMConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))

    model.base_model.config._attn_implementation = "sdpa"  # switched behind the adapter's back: refused, not ungated
    with pytest.raises(RuntimeError, match="ran without fastpeft's gated prefix attention"):
        model(**pl_inputs("llama"))
    base = make_model("llama")
    base.config._attn_implementation = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="stands in for the 'eager' or 'sdpa' attention, not 'flash_attention_2'"):
        fastpeft.get_peft_model(base, fastpeft.UniPELTConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert not any(isinstance(m, (GatedLoraLinear, GatedAdapterLayer)) for m in base.modules())
    assert not any(layer.self_attn._forward_pre_hooks for layer in base.model.layers)
    with pytest.raises(ValueError, match="gated prefix attention: query"):
        prefix_gated_attention(torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), None,
                               torch.ones(1, 2), 3)
