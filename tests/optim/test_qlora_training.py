"""QLoRA end to end with fastpeft alone: quantize_model -> get_peft_model(LoraConfig) ->
PagedAdamW8bit over the trainable parameters (the README's example), on the tiny Llama.

Rank 128 on the 32-wide model makes q_proj's lora_A [128, 32] and lora_B [32, 128] 4,096
elements each, so they take the 8-bit path, while v_proj's lora_B [16, 128] keeps fp32 moments:
both state kinds are exercised. On a CPU the paged state stays in host memory.
"""
import torch

import fastpeft as peft
from fastpeft.optim import PagedAdamW8bit


def test_qlora_training_with_paged_adamw8bit(make_model, make_inputs):
    model = peft.quantize_model(make_model("llama"), peft.NF4Config(blocksize=64, double_quant=True))
    model = peft.get_peft_model(model, peft.LoraConfig(r=128, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = PagedAdamW8bit(trainable, lr=2e-2)
    batch = make_inputs("llama", batch=4, seq=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    # random tokens on a random 2-layer model: a slow but steady fall (about 6% in 15 steps)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.97 * losses[0], losses
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)
    assert {k for k in before if "lora_B" in k} <= changed  # every B moved off its zero init
    # the NF4 storage (codes, absmaxes, nested absmaxes, maps) is bit-identical
    nf4 = [m for m in model.modules() if isinstance(m, peft.Linear4bit)]
    assert nf4
    for key in before:
        if "lora_" not in key:
            assert torch.equal(before[key], after[key]) and before[key].dtype == after[key].dtype, key
    kinds = {"8-bit" if "exp_avg_codes" in s else "fp32" for s in optimizer.state.values()}
    assert kinds == {"8-bit", "fp32"}
