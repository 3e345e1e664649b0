"""Compile every dispatch tile of the inference conv (kernels/conv.py) for sm_90 without a GPU.

Triton's compiler and ptxas run on any machine; the interpreter never runs
them, so this is what catches a tile that only the GPU would reject. For each
shape class the script compiles every tile of kernels.experimental.tiles._HOPPER_TILES with
bf16 operands and the specialisations of a real launch on channels_last
tensors (channel strides 1, pointers and the other strides divisible by 16),
runs ptxas -v for sm_90a on the PTX, and fails when a tile spills registers
or needs more shared memory than an H100 gives one block (227 KB). Each class
is compiled with the heaviest epilogue it meets (see VARIANTS), and the widest
tiles once more on the strided 3x3 K loop: both K loops, both epilogues. Run by tests/test_hopper_compile.py in a process
without TRITON_INTERPRET.

    python tests/compile_conv_for_hopper.py [--report]   # --report: registers and shared memory per tile
"""

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

from fastresnet.kernels.conv import _conv_bn_act_fwd  # noqa: E402
from fastresnet.kernels.experimental.tiles import _HOPPER_TILES  # noqa: E402
from hopper_ptxas import ptxas_usage  # noqa: E402  (this folder)

HOPPER = GPUTarget("cuda", 90, 32)
H100_SHARED_PER_BLOCK = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90
POINTERS = {"x_ptr": "*bf16", "w_ptr": "*bf16", "scale_ptr": "*fp32", "shift_ptr": "*fp32", "res_ptr": "*bf16",
            "out_ptr": "*bf16"}
# What Triton's launcher marks divisible by 16 for ResNet channel counts (C = 64 ... 2048).
DIVISIBLE = ("x_ptr", "w_ptr", "scale_ptr", "shift_ptr", "res_ptr", "out_ptr", "OUT_C",
             "stride_on", "stride_oh", "stride_ow", "stride_rn", "stride_rh", "stride_rw", "stride_xn", "stride_xh")
DIVISIBLE_WITH_CHANNELS = ("IN_C", "stride_xw")  # not for the stem (C = 3)

# (class, kernel, stride, residual, relu): the variant compiled for every tile of the class, the heaviest
# epilogue the class meets (a residual tile is live with the accumulator; 64-channel convs get one in
# resnet18/34's layer1)
VARIANTS = [
    ("flat_k", 7, 2, False, True),
    ("narrow", 3, 1, True, True),
    ("wide", 1, 1, False, True),
    ("wide_residual", 1, 1, True, True),
]
# The widest tiles once more on the 3x3 K loop (its address arithmetic is live in the loop)
WIDE_STRIDED_TILES = ((128, 256, 64, 8, 3), (64, 256, 64, 8, 4))


def compile_tile(tile, kernel, stride, residual, relu):
    block_m, block_n, block_k, num_warps, num_stages = tile
    flat_k = kernel == 7
    constexprs = dict(
        STRIDE_H=stride, STRIDE_W=stride, PAD_H=kernel // 2, PAD_W=kernel // 2, DIL_H=1, DIL_W=1, KH=kernel,
        KW=kernel, FLAT_K=flat_k, HAS_RESIDUAL=residual, APPLY_RELU=relu, DOT_IN_FP32=False, FP32_MODE=0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, stride_xc=1, stride_rc=1, stride_oc=1,
    )
    names = _conv_bn_act_fwd.arg_names
    signature = {n: "constexpr" if n in constexprs else POINTERS.get(n, "i32") for n in names}
    divisible = DIVISIBLE if flat_k else DIVISIBLE + DIVISIBLE_WITH_CHANNELS
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn=_conv_bn_act_fwd, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.asm["ptx"], compiled.metadata.shared


def check_tile(shape_class, tile, kernel, stride, residual, relu) -> tuple[str, str | None]:
    """(a report line, the problem or None)."""
    ptx, shared = compile_tile(tile, kernel, stride, residual, relu)
    usage = ptxas_usage(ptx)
    name = "{}x{}x{}w{}s{}".format(*tile)
    line = (f"{shape_class:7s} {name:16s} {kernel}x{kernel} s{stride} res{int(residual)}: "
            f"{usage['registers']} registers, {usage['spill_bytes']} B spilled, {shared} B shared")
    if usage["spill_bytes"]:
        return line, f"spills registers: {line}"
    if shared > H100_SHARED_PER_BLOCK:
        return line, f"needs more shared memory than an H100 block has: {line}"
    return line, None


def main():
    checks = [check_tile(shape_class, tile, kernel, stride, residual, relu)
              for shape_class, kernel, stride, residual, relu in VARIANTS for tile in _HOPPER_TILES[shape_class]]
    checks += [check_tile("wide", tile, 3, 2, False, True) for tile in WIDE_STRIDED_TILES]
    if "--report" in sys.argv:
        print("\n".join(line for line, _ in checks))
    problems = [problem for _, problem in checks if problem]
    if problems:
        sys.exit("tiles that must leave kernels/experimental/tiles.py's _HOPPER_TILES:\n" + "\n".join(problems))
    print(f"compiled {len(checks)} conv tiles for sm_90a: no spills, shared memory within 227 KB")


if __name__ == "__main__":
    main()
