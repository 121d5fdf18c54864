"""`prepare fashion-mnist`: a simulated semi-supervised dataset from the Fashion-MNIST IDX files, its
options and its run (train split class-balanced and seeded into labeled/val/unlabeled, test kept; the
unlabeled pool shaped and classes left out of the list by data.prepare.pool_variants' options).

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
from typing import NamedTuple

import numpy as np

from data import atomic
from data.prepare.balanced_splits import draw_per_class, stratified_counts
from data.prepare.dataset_folder import SCORED_COPIES, add_counts, already_prepared, refuse_nesting, start_fresh
from data.prepare.dataset_writer import dataset_csvs, write_dataset
from data.prepare.decode_check import pixel_digest
from data.prepare.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from data.prepare.grey_png import png_paths, write_grey_pngs_in
from data.prepare import pool_variants
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
    pool_variants.add_options(parser)


def prepare(args) -> tuple[dict, dict] | None:
    """(parameters, split sizes) of the dataset written to args.out; None when it already holds it."""
    if args.labels_per_class < 1 or args.val_size < 0:
        raise PrepareError("--labels-per-class must be >= 1 and --val-size >= 0")
    pool_variants.check(args, len(FASHION_MNIST_CLASSES))
    params = {"source": "fashion-mnist", "source_dir": os.path.abspath(args.source), "seed": args.seed,
              "labels_per_class": args.labels_per_class, "val_size": args.val_size, "limit": args.limit,
              **pool_variants.recorded(args, FASHION_MNIST_CLASSES)}
    refuse_nesting(args.source, args.out)
    if already_prepared(args.out, params, args.force):
        _compare_prepared(args)
        return None
    start = time.perf_counter()
    parts, drawn = _read_and_draw(args)
    (train_images, train_labels), (test_images, test_labels) = parts["train"], parts["test"]
    say(f"read {len(train_labels)} train + {len(test_labels)} test images from {args.source} "
        f"({time.perf_counter() - start:.1f} s)")
    if pool_variants.given(args):
        per_class = np.bincount(train_labels[drawn.splits["unlabeled"]], minlength=len(FASHION_MNIST_CLASSES))
        say(f"{pool_variants.given(args)}: unlabeled images per class " + ", ".join(
            f"{name} {n}" + ("" if name in drawn.classes else " (open set)")
            for name, n in zip(FASHION_MNIST_CLASSES, per_class)))
    copies = _find_copies(parts, drawn)
    start_fresh(args.out)
    start = time.perf_counter()
    with multiprocessing.Pool(args.workers) as pool:
        paths, written = write_grey_pngs_in(pool, args.out, {"train": train_images, "test": test_images},
                                            rows={"train": np.concatenate(list(drawn.splits.values())),
                                                  "test": drawn.test_rows})
    say(f"wrote {written} PNGs with {args.workers} processes ({time.perf_counter() - start:.1f} s)")
    write_dataset(args.out, drawn.classes, paths["train"], drawn.train_labels, drawn.splits,
                  (paths["test"][drawn.test_rows], drawn.test_labels))
    atomic.write_text(os.path.join(args.out, "bad_images.txt"), "")
    counts = {name: len(rows) for name, rows in drawn.splits.items()} | {"test": len(drawn.test_rows)}
    if len(drawn.classes) < len(FASHION_MNIST_CLASSES):
        counts["open_set"] = drawn.open_set_images
    return params, counts | _list_copies(args.out, *copies)


class Drawn(NamedTuple):
    splits: dict              # the train rows of labeled, val and unlabeled
    test_rows: np.ndarray     # the test rows kept: those of the class list
    classes: list[str]        # the class list: Fashion-MNIST's less the open-set classes
    train_labels: np.ndarray  # each train image's label as the CSVs write it: its id in `classes`, or the name
    #                           of its class outside the list (unlabeled.csv's hidden label of an open-set image)
    test_labels: np.ndarray   # the kept test images' ids in `classes`
    open_set_images: int      # the unlabeled images of classes outside the list


def _read_and_draw(args) -> tuple[dict, Drawn]:
    """(read_fashion_mnist's parts, the dataset drawn from them), as args ask (data.prepare.pool_variants:
    the open-set classes get no labeled or val image, and the unlabeled pool is shaped last)."""
    parts = read_fashion_mnist(args.source, args.limit)
    train_labels, test_labels = parts["train"][1], parts["test"][1]
    open_set, _ = pool_variants.seeded_classes(args, len(FASHION_MNIST_CLASSES))
    listed = ~np.isin(np.arange(len(FASHION_MNIST_CLASSES)), open_set)
    per_class = np.bincount(train_labels, minlength=len(FASHION_MNIST_CLASSES))
    labeled = np.where(listed, args.labels_per_class, 0)
    takes = {"labeled": labeled, "val": stratified_counts(np.where(listed, np.maximum(per_class - labeled, 0), 0),
                                                          args.val_size)}
    # every class shuffled in turn, the open-set ones too, so that each listed class's shuffle (labeled
    # first, then val) is the one the seed gives without the options
    splits = draw_per_class(train_labels, FASHION_MNIST_CLASSES, takes, np.random.default_rng(args.seed), "image")
    if pool_variants.given(args):
        available = np.bincount(train_labels[splits["unlabeled"]], minlength=len(FASHION_MNIST_CLASSES))
        sizes = pool_variants.pool_sizes(args, available, FASHION_MNIST_CLASSES)
        splits["unlabeled"] = pool_variants.subsample(args, splits["unlabeled"], train_labels, sizes)
    ids = np.cumsum(listed) - 1   # each listed class's id in the class list
    names = np.array(FASHION_MNIST_CLASSES)
    written = np.where(listed[train_labels], ids[train_labels].astype(str), names[train_labels])
    test_rows = np.flatnonzero(listed[test_labels])
    return parts, Drawn(splits, test_rows, names[listed].tolist(), written, ids[test_labels[test_rows]],
                        int((~listed[train_labels[splits["unlabeled"]]]).sum()))


def _find_copies(parts: dict, drawn: Drawn) -> tuple:
    """same_pictures.find_copies over the train rows, then the test rows, of the images the dataset lists:
    (rows listed, the first copy of each, every row's split code, every row's path in ROOT)."""
    start = time.perf_counter()
    names = np.concatenate([png_paths(part, len(parts[part][1])) for part in ("train", "test")])
    split = np.full(len(names), SPLIT_CODES["test"], np.int8)
    listed = np.zeros(len(names), bool)
    listed[len(parts["train"][1]) + drawn.test_rows] = True
    for name, rows in drawn.splits.items():
        split[rows], listed[rows] = SPLIT_CODES[name], True
    digests = np.zeros(len(names), "V16")
    digests[:] = [pixel_digest(image.shape[::-1], np.repeat(image[..., None], 3, axis=2).tobytes())
                  for part in ("train", "test") for image in parts[part][0]]   # grey widened to RGB, as loaded
    labels = np.concatenate([parts["train"][1], parts["test"][1]])
    copy, first = find_copies(digests, listed, split, labels, names.__getitem__, FASHION_MNIST_CLASSES,
                              one_label=False)
    say(f"compared the pixels of {int(listed.sum())} images: {len(copy)} copies that `prepare own` would leave out "
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
    parts, drawn = _read_and_draw(args)
    paths = {part: png_paths(part, len(parts[part][1])) for part in ("train", "test")}
    texts = dataset_csvs(paths["train"], drawn.train_labels, drawn.splits,
                         (paths["test"][drawn.test_rows], drawn.test_labels))
    for name, text in texts.items():
        with open(os.path.join(args.out, name), "rb") as f:
            if f.read() != text.encode("utf-8"):
                say(f"{os.path.join(args.out, name)} is not the CSV prepare wrote: the splits' pictures are not "
                    "compared (every stage compares the files' bytes instead; --force rebuilds the dataset)")
                return
    add_counts(args.out, _list_copies(args.out, *_find_copies(parts, drawn)))
    say(f"compared the pictures of {args.out}, prepared before prepare did, and recorded it in {MANIFEST}")
