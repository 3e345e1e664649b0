"""`python -m fastresnet.evaluate --checkpoint RUN_DIR|checkpoint.pt`: top-1 / top-5 of a trained model.

The model and data settings come from the checkpoint's saved config; the flags below override the
ones evaluation reads, e.g. the dataset location or 10-crop testing (the paper's standard, on the
ImageFolder back ends):

    python -m fastresnet.evaluate --checkpoint runs/resnet50-dali-... --data.root /data/imagenet --data.ten_crop true

Single centre crop by default (data.ten_crop false). `--bn_batches N` first recomputes BatchNorm's
running statistics from N training batches (train-mode forward passes, each batch weighted equally):
a test error that falls with it came from the running statistics, not from the weights.
Prints one line and, with --output, writes JSON.
Exit status: 0 done, 2 a mistake in the input (a flag, a checkpoint, a dataset), told in one line.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import torch

from fastresnet.data import build_loaders
from fastresnet.training import distributed, smoke
from fastresnet.errors import ConfigError, command
from fastresnet.outputs import new_file
from fastresnet.training.checkpoint import load_checkpoint, load_weights
from fastresnet.training.cli import DATA_FIELDS, TRAIN_ONLY_DATA_FIELDS, Command
from fastresnet.training.config import TrainConfig, saved_values, validate
from fastresnet.training.fields import apply_flat
from fastresnet.training.loop import evaluate_model
from fastresnet.training.model import amp_autocast, amp_dtype, build_model

NEEDS = ("model", "config", "step")  # what evaluation reads of a checkpoint


def add_options(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="RUN_DIR|FILE",
                        help="a run directory or its checkpoint.pt")
    parser.add_argument("--output", default="", metavar="FILE", help="write the results as JSON here (a new file)")
    parser.add_argument("--bn_batches", type=int, default=0, metavar="N",
                        help="recompute BatchNorm's running statistics from N training batches before testing")


COMMAND = Command(
    prog="python -m fastresnet.evaluate", doc=__doc__, add_options=add_options, run_config=False,
    usage="%(prog)s --checkpoint RUN_DIR|FILE [--output FILE] [--bn_batches N] [--FIELD VALUE ...]",
    fields=(*(name for name in DATA_FIELDS if name not in TRAIN_ONLY_DATA_FIELDS),
            "device", "amp", "channels_last", "dist_backend"),
    defaults_from="the checkpoint's",
    refusal="the model and its training come from the checkpoint",
    hints={name: "evaluate takes --checkpoint, not --recipe or --resume" for name in ("recipe", "resume")})


def parse(argv: list[str]) -> tuple[Path, TrainConfig, Path | None, int]:
    args, given = COMMAND.parse(argv)
    if args.bn_batches < 0:
        raise ConfigError(f"--bn_batches {args.bn_batches}: give a number of training batches, 1 or more")
    checkpoint = Path(args.checkpoint)
    state = load_checkpoint(checkpoint, needs=NEEDS)
    cfg = apply_flat(TrainConfig(), saved_values(state["config"]), f"{checkpoint} (saved config)")
    cfg = apply_flat(cfg, given, "command line")
    validate(cfg)
    cfg = smoke.shrink(cfg)
    output = new_file(args.output, "--output") if args.output else None
    return checkpoint, cfg, output, args.bn_batches


def evaluate_checkpoint(checkpoint: Path, cfg: TrainConfig, bn_batches: int = 0) -> dict:
    info, device = distributed.setup(cfg.device, cfg.dist_backend)
    state = load_checkpoint(checkpoint, needs=NEEDS)
    try:
        data = build_loaders(cfg.data, device=device, rank=info.rank, world_size=info.world_size, seed=cfg.seed)
    except (ValueError, FileNotFoundError) as err:  # a dataset folder that moved, a class count
        raise ConfigError(f"cannot evaluate on --data.root {cfg.data.root}: {err}") from err
    model = build_model(cfg, data.num_classes)
    load_weights(model, state, checkpoint, f"{cfg.model} with {data.num_classes} classes")
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = amp_dtype(cfg, device, data.image_size)
    if bn_batches:
        recompute_batchnorm_statistics(model, data.train, bn_batches, amp, cfg)
    result = evaluate_model(model, data.val, device, amp, cfg.channels_last)
    result.update(crops=data.val.crops, model=cfg.model, backend=data.backend, checkpoint=str(checkpoint),
                  step=state["step"], skipped_files=data.val.skipped, bn_batches=bn_batches)
    return result


def recompute_batchnorm_statistics(model: torch.nn.Module, train_loader, batches: int, amp, cfg: TrainConfig) -> None:
    """Replace every BatchNorm's running mean and variance by their average over the first `batches`
    training batches of epoch 0 (augmented as in training, drawn with the run's seed)."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(f"--bn_batches: {cfg.model} has no BatchNorm layers whose statistics could be recomputed")
    if batches > len(train_loader):
        raise ConfigError(f"--bn_batches {batches}: the training set has {len(train_loader)} batches "
                          f"of {cfg.data.batch_size}")
    torch.manual_seed(cfg.seed)
    train_loader.set_epoch(0)
    with amp_autocast(next(model.parameters()).device.type, amp):
        torch.optim.swa_utils.update_bn(itertools.islice(train_loader, batches), model)
    distributed.average_buffers(model)  # under torchrun each rank drew its own shard's batches


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        checkpoint, cfg, output, bn_batches = parse(argv)
        result = evaluate_checkpoint(checkpoint, cfg, bn_batches)
    finally:
        distributed.teardown()
    if distributed.launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        return 0
    crops = f"{result['crops']}-crop" if result["crops"] > 1 else "centre crop"
    if bn_batches:
        crops += f", BatchNorm statistics from {bn_batches} training batches"
    print(f"{result['model']} at step {result['step']} on {result['backend']} ({result['images']} images, {crops}): "
          f"top-1 {result['top1']:.2f}% (error {result['top1_error']:.2f}%), "
          f"top-5 {result['top5']:.2f}% (error {result['top5_error']:.2f}%), loss {result['loss']:.4f}")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
