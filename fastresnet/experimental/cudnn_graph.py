"""cuDNN's own conv-BN training fusion, through its graph API, as a fused-block path ("cudnn_graph").

cuDNN exposes the fusion that fastresnet's Triton training path implements
(statistics in the conv epilogue, normalise-on-load in the next conv) as one
operation graph, the pattern MLPerf's ResNet-50 runs on:

    a   = relu(x * scale + bias)        # the previous BatchNorm + ReLU, on load (optional)
    y   = conv(a, w)                    # written, raw
    sum = sum of y over (N, H, W)       # "genstats", fp32, per output channel
    sq  = sum of y^2 over (N, H, W)

with scale = weight * invstd and bias = bias - mean * scale of the previous
BatchNorm. It ships in the optional `nvidia-cudnn-frontend` package
(`pip install fastresnet[cudnn]`); without the package, or off CUDA, this
module imports cleanly and offers nothing.

conv_stats_graph() has conv_stats' meaning and arguments exactly (fastresnet.ops.conv_stats):
it returns (y, mean, invstd, unbiased var) of the raw output, and its
backward is conv_stats' (cuDNN dgrad and wgrad via aten.convolution_backward,
then the Triton BatchNorm + ReLU backward). So a fused block can run every
conv through cuDNN's graph, end with bn_act_stats, and the tuned choice of
fastresnet.nn.blocks times it ("cudnn_graph") against the Triton kernels it
is the baseline for.

Graphs are built once per (shapes, dtype, stride, padding, prologue, device)
and cached in this process. Building tries a few precisions (scale/bias and
intermediates in fp32 first) and keeps the first that cuDNN's heuristics can
serve; a graph no engine serves is remembered as unsupported, and the op then
runs the equivalent unfused path (cuDNN conv + a Triton statistics pass, the
"mixed" path's op), so a call never fails for want of an engine.

Statistics: sum and sum of squares, and how that is guarded.
  cuDNN's genstats gives sum and sum-of-squares; the variance is then
  E[y^2] - E[y]^2, which cancels catastrophically when |mean| >> std
  (fp32 keeps ~7 digits: at mean/std = 1e3 the variance keeps about one).
  fastresnet's own statistics are numerically safe (per-block
  Welford partials merged with Chan's formula); this candidate trades that
  for cuDNN's fused kernel. Why it is acceptable here, and the guards:
  - Where it runs, conv inputs are BatchNorm'd ReLU outputs (or the block
    input, itself a ReLU of a BatchNorm + residual), so a conv output's
    |mean| / std is O(1): the relative error of E[y^2] - E[y]^2 is about
    fp32 epsilon * (1 + mean^2 / var), ~1e-6 there.
  - The finalisation (mean, var, invstd) runs in fp64 from the fp32 sums and
    clamps var at 0, so it adds no cancellation of its own.
  - On the experimental shelf, the path takes part only with
    FASTRESNET_EXPERIMENTAL=1, and then each conv's first call of a shape is
    compared with conv_stats' own (fastresnet.experimental.checked):
    statistics that cancel, or a graph that computes anything else, raise,
    which leaves the path out of the block's measurement.
  What is not guarded: data whose mean drifts far from zero relative to its
  spread *after* the first call (a per-call check would need a host sync).
  Pin another path (FASTRESNET_DISPATCH=fused_block=mixed) for such models.

Written against nvidia-cudnn-frontend 1.32's Python API and cuDNN 9.19/9.24:
cuDNN's heuristics, queried deviceless for sm_90, propose plans for the fp16
graph; bf16 and fp32 depend on the runtime-compiled engine, which only a GPU
can answer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from fastresnet.experimental.common import checked
from fastresnet.nn import blocks
from fastresnet.ops import tuning
from fastresnet.ops.conv_stats import conv_stats, conv_stats_grads, conv_stats_setup, validate
from fastresnet.ops.layout import conv_output_shape, empty_conv_output, pair, with_strides_of

log = logging.getLogger("fastresnet.cudnn_graph")

PACKAGE = "nvidia-cudnn-frontend"
# ---------------------------------------------------------------------------
# The optional package
# ---------------------------------------------------------------------------

_cudnn_module: Any = None
_import_error: Optional[str] = None


def _cudnn():
    """The `cudnn` module of nvidia-cudnn-frontend, or None (the reason kept in _import_error)."""
    global _cudnn_module, _import_error
    if _cudnn_module is None and _import_error is None:
        try:  # torch is imported first: it loads the libcudnn the frontend then finds
            import cudnn

            _cudnn_module = cudnn
        except Exception as err:  # ImportError, or a frontend that cannot find libcudnn
            _import_error = f"{type(err).__name__}: {err}"
    return _cudnn_module


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why cuDNN graphs cannot run on `device`, or None when they can be tried."""
    if device.type != "cuda":
        return f"cuDNN graphs need a CUDA device, not {device.type}"
    if _cudnn() is None:
        return f"{PACKAGE} is not importable ({_import_error}); pip install 'fastresnet[cudnn]'"
    return None


# ---------------------------------------------------------------------------
# Shapes and keys (pure Python)
# ---------------------------------------------------------------------------


def channels_last_strides(shape: Sequence[int]) -> list[int]:
    """Element strides of an NCHW-shaped tensor stored NHWC (what cuDNN's fused engines need)."""
    n, c, h, w = shape
    return [h * w * c, 1, w * c, c]


@dataclass(frozen=True)
class GraphKey:
    """Everything a built graph depends on. Tensors are always passed NHWC, so no strides."""

    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    dtype: torch.dtype
    stride: tuple[int, int]
    padding: tuple[int, int]
    prologue: bool  # relu(x * scale + bias) applied to the input
    device_index: int

    @property
    def y_shape(self) -> list[int]:
        return list(conv_output_shape(self.x_shape, self.w_shape, self.stride, self.padding))


def graph_key(x_shape, w_shape, dtype, stride, padding, prologue: bool, device_index: int = 0) -> GraphKey:
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise ValueError(f"cudnn_graph: x and weight must be 4-D, got {tuple(x_shape)} and {tuple(w_shape)}")
    if x_shape[1] != w_shape[1]:
        raise ValueError(f"cudnn_graph: x has {x_shape[1]} channels, weight {tuple(w_shape)} expects {w_shape[1]}")
    return GraphKey(tuple(map(int, x_shape)), tuple(map(int, w_shape)), dtype, (int(stride[0]), int(stride[1])),
                    (int(padding[0]), int(padding[1])), bool(prologue), int(device_index))


def precision_variants(dtype: torch.dtype, prologue: bool) -> list[tuple[torch.dtype, torch.dtype]]:
    """(scale/bias dtype, intermediate dtype) to try, most accurate first, without repeats.

    fp32 everywhere is what the statistics want; cuDNN's precompiled fused
    engine takes fp16 scale/bias and fp16 intermediates (the frontend's own
    samples), so the io dtype comes next. Without a prologue there is no
    scale/bias, and only the intermediate precision varies."""
    options = [(torch.float32, torch.float32), (dtype, torch.float32), (dtype, dtype)]
    if not prologue:
        options = [(dtype, inter) for _, inter in options]
    return list(dict.fromkeys(options))


def stats_from_sums(sums: Tensor, sq_sums: Tensor, count: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, invstd, unbiased var), fp32 per channel, from per-channel sum and sum of squares of
    `count` values. Finalised in fp64, variance clamped at 0: the finalisation adds no cancellation
    to what the fp32 sums already carry (see the module docstring)."""
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count} values per channel")
    mean = sums.reshape(-1).double() / count
    var = (sq_sums.reshape(-1).double() / count - mean * mean).clamp_min(0.0)
    invstd = torch.rsqrt(var + eps)
    return mean.float(), invstd.float(), (var * (count / (count - 1))).float()


# ---------------------------------------------------------------------------
# Building graphs (needs the package; a GPU except for deviceless planning)
# ---------------------------------------------------------------------------

_TORCH_TO_CUDNN = {torch.float32: "FLOAT", torch.float16: "HALF", torch.bfloat16: "BFLOAT16"}


def _cudnn_type(dtype: torch.dtype):
    if dtype not in _TORCH_TO_CUDNN:
        raise TypeError(f"cudnn_graph: unsupported dtype {dtype}; expected one of {list(_TORCH_TO_CUDNN)}")
    return getattr(_cudnn().data_type, _TORCH_TO_CUDNN[dtype])


@dataclass
class _Graph:
    """A planned cuDNN graph and the handles of its tensors (None: no prologue)."""

    graph: Any
    x: Any
    w: Any
    scale: Any
    bias: Any
    y: Any
    sums: Any
    sq_sums: Any
    scale_dtype: torch.dtype
    workspace_bytes: int = 0


def describe_graph(key: GraphKey, scale_dtype: torch.dtype, inter_dtype: torch.dtype, **graph_kwargs) -> _Graph:
    """The operation graph of `key` with tensors declared, not yet planned. graph_kwargs go to
    cudnn.pygraph (handle=, or device_property= to plan without a GPU)."""
    cudnn = _cudnn()
    c = key.x_shape[1]
    g = cudnn.pygraph(
        io_data_type=_cudnn_type(key.dtype), intermediate_data_type=_cudnn_type(inter_dtype),
        compute_data_type=cudnn.data_type.FLOAT, **graph_kwargs,
    )
    io_type = _cudnn_type(key.dtype)
    x = g.tensor(name="x", dim=list(key.x_shape), stride=channels_last_strides(key.x_shape), data_type=io_type)
    w = g.tensor(name="w", dim=list(key.w_shape), stride=channels_last_strides(key.w_shape), data_type=io_type)
    scale = bias = None
    conv_input = x
    if key.prologue:  # per-channel [1, C, 1, 1] operands broadcast over N, H, W
        scale = g.tensor(name="scale", dim=[1, c, 1, 1], stride=[c, 1, c, c], data_type=_cudnn_type(scale_dtype))
        bias = g.tensor(name="bias", dim=[1, c, 1, 1], stride=[c, 1, c, c], data_type=_cudnn_type(scale_dtype))
        scaled = g.scale(name="bn_scale", input=x, scale=scale)
        shifted = g.bias(name="bn_bias", input=scaled, bias=bias)
        conv_input = g.relu(name="bn_relu", input=shifted)
    y = g.conv_fprop(name="conv", image=conv_input, weight=w, padding=list(key.padding), stride=list(key.stride),
                     dilation=[1, 1])
    y.set_output(True).set_dim(key.y_shape).set_stride(channels_last_strides(key.y_shape))
    sums, sq_sums = g.genstats(name="genstats", input=y)
    for t in (sums, sq_sums):
        t.set_output(True).set_data_type(cudnn.data_type.FLOAT)
    return _Graph(g, x, w, scale, bias, y, sums, sq_sums, scale_dtype)


def plan_graph(built: _Graph) -> _Graph:
    """Validate the graph and ask cuDNN's heuristics for plans: raises (cudnnGraphNotSupportedError,
    ...) when no engine proposes one. Needs no GPU when the graph was described with device_property."""
    cudnn = _cudnn()
    g = built.graph
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    return built


def finalise_graph(built: _Graph) -> _Graph:
    """Build the first plan that compiles for this GPU (runtime-fused engines compile here) and
    size its workspace."""
    built.graph.check_support()
    built.graph.build_plans()
    built.workspace_bytes = int(built.graph.get_workspace_size())
    return built


# ---------------------------------------------------------------------------
# The per-process cache
# ---------------------------------------------------------------------------


@dataclass
class _Entry:
    graph: Optional[_Graph]  # None: unsupported, the unfused path runs
    status: str  # "built ..." or "unsupported: ..."


_entries: dict[GraphKey, _Entry] = {}
_handles: dict[int, Any] = {}


def _handle(device_index: int):
    cudnn = _cudnn()
    if device_index not in _handles:
        with torch.cuda.device(device_index):
            _handles[device_index] = cudnn.create_handle()
    handle = _handles[device_index]
    cudnn.set_stream(handle, torch.cuda.current_stream(device_index).cuda_stream)
    return handle


def _build(key: GraphKey) -> _Entry:
    failures = []
    for scale_dtype, inter_dtype in precision_variants(key.dtype, key.prologue):
        try:
            with torch.cuda.device(key.device_index):
                described = describe_graph(key, scale_dtype, inter_dtype, handle=_handle(key.device_index))
                built = finalise_graph(plan_graph(described))
        except Exception as err:  # no engine for this precision (or shape): try the next
            failures.append(f"scale {scale_dtype}, intermediate {inter_dtype}: {summarise_error(err)}")
            continue
        status = f"built (scale/bias {scale_dtype}, intermediates {inter_dtype})"
        log.info("cudnn_graph %s: %s", key, status)
        return _Entry(built, status)
    log.info("cudnn_graph %s: unsupported: %s", key, "; ".join(failures))
    return _Entry(None, "unsupported: " + "; ".join(failures))


def summarise_error(err: Exception, limit: int = 600) -> str:
    """cuDNN's refusal in a line: its first line, then each engine tried and the first reason it gave."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    parts = [lines[0][:160]]
    for i, line in enumerate(lines[:-1]):
        if line.startswith('{"engineId"'):
            engine = line.split(",")[0].removeprefix('{"engineId":')
            parts.append(f"engine {engine}: {lines[i + 1].removeprefix('Warning: ')[:160]}")
    return " | ".join(parts)[:limit]


def _entry(key: GraphKey) -> _Entry:
    if key not in _entries:
        _entries[key] = _build(key)
    return _entries[key]


def report() -> list[dict]:
    """Every graph this process asked for: its key and what became of it (built or unsupported)."""
    return [{"key": key, "status": e.status} for key, e in _entries.items()]


def clear_cache() -> None:
    """Forget built graphs (for tests)."""
    _entries.clear()


def unsupported_reason(x: Tensor, weight: Tensor, stride, padding, prologue: bool) -> Optional[str]:
    """None when a cuDNN graph serves this conv (building it now if needed), else why not."""
    reason = unavailable_reason(x.device)
    if reason is not None:
        return reason
    if x.dtype not in _TORCH_TO_CUDNN or weight.dtype != x.dtype:
        return f"dtypes x {x.dtype}, weight {weight.dtype} (need one of {list(_TORCH_TO_CUDNN)})"
    key = graph_key(x.shape, weight.shape, x.dtype, stride, padding, prologue, x.device.index or 0)
    entry = _entry(key)
    return None if entry.graph is not None else entry.status


# ---------------------------------------------------------------------------
# Running a graph
# ---------------------------------------------------------------------------


def _channels_last(t: Tensor) -> Tensor:
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous(memory_format=torch.channels_last)


def variant_pack(built: _Graph, key: GraphKey, x: Tensor, weight: Tensor, scale: Optional[Tensor],
                 bias: Optional[Tensor]) -> tuple[dict, Tensor, Tensor, Tensor]:
    """(the graph's tensor -> buffer map, y, sum, sum of squares): inputs made NHWC, outputs allocated."""
    y = torch.empty(key.y_shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    sums = torch.zeros(1, key.w_shape[0], 1, 1, device=x.device, dtype=torch.float32)  # zeroed, as NVIDIA's samples
    sq_sums = torch.zeros_like(sums)
    pack = {built.x: _channels_last(x), built.w: _channels_last(weight), built.y: y, built.sums: sums,
            built.sq_sums: sq_sums}
    if key.prologue:
        pack[built.scale] = scale.to(built.scale_dtype).reshape(1, -1, 1, 1).contiguous()
        pack[built.bias] = bias.to(built.scale_dtype).reshape(1, -1, 1, 1).contiguous()
    return pack, y, sums, sq_sums


def _execute(built: _Graph, key: GraphKey, x: Tensor, weight: Tensor, scale: Optional[Tensor],
             bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(y NHWC, sum, sum of squares) of one run of the graph."""
    pack, y, sums, sq_sums = variant_pack(built, key, x, weight, scale, bias)
    workspace = torch.empty(max(built.workspace_bytes, 1), device=x.device, dtype=torch.uint8)
    built.graph.execute(pack, workspace, handle=_handle(key.device_index))
    return y, sums, sq_sums


def _unfused(x, weight, norm_mean, norm_invstd, norm_weight, norm_bias, stride, padding, eps):
    """conv_stats' cuDNN-conv path: the same results from a conv and a separate statistics pass."""
    return torch.ops.fastresnet.conv_stats.default(x, weight, norm_mean, norm_invstd, norm_weight, norm_bias, stride,
                                                   padding, eps, "cudnn")


@torch.library.custom_op("fastresnet::conv_stats_cudnn_graph", mutates_args=())
def _conv_stats_graph_op(
    x: Tensor,
    weight: Tensor,
    norm_mean: Optional[Tensor],
    norm_invstd: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, unbiased var) as fastresnet::conv_stats, from one cuDNN graph."""
    norm = None if norm_mean is None else (norm_mean, norm_invstd, norm_weight, norm_bias)
    key = graph_key(x.shape, weight.shape, x.dtype, stride, padding, norm is not None, x.device.index or 0)
    # Building a graph (a cuDNN handle, plans) cannot happen inside a CUDA-graph capture: a graph first
    # met there runs unfused, and is built by a later eager call.
    entry = _entries.get(key) if tuning.capturing(x.device) else _entry(key)
    if entry is None or entry.graph is None:
        return _unfused(x, weight, norm_mean, norm_invstd, norm_weight, norm_bias, stride, padding, eps)
    scale = bias = None
    if norm is not None:  # relu((x - mean) * invstd * weight + bias) = relu(x * scale + shift)
        scale = norm_invstd * norm_weight
        bias = norm_bias - norm_mean * scale
    y, sums, sq_sums = _execute(entry.graph, key, x, weight, scale, bias)
    count = y.numel() // y.shape[1]
    mean, invstd, var_unbiased = stats_from_sums(sums, sq_sums, count, eps)
    return with_strides_of(y, empty_conv_output(x, weight, stride, padding)), mean, invstd, var_unbiased


@_conv_stats_graph_op.register_fake
def _(x, weight, norm_mean, norm_invstd, norm_weight, norm_bias, stride, padding, eps):
    out = empty_conv_output(x, weight, stride, padding)
    stat = x.new_empty(weight.shape[0], dtype=torch.float32)
    return out, stat, torch.empty_like(stat), torch.empty_like(stat)


torch.library.register_autograd("fastresnet::conv_stats_cudnn_graph", conv_stats_grads,
                                setup_context=conv_stats_setup)  # the statistics mean the same: so do the gradients


def conv_stats_graph(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, *,
                     eps: float = 1e-5, input_norm=None, use_cudnn: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fastresnet.ops.conv_stats.conv_stats through one cuDNN graph (same arguments, same results; every conv
    runs through cuDNN, so use_cudnn changes nothing).

    Needs CUDA and nvidia-cudnn-frontend; where cuDNN has no engine for the graph, the op runs
    conv_stats' unfused cuDNN path instead (check with unsupported_reason() or report())."""
    stride, padding = list(pair(stride)), list(pair(padding))
    validate(input, weight, bias, input_norm, stride, padding)
    # Under torch.compile the eager call that chose this path has checked (and the import probe
    # is not traceable); the op itself is opaque to the compiler.
    reason = None if torch.compiler.is_compiling() else unavailable_reason(input.device)
    if reason is not None:
        raise RuntimeError(f"conv_stats_graph: {reason}")
    norm = (None,) * 4 if input_norm is None else tuple(v.float() for v in input_norm)
    return torch.ops.fastresnet.conv_stats_cudnn_graph(input, weight, *norm, stride, padding, eps)


def _offered(block, x: Tensor) -> bool:
    """The package imports, the device is CUDA, the block can run a statistics path, and the input is NHWC
    (the layout cuDNN's fused engines take). Whether cuDNN has an engine for each conv is learnt on its
    first call (report()); where it has none, that conv runs unfused."""
    return (x.is_cuda and unavailable_reason(x.device) is None and x.is_contiguous(memory_format=torch.channels_last)
            and blocks.statistics_applies(block, x))


def _unfused_reference(input, weight, bias=None, stride=1, padding=0, *, eps=1e-5, input_norm=None, use_cudnn=True):
    return conv_stats(input, weight, bias, stride, padding, eps=eps, input_norm=input_norm, use_cudnn=True)


blocks.EXPERIMENTAL["cudnn_graph"] = checked("fused_block", "cudnn_graph", conv_stats_graph, _unfused_reference,
                                             outputs=lambda out: out)
blocks.FUSED_BLOCK.add_experimental("cudnn_graph", _offered)
