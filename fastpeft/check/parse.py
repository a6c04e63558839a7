"""Parsers for what the toolchain in the triton wheel prints: pure functions of text.

  `ptxas_info(log)`        registers, stack, spill stores/loads, shared memory from ``ptxas -v``;
  `res_usage(text)`        REG / STACK / SHARED / LOCAL from ``cuobjdump -res-usage``;
  `sass_summary(sass)`     opcode counts from ``cuobjdump -sass``: tensor-core instructions
                           (HGMMA = Hopper wgmma, HMMA = mma.sync), global load widths (LDG,
                           LDGSTS = cp.async, UTMALDG = TMA), local-memory traffic;
  `ttir_dots(ttir)`        the ``tt.dot`` ops of Triton's IR with their shapes, operand types and
                           input precision (fp32 "ieee" dots never run on tensor cores);
  `ptx_global_loads(ptx)`  each global load of the PTX (ld.global, cp.async, TMA) with its width
                           in bytes and the kernel parameters its address is computed from, by a
                           taint pass over the PTX (values that come out of a load are data, not
                           addresses), so "the loads of the packed NF4 weight" can be named.
"""
from __future__ import annotations

import re

__all__ = ["ptxas_info", "res_usage", "sass_summary", "ttir_dots", "ptx_global_loads", "TENSOR_CORE_OPS"]

TENSOR_CORE_OPS = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA", "DMMA", "UTCHMMA", "UTCQMMA")

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_info(log: str) -> dict:
    """{'regs', 'stack', 'spill_stores', 'spill_loads', 'smem'} from a ``ptxas -v`` log of one
    kernel (None where the log does not say)."""
    out = {"regs": None, "stack": None, "spill_stores": None, "spill_loads": None, "smem": None}
    m = _REGS.search(log)
    if m:
        out["regs"] = int(m.group(1))
    m = _SPILL.search(log)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = (int(x) for x in m.groups())
    m = _SMEM.search(log)
    if m:
        out["smem"] = int(m.group(1))
    return out


def res_usage(text: str) -> dict:
    """{'REG', 'STACK', 'SHARED', 'LOCAL'} of the (first) function in ``cuobjdump -res-usage``."""
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), (int(x) for x in m.groups()))) if m else {}


# "/*0240*/   @!P6 LDG.E.U16 R0, desc[UR4][R4.64] ;" -> "LDG.E.U16"
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def sass_width(opcode: str) -> int:
    """Bytes moved by one LDG/LDGSTS/STG opcode (``LDG.E.128`` -> 16, ``LDG.E.U8`` -> 1)."""
    mods = opcode.split(".")[1:]
    for mod, width in (("128", 16), ("64", 8), ("U8", 1), ("S8", 1), ("U16", 2), ("S16", 2)):
        if mod in mods:
            return width
    return 4


def sass_summary(sass: str) -> dict:
    """Opcode statistics of a SASS listing (see the module docstring)."""
    ops: dict[str, int] = {}
    for m in _OPCODE.finditer(sass):
        ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    base: dict[str, int] = {}
    for op, n in ops.items():
        base[op.split(".")[0]] = base.get(op.split(".")[0], 0) + n
    widths: dict[str, dict[int, int]] = {"LDG": {}, "LDGSTS": {}, "STG": {}}
    for op, n in ops.items():
        kind = op.split(".")[0]
        if kind in widths:
            w = sass_width(op)
            widths[kind][w] = widths[kind].get(w, 0) + n
    return {
        "instructions": sum(ops.values()),
        "mma": {k: v for k, v in base.items() if k in TENSOR_CORE_OPS},
        "ldg": {str(k): v for k, v in sorted(widths["LDG"].items())},
        "ldgsts": {str(k): v for k, v in sorted(widths["LDGSTS"].items())},
        "stg": {str(k): v for k, v in sorted(widths["STG"].items())},
        "tma_loads": base.get("UTMALDG", 0),
        "local": base.get("LDL", 0) + base.get("STL", 0),
    }


_DOT = re.compile(r"tt\.dot\b.*?:\s*tensor<([0-9x]+)x(\w+)(?:,[^>]*)?>\s*\*\s*tensor<([0-9x]+)x(\w+)")


def ttir_dots(ttir: str) -> list[dict]:
    """[{'m', 'n', 'k', 'a', 'b', 'precision'}] for each ``tt.dot`` in Triton's TTIR."""
    dots = []
    for line in ttir.splitlines():
        if not re.search(r"\btt\.dot\b", line) or "tt.dot_scaled" in line:
            continue
        m = _DOT.search(line)
        prec = re.search(r"inputPrecision\s*=\s*(\w+)", line)
        d = {"precision": prec.group(1) if prec else "ieee"}  # MLIR leaves out the default (ieee)
        if m:
            a, b = [int(x) for x in m.group(1).split("x")], [int(x) for x in m.group(3).split("x")]
            d.update(m=a[0], k=a[-1], n=b[-1], a=m.group(2), b=m.group(4))
        dots.append(d)
    return dots


# -- PTX: which parameter each global load reads --------------------------------------------------
_REG = re.compile(r"%[A-Za-z_][\w]*")
_PARAM_LD = re.compile(r"ld\.param\.\w+\s+(%\w+),\s*\[\s*(\w+?)_param_(\d+)\s*\]")
_TYPE = re.compile(r"^[bsuf](8|16|32|64|128)$")


def _statements(ptx: str):
    """PTX statements, line by line (LLVM writes one per line; inline asm may put several on one),
    with comments, labels, braces and directives (``.reg``, ``.param`` ...) dropped."""
    for line in ptx.splitlines():
        line = line.split("//")[0]
        for stmt in line.split(";"):
            stmt = re.sub(r"^\s*(\$?[\w$]+:\s*)+", "", stmt)      # labels
            stmt = stmt.strip().lstrip("{}").strip()
            if stmt and not stmt.startswith((".", "}", ")")):
                yield re.sub(r"\s+", " ", stmt)


def _ld_width(op: str) -> int:
    parts = op.split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
    bits = next((int(_TYPE.match(p).group(1)) for p in parts if _TYPE.match(p)), 32)
    return vec * bits // 8


def ptx_global_loads(ptx: str) -> list[dict]:
    """[{'op', 'width', 'params'}] for every global load in `ptx`: 'width' in bytes per thread
    per instruction (cp.async: its copy size; TMA: 16, the bulk engine), 'params' the sorted
    kernel parameter indices (PTX order: non-constexpr arguments) its address depends on."""
    stmts = []
    for s in _statements(ptx):
        pred = re.match(r"^@!?%\w+\s+", s)
        if pred:
            s = s[pred.end():]
        op, _, rest = s.partition(" ")
        stmts.append((op, rest))
    taint: dict[str, frozenset] = {}
    for op, rest in stmts:
        m = _PARAM_LD.search(f"{op} {rest}")
        if m:
            taint[m.group(1)] = frozenset([int(m.group(3))])
    loads = []

    def dst_src(op, rest):
        if rest.startswith("["):                     # st / cp.async / red: no register result
            return [], _REG.findall(rest)
        if rest.startswith("{"):                     # vector result
            close = rest.index("}")
            return _REG.findall(rest[:close]), _REG.findall(rest[close:])
        regs = _REG.findall(rest)
        return regs[:1], regs[1:]

    changed = True
    while changed:  # forward taint to a fixed point (loops reassign registers)
        changed = False
        for op, rest in stmts:
            if op.startswith("ld.param"):
                continue
            dst, src = dst_src(op, rest)
            if op.startswith(("ld.", "atom.", "tex.", "ldu.", "shfl.")) or not dst:
                continue                              # loaded values are data, not addresses
            t = frozenset().union(*(taint.get(r, frozenset()) for r in src)) if src else frozenset()
            for d in dst:
                if not t <= taint.get(d, frozenset()):
                    taint[d] = taint.get(d, frozenset()) | t
                    changed = True
    for op, rest in stmts:
        if op.startswith(("ld.global", "ldu.global")):
            addr = rest[rest.index("["):] if "[" in rest else rest
            width = _ld_width(op)
        elif op.startswith("cp.async.bulk.tensor") and ".global" in op:
            addr, width = rest, 16
        elif op.startswith("cp.async") and "shared" in op and "global" in op:
            operands = [x.strip() for x in re.split(r",(?![^\[]*\])", rest)]
            addr = operands[1] if len(operands) > 1 else rest
            size = re.fullmatch(r"(0x[0-9a-fA-F]+|\d+)", operands[2]) if len(operands) > 2 else None
            width = int(size.group(1), 0) if size else 16
        else:
            continue
        params = frozenset().union(*(taint.get(r, frozenset()) for r in _REG.findall(addr)))
        loads.append({"op": op, "width": width, "params": sorted(params)})
    return loads
