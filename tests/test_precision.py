"""--amp auto (fastresnet.training.precision): bf16 on a CPU only where a timed training step wins, fp32 on a
CPU without bf16 units with nothing timed, the choice cached and reported; and one bf16 training step
against an fp32 one."""

import copy

import pytest
import torch

from fastresnet.data import DataConfig
from fastresnet.models import get_model
from fastresnet.ops import onednn, tuning
from fastresnet.training import TrainConfig
from fastresnet.training import precision as prec
from fastresnet.training.loop import make_train_step
from fastresnet.training.model import build_optimizer, prepare_model

CPU = torch.device("cpu")


def _config(amp="auto", batch=2):
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


def test_a_cpu_without_bf16_units_runs_fp32_and_times_nothing(cpu_measures, monkeypatch):
    """A CPU made to report AMX tiles times both precisions; the same CPU with oneDNN limited to AVX2
    (ONEDNN_MAX_CPU_ISA, which hides AMX and AVX512-BF16 from oneDNN) runs fp32 without a measurement, and
    says why. (This AVX2 CPU has no bf16 units of its own: hence the pretended AMX.)"""
    _, ran = cpu_measures
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert prec.choose_amp(_config(), CPU, 16).source == "measured" and sorted(ran) == ["bf16", "fp32"]

    ran.clear()
    tuning.clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    choice = prec.choose_amp(_config(), CPU, 16)
    assert choice.amp == "off" and choice.source.startswith("no bf16 units:") and "oneDNN<=AVX2" in choice.source
    assert not ran and not tuning.decisions()


@pytest.mark.parametrize("bf16_wins", [True, False])
def test_with_bf16_units_the_faster_step_wins_and_is_cached(cpu_measures, monkeypatch, bf16_wins):
    times, ran = cpu_measures
    times.update(fp32=2.0, bf16=1.0) if bf16_wins else times.update(fp32=1.0, bf16=3.0)
    monkeypatch.setattr(onednn, "bf16_units", lambda: True)
    state = torch.random.get_rng_state()
    choice = prec.choose_amp(_config(), CPU, 16)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random stream is untouched
    assert choice.amp == ("bf16" if bf16_wins else "off") and choice.source == "measured"
    assert choice.times_ms == {"fp32": times["fp32"], "bf16": times["bf16"]} and sorted(ran) == ["bf16", "fp32"]
    assert choice.key == "train_precision:resnet20:2:16:channels_last"
    assert any(d["op"] == "train_precision" for d in tuning.decisions())

    tuning.clear()  # a later run: from the disk cache, nothing timed
    again = prec.choose_amp(_config(), CPU, 16)
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
    choice = prec.choose_amp(_config(), CPU, 16)
    assert (choice.amp, choice.source) == ("off", "pinned by FASTRESNET_DISPATCH") and not ran


def test_one_bf16_training_step_matches_an_fp32_step():
    """The training program's own step (prepare_model, build_optimizer, make_train_step) with --amp bf16 against
    --amp off on a CPU: ResNet-20, one SGD step from the same weights on the same images. bf16 autocast's loss
    within 2% of fp32's, and the weights' update (the gradient, scaled) within 0.98 cosine similarity and 20%
    relative norm of fp32's: bf16 keeps 8 significant bits and the gradient passes 19 convs. (A 3-epoch
    accuracy comparison needs a CPU with bf16 units: on this AVX2 one bf16 is emulated, many times slower.)"""
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (8,))
    start = torch.cat([p.detach().flatten() for p in model.parameters()])

    def step(amp: str):
        cfg = TrainConfig(model="resnet20", amp=amp, data=DataConfig(backend="synthetic", batch_size=8))
        prepared = prepare_model(copy.deepcopy(model), cfg, CPU, 32)
        optimizer = build_optimizer(prepared.module, cfg, CPU, lr=0.1)
        train_step = make_train_step(prepared.runner, torch.nn.CrossEntropyLoss(), optimizer,
                                     prec.choose_amp(cfg, CPU, 32).dtype, None)
        loss, logits = train_step(images, labels)
        assert logits.dtype == (torch.bfloat16 if amp == "bf16" else torch.float32)
        return loss.item(), torch.cat([p.detach().flatten() for p in prepared.module.parameters()]) - start

    loss32, update32 = step("off")
    loss16, update16 = step("bf16")
    assert abs(loss16 - loss32) <= 2e-2 * abs(loss32)
    assert torch.nn.functional.cosine_similarity(update16, update32, dim=0) >= 0.98
    assert (update16 - update32).norm() <= 0.2 * update32.norm()
