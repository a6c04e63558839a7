"""QLoRA fine-tuning with FSDP2 on N processes: an NF4 base sharded across ranks, LoRA trained,
the adapter written in PEFT's format by rank 0.

    # CPU smoke test (gloo), a tiny Llama built from a config:
    torchrun --nproc-per-node 2 examples/qlora_fsdp.py --device cpu --steps 3
    # a real model on a multi-GPU node (nccl, bf16 compute):
    torchrun --nproc-per-node 8 examples/qlora_fsdp.py --model meta-llama/Llama-3.1-8B --steps 1000

The adapter in --output loads in PEFT: `peft.PeftModel.from_pretrained(base, output)` over the
same base quantized by bitsandbytes (or fastpeft). See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import fastpeft
from fastpeft import distributed
from fastpeft.optim import AdamW8bit

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Hugging Face id or path; default: a tiny Llama from a config")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--output", default="qlora-fsdp-adapter")
    p.add_argument("--checkpoint", default=None, help="also write a DCP checkpoint (model + optimizer) here")
    return p.parse_args()


def load_base(name: str | None, compute_dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same weights on every rank
    if name is None:
        base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=128))
    else:
        base = AutoModelForCausalLM.from_pretrained(name, torch_dtype=compute_dtype)
    return fastpeft.quantize_model(base, fastpeft.NF4Config(blocksize=64, double_quant=True,
                                                            compute_dtype=compute_dtype))


def main() -> None:
    args = parse_args()
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    compute_dtype = torch.bfloat16 if cuda else torch.float32

    # quantize on the CPU; fully_shard moves layer by layer to the device, keeping only this
    # rank's shard of each there
    model = fastpeft.get_peft_model(load_base(args.model, compute_dtype),
                                    fastpeft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                        target_modules=TARGETS, task_type="CAUSAL_LM"))
    mp = None
    if cuda:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    distributed.shard_model(model, mp_policy=mp)
    here, total = distributed.nf4_storage_bytes(model)
    if rank == 0:
        model.print_trainable_parameters()
        print(f"NF4 storage on rank 0: {here:,d} of {total:,d} bytes ({here / max(total, 1):.2f})")

    optimizer = AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    vocab = model.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(1234 + rank)  # synthetic data; a real run uses a sharded dataloader
    model.train()
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        dist.all_reduce(loss)
        if rank == 0:
            print(f"step {step + 1}/{args.steps}  loss {loss.item() / world:.4f}  {time.perf_counter() - t0:.2f}s")

    if args.checkpoint:
        distributed.save_checkpoint(model, optimizer, args.checkpoint)
    distributed.save_adapter(model, args.output)
    if rank == 0:
        print(f"adapter written to {args.output} (PEFT format)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
