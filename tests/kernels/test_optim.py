"""kernels/optim.py (the fused 8-bit AdamW step) against kernels/reference.py, under the
interpreter on a CPU.

Both decode the same codes and run the same fp32 arithmetic in the same order, so the moments,
their absmaxes and codes agree exactly under the interpreter; the parameter can differ by the
last bit of the denominator (torch's vectorized sqrt is not numpy's), and by one bf16 ulp
because the interpreter truncates where torch rounds. On a GPU a fused multiply-add may move a
moment across a code midpoint: one code step, rarely.
"""
import pytest
import torch

from fastpeft.kernels import optim, reference
from fastpeft.optim import AdamW8bit

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {FP32: dict(atol=1e-6, rtol=1e-6), FP16: dict(atol=1e-5, rtol=1e-3), BF16: dict(atol=1e-5, rtol=1.6e-2)}
HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


def _state(n, block_size, device):
    nblocks = -(-n // block_size)
    return [torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(nblocks, device=device),
            torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(nblocks, device=device)]


def _warm(n, block_size, dtype, device, steps, seed=0):
    """A parameter, a fresh gradient and the state after `steps` reference steps (non-trivial codes)."""
    g = torch.Generator().manual_seed(seed)
    param = torch.randn(n, generator=g).to(device=device, dtype=dtype)
    state = _state(n, block_size, device)
    maps = reference.adamw8bit_maps(device)
    for step in range(1, steps + 1):
        grad = torch.randn(n, generator=g).to(device=device, dtype=dtype)
        reference.adamw8bit_update(param, grad, *state, maps, step=step, block_size=block_size, **HYPER)
    return param, torch.randn(n, generator=g).to(device=device, dtype=dtype), state, maps


def _poisoned(t, tail, fill):
    """`t` copied into the head of a bigger buffer whose tail holds `fill`: (view, buffer)."""
    buf = torch.full((t.numel() + tail,), fill, dtype=t.dtype, device=t.device)
    buf[: t.numel()] = t
    return buf[: t.numel()], buf


def _assert_codes_close(got, want):
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01


# n: one element, less than a block, one block + 1, not a multiple of any block, and more than a
# kernel program's 2048 elements with a tail; block sizes 64 and 256 (bnb's).
@pytest.mark.parametrize("n,block_size,dtype,steps", [
    (1, 256, FP32, 0), (100, 256, FP16, 3), (257, 256, BF16, 2), (1000, 64, FP32, 4),
    (4133, 256, FP32, 5), (4133, 64, BF16, 1), (2111, 256, FP16, 0),
])
def test_update_matches_reference(device, n, block_size, dtype, steps):
    param, grad, state, maps = _warm(n, block_size, dtype, device, steps)
    want_param, want_state = param.clone(), [t.clone() for t in state]
    reference.adamw8bit_update(want_param, grad, *want_state, maps, step=steps + 1, block_size=block_size, **HYPER)

    nan = float("nan")
    p, p_buf = _poisoned(param, 37, nan)
    g, _ = _poisoned(grad, 37, nan)
    m, m_buf = _poisoned(state[0], 37, 0xAB)
    am, am_buf = _poisoned(state[1], 3, nan)
    v, v_buf = _poisoned(state[2], 37, 0xAB)
    av, av_buf = _poisoned(state[3], 3, nan)
    optim.adamw8bit_update(p, g, m, am, v, av, maps, step=steps + 1, block_size=block_size, **HYPER)

    torch.testing.assert_close(p, want_param, **TOL[dtype])
    torch.testing.assert_close(am, want_state[1], atol=0, rtol=1e-6)
    torch.testing.assert_close(av, want_state[3], atol=0, rtol=1e-6)
    _assert_codes_close(m, want_state[0])
    _assert_codes_close(v, want_state[2])
    # nothing past the end was written
    assert p_buf[n:].isnan().all() and am_buf[am.numel():].isnan().all() and av_buf[av.numel():].isnan().all()
    assert (m_buf[n:] == 0xAB).all() and (v_buf[n:] == 0xAB).all()


def test_fresh_state_ignores_codes(device):
    """A zero absmax decodes any code to 0: a new state's codes need no clearing."""
    param, grad, state, maps = _warm(700, 256, FP32, device, 0)
    garbage = [torch.randint(0, 256, (700,), dtype=torch.uint8, device=device), state[1],
               torch.randint(0, 256, (700,), dtype=torch.uint8, device=device), state[3].clone()]
    want = param.clone()
    reference.adamw8bit_update(want, grad, *_state(700, 256, device), maps, step=1, block_size=256, **HYPER)
    optim.adamw8bit_update(param, grad, *garbage, maps, step=1, block_size=256, **HYPER)
    torch.testing.assert_close(param, want, **TOL[FP32])


@pytest.mark.parametrize("bad", ["absmax", "codes", "grad", "block_size", "maps"])
def test_bad_arguments_raise_before_launch(device, bad):
    param, grad, state, maps = _warm(300, 64, FP32, device, 0)
    kwargs = dict(step=1, block_size=64, **HYPER)
    if bad == "absmax":
        state[1] = state[1][:-1]
    elif bad == "codes":
        state[2] = state[2].float()
    elif bad == "grad":
        grad = grad.half()
    elif bad == "block_size":
        kwargs["block_size"] = 48
    else:
        maps = maps[:2] + (maps[3], maps[2])
    before = param.clone()
    with pytest.raises(ValueError):
        optim.adamw8bit_update(param, grad, *state, maps, **kwargs)
    assert torch.equal(param, before)


def test_optimizer_backends_agree(device, monkeypatch):
    """AdamW8bit through the bridge: FASTPEFT_BACKEND=triton runs this kernel, torch the reference."""
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTPEFT_BACKEND", backend)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(67, 71, device=device)), torch.nn.Parameter(torch.randn(71, device=device))]
        opt = AdamW8bit(params, lr=1e-2, weight_decay=0.01, block_size=64)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(device)
            opt.step()
        results[backend] = params
    for ours, ref in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
