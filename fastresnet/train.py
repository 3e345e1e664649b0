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

from fastresnet.errors import ConfigError, command, out_of_memory_exit
from fastresnet.training import distributed
from fastresnet.training.cli import Command, Invocation
from fastresnet.training.config import TrainConfig, validate
from fastresnet.training.fields import flat_fields
from fastresnet.training.loop import NonFiniteLoss, train

EXIT_NONFINITE = 4  # 2: a user error, 3: out of memory (fastresnet.errors)


def add_options(parser) -> None:
    parser.add_argument("--profile", type=int, default=None, metavar="N",
                        help="profile N training steps instead of training: profile.md, profile.png and traces in the "
                        "run directory's profile/ (python -m fastresnet.profile has more options)")


COMMAND = Command(
    prog="python -m fastresnet.train", doc=__doc__, fields=tuple(flat_fields(TrainConfig)), add_options=add_options,
    usage="%(prog)s [--recipe NAME|FILE | --resume RUN_DIR] [--profile N] [--FIELD VALUE ...]")


def parse(argv: list[str] | None = None) -> Invocation:
    """The command line, resolved (defaults < recipe < resumed run < flags); a ConfigError on any problem."""
    argv = sys.argv[1:] if argv is None else argv
    args, invocation = COMMAND.invocation(argv)
    if args.profile is not None and args.profile < 1:
        raise ConfigError(f"--profile {args.profile}: the number of steps to profile must be >= 1")
    invocation.profile = args.profile or 0
    return invocation


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
    invocation = parse(argv)
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
