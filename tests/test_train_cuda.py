"""The training program on a GPU: the CUDA speed paths run and learn (bench/gpu_check.sh runs these)."""

from __future__ import annotations

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
def test_compiled_bf16_channels_last_run_completes_on_the_gpu(tmp_path):
    # torch.compile (default mode) + bf16 + channels_last, the CUDA defaults; a short step-length run.
    result = train(gpu_config(tmp_path, unit="step", length=12, eval_every=0))
    assert result["status"] == "completed" and result["step"] == 12
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
               if r["kind"] == "train")
