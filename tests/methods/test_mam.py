"""MAM Adapter (no PEFT oracle: PEFT lacks it). Its two parts are fastpeft's Prefix Tuning (checked
against real peft in test_prefix_tuning.py) and parallel bottleneck adapter (test_adapter.py);
here: the composition. Placement, identity-but-for-the-prefix at init (exact), training touches
only the prefix and the adapters, bit-exact save/load in the documented layout (tiny Llama, tiny
GPT-2, and the real MiniLM BERT as a SEQ_CLS classifier), generate, the adapter lifecycle, and the
errors the issue asks for."""

import pytest
import torch

import fastpeft
from fastpeft.methods.adapter import BottleneckAdapterLayer

ARCHS = ["llama", "gpt2"]
ALL = [*ARCHS, "bert"]
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
LAYERS = {"llama": 2, "gpt2": 2, "bert": 6}
HIDDEN = {"llama": 32, "gpt2": 32, "bert": 384}
# BERT: BertOutput(h, x) = LayerNorm(dropout(dense(h)) + x); the adapter joins its residual input x
FFN = {"llama": "model.layers.{}.mlp", "gpt2": "transformer.h.{}.mlp", "bert": "bert.encoder.layer.{}.output"}
MODE = {"llama": "parallel", "gpt2": "parallel", "bert": "parallel_residual"}
HEAD = {"bert": {"base_model.classifier.modules_to_save.default.weight", "base_model.classifier.modules_to_save.default.bias"}}


def mam(make_model, arch, **kwargs):
    """`make_model` is the `pl_base_model` fixture for BERT (a SEQ_CLS head), or `make_model`."""
    config = fastpeft.MAMConfig(**{"task_type": TASK[arch], "num_virtual_tokens": 3, "reduction_factor": 4, **kwargs})
    return fastpeft.get_peft_model(make_model(arch), config).eval()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch", ALL)
def test_placement_and_trainable_parameters(arch, pl_base_model):
    model = mam(pl_base_model, arch, scaling=2.5)
    layers = dict(model.bottleneck.adapter_layers())
    assert set(layers) == {FFN[arch].format(i) for i in range(LAYERS[arch])}
    assert all(isinstance(m, BottleneckAdapterLayer) and m.mode == MODE[arch] for m in layers.values())
    assert {m.scaling["default"] for m in layers.values()} == {2.5}
    hidden = HIDDEN[arch]
    assert layers[FFN[arch].format(0)].adapter_down["default"].weight.shape == (hidden // 4, hidden)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {f"base_model.{FFN[arch].format(i)}.adapter_{w}.default.{t}" for i in range(LAYERS[arch])
               for w in ("down", "up") for t in ("weight", "bias")}
    assert trainable == adapter | {"prompt_encoder.default.embedding.weight"} | HEAD.get(arch, set())
    assert fastpeft.MAMConfig(num_virtual_tokens=2).scaling == 4.0  # He et al.'s parallel adapter scaling


@pytest.mark.parametrize("arch", ALL)
def test_at_init_only_the_prefix_acts(arch, pl_base_model, pl_inputs):
    """Exact: a fresh MAM model == Prefix Tuning with the same prefix (the adapter adds exactly 0),
    and once the adapter is non-zero the two differ."""
    inputs = pl_inputs(arch)
    model = mam(pl_base_model, arch, prefix_projection=True)
    prefix = fastpeft.get_peft_model(
        pl_base_model(arch), fastpeft.PrefixTuningConfig(task_type=TASK[arch], num_virtual_tokens=3, prefix_projection=True)
    ).eval()
    prefix.prompt_encoder.load_state_dict(model.prompt_encoder.state_dict())
    assert torch.equal(logits(model, inputs), logits(prefix, inputs))
    assert not torch.equal(logits(prefix, inputs), logits(pl_base_model(arch), inputs))  # the prefix does act
    with torch.no_grad():
        for _, layer in model.bottleneck.adapter_layers():
            bias = layer.adapter_up["default"].bias  # not constant: LayerNorm would remove a constant shift
            bias.copy_(torch.linspace(-0.5, 0.5, bias.numel()))
    assert (logits(model, inputs) - logits(prefix, inputs)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ALL)
def test_training_reduces_the_loss_and_changes_only_prefix_and_adapters(arch, pl_base_model, pl_train):
    """(and BERT's SEQ_CLS head copy, which PEFT trains and saves with every prompt-learning classifier)"""
    changed = pl_train(mam(pl_base_model, arch), arch)
    assert changed and all(n.startswith("prompt_encoder.default.") or ".adapter_" in n or n in HEAD.get(arch, ())
                           for n in changed)
    assert any(".adapter_down." in n for n in changed) and any(".adapter_up." in n for n in changed)


@pytest.mark.parametrize("arch", ALL)
def test_save_load_round_trip_is_bit_exact(arch, pl_base_model, tmp_path, pl_round_trip):
    model = mam(pl_base_model, arch, prefix_projection=True, non_linearity="gelu", bottleneck_size=5)

    def check_saved(saved, config):
        ffn, layers, hidden = FFN[arch].format(1), LAYERS[arch], HIDDEN[arch]
        assert saved["prompt_embeddings"].shape == (3, 2 * layers * model.active_peft_config.token_dim)
        assert saved[f"base_model.{ffn}.adapter_down.weight"].shape == (5, hidden)
        assert saved[f"base_model.{ffn}.adapter_up.weight"].shape == (hidden, 5)
        heads = {"base_model.classifier.weight", "base_model.classifier.bias"} if arch == "bert" else set()
        assert heads <= saved.keys() and len(saved) == 1 + layers * 4 + len(heads)
        assert all(v.dtype == torch.float32 for v in saved.values())
        assert config["peft_type"] == "MAM" and config["bottleneck_size"] == 5 and config["inference_mode"] is True

    pl_round_trip(model, arch, tmp_path, fastpeft.MAMModel, check_saved)


def test_a_checkpoint_that_does_not_fit_is_refused_with_the_model_unchanged(make_model, tmp_path,
                                                                             pl_check_refused_checkpoint):
    model = mam(make_model, "llama")
    pl_check_refused_checkpoint(mam(make_model, "llama", bottleneck_size=5), make_model("llama"), model, tmp_path,
                                {"bottleneck_size": 6},
                                "shape mismatches .*adapter_down.weight: checkpoint \\(5, 32\\) vs model \\(6, 32\\)")
    assert all(m.adapters == ["default"] for _, m in model.bottleneck.adapter_layers())


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_greedy_decoding_by_forward(arch, make_model, pl_perturb, pl_check_own_generate):
    """First and later steps: the prefix sits in the cache once, the adapters run at every step."""
    model = mam(make_model, arch)
    pl_perturb(model)
    pl_check_own_generate(model)


def test_adapter_lifecycle(make_model, pl_inputs, pl_check_lifecycle):
    """Disable, switch, delete and unload act on the prefix and the adapters together."""
    inputs = pl_inputs("llama")
    base = logits(make_model("llama"), inputs)
    model = mam(make_model, "llama")
    pl_check_lifecycle(model, inputs, base,
                       fastpeft.MAMConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, bottleneck_size=3))

    plain = model.unload()
    assert not any(isinstance(m, BottleneckAdapterLayer) for m in plain.modules())
    assert torch.equal(logits(plain, inputs), base)


def test_errors(make_model, pl_check_composite_refusals):
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer, got 0"):
        fastpeft.MAMConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="MAMConfig needs its prefix part"):
        fastpeft.MAMConfig()
    with pytest.raises(ValueError, match="bottleneck_size must be a positive integer, got 0"):
        fastpeft.MAMConfig(num_virtual_tokens=2, bottleneck_size=0)
    with pytest.raises(ValueError, match="non_linearity must be one of"):
        fastpeft.MAMConfig(num_virtual_tokens=2, non_linearity="swish")
    base = make_model("llama")
    with pytest.raises(ValueError, match="reduction_factor=64 leaves a zero-width bottleneck for hidden size 32"):
        fastpeft.get_peft_model(base, fastpeft.MAMConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, reduction_factor=64))
    assert not any(isinstance(m, BottleneckAdapterLayer) for m in base.modules())

    model = mam(make_model, "llama")  # (the error strings: "MAM adapters cannot be merged", "cannot add a
    # PREFIX_TUNING adapter to a model holding MAM adapters", "a MAM adapter needs its own model class")
    pl_check_composite_refusals(model, "MAM", fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
