"""Shared by the method tests: the prompt-learning parity twins and oracles, and the QLoRA bases.

Prompt learning: real `peft` is the oracle for structure, checkpoints and forward. Its `generate`
is not: peft 0.21 drives prompt learning through `prepare_input_for_generation` arguments that
transformers 5 no longer passes, so its later decode steps are wrong here. Generation is therefore
checked against greedy decoding by repeated full forwards of the real peft model (no cache involved).
"""

import copy
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.bench.nf4 import to_bnb_model
from fastpeft.methods.lora import NF4LoraLinear
from fastpeft.quant.nf4 import NF4Config, quantize_model

peft = pytest.importorskip("peft")

@pytest.fixture(scope="session")
def pl_minilm_path(minilm_seq_cls):
    return minilm_seq_cls(3)[1]


@pytest.fixture(scope="session")
def pl_base_model(make_model, minilm_seq_cls):
    """`pl_base_model(arch)`: tiny Llama (GQA) / GPT-2 causal LMs, or the MiniLM BERT classifier (3 labels)."""
    return lambda arch: minilm_seq_cls(3)[0] if arch == "bert" else make_model(arch)


TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


@pytest.fixture(scope="session")
def pl_twins(pl_base_model):
    """`pl_twins(arch, config_name, **kwargs)` -> (ours, theirs): same base weights, same prompt weights."""

    def make(arch, config_name, **kwargs):
        kwargs = {"task_type": TASK[arch], "num_virtual_tokens": 3, **kwargs}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(pl_base_model(arch), getattr(peft, config_name)(**kwargs)).eval()
        ours = fastpeft.get_peft_model(pl_base_model(arch), getattr(fastpeft, config_name)(**kwargs)).eval()
        with torch.no_grad():  # peft's fresh head copy and prompt: make every learned tensor non-trivial
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.2)
        ours.load_state_dict(theirs.state_dict())
        return ours, theirs

    return make


@pytest.fixture(scope="session")
def pl_inputs():
    """`pl_inputs(arch, pad=True)`: two rows of 5 tokens, the first left-padded by 2 when `pad`."""

    def make(arch, pad=True, seq=5):
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(1000 if arch == "bert" else 1, 2000 if arch == "bert" else 96, (2, seq), generator=g)
        mask = torch.ones(2, seq, dtype=torch.long)
        if pad:
            mask[0, :2] = 0
        return {"input_ids": ids, "attention_mask": mask}

    return make


@pytest.fixture(scope="session")
def pl_greedy_by_forward():
    """`pl_greedy_by_forward(model, ids, steps)` -> (ids + new tokens, per-step logits): no cache at all."""

    @torch.no_grad()
    def decode(model, ids, steps):
        logits = []
        for _ in range(steps):
            last = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
            logits.append(last)
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
        return ids, logits

    return decode


def generate(model, steps, **kwargs):
    """Greedy `generate` of exactly `steps` new tokens, with the per-step scores."""
    return model.generate(
        **kwargs, max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None,
        output_scores=True, return_dict_in_generate=True,
    )


def _generate_as_forward(greedy_by_forward, model, reference, steps):
    """`model.generate` == greedy decoding by `reference`'s forward: ids and every step's logits."""
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(7))
    expected, logits = greedy_by_forward(reference, ids, steps)
    out = generate(model, steps, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert torch.equal(out.sequences, expected)
    for step, (score, ref) in enumerate(zip(out.scores, logits)):
        torch.testing.assert_close(score, ref, rtol=1e-4, atol=1e-5, msg=f"step {step}")
    return ids, expected


@pytest.fixture(scope="session")
def pl_check_generate(pl_greedy_by_forward):
    """Our generate == greedy decoding by real peft's forward (ids and every step's logits), and a
    left-padded batch generates for each row what the row alone does."""

    def check(ours, theirs, arch, steps=4):
        ids, expected = _generate_as_forward(pl_greedy_by_forward, ours, theirs, steps)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        padded = generate(ours, steps, input_ids=ids, attention_mask=mask)
        alone = generate(ours, steps, input_ids=ids[:1, 2:])
        assert torch.equal(padded.sequences[0, 2:], alone.sequences[0])
        assert torch.equal(padded.sequences[1], expected[1])

    return check


@pytest.fixture(scope="session")
def pl_check_checkpoints(pl_base_model, pl_inputs):
    """Save both ways: same files (keys, shapes, config) as peft's, and identical logits on load."""

    def check(ours, theirs, arch, tmp_path):
        from safetensors.torch import load_file

        batch = pl_inputs(arch)

        def run(model):
            return model(**batch).logits

        ours.save_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")
        mine, ref = (load_file(tmp_path / f"{w}/adapter_model.safetensors") for w in ("ours", "theirs"))
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in ref.items()}
        for key in ref:
            torch.testing.assert_close(mine[key], ref[key], rtol=0, atol=0)
        a, b = (peft.PeftConfig.from_pretrained(tmp_path / w).to_dict() for w in ("ours", "theirs"))
        for d in (a, b):  # peft lists the SEQ_CLS heads twice; the set is what counts
            d["modules_to_save"] = sorted(set(d["modules_to_save"] or [])) or None
            d.pop("peft_version", None)
        assert a == b
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_loads_ours = peft.PeftModel.from_pretrained(pl_base_model(arch), tmp_path / "ours").eval()
        ours_loads_peft = fastpeft.PeftModel.from_pretrained(pl_base_model(arch), tmp_path / "theirs")
        assert not any(p.requires_grad for p in ours_loads_peft.parameters()), "loads frozen, as in peft"
        with torch.no_grad():
            expected = run(theirs)
            torch.testing.assert_close(run(peft_loads_ours), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(run(ours_loads_peft), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(run(ours), expected, rtol=1e-5, atol=1e-5)
            base = run(pl_base_model(arch))
            tail = expected[:, -base.shape[1] :] if expected.dim() == 3 else expected  # past the virtual tokens
            assert not torch.allclose(base, tail, atol=1e-3), "the prompt must matter"
        return ours_loads_peft

    return check


@pytest.fixture(scope="session")
def pl_check_training_step(pl_inputs):
    """One backward: same gradients as peft's; an SGD step changes only the prompt (and head copy)."""

    def check(ours, theirs, arch):
        ours.train()
        theirs.train()
        batch = pl_inputs(arch, pad=False)
        labels = torch.tensor([0, 2]) if arch == "bert" else batch["input_ids"]
        before = {n: p.detach().clone() for n, p in ours.named_parameters()}
        for model in (ours, theirs):
            torch.manual_seed(0)  # the models' own dropouts draw the same masks in both
            model(**batch, labels=labels).loss.backward()
        grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
        mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
        assert mine.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(mine[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1).step()
        changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
        assert changed and all(n.startswith("prompt_encoder.") or ".modules_to_save." in n for n in changed)

    return check


@pytest.fixture(scope="session")
def pl_perturb():
    """`perturb(model, seed=0)`: random values added to every trainable tensor (a zero-init part,
    LoRA's B or an adapter's up-projection, would hide its path from a comparison)."""

    def perturb(model, seed=0):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)

    return perturb


@pytest.fixture(scope="session")
def pl_train(pl_inputs):
    """`train(model, arch) -> changed`: six Adam steps on a tiny task (the tokens as labels; BERT:
    two classes), each checked to give gradients to exactly the trainable parameters; asserts the
    loss went down and returns the names of the parameters that moved."""

    def train(model, arch):
        model.train()
        inputs = pl_inputs(arch, pad=False)
        labels = torch.tensor([0, 2]) if arch == "bert" else inputs["input_ids"]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        losses = []
        for _ in range(6):
            optimizer.zero_grad()
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            graded = {n for n, p in model.named_parameters() if p.grad is not None}
            assert graded == {n for n, p in model.named_parameters() if p.requires_grad}
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}

    return train


@pytest.fixture(scope="session")
def pl_check_mixed_batch():
    """`check(model, adapter_names, batch)`: rows using different adapters in one forward (and generate)
    equal each row run alone with its adapter active."""

    def check(model, names, batch):
        with torch.no_grad():
            mixed = model(**batch, adapter_names=names).logits
            out = model.generate(**batch, adapter_names=names, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)
            for row, name in enumerate(names):
                model.set_adapter(name)
                alone = {k: v[row : row + 1] for k, v in batch.items()}
                torch.testing.assert_close(mixed[row : row + 1], model(**alone).logits, rtol=1e-5, atol=1e-5)
                single = model.generate(**alone, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
                assert torch.equal(out[row : row + 1], single)

    return check


# -- methods with a peft oracle: the checks their tests share ------------------------------------
TOL = dict(rtol=1e-5, atol=1e-5)


def _quiet(fn, *args, **kwargs):
    """Call `fn` with warnings off (peft warns about our tiny models' module names)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="session")
def peft_oracle():
    """`peft_oracle(base, config_name, **kwargs)`: real peft's model of that config, eval mode."""
    return lambda base, config_name, **kwargs: _quiet(peft.get_peft_model, base, getattr(peft, config_name)(**kwargs)).eval()


@pytest.fixture(scope="session")
def oracle_twins(make_model, peft_oracle):
    """`twins(arch, config_name, prepare=None, **kwargs) -> (ours, theirs)`: our model and peft's of
    the same config on identical bases, eval mode, peft's holding our adapter weights (after
    `prepare(ours)`, which makes them non-trivial)."""

    def make(arch, config_name, prepare=None, **kwargs):
        ours = fastpeft.get_peft_model(make_model(arch), getattr(fastpeft, config_name)(**kwargs)).eval()
        if prepare is not None:
            prepare(ours)
        theirs = peft_oracle(make_model(arch), config_name, **kwargs)
        theirs.load_state_dict(ours.state_dict())
        return ours, theirs

    return make


@pytest.fixture(scope="session")
def check_peft_checkpoint_loads_here(make_model, make_inputs, run_model):
    """`check(theirs, arch, tmp_path) -> ours`: peft's saved adapter loads here frozen, with peft's
    outputs, which differ from the base model's."""

    def check(theirs, arch, tmp_path):
        theirs.save_pretrained(tmp_path)
        ours = fastpeft.PeftModel.from_pretrained(make_model(arch), tmp_path)
        inputs = make_inputs(arch)
        with torch.no_grad():
            expected = run_model(theirs, inputs)
            torch.testing.assert_close(run_model(ours, inputs), expected, **TOL)
            base = run_model(make_model(arch), inputs)
        assert not torch.allclose(base, expected, atol=1e-3), "the adapter must change the output"
        assert not any(p.requires_grad for p in ours.parameters()), "is_trainable=False loads frozen"
        return ours

    return check


@pytest.fixture(scope="session")
def check_files_match_peft():
    """`check(ours, theirs, tmp_path, exact=True) -> (mine, ref)`: both saved (to ours/ and theirs/):
    the same tensor names and shapes (and values, when `exact`: the twins hold the same weights)
    and the same adapter_config.json as peft reads it; returns both state dicts."""

    def check(ours, theirs, tmp_path, exact=True):
        from safetensors.torch import load_file

        ours.save_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")
        mine, ref = load_file(tmp_path / "ours/adapter_model.safetensors"), load_file(tmp_path / "theirs/adapter_model.safetensors")
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in ref.items()}
        if exact:
            for key in ref:
                torch.testing.assert_close(mine[key], ref[key], rtol=0, atol=0)
        assert peft.PeftConfig.from_pretrained(tmp_path / "ours").to_dict() == peft.PeftConfig.from_pretrained(
            tmp_path / "theirs"
        ).to_dict()
        return mine, ref

    return check


@pytest.fixture(scope="session")
def check_peft_loads_ours(make_model, make_inputs, run_model):
    """`check(ours, arch, directory) -> in_peft`: real peft loads our saved adapter with our outputs."""

    def check(ours, arch, directory):
        in_peft = _quiet(peft.PeftModel.from_pretrained, make_model(arch), directory).eval()
        inputs = make_inputs(arch)
        with torch.no_grad():
            torch.testing.assert_close(run_model(in_peft, inputs), run_model(ours, inputs), **TOL)
        return in_peft

    return check


@pytest.fixture(scope="session")
def check_merge_matches_peft(make_model, make_inputs, run_model):
    """`check(ours, theirs, arch, prefix, unmerge_tol=TOL) -> (merged, theirs_merged)`: the twins
    agree, also disabled (then as the base model); merge keeps the output, unmerge restores it;
    merge_and_unload gives the base model's class without any `prefix` parameter, as peft's does."""

    def check(ours, theirs, arch, prefix, unmerge_tol=TOL):
        inputs = make_inputs(arch)
        with torch.no_grad():
            unmerged = run_model(ours, inputs)
            torch.testing.assert_close(unmerged, run_model(theirs, inputs), **TOL)
            with ours.disable_adapter(), theirs.disable_adapter():
                torch.testing.assert_close(run_model(ours, inputs), run_model(theirs, inputs), **TOL)
                torch.testing.assert_close(run_model(ours, inputs), run_model(make_model(arch), inputs))
            ours.merge_adapter()
            torch.testing.assert_close(run_model(ours, inputs), unmerged, rtol=1e-4, atol=1e-5)
            ours.unmerge_adapter()
            torch.testing.assert_close(run_model(ours, inputs), unmerged, **unmerge_tol)
            merged = ours.merge_and_unload()
            assert not any(prefix in n for n, _ in merged.named_parameters())
            assert type(merged) is type(make_model(arch))
            theirs_merged = theirs.merge_and_unload()
            torch.testing.assert_close(run_model(merged, inputs), run_model(theirs_merged, inputs), **TOL)
        return merged, theirs_merged

    return check


def _backward(model, inputs):
    torch.manual_seed(0)  # the same dropout masks on both sides
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return loss.detach()


@pytest.fixture(scope="session")
def check_fused_path_matches_peft(make_inputs, run_model):
    """`check(ours, theirs, grad_atol)`, with the test on the `triton_backend` (the interpreter on a
    CPU): forward, then one training step's loss and every gradient, as peft's."""

    def check(ours, theirs, grad_atol):
        inputs = make_inputs("llama", batch=1, seq=5)
        with torch.no_grad():
            torch.testing.assert_close(run_model(ours, inputs), run_model(theirs, inputs), rtol=1e-4, atol=1e-5)
        ours.train()
        theirs.train()
        torch.testing.assert_close(_backward(ours, inputs), _backward(theirs, inputs), rtol=1e-4, atol=1e-5)
        grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
        for n, p in ours.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=grad_atol, msg=lambda m, n=n: f"{n}: {m}")

    return check


@pytest.fixture(scope="session")
def check_training_step_matches_peft(make_inputs):
    """`check(ours, theirs, arch) -> changed`: one backward gives peft's gradients; an SGD step on
    ours; returns the names of the parameters it changed."""

    def check(ours, theirs, arch):
        inputs = make_inputs(arch)
        before = {n: p.detach().clone() for n, p in ours.named_parameters()}
        for model in (ours, theirs):
            _backward(model, inputs)  # (seeded: GPT-2's own dropouts draw the same masks in both)
        grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
        for n, p in ours.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)
        torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1).step()
        return {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}

    return check


@pytest.fixture(scope="session")
def adam_steps():
    """`adam_steps(model, inputs, lr, steps=4, reseed=False) -> changed`: Adam steps on the tokens as
    labels (re-seeded before each forward when `reseed`); asserts the loss went down and returns
    the names of the parameters that moved."""

    def run(model, inputs, lr, steps=4, reseed=False):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            if reseed:
                torch.manual_seed(0)
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}

    return run


# -- composite methods (MAM, UniPELT): no peft oracle; checks against their own definition -------
def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="session")
def pl_check_own_generate(pl_greedy_by_forward):
    """`check(model)`: the model's generate == greedy decoding by its own forward (ids and every
    step's logits): the prefix sits in the cache once, the layer parts run at every step."""
    return lambda model, steps=4: _generate_as_forward(pl_greedy_by_forward, model, model, steps)


@pytest.fixture(scope="session")
def pl_round_trip(pl_base_model, pl_inputs, pl_perturb):
    """`round_trip(model, arch, tmp_path, cls, check_saved)`: perturbed, saved (`check_saved(tensors,
    config json)` reads the files), loaded back as a frozen `cls` with bit-exact logits and the same
    tensors, and loaded again as a second adapter of `model` that gives the same logits."""

    def run(model, arch, tmp_path, cls, check_saved):
        from safetensors.torch import load_file

        pl_perturb(model)
        inputs = pl_inputs(arch)
        expected = logits(model, inputs)
        model.save_pretrained(tmp_path)
        saved = load_file(tmp_path / "adapter_model.safetensors")
        check_saved(saved, json.loads((tmp_path / "adapter_config.json").read_text()))

        loaded = fastpeft.PeftModel.from_pretrained(pl_base_model(arch), tmp_path)
        assert isinstance(loaded, cls) and not any(p.requires_grad for p in loaded.parameters())
        assert torch.equal(logits(loaded, inputs), expected)
        again = loaded._adapter_state_dict("default")
        assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)

        model.load_adapter(tmp_path, adapter_name="copy")  # a second adapter, switched to by name
        model.set_adapter("copy")
        assert torch.equal(logits(model, inputs), expected)

    return run


@pytest.fixture(scope="session")
def pl_check_refused_checkpoint():
    """`check(saved_from, base, model, tmp_path, changes, match)`: `saved_from` saved with its config
    edited by `changes`; loading it onto `base` raises `match` and leaves `base` unchanged, and
    `model.load_adapter` raises, leaving `model` with its one adapter in every part."""

    def check(saved_from, base, model, tmp_path, changes, match):
        saved_from.save_pretrained(tmp_path)
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        state = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            fastpeft.PeftModel.from_pretrained(base, tmp_path)
        assert base.state_dict().keys() == state.keys() and all(torch.equal(base.state_dict()[k], v) for k, v in state.items())
        with pytest.raises(ValueError, match="does not fit"):
            model.load_adapter(tmp_path, adapter_name="bad")
        assert list(model.peft_config) == ["default"] and all(m.adapters == ["default"] for _, m in model._layers())

    return check


@pytest.fixture(scope="session")
def pl_check_lifecycle(pl_perturb):
    """`check(model, inputs, base, other) -> trainable`: disable runs the base alone (logits `base`);
    an added adapter `other` is not activated, set_adapter makes exactly its tensors trainable
    (returned), and deleting it restores the default adapter's logits."""

    def check(model, inputs, base, other):
        pl_perturb(model)
        default = logits(model, inputs)
        with model.disable_adapter():
            assert torch.equal(logits(model, inputs), base)
        assert torch.equal(logits(model, inputs), default)

        model.add_adapter("other", other)
        assert model.active_adapter == "default"
        model.set_adapter("other")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".other." in n for n in trainable)
        model.delete_adapter("other")
        assert model.active_adapter == "default" and torch.equal(logits(model, inputs), default)
        return trainable

    return check


@pytest.fixture(scope="session")
def pl_check_composite_refusals(make_model, pl_inputs):
    """`check(model, name, other)`: a composite (`name`: MAM|UniPELT) refuses merging, mixed batches,
    an adapter of another method (`other`) and one whose bottleneck has zero width, changing
    nothing; Prefix Tuning's model refuses the composite's config (it needs its own class)."""

    def check(model, name, other):
        config_cls, peft_type = type(model.active_peft_config), model.active_peft_config.peft_type
        for call in (model.merge_and_unload, model.merge_adapter):
            with pytest.raises(ValueError, match=f"{name} adapters cannot be merged"):
                call()
        with pytest.raises(NotImplementedError, match="mixed-adapter batches"):
            model(**pl_inputs("llama"), adapter_names=["default", "default"])
        with pytest.raises(ValueError, match=f"cannot add a {other.peft_type} adapter to a model holding {peft_type} adapters"):
            model.add_adapter("x", other)
        with pytest.raises(ValueError, match="reduction_factor=64 leaves a zero-width bottleneck"):
            model.add_adapter("z", config_cls(task_type="CAUSAL_LM", num_virtual_tokens=3, reduction_factor=64))
        assert list(model.peft_config) == ["default"] and list(model.prompt_encoder) == ["default"]
        assert all(m.adapters == ["default"] for _, m in model._layers())
        prefix = fastpeft.get_peft_model(make_model("llama"), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        with pytest.raises(ValueError, match=f"a {peft_type} adapter needs its own model class"):
            prefix.add_adapter("own", config_cls(task_type="CAUSAL_LM", num_virtual_tokens=3))

    return check


# -- QLoRA: our NF4 bases, and the same codes in bitsandbytes layers for real peft ---------------
# blocksize 32: with the tiny llama's K = 32, blocksize 64 hits bnb 0.50's CPU dequantize bug
# (tests/quant/test_nf4.py::test_bnb_cpu_dequantize_bug_is_theirs).
NF4_CONFIG = NF4Config(blocksize=32, double_quant=True, compute_dtype=torch.float32)


def _bnb_copy(quantized: nn.Module) -> nn.Module:
    """The same model with each fastpeft Linear4bit replaced by a bnb Linear4bit loaded from its
    state dict (the very same codes and statistics), as transformers loads a prequantized model."""
    pytest.importorskip("bitsandbytes")
    return to_bnb_model(copy.deepcopy(quantized), torch.float32)


def _nf4_base(peft_model) -> nn.Module:
    """The NF4 base alone of a fastpeft PEFT model (adapter layers unwrapped), a deep copy."""
    model = copy.deepcopy(peft_model.base_model.model)
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4LoraLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base_layer)
    return model


@pytest.fixture(scope="session")
def nf4(make_model):
    """`nf4.llama()`: the tiny Llama quantized here (NF4_CONFIG); `nf4.bnb_copy(model)`: the same
    codes in bitsandbytes layers (skips without bitsandbytes); `nf4.base(peft_model)`: its NF4 base."""
    return SimpleNamespace(llama=lambda: quantize_model(make_model("llama"), NF4_CONFIG),
                           bnb_copy=_bnb_copy, base=_nf4_base)
