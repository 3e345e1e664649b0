"""Compile the Triton kernels of kernels/conv_train.py and kernels/bn_stats.py for sm_90 without a GPU.

Triton's compiler and ptxas run on any machine; the interpreter never runs
them, so this is what catches a kernel that only the GPU compiler rejects.
Run by tests/test_conv_train.py in a process without TRITON_INTERPRET. The
specialisations are those of a real launch on channels_last bf16 tensors
(channel strides 1, the other strides and sizes divisible by 16), so the
software pipeline is checked too: it must stage A and B in shared memory.
"""

import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

from fastresnet.kernels.bn_stats import _bn_stats_merge  # noqa: E402
from fastresnet.kernels.conv_train import _conv_stats_fwd  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
DIVISIBLE = ("x_ptr", "w_ptr", "out_ptr", "IN_C", "OUT_C", "stride_xn", "stride_xh", "stride_xw",
             "stride_on", "stride_oh", "stride_ow")
NORM_POINTERS = ("mean_in_ptr", "invstd_in_ptr", "gamma_in_ptr", "beta_in_ptr")


def compile_for_hopper(fn, pointers, constexprs, divisible=(), num_warps=4, num_stages=3):
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs=attrs)
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})
    assert ".entry" in compiled.asm["ptx"], fn.__name__
    return compiled


def conv_variant(kernel, stride, norm_input, dtype="bf16", fp32_mode=0, block_k=64):
    pointers = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                "mean_part_ptr": "*fp32", "m2_part_ptr": "*fp32"}
    constexprs = dict(
        STRIDE_H=stride, STRIDE_W=stride, PAD_H=kernel // 2, PAD_W=kernel // 2, KH=kernel, KW=kernel,
        NORM_INPUT=norm_input, HAS_PADDING=kernel > 1, DOT_IN_FP32=False, FP32_MODE=fp32_mode,
        BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, stride_xc=1, stride_oc=1,
    )
    for name in NORM_POINTERS:
        if norm_input:
            pointers[name] = "*fp32"
        else:
            constexprs[name] = None
    compiled = compile_for_hopper(_conv_stats_fwd, pointers, constexprs, DIVISIBLE, num_warps=8, num_stages=4)
    ttgir = compiled.asm["ttgir"]
    assert "async_copy_global_to_local" in ttgir, f"{kernel}x{kernel} norm={norm_input}: loads not pipelined"
    return compiled.metadata.shared


def main():
    for kernel, stride, norm_input in ((3, 1, True), (3, 2, False), (1, 1, True), (1, 2, False)):
        shared = conv_variant(kernel, stride, norm_input)
        print(f"_conv_stats_fwd {kernel}x{kernel} stride {stride} norm_input={norm_input}: {shared} B shared")
    conv_variant(1, 1, True, dtype="fp32", fp32_mode=1, block_k=32)  # fp32 inputs as tf32
    print("_conv_stats_fwd fp32/tf32: ok")
    compile_for_hopper(
        _bn_stats_merge, {n: "*fp32" for n in ("mean_part_ptr", "m2_part_ptr", "mean_out_ptr", "m2_out_ptr")},
        dict(GROUP=32, BLOCK_C=64),
    )
    print("_bn_stats_merge: ok")


if __name__ == "__main__":
    main()
