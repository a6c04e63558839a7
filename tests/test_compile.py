"""torch.compile sees fastpeft's fused ops as `torch.ops.fastpeft.*` custom ops (fake kernels,
registered autograd): a LoRA and a QLoRA model trace with 0 graph breaks and, compiled with
`aot_eager` and fullgraph=True, give the eager outputs and grads (fp32, 1e-5)."""
import pytest
import torch

import fastpeft


def _model(kind, make_model):
    base = make_model("qv")
    torch.manual_seed(0)
    if kind == "qlora":
        base = fastpeft.quantize_model(base, fastpeft.NF4Config(blocksize=32, skip_modules=[]))
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    return model


def test_every_fused_op_is_a_torch_library_op():
    for name in ("lora_linear", "lora_linear_dx", "nf4_linear", "nf4_linear_dx", "multi_lora_linear",
                 "bottleneck_adapter"):
        assert hasattr(torch.ops.fastpeft, name), name


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_compiles_fullgraph_with_no_graph_break_and_equals_eager(kind, make_model):
    model = _model(kind, make_model)
    x = torch.randn(2, 5, 32)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    op = "fastpeft.lora_linear" if kind == "lora" else "fastpeft.nf4_linear"
    assert any(op in g.code for g in explained.graphs)  # one opaque node per layer
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    want = model(x)
    got = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    want.square().sum().backward()
    assert grads
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-5)


# -- torch.library.opcheck: schema, fake kernel, autograd registration and AOT dispatch of each op
def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_(True)


def test_opcheck_lora_ops():
    x, w, b, A, B = _leaf(5, 12), _leaf(7, 12), _leaf(7), _leaf(3, 12), _leaf(7, 3)
    e, f = _leaf(3), torch.rand(7, dtype=torch.float64) + 0.5
    _opcheck(torch.ops.fastpeft.lora_linear.default, (x, w, b, A, B, 0.5, "torch", None, None))
    _opcheck(torch.ops.fastpeft.lora_linear.default, (x, w, None, A, B, 2.0, "torch", e, f))
    dz = torch.randn(5, 7, dtype=torch.float64)
    _opcheck(torch.ops.fastpeft.lora_linear_dx.default, (dz, w.detach(), A.detach(), B.detach(), 0.5, "torch", None))


@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck_nf4_ops(double_quant):
    from fastpeft.ops.nf4 import flat_nf4, nf4_args

    torch.manual_seed(0)
    q = fastpeft.ops.nf4_quantize(torch.randn(8, 64), blocksize=64, double_quant=double_quant)
    flat = flat_nf4(nf4_args(q))
    x, b, A, B = torch.randn(3, 64, requires_grad=True), _leaf(8).float(), _leaf(2, 64).float(), _leaf(8, 2).float()
    b, A, B = (t.detach().requires_grad_(True) for t in (b, A, B))
    _opcheck(torch.ops.fastpeft.nf4_linear.default, (x, *flat, b, A, B, 0.5, "torch", None, None))
    _opcheck(torch.ops.fastpeft.nf4_linear.default, (x, *flat, None, None, None, 1.0, "torch", None, None))
    dz = torch.randn(3, 8)
    _opcheck(torch.ops.fastpeft.nf4_linear_dx.default, (dz, *flat, A.detach(), B.detach(), 0.5, "torch", None))


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_opcheck_bottleneck_adapter(activation):
    x, dw, db, uw, ub = _leaf(6, 16), _leaf(4, 16), _leaf(4), _leaf(16, 4), _leaf(16)
    op = torch.ops.fastpeft.bottleneck_adapter.default
    _opcheck(op, (x, dw, db, uw, ub, None, 0.5, activation, "torch"))           # serial (Houlsby)
    _opcheck(op, (x, dw, None, uw, None, _leaf(6, 16), 2.0, activation, "torch"))  # parallel


def _bank_and_batch(T):
    from fastpeft.batching import TokenGroups
    from fastpeft.multi import AdapterBank

    torch.manual_seed(0)
    bank = AdapterBank(16, 8, torch.float32, "cpu")
    bank.add(0, torch.randn(2, 16), torch.randn(8, 2), 0.5)
    bank.add(2, torch.randn(4, 16), torch.randn(8, 4), 2.0)
    bank.reserve_ids(3)
    return bank, TokenGroups([2, -1, 0, 2], T, "cpu")


@pytest.mark.parametrize("grouped", [False, True])
def test_opcheck_multi_lora_linear(grouped):
    bank, g = _bank_and_batch(3)
    x, w, b = torch.randn(12, 16), torch.randn(8, 16), torch.randn(8)
    head = (x, w, b, bank.lora_a, bank.lora_b, bank.offsets, bank.ranks, bank.scalings, 4, 8, g.token_ids)
    none_nf4 = (None, None, 0, None, None, None, None)
    if grouped:
        args = (*head, g.perm, g.seg_start, g.seg_adapter, g.num_segments, g.max_segment, "torch", *none_nf4, [])
    else:
        args = (*head, None, None, None, 0, 0, "torch", *none_nf4, [])
    _opcheck(torch.ops.fastpeft.multi_lora_linear.default, args)
    want = fastpeft.ops.multi_lora_linear(x, w, b, bank, g, path="grouped" if grouped else "gathered")
    torch.testing.assert_close(torch.ops.fastpeft.multi_lora_linear(*args), want)
