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
    for name in ("lora_linear", "lora_linear_dx", "nf4_linear", "nf4_linear_dx"):
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
