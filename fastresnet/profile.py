"""`python -m fastresnet.profile`: where a training (or inference) step's time goes.

    python -m fastresnet.profile                                     # ResNet-20 on digits, on this machine
    python -m fastresnet.profile --model resnet50 --data.backend synthetic --data.batch_size 256 --amp bf16 \\
        --providers torchvision,torchvision+compile,fastresnet --steps 5
    python -m fastresnet.train --profile 5 [training flags]          # the same, for the training run's config

The step is built as the training program builds it, from the training flags that shape a step
(below: model, data, optimizer, amp, channels_last, compile, fused blocks; or a run's --recipe or
--resume), once per provider (fastresnet.profiling.providers). After `--warmup_steps` unprofiled
steps, `--steps` steps run under torch.profiler. Written to `--out`, a new or empty folder (default: a
new run directory under --out_dir; a folder that holds files is refused before anything runs, so that
no profile is overwritten): profile.md (a table per provider: time, share, FLOPs, bytes and the
distance from the floor the measured ceilings set), profile.png (a stacked bar per provider),
profile.json, and per provider <provider>/trace.json (open it in ui.perfetto.dev or
chrome://tracing) and <provider>/kernels.tsv.
Exit status as `fastresnet.train`: 2 bad configuration, 3 out of memory.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fastresnet.data import build_loaders
from fastresnet.errors import command, out_of_memory_exit
from fastresnet.flops import count_macs
from fastresnet.outputs import writable_folder
from fastresnet.profiling import categories as cat
from fastresnet.profiling import ceilings, report
from fastresnet.profiling.capture import capture
from fastresnet.profiling.providers import MODES, PROVIDERS, build_subject, endless_batches, parse_providers
from fastresnet.profiling.work import Work
from fastresnet.training import distributed
from fastresnet.training.cli import STEP_FIELDS, Command
from fastresnet.training import smoke
from fastresnet.training.config import TrainConfig, validate
from fastresnet.training.fields import ConfigError
from fastresnet.training.loop import configure_cuda, seed_everything
from fastresnet.training.model import amp_dtype, build_model
from fastresnet.training.rundir import create_run_dir, environment


@dataclass
class ProfileOptions:
    providers: tuple[str, ...] = ("fastresnet",)
    mode: str = "train"  # "train": the whole training step; "inference": the forward pass in eval mode
    steps: int = 5  # profiled steps
    warmup_steps: int = 3  # unprofiled steps before (compilation, autotuning, first-call measurements)
    out: str = ""  # output folder; "" = <run directory>/profile
    ceilings: bool = True  # measure copy bandwidth and matrix rate in this process


def add_options(parser) -> None:
    parser.add_argument("--providers", default="fastresnet",
                        help=f"comma-separated, one bar each: {', '.join(PROVIDERS)} (default: fastresnet)")
    parser.add_argument("--mode", default="train", choices=MODES, help="the training step or inference (default: train)")
    parser.add_argument("--steps", type=int, default=5, metavar="N", help="profiled steps (default: 5)")
    parser.add_argument("--warmup_steps", type=int, default=3, metavar="N",
                        help="unprofiled steps first: compilation, autotuning, first-call measurements (default: 3)")
    parser.add_argument("--out", default="", metavar="DIR",
                        help="output folder, new or empty (default: profile/ in a new run directory under --out_dir)")
    parser.add_argument("--no_ceilings", action="store_true", help="do not measure copy bandwidth and matrix rate")


COMMAND = Command(
    prog="python -m fastresnet.profile", doc=__doc__, fields=(*STEP_FIELDS, "out_dir", "run_name"),
    add_options=add_options,
    usage="%(prog)s [--providers P,...] [--mode M] [--steps N] [--warmup_steps N] [--out DIR] [--no_ceilings] "
    "[--recipe NAME|FILE | --resume RUN_DIR] [--FIELD VALUE ...]",
    refusal="the profile times steps; it runs no schedule, evaluation or checkpoints",
    hints={"profile": "that belongs to python -m fastresnet.train; here the count is --steps",
           "warmup": "that is training's learning-rate warm-up; the profile's unprofiled steps are --warmup_steps"})


def parse(argv: list[str]) -> tuple[TrainConfig, ProfileOptions, Path | None]:
    args, invocation = COMMAND.invocation(argv)
    if args.steps < 1 or args.warmup_steps < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup_steps >= 0, got --steps {args.steps} "
                          f"--warmup_steps {args.warmup_steps}")
    validate(invocation.config)  # before a run directory is made for it
    options = ProfileOptions(providers=tuple(parse_providers(args.providers)), mode=args.mode, steps=args.steps,
                             warmup_steps=args.warmup_steps, out=args.out, ceilings=not args.no_ceilings)
    return invocation.config, options, invocation.resume


def output_dir(cfg: TrainConfig, options: ProfileOptions, resume: Path | None) -> Path:
    """Where the profile goes, checked before anything runs: --out, or the profile/ folder of the resumed
    run or of a new run directory. A folder that holds files is refused, as train refuses a run directory
    that exists: a profile never overwrites another."""
    if options.out:
        return writable_folder(options.out, "--out", empty=True)
    if resume is not None:
        return writable_folder(resume / "profile", f"--resume {resume}: its profile folder", empty=True)
    return create_run_dir(cfg) / "profile"


def run_profile(cfg: TrainConfig, options: ProfileOptions, out_dir: Path, command: str = "") -> dict[str, Path]:
    """Profile each provider's step; write the outputs; return what was written (name -> path)."""
    validate(cfg)
    if smoke.on():
        cfg = smoke.shrink(cfg)
        options = replace(options, steps=min(options.steps, smoke.STEPS),
                          warmup_steps=min(options.warmup_steps, smoke.STEPS))
        print(smoke.note(f"profile of {options.steps} step(s) after {options.warmup_steps}, batch "
                         f"{cfg.data.batch_size}"), flush=True)
    if distributed.launched_by_torchrun():
        raise ConfigError("the profile runs in one process: start it with python, not torchrun")
    _, device = distributed.setup(cfg.device, cfg.dist_backend)
    configure_cuda(cfg, device)
    data = build_loaders(cfg.data, device=device, seed=cfg.seed)
    batches = endless_batches(data.train)
    macs = count_macs(build_model(cfg, data.num_classes), (3, data.image_size, data.image_size))
    passes = 3 if options.mode == "train" else 1
    run = report.ProfileRun(
        title=f"{cfg.model} {'training step' if options.mode == 'train' else 'inference'}, batch {cfg.data.batch_size}",
        command=command, device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        mode=options.mode, batch_size=cfg.data.batch_size, steps=options.steps, warmup=options.warmup_steps,
        step_flops=passes * 2.0 * macs * cfg.data.batch_size,
        ceilings=ceilings.measure(device, amp_dtype(cfg, device, data.image_size)) if options.ceilings else None,
        environment=_versions(device))
    for provider in options.providers:
        seed_everything(cfg.seed)
        subject = build_subject(provider, options.mode, cfg, device, data.num_classes, data.image_size)
        trace = out_dir / provider / "trace.json"
        result = capture(subject, batches, device, options.steps, options.warmup_steps, trace)
        if options.mode == "train" and result.time_ms.get(cat.OPTIMIZER):
            result.work[cat.OPTIMIZER] = Work(bytes=subject.optimizer_bytes)
        run.results.append(report.ProviderResult(provider, subject.description, result, trace))
        print(f"{provider}: {result.step_ms:,.3f} ms/step ({subject.description})", flush=True)
        for warning in report.warnings(result):
            print(f"{provider}: {warning}", file=sys.stderr)
        del subject
        if device.type == "cuda":
            torch.cuda.empty_cache()
    written = report.write_outputs(run, out_dir)
    print(f"outputs in {out_dir}: {', '.join(written)}, and per provider trace.json and kernels.tsv")
    return written


def _versions(device: torch.device) -> dict:
    env = environment(device, 1)
    keys = ("fastresnet", "git_revision", "torch", "cuda", "cudnn", "triton", "torchvision")
    return {k: env[k] for k in keys if env.get(k) is not None}


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        cfg, options, resume = parse(argv)
        out_dir = output_dir(cfg, options, resume)
        run_profile(cfg, options, out_dir, command=shlex.join(["python", "-m", "fastresnet.profile", *argv]))
    except (RuntimeError, MemoryError) as err:
        return out_of_memory_exit(cfg, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
