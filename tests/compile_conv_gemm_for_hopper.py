"""Compile every dispatch tile of the 1x1 TMA GEMM conv (kernels/experimental/conv_gemm.py) for sm_90 without a GPU.

For each tile of kernels.experimental.conv_gemm._GEMM_TILES, with bf16 operands and the
heaviest epilogue its shape class meets (see EPILOGUES), the script compiles the kernel for sm_90 with the tensor
descriptor arguments a real launch passes, and fails when

  - the PTX lacks the Hopper instructions the kernel exists for: TMA loads and
    stores (`cp.async.bulk.tensor`) and warpgroup MMAs (`wgmma.mma_async`);
  - the SASS (Triton's cubin through nvdisasm) lacks the tensor-core op `HGMMA`;
  - ptxas (sm_90a) spills registers, or the kernel needs more shared memory than
    an H100 gives one block (227 KB), or more than the launch helper's estimate
    (kernels.experimental.conv_gemm._gemm_shared_bytes, by which the launch helper drops tiles on smaller GPUs).

    python tests/compile_conv_gemm_for_hopper.py [--report]   # --report: a line per tile
"""

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

from compile_conv_for_hopper import H100_SHARED_PER_BLOCK  # noqa: E402  (this folder)
from hopper_ptxas import ptxas_usage  # noqa: E402  (this folder)
from fastresnet.kernels.conv import _TileConfig  # noqa: E402
from fastresnet.kernels.experimental.conv_gemm import (  # noqa: E402
    _GEMM_TILES, GROUP_M, _conv1x1_gemm_bn_act, _gemm_shared_bytes,
)

HOPPER = GPUTarget("cuda", 90, 32)
# (residual, relu) per shape class: "wide" serves the convs without a residual (conv1: ReLU; a stride-1
# downsample: neither), "wide_residual" the conv3s (residual + ReLU, the residual tile live with the
# accumulator); the 64-channel tiles get both
EPILOGUES = {"narrow": [(False, True), (True, True)], "wide": [(False, True)], "wide_residual": [(True, True)]}


def _descriptor(rows: int, cols: int) -> str:
    return f"tensordesc<bf16[{rows},{cols}]>"


def compile_tile(tile, residual, relu):
    block_m, block_n, block_k, num_warps, num_stages = tile
    constexprs = dict(HAS_RESIDUAL=residual, APPLY_RELU=relu, DOT_IN_FP32=False, FP32_MODE=0,
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M)
    kinds = {"x_desc": _descriptor(block_m, block_k), "w_desc": _descriptor(block_n, block_k),
             "res_desc": _descriptor(block_m, block_n), "out_desc": _descriptor(block_m, block_n),
             "scale_ptr": "*fp32", "shift_ptr": "*fp32"}
    names = _conv1x1_gemm_bn_act.arg_names
    signature = {n: "constexpr" if n in constexprs else kinds.get(n, "i32") for n in names}
    # What Triton's launcher marks divisible by 16 for ResNet channel counts (C, Cout = 64 ... 2048)
    divisible = ("scale_ptr", "shift_ptr", "OUT_C", "IN_C")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn=_conv1x1_gemm_bn_act, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})


def hopper_instructions(compiled) -> dict:
    """Counts of the instructions that make this kernel a Hopper GEMM, in the PTX and the SASS."""
    ptx = compiled.asm["ptx"]
    sass = compiled.asm["sass"]
    return {
        "tma_loads": ptx.count("cp.async.bulk.tensor.2d.shared::"),  # global -> shared (::cta or ::cluster)
        "tma_stores": ptx.count("cp.async.bulk.tensor.2d.global.shared::"),  # shared -> global
        "wgmma": ptx.count("wgmma.mma_async"),
        "hgmma_sass": sass.count("HGMMA"),
        "utmaldg_sass": sass.count("UTMALDG"),
    }


def check_tile(tile, residual, relu) -> tuple[str, str | None]:
    """(a report line, the problem or None)."""
    compiled = compile_tile(tile, residual, relu)
    usage = ptxas_usage(compiled.asm["ptx"])
    found = hopper_instructions(compiled)
    shared = compiled.metadata.shared
    name = "{}x{}x{}w{}s{}".format(*tile)
    line = (f"{name:16s} res{int(residual)}: {usage['registers']} registers, {usage['spill_bytes']} B spilled, "
            f"{shared} B shared; PTX {found['tma_loads']} TMA loads, {found['tma_stores']} TMA stores, "
            f"{found['wgmma']} wgmma; SASS {found['utmaldg_sass']} UTMALDG, {found['hgmma_sass']} HGMMA")
    if not (found["tma_loads"] and found["tma_stores"] and found["wgmma"] and found["hgmma_sass"]):
        return line, f"not a TMA + wgmma kernel: {line}"
    if usage["spill_bytes"]:
        return line, f"spills registers: {line}"
    if shared > H100_SHARED_PER_BLOCK:
        return line, f"needs more shared memory than an H100 block has: {line}"
    estimate = _gemm_shared_bytes(_TileConfig(*tile[:3], GROUP_M, *tile[3:]), 2, residual)
    if shared > estimate:
        return line, f"needs more shared memory than _gemm_shared_bytes's {estimate} B: {line}"
    return line, None


def main():
    checks = [check_tile(tile, residual, relu)
              for shape_class, tiles in _GEMM_TILES.items() for tile in tiles
              for residual, relu in EPILOGUES[shape_class]]
    if "--report" in sys.argv:
        print(f"triton {triton.__version__}")
        print("\n".join(line for line, _ in checks))
    problems = [problem for _, problem in checks if problem]
    if problems:
        sys.exit("tiles that must leave kernels/experimental/conv_gemm.py's _GEMM_TILES:\n" + "\n".join(problems))
    print(f"compiled {len(checks)} 1x1 GEMM conv tiles for sm_90a: TMA + wgmma, no spills, shared memory within 227 KB")


if __name__ == "__main__":
    main()
