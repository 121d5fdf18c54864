"""Builds a semiscale dataset (classes.txt, labeled/val/test/unlabeled.csv, images/) from a source.

    python launch/prepare.py fashion-mnist --out ROOT [--labels-per-class 30 --val-size 5000 --seed 0]
    python launch/prepare.py folder SRC --out ROOT --labels-per-class N --val-per-class M --test-per-class T [--link]
    python launch/prepare.py own --out ROOT --unlabeled DIR [DIR ...] --labeled DIR|CSV [--classes FILE]
        (--val DIR|CSV | --val-per-class N) (--test DIR|CSV | --test-per-class N)
        [--link] [--on-bad-image skip|error] [--seed S] [--workers W]

fashion-mnist and folder split fully labeled images themselves (simulations): splits are
class-balanced and seeded, and unlabeled.csv keeps the true label as a hidden column. `own` takes
your own data as it is: unlabeled.csv lists the images of the --unlabeled folders (no label column),
labeled.csv those of --labeled (DIR/<class>/<images>, or a CSV path,label whose paths are relative to
the CSV's folder or absolute, and whose labels are class names or, names winning, ids into the
class list). Given --val/--test splits are kept as they are; otherwise N images per class are drawn
(seeded) from the labeled ones, and every class keeps at least one labeled image. One file (symlinks,
'..' and hard links resolved) listed twice, in one split or in two, a class that the labeled set (or
--classes) does not have, and an unknown class id are errors.
Images are copied into ROOT/images (own: images/<split>/..., images/unlabeled/<folder name>/...), or
symlinked there with --link, so every path in the CSVs stays inside ROOT (own --link: one link per
source folder, ROOT/images/unlabeled/<folder name> -> the folder, and one per image a CSV lists). A finished dataset records
its parameters in ROOT/prepare.json (written last), so re-running with the same parameters is a no-op
and an interrupted run is redone from scratch.
A rebuild (--force, or after an interrupted run) removes only the OUTPUTS below, and the sources and
--out must not lie inside one another. Images that cannot be read, or whose names the dataset's
files cannot hold (a line break: DALI's file lists are one path per line; not UTF-8: the CSVs are),
are skipped and listed with the reason in ROOT/bad_images.txt (own: or stop the run, with
--on-bad-image error). Images are decoded in --workers processes, nothing but paths held in memory.
Bad input ends with one line `prepare: error: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import numpy as np

from data.prepare.balanced_splits import draw_per_class, stratified_counts
from data.prepare.dataset_folder import MANIFEST, already_prepared, finish, refuse_nesting, start_fresh
from data.prepare.dataset_writer import (make_folders, link_folders, place_images, write_atomically, write_bad_images,
                                 write_dataset, write_listed_dataset)
from data.prepare.decode_check import decode_problem, import_decoder
from data.errors import InputError
from data.prepare.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from data.prepare.grey_png import write_grey_pngs_in
from data.image_trees import list_folder
from data.prepare.own_sources import list_own, split_listing
from data.prepare_messages import PrepareError, say, shown
from data.prepare.repeated_files import find_listed


def prepare_fashion_mnist(args) -> tuple[dict, dict] | None:
    params = {"source": "fashion-mnist", "source_dir": os.path.abspath(args.source), "seed": args.seed,
              "labels_per_class": args.labels_per_class, "val_size": args.val_size, "limit": args.limit}
    if args.labels_per_class < 1 or args.val_size < 0:
        raise PrepareError("--labels-per-class must be >= 1 and --val-size >= 0")
    refuse_nesting(args.source, args.out)
    if already_prepared(args.out, params, args.force):
        return None
    start = time.perf_counter()
    parts = read_fashion_mnist(args.source, args.limit)
    (train_images, train_labels), (test_images, test_labels) = parts["train"], parts["test"]
    classes = FASHION_MNIST_CLASSES
    per_class = np.bincount(train_labels, minlength=len(classes))
    labeled = np.full(len(classes), args.labels_per_class)
    takes = {"labeled": labeled, "val": stratified_counts(np.maximum(per_class - labeled, 0), args.val_size)}
    splits = draw_per_class(train_labels, classes, takes, np.random.default_rng(args.seed), "image")
    say(f"read {len(train_labels)} train + {len(test_labels)} test images from {args.source} "
        f"({time.perf_counter() - start:.1f} s)")
    start_fresh(args.out)
    start = time.perf_counter()
    with multiprocessing.Pool(args.workers) as pool:
        paths, written = write_grey_pngs_in(pool, args.out, {"train": train_images, "test": test_images})
    say(f"wrote {written} PNGs with {args.workers} processes ({time.perf_counter() - start:.1f} s)")
    write_dataset(args.out, classes, paths["train"], train_labels, splits, (paths["test"], test_labels))
    write_atomically(os.path.join(args.out, "bad_images.txt"), "")
    return params, {name: len(rows) for name, rows in splits.items()} | {"test": len(test_labels)}


def prepare_folder(args) -> tuple[dict, dict] | None:
    src = os.path.abspath(args.src)
    params = {"source": "folder", "source_dir": src, "seed": args.seed, "labels_per_class": args.labels_per_class,
              "val_per_class": args.val_per_class, "test_per_class": args.test_per_class,
              "placement": "link" if args.link else "copy"}
    if min(args.labels_per_class, args.val_per_class, args.test_per_class) < 0 or args.labels_per_class < 1:
        raise PrepareError("--labels-per-class must be >= 1, --val-per-class and --test-per-class >= 0")
    refuse_nesting(src, args.out)
    classes, files, labels, misnamed = list_folder(src)
    takes = {"labeled": np.full(len(classes), args.labels_per_class), "val": np.full(len(classes), args.val_per_class),
             "test": np.full(len(classes), args.test_per_class)}
    draw_per_class(labels, classes, takes, np.random.default_rng(args.seed), "image")   # fail fast, before decoding
    if already_prepared(args.out, params, args.force):
        return None
    import_decoder()
    start = time.perf_counter()
    with multiprocessing.Pool(args.workers) as pool:
        reasons = pool.map(decode_problem, [os.path.join(src, f) for f in files], chunksize=64)
        bad = [(f, reason) for f, reason in zip(files, reasons) if reason is not None]
        say(f"decoded {len(files)} images in {len(classes)} classes ({time.perf_counter() - start:.1f} s)")
        good = np.array([reason is None for reason in reasons], dtype=bool)
        files, labels = np.asarray(files)[good], labels[good]
        splits = draw_per_class(labels, classes, takes, np.random.default_rng(args.seed), "readable image")
        start_fresh(args.out)
        n_bad = write_bad_images(args.out, misnamed, bad)
        paths = np.array(["images/" + f.replace(os.sep, "/") for f in files])
        make_folders(args.out, paths)
        start = time.perf_counter()
        place_images(pool, args.link, ((os.path.join(src, f), os.path.join(args.out, p)) for f, p in zip(files, paths)))
    say(f"{'linked' if args.link else 'copied'} {len(files)} images into {args.out}/images "
        f"({time.perf_counter() - start:.1f} s)")
    test_rows = np.sort(splits.pop("test"))
    write_dataset(args.out, classes, paths, labels, splits, (paths[test_rows], labels[test_rows]))
    counts = {name: len(rows) for name, rows in splits.items()} | {"test": len(test_rows), "bad_images": n_bad}
    return params, counts


def prepare_own(args) -> tuple[dict, dict] | None:
    for option, n in (("--val-per-class", args.val_per_class), ("--test-per-class", args.test_per_class)):
        if n is not None and n < 0:
            raise PrepareError(f"{option} {n}: expected at least 0")
    params = {"source": "own", "unlabeled": [os.path.abspath(d) for d in args.unlabeled],
              "labeled": os.path.abspath(args.labeled),
              "val": args.val and os.path.abspath(args.val), "test": args.test and os.path.abspath(args.test),
              "classes": args.classes and os.path.abspath(args.classes), "val_per_class": args.val_per_class,
              "test_per_class": args.test_per_class, "seed": args.seed, "placement": "link" if args.link else "copy",
              "on_bad_image": args.on_bad_image}
    start = time.perf_counter()
    listing, classes = list_own(args.out, args.labeled, args.unlabeled, args.val, args.test, args.classes)
    n = len(listing.rel)
    say(f"listed {n} images from {len(listing.sources)} sources, {len(classes)} classes "
        f"({time.perf_counter() - start:.1f} s)")
    if already_prepared(args.out, params, args.force):
        return None
    import_decoder()
    with multiprocessing.Pool(args.workers) as pool:
        start = time.perf_counter()
        reasons = find_listed(pool, listing)
        todo = np.flatnonzero([r is None for r in reasons])
        say(f"found {len(todo)} of the {n} files, none listed twice ({time.perf_counter() - start:.1f} s)")
        start = time.perf_counter()
        for i, reason in zip(todo, pool.imap(decode_problem, (listing.src(i) for i in todo), chunksize=256)):
            reasons[i] = reason
        good = np.array([r is None for r in reasons], bool)
        bad = [(listing.src(i), reasons[i]) for i in np.flatnonzero(~good)]
        seconds = time.perf_counter() - start
        say(f"decoded {len(todo)} images with {args.workers} processes ({seconds:.1f} s, "
            f"{len(todo) / max(seconds, 1e-9):.0f} images/s)")
        if (bad or listing.misnamed) and args.on_bad_image == "error":
            path, reason = (listing.misnamed + bad)[0]
            raise PrepareError(f"{shown(path)}: {reason} ({len(bad) + len(listing.misnamed)} images cannot be "
                               "used; pass --on-bad-image skip to leave them out, listed in bad_images.txt)")
        del reasons
        takes = {name: getattr(args, f"{name}_per_class") for name in ("val", "test") if getattr(args, name) is None}
        splits = split_listing(listing, good, classes, takes, args.seed)
        start_fresh(args.out)
        n_bad = write_bad_images(args.out, listing.misnamed, bad)
        start = time.perf_counter()
        kept, folders = good, []
        if args.link:   # a source folder: one link to it, ROOT/images/<...> -> the folder
            folders = [(s.base, s.prefix) for s in listing.sources if not s.is_csv]
            link_folders(args.out, folders)
            kept = good & listing.from_csv()
        kept = np.flatnonzero(kept)   # files placed one by one: copies, or CSV rows' links
        make_folders(args.out, (listing.out(i) for i in kept))
        placed = place_images(pool, args.link, ((listing.src(i), os.path.join(args.out, listing.out(i))) for i in kept))
    say(f"{'linked' if args.link else 'copied'} {placed} images"
        f"{f' and {len(folders)} folders' if folders else ''} into {args.out}/images "
        f"({time.perf_counter() - start:.1f} s)")
    write_listed_dataset(args.out, classes, listing, splits)
    counts = {name: len(splits[name]) for name in ("labeled", "val", "test", "unlabeled")}
    return params, counts | {"bad_images": n_bad}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="prepare", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fashion = commands.add_parser("fashion-mnist", help="Fashion-MNIST from the dataset-fashion-mnist Debian package")
    fashion.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    fashion.add_argument("--labels-per-class", type=int, default=30)
    fashion.add_argument("--val-size", type=int, default=5000, help="validation images taken from train, stratified")
    fashion.add_argument("--limit", type=int, help=argparse.SUPPRESS)   # first N train/test images: for fast tests
    folder = commands.add_parser("folder", help="an ImageFolder-style tree SRC/<class>/<images>, all labeled, "
                                 "split here (a simulation: unlabeled.csv keeps the labels, hidden)")
    folder.add_argument("src")
    folder.add_argument("--labels-per-class", type=int, required=True)
    folder.add_argument("--val-per-class", type=int, required=True)
    folder.add_argument("--test-per-class", type=int, required=True)
    own = commands.add_parser("own", help="your own data: folders of unlabeled images, a labeled ImageFolder "
                              "tree or CSV, and val/test given or drawn from the labeled images")
    own.add_argument("--unlabeled", nargs="+", required=True, metavar="DIR",
                     help="folders of unlabeled images, in any tree of sub-folders")
    own.add_argument("--labeled", required=True, metavar="DIR|CSV",
                     help="a folder DIR/<class>/<images> or a CSV path,label (paths relative to the CSV's "
                     "folder or absolute; a label is a class name or a class id)")
    own.add_argument("--classes", metavar="FILE", help="the class names, one a line (classes.txt); default: "
                     "the labeled folder's class folders, or the labeled CSV's labels, sorted")
    for split in ("val", "test"):
        given = own.add_mutually_exclusive_group(required=True)
        given.add_argument(f"--{split}", metavar="DIR|CSV", help=f"the {split} images, as --labeled")
        given.add_argument(f"--{split}-per-class", type=int, metavar="N",
                           help=f"or draw the {split} split from the labeled images: N per class, seeded")
    own.add_argument("--on-bad-image", choices=("skip", "error"), default="skip",
                     help="an image that cannot be decoded: leave it out and list it in ROOT/bad_images.txt "
                     "(the default), or stop")
    for command in (folder, own):
        command.add_argument("--link", action="store_true", help="symlink the images (own: the source folders, "
                             "and a CSV's images) into ROOT/images instead of copying them, the default (the "
                             "sources must then stay in place)")
    for command in (fashion, folder, own):
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
        modes = {"fashion-mnist": prepare_fashion_mnist, "folder": prepare_folder, "own": prepare_own}
        done = modes[args.command](args)
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
