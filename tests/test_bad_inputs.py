"""The bad-input catalogue (issue 18): each row is a mistake a careful user can make, the error
class it must raise and a key word of its message. Every call must also leave the model's state
dict and module tree (and trainable set, adapters, active adapter) as they were."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft as peft
from fastpeft import errors

TARGETS = ["q_proj", "v_proj"]


def _lora(make_model):
    torch.manual_seed(0)
    return peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, target_modules=TARGETS))


def _cfg(**kw):
    return peft.LoraConfig(**{"r": 2, "target_modules": TARGETS, **kw})


def _built_then(**kw):
    """A config whose fields are set to bad values after it was built (its checks already ran)."""
    cfg = _cfg()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _ckpt(tmp_path, make_model, edit=None, name="ckpt", config_edit=None, ia3=False):
    torch.manual_seed(1)
    if ia3:
        src = peft.get_peft_model(make_model("llama"), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                        feedforward_modules=["down_proj"]))
    else:
        src = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, target_modules=TARGETS))
    d = tmp_path / name
    src.save_pretrained(d)
    if edit is not None:
        path = d / "adapter_model.safetensors"
        state = edit(load_file(path))
        save_file(state, path)
    if config_edit is not None:
        path = d / "adapter_config.json"
        data = json.loads(path.read_text())
        text = config_edit(data)
        path.write_text(text if isinstance(text, str) else json.dumps(text))
    return d


def _first(state, suffix):
    return next(k for k in state if k.endswith(suffix))


def _with(state, key_suffix, fn):
    state = dict(state)
    k = _first(state, key_suffix)
    state[k] = fn(state[k])
    return state


# (id, call(model, ctx), expected error class, key word in the message). `ctx` has tmp_path,
# make_model and the model's own state dict. Calls run on a fresh LoRA model (r=4 on q/v_proj).
def _names():
    rows = []
    for name, word in [("a/b", "'/'"), ("/abs", "'/'"), ("..", "'.'"), ("", "non-empty"), ("a.b", "'.'"),
                       ("__base__", "reserved"), ("lora_A", "reserved"), ("keys", "shadow"),
                       ("training", "shadow"), ("_private", "shadow"), ("a\\b", "'/'"), ("c:d", "'/'"),
                       ("   ", "non-empty"), ("default", "already exists")]:
        rows.append((f"add_adapter name {name!r}", lambda m, c, n=name: m.add_adapter(n, _cfg()),
                     ValueError, word))
    rows += [
        ("add_adapter name int", lambda m, c: m.add_adapter(3, _cfg()), ValueError, "str"),
        ("add_adapter name None", lambda m, c: m.add_adapter(None, _cfg()), ValueError, "str"),
    ]
    return rows


def _configs():
    ctor = [  # rejected when the config is built
        ("lora_alpha str", dict(lora_alpha="16"), TypeError, "lora_alpha"),
        ("lora_alpha None", dict(lora_alpha=None), TypeError, "lora_alpha"),
        ("lora_alpha nan", dict(lora_alpha=float("nan")), ValueError, "finite"),
        ("lora_dropout str", dict(lora_dropout="0.1"), TypeError, "lora_dropout"),
        ("lora_dropout 1.5", dict(lora_dropout=1.5), ValueError, "lora_dropout"),
        ("r zero", dict(r=0), ValueError, "`r`"),
        ("r float", dict(r=2.5), ValueError, "`r`"),
        ("alpha_pattern str", dict(alpha_pattern="q"), TypeError, "alpha_pattern"),
        ("alpha_pattern value str", dict(alpha_pattern={"q_proj": "x"}), TypeError, "alpha_pattern"),
        ("rank_pattern zero", dict(rank_pattern={"q_proj": 0}), ValueError, "rank_pattern"),
        ("bias bad", dict(bias="some"), ValueError, "bias"),
        ("init_lora_weights bad", dict(init_lora_weights="x"), ValueError, "init_lora_weights"),
        ("use_rslora str", dict(use_rslora="yes"), TypeError, "use_rslora"),
        ("fan_in_fan_out int", dict(fan_in_fan_out=1), TypeError, "fan_in_fan_out"),
        ("target_modules int", dict(target_modules=5), TypeError, "target_modules"),
        ("layers_to_transform str", dict(layers_to_transform="0"), TypeError, "layers_to_transform"),
    ]
    rows = [(f"LoraConfig {i}", lambda m, c, kw=kw: m.add_adapter("x", _cfg(**kw)), e, w) for i, kw, e, w in ctor]
    after = [  # set after the config was built: add_adapter re-checks the whole config first
        ("lora_alpha str", dict(lora_alpha="16"), TypeError, "lora_alpha"),
        ("lora_alpha None", dict(lora_alpha=None), TypeError, "lora_alpha"),
        ("r str", dict(r="8"), TypeError, "r="),
        ("r zero", dict(r=0), ValueError, "`r`"),
        ("alpha_pattern str", dict(alpha_pattern="q"), TypeError, "alpha_pattern"),
        ("lora_dropout str", dict(lora_dropout="0.1"), TypeError, "lora_dropout"),
        ("lora_dropout negative", dict(lora_dropout=-0.1), ValueError, "lora_dropout"),
        ("bias bad", dict(bias="every"), ValueError, "bias"),
        ("target_modules missing", dict(target_modules={"nope"}), ValueError, "not found"),
        ("layers_to_transform out of range", dict(layers_to_transform=[5]), ValueError, "2 layers"),
        ("use_dora str", dict(use_dora="no"), TypeError, "use_dora"),
    ]
    rows += [(f"built then {i}", lambda m, c, kw=kw: m.add_adapter("x", _built_then(**kw)), e, w)
             for i, kw, e, w in after]
    rows += [
        ("add_adapter dict config", lambda m, c: m.add_adapter("x", {"r": 8}), TypeError, "config"),
        ("add_adapter IA3 into LoRA", lambda m, c: m.add_adapter("x", peft.IA3Config(target_modules=["k_proj"])),
         ValueError, "IA3"),
        ("get_peft_model name", lambda m, c: peft.get_peft_model(c["make_model"]("llama"), _cfg(), adapter_name="a/b"),
         ValueError, "'/'"),
        ("get_peft_model dict", lambda m, c: peft.get_peft_model(c["make_model"]("llama"), {"r": 8}),
         (TypeError, AttributeError), "config"),
        ("get_peft_model kwarg", lambda m, c: peft.get_peft_model(c["make_model"]("llama"), _cfg(), foo=1),
         TypeError, "unsupported keyword"),
    ]
    return rows


def _loads():
    tp, mm = "tmp_path", "make_model"
    return [
        ("load_adapter missing dir", lambda m, c: m.load_adapter(c[tp] / "nope", "x"), FileNotFoundError,
         "adapter_config.json"),
        ("load_adapter bad json", lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm], config_edit=lambda d: "{nope"), "x"),
         ValueError, "adapter_config.json"),
        ("load_adapter json list", lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm], config_edit=lambda d: "[1]"), "x"),
         ValueError, "JSON object"),
        ("load_adapter unknown peft_type",
         lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm], config_edit=lambda d: {**d, "peft_type": "NOPE"}), "x"),
         ValueError, "peft_type"),
        ("load_adapter alpha str in json",
         lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm], config_edit=lambda d: {**d, "lora_alpha": "16"}), "x"),
         TypeError, "lora_alpha"),
        ("load_adapter IA3 into LoRA", lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm], ia3=True), "x"),
         ValueError, "IA3"),
        ("load_adapter rank mismatch",
         lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm], config_edit=lambda d: {**d, "r": 8}), "x"),
         ValueError, "shape"),
        ("load_adapter int32 lora_A",
         lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm], edit=lambda s: _with(s, "lora_A.weight",
                                                                                lambda t: t.to(torch.int32))), "x"),
         ValueError, "floating point"),
        ("load_adapter bool lora_B",
         lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm], edit=lambda s: _with(s, "lora_B.weight",
                                                                                lambda t: t > 0)), "x"),
         ValueError, "floating point"),
        ("load_adapter uint8 lora_A",
         lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm], edit=lambda s: _with(s, "lora_A.weight",
                                                                                lambda t: t.to(torch.uint8))), "x"),
         ValueError, "floating point"),
        ("load_adapter missing key",
         lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm], edit=lambda s: {k: v for k, v in s.items()
                                                                          if k != _first(s, "lora_B.weight")}), "x"),
         ValueError, "missing keys"),
        ("load_adapter extra key",
         lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm], edit=lambda s: {**s, "base_model.model.junk": torch.ones(1)}),
                                     "x"),
         ValueError, "unexpected keys"),
        ("load_adapter corrupt weights", lambda m, c: m.load_adapter(_corrupt(_ckpt(c[tp], c[mm])), "x"),
         ValueError, "safetensors"),
        ("load_adapter existing name", lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm]), "default"), ValueError,
         "already exists"),
        ("load_adapter bad name", lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm]), "../up"), ValueError, "'/'"),
        ("load_adapter is_trainable str", lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm]), "x", is_trainable="yes"),
         TypeError, "is_trainable"),
        ("load_adapter file as dir",
         lambda m, c: m.load_adapter(_ckpt(c[tp], c[mm]) / "adapter_config.json", "x"), ValueError, "file"),
        ("from_pretrained missing dir", lambda m, c: peft.PeftModel.from_pretrained(c["base"], c[tp] / "nope"),
         FileNotFoundError, "adapter_config.json"),
        ("from_pretrained bad json",
         lambda m, c: peft.PeftModel.from_pretrained(c["base"], _ckpt(c[tp], c[mm], config_edit=lambda d: "{")),
         ValueError, "JSON"),
        ("from_pretrained int32",
         lambda m, c: peft.PeftModel.from_pretrained(c["base"], _ckpt(c[tp], c[mm], edit=lambda s: _with(
             s, "lora_A.weight", lambda t: t.to(torch.int32)))), ValueError, "floating point"),
        ("from_pretrained shape",
         lambda m, c: peft.PeftModel.from_pretrained(c["base"], _ckpt(c[tp], c[mm], config_edit=lambda d: {**d, "r": 2})),
         ValueError, "shape"),
        ("from_pretrained adapter name",
         lambda m, c: peft.PeftModel.from_pretrained(c["base"], _ckpt(c[tp], c[mm]), adapter_name="keys"),
         ValueError, "shadow"),
        ("from_pretrained subfolder int",
         lambda m, c: peft.PeftModel.from_pretrained(c["base"], _ckpt(c[tp], c[mm]), subfolder=3), TypeError,
         "subfolder"),
        ("from_pretrained model not module",
         lambda m, c: peft.PeftModel.from_pretrained("gpt2", _ckpt(c[tp], c[mm])), TypeError, "nn.Module"),
        ("from_pretrained config dict",
         lambda m, c: peft.PeftModel.from_pretrained(c["base"], _ckpt(c[tp], c[mm]), config={"r": 4}), TypeError,
         "config"),
    ]


def _corrupt(directory):
    (directory / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    return directory


def _state_rows():
    def sd(c, fn):
        return fn(dict(c["state"]))

    return [
        ("load_state_dict shape", lambda m, c: m.load_state_dict(sd(c, lambda s: _with(s, "lora_A.default.weight",
                                                                                       lambda t: t[:2]))),
         ValueError, "shape"),
        ("load_state_dict int dtype", lambda m, c: m.load_state_dict(sd(c, lambda s: _with(
            s, "lora_B.default.weight", lambda t: t.to(torch.int64)))), ValueError, "dtype"),
        ("load_state_dict missing", lambda m, c: m.load_state_dict(sd(c, lambda s: {k: v for k, v in s.items()
                                                                                    if "lora_B" not in k})),
         ValueError, "missing keys"),
        ("load_state_dict unexpected", lambda m, c: m.load_state_dict(sd(c, lambda s: {**s, "junk": torch.ones(1)})),
         ValueError, "unexpected keys"),
        ("load_state_dict non-strict shape", lambda m, c: m.load_state_dict(
            sd(c, lambda s: _with(s, "norm.weight", lambda t: torch.ones(3))), strict=False), ValueError, "shape"),
        ("load_state_dict list", lambda m, c: m.load_state_dict([1, 2]), TypeError, "mapping"),
        ("load_state_dict value str", lambda m, c: m.load_state_dict({"a": "b"}), TypeError, "tensor"),
        ("load_state_dict strict str", lambda m, c: m.load_state_dict(c["state"], strict="yes"), TypeError, "strict"),
        ("load_state_dict dense into nf4", lambda m, c: c["nf4"].load_state_dict(c["dense"]), ValueError, "weight"),
    ]


def _api_rows():
    return [
        ("set_adapter unknown", lambda m, c: m.set_adapter("nope"), ValueError, "not found"),
        ("set_adapter int", lambda m, c: m.set_adapter(3), TypeError, "str"),
        ("set_adapter list", lambda m, c: m.set_adapter(["default"]), TypeError, "str"),
        ("delete_adapter unknown", lambda m, c: m.delete_adapter("nope"), ValueError, "not found"),
        ("delete_adapter None", lambda m, c: m.delete_adapter(None), TypeError, "str"),
        ("merge_adapter unknown", lambda m, c: m.merge_adapter(["nope"]), ValueError, "not found"),
        ("merge_adapter str", lambda m, c: m.merge_adapter("default"), TypeError, "list"),
        ("merge_adapter safe_merge str", lambda m, c: m.merge_adapter(safe_merge="yes"), TypeError, "safe_merge"),
        ("merge_and_unload unknown", lambda m, c: m.merge_and_unload(adapter_names=["nope"]), ValueError, "not found"),
        ("save_pretrained to a file", lambda m, c: m.save_pretrained(_a_file(c[ "tmp_path"])), ValueError, "file"),
        ("save_pretrained int path", lambda m, c: m.save_pretrained(3), TypeError, "save_directory"),
        ("save_pretrained unknown adapter", lambda m, c: m.save_pretrained(c["tmp_path"] / "s",
                                                                           selected_adapters=["nope"]),
         ValueError, "not found"),
        ("save_pretrained str adapters", lambda m, c: m.save_pretrained(c["tmp_path"] / "s", selected_adapters="default"),
         TypeError, "selected_adapters"),
        ("save_pretrained kwarg", lambda m, c: m.save_pretrained(c["tmp_path"] / "s", bogus=True), TypeError,
         "unsupported keyword"),
        ("forward adapter_names length", lambda m, c: m.eval()(c["ids"], adapter_names=["default"]), ValueError,
         "Length"),
        ("forward adapter_names unknown", lambda m, c: m.eval()(c["ids"], adapter_names=["nope", "default"]),
         ValueError, "non-existing"),
        ("forward adapter_names str", lambda m, c: m.eval()(c["ids"], adapter_names="default"), TypeError,
         "list of str"),
        ("forward adapter_names training", lambda m, c: m.train()(c["ids"], adapter_names=["default", "default"]),
         ValueError, "training"),
    ]


def _a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


CASES = _names() + _configs() + _loads() + _state_rows() + _api_rows()


def test_catalogue_size():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


def _fingerprint(model):
    tree = [(n, type(m).__name__) for n, m in model.named_modules()]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return tree, state, grads, sorted(getattr(model, "peft_config", {})), getattr(model, "active_adapter", None), \
        model.training


def _assert_same(before, after):
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert after[2:] == before[2:]


@pytest.fixture(scope="module")
def nf4_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    dense = LlamaForCausalLM(config).eval()
    qbase = peft.quantize_model(LlamaForCausalLM(config).eval(), peft.NF4Config(blocksize=64))
    nf4 = peft.get_peft_model(qbase, peft.LoraConfig(r=2, target_modules=TARGETS))
    dense_state = peft.get_peft_model(dense, peft.LoraConfig(r=2, target_modules=TARGETS)).state_dict()
    return nf4, dense_state


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, make_model, tmp_path, nf4_pair):
    name, call, error, word = case
    model = _lora(make_model)
    base = make_model("llama")
    nf4, dense = nf4_pair
    ctx = {"tmp_path": tmp_path, "make_model": make_model, "state": model.state_dict(), "base": base,
           "ids": torch.randint(0, 96, (2, 5)), "nf4": nf4, "dense": dense}
    watched = [model, base, nf4]
    if model.training:
        model.eval()
    before = [_fingerprint(m) for m in watched]
    with pytest.raises(error) as info:
        call(model, ctx)
    assert word.lower() in str(info.value).lower(), str(info.value)
    model.eval()  # the training-mode row switches it on purpose
    for m, b in zip(watched, before):
        _assert_same(b, _fingerprint(m))
    if not isinstance(info.value, (AttributeError,)):
        assert isinstance(info.value, errors.FastPeftError), f"{type(info.value).__name__}: {info.value}"
