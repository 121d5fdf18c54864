"""`prepare fashion-mnist`: a simulated semi-supervised dataset from the Fashion-MNIST IDX files, its
options and its run (train split class-balanced and seeded into labeled/val/unlabeled, test kept)."""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import numpy as np

from data import atomic
from data.prepare.balanced_splits import draw_per_class, stratified_counts
from data.prepare.dataset_folder import already_prepared, refuse_nesting, start_fresh
from data.prepare.dataset_writer import write_dataset
from data.prepare.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from data.prepare.grey_png import write_grey_pngs_in
from data.prepare_messages import PrepareError, say

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
    atomic.write_text(os.path.join(args.out, "bad_images.txt"), "")
    return params, {name: len(rows) for name, rows in splits.items()} | {"test": len(test_labels)}
