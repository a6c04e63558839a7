"""Transactions (issue 18): add_adapter, load_adapter, from_pretrained, load_state_dict,
merge_adapter, safe_merge, delete_adapter and save_pretrained complete or leave the model and the
files as they were. Each test injects a failure at every step (monkeypatch) and compares."""
import os

import pytest
import torch
from torch import nn

import fastpeft as peft
from fastpeft import checkpoint, inject
from fastpeft.methods import base as methods_base
from fastpeft.methods.lora import LoraLinear, LoraModel

TARGETS = ["q_proj", "v_proj"]


class Boom(RuntimeError):
    pass


def fingerprint(model: nn.Module):
    """Everything a failed call must leave as it was: module tree, state dict values, the
    trainable set, adapters and the active one."""
    tree = [(name, type(m).__name__) for name, m in model.named_modules()]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
    configs = dict(getattr(model, "peft_config", {}))
    active = getattr(model, "active_adapter", None)
    return tree, state, grads, sorted(configs), active


def assert_same(before, after):
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys()
    for k in before[1]:
        torch.testing.assert_close(after[1][k], before[1][k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert after[2:] == before[2:]


def fail_on(monkeypatch, owner, name, n):
    """Make `owner.name` raise Boom on its n-th call (earlier calls run for real)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"injected failure in {name} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def count_calls(monkeypatch, owner, name, setup, run):
    """How often `run(setup())` calls `owner.name` (setup's own calls not counted)."""
    obj = setup()
    calls = fail_on(monkeypatch, owner, name, 10**9)
    run(obj)
    monkeypatch.undo()
    return calls["n"]


def lora(make_model, **kw):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, **kw)
    return peft.get_peft_model(make_model("llama"), cfg)


def new_config():  # k_proj is new (layers created), v_proj is not (an adapter added to a layer)
    return peft.LoraConfig(r=2, target_modules=["k_proj", "v_proj"], init_lora_weights=False)


# adding an adapter that does not become active settles only its own layers (_settle_new), not set_adapter
INJECT_STEPS = [(LoraModel, "_create_layer"), (inject, "replace_module"), (LoraLinear, "update_layer"),
                (methods_base.BaseTuner, "_settle_new")]


@pytest.mark.parametrize("owner,name", INJECT_STEPS)
def test_add_adapter(make_model, monkeypatch, owner, name):
    model = lora(make_model)
    total = count_calls(monkeypatch, owner, name, lambda: lora(make_model),
                        lambda m: m.add_adapter("x", new_config()))
    assert total >= 1
    for n in range(1, total + 1):
        before = fingerprint(model)
        fail_on(monkeypatch, owner, name, n)
        with pytest.raises(Boom):
            model.add_adapter("x", new_config())
        monkeypatch.undo()
        assert_same(before, fingerprint(model))
    model.add_adapter("x", new_config())  # and it still works afterwards
    assert "x" in model.peft_config


def _saved(make_model, tmp_path, name="saved"):
    src = lora(make_model)
    with torch.no_grad():
        for p in src.parameters():
            if p.requires_grad:
                p.add_(0.5)
    src.save_pretrained(tmp_path / name)
    return tmp_path / name


LOAD_STEPS = [(methods_base.AdapterLayer, "load_adapter_state_dict"), (checkpoint, "load_into"),
              (inject, "replace_module"), (LoraModel, "_create_layer")]


@pytest.mark.parametrize("owner,name", LOAD_STEPS)
def test_load_adapter(make_model, tmp_path, monkeypatch, owner, name):
    directory = _saved(make_model, tmp_path)
    model = lora(make_model)
    total = count_calls(monkeypatch, owner, name, lambda: lora(make_model),
                        lambda m: m.load_adapter(directory, "x"))
    for n in range(1, total + 1):
        before = fingerprint(model)
        fail_on(monkeypatch, owner, name, n)
        with pytest.raises(Boom):
            model.load_adapter(directory, "x")
        monkeypatch.undo()
        assert_same(before, fingerprint(model))


@pytest.mark.parametrize("owner,name", LOAD_STEPS)
def test_from_pretrained(make_model, tmp_path, monkeypatch, owner, name):
    directory = _saved(make_model, tmp_path)
    total = count_calls(monkeypatch, owner, name, lambda: make_model("llama"),
                        lambda m: peft.PeftModel.from_pretrained(m, directory))
    for n in range(1, total + 1):
        base = make_model("llama")
        before = fingerprint(base)
        fail_on(monkeypatch, owner, name, n)
        with pytest.raises(Boom):
            peft.PeftModel.from_pretrained(base, directory)
        monkeypatch.undo()
        assert_same(before, fingerprint(base))


def test_load_state_dict(make_model, monkeypatch):
    model = lora(make_model)
    other = lora(make_model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    state = other.state_dict()
    total = count_calls(monkeypatch, nn.Module, "_load_from_state_dict", lambda: lora(make_model),
                        lambda m: m.load_state_dict(state))
    for n in range(1, total + 1, max(1, total // 8)):
        before = fingerprint(model)
        fail_on(monkeypatch, nn.Module, "_load_from_state_dict", n)
        with pytest.raises(Boom):
            model.load_state_dict(state)
        monkeypatch.undo()
        assert_same(before, fingerprint(model))
    model.load_state_dict(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_merge(make_model, monkeypatch, how):
    model = lora(make_model)
    total = count_calls(monkeypatch, LoraLinear, "write_base_weight", lambda: lora(make_model),
                        lambda m: getattr(m, how)())
    assert total == 4
    for n in range(1, total + 1):
        before = fingerprint(model)
        fail_on(monkeypatch, LoraLinear, "write_base_weight", n)
        with pytest.raises(Boom):
            getattr(model, how)()
        monkeypatch.undo()
        assert_same(before, fingerprint(model))
        assert not any(m.merged for m in model.modules() if isinstance(m, LoraLinear))


def test_safe_merge_all_or_nothing(make_model):
    """Issue 18 item 9: v_proj's merge would hold NaN; q_proj (merged first) must not change."""
    model = lora(make_model)
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("nan")
    before = fingerprint(model)
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert_same(before, fingerprint(model))
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    assert_same(before, fingerprint(model))


DELETE_STEPS = [(methods_base.AdapterLayer, "delete_adapter"), (inject, "replace_module"),
                (methods_base.BaseTuner, "set_adapter")]


@pytest.mark.parametrize("owner,name", DELETE_STEPS)
def test_delete_adapter(make_model, monkeypatch, owner, name):
    def build():
        m = lora(make_model)
        m.add_adapter("x", peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
        return m

    total = count_calls(monkeypatch, owner, name, build, lambda m: m.delete_adapter("default"))
    model = build()
    for n in range(1, total + 1):
        before = fingerprint(model)
        fail_on(monkeypatch, owner, name, n)
        with pytest.raises(Boom):
            model.delete_adapter("default")
        monkeypatch.undo()
        assert_same(before, fingerprint(model))


def _files(directory):
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


SAVE_STEPS = [(os, "replace"), (checkpoint, "save_file"), (checkpoint, "_write_text"), (os, "link")]


@pytest.mark.parametrize("owner,name", SAVE_STEPS)
def test_save_pretrained(make_model, tmp_path, monkeypatch, owner, name):
    """A failure at any write leaves the previous checkpoint as it was, and loadable."""
    old = lora(make_model)
    old.add_adapter("second", new_config())
    old.save_pretrained(tmp_path / "ckpt")
    before = _files(tmp_path / "ckpt")
    new = lora(make_model, lora_alpha=16)
    new.add_adapter("second", peft.LoraConfig(r=3, target_modules=TARGETS))
    total = count_calls(monkeypatch, owner, name, lambda: new, lambda m: m.save_pretrained(tmp_path / "probe"))
    # the second save into an existing directory also backs up (os.link) and replaces the old files
    total = max(total, count_calls(monkeypatch, owner, name, lambda: new,
                                   lambda m: m.save_pretrained(tmp_path / "probe")))
    assert total >= 1
    for n in range(1, total + 1):
        fail_on(monkeypatch, owner, name, n)
        with pytest.raises(Boom):
            new.save_pretrained(tmp_path / "ckpt")
        monkeypatch.undo()
        assert _files(tmp_path / "ckpt") == before
    loaded = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "ckpt")
    loaded.load_adapter(tmp_path / "ckpt" / "second", "second")
    if name == "link":  # a fresh directory has nothing to back up
        return
    # a new directory that fails is not left behind half made
    fail_on(monkeypatch, owner, name, 1)
    with pytest.raises(Boom):
        new.save_pretrained(tmp_path / "fresh" / "dir")
    monkeypatch.undo()
    assert not (tmp_path / "fresh").exists()


def test_save_pretrained_numpy_alpha_before_any_write(make_model, tmp_path):
    """Issue 18 item 2: a value JSON cannot hold fails before the weights are touched; numpy
    scalars are converted (PEFT writes them as numbers)."""
    np = pytest.importorskip("numpy")
    model = lora(make_model)
    model.save_pretrained(tmp_path)
    before = _files(tmp_path)
    model.peft_config["default"].lora_alpha = object()
    with pytest.raises(TypeError, match="lora_alpha"):
        model.save_pretrained(tmp_path)
    assert _files(tmp_path) == before
    model.peft_config["default"].lora_alpha = np.float32(16)
    model.save_pretrained(tmp_path)
    assert peft.PeftConfig.from_pretrained(tmp_path).lora_alpha == 16
