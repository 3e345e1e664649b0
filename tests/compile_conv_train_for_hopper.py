"""Compile the Triton kernels of kernels/conv_train.py, experimental/conv_train_bwd.py and bn_stats.py for sm_90
without a GPU.

Triton's compiler and ptxas run on any machine; the interpreter never runs
them, so this is what catches a kernel that only the GPU compiler rejects.
Run by tests/test_hopper_compile.py in a process without TRITON_INTERPRET. The
specialisations are those of a real launch on channels_last bf16 tensors
(channel strides 1, the other strides and sizes divisible by 16), so the
software pipeline is checked too: it must stage A and B in shared memory.
The backward kernels, and every tile that conv_stats' measured dispatch may
time, also go through ptxas (sm_90a), which must report no register spills.
"""

import concurrent.futures
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

from fastresnet.kernels.bn_stats import _bn_stats_merge  # noqa: E402
from hopper_ptxas import ptxas_usage  # noqa: E402  (this folder)
from fastresnet.kernels.conv import _TileConfig  # noqa: E402
from fastresnet.kernels.conv_train import _conv_stats_fwd  # noqa: E402
from fastresnet.kernels.experimental.conv_train_bwd import (  # noqa: E402
    _DGRAD_TILES, _WGRAD_TILES, _conv_dgrad_bn, _conv_wgrad,
)
from fastresnet.kernels.experimental.tiles import _STATS_TILES  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
DIVISIBLE = ("x_ptr", "w_ptr", "out_ptr", "IN_C", "OUT_C", "stride_xn", "stride_xh", "stride_xw",
             "stride_on", "stride_oh", "stride_ow")
NORM_POINTERS = ("mean_in_ptr", "invstd_in_ptr", "weight_in_ptr", "bias_in_ptr")


def compile_for_hopper(fn, pointers, constexprs, divisible=(), num_warps=4, num_stages=3):
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs=attrs)
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})
    assert ".entry" in compiled.asm["ptx"], fn.__name__
    return compiled


def conv_variant(kernel, stride, norm_input, dtype="bf16", fp32_mode=0, block_k=64, tile=(128, 128, 8, 4)):
    """_conv_stats_fwd at one tile: tile = (BLOCK_M, BLOCK_N, warps, stages). Returns the compiled kernel."""
    block_m, block_n, num_warps, num_stages = tile
    pointers = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                "mean_part_ptr": "*fp32", "m2_part_ptr": "*fp32"}
    constexprs = dict(
        STRIDE_H=stride, STRIDE_W=stride, PAD_H=kernel // 2, PAD_W=kernel // 2, KH=kernel, KW=kernel,
        NORM_INPUT=norm_input, HAS_PADDING=kernel > 1, DOT_IN_FP32=False, FP32_MODE=fp32_mode,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, stride_xc=1, stride_oc=1,
    )
    for name in NORM_POINTERS:
        if norm_input:
            pointers[name] = "*fp32"
        else:
            constexprs[name] = None
    compiled = compile_for_hopper(_conv_stats_fwd, pointers, constexprs, DIVISIBLE, num_warps=num_warps,
                                  num_stages=num_stages)
    ttgir = compiled.asm["ttgir"]
    assert "async_copy_global_to_local" in ttgir, f"{kernel}x{kernel} norm={norm_input}: loads not pipelined"
    return compiled


# The one offered tile known to spill, and the most it may: the default's own narrow tile
# (kernels/experimental/tiles.py _STATS_TILES says why it stays a candidate). Anything more fails.
KNOWN_STATS_SPILLS = {"128x64x64w4s4": 16}
H100_SHARED = 227 * 1024


def stats_tile_variant(tile_name, kernel, stride, dtype):
    """One offered conv_stats tile with the prologue: ptxas must report no spills (but the known ones)."""
    tile = _TileConfig.from_name(tile_name)
    fp32 = dtype == "fp32"
    compiled = conv_variant(kernel, stride, True, dtype, fp32_mode=int(fp32),
                            block_k=tile.block_k // 2 if fp32 else tile.block_k,
                            tile=(tile.block_m, tile.block_n, tile.num_warps, tile.num_stages))
    usage = ptxas_usage(compiled.asm["ptx"])
    registers, spills = usage["registers"], usage["spill_bytes"]
    label = f"_conv_stats_fwd tile {tile.name} {kernel}x{kernel} stride {stride} norm_input=True {dtype}"
    allowed = KNOWN_STATS_SPILLS.get(tile.name, 0)
    assert spills <= allowed, f"{label}: {spills} bytes of register spills ({registers} registers)"
    assert compiled.metadata.shared <= H100_SHARED, f"{label}: {compiled.metadata.shared} B shared"
    note = f"{spills} B spilled (known, at most {allowed})" if spills else "no spills"
    return f"{label}: {registers} registers, {note}, {compiled.metadata.shared} B shared"


def stats_tile_variants():
    """Every tile that conv_stats' dispatch may time (kernels/experimental/tiles.py _STATS_TILES) at the
    variants that need the most registers: a 3x3 with the prologue (its padding mask and per-column
    scale and shift), bf16, and fp32 operands as tf32 (half the K step). Stride 2 and 1x1 convs
    needed no more registers than this at any tile tried (both Tritons), so they are left out of
    this check: each compile costs about a second of CI."""
    tiles = sorted({_TileConfig(bm, bn, bk, 8, w, st).name for ts in _STATS_TILES.values() for bm, bn, bk, w, st in ts})
    jobs = [(stats_tile_variant, (name, 3, 1, dtype)) for name in tiles for dtype in ("bf16", "fp32")]
    return jobs, f"conv_stats tiles: {len(tiles)} compiled without unknown spills"


def run_in_parallel(jobs):
    """Each (function, args) job in a pool of processes (a compile is single-threaded; CI has 2
    cores): the lines they return, in order. A failed check raises here."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures = [pool.submit(fn, *args) for fn, args in jobs]
        return [future.result() for future in futures]


NORM_ON = {name: "*fp32" for name in NORM_POINTERS}
NORM_OFF = dict.fromkeys(NORM_POINTERS)


def check_backward_kernel(fn, label, pointers, constexprs, divisible, num_warps, num_stages=4):
    compiled = compile_for_hopper(fn, pointers, constexprs, divisible, num_warps=num_warps, num_stages=num_stages)
    assert "async_copy_global_to_local" in compiled.asm["ttgir"], f"{label}: loads not pipelined"
    usage = ptxas_usage(compiled.asm["ptx"])
    registers, spills = usage["registers"], usage["spill_bytes"]
    assert spills == 0, f"{label}: {spills} bytes of register spills ({registers} registers)"
    return f"{label}: {registers} registers, no spills, {compiled.metadata.shared} B shared"


def wgrad_variant(kernel, stride, norm_input, dtype="bf16", fp32_mode=0, block_m=64, block_co=128, block_ci=128,
                  num_warps=None, num_stages=4):
    """_conv_wgrad as conv_wgrad launches it on a GPU (kernels/experimental/conv_train_bwd.py _wgrad_tile, or a
    measured tile)."""
    pointers = {"grad_y_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "part_ptr": "*fp32"}
    constexprs = dict(
        STRIDE_H=stride, STRIDE_W=stride, PAD_H=kernel // 2, PAD_W=kernel // 2, KH=kernel, KW=kernel,
        NORM_INPUT=norm_input, HAS_PADDING=kernel > 1, DOT_IN_FP32=False, FP32_MODE=fp32_mode,
        BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_M=block_m, stride_gc=1, stride_xc=1,
    )
    if norm_input:
        pointers.update(NORM_ON)
    else:
        constexprs.update(NORM_OFF)
    divisible = ("grad_y_ptr", "x_ptr", "part_ptr", "IN_C", "OUT_C", "ROWS", "stride_gn", "stride_gh",
                 "stride_gw", "stride_xn", "stride_xh", "stride_xw")
    if num_warps is None:
        num_warps = 8 if block_co * block_ci >= 128 * 128 else 4
    label = (f"_conv_wgrad {kernel}x{kernel} stride {stride} norm_input={norm_input} {dtype} "
             f"{block_co}x{block_ci}x{block_m}w{num_warps}s{num_stages}")
    return check_backward_kernel(_conv_wgrad, label, pointers, constexprs, divisible, num_warps, num_stages)


def dgrad_variant(kernel, norm_input, dtype="bf16", fp32_mode=0, block_k=64, block_n=128, num_warps=8, block_m=128,
                  num_stages=4):
    """_conv_dgrad_bn as conv_dgrad_bn launches it (kernels/conv.py _tile_config: 128x128 tiles, 8 warps;
    with the BatchNorm epilogue at most 64 columns)."""
    pointers = {"grad_y_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "g_ptr": f"*{dtype}"}
    constexprs = dict(
        PAD_H=kernel // 2, PAD_W=kernel // 2, KH=kernel, KW=kernel, NORM_INPUT=norm_input,
        DOT_IN_FP32=False, FP32_MODE=fp32_mode, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        stride_gc=1, stride_xc=1, stride_oc=1,
    )
    if norm_input:
        pointers.update(NORM_ON, x_ptr=f"*{dtype}", sum_g_part_ptr="*fp32", sum_gx_part_ptr="*fp32")
    else:
        constexprs.update(NORM_OFF, x_ptr=None, sum_g_part_ptr=None, sum_gx_part_ptr=None)
    divisible = ("grad_y_ptr", "w_ptr", "g_ptr", "IN_C", "OUT_C", "stride_gn", "stride_gh", "stride_gw",
                 "stride_on", "stride_oh", "stride_ow") + (("x_ptr", "stride_xn", "stride_xh", "stride_xw")
                                                            if norm_input else ())
    label = (f"_conv_dgrad_bn {kernel}x{kernel} norm_input={norm_input} {dtype} "
             f"{block_m}x{block_n}x{block_k}w{num_warps}s{num_stages}")
    return check_backward_kernel(_conv_dgrad_bn, label, pointers, constexprs, divisible, num_warps, num_stages)


def backward_tile_variants():
    """Every wgrad and dgrad tile that the backward's measured dispatch may time
    (kernels/experimental/conv_train_bwd.py _WGRAD_TILES, _DGRAD_TILES) on a 3x3 with the BatchNorm prologue
    or epilogue where the table's tiles get one, bf16 and fp32 (half the K step)."""
    jobs = []
    wgrad_tiles = sorted({t for tiles in _WGRAD_TILES.values() for t in tiles})
    for bm, bn, bk, warps, stages in wgrad_tiles:
        for dtype in ("bf16", "fp32"):
            fp32 = dtype == "fp32"
            jobs.append((wgrad_variant, (3, 1, True, dtype, int(fp32), bk // 2 if fp32 else bk, bm, bn, warps, stages)))
    dgrad_tiles = [(t, norm) for table, norm in (("bn_epilogue", True), ("plain", False)) for t in _DGRAD_TILES[table]]
    for (bm, bn, bk, warps, stages), norm_input in dgrad_tiles:
        for dtype in ("bf16", "fp32"):
            fp32 = dtype == "fp32"
            k_step = bk // 2 if fp32 else bk
            jobs.append((dgrad_variant, (3, norm_input, dtype, int(fp32), k_step, bn, warps, bm, stages)))
    return jobs, f"backward tiles: {len(wgrad_tiles) + len(dgrad_tiles)} compiled without spills"


def main():
    for kernel, stride, norm_input in ((3, 1, True), (3, 2, False), (1, 1, True), (1, 2, False)):
        shared = conv_variant(kernel, stride, norm_input).metadata.shared
        print(f"_conv_stats_fwd {kernel}x{kernel} stride {stride} norm_input={norm_input}: {shared} B shared")
    conv_variant(1, 1, True, dtype="fp32", fp32_mode=1, block_k=32)  # fp32 inputs as tf32
    print("_conv_stats_fwd fp32/tf32: ok")
    compile_for_hopper(
        _bn_stats_merge, {n: "*fp32" for n in ("mean_part_ptr", "m2_part_ptr", "mean_out_ptr", "m2_out_ptr")},
        dict(GROUP=32, BLOCK_C=64),
    )
    print("_bn_stats_merge: ok")
    for kernel, stride, norm_input in ((3, 1, True), (3, 2, True), (1, 1, True), (1, 2, False)):
        print(wgrad_variant(kernel, stride, norm_input))
    print(wgrad_variant(1, 1, True, dtype="fp32", fp32_mode=1, block_m=32))  # fp32 inputs as tf32
    print(wgrad_variant(3, 1, True, block_co=64, block_ci=64))  # the 64-channel convs of layer1
    print(wgrad_variant(1, 1, True, block_co=128, block_ci=64))
    for kernel in (3, 1):
        print(dgrad_variant(kernel, True, block_n=64))
    print(dgrad_variant(3, False))
    print(dgrad_variant(1, True, dtype="fp32", fp32_mode=1, block_k=32, block_n=64))
    print(dgrad_variant(3, True, block_n=64, num_warps=4))  # 64 input channels: 128x64 tiles, 4 warps
    # The tiles the measured dispatch may time: many compiles, so in parallel.
    (stats_jobs, stats_done), (bwd_jobs, bwd_done) = stats_tile_variants(), backward_tile_variants()
    lines = run_in_parallel(stats_jobs + bwd_jobs)
    print("\n".join(lines[:len(stats_jobs)] + [stats_done] + lines[len(stats_jobs):] + [bwd_done]))
    print("backward kernels: ok")


if __name__ == "__main__":
    main()
