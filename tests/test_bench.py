"""The bench's device-independent logic (timing modes, byte counts, bandwidth, penalties, the
CUDA-graph fallback, the tables) on the CPU, and its CUDA-graph timers on a GPU (`gpu` marker).

Never asserts on speed: only on arithmetic, on which mode timed a row, and on what a table shows.
"""
import math
from dataclasses import asdict

import pytest
import torch

from fastpeft.bench import layer, methods, nf4, report, timing


def test_timing_mode_graphs_decode_on_cuda_only():
    assert [timing.timing_mode("cuda", m) for m in (1, 4, 16, 17, 2048)] == [timing.GRAPH] * 3 + [timing.DO_BENCH] * 2
    assert {timing.timing_mode("cpu", m) for m in (1, 16, 2048)} == {timing.WALL}


def test_lora_bytes_counts_weight_bias_x_y_and_the_factors_in_their_dtype():
    m, k, n, r = 16, 4096, 1024, 16
    dense = 2 * (n * k + n + m * k + m * n)
    assert layer.lora_bytes(m, k, n, r, 2, None) == dense == 8_554_496
    assert layer.lora_bytes(m, k, n, r, 2, 2) == dense + 2 * (r * k + n * r)
    assert layer.lora_bytes(m, k, n, r, 2, 4) == dense + 4 * (r * k + n * r)  # peft's fp32 factors
    assert layer.lora_bytes(1, 8, 4, 2, 4, None) == 4 * (32 + 4 + 8 + 4)


def test_nf4_bytes_are_the_stored_weight_plus_x_y_and_lora():
    s = nf4.shapes_for("cpu", quick=True)
    one = nf4._NF4Layer(s, 128, 128, "cpu")
    # codes (two per byte) + fp32-coded absmax as double quant stores them: less than a third of fp32
    assert 128 * 128 // 2 < one.stored_bytes < 128 * 128 * 4 // 3
    io = 16 * (128 + 128) * 4
    assert one.bytes_moved("dense", 16, 4) == 128 * 128 * 4 + io
    assert one.bytes_moved("fastpeft", 16, 4) == one.stored_bytes + io
    assert one.bytes_moved("qlora", 16, 4) == one.stored_bytes + io + (16 * 128 + 128 * 16) * 4


def test_bandwidth_is_bytes_over_time_against_the_copy():
    gbps, frac = timing.bandwidth(1_000_000, 1.0, 500.0)  # 1 MB in 1 µs
    assert gbps == pytest.approx(1000.0) and frac == pytest.approx(2.0)
    assert timing.bandwidth(1_000_000, 1.0, None) == (None, None)  # the CPU: no copy measured
    assert timing.bandwidth(1_000_000, None, 500.0) == (None, None)
    assert timing.copy_gbps("cpu", quick=True) is None


def test_graph_calls_and_rotations():
    assert timing.graph_calls(1e-5, 1) == 200        # capped
    assert timing.graph_calls(1e-3, 1) == 2          # ~2 ms per replay
    assert timing.graph_calls(1.0, 3) == 3           # at least one pass over the copies
    assert timing.graph_calls(1e-5, 7) == 196        # whole passes
    l2 = 50 << 20
    assert timing.rotations(32 << 20, l2) == 7       # 4x the L2 in copies of a 32 MiB weight
    assert timing.rotations(1 << 30, l2) == 1
    assert timing.rotations(1 << 10, l2) == 16       # at most 16 copies


def test_penalty_only_between_rows_timed_alike():
    base = layer.Row("base", "", 1, median_us=10.0, timing=timing.GRAPH)
    assert timing.penalty(layer.Row("x", "", 1, median_us=15.0, timing=timing.GRAPH), base) == 1.5
    assert timing.penalty(layer.Row("x", "", 1, median_us=15.0, timing=timing.DO_BENCH), base) is None
    assert timing.penalty(layer.Row("x", "", 1, status="not installed"), base) is None


def test_time_cuda_as_falls_back_to_do_bench_and_says_why(monkeypatch):
    eager = (2e-6, 1e-6, 3e-6, 100, 9e-6)

    def no_capture(fns, quick, check=None):
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors ...")

    monkeypatch.setattr(timing, "time_cuda_graph", no_capture)
    monkeypatch.setattr(timing, "time_cuda", lambda fn, quick: eager)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    stats, mode, note = timing.time_cuda_as(timing.GRAPH, [lambda: None], True)
    assert stats == eager and mode == timing.DO_BENCH
    assert note == "cuda graph failed: RuntimeError: operation not permitted when stream is capturing"
    assert timing.time_cuda_as(timing.DO_BENCH, [lambda: None], True) == (eager, timing.DO_BENCH, None)

    monkeypatch.setattr(timing, "time_cuda_graph", lambda fns, quick, check=None: (1e-6, 1e-6, 2e-6, 30))
    monkeypatch.setattr(timing, "wall_clock", lambda fn, quick: 8e-6)
    assert timing.time_cuda_as(timing.GRAPH, [lambda: None], True) == ((1e-6, 1e-6, 2e-6, 30, 8e-6), timing.GRAPH, None)


def test_replay_check_rejects_wrong_outputs():
    ref = torch.ones(2, 3)
    assert timing.rel_err(ref * 1.5, ref) == 0.5
    timing.replay_check(ref, 1e-3)(ref.clone())
    timing.replay_check(ref, 5e-2)(ref.to(torch.bfloat16) + 1e-2)
    with pytest.raises(ValueError, match="replayed output wrong: max rel err 1.00e-01 > 1e-03"):
        timing.replay_check(ref, 1e-3)(ref * 1.1)
    with pytest.raises(ValueError, match="replayed output wrong"):
        timing.replay_check(ref, 1e-3)(torch.full((2, 3), float("nan")))


@pytest.mark.parametrize("name", ["lora", "prompt_tuning", "prefix_tuning", "unipelt", "lora_mixed16"])
def test_static_cache_step_matches_the_eager_decode_step(name):
    """The step a CUDA graph captures: a StaticCache copy of the prefilled cache at a fixed
    position gives the eager DynamicCache step's logits, and the same ones on every call."""
    base = methods.load_model(None, "cpu", quick=True)
    case = methods._cases(base, [name])[(name, "fastpeft")]
    ids = torch.randint(0, base.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        decode = methods._Decode(case.model, ids, torch.ones_like(ids), case.names)
        ref = decode()
        assert decode.cache.get_seq_length() == decode.length  # the eager step crops itself back
        step = decode.static_step()
        first, second = step(), step()
    torch.testing.assert_close(first, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(first, second)


def _cuda_result(rows: list[dict], nf4_rows: list[dict]) -> dict:
    return {
        "device": {"type": "cuda", "summary": "cuda TEST-GPU"}, "versions": {"torch": torch.__version__},
        "kernels": {"shapes": asdict(layer.shapes_for("cuda", True)), "copy_gbps": 1000.0, "rows": rows},
        "nf4": {"shapes": asdict(nf4.shapes_for("cuda", True)), "copy_gbps": 1000.0, "rows": nf4_rows, "quantize": []},
        "methods": {"shape": asdict(methods.model_shape("cuda", True)), "model": "LlamaForCausalLM", "rows": [
            asdict(methods.Row("lora", "fastpeft", "decode b1", median_us=300.0, min_us=290.0, max_us=310.0,
                               samples=30, penalty=1.2, trainable=10, trainable_pct=0.5, peak_mem_mib=100.0,
                               timing=timing.GRAPH, eager_us=900.0, eager_penalty=1.8))]},
    }


def test_cuda_tables_show_timing_mode_note_and_bandwidth():
    graphed = layer.Row("base", "base F.linear", 1, median_us=10.0, min_us=9.0, max_us=11.0, samples=30,
                        penalty=1.0, wall_us=20.0, wall_penalty=1.0, timing=timing.GRAPH, bytes=500_000,
                        gbps=50.0, copy_frac=0.05)
    fell_back = layer.Row("peft", "peft LoraLayer", 1, median_us=40.0, min_us=39.0, max_us=41.0, samples=100,
                          wall_us=60.0, wall_penalty=3.0, timing=timing.DO_BENCH,
                          timing_note="cuda graph failed: RuntimeError: boom", bytes=600_000, gbps=15.0,
                          copy_frac=0.015)
    missing = layer.Row("fastpeft", "fastpeft ops.lora_linear", 1, status="error: nope")
    q = nf4.Row("128x128", 1, "qlora", "fastpeft QLoRA", median_us=5.0, min_us=4.0, max_us=6.0, samples=30,
                vs_dense=0.5, vs_nf4=1.1, wall_us=9.0, bytes=20_000, gbps=4.0, copy_frac=0.004,
                timing=timing.GRAPH)
    result = _cuda_result([asdict(graphed), asdict(fell_back), asdict(missing)], [asdict(q)])
    text = "\n".join(report.kernel_table(result) + report.nf4_table(result) + report.methods_table(result))
    assert ("| M | implementation | median µs | min–max µs | penalty | GB/s | % of copy | timing | wall µs/call "
            "| wall penalty |") in text
    assert "| 1 | base F.linear | 10.0 | 9.0–11.0 | 1.00x | 50 | 5 | cuda graph | 20.0 | 1.00x |" in text
    # timed another way than base: no penalty, the mode and why, the wall-clock ratio still there
    assert ("| 1 | peft LoraLayer | 40.0 | 39.0–41.0 | — | 15 | 2 | do_bench (cuda graph failed: "
            "RuntimeError: boom) | 60.0 | 3.00x |") in text
    assert "| 1 | fastpeft ops.lora_linear | error: nope | — | — | — | — | — | — | — |" in text
    assert "| 128x128 | 1 | fastpeft QLoRA | 5.0 | 4.0–6.0 | 0.50x | 1.10x | 4 | 0 | cuda graph | 9.0 |" in text
    assert text.count("device-to-device copy at 1000 GB/s") == 2
    assert ("| decode b1 | lora | fastpeft | 300.0 | 290.0–310.0 | 1.20x | 10 | 0.500 | cuda graph | 900.0 | 1.80x "
            "| 100 |") in text


def test_cpu_tables_say_na_for_bandwidth():
    row = layer.Row("base", "base F.linear", 1, median_us=10.0, min_us=9.0, max_us=11.0, samples=30,
                    penalty=1.0, timing=timing.WALL, bytes=500_000)
    result = _cuda_result([asdict(row)], [])
    result["device"] = {"type": "cpu", "summary": "cpu TEST"}
    result["kernels"]["copy_gbps"] = None
    lines = report.kernel_table(result)
    assert "| 1 | base F.linear | 10.0 | 9.0–11.0 | 1.00x | n/a | n/a |" in lines
    assert "timing" not in lines[2] and "wall clock" in lines[0]


# -- on a GPU (bench/gpu.sh runs these) ----------------------------------------------------------
@pytest.mark.gpu
def test_graph_timer_on_a_tiny_op_with_rotated_copies():
    xs = [torch.randn(64, 64, device="cuda") for _ in range(3)]
    fns = [(lambda x: lambda: x @ x)(x) for x in xs]
    seen = []
    median, lo, hi, n = timing.time_cuda_graph(fns, quick=True, check=seen.append)
    assert 0 < lo <= median <= hi < 1e-2 and n == 10
    torch.testing.assert_close(seen[0], xs[-1] @ xs[-1])  # the last call of a pass: the last copy
    stats, mode, note = timing.time_cuda_as(timing.GRAPH, fns, True)
    assert mode == timing.GRAPH and note is None and all(math.isfinite(v) and v > 0 for v in stats)


@pytest.mark.gpu
def test_graph_timer_falls_back_when_capture_fails_or_the_replay_is_wrong():
    x = torch.randn(64, 64, device="cuda")
    stats, mode, note = timing.time_cuda_as(timing.GRAPH, [lambda: (x @ x).sum().item()], True)
    assert mode == timing.DO_BENCH and note.startswith("cuda graph failed: ") and stats[0] > 0
    stats, mode, note = timing.time_cuda_as(timing.GRAPH, [lambda: x @ x], True, timing.replay_check(x, 1e-3))
    assert mode == timing.DO_BENCH and "replayed output wrong" in note
    torch.ones(1, device="cuda").sum().item()  # the device is still usable


@pytest.mark.gpu
def test_kernel_section_graphs_decode_rows_and_reports_bandwidth():
    result = layer.run("cuda", quick=True, bar=timing.Progress(1, enabled=False))
    assert result["copy_gbps"] > 0
    for r in result["rows"]:
        if r["impl"] in ("base", "merged", "eager", "fastpeft"):
            assert r["status"] == "ok", r
            want = timing.GRAPH if r["m"] <= timing.GRAPH_MAX_TOKENS else timing.DO_BENCH
            assert (r["timing"], r["timing_note"]) == (want, None), r
            assert r["gbps"] > 0 and r["copy_frac"] > 0 and r["wall_us"] > 0, r


@pytest.mark.gpu
def test_tiny_model_decode_step_is_timed_from_a_graph():
    base = methods.load_model(None, "cuda", quick=True)
    cases = methods._cases(base, ["lora"])
    ids = torch.randint(0, base.config.vocab_size, (4, 16), device="cuda")
    with torch.inference_mode():
        for key in (("base", "base"), ("lora", "fastpeft")):
            row = methods.Row(*key, "decode b4")
            call = methods._Decode(cases[key].model, ids, torch.ones_like(ids), cases[key].names)
            median, lo, hi, n = methods._time_cuda_case(call, methods._Decode, 4, True, row)
            assert (row.timing, row.timing_note) == (timing.GRAPH, None), row
            assert 0 < lo <= median <= hi and row.eager_us > 0 and row.peak_mem_mib > 0


@pytest.mark.gpu
def test_multi_section_on_cuda_checks_times_and_reports_bandwidth():
    """The mixed-adapter section on the Triton kernels: every fastpeft row checked and timed, the
    layer rows with bandwidth figures (peft: timed too when installed)."""
    from fastpeft.bench import multi

    result = multi.run("cuda", quick=True, bar=timing.Progress(1, enabled=False))
    assert result["copy_gbps"] > 0
    for r in result["rows"]:
        if r["impl"] == "peft" and r["status"] == "not installed":
            continue
        assert r["status"] == "ok" and r["timing"] == timing.DO_BENCH and r["median_us"] > 0, r
        if r["part"] == "layer":
            assert r["gbps"] > 0 and r["copy_frac"] > 0, r
