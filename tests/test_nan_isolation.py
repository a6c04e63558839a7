"""Issue 18 item 1: a NaN or inf in one adapter of a bank never reaches the rows of other adapters
or of `__base__` in a mixed batch (CPU path: rows are selected from their own adapter, never
multiplied by a zero mask). Clean rows are bit-identical to the batch without the NaN."""
import pytest
import torch

import fastpeft as peft
from fastpeft.kernels import reference


def _bank(ranks, K, N, poison=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(ranks)
    lora_a = torch.randn(total, K, generator=g)
    lora_b = torch.randn(total, N, generator=g)
    offsets = torch.tensor([sum(ranks[:i]) for i in range(len(ranks))], dtype=torch.int32)
    if poison is not None:
        i, value = poison
        lora_a[offsets[i]: offsets[i] + ranks[i]] = value
        lora_b[offsets[i]: offsets[i] + ranks[i]] = value
    return lora_a, lora_b, offsets, torch.tensor(ranks, dtype=torch.int32), torch.rand(len(ranks), generator=g) + 0.5


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("path", ["grouped", "gathered"])
def test_reference_rows_isolated(value, path):
    ranks = [8, 2, 4]  # the poisoned adapter sits at row 0, where short adapters' unused slots point
    K, N = 12, 10
    token_ids = torch.tensor([1, -1, 2, 0, 1, 2, -1, 0], dtype=torch.int32)
    x = torch.randn(token_ids.numel(), K, generator=torch.Generator().manual_seed(3))
    weight = torch.randn(N, K)

    def run(bank):
        lora_a, lora_b, offsets, r, scal = bank
        if path == "gathered":
            return reference.multi_lora_gathered_fwd(x, weight, None, lora_a, lora_b, offsets, r, scal, 8, token_ids)
        order = sorted(range(len(token_ids)), key=lambda i: int(token_ids[i]))
        perm = torch.tensor(order, dtype=torch.int32)
        ids = [int(token_ids[i]) for i in order]
        seg_adapter, seg_start = [], [0]
        for pos, i in enumerate(ids):
            if not seg_adapter or seg_adapter[-1] != i:
                seg_adapter.append(i)
                seg_start.append(pos + 1)
            else:
                seg_start[-1] = pos + 1
        seg_start = torch.tensor(seg_start, dtype=torch.int32)
        counts = (seg_start[1:] - seg_start[:-1]).tolist()
        return reference.multi_lora_grouped_fwd(x, weight, None, lora_a, lora_b, offsets, r, scal, 8, perm,
                                                seg_start, torch.tensor(seg_adapter, dtype=torch.int32),
                                                len(seg_adapter), max(counts))

    clean = run(_bank(ranks, K, N))
    dirty = run(_bank(ranks, K, N, poison=(0, value)))
    others = token_ids != 0
    assert torch.isfinite(dirty[others]).all()
    assert torch.equal(dirty[others], clean[others])  # bit-identical
    assert not torch.isfinite(dirty[~others]).all()   # the poisoned adapter's own rows do show it


@pytest.mark.parametrize("order", [("bad", "a", "b"), ("a", "bad", "b")])
def test_mixed_batch_nan_in_other_adapter(make_model, order):
    torch.manual_seed(0)
    model = peft.get_peft_model(make_model("llama"), peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), adapter_name="first")
    ranks = {"bad": 8, "a": 2, "b": 4}
    for name in order:
        model.add_adapter(name, peft.LoraConfig(r=ranks[name], target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
    model.eval()
    ids = torch.randint(0, 96, (5, 6), generator=torch.Generator().manual_seed(1))
    names = ["a", "__base__", "b", "bad", "a"]
    clean = model(ids, adapter_names=names).logits
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "bad" in module.lora_B:
                module.lora_B["bad"].weight.fill_(float("nan"))
    dirty = model(ids, adapter_names=names).logits
    keep = [i for i, n in enumerate(names) if n != "bad"]
    assert torch.equal(dirty[keep], clean[keep])
    assert torch.isnan(dirty[3]).any()
