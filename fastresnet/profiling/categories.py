"""Which category a kernel or an op belongs to: a few small tables of name patterns.

A GPU kernel is classified by, in this order:
  1. where it was launched (the host stack at its launch): inside the profile's data-wait
     annotation -> data loading; inside `Optimizer.step` -> optimizer; inside one of
     fastresnet's custom ops or autograd Functions -> that op's own row, whatever kernel
     the dispatch picked there (Triton, cuDNN or the reference);
  2. its own name, where the name says what it does: fastresnet's Triton kernels
     (PROJECT_KERNELS), cuDNN's fprop/dgrad/wgrad, BatchNorm, copies (KERNEL_PATTERNS),
     inductor's generated kernels (`triton_poi_fused_...`, by the aten ops in the name);
  3. the aten op that launched it (OP_PATTERNS): a cuBLAS GEMM launched by
     aten::convolution is a conv, launched by aten::addmm it is the fc layer;
  4. names that say only how, not what (GEMMs, generic elementwise: GENERIC_KERNEL_PATTERNS);
  5. else "other", listed by name in the report so that the tables can be extended.
On a CPU there are no kernels: each slice of the main thread's time goes by 1 and 3.

The patterns follow the names cuDNN 8/9, cuBLAS(Lt), CUTLASS, PyTorch's native CUDA kernels,
inductor and kernels/ emit; tests/profile_kernel_names.tsv lists examples (so far from public
traces and source code, not yet from a GPU trace of this project). `kernels.tsv`, written beside
each profile, lists a run's names with the category they got, in that file's format.
"""

from __future__ import annotations

import re

CONV_FORWARD = "conv forward"
CONV_DGRAD = "conv dgrad"
CONV_WGRAD = "conv wgrad"
CONV_BACKWARD = "conv backward (dgrad + wgrad)"  # one op on a CPU, or a kernel whose name does not say which
MATMUL = "matmul (fc)"
BN_ACT = "BN / ReLU / add"
POOL_LOSS = "pool, softmax, loss"
OPTIMIZER = "optimizer"
COPIES = "copies, casts, fills"
OTHER = "other"
HOST_GAP = "host idle between kernels"  # on a CPU: the main thread in no op, in views or autograd's bookkeeping
DATA = "data loading"
FUSED_PREFIX = "fastresnet::"

# The rows in the order the report lists them; fastresnet's fused ops come after BN_ACT.
ORDER = (CONV_FORWARD, CONV_DGRAD, CONV_WGRAD, CONV_BACKWARD, MATMUL, BN_ACT, POOL_LOSS, OPTIMIZER, COPIES,
         OTHER, HOST_GAP, DATA)

# The annotation the profile puts around `next(batches)`.
DATA_ANNOTATION = "fastresnet.profile: data wait"

# fastresnet's torch.autograd.Function classes: the profiler records their forward under the class
# name and their backward as `<name>Backward` (rows `fastresnet::<name>`, `fastresnet::<name>Backward`,
# beside the custom ops' `fastresnet::conv_stats`, `fastresnet::conv_stats_backward`).
PROJECT_FUNCTIONS = ("_AllReduceSum",)

# fastresnet's Triton kernels (the @triton.jit functions that kernels/ and kernels/experimental/ launch) and the op row
# they count under when no op is on the host stack at their launch (replayed in a CUDA graph).
PROJECT_KERNELS = {
    "_conv_stats_fwd": "fastresnet::conv_stats",
    "_conv_wgrad": "fastresnet::conv_stats_backward",
    "_conv_dgrad_bn": "fastresnet::conv_stats_backward",
    "_conv_bn_act_fwd": "fastresnet::conv_bn_act",
    "_conv1x1_gemm_bn_act": "fastresnet::conv_bn_act",
    "_affine_act_fwd": "fastresnet::bn_act",
    "_bn_eval_act_fwd": "fastresnet::bn_act",
    "_bn_train_fwd_single": "fastresnet::bn_act",
    "_bn_stats_partial": "fastresnet::bn_act",
    "_bn_stats_finalize": "fastresnet::bn_act",
    "_bn_stats_merge": "fastresnet::bn_act",
    "_affine_act_bwd_reduce": "fastresnet::bn_act",
    "_affine_act_bwd_reduce_pipelined": "fastresnet::bn_act",
    "_affine_act_bwd_dx": "fastresnet::bn_act",
}

# Kernel names that say what the kernel computes. First match wins: dgrad and wgrad before
# fprop (cuDNN's winograd kernels are named winogradWgrad..., winogradForward...).
KERNEL_PATTERNS = tuple((category, re.compile(pattern, re.IGNORECASE)) for category, pattern in (
    (OPTIMIZER, r"FusedSgdMathFunctor|fused_sgd|FusedAdam|FusedAdamW"),
    (CONV_DGRAD, r"dgrad"),
    (CONV_WGRAD, r"wgrad"),
    (CONV_FORWARD, r"fprop|convolve_sgemm|conv2d_grouped_direct|winograd|fft2d_r2c|"
                   r"conv\w*_fwd|fusedConvolution"),
    (COPIES, r"^Memcpy|^Memset|nchwToNhwc|nhwcToNchw|direct_copy_kernel|CatArrayBatchedCopy|"
             r"\bcopy_kernel|FillFunctor|fill_kernel"),
    (BN_ACT, r"batch_?norm|\bbn_(fw|bw|fwd|bwd)|cudnn::bn_|batchnorm_(fw|bw)"),
    (POOL_LOSS, r"max_pool|avg_pool|adaptive_avg|softmax|nll_loss|cross_entropy"),
))

# Names that say only how (a GEMM, an elementwise loop, a reduction): used after the
# launching op had its say (cuDNN runs 1x1 convs as GEMMs; aten runs ReLU and add as
# vectorized_elementwise_kernel).
GENERIC_KERNEL_PATTERNS = tuple((category, re.compile(pattern, re.IGNORECASE)) for category, pattern in (
    (MATMUL, r"gemm|nvjet|gemv|cutlass.*(gemm|Kernel2)|splitKreduce"),
    (OPTIMIZER, r"multi_tensor_apply_kernel"),
))

# aten ops (their `cpu_op` names) and autograd's nodes (`ConvolutionBackward0`, recorded again
# under `autograd::engine::evaluate_function: `): what a CPU slice is, and what launched a kernel.
OP_PATTERNS = tuple((category, re.compile(pattern)) for category, pattern in (
    (CONV_BACKWARD, r"^aten::(convolution_backward\w*|\w*conv\w*_backward\w*)$|"
                    r"^(Cudnn|Mkldnn|Miopen)?ConvolutionBackward\d*$"),
    (CONV_FORWARD, r"^aten::(conv\dd|_?convolution|cudnn_convolution\w*|mkldnn_convolution|"
                   r"slow_conv\w*|thnn_conv\w*|_nnpack_spatial_convolution|miopen_convolution)$"),
    (MATMUL, r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_addmm_activation)$|^(Addmm|Mm|Bmm|T)Backward\d*$"),
    (OPTIMIZER, r"^aten::(_fused_sgd_?|_foreach_\w+|_fused_adamw?_?)$"),
    (BN_ACT, r"^aten::(\w*batch_norm\w*|relu_?|clamp_min_?|threshold_backward|add_?|add_relu_?)$|"
             r"^(Native|Cudnn|Miopen)?BatchNorm\w*Backward\d*$|^(Relu|Threshold|Add|AddRelu)Backward\d*$"),
    (POOL_LOSS, r"^aten::(\w*pool\w*|mean|_?log_softmax\w*|_?softmax\w*|nll_loss\w*|cross_entropy_loss)$|"
                r"^(\w*Pool\w*|Mean|LogSoftmax|Softmax|NllLoss)Backward\d*$"),
    (COPIES, r"^aten::(copy_|_to_copy|clone|contiguous|fill_|zero_|zeros|zeros_like|ones|cat|"
             r"constant_pad_nd|pad|slice_backward|_copy_from\w*)$|^(ToCopy|Clone|ConstantPadNd|Slice)Backward\d*$"),
    # Host work that launches no kernel: views, allocation, autograd's gradient bookkeeping.
    (HOST_GAP, r"^aten::(empty\w*|view\w*|_unsafe_view|as_strided\w*|detach_?|t|transpose|expand\w*|slice|select|"
               r"narrow|squeeze\w*|unsqueeze\w*|reshape|_reshape_alias|flatten|permute|resize_|resolve_conj|"
               r"resolve_neg|alias|lift_fresh)$|^detach_?$|AccumulateGrad$|^(View|AsStrided|Unsafe\w*|"
               r"Expand|Reshape\w*|Permute|Transpose|Squeeze|Unsqueeze)\w*Backward\d*$"),
))
AUTOGRAD_PREFIX = "autograd::engine::evaluate_function: "

# inductor's generated kernels: triton_{poi,red,per,tem,for}_fused_<the aten ops it fused>_<n>.
INDUCTOR_KERNEL = re.compile(r"^triton_(poi|red|per|tem|for|mm)_fused_?(.*?)(_\d+)?$")
INDUCTOR_RULES = tuple((category, re.compile(pattern)) for category, pattern in (
    (BN_ACT, r"batch_norm|relu|threshold_backward|(^|_)add(_|$)"),
    (POOL_LOSS, r"pool|(^|_)mean(_|$)|softmax|nll_loss"),
    (COPIES, r"to_copy|clone|(^|_)copy(_|$)|(^|_)cat(_|$)|fill|zeros|(^|_)full(_|$)"),
))


def _first_match(patterns, name: str) -> str | None:
    for category, pattern in patterns:
        if pattern.search(name):
            return category
    return None


def context_category(name: str) -> str | None:
    """A host event that decides the category of everything under it, or None."""
    if name == DATA_ANNOTATION:
        return DATA
    if name.startswith(("Optimizer.step#", "Optimizer.zero_grad#")):
        return OPTIMIZER
    if name.startswith(FUSED_PREFIX):
        return name
    if name.removesuffix("Backward") in PROJECT_FUNCTIONS:
        return FUSED_PREFIX + name
    return None


def inductor_category(name: str) -> str | None:
    match = INDUCTOR_KERNEL.match(name)
    if match is None:
        return None
    kind, ops = match.group(1), match.group(2)
    if kind in ("tem", "mm"):  # a template: a matmul or a conv, with its epilogue fused
        return CONV_FORWARD if "convolution" in ops else MATMUL
    if kind == "for":  # a horizontally fused foreach kernel: a compiled optimizer step
        return OPTIMIZER
    return _first_match(INDUCTOR_RULES, ops) or OTHER


def kernel_category(name: str) -> str | None:
    """The category a GPU kernel's own name gives (step 2 of the module docstring), or None."""
    bare = _base_name(name)
    if bare in PROJECT_KERNELS:
        return PROJECT_KERNELS[bare]
    return inductor_category(bare) or _first_match(KERNEL_PATTERNS, name)


def generic_kernel_category(name: str) -> str | None:
    return _first_match(GENERIC_KERNEL_PATTERNS, name)


def op_category(name: str) -> str | None:
    return _first_match(OP_PATTERNS, name.removeprefix(AUTOGRAD_PREFIX))


def _base_name(name: str) -> str:
    """`void ns::kernel<T>(args)` -> `kernel`; a Triton kernel's name is already bare."""
    head = name.replace("(anonymous namespace)::", "").split("(", 1)[0].split("<", 1)[0].strip()
    return head.rsplit(" ", 1)[-1].rsplit("::", 1)[-1]


def classify(kernel: str | None, stack: list[str]) -> tuple[str, list[str]]:
    """The category of a kernel (None on a CPU) launched with `stack` on the host (outermost
    first), and the part of the stack that decided it: classify(kernel, that) gives the same."""
    for name in stack:
        category = context_category(name)
        if category is not None:
            return category, [name]
    if kernel is not None:
        category = kernel_category(kernel)
        if category is not None:
            return category, []
    for name in reversed(stack):  # the innermost op that says what it is
        category = op_category(name)
        if category is not None:
            return category, [name]
    if kernel is not None:
        category = generic_kernel_category(kernel)
        if category is not None:
            return category, []
    return OTHER, []


def is_fused(category: str) -> bool:
    return category.startswith(FUSED_PREFIX)


def row_order(categories) -> list[str]:
    """ORDER, with fastresnet's fused-op rows (sorted by name) after BN_ACT."""
    fused = sorted(c for c in categories if is_fused(c))
    order = []
    for category in ORDER:
        order.append(category)
        if category == BN_ACT:
            order.extend(fused)
    return [c for c in order if c in categories]
