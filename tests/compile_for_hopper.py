"""Compile every Triton kernel variant of kernels/bn_act.py for sm_90 (H100/H200)
without a GPU: Triton's compiler and ptxas run on any machine, the interpreter
never runs them. Run by tests/test_hopper_compile.py in a process without
TRITON_INTERPRET (under it the kernels are interpreter objects).
Inputs bf16 with channel stride 1 (channels_last), as on the GPU, and every
pointer and pixel/image stride marked divisible by 16, as Triton's launcher
marks them for ResNet channel counts (so the PTX has the GPU's vector widths).

`--report` also prints, per variant, the registers ptxas (sm_90a) gives a
thread and the widest global load and store in the PTX (v4.b32 = 16 bytes):
the evidence behind the block sizes in kernels/bn_act.py."""

import os
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

from fastresnet.kernels import bn_act as kernels  # noqa: E402
from fastresnet.kernels import bn_stats  # noqa: E402
from fastresnet.kernels.experimental import bn_act as shelf  # noqa: E402
from hopper_ptxas import ptxas_usage  # noqa: E402  (this folder)

ACT, F32 = "*bf16", "*fp32"


def _divisible_by_16(name, signature) -> bool:
    """Pointers, the image/pixel strides (multiples of C), C, M and ROWS; not HW
    (49 and 196 at the 7x7 and 14x14 stages)."""
    kind = signature[name]
    return kind.startswith("*") or (kind == "i32" and re.search(r"_s(n|hw)$|^(M|C|ROWS)$", name) is not None)


def compile_for_hopper(fn, pointers, constexprs, num_warps=4):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "fp32" if name == "eps" else "i32")
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name not in constexprs and _divisible_by_16(name, signature)
    }
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert ".entry" in compiled.asm["ptx"], fn.__name__
    return compiled.asm["ptx"]


def _widest(ptx: str, op: str) -> str:
    widths = re.findall(rf"{op}\.global(?:\.[a-z0-9_]+)*?(\.v[248])?\.(b16|b32|b64|f32|u16)", ptx)
    if not widths:
        return "none"
    bytes_of = {"b16": 2, "u16": 2, "b32": 4, "f32": 4, "b64": 8}
    return f"{max(int(v[2:] if v else 1) * bytes_of[t] for v, t in widths)} B"


def ptxas_registers(ptx: str) -> str:
    usage = ptxas_usage(ptx)
    return f"{usage['registers']} (spills {usage['spill_bytes']} B)"


def main():
    unit_stride = {"x_sc": 1, "y_sc": 1, "r_sc": 1, "dy_sc": 1, "dx_sc": 1, "dr_sc": 1}
    channels = {"scale_ptr": F32, "invstd_ptr": F32, "shift_ptr": F32, "center_ptr": F32}
    absent = {"res_ptr": None, "invstd_ptr": None, "center_ptr": None}
    tiles = {"BLOCK_M": 32, "BLOCK_C": 64}
    stats_tiles = {"BLOCK_M": 64, "BLOCK_C": 64}  # _STATS_TILE_ELEMENTS
    elementwise_tiles = {"BLOCK_M": 64, "BLOCK_C": 64}  # _elementwise_blocks on a GPU

    def strides(fn):
        return {k: v for k, v in unit_stride.items() if k in fn.arg_names}

    fwd = kernels._affine_act_fwd
    variants = [
        (fwd, {"x_ptr": ACT, "y_ptr": ACT, "res_ptr": ACT, **channels},
         {"RELU": True, **elementwise_tiles, **strides(fwd)}),
        (fwd, {"x_ptr": ACT, "y_ptr": ACT, **channels}, {"RELU": False, **elementwise_tiles, **strides(fwd), **absent}),
        # inference: the running statistics folded in the kernel (fp32 parameters and buffers)
        (
            shelf._bn_eval_act_fwd,
            {"x_ptr": ACT, "y_ptr": ACT, "res_ptr": ACT, "weight_ptr": F32, "bias_ptr": F32, "mean_ptr": F32,
             "var_ptr": F32},
            {"RELU": True, **elementwise_tiles, **strides(shelf._bn_eval_act_fwd)},
        ),
        (
            bn_stats._bn_stats_partial,
            {"x_ptr": ACT, "mean_part_ptr": F32, "m2_part_ptr": F32},
            {"x_sc": 1, **stats_tiles},
        ),
        # the same over whole-row tiles of 256 channels (the triton_wide candidate)
        (
            shelf._bn_eval_act_fwd,
            {"x_ptr": ACT, "y_ptr": ACT, "res_ptr": ACT, "weight_ptr": F32, "bias_ptr": F32, "mean_ptr": F32,
             "var_ptr": F32},
            {"RELU": True, "BLOCK_M": 16, "BLOCK_C": 256, **strides(shelf._bn_eval_act_fwd)},
        ),
        # the one-launch training forward candidate (triton_single): 256x16 tile, 8 warps
        (
            shelf._bn_train_fwd_single,
            {"x_ptr": ACT, "y_ptr": ACT, "res_ptr": ACT, "weight_ptr": F32, "bias_ptr": F32, "mean_ptr": F32,
             "invstd_ptr": F32, "var_unbiased_ptr": F32},
            {"RELU": True, "BLOCK_M": 256, "BLOCK_C": 16, **strides(shelf._bn_train_fwd_single)},
            8,
        ),
        (
            bn_stats._bn_stats_finalize,
            {"mean_part_ptr": F32, "m2_part_ptr": F32, "mean_ptr": F32, "invstd_ptr": F32, "var_unbiased_ptr": F32},
            {"BLOCK_P": 64, "BLOCK_C": 64},
        ),
    ]
    bwd = {"dy_ptr": ACT, "x_ptr": ACT, "res_ptr": ACT, **channels}
    reduce, dx = kernels._affine_act_bwd_reduce, kernels._affine_act_bwd_dx
    pipelined = shelf._affine_act_bwd_reduce_pipelined
    partials = {"sum_g_part_ptr": F32, "sum_gx_part_ptr": F32}
    variants += [
        # with a residual: the reduction also stores g (the residual's gradient)
        (reduce, {**bwd, **partials, "g_ptr": ACT, "g_sc": 1},
         {"RELU": True, **tiles, **strides(reduce), "g_sc": 1}),
        (reduce, {**bwd, **partials},
         {"RELU": True, **tiles, **strides(reduce), "res_ptr": None, "g_ptr": None}),
        # the experimental shelf's software-pipelined reduction ("triton_pipelined"), with and without a residual
        (pipelined, {**bwd, **partials, "g_ptr": ACT, "g_sc": 1},
         {"RELU": True, **tiles, **strides(pipelined), "g_sc": 1}),
        (pipelined, {**bwd, **partials},
         {"RELU": True, **tiles, **strides(pipelined), "res_ptr": None, "g_ptr": None}),
        # training dx from g (residual case): no residual, no mask
        (
            dx,
            {"dy_ptr": ACT, "x_ptr": ACT, "dx_ptr": ACT, **channels, "sum_g_ptr": F32, "sum_gx_ptr": F32},
            {"RELU": False, "BATCH_STATS": True, **elementwise_tiles, **strides(dx), "res_ptr": None, "dres_ptr": None},
        ),
        # training dx from dy (no residual): the mask recomputed
        (
            dx,
            {"dy_ptr": ACT, "x_ptr": ACT, "dx_ptr": ACT, **channels, "sum_g_ptr": F32, "sum_gx_ptr": F32},
            {"RELU": True, "BATCH_STATS": True, **elementwise_tiles, **strides(dx), "res_ptr": None, "dres_ptr": None},
        ),
        # frozen scale/shift: dx and dresidual in one pass
        (
            dx,
            {**bwd, "dx_ptr": ACT, "dres_ptr": ACT},
            {
                "RELU": True, "BATCH_STATS": False, **elementwise_tiles, **strides(dx),
                "invstd_ptr": None, "center_ptr": None, "sum_g_ptr": None, "sum_gx_ptr": None,
            },
        ),
    ]
    report = "--report" in sys.argv
    for fn, pointers, constexprs, *warps in variants:
        ptx = compile_for_hopper(fn, pointers, constexprs, num_warps=warps[0] if warps else 4)
        if report:
            tile = f"{constexprs.get('BLOCK_M', constexprs.get('BLOCK_P'))}x{constexprs.get('BLOCK_C')}"
            absent_names = ",".join(k.removesuffix("_ptr") for k, v in constexprs.items() if v is None) or "-"
            print(f"{fn.__name__:34s} tile {tile:6s} absent {absent_names:30s} regs {ptxas_registers(ptx):>4s} "
                  f"widest load {_widest(ptx, 'ld')}, store {_widest(ptx, 'st')}")
    print(f"compiled {len(variants)} kernel variants for sm_90")


if __name__ == "__main__":
    main()
