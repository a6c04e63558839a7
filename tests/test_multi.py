"""Mixed-adapter batches (`adapter_names=`) for LoRA models: against each row run alone, against
real peft's mixed batch (forward and generate, beam search included) on the same checkpoints,
over an NF4 base, PEFT's errors, and the adapter bank."""

import warnings

import pytest
import torch

import fastpeft
from fastpeft.multi import AdapterBank, sync_banks

peft = pytest.importorskip("peft")

# name -> LoraConfig kwargs: ranks 1..16, one adapter on fewer modules, one rsLoRA.
ADAPTERS = {
    "llama": {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "b": dict(r=1, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"]),
        "c": dict(r=16, lora_alpha=8, target_modules=["q_proj"], use_rslora=True),
        "d": dict(r=8, lora_alpha=16, target_modules=["v_proj", "down_proj", "o_proj"]),
    },
    "bert": {
        "a": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
        "b": dict(r=16, lora_alpha=4, target_modules=["query", "value", "dense"], exclude_modules=["pooler.dense"]),
        "c": dict(r=1, lora_alpha=2, target_modules=["key"]),
    },
}
NAMES = {"llama": ["a", "__base__", "b", "c", "a", "d"], "bert": ["b", "a", "__base__", "c", "b"]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Directories written by real peft, one per adapter, with random (non-zero) A and B."""
    cache = {}

    def make(arch, make_model):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"multi_{arch}")
            for i, (name, kwargs) in enumerate(ADAPTERS[arch].items()):
                torch.manual_seed(100 + i)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = peft.get_peft_model(make_model(arch), peft.LoraConfig(init_lora_weights=False, **kwargs))
                model.save_pretrained(root / name)
            cache[arch] = root
        return cache[arch]

    return make


def load_all(lib, base, root, names):
    first, *rest = names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.PeftModel.from_pretrained(base, root / first, adapter_name=first)
        for name in rest:
            model.load_adapter(root / name, adapter_name=name)
    return model.eval()


def run(model, inputs, **kwargs):
    with torch.no_grad():
        out = model(**inputs, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def row_by_row(model, inputs, names):
    """Each row with its adapter alone (set_adapter / disable_adapter) over the whole batch."""
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(run(model, inputs)[i])
        else:
            model.set_adapter(name)
            rows.append(run(model, inputs)[i])
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_mixed_batch_equals_rows_alone_and_peft(arch, make_model, make_inputs, checkpoints):
    root = checkpoints(arch, make_model)
    names = NAMES[arch]
    inputs = make_inputs(arch, batch=len(names), seq=6)
    ours = load_all(fastpeft, make_model(arch), root, list(ADAPTERS[arch]))
    theirs = load_all(peft, make_model(arch), root, list(ADAPTERS[arch]))
    got = run(ours, inputs, adapter_names=names)
    torch.testing.assert_close(got, run(theirs, inputs, adapter_names=names), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, row_by_row(ours, inputs, names), atol=2e-5, rtol=2e-5)
    base = run(make_model(arch), inputs)
    assert not torch.allclose(got[0], base[0], atol=1e-3), "the adapters must change the output"
    torch.testing.assert_close(got[names.index("__base__")], base[names.index("__base__")])


def test_mixed_batch_on_triton_kernels(make_model, make_inputs, checkpoints, triton_backend):
    """Under the interpreter: a long prompt takes the grouped kernel, decode steps the gathered one."""
    root = checkpoints("llama", make_model)
    ours = load_all(fastpeft, make_model("llama"), root, list(ADAPTERS["llama"]))
    names = ["d", "__base__", "a", "d"]  # 4 rows x 17 tokens over 3 groups: segments >= 16 tokens
    inputs = make_inputs("llama", batch=4, seq=17)
    got = run(ours, inputs, adapter_names=names)
    torch.testing.assert_close(got, row_by_row(ours, inputs, names), atol=1e-4, rtol=1e-4)
    ids = inputs["input_ids"][:, :3]
    got = ours.generate(ids, adapter_names=names, max_new_tokens=2, do_sample=False, pad_token_id=0,
                        attention_mask=torch.ones_like(ids))
    for row, name in [(0, "d"), (2, "a")]:
        ours.set_adapter(name)
        want = ours.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(ids))
        assert got[row].tolist() == want[row].tolist()


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_mixed_names_equals_each_adapter_alone(num_beams, make_model, checkpoints):
    root = checkpoints("llama", make_model)
    ours = load_all(fastpeft, make_model("llama"), root, list(ADAPTERS["llama"]))
    names = ["c", "__base__", "a", "b"]
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 96, (len(names), 5), generator=g)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, num_beams=num_beams, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    got = ours.generate(ids, adapter_names=names, **kwargs)
    theirs = load_all(peft, make_model("llama"), root, list(ADAPTERS["llama"]))
    assert torch.equal(got, theirs.generate(input_ids=ids, adapter_names=names, **kwargs)), "peft's mixed generate"
    for i, name in enumerate(names):
        if name == "__base__":
            with ours.disable_adapter():
                want = ours.generate(ids[i:i + 1], **{**kwargs, "attention_mask": kwargs["attention_mask"][i:i + 1]})
        else:
            ours.set_adapter(name)
            want = ours.generate(ids[i:i + 1], **{**kwargs, "attention_mask": kwargs["attention_mask"][i:i + 1]})
        assert got[i].tolist() == want[0].tolist(), f"row {i} ({name})"  # min_new_tokens: no early EOS
    assert len({tuple(r.tolist()) for r in got}) > 1, "the adapters must change the generations"


def test_peft_errors(make_model, make_inputs, checkpoints):
    root = checkpoints("llama", make_model)
    ours = load_all(fastpeft, make_model("llama"), root, ["a", "b"])
    inputs = make_inputs("llama", batch=2, seq=4)
    with pytest.raises(ValueError, match="non-existing adapter\\(s\\): nope, zz"):
        run(ours, inputs, adapter_names=["zz", "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs, "
                                         "but got 3 and 2"):
        run(ours, inputs, adapter_names=["a", "b", "a"])
    with pytest.raises(TypeError, match="expected a list of str"):
        run(ours, inputs, adapter_names="a")
    ours.train()
    with pytest.raises(ValueError, match="training mode"):
        run(ours, inputs, adapter_names=["a", "b"])
    ours.eval()
    ours.merge_adapter(["b"])
    with pytest.raises(ValueError, match="merged adapters"):
        run(ours, inputs, adapter_names=["a", "b"])
    ours.unmerge_adapter()
    ours.add_adapter("dora", fastpeft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        run(ours, inputs, adapter_names=["dora", "a"])
    assert all(layer.mixed_batch is None for _, layer in ours.base_model.adapter_layers()), "state left behind"
    run(ours, inputs, adapter_names=["a", "__base__"])  # a DoRA adapter elsewhere in the model is fine (PEFT)


def test_bank_keeps_others_in_place_and_follows_weight_updates(make_model, make_inputs, checkpoints):
    root = checkpoints("llama", make_model)
    ours = load_all(fastpeft, make_model("llama"), root, ["a", "b", "d"])
    ids = dict(sync_banks(ours))
    layer = ours.base_model.model.model.layers[0].self_attn.v_proj
    bank, spans = layer.multi_bank, dict(layer.multi_bank.spans)
    ours.delete_adapter("b")
    sync_banks(ours)
    assert layer.multi_bank is bank and ids["b"] not in bank.spans
    assert {n: bank.spans[ids[n]] for n in "ad"} == {n: spans[ids[n]] for n in "ad"}, "others moved"
    ours.load_adapter(root / "b", adapter_name="b2")  # same rank: takes b's freed id and rows
    assert sync_banks(ours)["b2"] == ids["b"] and bank.spans[ids["b"]] == spans[ids["b"]]
    with torch.no_grad():  # an in-place change of one adapter's weights reaches the bank
        layer.lora_B["d"].weight.mul_(3.0)
    inputs = make_inputs("llama", batch=2, seq=4)
    names = ["d", "b2"]
    torch.testing.assert_close(run(ours, inputs, adapter_names=names), row_by_row(ours, inputs, names),
                               atol=2e-5, rtol=2e-5)


def test_a_mixed_batch_syncs_only_its_own_adapters(make_model, make_inputs, checkpoints):
    """The host cost of a mixed call must not grow with the number of adapters registered: a bank
    copies the batch's adapters only, and drops an adapter once its layer no longer holds it."""
    root = checkpoints("llama", make_model)
    ours = load_all(fastpeft, make_model("llama"), root, ["a", "b", "d"])
    layer = ours.base_model.model.model.layers[0].self_attn.v_proj  # holds a, b, d
    inputs = make_inputs("llama", batch=2, seq=3)
    run(ours, inputs, adapter_names=["a", "__base__"])
    ids = ours.base_model._adapter_ids.ids
    assert set(layer.multi_bank.spans) == {ids["a"]}
    names = ["d", "a"]
    torch.testing.assert_close(run(ours, inputs, adapter_names=names), row_by_row(ours, inputs, names),
                               atol=2e-5, rtol=2e-5)
    assert set(layer.multi_bank.spans) == {ids["a"], ids["d"]}
    ours.delete_adapter("a")
    run(ours, inputs, adapter_names=["d", "d"])
    assert set(layer.multi_bank.spans) == {ids["d"]}, "a deleted adapter's rows are freed"


def test_a_data_swap_reaches_the_bank(make_model, make_inputs, checkpoints):
    """`param.data = t` keeps the version counter: the bank must notice the new storage."""
    root = checkpoints("llama", make_model)
    ours = load_all(fastpeft, make_model("llama"), root, ["a", "d"])
    inputs = make_inputs("llama", batch=2, seq=3)
    names = ["d", "a"]
    before = run(ours, inputs, adapter_names=names)
    layer = ours.base_model.model.model.layers[1].mlp.down_proj
    layer.lora_B["d"].weight.data = layer.lora_B["d"].weight.data * 5.0
    got = run(ours, inputs, adapter_names=names)
    assert not torch.allclose(got[0], before[0], atol=1e-4)
    torch.testing.assert_close(got, row_by_row(ours, inputs, names), atol=2e-5, rtol=2e-5)


def test_mixed_batch_on_triton_kernels_when_a_layer_holds_none_of_its_adapters(
        make_model, make_inputs, checkpoints, triton_backend):
    """"c" sits on q_proj only: every other LoRA layer's bank holds none of the batch's adapters
    (an empty bank), through the gathered kernel (2 rows x 5 tokens) and the grouped one (2 x 17)."""
    root = checkpoints("llama", make_model)
    ours = load_all(fastpeft, make_model("llama"), root, ["a", "c", "d"])
    for seq in (5, 17):
        inputs = make_inputs("llama", batch=2, seq=seq)
        names = ["c", "__base__"]
        torch.testing.assert_close(run(ours, inputs, adapter_names=names), row_by_row(ours, inputs, names),
                                   atol=1e-4, rtol=1e-4)


def test_bank_refuses_a_rank_that_differs_from_its_record():
    bank = AdapterBank(6, 5, torch.float32, "cpu")
    bank.add(0, torch.randn(2, 6), torch.randn(5, 2), 1.0)
    with pytest.raises(ValueError, match="rank 3 differs from the bank's record 2"):
        bank.update(0, torch.randn(3, 6), torch.randn(5, 3), 1.0)
    with pytest.raises(ValueError, match="expected lora_A"):
        bank.add(1, torch.randn(2, 7), torch.randn(5, 2), 1.0)
    assert 1 not in bank.spans, "nothing half-registered"


def test_cached_bank_tables_follow_every_bank_change():
    """ops caches the reference's per-bank gather tables; each change must reach the next call."""
    bank = AdapterBank(6, 5, torch.float32, "cpu")
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    ids = torch.tensor([0, 1, -1, 1])

    def check():
        got = fastpeft.ops.multi_lora_linear(x, w, None, bank, ids, backend="torch")
        want = fastpeft.kernels.reference.multi_lora_gathered_fwd(  # tables computed afresh
            x, w, None, bank.lora_a, bank.lora_b, bank.offsets, bank.ranks, bank.scalings,
            max(r for _, r in bank.spans.values()), ids)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)

    bank.add(0, torch.randn(2, 6), torch.randn(5, 2), 1.5)
    bank.add(1, torch.randn(3, 6), torch.randn(5, 3), 0.5)
    check()
    bank.update(1, torch.randn(3, 6), torch.randn(5, 3), 4.0)  # new scale
    check()
    bank.remove(1)
    bank.add(1, torch.randn(5, 6), torch.randn(5, 5), 2.0)  # new rank and rows
    check()
    bank.add(7, torch.randn(2, 6), torch.randn(5, 2), 1.0)  # the id tables grow
    check()


def test_ops_multi_lora_linear_with_token_ids_and_bad_ids():
    bank = AdapterBank(6, 5, torch.float32, "cpu")
    bank.add(0, torch.randn(2, 6), torch.randn(5, 2), 1.5)
    bank.add(1, torch.randn(4, 6), torch.randn(5, 4), 0.5)
    x, w, b = torch.randn(3, 6), torch.randn(5, 6), torch.randn(5)
    got = fastpeft.ops.multi_lora_linear(x, w, b, bank, torch.tensor([1, -1, 0]))
    want = torch.stack([
        fastpeft.ops.lora_linear(x[0], w, b, bank.lora_a[2:6], bank.lora_b[2:6].t(), 0.5),
        torch.nn.functional.linear(x[1], w, b),
        fastpeft.ops.lora_linear(x[2], w, b, bank.lora_a[:2], bank.lora_b[:2].t(), 1.5),
    ])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="adapter id 2 out of range"):
        fastpeft.ops.multi_lora_linear(x, w, b, bank, torch.tensor([2, 0, 0]))
    with pytest.raises(ValueError, match="adapter id -2 out of range"):
        fastpeft.ops.multi_lora_linear(x, w, b, bank, torch.tensor([-2, 0, 0]))
    with pytest.raises(ValueError, match="token_adapter_ids must be integer \\[3\\]"):
        fastpeft.ops.multi_lora_linear(x, w, b, bank, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"bank.lora_a must be \[6, 6\] torch.float16"):  # the bank's dtype
        fastpeft.ops.multi_lora_linear(x.half(), w.half(), b.half(), bank, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"bank.lora_b must be \[6, 4\]"):  # a bank for another layer
        fastpeft.ops.multi_lora_linear(x, w[:4], b[:4], bank, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="inference only"):
        fastpeft.ops.multi_lora_linear(x.requires_grad_(), w, b, bank, torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("tokens_per_row", [1, 3, 8])
def test_cpu_paths_agree_with_each_token_alone(tokens_per_row):
    """The torch path picks per-row gathering (rows at least rank-long, or no shared adapter) or
    token segments (else); every choice equals each token through its own adapter."""
    from fastpeft.batching import TokenGroups

    torch.manual_seed(0)
    K, N = 12, 7
    bank = AdapterBank(K, N, torch.float32, "cpu")
    adapters = {0: (torch.randn(2, K), torch.randn(N, 2), 1.5), 1: (torch.randn(8, K), torch.randn(N, 8), 0.5),
                2: (torch.randn(5, K), torch.randn(N, 5), 2.0)}
    for i, (a, b, s) in adapters.items():
        bank.add(i, a, b, s)
    row_ids = [2, -1, 0, 2, 1, 0]
    x, w, bias = torch.randn(len(row_ids), tokens_per_row, K), torch.randn(N, K), torch.randn(N)
    want = torch.nn.functional.linear(x, w, bias)
    for row, i in enumerate(row_ids):
        if i >= 0:
            a, b, s = adapters[i]
            want[row] += s * (x[row] @ a.t()) @ b.t()
    groups = TokenGroups(row_ids, tokens_per_row, "cpu")
    for path in (None, "grouped", "gathered"):
        got = fastpeft.ops.multi_lora_linear(x, w, bias, bank, groups, backend="torch", path=path)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_batch_over_an_nf4_base(backend, make_model, make_inputs, checkpoints, monkeypatch):
    """Multi-tenant QLoRA: adapters over a fastpeft NF4 base, mixed batch == each row alone."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    root = checkpoints("llama", make_model)
    base = fastpeft.quantize_model(make_model("llama"), fastpeft.NF4Config(blocksize=64, double_quant=True))
    ours = load_all(fastpeft, base, root, ["a", "c", "d"])
    names = ["c", "__base__", "a", "d", "c"]
    inputs = make_inputs("llama", batch=len(names), seq=5)
    got = run(ours, inputs, adapter_names=names)
    torch.testing.assert_close(got, row_by_row(ours, inputs, names), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [1, 17])  # the gathered kernel (decode) and the grouped one (prefill)
def test_a_mixed_forward_captures_in_a_cuda_graph(seq, make_model, checkpoints):
    """The layers of a mixed forward do no host synchronisation: inside one `mixed_batch` (whose
    metadata the first, eager, forward built), the forward is captured in a CUDA graph and its
    replay equals the eager output, on the Triton kernels."""
    from fastpeft import multi

    root = checkpoints("llama", make_model)
    ours = load_all(fastpeft, make_model("llama"), root, list(ADAPTERS["llama"])).cuda()
    names = ["a", "__base__", "d", "c", "a", "b"]
    ids = torch.randint(1, 96, (len(names), seq), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad(), multi.mixed_batch(ours, names):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: metadata, autotuning, allocator
            want = ours.base_model(input_ids=ids, use_cache=False).logits.clone()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = ours.base_model(input_ids=ids, use_cache=False).logits
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
