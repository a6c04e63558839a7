"""`fastpeft check-kernels`: the static GPU check (fastpeft/check/).

The end-to-end tests compile for sm_90a and sm_80 with the ptxas/cuobjdump of the triton wheel
(no GPU needed) and are skipped, with the reason, only where the wheel lacks them. The toy
kernels (tests/check_toy_kernels.py) pin the class of bug this exists for: a kernel the
interpreter runs correctly and the compiler rejects must fail CI. The parsers are tested on
ptxas / cuobjdump / SASS / TTIR / PTX text recorded from Triton 3.9's toolchain.

Cost, measured on the 2-core CI machine with a cold Triton cache: `--quick` (31 units x 2 targets)
46 s, the toy runs 12 s, this whole file 60 s.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from fastpeft.check import criteria, parse
from fastpeft.check.compile import toolchain
from fastpeft.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))
TOYS = os.path.join(HERE, "check_toy_kernels.py")
_TOOLS = toolchain(90)
needs_ptxas = pytest.mark.skipif(not (_TOOLS["ptxas"] and _TOOLS["cuobjdump"]),
                                 reason="the triton wheel has no ptxas/cuobjdump: nothing to compile with")


# -- parsers, on recorded toolchain output ---------------------------------------------------------
PTXAS_LOG = """\
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function '_lora_fwd_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _lora_fwd_kernel
    1560 bytes stack frame, 1536 bytes spill stores, 1620 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers, 1560 bytes cumulative stack size, 98304 bytes smem, 568 bytes cmem[0]
"""
RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _toy_kernel:
  REG:18 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
SASS = """\
        /*01d0*/              @!P0 LDG.E.U16 R9, desc[UR4][R4.64+0x2] ;        /* 0x0000020404098981 */
        /*0210*/              @!P4 LDG.E.U8 R6, desc[UR4][R4.64+0x4] ;         /* 0x000004040406c981 */
        /*0230*/                   LDG.E.128 R12, desc[UR4][R2.64] ;           /* 0x000000040202c981 */
        /*0240*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR6][R2.64] ; /* 0x0000000002057fae */
        /*0250*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ; /* 0x0000000004187df3 */
        /*0260*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;        /* 0x0000000c0804723c */
        /*0270*/                   STL [R1], R3 ;                               /* 0x0000000301007387 */
        /*0350*/              @!P0 STG.E.U16 desc[UR4][R2.64], R7 ;            /* 0x0000000702008986 */
"""
TTIR = """\
    %42 = tt.dot %40, %41, %acc, inputPrecision = tf32 : tensor<64x32xbf16> * tensor<32x64xbf16> -> tensor<64x64xf32>
    %43 = tt.dot %a, %b, %c : tensor<16x32xf32> * tensor<32x16xf32> -> tensor<16x16xf32>
"""
PTX = """\
.visible .entry _k(
	.param .u64 .ptr .global .align 1 _k_param_0,
	.param .u64 .ptr .global .align 1 _k_param_1,
	.param .u32 _k_param_2,
	.param .u64 .ptr .global .align 1 _k_param_3
)
{
	ld.param.b64 	%rd3, [_k_param_0];
	ld.param.b64 	%rd4, [_k_param_1];
	ld.param.b32 	%r3, [_k_param_2];
	mov.u32 	%r1, %ctaid.x;
	mul.wide.s32 	%rd5, %r1, 16;
	add.s64 	%rd1, %rd3, %rd5;       // packed + 16 * pid
	add.s64 	%rd2, %rd4, %rd5;
$L__BB0_1:
	// begin inline asm
	@%p1 ld.global.v2.b32 { %r10, %r11 }, [ %rd1 + 0 ];
	// end inline asm
	@%p1 ld.global.b8 { %rs1 }, [ %rd1 + 8 ];
	cvt.u64.u32 	%rd6, %r10;              // a loaded value used as an index: data, not an address
	add.s64 	%rd7, %rd2, %rd6;
	ld.global.b32 	%r12, [%rd7];
	cp.async.cg.shared.global [ %r20 + 0 ], [ %rd1 + 0 ], 0x10, %r21;
	st.global.b32 	[%rd2], %r12;
	add.s64 	%rd1, %rd1, 64;
	bra.uni 	$L__BB0_1;
}
"""


def test_ptxas_info_reads_registers_spills_and_smem():
    assert parse.ptxas_info(PTXAS_LOG) == {"regs": 255, "stack": 1560, "spill_stores": 1536, "spill_loads": 1620,
                                           "smem": 98304}
    assert parse.ptxas_info("")["regs"] is None


def test_res_usage():
    assert parse.res_usage(RES_USAGE) == {"REG": 18, "STACK": 0, "SHARED": 0, "LOCAL": 0}
    assert parse.res_usage("no function") == {}


def test_sass_summary_counts_tensor_cores_load_widths_and_local_memory():
    s = parse.sass_summary(SASS)
    assert s["mma"] == {"HGMMA": 1, "HMMA": 1}
    assert s["ldg"] == {"1": 1, "2": 1, "16": 1}
    assert s["ldgsts"] == {"16": 1}
    assert s["stg"] == {"2": 1}
    assert s["local"] == 1
    assert [parse.sass_width(op) for op in ("LDG.E.64", "LDG.E", "LDG.E.S8")] == [8, 4, 1]


def test_ttir_dots_shapes_types_and_default_precision():
    d1, d2 = parse.ttir_dots(TTIR)
    assert (d1["m"], d1["n"], d1["k"], d1["a"], d1["precision"]) == (64, 64, 32, "bf16", "tf32")
    assert (d2["a"], d2["precision"]) == ("f32", "ieee")  # MLIR leaves the default out


def test_ptx_global_loads_attributes_each_load_to_its_parameters():
    loads = parse.ptx_global_loads(PTX)
    by_op = {(ld["op"], ld["width"]): ld["params"] for ld in loads}
    assert by_op[("ld.global.v2.b32", 8)] == [0]          # the packed weight, 8 bytes per load
    assert by_op[("ld.global.b8", 1)] == [0]              # ... and one byte-wide load of it
    assert by_op[("ld.global.b32", 4)] == [1]             # indexed by loaded data: still param 1 only
    assert by_op[("cp.async.cg.shared.global", 16)] == [0]
    assert len(loads) == 4                                # the store is no load


# -- criteria on synthetic units -------------------------------------------------------------------
def _unit(scenario, grid=(132, 1, 1), tensors=None):
    return {"launches": [{"arch": 90, "scenario": scenario, "grid": list(grid), "tensors": tensors or {}}]}


def _result(**kw):
    r = {"ok": True, "shared": 1024, "regs": 64, "spill_stores": 0, "spill_loads": 0,
         "sass": {"mma": {"HGMMA": 4}, "local": 0}, "dots": [{"a": "bf16", "precision": "tf32"}], "loads_by_arg": {}}
    r.update(kw)
    return r


LAYER = {"family": "lora_fwd", "M": 1, "K": 4096, "N": 4096, "label": "lora_fwd M=1", "nf4": False}


def test_criteria_pass_and_each_failure():
    assert criteria.evaluate(_unit(LAYER), 90, _result()) == ([], [])
    fails = lambda unit, **kw: [f.split(":")[0] for f in criteria.evaluate(unit, 90, _result(**kw))[0]]  # noqa: E731
    assert fails(_unit(LAYER), ok=False, error="CompilationError: x") == ["compile"]
    assert fails(_unit(LAYER), spill_stores=8) == ["spills"]
    assert fails(_unit(LAYER), shared=232449) == ["smem"]
    assert fails(_unit(LAYER, grid=(64, 1, 1))) == ["decode-grid"]
    assert fails(_unit(dict(LAYER, M=2048)), sass={"mma": {}, "local": 0}) == ["tensor-cores"]
    # fp32 "ieee" dots run on FMA by design; sm_80 has 108 SMs
    assert fails(_unit(dict(LAYER, M=2048)), sass={"mma": {}, "local": 0},
                 dots=[{"a": "f32", "precision": "ieee"}]) == []
    assert criteria.evaluate(_unit(LAYER, grid=(108, 1, 1)) | {"launches": [
        {"arch": 80, "scenario": LAYER, "grid": [108, 1, 1], "tensors": {}}]}, 80, _result())[0] == []


def test_criteria_nf4():
    sc = dict(LAYER, family="nf4_fwd", nf4=True)
    tensors = {"packed_ptr": {"dtype": "uint8", "numel": 4096 * 2048}, "absmax_ptr": {"dtype": "uint8", "numel": 4096 * 64}}
    unit = _unit(sc, grid=(264, 1, 1), tensors=tensors)
    assert criteria.evaluate(unit, 90, _result(loads_by_arg={"packed_ptr": {"16": 4}, "absmax_ptr": {"1": 2}}))[0] == []
    fails = criteria.evaluate(_unit(sc, grid=(200, 1, 1), tensors=tensors), 90,
                              _result(shared=70000, loads_by_arg={"packed_ptr": {"1": 8, "16": 4}}))[0]
    assert [f.split(":")[0] for f in fails] == ["nf4-loads", "nf4-smem", "nf4-grid"]
    assert "no global load" in criteria.evaluate(unit, 90, _result())[0][0]


def test_nf4_bytes_model_and_report_outputs(tmp_path):
    """The byte model hits issue 17's anchor (a 4096x4096 NF4 layer with double quant streams
    8.65 MB: 2.58 us at 3.35 TB/s), and the table / JSON / Markdown come out of one result."""
    from fastpeft.check import report

    sc = dict(LAYER, family="nf4_fwd", nf4=True, rank=16, dtype="bf16", label="nf4_fwd M=1")
    unit = {"uid": 0, "kernel": "m:_nf4_kernel", "arg_names": ["packed_ptr", "BLOCK_N"], "annotated": ["BLOCK_N"],
            "constexprs": [[[1], 64]], "options": {"num_warps": 4, "num_stages": 3},
            "signature": {"packed_ptr": "*u8", "BLOCK_N": "constexpr"},
            "launches": [{"arch": 90, "scenario": sc, "grid": [264, 1, 1], "tuner": None,
                          "tensors": {"packed_ptr": {"dtype": "uint8", "numel": 4096 * 2048}}}]}
    result = {"archs": [90], "level": "quick", "units": [unit], "problems": [], "failures": 0, "seconds": 1.0,
              "toolchain": {"ptxas": "ptxas"}, "versions": {"triton": "3.9.0"},
              "rows": [{"uid": 0, "arch": 90, "result": _result(loads_by_arg={"packed_ptr": {"16": 8}}),
                        "failures": [], "warnings": []}]}
    (model,) = report.nf4_bytes(result)
    assert (model["codes"], model["absmax"], model["nested"]) == (8388608, 262144, 4100)
    assert model["weight_floor_us"] == 2.58 and model["x"] == 8192 and model["lora"] == 2 * 4096 * 16 * 2
    assert "| _nf4_kernel | u8: BN=64 w4 s3 | sm_90a |" in report.format_table(result)
    assert report.summary_line(result).startswith("check-kernels: PASS")
    md = report.markdown(result, "fastpeft check-kernels --markdown bench/KERNELS.md")
    assert "Generated by `fastpeft check-kernels --markdown bench/KERNELS.md`" in md and "2.58" in md
    report.write_json(result, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["loads_by_arg"] == {"packed_ptr": {"16": 8}}


def test_arch_names():
    assert [criteria.arch_of(a) for a in ("sm_90a", "sm_80", "90", 80)] == [90, 80, 90, 80]
    with pytest.raises(ValueError, match="unknown target"):
        criteria.arch_of("sm_75")


def test_cli_refuses_bad_arguments_before_compiling(capsys):
    assert main(["check-kernels", "--arch", "sm_75"]) == 2
    assert "unknown target" in capsys.readouterr().err
    assert main(["check-kernels", "--quick", "--full"]) == 2


# -- end to end: the toy kernels --------------------------------------------------------------------
def test_toy_bad_kernels_pass_the_interpreter():
    """The premise: what the compiler rejects below, the CPU interpreter runs correctly."""
    spec = importlib.util.spec_from_file_location("check_toy_kernels", TOYS)
    toys = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toys)
    x = torch.arange(300, dtype=torch.bfloat16)
    torch.testing.assert_close(toys.branch(x, True), (x.float() * 2).to(torch.bfloat16))
    packed = torch.arange(256, dtype=torch.uint8).repeat(16)
    y = toys.nibble_sums(packed, 2)
    torch.testing.assert_close(y, ((packed[::2] & 15) + (packed[::2] >> 4)).to(torch.bfloat16))


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """The check over the good and the bad toys, both targets: {name: (exit code, json)}."""
    out = {}
    cache = str(tmp_path_factory.mktemp("triton-cache"))
    for name in ("good", "bad"):
        path = tmp_path_factory.mktemp(name) / "check.json"
        rc = main(["check-kernels", "--arch", "sm_90a,sm_80", "--jobs", "2", "--cache-dir", cache,
                   "--scenarios", f"{TOYS}:{name}", "--json", str(path)])
        out[name] = (rc, json.loads(path.read_text()))
    return out


@needs_ptxas
def test_check_passes_good_toys(toy_runs):
    rc, rep = toy_runs["good"]
    assert rc == 0, rep["summary"]
    assert {r["target"] for r in rep["rows"]} == {"sm_90a", "sm_80"}
    assert all(r["ok"] and not r["failures"] for r in rep["rows"])
    nf4 = [r for r in rep["rows"] if "bytes" in r["kernel"]]
    assert all(min(int(w) for w in r["loads_by_arg"]["packed_ptr"]) >= 8 for r in nf4)


@needs_ptxas
def test_check_fails_what_only_the_compiler_catches(toy_runs):
    rc, rep = toy_runs["bad"]
    assert rc == 1
    by_kernel = {}
    for r in rep["rows"]:
        by_kernel.setdefault(r["kernel"].split(":")[-1], []).append(r)
    branch = by_kernel["_branch_kernel"]
    assert len(branch) == 2 and all(not r["ok"] and r["failures"][0].startswith("compile") for r in branch)
    assert all("mismatch" in r["error"].lower() for r in branch)
    assert all(any(f.startswith("nf4-loads") for f in r["failures"]) for r in by_kernel["_bytes_kernel"])


# -- end to end: today's kernels --------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`fastpeft check-kernels --quick` on both targets, cold Triton cache: (exit code, json)."""
    tmp = tmp_path_factory.mktemp("quick")
    rc = main(["check-kernels", "--quick", "--arch", "sm_90a,sm_80", "--jobs", "2",
               "--cache-dir", str(tmp / "cache"), "--json", str(tmp / "check.json")])
    return rc, json.loads((tmp / "check.json").read_text())


@needs_ptxas
def test_check_kernels_quick_covers_every_family_on_both_targets(quick_run):
    rc, rep = quick_run
    assert rc in (0, 1) and rep["level"] == "quick"
    families = {L["scenario"]["family"] for r in rep["rows"] for L in r["launches"]}
    assert {"lora_fwd", "lora_dx", "adalora_fwd", "dora_fwd", "ia3_fwd", "adapter_fwd", "nf4_fwd", "nf4_dx",
            "nf4_dequant", "multi_grouped", "multi_gathered", "multi_grouped_nf4", "multi_gathered_nf4",
            "optim_adamw8bit"} <= families
    kernels = {r["kernel"].split(":")[-1] for r in rep["rows"]}
    assert any("adamw8bit" in k for k in kernels)  # issue 19: the optimizer kernel is covered
    for target in ("sm_90a", "sm_80"):
        assert {r["kernel"] for r in rep["rows"] if r["target"] == target} == {r["kernel"] for r in rep["rows"]}
    assert not rep["problems"], rep["problems"][:3]   # every launcher ran its GPU path
    nf4_decode = [r for r in rep["rows"] if any(L["scenario"]["family"] == "nf4_fwd" and L["scenario"]["M"] == 1
                                                for L in r["launches"])]
    assert nf4_decode and all(r["loads_by_arg"] for r in nf4_decode if r["ok"])


@needs_ptxas
def test_check_kernels_quick_passes_on_the_real_kernels(quick_run):
    rc, rep = quick_run
    assert rc == 0, rep["summary"]
