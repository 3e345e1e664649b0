"""BatchNorm + residual add + ReLU (training mode): fastresnet vs eager vs torch.compile.

Groups are `bn_act/<mode>/<N>x<C>x<H>x<W>`, mode in forward / backward / full
(training) and eval (eval-mode forward, running statistics), providers:
  fastresnet  BatchNormAct2d(x, residual) as users get it: the measured
              choice between the Triton kernels and eager PyTorch
  triton      the same with FASTRESNET_DISPATCH=batch_norm_act=triton: always the kernels
  eager       relu(nn.BatchNorm2d(x) + residual), cuDNN/ATen (the baseline)
  compile     torch.compile of the eager module (Inductor's fused kernels)
and one `copy` group per shape, torch's device-to-device copy, the measured
bandwidth ceiling.

GPU: ResNet-50 stage shapes at batch 256, bf16 activations, fp32 parameters,
channels_last. CPU: one tiny shape (the kernels run in Triton's interpreter;
compile is skipped: Inductor takes minutes to build these on this CPU).

`bytes` in extra_info is what the two-pass scheme must move, E elements of the
activation dtype each:
  forward   4E: read x for the statistics, read x and residual, write y
  backward  7E: read dy, x, residual and write g (= dresidual) in the reduction;
                read g and x, write dx in the elementwise pass
                (8E in the run of 940f6a4, before the reduction stored g)
  full     11E
  eval      3E: read x and residual, write y
so median time gives GB/s, comparable between providers and with `copy` (2E).

The fastresnet rows carry the choice per stage in extra_info (`dispatch_choice`,
e.g. "forward triton, backward(after triton) eager, backward(after eager) eager,
step triton"; `dispatch` has the measured times), which bench/report.py prints
beside the provider. The backward group times the backward of a graph built by
one call with gradients: its forward is the step's choice when that was decided
before (an earlier full/backward run of the shape), else the forward's.
"""

from __future__ import annotations

import harness  # bench/harness.py: pytest puts bench/ on sys.path
import pytest
import torch
from torch import nn

from fastresnet.nn import BatchNormAct2d
from fastresnet.ops import tuning
from fastresnet.reference import batch_norm_act_reference
from fastresnet.testing import assert_close

DEV = harness.device()
ON_GPU = DEV.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SHAPES = [(256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)] if ON_GPU else [(2, 16, 6, 6)]
PROVIDERS = ["fastresnet", "triton", "eager", "compile"]
MODES = {"forward": 4, "backward": 7, "full": 11, "eval": 3}  # elements moved per activation element


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


_MODULES: dict = {}


def module_for(provider: str, channels: int, mode: str = "full") -> nn.Module:
    """One module per (provider, channels), so torch.compile compiles once per
    shape and mode family; eval mode gets eval-mode modules, all with
    non-trivial running statistics."""
    key = (provider, channels, mode == "eval")
    if key not in _MODULES:
        module = BatchNormAct2d(channels) if provider in ("fastresnet", "triton") else harness.BnAddRelu(channels)
        module = module.to(DEV).train(mode != "eval")
        bn = module if isinstance(module, BatchNormAct2d) else module.bn
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        _MODULES[key] = torch.compile(module, fullgraph=True) if provider == "compile" else module
    return _MODULES[key]


@pytest.fixture(scope="module", autouse=True)
def no_donated_buffers():
    """Backward mode times autograd.grad(..., retain_graph=True) over one graph
    again and again. AOTAutograd's donated buffers (the compiled backward frees
    saved activations as it consumes them) forbid retain_graph ("compiled with
    non-empty donated buffers which requires ... retain_graph=False"). Graphs
    are cached per code object and shape, so one compiled in full mode would be
    reused in backward mode: switch donation off for every compile of this
    file (it saves memory, not time), and only for this file."""
    import torch._functorch.config as config  # a submodule: not loaded by `import torch`
    if not hasattr(config, "donated_buffer"):  # older torch: no donation
        yield
        return
    with config.patch(donated_buffer=False):
        yield


def activation(shape, requires_grad=False):
    x = torch.randn(shape, device=DEV).to(DTYPE).contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def check_against_reference(module: nn.Module, x: torch.Tensor, residual: torch.Tensor, training: bool) -> None:
    """Output against fastresnet.reference on the benchmark's own inputs (the
    reference gets copies of the running statistics, which training moves)."""
    bn = getattr(module, "_orig_mod", module)
    bn = bn if isinstance(bn, BatchNormAct2d) else bn.bn
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    with torch.no_grad():
        expected = batch_norm_act_reference(x, mean, var, None, None, training, 0.1, 1e-5, residual, True)
        assert_close(module(x, residual), expected, name="bench output")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bn_act(benchmark, provider, mode, shape):
    if provider == "compile" and not ON_GPU:
        pytest.skip("torch.compile takes minutes to build these kernels on this CPU")
    # "triton" pins the op to the kernels for this test only.
    tuning.override("batch_norm_act=triton" if provider == "triton" else None)
    try:
        run_bn_act(benchmark, provider, mode, shape)
    finally:
        tuning.override(None)


def run_bn_act(benchmark, provider, mode, shape):
    module = module_for(provider, shape[1], mode)
    x, residual = activation(shape, mode != "eval"), activation(shape, mode != "eval")
    check_against_reference(module, x, residual, training=mode != "eval")
    grad_y = activation(shape)
    wrt = [x, residual, *module.parameters()]

    if mode in ("forward", "eval"):
        def step():
            with torch.no_grad():
                return module(x, residual)
    elif mode == "backward":
        y = module(x, residual)

        def step():
            return torch.autograd.grad(y, wrt, grad_y, retain_graph=True)
    else:
        def step():
            return torch.autograd.grad(module(x, residual), wrt, grad_y)

    elements = x.numel()
    harness.run(
        benchmark, step, dev=DEV, group=f"bn_act/{mode}/{shape_id(shape)}", provider=provider,
        baseline=provider == "eager", bytes=MODES[mode] * elements * x.element_size(),
        dtype=str(DTYPE), shape=list(shape),
    )
    if provider == "fastresnet":
        entries = dispatch_entries(mode, shape)
        benchmark.extra_info.update(dispatch=entries, dispatch_choice=dispatch_summary(entries))


# The stages (ops of fastresnet.ops.tuning) each benchmark mode runs.
TRAIN_STAGES = ("batch_norm_act.forward", "batch_norm_act.backward", "batch_norm_act.step")
MODE_STAGES = {"forward": TRAIN_STAGES[:1], "backward": TRAIN_STAGES, "full": TRAIN_STAGES,
               "eval": ("batch_norm_act.eval",)}


def dispatch_entries(mode: str, shape) -> list[dict]:
    """The decisions behind this benchmark (key, choice, measured times), so that the report shows which
    path ran in each stage and why."""
    tag = f":{shape_id(shape)}:"
    return [entry for entry in tuning.decisions() if entry["op"] in MODE_STAGES[mode] and tag in entry["key"]]


def dispatch_summary(entries: list[dict]) -> str:
    """'forward triton, backward(after triton) eager, ...': each stage and its choice; the step's is the
    forward that calls with gradients run."""
    parts = []
    for entry in entries:
        after = next((f.removeprefix("after-") for f in entry["key"].split(":") if f.startswith("after-")), None)
        stage = entry["op"].removeprefix("batch_norm_act.")
        parts.append(f"{stage}{f'(after {after})' if after else ''} {entry['choice']}")
    return ", ".join(parts) or "not measured"


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_copy_bandwidth(benchmark, shape):
    """The ceiling: a device-to-device copy of one activation (read E, write E)."""
    src, dst = activation(shape), activation(shape)
    harness.run(
        benchmark, lambda: dst.copy_(src), dev=DEV, group=f"copy/{shape_id(shape)}", provider="torch-copy",
        baseline=True, bytes=2 * src.numel() * src.element_size(), dtype=str(DTYPE), shape=list(shape),
    )
