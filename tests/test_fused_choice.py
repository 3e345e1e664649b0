"""fused_blocks="auto" under torch.compile: the measured whole-model choice (fastresnet.training.fused_choice).

On the CPU nothing can be timed or compiled quickly, so the dispatch is told it can measure,
torch.compile is replaced by a wrapper that records which model (fused or plain) each call
runs, and a fake timer runs every candidate's real training step once and returns made-up
times for the model it ran. tests/test_train_cuda.py runs the real thing on a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fastresnet.data import DataConfig
from fastresnet.models import get_model
from fastresnet.nn import FusedBasicBlock, FusedBottleneck
from fastresnet.ops import tuning
from fastresnet.testing import spawn_ranks
from fastresnet.training import TrainConfig
from fastresnet.training import model as model_prep

CPU = torch.device("cpu")
GPU = torch.device("cuda")


def fused_count(module: nn.Module) -> int:
    return sum(isinstance(m, (FusedBasicBlock, FusedBottleneck)) for m in module.modules())


class RecordingCompile(nn.Module):
    """Stands in for torch.compile(module): runs it and notes whether it was the fused or the plain model."""

    def __init__(self, module: nn.Module, runs: list[str], mode: str):
        super().__init__()
        self.module, self.runs, self.mode = module, runs, mode

    def forward(self, x):
        self.runs.append("fused" if fused_count(self.module) else "plain")
        return self.module(x)


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """Made-up step times per model kind; returns a record of compiles, timings and runs."""
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")  # the blocks' eager path: no interpreter
    monkeypatch.delenv("FASTRESNET_DISPATCH", raising=False)
    tuning.clear()
    record = {"times": {"fused": 2.0, "plain": 3.0}, "compiled": [], "timed": [], "runs": []}

    def fake_compile(module, mode):
        record["compiled"].append("fused" if fused_count(module) else "plain")
        return RecordingCompile(module, record["runs"], mode)

    def fake_elapsed_ms(fn, device):
        fn()  # the candidate's real training step (forward + backward), once
        ran = record["runs"][-1]
        record["timed"].append(ran)
        return record["times"][ran]

    monkeypatch.setattr(tuning, "can_measure", lambda device: True)
    monkeypatch.setitem(tuning.ROUNDS, "cpu", (0, 1))  # one timed call per candidate, no warm-up
    monkeypatch.setattr(tuning, "elapsed_ms", fake_elapsed_ms)
    monkeypatch.setattr(model_prep, "compile_module", fake_compile)
    real_plan = model_prep.fused_blocks_plan  # the plan a GPU would get
    monkeypatch.setattr(model_prep, "fused_blocks_plan", lambda cfg, device, mode: real_plan(cfg, GPU, mode))
    yield record
    tuning.clear()


def config(**changes) -> TrainConfig:
    base = dict(model="resnet20", data=DataConfig(backend="digits", batch_size=4), compile="default", amp="off")
    base.update(changes)
    return TrainConfig(**base)


def prepare(cfg: TrainConfig):
    torch.manual_seed(0)
    return model_prep.prepare_model(get_model(cfg.model, num_classes=10), cfg, CPU, 32)


@pytest.mark.parametrize("faster", ["fused", "plain"])
def test_auto_keeps_the_faster_compiled_model_and_records_why(fake_gpu, faster, caplog):
    fake_gpu["times"] = {"fused": 2.0, "plain": 3.0} if faster == "fused" else {"fused": 3.0, "plain": 2.0}
    with caplog.at_level("INFO", logger="fastresnet.training"):
        prepared = prepare(config())
    assert sorted(fake_gpu["timed"]) == ["fused", "plain"]  # both real steps ran and were timed
    assert (fused_count(prepared.module) > 0) == (faster == "fused")
    assert isinstance(prepared.runner, RecordingCompile) and prepared.runner.module is prepared.module
    assert prepared.runner.mode == "default" and sorted(fake_gpu["compiled"]) == ["fused", "plain"]
    choice = prepared.fused_choice
    assert choice.choice == faster and choice.source == "measured"
    assert choice.times_ms == fake_gpu["times"]
    assert prepared.fused_blocks.startswith(f"auto -> {faster} (measured")
    assert f"fused blocks auto -> {faster}" in caplog.text and "resnet20" in caplog.text
    (cache,) = tuning.cache_dir().glob("dispatch-*.json")
    stored = json.loads(cache.read_text())["decisions"][choice.key]
    assert stored["choice"] == faster and stored["times_ms"] == fake_gpu["times"]
    assert "4x3x32x32" in choice.key and "compile-default" in choice.key and "float32" in choice.key


def test_a_later_run_reads_the_choice_from_disk_and_compiles_only_the_winner(fake_gpu):
    first = prepare(config())
    tuning.clear()  # a new process
    fake_gpu.update(compiled=[], timed=[])
    again = prepare(config())
    assert fake_gpu["timed"] == [] and fake_gpu["compiled"] == ["fused"]
    assert again.fused_choice.choice == "fused" and again.fused_choice.source == "disk cache"
    assert again.fused_choice.key == first.fused_choice.key and fused_count(again.module) > 0
    fake_gpu["timed"].clear()
    other = prepare(config(compile="max-autotune"))  # another setting is another decision
    assert sorted(fake_gpu["timed"]) == ["fused", "plain"] and other.fused_choice.key != first.fused_choice.key


def test_timing_leaves_weights_statistics_and_gradients_as_they_were(fake_gpu):
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = model_prep.prepare_model(model, config(), CPU, 32)
    after = prepared.module.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name  # running stats restored, no optimizer step taken
    assert all(p.grad is None for p in prepared.module.parameters())
    # the fused model shares the plain model's tensors: the optimizer and checkpoints see one set of weights
    plain = dict(model.named_parameters())
    assert all(p is plain[name] for name, p in prepared.module.named_parameters())


@pytest.mark.parametrize("pin, expected, timed", [("train_step=plain", "plain", False),
                                                   ("train_step=fused", "fused", False), ("fixed", "plain", False),
                                                   ("train_step=fixed", "plain", False),
                                                   ("fused_block=triton", "fused", True)])
def test_dispatch_switch_pins_or_skips_the_timing(fake_gpu, monkeypatch, pin, expected, timed):
    # a pin of another op (a block's path) says nothing about this choice: it is measured
    monkeypatch.setenv("FASTRESNET_DISPATCH", pin)
    prepared = prepare(config())
    assert prepared.fused_choice.choice == expected and bool(fake_gpu["timed"]) == timed
    assert (fused_count(prepared.module) > 0) == (expected == "fused")


def test_a_failing_candidate_is_left_out(fake_gpu, monkeypatch):
    def broken_fuse(model, cfg, device, image_size):
        raise RuntimeError("inductor could not compile the fused blocks")

    monkeypatch.setattr(model_prep, "use_fused_blocks", broken_fuse)
    prepared = prepare(config())
    assert prepared.fused_choice.choice == "plain" and list(prepared.fused_choice.times_ms) == ["plain"]
    assert fused_count(prepared.module) == 0


@pytest.mark.parametrize("setting, device, compile_mode, plan", [
    ("auto", "cpu", "off", "off"), ("auto", "cpu", "default", "off"),  # a CPU: unchanged, never fused by auto
    ("auto", "cuda", "off", "on"),  # eager: each block's measured path is never slower than the plain block
    ("auto", "cuda", "default", "measure"), ("auto", "cuda", "reduce-overhead", "measure"),
    ("on", "cuda", "default", "on"), ("off", "cuda", "default", "off"), ("on", "cpu", "off", "on"),
])
def test_fused_blocks_plan(setting, device, compile_mode, plan):
    assert model_prep.fused_blocks_plan(config(fused_blocks=setting), torch.device(device), compile_mode) == plan


def test_cpu_auto_prepares_the_plain_model_without_timing(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    prepared = prepare(config(compile="off"))
    assert prepared.fused_blocks == "off" and prepared.fused_choice is None and fused_count(prepared.module) == 0
    assert prepared.runner is prepared.module and not list(tmp_path.iterdir())


def _rank_worker(rank: int, port: int, out: str) -> None:
    """One torchrun-like rank: rank 0 times fused as faster, rank 1 plain; both must run rank 0's choice."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), FASTRESNET_CACHE_DIR=f"{out}/cache{rank}", FASTRESNET_FORCE_REFERENCE="1")
    torch.set_num_threads(1)
    from fastresnet.training import distributed

    times = {"fused": 1.0, "plain": 2.0} if rank == 0 else {"fused": 2.0, "plain": 1.0}
    runs: list[str] = []

    def fake_elapsed_ms(fn, device):
        fn()
        return times[runs[-1]]

    tuning.can_measure = lambda device: True
    tuning.ROUNDS["cpu"] = (0, 1)
    tuning.elapsed_ms = fake_elapsed_ms
    model_prep.compile_module = lambda module, mode: RecordingCompile(module, runs, mode)
    distributed.setup("cpu", "gloo")
    try:
        torch.manual_seed(0)
        module, _, choice = model_prep.measure_fused_or_plain(get_model("resnet20", num_classes=10), config(), CPU,
                                                              32, "default")
        torch.save({"choice": choice.choice, "source": choice.source, "fused": fused_count(module)},
                   f"{out}/rank{rank}.pt")
    finally:
        distributed.teardown()


def test_every_rank_runs_rank_0s_choice(tmp_path):
    spawn_ranks(_rank_worker, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["choice"] == rank1["choice"] == "fused" and rank0["fused"] > 0 and rank1["fused"] > 0
    assert rank0["source"] == "measured" and rank1["source"].startswith("rank 0 (this rank measured plain")
