"""Inference conv + BatchNorm (+ residual) (+ ReLU) as one op, over three implementations.

    conv_bn_act(x, weight, scale, shift, stride, padding, residual=None, relu=True)
        = relu(conv2d(x, weight) * scale[c] + shift[c] + residual)

On a GPU the op runs whichever of these is fastest for the problem (measured
once per shape by fastresnet.ops.dispatch, cached on disk):

  "triton:<tile>" the fused implicit-GEMM kernel (kernels/conv.py) with one
                 tile, e.g. "triton:128x128x64w8s4": one kernel, one write.
                 groups == 1 only. Up to 5 tiles per shape class are timed
                 (kernels.conv._tile_candidates); "triton" alone names the
                 kernel with the one tile of the fixed rule (_tile_config),
                 which is what FASTRESNET_DISPATCH=triton forces.
  "cudnn_fused"  BN folded into the weight and a bias; cuDNN's fused
                 torch.cudnn_convolution_relu / cudnn_convolution_add_relu
                 (F.conv2d with a bias where there is no ReLU).
  "cudnn_affine" F.conv2d (channels_last) and then the fused scale/shift/add/ReLU
                 epilogue kernel of fastresnet.ops.bn_act (when present).
  "triton_gemm:<tile>" 1x1 stride-1 convs of channels_last fp16/bf16 input on
                 sm_90+ (kernels/conv_gemm.py): a persistent GEMM over x viewed
                 as [N*H*W, C] whose tiles move by TMA into wgmma, with the
                 same epilogue (residual included) fused; up to 4 tiles per
                 shape class (kernels.conv_gemm._gemm_tile_candidates).
  "cublaslt_fused" 1x1 stride-1 convs on channels_last input without a
                 residual, which are a plain GEMM over x viewed as [N*H*W, C]
                 (no copy): cuBLASLt's GEMM with the folded bias (+ ReLU) in its
                 epilogue (torch._addmm_activation / torch.addmm).

What the first call per shape costs: each Triton tile is compiled once per
(kernel size, stride, padding, epilogue) on a fresh machine (~1-2 s each;
Triton's disk cache keeps them) and every candidate runs 3 untimed and 10
timed calls (dispatch.time_ms), ~13 x 0.1-2 ms per candidate at ResNet-50's
batch 256: well under a second per shape once compiled. The winner is kept
on disk (dispatch's cache), so later processes time nothing.

The fixed rule (FASTRESNET_DISPATCH=fixed, see fixed_choice) uses cuDNN's
conv with a one-pass epilogue: never slower than eager PyTorch's conv + BN +
ReLU. On the CPU the op runs the eager
reference (exact), or the Triton kernel through the interpreter when
TRITON_INTERPRET=1 (tests).

Inference only: there is no backward, and a call that would need one raises.
Under autocast the op computes in autocast's dtype, like F.conv2d.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from fastresnet import backend
from fastresnet.ops import dispatch
from fastresnet.reference import conv_bn_act_reference



def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


class PreparedConvBN:
    """A conv's weight and its BN's scale/shift, in the forms each implementation wants.

    Built once per (weight values, dtype, device) and reused across calls (the
    fused inference blocks keep one per conv); each form is derived lazily, so
    an implementation that never runs costs nothing.
    """

    def __init__(self, weight, scale, shift, stride=1, padding=0, dilation=1, groups=1, dtype=None):
        if weight.dim() != 4:
            raise ValueError(f"conv_bn_act: weight must be [Cout, Cin/groups, KH, KW], got shape {tuple(weight.shape)}")
        out_c = weight.shape[0]
        for name, t in (("scale", scale), ("shift", shift)):
            if t.shape != (out_c,):
                raise ValueError(f"conv_bn_act: {name} must have shape ({out_c},), got {tuple(t.shape)}")
            if t.device != weight.device:
                raise ValueError(f"conv_bn_act: {name} is on {t.device}, weight on {weight.device}")
        self.dtype = dtype or weight.dtype
        self.raw_weight = weight.detach()
        self.scale = scale.detach().float().contiguous()
        self.shift = shift.detach().float().contiguous()
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups = int(groups)
        self.choices: dict[tuple, Callable] = {}  # the chosen implementation per call signature

    @property
    def out_channels(self) -> int:
        return self.raw_weight.shape[0]

    @functools.cached_property
    def weight(self) -> torch.Tensor:
        """The unfolded weight in the compute dtype, channels_last (F.conv2d)."""
        return self.raw_weight.to(self.dtype).contiguous(memory_format=torch.channels_last)

    @functools.cached_property
    def packed_weight(self) -> torch.Tensor:
        """[Cout, KH, KW, Cin] contiguous: the Triton kernel's B matrix, K ordered (kh, kw, cin)."""
        return self.raw_weight.to(self.dtype).permute(0, 2, 3, 1).contiguous()

    @functools.cached_property
    def folded_weight(self) -> torch.Tensor:
        """weight * scale per output channel (folded in fp32, then cast), channels_last (cuDNN)."""
        folded = self.raw_weight.float() * self.scale.view(-1, 1, 1, 1)
        return folded.to(self.dtype).contiguous(memory_format=torch.channels_last)

    @functools.cached_property
    def folded_matrix(self) -> torch.Tensor:
        """The folded weight of a 1x1 conv as [Cout, Cin] (a view): the GEMM's B^T for cuBLASLt."""
        return self.folded_weight.reshape(self.out_channels, -1)

    @functools.cached_property
    def bias(self) -> torch.Tensor:
        return self.shift.to(self.dtype)

    def output_shape(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        from fastresnet.kernels.conv import conv_bn_act_out_size

        _, _, kh, kw = self.raw_weight.shape
        out_h = conv_bn_act_out_size(x.shape[2], kh, self.stride[0], self.padding[0], self.dilation[0])
        out_w = conv_bn_act_out_size(x.shape[3], kw, self.stride[1], self.padding[1], self.dilation[1])
        return (x.shape[0], self.out_channels, out_h, out_w)


# ---------------------------------------------------------------------------
# The implementations
# ---------------------------------------------------------------------------


def _run_reference(x, p: PreparedConvBN, residual, relu):
    return conv_bn_act_reference(x, p.weight, p.scale, p.shift, p.stride, p.padding, residual, relu, p.dilation, p.groups)


def _triton_supports(x, p: PreparedConvBN, residual) -> bool:
    # The kernel indexes in int32; grouped convs and float64 go to cuDNN (or the reference).
    n, c, h, w = p.output_shape(x)
    supported_dtype = x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return supported_dtype and p.groups == 1 and x.numel() < 2**31 and n * c * h * w < 2**31


def _run_triton(x, p: PreparedConvBN, residual, relu, tile=None):
    from fastresnet.kernels.conv import _launch_conv_bn_act

    out = torch.empty(p.output_shape(x), device=x.device, dtype=x.dtype, memory_format=memory_format_of(x))
    interpreted = x.device.type == "cpu"
    return _launch_conv_bn_act(
        x, p.packed_weight, p.scale, p.shift, residual, out, p.stride, p.padding, p.dilation, relu, interpreted, tile
    )


def _run_cudnn_fused(x, p: PreparedConvBN, residual, relu):
    args = (p.stride, p.padding, p.dilation, p.groups)
    if relu and residual is None:
        return torch.cudnn_convolution_relu(x, p.folded_weight, p.bias, *args)
    if relu:
        return torch.cudnn_convolution_add_relu(x, p.folded_weight, residual, 1.0, p.bias, *args)
    y = F.conv2d(x, p.folded_weight, p.bias, *args)
    return y if residual is None else y.add_(residual)


@functools.lru_cache(maxsize=None)
def _affine_act():
    """fastresnet.ops.bn_act.affine_act (the BatchNorm issue's epilogue kernel), or None if absent."""
    try:
        from fastresnet.ops.bn_act import affine_act
    except ImportError:
        return None
    return affine_act


def _run_cudnn_affine(x, p: PreparedConvBN, residual, relu):
    y = F.conv2d(x, p.weight, None, p.stride, p.padding, p.dilation, p.groups)
    return _affine_act()(y, p.scale, p.shift, residual=residual, relu=relu)


def _pixel_rows(x) -> torch.Tensor | None:
    """x [N, C, H, W] as the matrix [N*H*W, C] without a copy, or None when its layout does not allow one."""
    rows = x.permute(0, 2, 3, 1)
    if not rows.is_contiguous():
        return None
    return rows.view(-1, x.shape[1])


def _cublaslt_supports(x, p: PreparedConvBN, residual) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped conv of a channels_last x, without a residual: a GEMM.

    With a residual cuBLASLt would need both C = residual and the bias
    epilogue, which torch does not expose as one call; the other
    implementations do that case in one kernel.
    """
    pointwise = p.raw_weight.shape[2:] == (1, 1) and p.stride == (1, 1) and p.padding == (0, 0)
    floating = x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return residual is None and pointwise and p.groups == 1 and floating and _pixel_rows(x) is not None


def _run_cublaslt_fused(x, p: PreparedConvBN, residual, relu):
    """out[m, co] = relu(sum_c x[m, c] * folded_w[co, c] + bias[co]), m = (n, h, w): one GEMM.

    On CUDA, torch.addmm with a 1-D bias and a contiguous result takes its
    cuBLASLt path with the bias in the GEMM's epilogue, and
    torch._addmm_activation (present in torch 2.x, the op inductor also emits
    for addmm + ReLU) the bias + ReLU epilogue; where that path does not apply
    (and on the CPU) they fall back to addmm and an in-place ReLU. The
    dispatch times whichever runs. The [N*H*W, Cout] result is returned as an
    NCHW-shaped channels_last view.
    """
    n, _, h, w = x.shape
    rows = _pixel_rows(x)
    if relu:
        y = torch._addmm_activation(p.bias, rows, p.folded_matrix.t())
    else:
        y = torch.addmm(p.bias, rows, p.folded_matrix.t())
    return y.view(n, h, w, p.out_channels).permute(0, 3, 1, 2)


def _is_pointwise(p: PreparedConvBN) -> bool:
    """1x1, stride 1, unpadded, ungrouped: on channels_last input a GEMM over the pixels."""
    return p.raw_weight.shape[2:] == (1, 1) and p.stride == (1, 1) and p.padding == (0, 0) and p.groups == 1


def _tma_matrix(t: torch.Tensor | None) -> bool:
    """t's [N*H*W, C] view exists, starts 16-byte aligned and has C a multiple of 16 (TMA's alignment)."""
    return t is not None and _pixel_rows(t) is not None and t.data_ptr() % 16 == 0 and t.shape[1] % 16 == 0


def _tma_ready(t: torch.Tensor | None) -> bool:
    """_tma_matrix on the hot path: absent, or channels_last-dense and 16-byte aligned, checked without
    building a view (~0.3 us, against ~2.5 us for the general test it falls back to)."""
    if t is None:
        return True
    _, c, h, w = t.shape
    if t.stride()[1:] == (1, w * c, c) and t.stride()[0] == h * w * c:
        return t.data_ptr() % 16 == 0 and c % 16 == 0
    return _tma_matrix(t)


def _gemm_supports(x, p: PreparedConvBN, residual) -> bool:
    """The TMA GEMM (kernels/conv_gemm.py) applies: a pointwise conv of a channels_last fp16/bf16 x with
    C and Cout multiples of 16, a residual (if any) laid out likewise, on a GPU with TMA (sm_90+).

    Under the interpreter (x on the CPU) fp32 runs too, and the GPU check is skipped: the tests.
    """
    if x.is_cuda:
        if x.dtype not in (torch.float16, torch.bfloat16) or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    fits_int32 = x.numel() < 2**31 and math.prod(p.output_shape(x)) < 2**31
    return (
        _is_pointwise(p) and p.out_channels % 16 == 0 and fits_int32 and _tma_matrix(x)
        and (residual is None or _tma_matrix(residual))
    )


def _run_triton_gemm(x, p: PreparedConvBN, residual, relu, tile=None):
    """relu(x_rows @ w^T * scale + shift + residual_rows) as one persistent TMA GEMM; a channels_last output.

    The dispatch chose this per (shape, strides) signature; a later call of that signature whose x or
    residual is no TMA matrix (a residual in another layout, a view that starts off 16-byte alignment)
    runs the implicit-GEMM kernel with the fixed rule's tile instead: the TMA descriptor would refuse the
    pointer, and a residual without a [M, Cout] view would be dropped."""
    from fastresnet.kernels.conv_gemm import _launch_conv1x1_gemm

    if not (_tma_ready(x) and _tma_ready(residual)):
        return _run_triton(x, p, residual, relu)
    out = torch.empty(p.output_shape(x), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    weight_rows = p.packed_weight.view(p.out_channels, -1)  # [Cout, 1, 1, C] contiguous -> [Cout, C]
    residual_rows = None if residual is None else _pixel_rows(residual)
    _launch_conv1x1_gemm(_pixel_rows(x), weight_rows, p.scale, p.shift, residual_rows, _pixel_rows(out), relu, tile)
    return out


IMPLEMENTATIONS = {
    "triton": _run_triton,
    "cudnn_fused": _run_cudnn_fused,
    "cudnn_affine": _run_cudnn_affine,
    "cublaslt_fused": _run_cublaslt_fused,
}
TRITON_TILE_PREFIX = "triton:"
TRITON_GEMM_PREFIX = "triton_gemm:"


def implementation(name: str):
    """The function(x, prepared, residual, relu) that a candidate name stands for ("triton:<tile>" included)."""
    if name in IMPLEMENTATIONS:
        return IMPLEMENTATIONS[name]
    if name.startswith(TRITON_TILE_PREFIX):
        from fastresnet.kernels.conv import _TileConfig

        return functools.partial(_run_triton, tile=_TileConfig.from_name(name.removeprefix(TRITON_TILE_PREFIX)))
    if name.startswith(TRITON_GEMM_PREFIX):
        from fastresnet.kernels.conv_gemm import GROUP_M
        from fastresnet.kernels.conv import _TileConfig

        tile = _TileConfig.from_name(name.removeprefix(TRITON_GEMM_PREFIX), group_m=GROUP_M)
        return functools.partial(_run_triton_gemm, tile=tile)
    raise KeyError(
        f"conv_bn_act has no implementation {name!r}; it has {sorted(IMPLEMENTATIONS)}, triton:<tile> "
        "and triton_gemm:<tile>"
    )


def _triton_tile_names(x, p: PreparedConvBN, residual) -> list[str]:
    """"triton:<tile>" for each tile worth timing on x's GPU (kernels.conv._tile_candidates)."""
    from fastresnet.kernels.conv import _tile_candidates, _uses_flat_k

    m = math.prod(p.output_shape(x)) // p.out_channels
    in_c = x.shape[1]
    flat_k, has_residual = _uses_flat_k(in_c), residual is not None
    tiles = _tile_candidates(m, p.out_channels, in_c, flat_k, has_residual, x.element_size(), x.device)
    if not dispatch.tile_search():  # the fixed-rule tile comes first
        tiles = tiles[:1]
    return [TRITON_TILE_PREFIX + tile.name for tile in tiles]


def _triton_gemm_names(x, p: PreparedConvBN, residual) -> list[str]:
    """"triton_gemm:<tile>" for each tile of the TMA GEMM worth timing on x's GPU (at most 4)."""
    from fastresnet.kernels.conv_gemm import _gemm_tile_candidates

    tiles = _gemm_tile_candidates(p.out_channels, x.shape[1], residual is not None, x.element_size(), x.device)
    if not dispatch.tile_search():
        tiles = tiles[:1]
    return [TRITON_GEMM_PREFIX + tile.name for tile in tiles]


def _candidates(x, p: PreparedConvBN, residual) -> list[str]:
    """The implementations that can run this problem; on a GPU, one Triton candidate per tile."""
    names = ["cudnn_fused"]
    if _triton_supports(x, p, residual) and backend.triton_available():
        names += _triton_tile_names(x, p, residual) if x.is_cuda else ["triton"]
        if x.is_cuda and _gemm_supports(x, p, residual):
            names += _triton_gemm_names(x, p, residual)
    if _affine_act() is not None:
        names.append("cudnn_affine")
    if _cublaslt_supports(x, p, residual):
        names.append("cublaslt_fused")
    return names


def fixed_choice(names: list[str], residual, relu: bool) -> str:
    """The rule without measurement: never slower than eager conv + BN + ReLU, and always runnable.

    A conv without epilogue beyond the BN is cuDNN's conv with the folded bias
    (one call). Otherwise cuDNN's conv and the one-pass epilogue kernel, which
    replaces eager's two or three passes; cuDNN's own fused conv-bias-ReLU is
    not trusted blindly (it refuses some dtype/layout combinations).
    """
    if residual is None and not relu:
        return "cudnn_fused"
    return "cudnn_affine" if "cudnn_affine" in names else "cudnn_fused"


def problem_key(x, p: PreparedConvBN, residual, relu) -> str:
    n, c, h, w = x.shape
    _, _, kh, kw = p.raw_weight.shape
    layout = "cl" if memory_format_of(x) == torch.channels_last else "nchw"
    return (
        f"conv_bn_act:n{n}c{c}h{h}w{w}:k{p.out_channels}x{kh}x{kw}:s{p.stride[0]}x{p.stride[1]}"
        f":p{p.padding[0]}x{p.padding[1]}:d{p.dilation[0]}x{p.dilation[1]}:g{p.groups}"
        f":{str(x.dtype).removeprefix('torch.')}:{layout}:res{int(residual is not None)}:relu{int(relu)}"
    )


def memory_format_of(x) -> torch.memory_format:
    """channels_last where x is laid out so (and not also NCHW-contiguous), else contiguous: the outputs' layout."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def tensor_key(t: torch.Tensor | None):
    """What identifies a tensor's current values without reading them: identity, storage, version, dtype, device.

    The version counter is bumped by every in-place write (optimizer steps,
    load_state_dict, copy_); tensors made under torch.inference_mode have none,
    and for them only identity, pointer, dtype and device are compared.
    """
    if t is None:
        return None
    try:
        version = t._version
    except RuntimeError:  # an inference tensor has no version counter
        version = None
    return (id(t), t.data_ptr(), version, t.dtype, t.device)


# ---------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------


def _check_inputs(x, p: PreparedConvBN, residual):
    if x.dim() != 4:
        raise ValueError(f"conv_bn_act: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != p.raw_weight.shape[1] * p.groups:
        raise ValueError(
            f"conv_bn_act: x has {x.shape[1]} channels, weight {tuple(p.raw_weight.shape)} with groups={p.groups} "
            f"expects {p.raw_weight.shape[1] * p.groups}"
        )
    if x.device != p.raw_weight.device:
        raise ValueError(f"conv_bn_act: x is on {x.device}, weight on {p.raw_weight.device}")
    if x.dtype != p.dtype:
        raise ValueError(f"conv_bn_act: x is {x.dtype}, the prepared weight {p.dtype}")
    if residual is not None and tuple(residual.shape) != p.output_shape(x):
        raise ValueError(f"conv_bn_act: residual has shape {tuple(residual.shape)}, output is {p.output_shape(x)}")
    if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
        raise RuntimeError(
            "conv_bn_act is inference-only (no backward): call it under torch.no_grad() or "
            "torch.inference_mode(), or detach the inputs"
        )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, or autocast's when autocast is on for x's device (as F.conv2d would compute)."""
    if x.dtype.is_floating_point and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def conv_bn_act_prepared(x, prepared: PreparedConvBN, residual=None, relu=True) -> torch.Tensor:
    """conv_bn_act with the weight already prepared (what the inference blocks call)."""
    x = x.to(prepared.dtype)
    if residual is not None:
        residual = residual.to(prepared.dtype)
    _check_inputs(x, prepared, residual)
    if not backend.use_triton(x):
        return _run_reference(x, prepared, residual, relu)
    if x.device.type == "cpu":  # Triton's interpreter (tests): the kernel where it applies
        run = _run_triton if _triton_supports(x, prepared, residual) else _run_reference
        return run(x, prepared, residual, relu)
    # The chosen function per call signature is kept on the prepared weight: no key string or dict on the hot path.
    # The residual's strides too: which candidates apply (the TMA GEMM's) depends on its layout.
    signature = (dispatch.dispatch_mode(), x.shape, x.stride(), None if residual is None else residual.stride(), relu)
    run = prepared.choices.get(signature)
    if run is None:
        run = implementation(_choose(x, prepared, residual, relu, signature[0]))
        prepared.choices[signature] = run
    return run(x, prepared, residual, relu)


def _choose(x, p: PreparedConvBN, residual, relu, mode: str) -> str:
    names = _candidates(x, p, residual)
    if mode == "triton" and any(name.startswith(TRITON_TILE_PREFIX) for name in names):
        return "triton"  # forced: the kernel with the fixed rule's tile
    candidates = {name: functools.partial(implementation(name), x, p, residual, relu) for name in names}
    expected = functools.cache(functools.partial(_run_reference, x, p, residual, relu))
    for name in candidates:
        if name.startswith(UNVERIFIED_ON_GPU):
            candidates[name] = _checked_on_first_call(name, candidates[name], expected)
    return dispatch.choose(problem_key(x, p, residual, relu), candidates, fixed_choice(names, residual, relu), x.device)


# Candidates that entered the dispatch before running on a GPU (the per-tile Triton kernels,
# the TMA GEMM, cuBLASLt's epilogue path); cuDNN's two are the known-good baseline.
UNVERIFIED_ON_GPU = (TRITON_TILE_PREFIX, TRITON_GEMM_PREFIX, "cublaslt_fused")


def _checked_on_first_call(name: str, run: Callable, expected: Callable) -> Callable:
    """run, whose first call also compares its output with the reference conv's (dispatch.checked_on_first_call):
    a candidate of UNVERIFIED_ON_GPU that computes wrong is left out of the measurement."""
    return dispatch.checked_on_first_call("conv_bn_act", name, run, expected)


def conv_bn_act(
    x, weight, scale, shift, stride=1, padding=0, residual=None, relu=True, dilation=1, groups=1
) -> torch.Tensor:
    """relu(conv2d(x, weight, stride, padding, dilation, groups) * scale[c] + shift[c] + residual).

    Inference only. x is best channels_last; the output has x's memory format
    and dtype (autocast's dtype under autocast). For repeated calls with the
    same weights, build a PreparedConvBN once and call conv_bn_act_prepared.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (weight, scale, shift)):
        raise RuntimeError(
            "conv_bn_act is inference-only (no backward): weight/scale/shift require grad; call it under "
            "torch.no_grad() or torch.inference_mode(), or pass detached tensors"
        )
    prepared = PreparedConvBN(weight, scale, shift, stride, padding, dilation, groups, dtype=compute_dtype(x))
    return conv_bn_act_prepared(x, prepared, residual, relu)
