"""NF4 base weights (QLoRA): `NF4Config`, the `NF4Weight` container, `Linear4bit`, `quantize_model`.

The format is bitsandbytes' exactly (see `fastpeft.kernels.reference`, "NF4"), and so is the
state dict of an unsharded `Linear4bit`: `weight` (packed uint8 [(N*K+1)//2, 1]), `bias`, `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map` and
`weight.quant_state.bitsandbytes__nf4` (the JSON of the non-tensor fields as uint8), so a
`bitsandbytes.nn.Linear4bit` state dict loads here and ours loads there with
`Params4bit.from_prequantized`. Quantizing and the matmuls go through `fastpeft.ops`.

Storage (what FSDP2 shards, see docs/distributed.md): the per-weight data are frozen uint8
parameters whose dim 0 is the quantization block, so `fully_shard`'s dim-0 chunks never split a
block and a block's codes and absmax land on the same rank; bytes are not floats, so a
`MixedPrecisionPolicy` leaves them alone and the all-gather moves 4-bit bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = ()

from fastpeft import ops
from fastpeft.ops.nf4 import NESTED_BLOCKSIZE, NF4_BLOCKSIZES

__all__ = ["NF4Config", "NF4Weight", "Linear4bit", "quantize_model", "from_bnb_model"]

_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QS_KEY = "quant_state.bitsandbytes__nf4"
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_FLOAT_BUFFERS = ("quant_map", "nested_quant_map", "offset")  # replicated constants + the scalar offset
_STORAGE = ("weight", "weight_absmax", "weight_nested_absmax")  # the shardable uint8 parameters


@dataclass
class NF4Config:
    """How `quantize_model` quantizes: transformers' `BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=..., bnb_4bit_compute_dtype=...)`."""

    blocksize: int = field(default=64, metadata={"help": "Weights per absmax block (32..4096, powers of 2)."})
    double_quant: bool = field(default=True, metadata={"help": "Quantize the absmax values too (~0.37 bit/param saved)."})
    compute_dtype: torch.dtype = field(default=torch.float32, metadata={"help": "dtype of the matmuls (bnb's default fp32)."})
    skip_modules: list[str] | None = field(default=None, metadata={"help": "Names kept in full precision, added to the default head rule (quantize_model)."})

    def __post_init__(self):
        if self.blocksize not in NF4_BLOCKSIZES:
            raise ValueError(f"NF4Config: blocksize must be one of {NF4_BLOCKSIZES}, got {self.blocksize!r}")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"NF4Config: compute_dtype must be float32|float16|bfloat16, got {self.compute_dtype!r}")


@dataclass(frozen=True)
class NF4Weight:
    """One NF4 weight: the fields `fastpeft.ops.nf4_linear` reads (bnb's quant state, flattened)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_quant_map: torch.Tensor | None
    offset: torch.Tensor | None
    shape: tuple[int, int]
    blocksize: int


class Linear4bit(nn.Module):
    """An nn.Linear whose weight is stored in NF4 (bnb's `Linear4bit` with quant_type="nf4").

    Input is cast to `compute_dtype`, the output back to the input dtype (bnb's semantics).

    Storage, one row per quantization block of `blocksize` weights (the last block zero-padded):
    `weight` uint8 [B, blocksize // 2] (bnb's packed stream, reshaped), `weight_absmax` uint8
    [B, 1] (double quant's 8-bit codes) or [B, 4] (fp32 bytes), `weight_nested_absmax` uint8
    [ceil(B / 256), 4] (fp32 bytes) or None: frozen parameters that follow `.to(device)` and that
    FSDP2 shards on dim 0; `absmax` and `nested_absmax` read them as bnb's tensors. The constant
    code tables and the double-quant offset are buffers (replicated); a dtype cast of the model
    leaves all of them alone.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                 weight_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        NF4Config(blocksize=blocksize, compute_dtype=compute_dtype)  # validates both
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant = blocksize, double_quant
        self.compute_dtype, self.weight_dtype = compute_dtype, weight_dtype
        nblocks = -(-in_features * out_features // blocksize)
        frozen = lambda *shape: nn.Parameter(torch.zeros(shape, dtype=torch.uint8, device=device), requires_grad=False)
        self.weight = frozen(nblocks, blocksize // 2)
        self.weight_absmax = frozen(nblocks, 1 if double_quant else 4)
        self.register_buffer("quant_map", ops.reference.nf4_code(device), persistent=False)
        if double_quant:
            self.weight_nested_absmax = frozen(-(-nblocks // NESTED_BLOCKSIZE), 4)
            self.register_buffer("nested_quant_map", ops.reference.dynamic_map(device), persistent=False)
            self.register_buffer("offset", torch.zeros((), device=device), persistent=False)
        else:
            self.register_parameter("weight_nested_absmax", None)
            self.nested_quant_map = self.offset = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device)) if bias else None

    # -- storage <-> bnb's tensors ---------------------------------------------------------------
    @property
    def nbytes_packed(self) -> int:
        """bnb's packed length, (N*K+1)//2 bytes (the storage pads the last block)."""
        return (self.in_features * self.out_features + 1) // 2

    @property
    def packed(self) -> torch.Tensor:
        """bnb's packed codes, uint8 [(N*K+1)//2, 1] (a view of `weight`)."""
        return self.weight.reshape(-1)[: self.nbytes_packed].reshape(-1, 1)

    @property
    def absmax(self) -> torch.Tensor:
        """fp32 [B] block scales, or uint8 [B] codes with double quant (a view of `weight_absmax`)."""
        return self.weight_absmax.reshape(-1) if self.double_quant else self.weight_absmax.view(torch.float32).reshape(-1)

    @property
    def nested_absmax(self) -> torch.Tensor | None:
        t = self.weight_nested_absmax
        return None if t is None else t.view(torch.float32).reshape(-1)

    def _set_storage(self, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None) -> None:
        """Store bnb's tensors (packed uint8 [(N*K+1)//2(, 1)], absmax [B], nested fp32 [B2]) as
        new frozen parameters on the layer's device."""
        device = self.weight.device
        rows = self.weight.shape[0]
        flat = torch.zeros(rows * (self.blocksize // 2), dtype=torch.uint8, device=device)
        flat[: self.nbytes_packed] = packed.reshape(-1).to(device)
        param = lambda t: nn.Parameter(t.contiguous(), requires_grad=False)
        self.weight = param(flat.reshape(rows, -1))
        absmax = absmax.reshape(-1).to(device)
        self.weight_absmax = param(absmax.reshape(-1, 1) if self.double_quant
                                   else absmax.float().reshape(-1, 1).view(torch.uint8))
        if nested_absmax is not None:
            self.weight_nested_absmax = param(nested_absmax.float().to(device).reshape(-1, 1).view(torch.uint8))

    def is_sharded(self) -> bool:
        """Whether FSDP2 holds the storage as DTensor shards (between forwards)."""
        return isinstance(self.weight, DTensor)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: NF4Config) -> "Linear4bit":
        """Quantize an nn.Linear (its weight is read, never modified)."""
        weight = linear.weight
        if weight.dim() != 2:
            raise ValueError(f"Linear4bit.from_linear: weight must be 2-D, got {list(weight.shape)}")
        layer = cls(weight.shape[1], weight.shape[0], linear.bias is not None, config.blocksize,
                    config.double_quant, config.compute_dtype, weight.dtype, device=weight.device)
        q = ops.nf4_quantize(weight.detach(), config.blocksize, config.double_quant)
        layer._set_storage(q["packed"], q["absmax"], q["nested_absmax"])
        if config.double_quant:
            layer.offset = q["offset"]
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    @classmethod
    def from_bnb(cls, bnb_layer: nn.Module, compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """A fastpeft copy of a `bitsandbytes.nn.Linear4bit` (nf4), from its state dict: the
        codes and statistics are taken as they are, nothing is re-quantized."""
        state = bnb_layer.state_dict()
        qs = _quant_state(state, "", type(bnb_layer).__name__)
        layer = cls(qs["shape"][1], qs["shape"][0], "bias" in state, qs["blocksize"],
                    "weight.nested_absmax" in state,
                    compute_dtype or getattr(bnb_layer, "compute_dtype", None) or torch.float32,
                    getattr(torch, qs["dtype"]), device=state["weight"].device)
        layer.load_state_dict(state)
        return layer

    # -- the weight ------------------------------------------------------------------------------
    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(self.packed, self.absmax, self.quant_map, self.nested_absmax,
                         self.nested_quant_map, self.offset, (self.out_features, self.in_features),
                         self.blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [out, in] weight in `dtype` (default: the dtype it was quantized from)."""
        return ops.nf4_dequantize(self.nf4_weight(), dtype or self.weight_dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by the NF4 codes of `weight` ([out, in], same settings)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Linear4bit.requantize_: weight must be [{self.out_features}, "
                             f"{self.in_features}], got {list(weight.shape)}")
        if self.is_sharded():
            raise ValueError("Linear4bit.requantize_: the layer is sharded (FSDP2); merge on an unsharded model")
        q = ops.nf4_quantize(weight.detach().to(self.weight_dtype), self.blocksize, self.double_quant)
        self._set_storage(q["packed"], q["absmax"], q["nested_absmax"])
        if self.double_quant:
            self.offset = q["offset"]

    def storage_bits_per_param(self) -> float:
        """Bits per weight of everything stored for the weight (codes, scales, maps, offset)."""
        nbytes = sum(t.numel() * t.element_size() for n in (*_STORAGE, *_FLOAT_BUFFERS)
                     if (t := getattr(self, n)) is not None)
        return 8 * nbytes / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return ops.nf4_linear(x.to(self.compute_dtype), self.nf4_weight(), bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        """Device moves apply to the quant state; dtype casts do not (they would corrupt it). The
        uint8 storage parameters are never cast; the fp32 buffers are kept here."""
        before = {n: getattr(self, n) for n in _FLOAT_BUFFERS if getattr(self, n) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    # -- bitsandbytes' state-dict format ---------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.is_sharded():  # DCP's format: the storage by attribute name, the shards as they are
            for name, t in (*self._parameters.items(), *self._buffers.items()):
                if t is not None:
                    destination[prefix + name] = t if keep_vars else t.detach()
            return
        destination[prefix + "weight"] = self.packed
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + "weight.absmax"] = self.absmax
        destination[prefix + "weight.quant_map"] = self.quant_map
        meta = {"quant_type": "nf4", "blocksize": self.blocksize,
                "dtype": str(self.weight_dtype).removeprefix("torch."),
                "shape": [self.out_features, self.in_features]}
        if self.double_quant:
            destination[prefix + "weight.nested_absmax"] = self.nested_absmax
            destination[prefix + "weight.nested_quant_map"] = self.nested_quant_map.clone()
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                        nested_offset=self.offset.item())
        destination[prefix + "weight." + _QS_KEY] = torch.tensor(list(json.dumps(meta).encode()),
                                                                 dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Validate the whole layer's entries first, then assign: a bad entry changes nothing."""
        name = prefix.rstrip(".") or type(self).__name__
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if self.is_sharded():
            self._load_sharded(mine, prefix, name, missing_keys, unexpected_keys)
            return
        if "weight" not in mine:
            missing_keys.append(prefix + "weight")
            return
        qs = _quant_state(mine, "", name)
        N, K, bs = self.out_features, self.in_features, self.blocksize
        if tuple(qs["shape"]) != (N, K):
            raise ValueError(f"{name}: state dict holds an NF4 weight of shape {qs['shape']}, "
                             f"the layer is [out={N}, in={K}]")
        if qs["blocksize"] != bs:
            raise ValueError(f"{name}: state dict blocksize {qs['blocksize']} != layer blocksize {bs}")
        nested = "weight.nested_absmax" in mine
        if nested != self.double_quant:
            raise ValueError(f"{name}: state dict double_quant={nested}, layer double_quant={self.double_quant}")
        want = {"weight": ((N * K + 1) // 2, torch.uint8), "weight.quant_map": (16, torch.float32),
                "weight.absmax": (self.absmax.numel(), self.absmax.dtype)}
        if nested:
            if qs.get("nested_blocksize") != NESTED_BLOCKSIZE or "nested_offset" not in qs:
                raise ValueError(f"{name}: corrupted quant_state: nested_blocksize "
                                 f"{qs.get('nested_blocksize')!r} (want 256), nested_offset {qs.get('nested_offset')!r}")
            want.update({"weight.nested_absmax": (self.nested_absmax.numel(), torch.float32),
                         "weight.nested_quant_map": (256, torch.float32)})
        for key, (numel, dtype) in want.items():
            t = mine.get(key)
            if not isinstance(t, torch.Tensor) or t.numel() != numel or t.dtype != dtype:
                got = f"{t.dtype} with {t.numel()} elements" if isinstance(t, torch.Tensor) else "nothing"
                raise ValueError(f"{name}: state dict entry {key!r} should be {dtype} with {numel} "
                                 f"elements, got {got}")
        bias = mine.get("bias")
        if (bias is None) != (self.bias is None) or (bias is not None and tuple(bias.shape) != (N,)):
            raise ValueError(f"{name}: bias in state dict {None if bias is None else list(bias.shape)} "
                             f"does not fit the layer (bias={self.bias is not None}, out={N})")
        with torch.no_grad():
            device = self.weight.device
            self._set_storage(mine["weight"], mine["weight.absmax"], mine.get("weight.nested_absmax"))
            self.quant_map = mine["weight.quant_map"].to(device).clone()
            self.weight_dtype = getattr(torch, qs["dtype"])
            if nested:
                self.nested_quant_map = mine["weight.nested_quant_map"].to(device).clone()
                self.offset = torch.tensor(float(qs["nested_offset"]), device=device)
            if bias is not None:
                self.bias.copy_(bias)
        known = {"weight", "bias", "weight." + _QS_KEY, *("weight." + k for k in _TENSOR_KEYS)}
        unexpected_keys.extend(prefix + k for k in mine if k not in known and "." not in k.removeprefix("weight."))

    def _load_sharded(self, mine, prefix, name, missing_keys, unexpected_keys) -> None:
        """Load DCP's format (what `_save_to_state_dict` writes for a sharded layer) in place:
        every tensor is checked before the first copy."""
        own = {n: t for n, t in (*self._parameters.items(), *self._buffers.items()) if t is not None}
        missing_keys.extend(prefix + n for n in own if n not in mine)
        unexpected_keys.extend(prefix + k for k in mine if k not in own and "." not in k)
        for n, t in own.items():
            if n in mine and (tuple(mine[n].shape) != tuple(t.shape) or mine[n].dtype != t.dtype):
                raise ValueError(f"{name}: sharded state dict entry {n!r} is {mine[n].dtype} "
                                 f"{list(mine[n].shape)}, the layer holds {t.dtype} {list(t.shape)}")
        with torch.no_grad():
            for n, t in own.items():
                if n in mine:
                    t.copy_(mine[n])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def _quant_state(entries: dict[str, Any], prefix: str, name: str) -> dict[str, Any]:
    """The JSON fields of bnb's packed quant state; errors name the layer."""
    keys = [k for k in entries if k.startswith(prefix + "weight.quant_state.")]
    if keys != [prefix + "weight." + _QS_KEY]:
        kinds = [k.rsplit("__", 1)[-1] for k in keys]
        raise ValueError(f"{name}: expected one quant state 'weight.{_QS_KEY}' (an nf4 layer), "
                         f"found {kinds or 'none'}: only NF4 is supported, not fp4")
    try:
        qs = json.loads(bytes(entries[keys[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        ok = (qs["quant_type"] == "nf4" and qs["blocksize"] in NF4_BLOCKSIZES
              and len(qs["shape"]) == 2 and hasattr(torch, qs["dtype"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"{name}: corrupted quant_state ({type(err).__name__}: {err})") from None
    if not ok:
        raise ValueError(f"{name}: unsupported or corrupted quant_state {qs}: need quant_type 'nf4', "
                         f"blocksize in {NF4_BLOCKSIZES}, a 2-D shape and a torch dtype")
    return qs


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _default_skips(model: nn.Module) -> set[str]:
    """transformers' rule (`get_keys_to_not_convert`), as module names: the output embedding,
    every module whose weight is tied to (shared with) another's, and on a transformers model
    (one with `get_output_embeddings`) the module holding its last parameter: the head
    (`classifier`, `score`, `lm_head`, a bare encoder's `pooler.dense`). transformers 5 strips
    only ".weight" from that last name, so a head with a bias ("classifier.bias") no longer
    matches its module there; the module is meant, as transformers 4 had it."""
    names: set[str] = set()
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname.rpartition(".")[0])
    names.update(m for mods in owners.values() if len(mods) > 1 for m in mods)
    if hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        names.update(n for n, m in model.named_modules() if head is not None and m is head)
        params = list(model.named_parameters())
        if params:
            names.add(params[-1][0].rpartition(".")[0])
    names.discard("")
    return names


def quantize_model(model: nn.Module, config: NF4Config | None = None) -> nn.Module:
    """Replace every nn.Linear of `model` by an NF4 `Linear4bit`, in place; returns `model`.

    Kept in full precision, by default, as transformers' `BitsAndBytesConfig` keeps them: the
    heads (`lm_head`, the output embedding, any tied weight, and the module holding a transformers
    model's last parameter: `classifier`, `score`, a bare encoder's `pooler.dense`); see
    `_default_skips`. `config.skip_modules` adds names (a name or a dotted suffix) to that rule
    (transformers' `llm_int8_skip_modules` replaces it instead). All layers are quantized before
    the first swap, so an error leaves the model unchanged. GPT-2's Conv1D is not converted
    (not a plain nn.Linear).
    """
    config = config or NF4Config()
    default = _default_skips(model)
    extra = ["lm_head", *(config.skip_modules or [])]

    def picks(name: str, module: nn.Module) -> bool:
        return type(module) is nn.Linear and name not in default and not _skipped(name, extra)

    return _swap_all(model, "quantize_model", picks, lambda module: Linear4bit.from_linear(module, config))


def _swap_all(model: nn.Module, caller: str, picks, convert) -> nn.Module:
    """Replace each module that `picks(name, module)` by `convert(module)`, in place, returns
    `model`. Every conversion runs before the first swap, so a ValueError (raised naming `caller`
    and the module) leaves the model unchanged."""
    swaps = []
    for name, module in model.named_modules():
        if picks(name, module):
            try:
                swaps.append((name, convert(module)))
            except ValueError as err:
                raise ValueError(f"{caller}: {name}: {err}") from None
    for name, layer in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model


def from_bnb_model(model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Swap every `bitsandbytes.nn.Linear4bit` (nf4) of a model, e.g. one transformers loaded with
    `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`, for a fastpeft
    `Linear4bit` holding the same codes (no re-quantization); in place, returns `model`. All
    layers are converted before the first swap, so a bad layer (fp4, ...) leaves it unchanged."""
    import bitsandbytes as bnb

    return _swap_all(model, "from_bnb_model", lambda _, module: isinstance(module, bnb.nn.Linear4bit),
                     lambda module: Linear4bit.from_bnb(module, compute_dtype))
