"""`python -m fastresnet.data`: check a dataset folder, or write a small ImageNet-like one.

    python -m fastresnet.data verify DIR                    # list every problem of a dataset folder
    python -m fastresnet.data make-fake-imagenet DIR --classes K --images-per-class M   # real JPEGs

verify exits 0 when the dataset in DIR has no problem, 1 when it lists problems, and 2 (one `error:`
line) when DIR is no dataset: missing, or in none of the formats the back ends read.
make-fake-imagenet writes only into a new or empty folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastresnet.errors import ArgumentParser, UserError, command
from fastresnet.outputs import writable_folder

from .fake_imagenet import make_fake_imagenet
from .verify import summarise, verify_dataset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m fastresnet.data", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify", help="check a dataset folder and list its problems: exit 0 none, 1 problems listed, "
        "2 no dataset there", description="Check a dataset folder and list every problem it has.")
    verify.add_argument("root", help="ImageFolder root (train/, val/), one split folder, cifar-10-batches-py, "
                        "or a folder of Fashion-MNIST's IDX files (gzipped or not)")
    verify.add_argument("--workers", type=int, default=8, help="decoding threads")
    fake = commands.add_parser("make-fake-imagenet", help="write an ImageFolder of realistic JPEGs",
                               description="Write an ImageFolder (train/ and val/) of realistic JPEGs.")
    fake.add_argument("root", help="output folder (train/ and val/ are created in it)")
    fake.add_argument("--classes", type=int, required=True, help="number of class folders")
    fake.add_argument("--images-per-class", type=int, required=True, help="train images per class")
    fake.add_argument("--val-images-per-class", type=int, default=None, help="val images per class (default: 1/10)")
    fake.add_argument("--seed", type=int, default=0)
    fake.add_argument("--tint", action="store_true", help="tint each class a distinct colour (for label tests)")
    return parser.parse_args(argv)


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "verify":
        problems, checked = verify_dataset(args.root, workers=args.workers)
        print(summarise(problems, checked))
        return 1 if any(problem.error for problem in problems) else 0
    writable_folder(args.root, "make-fake-imagenet", empty=True)
    if args.classes < 1 or args.images_per_class < 1 or (args.val_images_per_class or 1) < 1:
        raise UserError("make-fake-imagenet: --classes, --images-per-class and --val-images-per-class must be >= 1")
    root = make_fake_imagenet(
        args.root,
        classes=args.classes,
        images_per_class=args.images_per_class,
        val_images_per_class=args.val_images_per_class,
        seed=args.seed,
        tint=args.tint,
    )
    val = sum(1 for _ in (Path(root) / "val").glob("*/*.JPEG")) // args.classes  # as written (default: 1/10)
    print(f"wrote {root}/train and {root}/val: {args.classes} classes, {args.images_per_class} train and {val} "
          "val images per class")
    return 0


if __name__ == "__main__":
    sys.exit(main())
