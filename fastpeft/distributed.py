"""Scale-out training on torch.distributed: FSDP2 over an NF4 base, PEFT-format adapters from a
sharded run, and DCP checkpoints that resume model and optimizer (docs/distributed.md).

- `shard_model(model)` applies `torch.distributed.fsdp.fully_shard` to every decoder layer and
  then to the root. A fastpeft `Linear4bit` keeps its NF4 weight in frozen uint8 parameters with
  one row per quantization block (codes, absmax bytes, nested absmax bytes), so FSDP2's dim-0
  chunks give each rank whole blocks, a block's codes and absmax on the same rank; the
  all-gather before a layer's forward moves those bytes (4-bit codes, not a dequantized copy),
  and a `MixedPrecisionPolicy(param_dtype=torch.bfloat16)` casts only the floating parameters.
- `save_adapter(model, directory)` gathers the trainable tensors through
  `torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True,
  cpu_offload=True)` and writes them from rank 0 in PEFT's format (adapter_config.json +
  adapter_model.safetensors); every rank must call it.
- `save_checkpoint` / `load_checkpoint` write and read a DCP checkpoint of the model and the
  optimizer. torch's optimizers keep DTensor state and reshard; fastpeft.optim's 8-bit state is
  blocked over each rank's local shard, so it is stored per rank and resumes on the same world
  size and sharding.

DDP needs nothing from here: wrap the PeftModel in `DistributedDataParallel` as usual.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastpeft import checkpoint
from fastpeft.quant.nf4 import Linear4bit

__all__ = ["decoder_layers", "shard_model", "nf4_storage_bytes", "adapter_state_dict", "save_adapter",
           "save_checkpoint", "load_checkpoint"]

_NF4_STORAGE = ("weight", "weight_absmax", "weight_nested_absmax")


def _unwrap(model: nn.Module) -> nn.Module:
    """The PeftModel inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the modules whose class the Hugging Face model
    names in `_no_split_modules` (LlamaDecoderLayer, ...), else the children of the longest
    nn.ModuleList."""
    model = _unwrap(model)
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(model: nn.Module, *, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
                layers: list[nn.Module] | None = None) -> nn.Module:
    """FSDP2 over `model` (a PeftModel, QLoRA or not), in place; returns it.

    `fully_shard` is applied to each of `layers` (default: `decoder_layers(model)`) and then to
    the root, with `mesh` (default: a 1-D mesh over the world, on CUDA under nccl, else on the
    CPU) and `mp_policy` (a `torch.distributed.fsdp.MixedPrecisionPolicy`, default fp32). The
    model may stay on the CPU until then: FSDP2 moves each layer to the mesh's device as it
    shards it (on CUDA, to the current device: call `torch.cuda.set_device` first).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise ValueError("shard_model: torch.distributed is not initialized (call dist.init_process_group first)")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("shard_model: the model is wrapped in DistributedDataParallel; shard the bare model")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kwargs = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy(),
                  reshard_after_forward=reshard_after_forward)
    for layer in decoder_layers(model) if layers is None else layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def nf4_storage_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole model) of the NF4 weights' storage: packed
    codes, absmax and nested absmax of every `Linear4bit` (sharded or not)."""
    local = total = 0
    for module in _unwrap(model).modules():
        if isinstance(module, Linear4bit):
            for name in _NF4_STORAGE:
                t = getattr(module, name)
                if t is None:
                    continue
                total += t.numel() * t.element_size()
                t = t.to_local() if hasattr(t, "to_local") else t
                local += t.numel() * t.element_size()
    return local, total


def _peft_key(fqn: str, adapter_name: str) -> str:
    """A model key as PEFT saves it: `x.lora_A.<adapter>.weight` -> `x.lora_A.weight`,
    `x.modules_to_save.<adapter>.weight` -> `x.weight`, other keys unchanged."""
    atoms = fqn.split(".")
    for i in range(len(atoms) - 1):
        if atoms[i] == "modules_to_save" and atoms[i + 1] == adapter_name:
            return ".".join(atoms[:i] + atoms[i + 2:])
    return ".".join(a for a in atoms if a != adapter_name)


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's full tensors under PEFT's keys, gathered to rank 0's CPU through
    `get_model_state_dict(full_state_dict=True, cpu_offload=True)`: only the trainable tensors
    are gathered when they hold the whole adapter, else everything. A collective: every rank
    calls it; ranks other than 0 get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    peft_model = _unwrap(model)
    if peft_model.peft_config[adapter_name].is_prompt_learning:
        raise ValueError("adapter_state_dict: prompt-learning adapters are not supported under FSDP; "
                         "train them with DDP and call save_pretrained on rank 0")
    wanted = set(peft_model._adapter_state_dict(adapter_name))  # keys only: local, no collective
    prefix = "" if next(iter(wanted), "").startswith(checkpoint.PREFIX) else checkpoint.PREFIX
    trainable = {_peft_key(n, adapter_name) for n, p in peft_model.named_parameters() if p.requires_grad}
    frozen_ok = wanted <= {prefix + k for k in trainable}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=frozen_ok)
    full = get_model_state_dict(peft_model, options=options)
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    out = {}
    for fqn, value in full.items():
        key = prefix + _peft_key(fqn, adapter_name)
        if key in wanted and (key not in out or adapter_name in fqn.split(".")):
            out[key] = value
    missing = sorted(wanted - out.keys())
    if missing:
        raise KeyError(f"adapter_state_dict: {len(missing)} adapter tensors not in the gathered state dict, "
                       f"e.g. {missing[:3]}")
    return out


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """`PeftModel.save_pretrained` for a sharded (FSDP2) or replicated (DDP) model: every rank
    calls it, rank 0 writes PEFT's layout (the "default" adapter in `save_directory`, another in
    its subfolder), and all ranks return once the files are there."""
    peft_model = _unwrap(model)
    state = adapter_state_dict(model, adapter_name)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out = save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)
        checkpoint.save_adapter(out, state)
        config = copy.deepcopy(peft_model.peft_config[adapter_name])
        config.inference_mode = True
        config.save_pretrained(out, **peft_model._auto_mapping(config))
    if dist.is_initialized():
        dist.barrier()


# -- DCP: model + optimizer ------------------------------------------------------------------------
def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def _rank_local_keys(optim_sd: dict) -> list[tuple[str, str]]:
    """(param fqn, state name) of the state tensors that are plain tensors with a shape of their
    own (fastpeft.optim's per-shard 8-bit state): they differ by rank under one name, which DCP
    would save once as if replicated."""
    return [(fqn, k) for fqn, state in optim_sd.get("state", {}).items() for k, v in state.items()
            if isinstance(v, torch.Tensor) and not _is_dtensor(v) and v.dim() > 0]


def _checkpoint_state(model: nn.Module, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(_unwrap(model), optimizer)
    rank, local = dist.get_rank(), set(_rank_local_keys(optim_sd))
    # new dicts: the ones optim.state_dict() returns are the optimizer's live per-parameter state
    optim_sd["state"] = {fqn: {f"{k}.rank{rank}" if (fqn, k) in local else k: v for k, v in state.items()}
                         for fqn, state in optim_sd.get("state", {}).items()}
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(model: nn.Module, optimizer, checkpoint_id: str | os.PathLike) -> None:
    """A DCP checkpoint of the model (its sharded state dict: NF4 storage, adapters) and the
    optimizer, each rank writing its shards; a collective."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_checkpoint_state(model, optimizer), checkpoint_id=os.fspath(checkpoint_id))


def load_checkpoint(model: nn.Module, optimizer, checkpoint_id: str | os.PathLike) -> None:
    """Restore what `save_checkpoint` wrote into a model sharded the same way and its optimizer
    (built as for the first run; no step needed); a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _checkpoint_state(model, optimizer)
    dcp.load(state, checkpoint_id=os.fspath(checkpoint_id))
    optim_sd, suffix = state["optim"], f".rank{dist.get_rank()}"
    optim_sd["state"] = {fqn: {k.removesuffix(suffix): v for k, v in entries.items()}
                         for fqn, entries in optim_sd["state"].items()}
    set_state_dict(_unwrap(model), optimizer, model_state_dict=state["model"], optim_state_dict=optim_sd)
