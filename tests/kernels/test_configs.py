"""kernels/configs/: per-arch launch tables, the FASTPEFT_ARCH override, pruning by the resource
estimate before launch, and decode grids sized to fill the GPU. Host-side only."""
import pytest
import torch
import triton

from fastpeft.kernels import configs, nf4_decode


@pytest.mark.parametrize("arch", configs.ARCHS)
def test_env_picks_the_table(monkeypatch, arch):
    monkeypatch.setenv("FASTPEFT_ARCH", arch)
    assert configs.arch() == arch
    assert configs.table().SMEM_LIMIT == {"sm_90a": 232448, "sm_80": 166912}[arch]


def test_env_refuses_unknown_arch(monkeypatch):
    monkeypatch.setenv("FASTPEFT_ARCH", "sm_75")
    with pytest.raises(ValueError, match="FASTPEFT_ARCH"):
        configs.arch()


@pytest.mark.parametrize("arch", configs.ARCHS)
@pytest.mark.parametrize("family,nf4", [("LORA_FWD", False), ("NF4_TILED", True)])
def test_every_candidate_fits_its_arch(arch, family, nf4):
    """16-bit candidates all fit; fp32 (ieee, 4-byte tiles) keeps at least one after pruning."""
    for bm, bn, bk, nw, ns in configs.candidates(family, arch):
        for r_pad in (16, 64):
            assert configs.smem_estimate(bm, bn, bk, ns, 2, r_pad, nf4) <= configs.table(arch).SMEM_LIMIT
    cands = [configs._to_config(c) for c in configs.candidates(family, arch)]
    x = torch.empty(1, 1, dtype=torch.float32)
    kept = configs.prune(nf4, arch)(cands, {"x_ptr": x, "M": 2048, "P": 4096}, R_PAD=64, HAS_LORA=True)
    assert kept and all(configs.smem_estimate(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                              c.num_stages, 4, 64, nf4) <= configs.table(arch).SMEM_LIMIT for c in kept)


def test_prune_drops_what_does_not_fit():
    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3)
    small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3)
    x = torch.empty(2, 2, dtype=torch.bfloat16)
    for arch in configs.ARCHS:
        kept = configs.prune(False, arch)([big, small], {"x_ptr": x, "M": 2048, "P": 4096}, R_PAD=16, HAS_LORA=True)
        assert kept == [small]   # 128x256 spills registers on both archs (the estimate says so)


def test_prune_prefers_wide_grids_at_decode():
    narrow = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=3)
    wide = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=3)
    x = torch.empty(1, 1, dtype=torch.float16)
    kept = configs.prune(False, "sm_90a")([narrow, wide], {"x_ptr": x, "M": 1, "P": 4096}, R_PAD=16, HAS_LORA=True)
    assert kept == [wide]


@pytest.mark.parametrize("arch", configs.ARCHS)
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("N,K", [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_decode_grid_fills_the_gpu(monkeypatch, arch, M, N, K):
    monkeypatch.setenv("FASTPEFT_ARCH", arch)
    for P, Q in ((N, K), (K, N)):  # forward and dX
        cfg = nf4_decode.decode_config(M, P, Q, has_lora=True)
        programs = (triton.cdiv(P, cfg["BLOCK_N"]) + 1) * cfg["SPLIT_K"]
        assert programs >= configs.MIN_DECODE_PROGRAMS
        assert (cfg["SPLIT_K"] - 1) * cfg["k_per_split"] < Q <= cfg["SPLIT_K"] * cfg["k_per_split"]
        assert cfg["k_per_split"] % cfg["BLOCK_K"] == 0
