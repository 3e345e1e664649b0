"""The training program on a GPU: the CUDA speed paths run and learn (bench/gpu_check.sh runs these)."""

from __future__ import annotations

import json

import pytest
import torch

from fastresnet.data import DataConfig
from fastresnet.training import TrainConfig, train
from fastresnet.training.metrics import read_jsonl


def gpu_config(tmp_path, **changes) -> TrainConfig:
    base = dict(data=DataConfig(backend="digits", batch_size=128), out_dir=str(tmp_path), run_name="run",
                progress="lines", plot=False, device="cuda", log_every=5)
    base.update(changes)
    return TrainConfig(**base)


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_eager_amp_with_fused_sgd_learns_digits(tmp_path, amp):
    # fp16 adds the GradScaler; fused SGD is the CUDA default. No compile: seconds.
    result = train(gpu_config(tmp_path, amp=amp, compile="off", length=8))
    assert result["status"] == "completed" and result["test_top1"] >= 90.0, result
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert records[-1]["memory_gib"] > 0 and records[-1]["images_per_s"] > 0


@pytest.mark.cuda
def test_compiled_fused_bf16_channels_last_run_completes_on_the_gpu(tmp_path):
    # torch.compile (default mode) + bf16 + channels_last, the CUDA defaults, with the fused blocks forced
    # on (auto would time them against plain blocks: the test below); a short step-length run.
    result = train(gpu_config(tmp_path, unit="step", length=12, eval_every=0, fused_blocks="on"))
    assert result["status"] == "completed" and result["step"] == 12
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
               if r["kind"] == "train")


@pytest.mark.cuda
def test_auto_times_fused_against_plain_under_cuda_graphs_and_caches_the_choice(tmp_path, monkeypatch):
    # fused_blocks=auto + compile reduce-overhead (CUDA graphs): both candidates are compiled and timed;
    # a "fused" time proves the fused blocks' custom ops ran captured in CUDA graphs (a candidate that
    # raises is left out). Then a new process reads the choice from disk without timing anything.
    from torch._dynamo.utils import counters

    from fastresnet.models import get_model
    from fastresnet.ops import tuning
    from fastresnet.training.model import prepare_model

    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTRESNET_DISPATCH", raising=False)
    tuning.clear()
    counters.clear()
    cfg = gpu_config(tmp_path, compile="reduce-overhead", unit="step", length=6, eval_every=0)
    result = train(cfg)
    assert result["status"] == "completed" and result["step"] == 6
    speed = json.loads((tmp_path / "run" / "env.json").read_text())["speed"]
    choice = speed["fused_choice"]
    assert choice["source"] == "measured" and set(choice["times_ms"]) == {"fused", "plain"}, choice
    assert speed["fused_blocks"].startswith(f"auto -> {choice['choice']}")
    skips = dict(counters["inductor"])  # cudagraph_skips counts graphs that fell back to no CUDA graph
    assert skips.get("cudagraph_skips", 0) == 0, (
        f"torch.compile fell back to running without CUDA graphs (TORCH_LOGS=perf_hints says why): {skips}")

    tuning.clear()  # a new process: the disk cache answers
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: pytest.fail("measured again despite the cache"))
    device = torch.device("cuda")
    again = prepare_model(get_model("resnet20", num_classes=10), cfg, device, 32)
    assert again.fused_choice.choice == choice["choice"] and again.fused_choice.source == "disk cache"
    tuning.clear()
