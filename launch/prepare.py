"""Builds a semiscale dataset (classes.txt, labeled/val/test/unlabeled.csv, images/) from a source.

    python launch/prepare.py fashion-mnist --out ROOT [--labels-per-class 30 --val-size 5000 --seed 0]
        [--long-tail R] [--open-set-classes N --open-set-fraction F] [--unlabeled-size N]
    python launch/prepare.py folder SRC --out ROOT --labels-per-class N --val-per-class M --test-per-class T [--link]
    python launch/prepare.py own --out ROOT --unlabeled DIR [DIR ...] --labeled DIR|CSV [--classes FILE]
        (--val DIR|CSV | --val-per-class N) (--test DIR|CSV | --test-per-class N)
        [--link] [--on-bad-image skip|error] [--seed S] [--workers W]

fashion-mnist and folder split fully labeled images themselves (simulations): splits are
class-balanced and seeded, and unlabeled.csv keeps the true label as a hidden column. `own` takes
your own data as it is: unlabeled.csv lists the images of the --unlabeled folders (no label column),
labeled.csv those of --labeled (DIR/<class>/<images>, or a CSV path,label whose paths are relative to
the CSV's folder or absolute, and whose labels are class names or, names winning, ids into the
class list). fashion-mnist's options shape data unlike the demo (data.prepare.pool_variants): a
long-tailed unlabeled pool, classes outside the class list in it (open set: their hidden label is their
class name), a small pool; prepare.json's params record them (`variant`). Given --val/--test splits are kept as they are (less copies of labeled pictures);
otherwise N images per class are drawn (seeded) from the labeled ones, and every class keeps at least
one labeled image. One file (symlinks, '..' and hard links resolved) listed twice, in one split or in
two, a class that the labeled set (or --classes) does not have, and an unknown class id are errors.
Images are copied into ROOT/images (own: images/<split>/..., images/unlabeled/<folder name>/...), or
symlinked there with --link, so every path in the CSVs stays inside ROOT (own --link: one link per
source folder, ROOT/images/unlabeled/<folder name> -> the folder, and one per image a CSV lists).
A finished dataset records its parameters in ROOT/prepare.json (written last), so re-running with the
same parameters is a no-op and an interrupted run is redone from scratch.
A rebuild (--force, or after an interrupted run) removes only the files prepare writes (OUTPUTS in
data.prepare.dataset_folder), and the sources and --out must not lie inside one another.
Images that cannot be read, or whose names the dataset's files cannot hold (a line break: DALI's file
lists are one path per line; not UTF-8: the CSVs are), are skipped and listed with the reason in
ROOT/bad_images.txt (own: or stop the run, with --on-bad-image error), as are the files and folders the
walks do not take (hidden ones, symlinked sub-folders, images in no class folder).
own and folder keep each picture (its decoded pixels) once, in the first of labeled, val, test and
unlabeled that has it: other copies are left out and listed in ROOT/duplicates.txt with the copy kept
(copies within the unlabeled pool all stay; a picture with two labels is an error); prepare.json then
records the CSVs so checked (data.prepare.same_pictures, data.same_content). fashion-mnist finds its
copies so too but keeps them, listed (its splits are fixed by the demo's published results; the
package's images are all distinct), and records the check of a dataset prepared before on a re-run
with its parameters. Images are decoded in
--workers processes, nothing but paths and a 16-byte digest per image held in memory.
Bad input ends with one line `prepare: error: ...` on stderr and exit status 2.
Each mode's options and run: data.prepare.from_fashion_mnist, from_folder and from_own.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from data.errors import InputError
from data.prepare import from_fashion_mnist, from_folder, from_own
from data.prepare.dataset_folder import MANIFEST, finish
from data.prepare_messages import PrepareError, say

# each mode: its HELP, add_options(parser) and prepare(args) -> (parameters, split sizes), or None
# when --out already holds the dataset
MODES = {"fashion-mnist": from_fashion_mnist, "folder": from_folder, "own": from_own}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="prepare", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, mode in MODES.items():
        command = commands.add_parser(name, help=mode.HELP)
        mode.add_options(command)
        command.add_argument("--out", required=True, help="dataset root to create")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
        command.add_argument("--force", action="store_true", help="rebuild even if --out holds a dataset")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        if args.workers < 1:
            raise PrepareError(f"--workers {args.workers}: expected at least 1")
        done = MODES[args.command].prepare(args)
    except InputError as e:   # PrepareError, or one of data's own checks
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    if done is None:
        say(f"{args.out} already holds this dataset (same parameters in {MANIFEST}); nothing to do")
        return 0
    params, counts = done
    finish(args.out, params, counts)
    summary = " / ".join(f"{name} {n}" for name, n in counts.items())
    say(f"{summary} -> {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
