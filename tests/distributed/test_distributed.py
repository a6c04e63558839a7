"""DDP and FSDP2 on 2 gloo ranks (torch.multiprocessing) against one process, PEFT-format adapters
from a sharded run in real PEFT, and DCP resume. Each test spawns its ranks once; what the ranks
run is in dist_workers.py (a module the spawned processes import by name)."""
import os
import sys

import pytest
import torch

pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))
import dist_workers as W  # noqa: E402


def _single_process(kind: str, steps: int, optim: str = "adamw", **kw):
    model = W.build(kind, **kw)
    losses = W.train(model, W._optimizer(model, optim), W.batches(steps))
    return losses, W._adapter(model)


@pytest.mark.parametrize("kind", ["qlora", "prompt"])
def test_ddp_two_ranks_on_half_batches_equal_one_process_on_the_full_batch(kind):
    """QLoRA with a second, frozen adapter, and prompt tuning: DDP's default
    find_unused_parameters=False raises nothing, and the trained tensors match one process."""
    kw = {"frozen_adapter": True} if kind == "qlora" else {}
    got = W.run(W.ddp_train, kind=kind, steps=3, **kw)
    want_losses, want_adapter = _single_process(kind, 3, **kw)
    torch.testing.assert_close(got["losses"], want_losses, atol=1e-5, rtol=0)
    assert got["adapter"].keys() == want_adapter.keys()
    for name, value in want_adapter.items():
        torch.testing.assert_close(got["adapter"][name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_fsdp2_qlora_loss_parity_and_nf4_bytes_sharded_by_block():
    got = W.run(W.fsdp_train, kind="qlora", steps=3)
    want_losses, want_adapter = _single_process("qlora", 3)
    torch.testing.assert_close(got["losses"], want_losses, atol=1e-4, rtol=0)
    for name, value in want_adapter.items():
        torch.testing.assert_close(got["adapter"][name], value, atol=1e-4, rtol=1e-3, msg=name)
    # codes, absmax and nested absmax are DTensor shards between forwards...
    assert got["sharded"] == ["DTensor"] * 3
    # ... each rank holding about half of the NF4 bytes ...
    assert got["local_bytes"] <= 0.6 * got["total_bytes"], (got["local_bytes"], got["total_bytes"])
    # ... and the forward sees the all-gathered 4-bit codes: uint8, one row of 32 bytes per block
    kind, dtype, shape = got["seen"][0]
    assert kind != "DTensor" and dtype == torch.uint8 and shape[1] == 32


def test_fsdp2_plain_lora_loss_parity():
    got = W.run(W.fsdp_train, kind="lora", steps=2)
    want_losses, _ = _single_process("lora", 2)
    torch.testing.assert_close(got["losses"], want_losses, atol=1e-4, rtol=0)


def test_fsdp2_mixed_precision_bf16_leaves_the_nf4_bytes_alone():
    got = W.run(W.fsdp_bf16, steps=2)
    weight_dtype, input_dtype = got["seen"][0]
    assert weight_dtype == torch.uint8 and input_dtype == torch.bfloat16
    want, _ = _single_process("qlora", 2)
    assert all(torch.isfinite(torch.tensor(got["losses"])))
    torch.testing.assert_close(got["losses"], want, atol=0.05, rtol=0)  # bf16 compute: loose


def test_adapter_saved_from_a_sharded_run_loads_in_peft_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    out = str(tmp_path / "adapter")
    got = W.run(W.fsdp_save_adapter, out=out, steps=2)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    ids = W.batches(1, seed=7)[0]
    theirs = peft.PeftModel.from_pretrained(W.bnb_copy(W.base_model("qlora")), out).train()  # bnb's CPU path
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, got["logits"], atol=1e-4, rtol=1e-4)
    import fastpeft

    ours = fastpeft.PeftModel.from_pretrained(W.base_model("qlora"), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, got["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("optim", ["adamw8bit", "adamw"])
def test_dcp_resume_restores_model_and_optimizer(tmp_path, optim):
    got = W.run(W.fsdp_resume, ckpt=str(tmp_path / "ckpt"), optim=optim)
    assert got["resumed"] == got["straight"], got
    assert got["adapter_equal"]


def test_example_script_under_torchrun_writes_an_adapter_that_loads_in_peft(tmp_path):
    """examples/qlora_fsdp.py, as the docs launch it: `torchrun --nproc-per-node 2 ... --device cpu`."""
    import subprocess

    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    import fastpeft

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "adapter"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(W._free_port()),
           os.path.join(root, "examples", "qlora_fsdp.py"), "--device", "cpu", "--steps", "3", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=85, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "step 3/3" in done.stdout and "PEFT format" in done.stdout
    sys.path.insert(0, os.path.join(root, "examples"))
    try:
        import qlora_fsdp
    finally:
        sys.path.remove(os.path.join(root, "examples"))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    theirs = peft.PeftModel.from_pretrained(W.bnb_copy(qlora_fsdp.load_base(None, torch.float32)), str(out)).train()
    ours = fastpeft.PeftModel.from_pretrained(qlora_fsdp.load_base(None, torch.float32), str(out)).train()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
        base = qlora_fsdp.load_base(None, torch.float32)(input_ids=ids).logits
    assert not torch.allclose(base, want)  # the trained adapter changes the output
