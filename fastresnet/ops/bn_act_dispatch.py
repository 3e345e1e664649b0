"""Which path batch_norm_act runs ("triton" or "eager"; in training also the
kernels' variants "triton_single" (forward) and "triton_pipelined" (backward)),
per problem and stage.

Stages, each decided on its own by fastresnet.ops.dispatch.choose (timed on a
GPU the first time, remembered in memory and on disk):
  train:fwd     the training forward, timed alone (no gradient)
  train:bwd     the training backward, timed alone on the saved tensors and the
                real upstream gradient, per forward path and per set of needed
                gradients (the key says "after-triton" or "after-eager")
  train:fwdbwd  the forward of training calls with gradients: each forward with
                its best backward timed as one step (at the first backward), so
                the step is never slower than eager's either
  eval:fwd      eval without gradients (inference)
  eval:fwdbwd   eval with gradients (a frozen-statistics fine-tune), forward and
                backward timed together

The hot path only looks a tuple up in a dict (`_chosen`); the string key of
the dispatch cache is built once per problem, when it is first decided.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from fastresnet.ops import dispatch

# Bumped when a candidate changes meaning, so that choices cached on disk for
# the old candidates are not reused (2: eval folds the scale in the kernel;
# training forward and backward decided separately).
KEY_VERSION = 2

# Below these many rows (N*H*W) per channel the fused training forward lost to
# cuDNN's BatchNorm + add + ReLU on an H200 (bf16, channels_last, batch 256; run
# 1, git 940f6a4; fused / eager time 0.60 / 0.74 / 0.94 / 1.69 at 56x56 / 28x28 /
# 14x14 / 7x7, i.e. 802,816 / 200,704 / 50,176 / 12,544 rows). Host time per call
# decides the small shapes, hence a threshold on rows.
TRAIN_FORWARD_MIN_ROWS = 2**15
# The kernels' backward lost to eager at every stage on the H200 (run 2: 0.96x at
# 56x56, 0.82x / 0.74x / 0.65x below).
FIXED_BACKWARD = "eager"

_chosen: dict[tuple, str] = {}  # (stage, signature, ...) -> path

# The kernels' variants that entered the dispatch before running on a GPU, each with the path it must
# agree with: their first timed call is compared with that path's output (checked()).
UNVERIFIED_ON_GPU = {"triton_single": "triton", "triton_pipelined": "triton", "triton_wide": "triton"}


def clear() -> None:
    """Forget this process's per-signature choices (tests)."""
    _chosen.clear()


def measured(x: Tensor) -> bool:
    """Whether this input chooses between paths at all (on a GPU). Elsewhere the
    Triton path is the interpreter (tests): the kernels always run there."""
    return x.is_cuda


def signature(x: Tensor, residual: Optional[Tensor], relu: bool) -> tuple:
    """What a choice depends on, cheap to build on every call (no strings)."""
    res = None if residual is None else (residual.stride(), residual.dtype)
    return (dispatch.dispatch_mode(), x.shape, x.stride(), x.dtype, x.device, res, relu)


def problem_key(stage: str, x: Tensor, residual: Optional[Tensor], relu: bool, detail: str = "") -> str:
    """The dispatch cache key of one problem at one stage."""
    layout = "cl" if x.is_contiguous(memory_format=torch.channels_last) else ("nchw" if x.is_contiguous() else "strided")
    return (f"batch_norm_act.v{KEY_VERSION}:{stage}:x{'x'.join(map(str, x.shape))}"
            f":{str(x.dtype).removeprefix('torch.')}:{layout}:res{int(residual is not None)}:relu{int(relu)}{detail}")


def fixed_forward(x: Tensor, training: bool) -> str:
    """The choice when nothing is measured (FASTRESNET_DISPATCH=fixed): eval is one
    pass over x and the residual against eager's BatchNorm, add and ReLU, so the
    kernel; a training forward by rows, as measured on the H200."""
    if not training:
        return "triton"
    rows = x.shape[0] * x.shape[2] * x.shape[3]
    return "triton" if rows >= TRAIN_FORWARD_MIN_ROWS else "eager"


def decide(memo: tuple, x: Tensor, describe: Callable[[], str], candidates: Callable[[], dict], fixed: str) -> str:
    """The path for `memo` (stage + signature): remembered, else chosen by
    dispatch.choose over `candidates()` (timed on a GPU) under the key `describe()`."""
    path = _chosen.get(memo)
    if path is None:
        path = dispatch.choose(describe(), candidates(), fixed, x.device) if measured(x) else "triton"
        _chosen[memo] = path
    return path


def checked(candidates: dict[str, Callable], outputs: Callable[[object], tuple] = lambda out: (out,)) -> dict:
    """candidates with each variant of UNVERIFIED_ON_GPU wrapped so that its first call (the
    measurement's untimed warm-up) compares `outputs(result)` with its known-good path's
    (dispatch.checked_on_first_call): one that is off warns and is left out of the measurement."""
    result = dict(candidates)
    for name, baseline in UNVERIFIED_ON_GPU.items():
        if name in result and baseline in candidates:
            expected = functools.cache(candidates[baseline])
            result[name] = dispatch.checked_on_first_call("batch_norm_act", name, candidates[name], expected, outputs)
    return result


def known(memo: tuple) -> Optional[str]:
    """The path already chosen for `memo`, or None."""
    return _chosen.get(memo)


def remember(memo: tuple, path: str) -> None:
    """Fix the path for `memo` without timing (a fallback when timing failed)."""
    _chosen[memo] = path


def backward_memo(sig: tuple, forward: str, needs: tuple) -> tuple:
    return ("train:bwd", sig, forward, needs)


def step_memo(sig: tuple, needs: tuple) -> tuple:
    """The forward that training calls with gradients run (train:fwdbwd)."""
    return ("train:fwdbwd", sig, needs)


def grads_detail(needs: tuple) -> str:
    """Which of (x, weight, bias, residual) get a gradient, as in ':grads1111'."""
    return f":grads{''.join(str(int(n)) for n in needs)}"


def backward_detail(forward: str, needs: tuple) -> str:
    return f":after-{forward}{grads_detail(needs)}"


def compiled_path(x: Tensor, residual: Optional[Tensor], relu: bool, training: bool, needs: tuple) -> str:
    """The path traced inside torch.compile, where nothing is timed: the kernels
    (custom ops) only where earlier eager calls chose them for every stage the
    compiled code runs, else "eager", i.e. Inductor's code for the unfused ops,
    which beat the kernels at every stage on the H200 (run 1: forward 0.60 / 0.37
    / 0.30 / 0.29 ms against 0.87 / 0.56 / 0.43 / 0.41) and can fuse with its
    neighbours. FASTRESNET_DISPATCH=triton/eager forces either."""
    sig = signature(x, residual, relu)
    mode = sig[0]
    if mode in ("triton", "eager"):
        return mode
    if not measured(x):
        return "triton"
    grad = any(needs)
    if not training:
        return _family(_chosen.get(("eval:fwdbwd" if grad else "eval:fwd", sig)))
    if not grad:
        return _family(_chosen.get(("train:fwd", sig)))
    forward = _chosen.get(step_memo(sig, needs)) or _chosen.get(("train:fwd", sig))
    if _family(forward) == "eager":
        return "eager"
    return _family(_chosen.get(backward_memo(sig, forward, needs)))


def _family(path: Optional[str]) -> str:
    """"triton" for any of the kernels' variants (the custom ops stand for them
    all under torch.compile), else "eager" (also when nothing was chosen)."""
    return "triton" if path is not None and path.startswith("triton") else "eager"
