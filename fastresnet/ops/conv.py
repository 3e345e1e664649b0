"""Inference conv + BatchNorm (+ residual) (+ ReLU) as one op, over three implementations.

    conv_bn_act(x, weight, scale, shift, stride, padding, residual=None, relu=True)
        = relu(conv2d(x, weight) * scale[c] + shift[c] + residual)

On a GPU the op runs whichever of these is fastest for the problem (measured
once per shape by fastresnet.ops.dispatch, cached on disk):

  "triton"       the fused implicit-GEMM kernel (kernels/conv.py): one kernel,
                 one write. groups == 1 only.
  "cudnn_fused"  BN folded into the weight and a bias; cuDNN's fused
                 torch.cudnn_convolution_relu / cudnn_convolution_add_relu
                 (F.conv2d with a bias where there is no ReLU).
  "cudnn_affine" F.conv2d (channels_last) and then the fused scale/shift/add/ReLU
                 epilogue kernel of fastresnet.ops.bn_act (when present).

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
        self.choices: dict[tuple, str] = {}  # dispatch decisions per call signature (see conv_bn_act_prepared)

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


def _run_triton(x, p: PreparedConvBN, residual, relu):
    from fastresnet.kernels.conv import _launch_conv_bn_act

    out = torch.empty(p.output_shape(x), device=x.device, dtype=x.dtype, memory_format=_memory_format(x))
    interpreted = x.device.type == "cpu"
    return _launch_conv_bn_act(
        x, p.packed_weight, p.scale, p.shift, residual, out, p.stride, p.padding, p.dilation, relu, interpreted
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


IMPLEMENTATIONS = {"triton": _run_triton, "cudnn_fused": _run_cudnn_fused, "cudnn_affine": _run_cudnn_affine}


def _candidates(x, p: PreparedConvBN, residual) -> list[str]:
    names = ["cudnn_fused"]
    if _triton_supports(x, p, residual) and backend.triton_available():
        names.append("triton")
    if _affine_act() is not None:
        names.append("cudnn_affine")
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
    layout = "cl" if _memory_format(x) == torch.channels_last else "nchw"
    return (
        f"conv_bn_act:n{n}c{c}h{h}w{w}:k{p.out_channels}x{kh}x{kw}:s{p.stride[0]}x{p.stride[1]}"
        f":p{p.padding[0]}x{p.padding[1]}:d{p.dilation[0]}x{p.dilation[1]}:g{p.groups}"
        f":{str(x.dtype).removeprefix('torch.')}:{layout}:res{int(residual is not None)}:relu{int(relu)}"
    )


def _memory_format(x) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


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
    # The choice per call signature is kept on the prepared weight: no key string or dict on the hot path.
    signature = (dispatch.dispatch_mode(), x.shape, x.stride(), residual is None, relu)
    choice = prepared.choices.get(signature)
    if choice is None:
        names = _candidates(x, prepared, residual)
        candidates = {name: functools.partial(IMPLEMENTATIONS[name], x, prepared, residual, relu) for name in names}
        fixed = fixed_choice(names, residual, relu)
        choice = dispatch.choose(problem_key(x, prepared, residual, relu), candidates, fixed, x.device)
        prepared.choices[signature] = choice
    return IMPLEMENTATIONS[choice](x, prepared, residual, relu)


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
