"""Bottleneck adapters (no PEFT oracle: PEFT lacks them): placement per architecture and variant,
identity at init, the adapter maths against a hand-wired copy of the sub-layer, training touches
only the adapters, bit-exact save/load, and the errors the issue asks for."""

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.kernels import reference
from fastpeft.methods.adapter import BottleneckAdapterLayer

ARCHS = ["llama", "gpt2", "bert"]
PLACES = {  # (variant, arch) -> wrapped modules of layer 0
    ("houlsby", "llama"): {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"},
    ("pfeiffer", "llama"): {"model.layers.0.mlp.down_proj"},
    ("parallel", "llama"): {"model.layers.0.mlp"},
    ("houlsby", "gpt2"): {"transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"},
    ("pfeiffer", "gpt2"): {"transformer.h.0.mlp.c_proj"},
    ("parallel", "gpt2"): {"transformer.h.0.mlp"},
    ("houlsby", "bert"): {"encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"},
    ("pfeiffer", "bert"): {"encoder.layer.0.output.dense"},
    ("parallel", "bert"): {"encoder.layer.0.output"},
}


def adapted(model):
    return {k: m for k, m in model.base_model.adapter_layers()}


@pytest.mark.parametrize("variant,arch", list(PLACES))
def test_placement_and_identity_at_init(variant, arch, make_model, make_inputs, run_model):
    model = fastpeft.get_peft_model(make_model(arch), fastpeft.AdapterConfig(variant=variant, reduction_factor=4))
    layers = adapted(model)
    assert {k for k in layers if ".0." in k} == PLACES[(variant, arch)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_down.default." in n or ".adapter_up.default." in n for n in trainable)
    inputs = make_inputs(arch)
    with torch.no_grad():
        torch.testing.assert_close(run_model(model.eval(), inputs), run_model(make_model(arch), inputs), rtol=0, atol=0)


@pytest.mark.parametrize("mode_arch", [("serial", "gpt2"), ("parallel", "llama"), ("parallel_residual", "bert")])
def test_layer_maths(mode_arch, make_model):
    """Each wrapping mode computes the paper's formula around the untouched sub-layer."""
    mode, arch = mode_arch
    variant = "pfeiffer" if mode == "serial" else "parallel"
    config = fastpeft.AdapterConfig(variant=variant, bottleneck_size=5, non_linearity="gelu", scaling=2.0,
                                    init_adapter_weights=False)
    model = fastpeft.get_peft_model(make_model(arch), config).eval()
    key, layer = next(iter(adapted(model).items()))
    assert isinstance(layer, BottleneckAdapterLayer) and layer.mode == mode
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]

    def a(h):
        return reference.adapter_fwd(h, down.weight, down.bias, up.weight, up.bias, 2.0, "gelu") - h

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if mode == "parallel_residual":
            res = torch.randn(2, 3, layer.hidden, generator=g)
            x = torch.randn(2, 3, layer.base_layer.dense.in_features, generator=g)
            torch.testing.assert_close(layer(x, res), layer.base_layer(x, res + a(res)))
        else:
            width = layer.base_layer.weight.shape[0] if arch == "gpt2" else layer.hidden
            x = torch.randn(2, 3, width, generator=g)
            h = layer.base_layer(x)
            want = h + a(h) if mode == "serial" else h + a(x)
            torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_reduces_loss_and_touches_only_adapters(arch, make_model, make_inputs, triton_backend, adam_steps):
    model = fastpeft.get_peft_model(
        make_model(arch), fastpeft.AdapterConfig(variant="houlsby", bottleneck_size=4, scaling=1.0)
    ).train()
    inputs = make_inputs(arch, batch=1, seq=5)
    changed = adam_steps(model, inputs, lr=0.02, reseed=True)  # (asserts the loss goes down)
    assert changed and all(".adapter_down.default." in n or ".adapter_up.default." in n for n in changed)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_bit_exact_and_no_merge(arch, make_model, make_inputs, run_model, tmp_path):
    config = fastpeft.AdapterConfig(variant="parallel", bottleneck_size=3, scaling=4.0, init_adapter_weights=False,
                                    layers_to_transform=[0])
    model = fastpeft.get_peft_model(make_model(arch), config).eval()
    assert all(".0." in k for k in adapted(model))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    key = next(iter(adapted(model)))
    assert set(saved) == {f"base_model.model.{key}.adapter_{p}.{t}" for p in ("down", "up") for t in ("weight", "bias")}
    loaded = fastpeft.PeftModel.from_pretrained(make_model(arch), tmp_path)
    inputs = make_inputs(arch)
    with torch.no_grad():
        out = run_model(model, inputs)
        torch.testing.assert_close(run_model(loaded, inputs), out, rtol=0, atol=0)
        assert not torch.allclose(out, run_model(make_model(arch), inputs), atol=1e-4)
        with loaded.disable_adapter():
            torch.testing.assert_close(run_model(loaded, inputs), run_model(make_model(arch), inputs), rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again/adapter_model.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    with pytest.raises(ValueError, match="cannot be merged"):
        loaded.merge_and_unload()
    with torch.no_grad():  # the refused merge changed nothing
        torch.testing.assert_close(run_model(loaded, inputs), out, rtol=0, atol=0)
    unloaded = loaded.unload()
    assert type(unloaded) is type(make_model(arch))


def test_bad_input(make_model):
    with pytest.raises(ValueError, match="zero-width"):
        fastpeft.AdapterConfig(reduction_factor=0)
    with pytest.raises(ValueError, match="zero-width"):
        fastpeft.AdapterConfig(bottleneck_size=0)
    with pytest.raises(ValueError, match="variant"):
        fastpeft.AdapterConfig(variant="serial")
    base = make_model("llama")  # hidden 32: a reduction factor of 64 leaves nothing
    with pytest.raises(ValueError, match="zero-width bottleneck for hidden size 32"):
        fastpeft.get_peft_model(base, fastpeft.AdapterConfig(reduction_factor=64))
    assert not any(isinstance(m, BottleneckAdapterLayer) for m in base.modules())
    with pytest.raises(ValueError, match="no module matches"):
        fastpeft.get_peft_model(base, fastpeft.AdapterConfig(target_modules=[r".*\.nope"]))
