"""Compile every Triton kernel variant of kernels/bn_act.py for sm_90 (H100/H200)
without a GPU: Triton's compiler and ptxas run on any machine, the interpreter
never runs them. Run by tests/test_bn_act.py in a process without
TRITON_INTERPRET (under it the kernels are interpreter objects).
Inputs bf16 with channel stride 1 (channels_last), as on the GPU."""

import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

from fastresnet.kernels import bn_act as kernels  # noqa: E402

ACT, F32 = "*bf16", "*fp32"


def compile_for_hopper(fn, pointers, constexprs):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "fp32" if name == "eps" else "i32")
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert ".entry" in compiled.asm["ptx"], fn.__name__


def main():
    unit_stride = {"x_sc": 1, "y_sc": 1, "r_sc": 1, "dy_sc": 1, "dx_sc": 1, "dr_sc": 1}
    channels = {"scale_ptr": F32, "invstd_ptr": F32, "shift_ptr": F32, "center_ptr": F32}
    absent = {"res_ptr": None, "invstd_ptr": None, "center_ptr": None}
    tiles = {"BLOCK_M": 32, "BLOCK_C": 64}

    def strides(fn):
        return {k: v for k, v in unit_stride.items() if k in fn.arg_names}

    fwd = kernels._affine_act_fwd
    variants = [
        (fwd, {"x_ptr": ACT, "y_ptr": ACT, "res_ptr": ACT, **channels}, {"RELU": True, **tiles, **strides(fwd)}),
        (fwd, {"x_ptr": ACT, "y_ptr": ACT, **channels}, {"RELU": False, **tiles, **strides(fwd), **absent}),
        (
            kernels._bn_stats_partial,
            {"x_ptr": ACT, "mean_part_ptr": F32, "m2_part_ptr": F32},
            {"x_sc": 1, **tiles},
        ),
        (
            kernels._bn_stats_finalize,
            {"mean_part_ptr": F32, "m2_part_ptr": F32, "mean_ptr": F32, "invstd_ptr": F32, "var_unbiased_ptr": F32},
            {"BLOCK_P": 64, "BLOCK_C": 64},
        ),
    ]
    bwd = {"dy_ptr": ACT, "x_ptr": ACT, "res_ptr": ACT, **channels}
    reduce, dx = kernels._affine_act_bwd_reduce, kernels._affine_act_bwd_dx
    variants += [
        (reduce, {**bwd, "sum_g_part_ptr": F32, "sum_gx_part_ptr": F32}, {"RELU": True, **tiles, **strides(reduce)}),
        (
            dx,
            {**bwd, "dx_ptr": ACT, "dres_ptr": ACT, "sum_g_ptr": F32, "sum_gx_ptr": F32},
            {"RELU": True, "BATCH_STATS": True, **tiles, **strides(dx)},
        ),
        (
            dx,
            {"dy_ptr": ACT, "x_ptr": ACT, "dx_ptr": ACT, **channels},
            {
                "RELU": True, "BATCH_STATS": False, **tiles, **strides(dx), **absent,
                "dres_ptr": None, "sum_g_ptr": None, "sum_gx_ptr": None,
            },
        ),
    ]
    for fn, pointers, constexprs in variants:
        compile_for_hopper(fn, pointers, constexprs)
    print(f"compiled {len(variants)} kernel variants for sm_90")


if __name__ == "__main__":
    main()
