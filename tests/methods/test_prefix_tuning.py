"""Prefix Tuning and P-Tuning v2 against real `peft`: GQA layout, checkpoints, generate, training, errors."""

import pytest
import torch

import fastpeft

peft = pytest.importorskip("peft")

CASES = [(arch, proj) for arch in ("llama", "gpt2") for proj in (False, True)]
IDS = [f"{arch}-{'projection' if proj else 'v2'}" for arch, proj in CASES]


@pytest.mark.parametrize(("arch", "projection"), CASES, ids=IDS)
def test_same_parameters_and_layout_as_peft(arch, projection, pl_twins):
    ours, theirs = pl_twins(arch, "PrefixTuningConfig", prefix_projection=projection)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    mine, ref = ours.active_peft_config, theirs.active_peft_config
    for field in ("token_dim", "num_layers", "num_attention_heads", "encoder_hidden_size"):
        assert getattr(mine, field) == getattr(ref, field), field
    if arch == "llama":  # GQA: the prefix holds the 2 key-value heads of head_dim 8, not the 4 query heads
        assert (mine.token_dim, mine.num_attention_heads) == (16, 2)


@pytest.mark.parametrize(("arch", "projection"), CASES, ids=IDS)
def test_checkpoints_load_both_ways(arch, projection, pl_twins, pl_check_checkpoints, tmp_path):
    ours, theirs = pl_twins(arch, "PrefixTuningConfig", prefix_projection=projection)
    loaded = pl_check_checkpoints(ours, theirs, arch, tmp_path)
    # the checkpoint holds the flat prefix [P, layers * 2 * token_dim]: a loaded adapter has no MLP
    assert [n for n, _ in loaded.prompt_encoder.named_parameters()] == ["default.embedding.weight"]


@pytest.mark.parametrize(("arch", "projection"), CASES, ids=IDS)
def test_generate_matches_greedy_peft_forward(arch, projection, pl_twins, pl_check_generate):
    ours, theirs = pl_twins(arch, "PrefixTuningConfig", prefix_projection=projection)
    pl_check_generate(ours, theirs, arch)


def test_generate_keeps_the_prefix_in_the_cache_once(pl_twins):
    ours, _ = pl_twins("llama", "PrefixTuningConfig")
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    calls = []
    handle = ours.prompt_encoder["default"].register_forward_hook(lambda *a: calls.append(1))
    out = ours.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
                        return_dict_in_generate=True)
    handle.remove()
    assert len(calls) == 1, "the prefix is built once per generate call, not per decode step"
    assert out.cache.get_seq_length() == 3 + 5 + 4 - 1  # prefix + prompt + new tokens (the last is not fed)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_step_matches_peft_and_touches_only_the_prefix(arch, pl_twins, pl_check_training_step):
    ours, theirs = pl_twins(arch, "PrefixTuningConfig", prefix_projection=True)
    pl_check_training_step(ours, theirs, arch)


def test_p_tuning_v2_is_prefix_tuning_without_projection(pl_twins, pl_check_training_step):
    """P-Tuning v2 (deep prompt tuning): one learned key and value prefix per layer, nothing else."""
    config = fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)  # prefix_projection=False
    ours, theirs = pl_twins("llama", "PrefixTuningConfig", num_virtual_tokens=4)
    assert config.prefix_projection is False
    params = dict(ours.prompt_encoder.named_parameters())
    assert list(params) == ["default.embedding.weight"]
    assert params["default.embedding.weight"].shape == (4, 2 * 2 * 16)  # layers * (key, value) * kv_heads * head_dim
    cache = ours.get_prompt(batch_size=2)
    key, value = cache.layers[1].keys, cache.layers[1].values
    assert key.shape == value.shape == (2, 2, 4, 8)  # [batch, kv_heads, virtual tokens, head_dim]
    flat = params["default.embedding.weight"].view(4, 4, 2, 8)  # [P, layers*2, kv_heads, head_dim]
    torch.testing.assert_close(key[0], flat[:, 2].transpose(0, 1))
    torch.testing.assert_close(value[0], flat[:, 3].transpose(0, 1))
    pl_check_training_step(ours, theirs, "llama")


def test_zero_init_and_position_ids_like_peft(pl_twins, pl_inputs):
    ours, theirs = pl_twins("gpt2", "PrefixTuningConfig")
    batch = pl_inputs("gpt2", pad=False)
    batch["position_ids"] = torch.arange(5).expand(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-5)
    zero = fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, init_weights="zero", prefix_projection=True)
    model = fastpeft.get_peft_model(ours.get_base_model().__class__(ours.get_base_model().config), zero)
    assert not model.prompt_encoder["default"](torch.arange(2)[None]).any()


def test_checkpoint_for_another_layout_is_refused_with_the_numbers(make_model, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    peft.get_peft_model(make_model("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(tmp_path)

    def llama(**kw):
        cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw}))

    three_layers = llama(num_hidden_layers=3)
    with pytest.raises(ValueError, match="num_layers=2, 2 key-value heads, token_dim=16; the model has 3 layers"):
        fastpeft.PeftModel.from_pretrained(three_layers, tmp_path)
    mha = llama(num_key_value_heads=4)
    with pytest.raises(ValueError, match="the model has 2 layers, 4 key-value heads of head_dim 8 \\(token_dim 32\\)"):
        fastpeft.PeftModel.from_pretrained(mha, tmp_path)
    assert not any(n.startswith("prompt_encoder") for n, _ in mha.named_parameters())
    model = fastpeft.get_peft_model(make_model("gpt2"), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=30))
    with pytest.raises(ValueError, match="40 tokens \\+ 30 virtual tokens = 70 exceeds the model's position limit of 64"):
        model(input_ids=torch.ones(1, 40, dtype=torch.long))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_task_batch_equals_per_task_runs(arch, pl_base_model, pl_inputs, pl_check_mixed_batch):
    """Beyond PEFT: rows with different prefixes (same num_virtual_tokens) in one forward and generate."""
    model = fastpeft.get_peft_model(pl_base_model(arch), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.add_adapter("proj", fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True))
    names = ["proj", "default", "default", "proj"]
    pl_check_mixed_batch(model.eval(), names, {k: v.repeat(2, 1) for k, v in pl_inputs(arch).items()})
    model.add_adapter("prompt", fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="cannot mix prefix and embedding prompts"):
        model(**pl_inputs(arch), adapter_names=["default", "prompt"])


@pytest.mark.parametrize("projection", [False, True], ids=["v2", "projection"])
def test_bert_classifier_prefix_trains_saves_and_reloads(projection, pl_base_model, pl_inputs, tmp_path):
    """BERT has no peft oracle for prefix tuning under transformers 5.x (peft raises "Model does not
    support past key values"), so this checks what can be checked without one: the prefix reaches
    every layer's attention (outputs move, gradients arrive), only the prefix and the head train,
    and a saved adapter reloads to identical logits."""
    config = fastpeft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3, prefix_projection=projection)
    model = fastpeft.get_peft_model(pl_base_model("bert"), config)
    inputs = pl_inputs("bert")
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        base = pl_base_model("bert")(**inputs).logits
        before = model.eval()(**inputs).logits
    assert torch.isfinite(before).all() and not torch.allclose(before, base, atol=1e-4)

    model.train()
    model(**inputs, labels=torch.tensor([0, 2])).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("prompt_encoder.") or ".modules_to_save." in n for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("prompt_encoder."))

    model.eval().save_pretrained(tmp_path)
    loaded = fastpeft.PeftModel.from_pretrained(pl_base_model("bert"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, before, rtol=0, atol=1e-6)
