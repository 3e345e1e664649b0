"""Merge per-tile BatchNorm statistics partials into batch statistics.

The conv epilogue (kernels/conv_train.py) leaves one (mean, M2) partial per
row block and channel; a large activation has thousands of them (ResNet-50's
first stage at batch 256: 6,272 row blocks). kernels/bn_act.py's `_bn_stats_finalize`
merges partials with one program per channel block, which is right for a
few hundred partials but leaves the GPU nearly idle for thousands. So first
`_bn_stats_merge` reduces groups of GROUP partials in parallel, with the same
numerically safe formula (Chan et al.), pivoting on each group's first mean:

    d_p = mean_p - pivot,  n = sum(n_p),
    mean = pivot + sum(n_p d_p) / n,
    M2   = sum(M2_p) + sum(n_p d_p^2) - (sum(n_p d_p))^2 / n,

and the finalize step runs on the merged partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastresnet.kernels.bn_act import _bn_stats_finalize


@triton.jit
def _bn_stats_merge(
    mean_part_ptr,  # [P, C] fp32: partial means
    m2_part_ptr,  # [P, C] fp32: partial M2
    mean_out_ptr,  # [cdiv(P, GROUP), C] fp32 out: merged means
    m2_out_ptr,  # [cdiv(P, GROUP), C] fp32 out: merged M2
    P, M, C,  # partials, rows, channels
    ROWS,  # rows per input partial (the last one may have fewer)
    GROUP: tl.constexpr,  # input partials per output partial
    BLOCK_C: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    parts = group * GROUP + tl.arange(0, GROUP)
    part_mask = parts < P
    mask = part_mask[:, None] & col_mask[None, :]
    offs = parts[:, None] * C + cols[None, :]
    pivot = tl.load(mean_part_ptr + group * GROUP * C + cols, mask=col_mask, other=0.0)
    counts = tl.where(part_mask, tl.minimum(M - parts * ROWS, ROWS), 0).to(tl.float32)
    d = tl.where(mask, tl.load(mean_part_ptr + offs, mask=mask, other=0.0) - pivot[None, :], 0.0)
    nd = counts[:, None] * d
    total = tl.sum(counts, axis=0)
    sum_nd = tl.sum(nd, axis=0)
    m2 = tl.sum(tl.load(m2_part_ptr + offs, mask=mask, other=0.0), axis=0) + tl.sum(nd * d, axis=0)
    m2 -= sum_nd * sum_nd / total
    tl.store(mean_out_ptr + group * C + cols, pivot + sum_nd / total, mask=col_mask)
    tl.store(m2_out_ptr + group * C + cols, tl.maximum(m2, 0.0), mask=col_mask)


# ---------------------------------------------------------------------------
# Launch helper
# ---------------------------------------------------------------------------


def _merge_once(mean_part, m2_part, m, rows, group):
    parts, c = mean_part.shape
    merged = triton.cdiv(parts, group)
    mean_out = torch.empty((merged, c), device=mean_part.device, dtype=torch.float32)
    m2_out = torch.empty_like(mean_out)
    block_c = min(triton.next_power_of_2(c), 64)
    _bn_stats_merge[(merged, triton.cdiv(c, block_c))](
        mean_part, m2_part, mean_out, m2_out, parts, m, c, rows, GROUP=group, BLOCK_C=block_c, num_warps=4
    )
    return mean_out, m2_out, rows * group


def finalize_stats(mean_part, m2_part, m, rows, eps, max_parts=None):
    """(mean, invstd, unbiased var) per channel, fp32, from [P, C] partials of `rows` rows each over m rows.

    More than max_parts partials (default: 256 on a GPU, 4096 under the
    interpreter, where one finalize program is cheapest) are merged in parallel first."""
    if m <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {m} rows")
    on_gpu = mean_part.is_cuda
    if max_parts is None:
        max_parts = 256 if on_gpu else 4096
    while mean_part.shape[0] > max_parts:
        mean_part, m2_part, rows = _merge_once(mean_part, m2_part, m, rows, group=32)
    parts, c = mean_part.shape
    mean = torch.empty(c, device=mean_part.device, dtype=torch.float32)
    invstd = torch.empty_like(mean)
    var_unbiased = torch.empty_like(mean)
    block_p = min(triton.next_power_of_2(parts), 128 if on_gpu else 4096)
    block_c = min(triton.next_power_of_2(c), 32 if on_gpu else 1024)
    _bn_stats_finalize[(triton.cdiv(c, block_c),)](
        mean_part, m2_part, mean, invstd, var_unbiased, parts, m, c, rows, eps,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
    )
    return mean, invstd, var_unbiased
