"""Launch configs for A100 (sm_80): 166,912 B of shared memory per block, 108 SMs.

Tiled GEMMs list autotune candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages);
`configs.prune` drops those whose resource estimate does not fit before any is compiled.
Decode kernels take one fixed config each (no hot-path autotune: CUDA graphs), sized so that a
4096x4096 layer at M = 1 launches >= 2 x 132 programs (split-K fills the rest).
"""
SMEM_LIMIT = 166912
SMS = 108

LORA_FWD = [
    (16, 16, 128, 4, 3),     # decode: narrow columns, so a 4096-wide layer gets 256 programs
    (16, 32, 128, 4, 4),
    (16, 64, 128, 4, 4),
    (32, 64, 64, 4, 4),
    (64, 64, 32, 8, 3),      # prefill; the one fp32 (ieee, FMA) prefill tile that does not spill
    (64, 64, 64, 4, 4),      # M >= 64 tiles run on mma.sync
    (64, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 3),
]
NF4_TILED = [
    (64, 64, 32, 8, 3),      # fits fp32 too
    (64, 128, 64, 4, 3),
    (128, 64, 64, 8, 3),
    (128, 128, 64, 8, 3),
]
# (64, 64, 64, 4, 3) and (64, 128, 128, 8, 2) spill on sm_80 (static check, dX and forward)
# decode, M <= 4: multiply-and-reduce GEMV; 4 < M <= 16: tl.dot on a 16-row tile
NF4_GEMV = dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3)
NF4_SPLITK = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3)
MULTI_GROUPED = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
MULTI_GATHERED = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=2)
