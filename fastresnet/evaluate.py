"""`python -m fastresnet.evaluate --checkpoint RUN_DIR|checkpoint.pt`: top-1 / top-5 of a trained model.

The model and data settings come from the checkpoint's saved config; any training flag overrides
them, e.g. the dataset location or 10-crop testing (the paper's standard):

    python -m fastresnet.evaluate --checkpoint runs/resnet50-dali-... --data.root /data/imagenet --data.ten_crop true

Single centre crop by default (data.ten_crop false). Prints one line and, with --output, writes JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from fastresnet.data import build_loaders
from fastresnet.training import distributed
from fastresnet.errors import command
from fastresnet.outputs import new_file
from fastresnet.training.checkpoint import load_checkpoint, load_weights
from fastresnet.training.cli import _normalize_flags, build_parser
from fastresnet.training.config import TrainConfig, saved_values, validate
from fastresnet.training.fields import ConfigError, apply_flat, flat_fields, unknown_name_error
from fastresnet.training.loop import evaluate_model
from fastresnet.training.model import amp_dtype, build_model

NEEDS = ("model", "config", "step")  # what evaluation reads of a checkpoint


def parse(argv: list[str]) -> tuple[Path, TrainConfig, Path | None]:
    parser = build_parser(prog="python -m fastresnet.evaluate")
    parser.add_argument("--checkpoint", required=True, help="a run directory or its checkpoint.pt")
    parser.add_argument("--output", default="", help="write the results as JSON here (a new file)")
    args, unknown = parser.parse_known_args(_normalize_flags(argv))
    if unknown:
        raise unknown_name_error(unknown[0].lstrip("-").partition("=")[0], flat_fields(TrainConfig))
    if args.recipe or args.resume:
        raise ConfigError("evaluate takes --checkpoint, not --recipe or --resume")
    checkpoint = Path(args.checkpoint)
    state = load_checkpoint(checkpoint, needs=NEEDS)
    cfg = apply_flat(TrainConfig(), saved_values(state["config"]), f"{checkpoint} (saved config)")
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("recipe", "resume", "checkpoint", "output")}
    cfg = apply_flat(cfg, given, "command line")
    validate(cfg)
    output = new_file(args.output, "--output") if args.output else None
    return checkpoint, cfg, output


def evaluate_checkpoint(checkpoint: Path, cfg: TrainConfig) -> dict:
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
    result = evaluate_model(model, data.val, device, amp_dtype(cfg, device, data.image_size), cfg.channels_last)
    result.update(crops=data.val.crops, model=cfg.model, backend=data.backend, checkpoint=str(checkpoint),
                  step=state["step"], skipped_files=data.val.skipped)
    return result


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        checkpoint, cfg, output = parse(argv)
        result = evaluate_checkpoint(checkpoint, cfg)
    finally:
        distributed.teardown()
    if distributed.launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        return 0
    crops = f"{result['crops']}-crop" if result["crops"] > 1 else "centre crop"
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
