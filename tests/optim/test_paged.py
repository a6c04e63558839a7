"""PagedAdamW / PagedAdamW8bit against their unpaged twins, torch.optim.AdamW and AdamW8bit.

On a CPU the state stays in host memory and every page is updated in place: step for step the
results must be bit-identical to the twins, whatever the page size (pages cut tensors, and 8-bit
pages must cut them on block boundaries). The CUDA path (pinned host state, staging buffers, the
side stream) runs only on a GPU: `test_cuda_paging` is marked `gpu`.
"""
import pytest
import torch

from fastpeft.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit

SHAPES = [(70, 90), (33,), (4100,), (3, 5, 7)]


def _params(dtype=torch.float32, device="cpu", shapes=SHAPES):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in shapes]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)


def _groups(params, **second):
    return [{"params": params[:2]}, {"params": params[2:], **second}]


def _assert_step_for_step(make_ours, make_twin, dtype=torch.float32, device="cpu", steps=4):
    ours_p, twin_p = _params(dtype, device), _params(dtype, device)
    ours, twin = make_ours(ours_p), make_twin(twin_p)
    for s in range(steps):
        _grads(ours_p, s)
        _grads(twin_p, s)
        ours.step()
        twin.step()
        for a, b in zip(ours_p, twin_p):
            assert torch.equal(a, b), f"step {s + 1}"
    for a, b in zip(ours_p, twin_p):
        for key, t in twin.state[b].items():
            assert torch.equal(ours.state[a][key].cpu(), t.cpu()), key
    return ours, ours_p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1 << 22, 1000])
def test_paged_adamw_is_torch_adamw(dtype, page_size):
    _assert_step_for_step(
        lambda ps: PagedAdamW(_groups(ps, lr=3e-3, weight_decay=0.0), lr=1e-2, page_size=page_size),
        lambda ps: torch.optim.AdamW(_groups(ps, lr=3e-3, weight_decay=0.0), lr=1e-2),
        dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1 << 22, 300, 1])  # 300 and 1 round up to whole blocks
def test_paged_adamw8bit_is_adamw8bit(dtype, page_size):
    _assert_step_for_step(
        lambda ps: PagedAdamW8bit(_groups(ps, block_size=64), lr=1e-2, weight_decay=0.1, page_size=page_size),
        lambda ps: AdamW8bit(_groups(ps, block_size=64), lr=1e-2, weight_decay=0.1),
        dtype)


def test_state_dicts_interchange_with_torch_adamw(tmp_path):
    """PagedAdamW's state is torch.optim.AdamW's: a checkpoint of one resumes in the other."""
    torch_p, paged_p = _params(), _params()
    theirs = torch.optim.AdamW(torch_p, lr=1e-2)
    for s in range(3):
        _grads(torch_p, s)
        theirs.step()
    torch.save(theirs.state_dict(), tmp_path / "adamw.pt")
    for a, b in zip(paged_p, torch_p):
        a.data.copy_(b.data)
    ours = PagedAdamW(paged_p, lr=5.0)  # the loaded param_groups bring lr back to 1e-2
    ours.load_state_dict(torch.load(tmp_path / "adamw.pt"))
    assert ours.param_groups[0]["lr"] == 1e-2
    for s in range(3, 6):
        _grads(torch_p, s)
        _grads(paged_p, s)
        theirs.step()
        ours.step()
    assert all(torch.equal(a, b) for a, b in zip(paged_p, torch_p))
    again = torch.optim.AdamW(_params(), lr=1e-2)
    again.load_state_dict(ours.state_dict())
    assert torch.equal(again.state[again.param_groups[0]["params"][0]]["exp_avg"], ours.state[paged_p[0]]["exp_avg"])


def test_torch_state_dict_with_other_math_is_refused():
    """amsgrad / maximize / coupled weight decay would change the update: refused, not ignored."""
    twin = torch.optim.AdamW(_params(), amsgrad=True)
    ours = PagedAdamW(_params())
    with pytest.raises(ValueError, match="amsgrad"):
        ours.load_state_dict(twin.state_dict())
    assert ours.param_groups[0].get("amsgrad") is None


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
@pytest.mark.parametrize("kwargs,name", [
    (dict(page_size=0), "page_size"), (dict(page_size=2.5), "page_size"),
    (dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), r"betas\[1\]"), (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-1.0), "weight_decay"),
])
def test_bad_arguments_name_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(_params(), **kwargs)


def test_paged_adamw8bit_block_size_is_checked():
    with pytest.raises(ValueError, match="block_size"):
        PagedAdamW8bit(_params(), block_size=96)


@pytest.mark.gpu
@pytest.mark.parametrize("cls,twin", [
    (PagedAdamW8bit, lambda ps: AdamW8bit(ps, lr=1e-2, weight_decay=0.1)),
    (PagedAdamW, lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False)),
])
def test_cuda_paging(cls, twin):
    """On a GPU: state in pinned host memory, several pages per tensor, results identical to the
    twin on the same device (the same kernels on the same inputs), and no state left on the
    device between steps."""
    ours, params = _assert_step_for_step(lambda ps: cls(ps, lr=1e-2, weight_decay=0.1, page_size=512), twin,
                                         torch.bfloat16, "cuda")
    for p in params:
        for key, t in ours.state[p].items():
            assert t.device.type == "cpu" and (key == "step" or t.is_pinned()), key
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    _grads(params, 10)
    ours.step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # the staging buffers went back
    assert ours.state_dict()["state"][0]["step"] == 5
