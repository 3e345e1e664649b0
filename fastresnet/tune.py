"""`python -m fastresnet.tune`: make every measured choice of a training run ahead of time.

    python -m fastresnet.tune --model resnet50 --data.backend synthetic --data.batch_size 256 --amp bf16
    python -m fastresnet.tune [training flags] --export decisions.json   # then, on each identical machine:
    python -m fastresnet.tune --import decisions.json

The first call of each problem times its candidates (fastresnet.ops.tuning): on a GPU the fused-or-plain
choice under torch.compile, every fused block's path, every conv's implementation, tile and backward,
every BatchNorm stage. This command builds the run's model as the training program does, from the
training flags that shape a step (below; or a run's --recipe or --resume), and runs `--steps` training
steps and one evaluation batch on random data of the run's shape, with a line of progress per timed
candidate. The decisions land in the tuning cache (~/.cache/fastresnet, $FASTRESNET_CACHE_DIR), so the
run itself times nothing; they are printed as a table. `--export FILE` writes this machine's decisions
for its GPU and versions (a new file: one that exists is refused, as is a cache folder or an --export
path that cannot be written, before anything is tuned); `--import FILE` adds such a file's to the cache
here instead of tuning, refusing one made on another GPU or versions (with --export too, the cache is
then exported).
On a CPU the same tuner times the CPU's candidates: the training precision of --amp auto (where the CPU
has bf16 units), each conv's implementation in evaluation (with fused blocks); a plain fp32 model on a
CPU without bf16 units has nothing to choose, and the table is empty.
Exit status: 0 done, 2 a bad configuration or file, 3 out of memory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from fastresnet.errors import command, out_of_memory_exit
from fastresnet.ops import tuning
from fastresnet.outputs import new_file, writable_folder
from fastresnet.training import distributed, smoke
from fastresnet.training.cli import STEP_FIELDS, Command
from fastresnet.training.config import TrainConfig, validate
from fastresnet.training.fields import ConfigError
from fastresnet.training.loop import configure_cuda, evaluate_model, make_train_step, seed_everything
from fastresnet.training.model import amp_dtype, build_model, build_optimizer, example_batch, prepare_model


def add_options(parser) -> None:
    parser.add_argument("--steps", type=int, default=1, help="training steps to run (default: 1)")
    parser.add_argument("--export", default="", metavar="FILE",
                        help="write the decisions known here to FILE, a new file")
    parser.add_argument("--import", dest="import_", default="", metavar="FILE",
                        help="add FILE's decisions (made on a machine like this one) to the cache instead of tuning")


COMMAND = Command(
    prog="python -m fastresnet.tune", doc=__doc__, fields=STEP_FIELDS, add_options=add_options,
    usage="%(prog)s [--steps N] [--export FILE] [--import FILE] [--recipe NAME|FILE | --resume RUN_DIR] "
    "[--FIELD VALUE ...]",
    refusal="tuning times the steps of a run, not its schedule or its outputs")


def parse(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    args, invocation = COMMAND.invocation(argv)
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    validate(invocation.config)
    return invocation.config, args


def tune_run(cfg: TrainConfig, steps: int = 1, progress: tuning.TuningProgress | None = None) -> list[dict]:
    """Every choice a training run of `cfg` makes, made now: the model as prepare_model builds it, `steps`
    training steps and one evaluation batch on random images of the run's shape. Returns the decisions."""
    if distributed.launched_by_torchrun():
        raise ConfigError("tune in one process (start it with python, not torchrun): the decisions are per GPU")
    _, device = distributed.setup(cfg.device, cfg.dist_backend)
    configure_cuda(cfg, device)
    cfg = smoke.shrink(cfg)
    from fastresnet.data import build_loaders

    data = build_loaders(cfg.data, device=device, seed=cfg.seed)
    seed_everything(cfg.seed)
    tuning.show_progress(progress or tuning.TuningProgress())
    try:
        prepared = prepare_model(build_model(cfg, data.num_classes), cfg, device, data.image_size)
        amp = amp_dtype(cfg, device, data.image_size)
        optimizer = build_optimizer(prepared.module, cfg, device, lr=0.0)
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        step = make_train_step(prepared.runner, criterion, optimizer, amp, None)
        images = example_batch(cfg, device, data.image_size)
        labels = torch.zeros(images.shape[0], dtype=torch.long, device=device)
        for _ in range(steps):
            step(images, labels)
        evaluate_model(prepared.module, [(images, labels)], device, amp)
    finally:
        tuning.show_progress(None)
    return tuning.decisions()


def decisions_table(decisions: list[dict]) -> str:
    if not decisions:
        return ("no decision was timed (all were in the cache, or nothing here has more than one candidate: "
                "a plain fp32 model on a CPU without bf16 units)")
    lines = ["| op | problem | choice | candidates timed (ms) | source |", "|---|---|---|---|---|"]
    for d in decisions:
        times = ", ".join(f"{name} {ms:.3f}" for name, ms in sorted(d["times_ms"].items(), key=lambda kv: kv[1]))
        lines.append(f"| {d['op']} | {d['key']} | {d['choice']} | {times} | {d['source']} |")
    return "\n".join(lines)


def check_outputs(args: argparse.Namespace) -> None:
    """Before any tuning: the cache that the decisions go into, and --export's file, can be written."""
    named = os.environ.get(tuning.CACHE_DIR_ENV)
    writable_folder(tuning.cache_dir(), tuning.CACHE_DIR_ENV if named else f"the tuning cache ({tuning.CACHE_DIR_ENV})")
    if args.export:
        new_file(args.export, "--export")


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        cfg, args = parse(argv)
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              cfg.device if cfg.device != "auto" else "cpu")
        check_outputs(args)
        if args.import_:
            try:
                count = tuning.import_decisions(Path(args.import_), device)
            except ValueError as err:  # not such a file, or one for another GPU or versions
                raise ConfigError(str(err)) from err
            print(f"{count} decisions from {args.import_} added to {tuning.cache_dir()}")
        else:
            print(decisions_table(tune_run(cfg, args.steps)))
        if args.export:
            count = tuning.export_decisions(Path(args.export), device)
            print(f"{count} decisions for {tuning.environment_tag(device)['device']} written to {args.export}")
    except (RuntimeError, MemoryError) as err:
        return out_of_memory_exit(cfg, err)
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
