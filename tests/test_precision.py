"""--amp auto (fastresnet.training.precision): bf16 on a CPU only where a timed training step wins, fp32 on a
CPU without bf16 units with nothing timed, the choice cached and reported; and one bf16 training step
against an fp32 one."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastresnet.data import DataConfig
from fastresnet.models import get_model
from fastresnet.ops import onednn, tuning
from fastresnet.training import TrainConfig
from fastresnet.training import precision as prec

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def _config(amp="auto", batch=8):
    return TrainConfig(model="resnet20", amp=amp, data=DataConfig(backend="synthetic", batch_size=batch))


@pytest.fixture
def cpu_measures(tmp_path, monkeypatch):
    """A CPU as users have it (no interpreter), a fresh cache; `times` are made up per precision and
    each timed call really runs its training step once."""
    times = {"fp32": 2.0, "bf16": 1.0}
    ran = []
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(tuning.ROUNDS, "cpu", (0, 1))

    def fake_measure(candidates, device):
        for name, fn in candidates.items():
            fn()
            ran.append(name)
        return {name: times[name] for name in candidates}

    monkeypatch.setattr(tuning, "measure", fake_measure)
    tuning.clear()
    yield times, ran
    tuning.clear()


def test_a_cpu_without_bf16_units_runs_fp32_and_times_nothing():
    """ONEDNN_MAX_CPU_ISA=AVX2 hides AMX and AVX512-BF16 from oneDNN (on an AVX2 CPU there are none):
    auto is fp32 without a measurement, and says why."""
    code = ("import torch\n"
            "from fastresnet.data import DataConfig\n"
            "from fastresnet.ops import tuning\n"
            "from fastresnet.training import TrainConfig\n"
            "from fastresnet.training.precision import choose_amp\n"
            "cfg = TrainConfig(model='resnet20', data=DataConfig(backend='synthetic', batch_size=8))\n"
            "choice = choose_amp(cfg, torch.device('cpu'), 32)\n"
            "print(choice.amp, '|', choice.source, '|', len(tuning.decisions()))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    amp, source, timed = (part.strip() for part in result.stdout.strip().split("|"))
    assert amp == "off" and source.startswith("no bf16 units:") and "oneDNN<=AVX2" in source and timed == "0"


@pytest.mark.parametrize("bf16_wins", [True, False])
def test_with_bf16_units_the_faster_step_wins_and_is_cached(cpu_measures, monkeypatch, bf16_wins):
    times, ran = cpu_measures
    times.update(fp32=2.0, bf16=1.0) if bf16_wins else times.update(fp32=1.0, bf16=3.0)
    monkeypatch.setattr(onednn, "bf16_units", lambda: True)
    state = torch.random.get_rng_state()
    choice = prec.choose_amp(_config(), CPU, 32)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random stream is untouched
    assert choice.amp == ("bf16" if bf16_wins else "off") and choice.source == "measured"
    assert choice.times_ms == {"fp32": times["fp32"], "bf16": times["bf16"]} and sorted(ran) == ["bf16", "fp32"]
    assert choice.key == "train_precision:resnet20:8:32:channels_last"
    assert any(d["op"] == "train_precision" for d in tuning.decisions())

    tuning.clear()  # a later run: from the disk cache, nothing timed
    again = prec.choose_amp(_config(), CPU, 32)
    assert (again.amp, again.source) == (choice.amp, "disk cache") and len(ran) == 2


def test_configured_and_gpu_settings_time_nothing(cpu_measures):
    _, ran = cpu_measures
    assert prec.choose_amp(_config("bf16"), CPU, 32).summary() == "bf16 (configured)"
    assert prec.choose_amp(_config("off"), CPU, 32).dtype is None
    assert prec.choose_amp(_config(), torch.device("cuda"), 32).amp == "bf16"
    assert not ran


def test_a_pin_decides_without_timing(cpu_measures, monkeypatch):
    _, ran = cpu_measures
    monkeypatch.setattr(onednn, "bf16_units", lambda: True)
    tuning.override("train_precision=fp32")
    choice = prec.choose_amp(_config(), CPU, 32)
    assert (choice.amp, choice.source) == ("off", "pinned by FASTRESNET_DISPATCH") and not ran


def test_one_bf16_training_step_matches_an_fp32_step():
    """ResNet-20, one SGD step from the same weights on the same 8 images: bf16 autocast's loss within 1%
    of fp32's, its gradient within 0.98 cosine similarity and 20% relative norm of fp32's (bf16 keeps 8
    significant bits; the gradient passes 19 convs), and the updated weights as close."""
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10).to(memory_format=torch.channels_last)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (8,))

    def step(bf16: bool):
        net = copy.deepcopy(model)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in net.parameters()])
        optimizer.step()
        return loss.item(), grad, torch.cat([p.detach().flatten() for p in net.parameters()])

    loss32, grad32, weights32 = step(False)
    loss16, grad16, weights16 = step(True)
    assert abs(loss16 - loss32) <= 1e-2 * abs(loss32)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) >= 0.98
    assert (grad16 - grad32).norm() <= 0.2 * grad32.norm()
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (weights16 - weights32).norm() <= 0.2 * (weights32 - start).norm()

