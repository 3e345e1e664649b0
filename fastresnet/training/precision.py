"""The training step's precision under --amp auto: bf16 where it is faster on this machine, else fp32.

On a GPU auto is bf16 autocast (tensor cores). On a CPU bf16 pays only with native bf16 matrix units:
a 2048^3 bf16 product ran 6.6x faster than fp32 on a Xeon with AMX-BF16, and a ResNet-20 training
step 13x slower on an AVX2 EPYC, where oneDNN emulates bf16. So on a CPU with AMX-BF16 or AVX512-BF16
(fastresnet.ops.onednn.bf16_units: the units oneDNN may use, which ONEDNN_MAX_CPU_ISA can hide) the
training step is timed both ways, and bf16 runs only where it wins: op "train_precision" of
fastresnet.ops.tuning, which keeps the choice in memory and in its disk cache, keyed by the CPU, so a
later run of the same setting measures nothing. A CPU without those units runs fp32 with nothing timed.

The timed step is the run's model (built anew from its config, the run's random stream untouched) on
up to TIMED_BATCH random images of the run's shape and memory format, forward and backward without an
optimizer step. FASTRESNET_DISPATCH=train_precision=fp32 (or =bf16, where the units exist) pins it;
--amp bf16 or --amp off skips all of this.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from fastresnet.ops import onednn, tuning
from fastresnet.training.fused_choice import training_step
from fastresnet.training.network import build_model

PRECISION = tuning.Op("train_precision", {"fp32": None, "bf16": lambda: onednn.bf16_units()})
# Images per timed step: enough to fill a CPU's cores, few enough that ResNet-50 at 224 times in seconds.
TIMED_BATCH = 32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass
class PrecisionChoice:
    amp: str  # "bf16", "fp16" or "off" (fp32)
    source: str  # "configured", "GPU default", "no bf16 units: <cpu>", "measured", "disk cache", "pinned ..."
    key: str = ""  # the tuning cache's key, where a choice was made
    times_ms: dict[str, float] = field(default_factory=dict)  # per training step, where timed

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.amp]

    def summary(self) -> str:
        times = ", ".join(f"{name} {ms:.1f} ms/step" for name, ms in sorted(self.times_ms.items()))
        return f"{self.amp} ({self.source}{': ' + times if times else ''})"

    def as_dict(self) -> dict:
        return asdict(self)


def choose_amp(cfg, device: torch.device, image_size: int) -> PrecisionChoice:
    """The autocast setting of a run of `cfg` on `device` with images of `image_size` pixels."""
    if cfg.amp != "auto":
        return PrecisionChoice(cfg.amp, "configured")
    if device.type == "cuda":
        return PrecisionChoice("bf16", "GPU default")
    if device.type != "cpu":
        return PrecisionChoice("off", f"{device.type} default")
    problem = (cfg.model, min(cfg.data.batch_size, TIMED_BATCH), image_size,
               "channels_last" if cfg.channels_last else "contiguous")
    name = PRECISION.choose(problem, device, "fp32", args=(), timed=_timed_steps(cfg, device, problem))
    amp = "bf16" if name == "bf16" else "off"
    key = PRECISION.key(problem)
    entry = tuning.decision(key)
    if entry is not None:
        choice = PrecisionChoice(amp, entry["source"], key, dict(entry["times_ms"]))
    elif tuning.settings().pin_for(PRECISION.name) in PRECISION.candidates:
        choice = PrecisionChoice(amp, "pinned by FASTRESNET_DISPATCH", key)
    elif not onednn.bf16_units():
        choice = PrecisionChoice(amp, f"no bf16 units: {onednn.describe_cpu()}", key)
    else:
        choice = PrecisionChoice(amp, "default", key)
    return choice


def _timed_steps(cfg, device: torch.device, problem: tuple):
    """timed(name) for the tuner: one training step of the run's model in that precision."""
    built: dict[str, object] = {}

    def setup():
        if not built:
            with torch.random.fork_rng(devices=[]):  # the run's initial weights stay what its seed makes
                torch.manual_seed(0)
                model = build_model(cfg, num_classes=10).to(device).train()
                fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
                model = model.to(memory_format=fmt)
                generator = torch.Generator(device=device).manual_seed(0)
                images = torch.randn(problem[1], 3, problem[2], problem[2], device=device, generator=generator)
            built.update(model=model, images=images.contiguous(memory_format=fmt))
        return built

    def timed(name: str):
        def run():
            b = setup()
            training_step(b["model"], b["images"], torch.bfloat16 if name == "bf16" else None)

        return run

    return timed
