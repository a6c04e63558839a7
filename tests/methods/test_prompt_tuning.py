"""Prompt Tuning against real `peft`: structure, checkpoints both ways, generate, training, init, errors."""

import warnings

import pytest
import torch

import fastpeft

peft = pytest.importorskip("peft")

ARCHS = ["llama", "gpt2", "bert"]


@pytest.mark.parametrize("arch", ARCHS)
def test_same_parameters_and_config_as_peft(arch, pl_twins):
    ours, theirs = pl_twins(arch, "PromptTuningConfig")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    mine, ref = ours.active_peft_config, theirs.active_peft_config
    for field in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
        assert getattr(mine, field) == getattr(ref, field), field
    assert type(ours).__name__.endswith(type(theirs).__name__.removeprefix("PeftModel"))


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoints_load_both_ways(arch, pl_twins, pl_check_checkpoints, tmp_path):
    ours, theirs = pl_twins(arch, "PromptTuningConfig")
    pl_check_checkpoints(ours, theirs, arch, tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_matches_greedy_peft_forward(arch, pl_twins, pl_check_generate):
    ours, theirs = pl_twins(arch, "PromptTuningConfig", num_virtual_tokens=4)
    pl_check_generate(ours, theirs, arch)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_training_step_matches_peft_and_touches_only_the_prompt(arch, pl_twins, pl_check_training_step):
    ours, theirs = pl_twins(arch, "PromptTuningConfig")
    pl_check_training_step(ours, theirs, arch)


def test_labels_and_token_types_extended_like_peft(pl_twins, pl_inputs):
    ours, theirs = pl_twins("bert", "PromptTuningConfig")
    batch = pl_inputs("bert")
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-5)
    ours_lm, theirs_lm = pl_twins("gpt2", "PromptTuningConfig")
    batch = pl_inputs("gpt2")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        torch.testing.assert_close(ours_lm(**batch, labels=labels).loss, theirs_lm(**batch, labels=labels).loss)


def _word_level_tokenizer(directory, vocab_size=96):
    """A tiny tokenizer for the tiny models: word i<n> is token n."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"i{n}": n for n in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_text_init_matches_peft(arch, pl_base_model, pl_minilm_path, tmp_path):
    if arch == "bert":
        kwargs = dict(task_type="SEQ_CLS", num_virtual_tokens=6, tokenizer_name_or_path=pl_minilm_path,
                      prompt_tuning_init_text="classify the review:")  # [CLS] + 4 words + [SEP]
    else:
        kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, tokenizer_name_or_path=_word_level_tokenizer(tmp_path),
                      prompt_tuning_init_text="i5 i17 i90")
    kwargs["prompt_tuning_init"] = "TEXT"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(pl_base_model(arch), peft.PromptTuningConfig(**kwargs))
    ours = fastpeft.get_peft_model(pl_base_model(arch), fastpeft.PromptTuningConfig(**kwargs))
    weight = ours.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(weight, theirs.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    assert weight.dtype == torch.float32 and weight.requires_grad


def test_sample_vocab_init_matches_peft(pl_base_model):
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB")
    torch.manual_seed(11)
    theirs = peft.get_peft_model(pl_base_model("llama"), peft.PromptTuningConfig(**kwargs))
    torch.manual_seed(11)
    ours = fastpeft.get_peft_model(pl_base_model("llama"), fastpeft.PromptTuningConfig(**kwargs))
    torch.testing.assert_close(
        ours.prompt_encoder["default"].embedding.weight, theirs.prompt_encoder["default"].embedding.weight
    )


def test_adapters_switch_disable_and_delete(pl_twins, pl_base_model, pl_inputs, tmp_path):
    a_ours, a = pl_twins("gpt2", "PromptTuningConfig")
    _, b = pl_twins("gpt2", "PromptTuningConfig", num_virtual_tokens=5)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    ours = fastpeft.PeftModel.from_pretrained(pl_base_model("gpt2"), tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    batch = pl_inputs("gpt2")
    with torch.no_grad():
        assert ours.active_adapter == "a"
        torch.testing.assert_close(ours(**batch).logits, a(**batch).logits, rtol=1e-5, atol=1e-5)
        ours.set_adapter("b")
        torch.testing.assert_close(ours(**batch).logits, b(**batch).logits, rtol=1e-5, atol=1e-5)
        with ours.disable_adapter():
            torch.testing.assert_close(ours(**batch).logits, pl_base_model("gpt2")(**batch).logits)
    ours.delete_adapter("b")
    assert ours.active_adapter == "a" and list(ours.prompt_encoder) == ["a"]
    with pytest.raises(ValueError, match="nothing to merge"):
        ours.merge_and_unload()


def test_bad_input_is_refused_with_the_numbers(pl_base_model, pl_minilm_path, tmp_path):
    with pytest.raises(ValueError, match="tokenizes to 6 tokens .* num_virtual_tokens=4"):
        fastpeft.get_peft_model(pl_base_model("bert"), fastpeft.PromptTuningConfig(
            task_type="SEQ_CLS", num_virtual_tokens=4, prompt_tuning_init="TEXT",
            prompt_tuning_init_text="classify the review:", tokenizer_name_or_path=pl_minilm_path))
    model = fastpeft.get_peft_model(pl_base_model("llama"), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    ids = torch.ones(1, 57, dtype=torch.long)  # 57 + 8 > 64 positions
    with pytest.raises(ValueError, match="57 tokens \\+ 8 virtual tokens = 65 exceeds the model's position limit of 64"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="position limit of 64"):
        model.generate(input_ids=ids, max_new_tokens=1)
    with pytest.raises(ValueError, match="token_dim=48 does not match the model's hidden size 32"):
        fastpeft.get_peft_model(pl_base_model("gpt2"), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=48))
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer, got 0"):
        fastpeft.PromptTuningConfig(num_virtual_tokens=0)
    peft.get_peft_model(pl_base_model("gpt2"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)).save_pretrained(tmp_path)
    llama = pl_base_model("llama")
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(ValueError, match="token_dim"):  # gpt2's prompt is 32 wide too: the config names it
        fastpeft.PeftModel.from_pretrained(llama, tmp_path, config=fastpeft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=16))
    with pytest.raises(ValueError, match="trainable"):
        fastpeft.PeftModel.from_pretrained(llama, tmp_path, is_trainable=True)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())
    assert not any(n.startswith("prompt_encoder") for n, _ in llama.named_parameters())


def test_mixed_task_batch_equals_per_task_runs(pl_base_model, pl_inputs, pl_check_mixed_batch, tmp_path):
    """Beyond PEFT: prompt-tuning and P-tuning adapters (same num_virtual_tokens) in one batch."""
    model = fastpeft.get_peft_model(pl_base_model("llama"), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.add_adapter("p", fastpeft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8))
    model.save_pretrained(tmp_path)
    model.add_adapter("frozen", fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.delete_adapter("frozen")
    model.load_adapter(tmp_path / "p", adapter_name="frozen")  # a loaded (inference-mode) table mixes too
    batch = {k: v.repeat(2, 1) for k, v in pl_inputs("llama").items()}
    pl_check_mixed_batch(model.eval(), ["default", "p", "frozen", "default"], batch)
    model.add_adapter("long", fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with pytest.raises(ValueError, match="one num_virtual_tokens for all its adapters, got \\{'default': 3, 'long': 5\\}"):
        model(**pl_inputs("llama"), adapter_names=["default", "long"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries for a batch of 2 rows"):
        model(**pl_inputs("llama"), adapter_names=["default"] * 3)
    with pytest.raises(ValueError, match="'__base__' in adapter_names not found"):
        model(**pl_inputs("llama"), adapter_names=["default", "__base__"])
