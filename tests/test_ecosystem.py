"""Converted models as ordinary PyTorch modules to the tools users point at them: one matrix of
tool x model x mode, each cell equal to the unconverted model or a documented one-line refusal.

Models: torchvision's resnet18 and resnet50 and the zoo's resnet20, BatchNorms randomised, at 1x3x32x32;
modes inference, train and bn_act. Whole models run on the eager reference path
(FASTRESNET_FORCE_REFERENCE=1): Triton's interpreter takes seconds per conv launch. The kernel path runs
resnet20 at 8x8 for the dtypes, and the fused modules one by one. Under a graph capture the converted
model records the plain model's graph whatever the path (fastresnet.nn.plain), which the export cells
check node for node. A spawned process runs one cell per model and mode in turn (ROTATION); ONNX and
onnxruntime run resnet18 and resnet20 of it in a process that cannot import fastresnet. One intra-op
thread: the whole file takes about 70 s of CPU.
"""

import contextlib
import copy
import functools
import io
import multiprocessing
import os
import pickle
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fastresnet
from fastresnet.models import get_model
from fastresnet.nn import BatchNormAct2d, FusedBasicBlock, FusedBottleneck, SyncBatchNormAct2d, blocks, folded_layers
from fastresnet.testing import assert_as_accurate_as, randomize_bn, relative_error

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore::UserWarning")

MODELS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50,
          "resnet20": functools.partial(get_model, "resnet20")}
MODES = ("inference", "train", "bn_act")
CELLS = [(name, mode) for name in MODELS for mode in MODES]
STAGES = {"resnet18": ["relu", "layer1", "layer2", "layer3", "layer4"],
          "resnet50": ["relu", "layer1", "layer2", "layer3", "layer4"],
          "resnet20": ["relu", "layer1", "layer2", "layer3"]}
# The modules whose hooks the hook cells watch: the stem's trio, a block's inner modules, a projection's BN.
HOOKED = {"resnet18": ["conv1", "bn1", "relu", "layer2.0.conv1", "layer2.0.bn1", "layer2.0.bn2",
                       "layer2.0.downsample.1"],
          "resnet50": ["conv1", "bn1", "relu", "layer2.0.conv2", "layer2.0.bn3", "layer2.0.downsample.1"],
          "resnet20": ["conv1", "bn1", "relu", "layer2.0.conv1", "layer2.0.bn1", "layer2.0.bn2"]}


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, here and in the processes the file starts: the inputs are too small to split,
    and on a loaded 2-core machine two threads waiting for each other make the file three times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(previous)


@functools.cache
def plain(name):
    """(the unconverted model in eval mode, its input, its output)."""
    torch.manual_seed(0)
    model = randomize_bn(MODELS[name]())
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # one input for every model
    with torch.no_grad():
        return model, x, model(x)


# One cell per model and per mode, for the tools that start another process (each start costs seconds):
# the other cells show every mode's model pickles alike and that its folded copy is the plain one's.
ROTATION = [("resnet18", "inference"), ("resnet50", "bn_act"), ("resnet20", "train")]


@functools.cache
def _converted(name, mode):
    return fastresnet.convert(copy.deepcopy(plain(name)[0]), mode).eval()


def converted(name, mode):
    """A converted copy of plain(name)[0] (a deep copy of a cached one: tests may change it)."""
    return copy.deepcopy(_converted(name, mode))


def assert_equal(actual, expected, limit=1e-5):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    error = relative_error(actual, expected)
    assert error < limit, f"relative error {error:.2e}"


@contextlib.contextmanager
def counting_fused_ops():
    """The names of the fused ops the modules call in the block (conv_bn_act, batch_norm_act)."""
    calls = []

    def counted(fn):
        def call(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return call

    with mock.patch.object(blocks, "conv_bn_act", counted(blocks.conv_bn_act)), \
            mock.patch.object(blocks, "batch_norm_act", counted(blocks.batch_norm_act)), \
            mock.patch.object(folded_layers, "conv_bn_act", counted(folded_layers.conv_bn_act)):
        yield calls


def run_counting(model, x):
    """(model(x) without gradients, how many fused ops it called)."""
    with torch.no_grad(), counting_fused_ops() as calls:
        return model(x), len(calls)


def module_classes(model):
    return [(name, type(m)) for name, m in model.named_modules()]


# ---------------------------------------------------------------------------
# Saving and copying: pickle, torch.save / torch.load, deepcopy, a spawned process
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,mode", CELLS)
def test_pickle_and_torch_save(name, mode):
    _, x, expected = plain(name)
    fused = _converted(name, mode)
    out, fused_ops = run_counting(fused, x)
    assert_equal(out, expected)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for copied in (pickle.loads(pickle.dumps(fused)), torch.load(buffer, weights_only=False)):
        assert module_classes(copied) == module_classes(fused)
        copied_out, copied_ops = run_counting(copied, x)
        assert torch.equal(copied_out, out) and copied_ops == fused_ops > 0  # still fused, as before


@pytest.mark.parametrize("name,mode", CELLS)
def test_deepcopy(name, mode):
    _, x, expected = plain(name)
    fused = _converted(name, mode)
    copied = copy.deepcopy(fused)
    assert module_classes(copied) == module_classes(fused)
    assert all(p is not q for p, q in zip(copied.parameters(), fused.parameters()))
    out, fused_ops = run_counting(copied, x)
    assert_equal(out, expected)
    assert fused_ops == run_counting(fused, x)[1] > 0


def _in_spawned_process(models, x):
    """Each model's output and fused-op count, in a process started by multiprocessing's spawn."""
    return {key: run_counting(model, x) for key, model in models.items()}


@pytest.fixture(scope="module")
def spawned():
    """The rotation's converted models run in one spawned process (one start for the file)."""
    x = plain("resnet18")[1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_in_spawned_process, ({cell: _converted(*cell) for cell in ROTATION}, x))


@pytest.mark.parametrize("name,mode", ROTATION)
def test_spawned_process(name, mode, spawned):
    _, x, expected = plain(name)
    out, fused_ops = spawned[name, mode]
    assert_equal(out, expected)
    assert fused_ops == run_counting(_converted(name, mode), x)[1] > 0


# ---------------------------------------------------------------------------
# FX: symbolic_trace, torchvision's feature extraction, FX quantization's prepare_fx
# ---------------------------------------------------------------------------


def graph_ops(graph):
    return [(node.op, str(node.target)) for node in graph.nodes]


@functools.cache
def plain_trace(name):
    """(the plain model's FX graph ops, its graph node names, its stage outputs)."""
    model, x, _ = plain(name)
    with torch.no_grad():
        features = create_feature_extractor(model, STAGES[name])(x)
    return graph_ops(torch.fx.symbolic_trace(model).graph), get_graph_node_names(model), features


@pytest.mark.parametrize("name,mode", CELLS)
def test_fx_symbolic_trace_is_the_plain_graph(name, mode):
    _, x, expected = plain(name)
    traced = torch.fx.symbolic_trace(_converted(name, mode))
    assert graph_ops(traced.graph) == plain_trace(name)[0]
    with torch.no_grad():
        assert_equal(traced(x), expected)


@pytest.mark.parametrize("name,mode", CELLS)
def test_feature_extraction(name, mode):
    _, x, _ = plain(name)
    fused = _converted(name, mode)
    _, node_names, expected_features = plain_trace(name)
    assert get_graph_node_names(fused) == node_names
    with torch.no_grad():
        features = create_feature_extractor(fused, STAGES[name])(x)
    assert list(features) == STAGES[name]
    for stage in STAGES[name]:
        assert_equal(features[stage], expected_features[stage])


@pytest.mark.parametrize("name,mode", CELLS)
def test_prepare_fx(name, mode):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    _, x, expected = plain(name)
    prepared = prepare_fx(converted(name, mode), get_default_qconfig_mapping("x86"), (x,))
    with torch.no_grad():  # the observers watch; the values are the model's
        assert_equal(prepared(x), expected)


# ---------------------------------------------------------------------------
# Hooks: on the modules a fused path would not call
# ---------------------------------------------------------------------------


def run_hooked(model, names, x, scale_output_of=None):
    """model(x) with a forward hook on each named module recording its output; the hook on
    `scale_output_of` returns its output halved. Returns (output, {name: recorded outputs})."""
    modules, seen, handles = dict(model.named_modules()), {name: [] for name in names}, []

    def record(name):
        def hook(module, inputs, output):
            seen[name].append(output.detach().clone())
            return output * 0.5 if name == scale_output_of else None
        return hook

    try:
        handles = [modules[name].register_forward_hook(record(name)) for name in names]
        return model(x), seen
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name,mode", CELLS)
def test_forward_hooks_see_what_their_module_returns(name, mode):
    model, x, _ = plain(name)
    fused, names = _converted(name, mode), HOOKED[name]
    with torch.no_grad():
        for scaled in (None, names[4]):  # only watching; then a hook that changes a block's inner output
            expected, expected_seen = run_hooked(model, names, x, scaled)
            out, seen = run_hooked(fused, names, x, scaled)
            assert_equal(out, expected)
            for hooked in names:
                assert len(seen[hooked]) == len(expected_seen[hooked]) == 1, hooked
                assert_equal(seen[hooked][0], expected_seen[hooked][0])
        assert run_counting(fused, x)[1] > 0  # fused again once the hooks are gone


@pytest.mark.parametrize("name,mode", CELLS)
def test_hooks_in_training(name, mode):
    model, _, _ = plain(name)
    model, fused, names = copy.deepcopy(model).train(), converted(name, mode).train(), HOOKED[name]
    x = torch.randn(2, 3, 32, 32, requires_grad=True)  # two images: layer4's BatchNorms see 2 values a channel
    expected, expected_seen = run_hooked(model, names, x)
    out, seen = run_hooked(fused, names, x)
    assert_equal(out, expected, 1e-4)
    for hooked in names:
        assert_equal(seen[hooked][0], expected_seen[hooked][0], 1e-4)
    for (key, a), (_, b) in zip(fused.state_dict().items(), model.state_dict().items()):
        assert_equal(a.double(), b.double(), 1e-4)  # the running statistics moved alike


@pytest.mark.parametrize("name,mode", CELLS)
def test_global_module_hooks_see_the_plain_calls(name, mode):
    model, x, expected = plain(name)
    fused = _converted(name, mode)
    names = {}

    def calls(target):
        paths = {id(m): path for path, m in target.named_modules()}
        order = []
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda module, inputs, output: order.append(paths.get(id(module))))
        try:
            with torch.no_grad():
                names[target] = target(x)
        finally:
            handle.remove()
        return order

    assert calls(fused) == calls(model)
    assert_equal(names[fused], expected)


# ---------------------------------------------------------------------------
# Dtypes: .half(), .bfloat16(), .double()
# ---------------------------------------------------------------------------

# bf16 convolutions are ~600x slower than fp32 on this CPU: resnet50 runs fp64 only (its Bottleneck is in
# the module cells below in every dtype).
DTYPES = (torch.float16, torch.bfloat16, torch.float64)
DTYPE_CELLS = [(name, mode, dtype) for name, mode in CELLS for dtype in (DTYPES[2:] if name == "resnet50" else DTYPES)]


def check_cast(fused, model, x, dtype, fp32_output):
    with torch.no_grad():
        out, baseline = fused.to(dtype)(x.to(dtype)), model.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    if dtype == torch.float64:
        assert_equal(out, baseline, 1e-10)
    else:  # judged as torch's own computation in that dtype is: against fp32
        assert_as_accurate_as(out.float(), baseline.float(), fp32_output, name=str(dtype))


@pytest.mark.parametrize("name,mode,dtype", DTYPE_CELLS, ids=str)
def test_dtype_casts(name, mode, dtype):
    model, x, expected = plain(name)
    check_cast(converted(name, mode), copy.deepcopy(model), x, dtype, expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_dtype_casts_on_the_kernel_path(mode, dtype, monkeypatch):
    """resnet20 through Triton's interpreter, which computes bf16 wrongly: fp16 and fp64 here."""
    monkeypatch.delenv("FASTRESNET_FORCE_REFERENCE")
    model, _, _ = plain("resnet20")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    check_cast(converted("resnet20", mode), copy.deepcopy(model), x, dtype, expected)


def _fused_modules():
    """(name, a fused module, the torch modules computing the same, input shape) for each kind."""
    torch.manual_seed(0)
    bn_relu = randomize_bn(nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()))
    sync_relu = randomize_bn(nn.Sequential(nn.SyncBatchNorm(8), nn.ReLU()))
    projection = nn.Sequential(nn.Conv2d(16, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    bottleneck = randomize_bn(torchvision.models.resnet.Bottleneck(16, 4, 2, projection))
    stem = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()))
    kinds = [("BatchNormAct2d", BatchNormAct2d.from_batchnorm(copy.deepcopy(bn_relu[0])), bn_relu, (2, 8, 4, 4)),
             ("SyncBatchNormAct2d", SyncBatchNormAct2d.from_batchnorm(copy.deepcopy(sync_relu[0])), sync_relu,
              (2, 8, 4, 4))]
    for mode in MODES:
        kinds.append((f"Bottleneck-{mode}", fastresnet.convert(copy.deepcopy(bottleneck), mode),
                      copy.deepcopy(bottleneck), (2, 16, 4, 4)))
        kinds.append((f"stem-{mode}", fastresnet.convert(copy.deepcopy(stem), mode), copy.deepcopy(stem),
                      (2, 3, 4, 4)))
    return kinds


@pytest.mark.parametrize("path", ["reference", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_every_fused_module_takes_the_casts(path, dtype, training, monkeypatch):
    """Each fused module after .to(dtype), as torch's own modules: eval and training, both paths."""
    if path == "kernel":
        monkeypatch.delenv("FASTRESNET_FORCE_REFERENCE")
    for name, fused, reference, shape in _fused_modules():
        x = torch.randn(shape)
        fused.train(training), reference.train(training)
        with torch.no_grad():
            exact = copy.deepcopy(reference)(x)
            out, baseline = fused.to(dtype)(x.to(dtype)), reference.to(dtype)(x.to(dtype))
        assert out.dtype == dtype, name
        if dtype == torch.float64:
            assert_equal(out, baseline, 1e-10)
        elif not (path == "kernel" and dtype == torch.bfloat16):  # the interpreter's bf16 is not the GPU's
            assert_as_accurate_as(out.float(), baseline.float(), exact, name=f"{name} {dtype}")
        for (key, a), b in zip(fused.state_dict().items(), reference.state_dict().values()):  # the same order
            assert a.dtype == b.dtype and relative_error(a.double(), b.double()) < 1e-2, f"{name} {key}"


# ---------------------------------------------------------------------------
# Export for deployment: torch.export, fold_bn, ONNX + onnxruntime without fastresnet, TorchScript
# ---------------------------------------------------------------------------


@functools.cache
def plain_export(name):
    model, x, _ = plain(name)
    return torch.export.export(model, (x,))


def exported_ops(program):
    return [str(node.target) for node in program.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("name,mode", CELLS)
def test_torch_export_records_the_plain_graph(name, mode):
    _, x, expected = plain(name)
    program = torch.export.export(_converted(name, mode), (x,))
    ops = exported_ops(program)
    assert not [op for op in ops if "fastresnet" in op]
    assert ops == exported_ops(plain_export(name))
    assert_equal(program.module()(x), expected)


def test_torch_export_on_the_kernel_path(monkeypatch):
    """As a GPU would run it (the interpreter here): no custom op recorded either."""
    monkeypatch.delenv("FASTRESNET_FORCE_REFERENCE")
    _, x, _ = plain("resnet20")
    for mode in MODES:
        ops = exported_ops(torch.export.export(_converted("resnet20", mode), (x,)))
        assert ops == exported_ops(plain_export("resnet20")), mode


# resnet50's ONNX export alone takes 10 s here: its exported graph is checked above and its folded copy is
# the plain folded model's (test_fold_bn_gives_the_plain_folded_model).
ONNX_CELLS = [cell for cell in ROTATION if cell[0] != "resnet50"]

_ONNX_RUNNER = """
import sys


class NoFastresnet:  # the process of a user without fastresnet: importing it fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "fastresnet":
            raise ImportError("fastresnet is not installed here")


sys.meta_path.insert(0, NoFastresnet())
import numpy as np
import onnxruntime
import torch
x = np.load(sys.argv[1])
for onnx_path, model_path, out_path in zip(*[iter(sys.argv[2:])] * 3):
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
    torch_out = onnx_out  # the zoo's classes are fastresnet's: its model is not saved whole ("-")
    if model_path != "-":
        with torch.no_grad():
            torch_out = torch.load(model_path, weights_only=False)(torch.from_numpy(x)).numpy()
    np.save(out_path, np.stack([onnx_out, torch_out]))
assert "fastresnet" not in sys.modules, "fastresnet was imported"
"""


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Each ONNX cell's fold_bn(converted model), exported to ONNX and (torchvision's) saved whole with
    torch.save, then run by onnxruntime and by torch in a process that never imports fastresnet (its
    working directory and PYTHONPATH without it). Returns {cell: (onnx output, torch output, op count,
    the plain model's)}."""
    for package in ("onnx", "onnxscript", "onnxruntime"):  # the dev extra's; torch.onnx.export needs the first two
        pytest.importorskip(package)
    numpy = pytest.importorskip("numpy")
    folder = tmp_path_factory.mktemp("deployed")
    x = plain("resnet18")[1]
    numpy.save(folder / "x.npy", x.numpy())
    args, counts = [str(folder / "x.npy")], {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
        for name, mode in ONNX_CELLS:
            folded = fastresnet.fold_bn(_converted(name, mode))
            program = torch.export.export(folded, (x,))
            counts[name, mode] = (len(exported_ops(program)), len(exported_ops(plain_export(name))))
            stem = folder / f"{name}-{mode}"
            torch.onnx.export(program, f=str(stem) + ".onnx", dynamo=True, optimize=False, verbose=False)
            saved = "-" if name == "resnet20" else str(stem) + ".pt"
            if saved != "-":
                torch.save(folded, saved)
            args += [str(stem) + ".onnx", saved, str(stem) + ".npy"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", _ONNX_RUNNER, *args], cwd=folder, env=env, check=True, timeout=300)
    return {cell: (*torch.from_numpy(numpy.load(folder / f"{cell[0]}-{cell[1]}.npy")), *counts[cell])
            for cell in ONNX_CELLS}


@pytest.mark.parametrize("name,mode", ONNX_CELLS)
def test_onnx_and_torch_save_run_without_fastresnet(name, mode, deployed):
    _, _, expected = plain(name)
    onnx_out, torch_out, ops, plain_ops = deployed[name, mode]
    assert ops < plain_ops  # the BatchNorms are in the convs' weights
    assert_equal(onnx_out, expected, 1e-4)
    assert_equal(torch_out, expected)


@pytest.mark.parametrize("name,mode", CELLS)
def test_fold_bn_gives_the_plain_folded_model(name, mode):
    model, x, expected = plain(name)
    folded, plain_folded = fastresnet.fold_bn(_converted(name, mode)), fastresnet.fold_bn(model)
    assert module_classes(folded) == module_classes(plain_folded)
    assert not [m for m in folded.modules() if type(m).__module__.startswith("fastresnet.nn")]
    assert folded.folded_bn_count == plain_folded.folded_bn_count == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for (key, a), (key_b, b) in zip(folded.state_dict().items(), plain_folded.state_dict().items()):
        assert key == key_b and torch.equal(a, b), key
    with torch.no_grad():
        assert_equal(folded(x), expected)


@pytest.mark.parametrize("name,mode", CELLS)
def test_jit_script_refuses_in_one_line(name, mode):
    fused = _converted(name, mode)
    before = module_classes(fused)
    with pytest.raises(RuntimeError) as refusal:
        torch.jit.script(fused)
    message = str(refusal.value)
    assert "\n" not in message and "torch.jit.trace" in message and "torch.export" in message
    assert "fastresnet.fold_bn(model)" in message
    assert module_classes(fused) == before  # nothing was swapped on the way


def test_jit_script_of_the_folded_model():
    """What the refusal names works (resnet20: scripting a torchvision ResNet is torch's own business)."""
    _, x, expected = plain("resnet20")
    scripted = torch.jit.script(fastresnet.fold_bn(_converted("resnet20", "train")))
    with torch.no_grad():
        assert_equal(scripted(x), expected)


@pytest.mark.parametrize("name,mode", CELLS)
def test_jit_trace_records_the_plain_computation(name, mode):
    _, x, expected = plain(name)
    with torch.no_grad():
        traced = torch.jit.trace(_converted(name, mode), (x,), check_trace=False)
        assert not [node.kind() for node in traced.inlined_graph.nodes() if node.kind().startswith("fastresnet")]
        assert_equal(traced(x), expected)


# ---------------------------------------------------------------------------
# Converting again
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,mode", CELLS)
def test_converting_again_converts(name, mode):
    model, x, expected = plain(name)
    for other in MODES:
        again = fastresnet.convert(converted(name, mode), other)
        fused_blocks = [m for m in again.modules() if isinstance(m, (FusedBasicBlock, FusedBottleneck))]
        assert fused_blocks and {m.mode for m in fused_blocks} == {other}
        assert isinstance(again.conv1, folded_layers.FoldedConv2d) == (other != "bn_act")
        assert list(again.state_dict()) == list(model.state_dict())
        out, fused_ops = run_counting(again, x)
        assert_equal(out, expected)
        assert fused_ops == run_counting(_converted(name, other), x)[1]
    assert module_classes(fastresnet.unfuse(converted(name, mode))) == module_classes(model)
