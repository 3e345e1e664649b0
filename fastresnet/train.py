"""`python -m fastresnet.train`: train any model of the zoo on any data back end.

    python -m fastresnet.train                                   # ResNet-20 on digits (below)
    python -m fastresnet.train --recipe paper-cifar --model resnet110 --data.root ~/data/cifar-10-batches-py
    torchrun --nproc_per_node=8 -m fastresnet.train --recipe fast-imagenet --data.root /data/imagenet
    python -m fastresnet.train --resume runs/resnet20-digits-20260101-120000
    python -m fastresnet.train --profile 5 --model resnet50 --data.backend synthetic   # where the step's time goes

With no flags: ResNet-20 on scikit-learn's bundled digits, 165 steps to about 99% test accuracy (49 s
on an idle 2-core CPU; 15 minutes on one shared with other work). Every TrainConfig field is a flag,
listed below with its units. Exit status: 0 done (or stopped cleanly by SIGTERM/SIGINT, checkpoint
saved), 2 a mistake in the input, told in one line (a flag or value, a bad dataset file, an unreadable
checkpoint, a run directory that exists, a full disk), 3 out of memory, 4 non-finite loss.
"""

from __future__ import annotations

import sys

import torch

from fastresnet.errors import command
from fastresnet.training import distributed
from fastresnet.training.cli import Command, parse_invocation
from fastresnet.training.config import TrainConfig, validate
from fastresnet.training.fields import flat_fields
from fastresnet.training.loop import NonFiniteLoss, train

EXIT_OOM, EXIT_NONFINITE = 3, 4  # 2: a user error (fastresnet.errors): a flag, a file, the disk


def add_options(parser) -> None:
    parser.add_argument("--profile", type=int, default=None, metavar="N",
                        help="profile N training steps instead of training: profile.md, profile.png and traces in the "
                        "run directory's profile/ (python -m fastresnet.profile has more options)")


COMMAND = Command(
    prog="python -m fastresnet.train", doc=__doc__, fields=tuple(flat_fields(TrainConfig)), add_options=add_options,
    usage="%(prog)s [--recipe NAME|FILE | --resume RUN_DIR] [--profile N] [--FIELD VALUE ...]")


def out_of_memory_advice(cfg: TrainConfig, err: BaseException) -> str:
    device = "GPU" if torch.cuda.is_available() and cfg.device != "cpu" else "host"
    batch = cfg.data.batch_size
    lines = [
        f"out of {device} memory training {cfg.model} at {batch} images per process "
        f"(amp {cfg.amp}, compile {cfg.compile}, image size {cfg.data.image_size}).",
        "To fit, change one of:",
        f"  --data.batch_size {max(1, batch // 2)}   (set --base_batch_size to the recipe's batch so the lr scales with it)",
        "  --amp bf16                 (half the activation memory of fp32)",
        "  a smaller --model or --data.image_size, or more GPUs with torchrun (the batch is per GPU)",
    ]
    if device == "GPU":
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        peak = torch.cuda.max_memory_allocated() / 2**30
        lines.insert(1, f"The GPU has {total:.1f} GiB; torch had allocated up to {peak:.1f} GiB.")
    lines.append(f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
    return "\n".join(lines)


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def out_of_memory_exit(cfg: TrainConfig | None, err: RuntimeError | MemoryError) -> int:
    """EXIT_OOM, with what to change printed, for running out of memory while running `cfg`; any
    other error (or one before there was a config) is raised again."""
    if cfg is None or not (is_out_of_memory(err) or isinstance(err, MemoryError)):
        raise err
    print(f"error: {out_of_memory_advice(cfg, err)}", file=sys.stderr)
    return EXIT_OOM


def profile_instead(invocation, argv: list[str] | None) -> int:
    """`--profile N`: fastresnet.profile's default profile of this config, into the run directory."""
    import shlex

    from fastresnet.profile import ProfileOptions, output_dir, run_profile

    options = ProfileOptions(steps=invocation.profile)
    argv = sys.argv[1:] if argv is None else argv
    run_profile(invocation.config, options, output_dir(invocation.config, options, invocation.resume),
                command=shlex.join(["python", "-m", "fastresnet.train", *argv]))
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    invocation = parse_invocation(argv)
    validate(invocation.config)
    cfg = invocation.config
    try:
        if invocation.profile:
            return profile_instead(invocation, argv)
        train(cfg, resume=invocation.resume)
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except (RuntimeError, MemoryError) as err:
        return out_of_memory_exit(cfg, err)
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
