"""`python -m fastresnet.experiments NAME [flags]`; `--help` after NAME lists its flags.

Exit status: 0 done, 1 interrupted (checkpoints saved: run the same command
again to continue), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from fastresnet.errors import ArgumentParser, command
from fastresnet.outputs import writable_folder
from fastresnet.training import NonFiniteLoss

from . import EXPERIMENTS
from .settings import add_common_flags, settings_from_args

EXIT_INTERRUPTED = 1  # 2: a user error (fastresnet.errors)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m fastresnet.experiments",
                            description="`python -m fastresnet.experiments NAME`: the paper's experiments, one "
                            "command each (NAME --help lists its flags).")
    commands = parser.add_subparsers(dest="experiment", required=True, metavar="NAME")
    for name, module in EXPERIMENTS.items():
        sub = commands.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                                  description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_flags(sub)
        add_common_flags(sub)
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = EXPERIMENTS[args.experiment]
    settings = settings_from_args(args)
    writable_folder(settings.out, "--out")  # re-running into the same folder resumes: it may hold files
    try:
        result = module.main(args, settings)
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result is None:
        print(f"{args.experiment}: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
