"""`prepare fashion-mnist`: a simulated semi-supervised dataset from the Fashion-MNIST IDX files, its
options and its run (train split class-balanced and seeded into labeled/val/unlabeled, test kept).

Copies across the splits are found as `prepare own` finds them (data.prepare.same_pictures), by the
digest of each image's pixels taken from the IDX arrays (decode_check.pixel_digest, as own and folder
digest what they decode: no decode here), but kept, only listed in ROOT/duplicates.txt and counted:
the splits are fixed by the demo's published results (docs/results.md), and test is Fashion-MNIST's own
10k test set, on which every published score is taken; leaving an image out would change both. (The
dataset-fashion-mnist package's 70000 images are all distinct: nothing is listed.) prepare.json then
records the CSVs as checked, so that check_dataset reads no image, unless a val or test picture kept a
copy in another split: every stage's byte comparison then goes on warning of it (equal pixels make
equal PNG bytes here). A dataset prepared before this comparison gets it, and the record, from the next
run with its parameters (otherwise a no-op) while its CSVs are those this run would write (~1 s)."""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time

import numpy as np

from data import atomic
from data.prepare.balanced_splits import draw_per_class, stratified_counts
from data.prepare.dataset_folder import SCORED_COPIES, add_counts, already_prepared, refuse_nesting, start_fresh
from data.prepare.dataset_writer import dataset_csvs, write_dataset
from data.prepare.decode_check import pixel_digest
from data.prepare.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from data.prepare.grey_png import png_paths, write_grey_pngs_in
from data.prepare.own_sources import OWN_SPLITS, SPLIT_CODES
from data.prepare.same_pictures import find_copies, write_duplicates
from data.prepare_messages import PrepareError, say
from data.same_content import MANIFEST

HELP = "Fashion-MNIST from the dataset-fashion-mnist Debian package"


def add_options(parser: argparse.ArgumentParser):
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--labels-per-class", type=int, default=30)
    parser.add_argument("--val-size", type=int, default=5000, help="validation images taken from train, stratified")
    parser.add_argument("--limit", type=int, help=argparse.SUPPRESS)   # first N train/test images: for fast tests


def prepare(args) -> tuple[dict, dict] | None:
    """(parameters, split sizes) of the dataset written to args.out; None when it already holds it."""
    params = {"source": "fashion-mnist", "source_dir": os.path.abspath(args.source), "seed": args.seed,
              "labels_per_class": args.labels_per_class, "val_size": args.val_size, "limit": args.limit}
    if args.labels_per_class < 1 or args.val_size < 0:
        raise PrepareError("--labels-per-class must be >= 1 and --val-size >= 0")
    refuse_nesting(args.source, args.out)
    if already_prepared(args.out, params, args.force):
        _compare_prepared(args)
        return None
    start = time.perf_counter()
    parts, splits = _read_and_draw(args)
    (train_images, train_labels), (test_images, test_labels) = parts["train"], parts["test"]
    say(f"read {len(train_labels)} train + {len(test_labels)} test images from {args.source} "
        f"({time.perf_counter() - start:.1f} s)")
    copies = _find_copies(parts, splits)
    start_fresh(args.out)
    start = time.perf_counter()
    with multiprocessing.Pool(args.workers) as pool:
        paths, written = write_grey_pngs_in(pool, args.out, {"train": train_images, "test": test_images})
    say(f"wrote {written} PNGs with {args.workers} processes ({time.perf_counter() - start:.1f} s)")
    write_dataset(args.out, FASHION_MNIST_CLASSES, paths["train"], train_labels, splits, (paths["test"], test_labels))
    atomic.write_text(os.path.join(args.out, "bad_images.txt"), "")
    counts = {name: len(rows) for name, rows in splits.items()} | {"test": len(test_labels)}
    return params, counts | _list_copies(args.out, *copies)


def _read_and_draw(args) -> tuple[dict, dict]:
    """(read_fashion_mnist's parts, the train rows of labeled/val/unlabeled), as args ask."""
    parts = read_fashion_mnist(args.source, args.limit)
    train_labels = parts["train"][1]
    per_class = np.bincount(train_labels, minlength=len(FASHION_MNIST_CLASSES))
    labeled = np.full(len(FASHION_MNIST_CLASSES), args.labels_per_class)
    takes = {"labeled": labeled, "val": stratified_counts(np.maximum(per_class - labeled, 0), args.val_size)}
    return parts, draw_per_class(train_labels, FASHION_MNIST_CLASSES, takes, np.random.default_rng(args.seed), "image")


def _find_copies(parts: dict, splits: dict) -> tuple:
    """same_pictures.find_copies over the train rows, then the test rows: (rows listed, the first copy of
    each, every row's split code, every row's path in ROOT)."""
    start = time.perf_counter()
    names = np.concatenate([png_paths(part, len(parts[part][1])) for part in ("train", "test")])
    split = np.full(len(names), SPLIT_CODES["test"], np.int8)
    for name, rows in splits.items():
        split[rows] = SPLIT_CODES[name]
    digests = np.zeros(len(names), "V16")
    digests[:] = [pixel_digest(image.shape[::-1], np.repeat(image[..., None], 3, axis=2).tobytes())
                  for part in ("train", "test") for image in parts[part][0]]   # grey widened to RGB, as loaded
    labels = np.concatenate([parts["train"][1], parts["test"][1]])
    copy, first = find_copies(digests, np.ones(len(names), bool), split, labels, names.__getitem__,
                              FASHION_MNIST_CLASSES, one_label=False)
    say(f"compared the pixels of {len(names)} images: {len(copy)} copies that `prepare own` would leave out "
        f"({time.perf_counter() - start:.1f} s)")
    return copy, first, split, names


def _list_copies(root: str, copy: np.ndarray, first: np.ndarray, split: np.ndarray, names: np.ndarray) -> dict:
    """Lists the copies in ROOT/duplicates.txt, kept; their counts for the manifest (`finish`, `add_counts`)."""
    n = write_duplicates(root, copy, first, split, OWN_SPLITS, names.__getitem__,
                         stay="Fashion-MNIST's splits stay as published")
    scored = [SPLIT_CODES["val"], SPLIT_CODES["test"]]
    across = (split[copy] != split[first]) & (np.isin(split[copy], scored) | np.isin(split[first], scored))
    if across.any():
        say(f"{int(across.sum())} of them are val or test pictures with a copy in another split: prepare.json does "
            "not record the splits as checked, so every stage warns of them")
    return {"duplicates": n} | ({SCORED_COPIES: int(across.sum())} if across.any() else {})


def _compare_prepared(args):
    """The no-op run's one task: a dataset prepared before prepare compared its pictures (its manifest
    counts no duplicates) gets the comparison and the record, while its CSVs are those this run writes."""
    with open(os.path.join(args.out, MANIFEST), encoding="utf-8") as f:
        if "duplicates" in json.load(f)["counts"]:
            return
    parts, splits = _read_and_draw(args)
    paths = {part: png_paths(part, len(parts[part][1])) for part in ("train", "test")}
    texts = dataset_csvs(paths["train"], parts["train"][1], splits, (paths["test"], parts["test"][1]))
    for name, text in texts.items():
        with open(os.path.join(args.out, name), "rb") as f:
            if f.read() != text.encode("utf-8"):
                say(f"{os.path.join(args.out, name)} is not the CSV prepare wrote: the splits' pictures are not "
                    "compared (every stage compares the files' bytes instead; --force rebuilds the dataset)")
                return
    add_counts(args.out, _list_copies(args.out, *_find_copies(parts, splits)))
    say(f"compared the pictures of {args.out}, prepared before prepare did, and recorded it in {MANIFEST}")
