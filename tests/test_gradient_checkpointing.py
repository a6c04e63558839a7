"""Issue 18 item 8: prefix methods (prefix tuning, MAM, UniPELT) under transformers' gradient
checkpointing. Its GradientCheckpointingLayer (and GPT-2's model loop) drop the cache that carries
the prefixes; fastpeft hands the layers a read-only prefix cache instead, so loss and gradients
equal the run without checkpointing (fp32, 1e-5), and the layers really are checkpointed."""
import pytest
import torch

import fastpeft as peft

CONFIGS = {
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "mam": lambda: peft.MAMConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "unipelt": lambda: peft.UniPELTConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}


def _run(make_model, arch, method, checkpointing):
    base = make_model(arch)  # first: building the arch's weights the first time reseeds the RNG
    torch.manual_seed(1)
    model = peft.get_peft_model(base, CONFIGS[method]())
    model.train()
    calls = []
    if checkpointing:
        model.base_model.gradient_checkpointing_enable()
        for module in model.modules():
            if getattr(module, "_gradient_checkpointing_func", None) is not None:
                real = module._gradient_checkpointing_func
                module._gradient_checkpointing_func = lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, len(calls)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_prefix_methods_with_gradient_checkpointing(make_model, arch, method):
    loss, grads, _ = _run(make_model, arch, method, checkpointing=False)
    loss_gc, grads_gc, calls = _run(make_model, arch, method, checkpointing=True)
    assert calls > 0  # the layers were checkpointed (recomputed in backward)
    torch.testing.assert_close(loss_gc, loss, rtol=1e-5, atol=1e-5)
    assert grads_gc.keys() == grads.keys() and grads
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=1e-5, atol=1e-5, msg=name)
