"""What each rank runs in tests/distributed (imported by name in spawned processes: tests/ is not a package).

`run(fn, world)` spawns `world` gloo ranks on this machine with torch.multiprocessing; each calls
`fn(rank, world, **kwargs)` and rank 0's return value comes back to the caller.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import fastpeft  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, VOCAB = 4, 12, 128


def base_model(kind: str = "qlora", seed: int = 0, compute_dtype=torch.float32):
    """A tiny Llama from a config (fixed seed), NF4-quantized (blocksize 64, double quant) for
    "qlora". K is 64 or 128: a multiple of the blocksize, clear of bnb 0.50's CPU dequantize bug."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config)
    if kind == "qlora":
        base = fastpeft.quantize_model(base, fastpeft.NF4Config(blocksize=64, double_quant=True,
                                                                compute_dtype=compute_dtype))
    return base


def build(kind: str = "qlora", seed: int = 0, compute_dtype=torch.float32, frozen_adapter: bool = False):
    """`base_model(kind)` with LoRA on every linear layer ("prompt": prompt tuning on the plain
    model); lora_B random too (seeded), so the first step already runs the adapter's forward and
    backward. `frozen_adapter`: a second, inactive LoRA adapter (frozen) rides along."""
    if kind == "prompt":
        torch.manual_seed(seed)
        return fastpeft.get_peft_model(base_model("lora", seed), fastpeft.PromptTuningConfig(
            num_virtual_tokens=4, task_type="CAUSAL_LM"))
    base = base_model(kind, seed, compute_dtype)
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    if frozen_adapter:
        model.add_adapter("frozen", fastpeft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def batches(steps: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(steps)]


def shard_of(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return batch.chunk(world)[rank]


def train(model, optimizer, data, rank: int = 0, world: int = 1) -> list[float]:
    """Steps on this rank's slice of each batch; returns the full-batch mean loss of each step."""
    losses = []
    for batch in data:
        ids = shard_of(batch, rank, world) if world > 1 else batch
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn_name: str, kwargs: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = globals()[fn_name](rank, world, **kwargs)
        if rank == 0:
            torch.save(result, out)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    except BaseException:
        traceback.print_exc()  # before another rank's abort can hide it
        raise
    finally:
        dist.destroy_process_group()


def run(fn, world: int = 2, **kwargs):
    """Spawn `world` gloo ranks running `fn` (a function of this module); rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_entry, args=(world, _free_port(), fn.__name__, kwargs, out), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


# -- what the ranks run -------------------------------------------------------------------------

def _optimizer(model, name: str):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw8bit":
        from fastpeft.optim import AdamW8bit

        return AdamW8bit(params, lr=1e-2)
    return torch.optim.AdamW(params, lr=1e-2)


def _adapter(model) -> dict[str, torch.Tensor]:
    """The LoRA tensors, full (gathered from FSDP2 shards where sharded)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def ddp_train(rank: int, world: int, kind: str = "qlora", steps: int = 3, frozen_adapter: bool = False):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(build(kind, frozen_adapter=frozen_adapter))  # find_unused_parameters=False
    opt = _optimizer(model, "adamw")
    losses = train(model, opt, batches(steps), rank, world)
    return {"losses": losses, "adapter": {k.removeprefix("module."): v for k, v in _adapter(model).items()}}


def fsdp_train(rank: int, world: int, kind: str = "qlora", steps: int = 3, optim: str = "adamw"):
    """FSDP2 training; also what one decoder layer's NF4 linear sees at forward time."""
    from fastpeft import distributed
    from fastpeft.quant.nf4 import Linear4bit

    model = build(kind)
    distributed.shard_model(model)
    local, total = distributed.nf4_storage_bytes(model)
    seen = []
    if kind == "qlora":  # the LoRA layer over the first NF4 base: it reads the base's storage
        lora = next(m for m in model.modules() if isinstance(getattr(m, "base_layer", None), Linear4bit))
        sharded = [type(getattr(lora.base_layer, n)).__name__
                   for n in ("weight", "weight_absmax", "weight_nested_absmax")]
        lora.register_forward_pre_hook(lambda m, _: seen.append((type(m.base_layer.weight).__name__,
                                                                 m.base_layer.weight.dtype,
                                                                 tuple(m.base_layer.weight.shape))))
    else:
        sharded = []
    losses = train(model, _optimizer(model, optim), batches(steps), rank, world)
    return {"losses": losses, "local_bytes": local, "total_bytes": total, "sharded": sharded,
            "seen": seen[:1], "adapter": _adapter(model)}


def fsdp_bf16(rank: int, world: int, steps: int = 2):
    """FSDP2 with MixedPrecisionPolicy(param_dtype=bf16) over an NF4 base computing in bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from fastpeft import distributed
    from fastpeft.quant.nf4 import Linear4bit

    model = build("qlora", compute_dtype=torch.bfloat16)
    distributed.shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                  reduce_dtype=torch.float32))
    lora = next(m for m in model.modules() if isinstance(getattr(m, "base_layer", None), Linear4bit))
    seen = []
    lora.register_forward_pre_hook(lambda m, args: seen.append((m.base_layer.weight.dtype, args[0].dtype)))
    losses = train(model, _optimizer(model, "adamw"), batches(steps), rank, world)
    return {"losses": losses, "seen": seen[:1]}


def fsdp_save_adapter(rank: int, world: int, out: str, steps: int = 2):
    """Train sharded, write the adapter through fastpeft.distributed, return the logits."""
    from fastpeft import distributed

    model = build("qlora")
    distributed.shard_model(model)
    train(model, _optimizer(model, "adamw"), batches(steps), rank, world)
    distributed.save_adapter(model, out)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batches(1, seed=7)[0]).logits
    return {"logits": logits}


def fsdp_resume(rank: int, world: int, ckpt: str, optim: str = "adamw8bit"):
    """2 steps, a DCP checkpoint, 2 more steps; then a fresh model + optimizer resumed from the
    checkpoint run the same 2 steps again."""
    from fastpeft import distributed

    data = batches(4)
    model = build("qlora")
    distributed.shard_model(model)
    opt = _optimizer(model, optim)
    first = train(model, opt, data[:2], rank, world)
    distributed.save_checkpoint(model, opt, ckpt)
    straight = train(model, opt, data[2:], rank, world)
    want = _adapter(model)

    fresh = build("qlora", seed=1)  # other weights, so that only the checkpoint can make them equal
    distributed.shard_model(fresh)
    fresh_opt = _optimizer(fresh, optim)
    distributed.load_checkpoint(fresh, fresh_opt, ckpt)
    resumed = train(fresh, fresh_opt, data[2:], rank, world)
    got = _adapter(fresh)
    return {"first": first, "straight": straight, "resumed": resumed,
            "adapter_equal": all(torch.equal(want[k], got[k]) for k in want)}


def bnb_copy(model):
    """The model with each fastpeft Linear4bit replaced by a bitsandbytes Linear4bit holding the
    very same codes (from its bnb-format state dict), for real PEFT."""
    from fastpeft.bench.nf4 import to_bnb_model

    return to_bnb_model(model, torch.float32)
