"""LoRA (and DoRA) on nn.Embedding and nn.Conv1d/2d/3d against real PEFT: equal outputs, equal
state-dict keys, checkpoints that load both ways, merge/unmerge; IA3 on Conv2d/3d."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastpeft
import peft

TARGETS = ["emb", "conv1d", "conv2d", "conv3d"]


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(37, 6, padding_idx=0)
        self.conv1d = nn.Conv1d(3, 5, 3, padding=1)
        self.conv2d = nn.Conv2d(5, 7, 3, stride=2)
        self.conv3d = nn.Conv3d(2, 3, (2, 3, 2), padding=1, bias=False)

    def forward(self, ids, seq, img, vol):
        return self.emb(ids), self.conv1d(seq), self.conv2d(img), self.conv3d(vol)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randint(0, 37, (2, 5), generator=g), torch.randn(2, 3, 9, generator=g),
            torch.randn(2, 5, 9, 7, generator=g), torch.randn(1, 2, 5, 4, 3, generator=g))


def _run(model):
    with torch.no_grad():
        return model(*_inputs())


def _close(a, b, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return Model().eval()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_checkpoint_loads_and_matches(base, tmp_path, use_dora):
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**kwargs))
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    theirs.save_pretrained(tmp_path / "peft")
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    expected = _run(theirs)
    _close(_run(loaded), expected)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(expected, _run(base)))  # the adapters do something
    # and back: a fastpeft checkpoint, same keys and shapes, loads in PEFT with equal outputs
    loaded.save_pretrained(tmp_path / "ours")
    mine, orig = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in orig.items()}
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    _close(_run(again), expected)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_and_unload(base, use_dora):
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora)
    torch.manual_seed(2)
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**kwargs)).eval()
    expected = _run(model)
    model.merge_adapter()
    _close(_run(model), expected, atol=1e-4)
    model.unmerge_adapter()
    _close(_run(model), expected, atol=1e-4)
    with model.disable_adapter():
        _close(_run(model), _run(base))
    merged = model.merge_and_unload()
    assert type(merged.conv2d) is nn.Conv2d and type(merged.emb) is nn.Embedding
    _close(_run(merged), expected, atol=1e-4)


def test_default_init_is_identity_and_trains(base):
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2, target_modules=TARGETS))
    _close(_run(model), _run(base))
    model.train()
    loss = sum(y.square().mean() for y in model(*_inputs()))
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("lora_embedding_B" in n for n in trainable)
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert all(g is not None for g in grads)


def test_conv_groups_rank_and_merge_errors():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv2d = nn.Conv2d(4, 6, 3, groups=2)

        def forward(self, x):
            return self.conv2d(x)

    with pytest.raises(ValueError, match="divisible by groups"):
        fastpeft.get_peft_model(Grouped(), fastpeft.LoraConfig(r=3, target_modules=["conv2d"]))
    with pytest.warns(UserWarning, match="groups > 1"):
        model = fastpeft.get_peft_model(Grouped(), fastpeft.LoraConfig(r=4, target_modules=["conv2d"]))
    with pytest.raises(NotImplementedError, match="groups > 1"):
        model.merge_adapter()


def test_unsupported_type_is_a_clear_error():
    model = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="not supported"):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(target_modules=["0"]))


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_ia3_conv_matches_peft(base, tmp_path, feedforward):
    targets = ["conv2d", "conv3d"]
    kwargs = dict(target_modules=targets, feedforward_modules=targets if feedforward else [], init_ia3_weights=False)
    torch.manual_seed(4)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    expected = _run(theirs)
    _close(_run(ours), expected)
    ours.save_pretrained(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    _close(_run(again), expected)
    ours.merge_adapter()
    _close(_run(ours), expected, atol=1e-4)
    ours.unmerge_adapter()
    _close(_run(ours), expected, atol=1e-4)
