"""fastpeft.optim.AdamW8bit: bitsandbytes' AdamW8bit as the oracle, torch.optim.AdamW as the
yardstick, and the torch.optim.Optimizer contract (groups, schedulers, state_dict round trips).

bitsandbytes 0.50's CPU backend runs the 8-bit blockwise update itself, so it is the oracle here:
same maps, same state format (its decoder reads our codes), and one step from the same state
lands on the same parameters. Its CPU quantizer picks codes through a 65536-bin table rather than
the nearest code (its CUDA kernel and ours search for the nearest), so re-encoded moments may
differ by up to one code gap and a bin width either side, which the test bounds.
"""
import io
import math

import pytest
import torch

from fastpeft.kernels import reference
from fastpeft.optim import AdamW8bit

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")


def _params(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _train(opt, params, steps, first_seed=0):
    for s in range(steps):
        _grads(params, first_seed + s)
        opt.step()


def test_maps_are_bitsandbytes_dynamic_maps():
    signed, signed_mids, unsigned, unsigned_mids = reference.adamw8bit_maps()
    assert torch.equal(signed, F.create_dynamic_map(signed=True))
    assert torch.equal(unsigned, F.create_dynamic_map(signed=False))
    assert torch.equal(signed_mids, (signed[1:] + signed[:-1]) / 2) and unsigned_mids.shape == (255,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_format_and_step_match_bitsandbytes(dtype):
    n = 5000  # 8-bit (>= 4096) with a tail block
    ours_p, = _params(n, dtype=dtype)
    theirs_p, = _params(n, dtype=dtype)
    hyper = dict(lr=1e-2, betas=(0.9, 0.995), eps=1e-8, weight_decay=0.05)
    ours, theirs = AdamW8bit([ours_p], **hyper), bnb.optim.AdamW8bit([theirs_p], **hyper)
    for step in range(4):
        _grads([theirs_p], step)
        theirs.step()
    # copy bnb's state into ours (same format), then one step each from the same point
    ours_p.data.copy_(theirs_p.data)
    ts = theirs.state[theirs_p]
    _grads([ours_p], 99)
    ours.step()  # creates the state; now overwrite it with bnb's and redo the step from there
    ours_p.data.copy_(theirs_p.data)
    state = ours.state[ours_p]
    for key, bkey in (("exp_avg_codes", "state1"), ("exp_avg_absmax", "absmax1"),
                      ("exp_avg_sq_codes", "state2"), ("exp_avg_sq_absmax", "absmax2")):
        state[key].copy_(ts[bkey])
    state["step"].fill_(ts["step"])
    _grads([ours_p], 4)
    _grads([theirs_p], 4)
    ours.step()
    theirs.step()

    torch.testing.assert_close(ours_p.float(), theirs_p.float(), atol=1e-6, rtol=1e-5 if dtype == torch.float32 else 1.6e-2)
    for codes, absmax, code, bcodes, babsmax in (
        (state["exp_avg_codes"], state["exp_avg_absmax"], F.create_dynamic_map(signed=True), ts["state1"], ts["absmax1"]),
        (state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], F.create_dynamic_map(signed=False), ts["state2"], ts["absmax2"]),
    ):
        torch.testing.assert_close(absmax, babsmax, atol=0, rtol=1e-5)
        # bnb's decoder reads our codes as we do
        ours_decoded = F.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=256)
        manual = code[codes.long()] * torch.repeat_interleave(absmax, 256)[:n]
        assert torch.equal(ours_decoded, manual)
        theirs_decoded = F.dequantize_blockwise(bcodes, absmax=babsmax, code=code, blocksize=256)
        # each lies within half a code gap plus one table bin of the same moment
        bound = (code.diff().max() + 2 * 2 / 65535) * torch.repeat_interleave(babsmax, 256)[:n]
        assert ((ours_decoded - theirs_decoded).abs() <= bound * 1.0001).all()


def test_loss_tracks_torch_adamw_over_200_steps():
    """Done when: on a small regression problem, the loss stays within 5% of torch.optim.AdamW's."""
    def losses(make):
        torch.manual_seed(0)
        x = torch.randn(512, 128)
        y = x @ (torch.randn(128, 64) / 8) + 0.1 * torch.randn(512, 64)
        torch.manual_seed(1)
        model = torch.nn.Linear(128, 64)  # weight: 8192 elements, 8-bit; bias: fp32 state
        opt = make(model.parameters())
        out = []
        for _ in range(200):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            out.append(loss.item())
        return torch.tensor(out)

    ours = losses(lambda p: AdamW8bit(p, lr=1e-2, weight_decay=0.01))
    torchs = losses(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01))
    assert ours[-1] < 0.01 * ours[0]  # it trains
    assert ((ours / torchs - 1).abs() <= 0.05).all(), (ours / torchs).aminmax()


def _state_bytes(opt, p):
    return sum(t.numel() * t.element_size() for t in opt.state[p].values())


@pytest.mark.parametrize("shape", [(4096,), (64, 65), (4097,), (300, 301), (1 << 16,)])
def test_state_bytes_per_parameter(shape):
    """Done when: <= 2.1 bytes of state per parameter for every tensor of >= 4096 elements."""
    p, = _params(shape)
    opt = AdamW8bit([p])
    _train(opt, [p], 1)
    assert opt.state[p]["exp_avg_codes"].dtype == torch.uint8
    assert _state_bytes(opt, p) / p.numel() <= 2.1


def test_small_tensors_keep_fp32_state():
    small, = _params((4095,), dtype=torch.bfloat16)
    opt = AdamW8bit([small])
    _train(opt, [small], 2)
    state = opt.state[small]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].shape == small.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_identically(tmp_path, dtype):
    """Done when: after torch.save / torch.load (weights_only=True), training continues
    bit-identically and the 8-bit states keep their dtypes (torch would cast them to bf16)."""
    shapes = [(80, 70), (33,), (4100,)]
    a = _params(*shapes, dtype=dtype)
    opt_a = AdamW8bit([{"params": a[:2]}, {"params": a[2:], "lr": 3e-3, "block_size": 64}], lr=1e-2, weight_decay=0.1)
    _train(opt_a, a, 3)
    torch.save({"params": [p.detach() for p in a], "optim": opt_a.state_dict()}, tmp_path / "ckpt.pt")

    saved = torch.load(tmp_path / "ckpt.pt")  # weights_only=True is torch's default
    b = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt_b = AdamW8bit([{"params": b[:2]}, {"params": b[2:]}])  # hyperparameters come from the state dict
    opt_b.load_state_dict(saved["optim"])
    assert opt_b.param_groups[1]["lr"] == 3e-3 and opt_b.param_groups[1]["block_size"] == 64
    for p, q in zip(a, b):
        for key, t in opt_a.state[p].items():
            assert opt_b.state[q][key].dtype == t.dtype and torch.equal(opt_b.state[q][key], t)
    assert opt_b.state[b[0]]["exp_avg_codes"].dtype == torch.uint8
    assert opt_b.state[b[0]]["exp_avg_absmax"].dtype == torch.float32

    _train(opt_a, a, 3, first_seed=10)
    _train(opt_b, b, 3, first_seed=10)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_bad_state_dict_leaves_optimizer_unchanged():
    a = _params((80, 70))
    opt = AdamW8bit(a, block_size=256)
    _train(opt, a, 1)
    sd = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[a[0]].items()}
    other = AdamW8bit(_params((80, 70)), block_size=64)
    _train(other, other.param_groups[0]["params"], 1)
    bad = other.state_dict()
    bad["param_groups"][0]["block_size"] = 256  # absmax shape no longer matches the block size
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["block_size"] == 256
    assert all(torch.equal(opt.state[a[0]][k], v) for k, v in before.items())
    opt.load_state_dict(sd)  # a good one still loads


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1e-3), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(betas=(0.9, 1.5)), r"betas\[1\]"), (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(block_size=100), "block_size"),
    (dict(block_size=0), "block_size"), (dict(block_size=-256), "block_size"), (dict(block_size=256.0), "block_size"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    p = _params((10,))
    with pytest.raises(ValueError, match=name):
        AdamW8bit(p, **kwargs)
    opt = AdamW8bit(p)
    with pytest.raises(ValueError, match=name):  # the same checks guard every param group
        opt.add_param_group({"params": _params((5,)), **kwargs})
    assert len(opt.param_groups) == 1


def test_param_groups_scheduler_and_zero_grad():
    """A scheduler's lr reaches the update (as if set by hand), each group keeps its own lr."""
    a, b = _params((70, 60), (70, 60))
    twin, = _params((70, 60))
    frozen = b.detach().clone()
    opt = AdamW8bit([{"params": [a]}, {"params": [b], "lr": 0.0}], lr=1e-2)
    by_hand = AdamW8bit([twin], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for s in range(3):
        _grads([a, b, twin], s)
        twin.grad.copy_(a.grad)
        opt.step()
        by_hand.step()
        sched.step()
        by_hand.param_groups[0]["lr"] /= 2
    assert opt.param_groups[0]["lr"] == by_hand.param_groups[0]["lr"] == 1.25e-3
    assert torch.equal(a, twin) and not torch.equal(a, _params((70, 60))[0])
    assert torch.equal(b, frozen)  # the lr=0 group stays put
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_non_contiguous_parameter_updates_in_place():
    base = torch.randn(90, 80)
    contiguous = torch.nn.Parameter(base.t().contiguous())
    strided = torch.nn.Parameter(base.t())
    assert not strided.is_contiguous()
    opts = [AdamW8bit([contiguous], lr=1e-2), AdamW8bit([strided], lr=1e-2)]
    for s in range(3):
        g = torch.randn(80, 90, generator=torch.Generator().manual_seed(s))
        contiguous.grad, strided.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    assert torch.equal(contiguous, strided) and strided.stride() == (1, 80)


def test_closure_and_params_without_grad():
    a, b = _params((5000,), (5000,))
    opt = AdamW8bit([a, b], lr=1e-2)
    b_before = b.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (a ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert math.isfinite(loss.item()) and torch.equal(b, b_before) and b not in opt.state


def test_state_dict_is_weights_only_loadable():
    a = _params((80, 70))
    opt = AdamW8bit(a)
    _train(opt, a, 1)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["state"][0]["exp_avg_codes"].dtype == torch.uint8
