"""PEFT's own test suite as the measure (compat/peft_suite.py, issue 23).

- The shim and the classifier: always (no download).
- A fixed, fast subset of PEFT's tests against fastpeft, and the three files collected in strict
  mode: marked `peft_suite`; they need PEFT's sdist (fetched once from the package registry and
  cached) and skip when it cannot be fetched.
- The full, sampled run writing docs/PEFT_COMPAT.md: opt-in, FASTPEFT_PEFT_SUITE=1 (minutes).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# compat/ is a tool of the source tree, not an installed package; the root leaves sys.path again
# at once (its kernels/ folder must not shadow the hub's `kernels` package)
sys.path.insert(0, ROOT)
try:
    from compat import classify, peft_shim, peft_suite
finally:
    sys.path.remove(ROOT)

# PEFT tests that pass with real PEFT and, through the shim, with fastpeft: a regression guard
# (one per test function, 40 drawn from the passing ones of the 2026-12-05 run; < 1 s to run).
FAST_SUBSET = [
    "tests/test_config.py::TestPeftConfig::test_config_deepcopy[LoraConfig-mandatory_kwargs18]",
    "tests/test_config.py::TestPeftConfig::test_config_layers_to_transform_index_zero[AdaLoraConfig-mandatory_kwargs0]",
    "tests/test_config.py::TestPeftConfig::test_config_pickle_roundtrip[LoraConfig-mandatory_kwargs18]",
    "tests/test_config.py::TestPeftConfig::test_ia3_is_feedforward_subset_valid_config",
    "tests/test_config.py::TestPeftConfig::test_save_pretrained[IA3Config-mandatory_kwargs13]",
    "tests/test_config.py::TestPeftConfig::test_valid_task_type[QUESTION_ANS-IA3Config-mandatory_kwargs13]",
    "tests/test_custom_models.py::TestMixedAdapterBatches::test_mixed_adapter_batches_different_target_layers[LoRA mixed adapter with different target layers-config00-config10]",
    "tests/test_custom_models.py::TestMixedAdapterBatches::test_mixed_adapter_batches_length_mismatch_raises[LoRA mixed adapter-config00-config10]",
    "tests/test_custom_models.py::TestMixedAdapterBatches::test_mixed_adapter_batches_lora_with_dora_but_dora_not_included_works",
    "tests/test_custom_models.py::TestMixedAdapterBatches::test_mixed_adapter_batches_lora_with_dora_raises",
    "tests/test_custom_models.py::TestMixedAdapterBatches::test_mixed_adapter_batches_lora_wrong_adapter_name_raises[LoRA mixed batch wrong adapter name-config0]",
    "tests/test_custom_models.py::TestMultiRankAdapter::test_multirank",
    "tests/test_custom_models.py::TestMultipleActiveAdapters::test_multiple_active_adapters_merge_and_unmerge[IA3 Same-ia3-IA3Config-config_kwargs_16-config_kwargs_26]",
    "tests/test_custom_models.py::TestMultipleActiveAdapters::test_plain_lora_and_dora_adapters_merge_matches_forward[True-MLP-lin0]",
    "tests/test_custom_models.py::TestMultipleActiveAdapters::test_sequential_merge_matches_batch_merge[LoRA Same-lora-LoraConfig-config_kwargs_10-config_kwargs_20]",
    "tests/test_custom_models.py::TestMultipleActiveAdapters::test_unmerge_after_sequential_merge_restores_base[LoRA Same-lora-LoraConfig-config_kwargs_10-config_kwargs_20]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_adapter_name[Vanilla MLP 9 IA3-MLP-IA3Config-config_kwargs57]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_attributes_parametrized[Vanilla MLP 2 AdaLoRA-MLP-AdaLoraConfig-config_kwargs328]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_delete_adapter_properly_cleans_up_after_itself[Vanilla MLP 2 AdaLoRA-MLP-AdaLoraConfig-config_kwargs328]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_disable_adapters_with_merging[transformers Conv1D 2 IA3-EmbConv1D-IA3Config-config_kwargs59]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_forward_bfloat16_no_autocast[Vanilla MLP 6 IA3-MLP-IA3Config-config_kwargs54]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_forward_float16[Vanilla MLP 8 IA3-MLP-IA3Config-config_kwargs56]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_forward_output_finite[Embedding + transformers Conv1D 1 LoRA-EmbConv1D-LoraConfig-config_kwargs20]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_get_base_model_state_dict[Vanilla MLP 7 IA3-MLP-IA3Config-config_kwargs55]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_load_does_not_overwrite_similarly_named_sibling",
    "tests/test_custom_models.py::TestPeftCustomModel::test_merge_layers[Vanilla MLP 8 LoRA with DoRA-MLP-LoraConfig-config_kwargs13]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_merge_layers_is_deterministic_in_train_mode[transformers Conv1D 1 IA3-EmbConv1D-IA3Config-config_kwargs60]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_multiple_adapters_mixed_modules_to_save[IA3Config]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_only_params_are_updated[transformers Conv1D 1 IA3-EmbConv1D-IA3Config-config_kwargs58]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_parameters_after_loading_model[Vanilla MLP 2 LoRA-MLP-LoraConfig-config_kwargs7]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_safe_merge[transformers Conv1D 1 IA3-EmbConv1D-IA3Config-config_kwargs60]",
    "tests/test_custom_models.py::TestPeftCustomModel::test_save_load_roundtrip[Vanilla MLP 8 IA3-MLP-IA3Config-config_kwargs56]",
    "tests/test_custom_models.py::TestRequiresGrad::test_loading_model_with_modules_to_save_requires_grad_set_correctly[False-LoraConfig]",
    "tests/test_custom_models.py::TestRequiresGrad::test_requires_grad_modules_to_save_default",
    "tests/test_low_level_api.py::TestLowLevelFunctional::test_get_peft_model_state_dict",
    "tests/test_low_level_api.py::TestLowLevelFunctional::test_inject_adapter_in_model",
    "tests/test_low_level_api.py::TestPeftStateDict::test_base_model_module_named_like_peft_prefix[LoraConfig]",
    "tests/test_low_level_api.py::TestPeftStateDict::test_get_and_set_peft_model_state_dict_adapter_name_same_as_module_name[True]",
    "tests/test_low_level_api.py::TestPeftStateDict::test_get_and_set_peft_model_state_dict_bias_in_module_name[True]",
    "tests/test_low_level_api.py::TestPeftStateDict::test_get_and_set_peft_model_state_dict_peft_prefix_in_module_name[True]",
]


# -- the shim --------------------------------------------------------------------------------
def test_missing_placeholder_collects_but_raises_on_use():
    vera = peft_shim.missing("peft.VeraConfig")
    assert vera.__name__ == "VeraConfig" and "missing" in repr(vera)
    assert vera == vera and hash(vera) == hash(vera) and vera != object
    assert not isinstance(3, vera)
    instance = vera(r=4)  # a module-level parametrize list may build one
    with pytest.raises(peft_shim.MissingName, match="VeraConfig"):
        instance.r
    with pytest.raises(peft_shim.MissingName):
        list(vera)
    assert vera.CAUSAL_LM.__name__ == "CAUSAL_LM"


def test_classifier_causes():
    row = {"id": "tests/test_x.py::t", "outcome": "failed"}
    assert classify.cause_of({**row, "missing": "peft.VeraConfig()", "exc_type": "MissingName"}) == (
        "missing name", "peft.VeraConfig")
    assert classify.cause_of({**row, "exc_type": "AttributeError",
                              "message": "'LoraModel' object has no attribute 'active_adapters'"}) == (
        "missing name", "LoraModel.active_adapters")
    assert classify.cause_of({**row, "exc_type": "TypeError",
                              "message": "add_adapter() got an unexpected keyword argument 'autocast_adapter_dtype'"}
                             )[0] == "missing name"
    assert classify.cause_of({**row, "exc_type": "ValueError", "raised_in_fastpeft": True,
                              "message": "Target module conv of type Conv2d is not supported: fastpeft's"}) == (
        "layer type", "adapter on Conv2d")
    assert classify.cause_of({**row, "exc_type": "Failed", "message": "DID NOT WARN."})[0] == "behaviour"
    assert classify.cause_of({**row, "exc_type": "AssertionError", "message": "Tensor-likes are not close!"}
                             )[0] == "numeric"
    assert classify.baseline_reason({**row, "exc_type": "OSError", "message": "network disabled by ..."}
                                    ) == "fails with real PEFT: needs the model hub"


def test_summary_counts_only_tests_that_pass_with_peft():
    base = [
        {"kind": "test", "id": "tests/test_a.py::ok", "outcome": "passed"},
        {"kind": "test", "id": "tests/test_a.py::hub", "outcome": "failed", "exc_type": "OSError",
         "message": "couldn't connect to huggingface.co"},
        {"kind": "excluded", "id": "tests/test_a.py::vera", "reason": "method not in fastpeft's plan: Vera"},
    ]
    ours = [{"kind": "test", "id": "tests/test_a.py::ok", "outcome": "failed", "exc_type": "AssertionError",
             "message": "Tensor-likes are not close!"}]
    summary = classify.summarize({"peft": base, "fastpeft": ours}, ["test_a.py"])
    assert summary["impls"]["fastpeft"]["counted"] == 1 and summary["impls"]["fastpeft"]["passed"] == 0
    assert summary["impls"]["fastpeft"]["causes"] == {"numeric": 1}
    assert summary["files"]["test_a.py"]["excluded"] == {
        "method not in fastpeft's plan: Vera": 1, "fails with real PEFT: needs the model hub": 1}
    text = classify.render(summary, version="0.0", sample=0, times={})
    assert "| fastpeft | 0 / 1 | 0.0% |" in text


# -- PEFT's tests (the sdist, fetched once) --------------------------------------------------
@pytest.fixture(scope="module")
def peft_tests():
    pytest.importorskip("peft")
    try:
        return peft_suite.fetch_tests()
    except (subprocess.CalledProcessError, OSError, ValueError) as exc:
        pytest.skip(f"PEFT's sdist could not be fetched: {exc}")


def _run(root, tmp_path, impl, ids=None, extra=()):
    out = tmp_path / f"{impl}.jsonl"
    args = list(extra)
    if ids is not None:
        ids_file = tmp_path / "ids.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        args.append(f"--compat-ids={ids_file}")
    files = sorted({i.split("::", 1)[0].rsplit("/", 1)[-1] for i in ids}) if ids else peft_suite.FILES
    peft_suite.run_pytest(root, impl, str(out), files, args, timeout=600)
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


@pytest.mark.peft_suite
def test_fast_subset_passes_with_fastpeft(peft_tests, tmp_path):
    rows = _run(peft_tests, tmp_path, "fastpeft", FAST_SUBSET)
    outcomes = {r["id"]: r for r in rows if r["kind"] in ("test", "not_collected")}
    failed = {i: (outcomes.get(i) or {}).get("message", "not run") for i in FAST_SUBSET
              if (outcomes.get(i) or {}).get("outcome") != "passed"}
    assert not failed, failed


@pytest.mark.peft_suite
def test_three_files_collect_in_strict_mode(peft_tests, tmp_path):
    rows = _run(peft_tests, tmp_path, "strict", extra=["--collect-only"])
    errors = [r for r in rows if r["kind"] == "collect_error"]
    assert not errors, [e["message"][-300:] for e in errors]


@pytest.mark.peft_suite
@pytest.mark.skipif(os.environ.get("FASTPEFT_PEFT_SUITE") != "1", reason="the full run: FASTPEFT_PEFT_SUITE=1")
def test_full_run_writes_report(peft_tests, tmp_path):
    report = tmp_path / "PEFT_COMPAT.md"
    assert peft_suite.main(["--work", str(tmp_path / "work"), "--report", str(report)]) == 0
    assert "## Result" in report.read_text()
