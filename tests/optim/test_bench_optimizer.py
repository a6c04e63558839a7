"""The optimizer row of `fastpeft bench --sections training`: every implementation timed or
given a reason, and state bytes per parameter counted from the real state tensors."""
import math

import torch

from fastpeft.bench import training
from fastpeft.bench.timing import Progress
from fastpeft.optim import AdamW8bit


def test_optimizer_row_on_cpu():
    result = training.run_optimizer("cpu", quick=True, bar=Progress(1, enabled=False), budget_s=0.01)
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"torch AdamW", "fastpeft AdamW8bit", "bnb AdamW8bit"}
    numel = result["shape"][0] * result["shape"][1]
    assert rows["torch AdamW"]["state_bytes_per_param"] == 8 + 4 / numel  # two fp32 moments + the step
    assert rows["fastpeft AdamW8bit"]["state_bytes_per_param"] <= 2.1
    for impl, r in rows.items():
        if impl == "bnb AdamW8bit" and r["status"] != "ok":  # not installed, or failed: said, not timed
            assert r["median_us"] is None and r["state_bytes_per_param"] is None
            continue
        assert r["status"] == "ok", r
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("median_us", "min_us", "max_us", "vs_torch")), r
        assert r["min_us"] <= r["median_us"] <= r["max_us"]
    assert rows["torch AdamW"]["vs_torch"] == 1.0


def test_state_bytes_counts_each_storage_once():
    p = torch.nn.Parameter(torch.randn(64, 80))
    p.grad = torch.randn(64, 80)
    opt = AdamW8bit([p])
    opt.step()
    expected = 2 * p.numel() + 2 * 4 * math.ceil(p.numel() / 256) + 4
    assert training.state_bytes(opt, [p]) == expected
    opt.state[p]["alias"] = opt.state[p]["exp_avg_codes"][:10]  # a view adds no bytes
    assert training.state_bytes(opt, [p]) == expected


def test_missing_peer_gets_a_status(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("no bitsandbytes here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    result = training.run_optimizer("cpu", quick=True, bar=Progress(1, enabled=False), budget_s=0.01)
    bnb_row = next(r for r in result["rows"] if r["impl"] == "bnb AdamW8bit")
    assert bnb_row["status"] == "not installed" and bnb_row["median_us"] is None
