"""`prepare folder`: a simulated semi-supervised dataset from an ImageFolder tree SRC/<class>/<images>,
all labeled, its options and its run (every image decoded once, the readable ones split per class,
seeded; unlabeled.csv keeps the labels, hidden)."""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import numpy as np

from data.image_trees import list_folder
from data.prepare.balanced_splits import draw_per_class
from data.prepare.dataset_folder import already_prepared, refuse_nesting, start_fresh
from data.prepare.dataset_writer import add_link_option, make_folders, place_images, write_bad_images, write_dataset
from data.prepare.decode_check import decode_check, import_decoder
from data.prepare.same_pictures import find_copies, write_duplicates
from data.prepare_messages import PrepareError, say

HELP = ("an ImageFolder-style tree SRC/<class>/<images>, all labeled, split here (a simulation: unlabeled.csv "
        "keeps the labels, hidden)")


def add_options(parser: argparse.ArgumentParser):
    parser.add_argument("src")
    parser.add_argument("--labels-per-class", type=int, required=True)
    parser.add_argument("--val-per-class", type=int, required=True)
    parser.add_argument("--test-per-class", type=int, required=True)
    add_link_option(parser)


def prepare(args) -> tuple[dict, dict] | None:
    """(parameters, split sizes) of the dataset written to args.out; None when it already holds it."""
    src = os.path.abspath(args.src)
    params = {"source": "folder", "source_dir": src, "seed": args.seed, "labels_per_class": args.labels_per_class,
              "val_per_class": args.val_per_class, "test_per_class": args.test_per_class,
              "placement": "link" if args.link else "copy"}
    if min(args.labels_per_class, args.val_per_class, args.test_per_class) < 0 or args.labels_per_class < 1:
        raise PrepareError("--labels-per-class must be >= 1, --val-per-class and --test-per-class >= 0")
    refuse_nesting(src, args.out)
    classes, files, labels, misnamed, skipped = list_folder(src)
    takes = {"labeled": np.full(len(classes), args.labels_per_class), "val": np.full(len(classes), args.val_per_class),
             "test": np.full(len(classes), args.test_per_class)}
    draw_per_class(labels, classes, takes, np.random.default_rng(args.seed), "image")   # fail fast, before decoding
    if already_prepared(args.out, params, args.force):
        return None
    import_decoder()
    start = time.perf_counter()
    with multiprocessing.Pool(args.workers) as pool:
        checked = pool.map(decode_check, [os.path.join(src, f) for f in files], chunksize=64)
        bad = [(f, reason) for f, (reason, _) in zip(files, checked) if reason is not None]
        say(f"decoded {len(files)} images in {len(classes)} classes ({time.perf_counter() - start:.1f} s)")
        good = np.array([reason is None for reason, _ in checked], dtype=bool)
        digests = np.zeros(len(files), "V16")   # zeros where unread
        digests[good] = [digest for reason, digest in checked if reason is None]
        del checked
        listed, one_split = files, np.zeros(len(files), np.int8)   # before the draw every image is a labeled one
        copies, twins = find_copies(digests, good, one_split, labels, lambda i: os.path.join(src, listed[i]), classes)
        good[copies] = False
        files, labels = np.asarray(files)[good], labels[good]
        splits = draw_per_class(labels, classes, takes, np.random.default_rng(args.seed), "readable image")
        start_fresh(args.out)
        n_bad = write_bad_images(args.out, misnamed, bad, skipped)
        n_copies = write_duplicates(args.out, copies, twins, one_split, ("the source",), listed.__getitem__)
        paths = np.array(["images/" + f.replace(os.sep, "/") for f in files])
        make_folders(args.out, paths)
        start = time.perf_counter()
        place_images(pool, args.link, ((os.path.join(src, f), os.path.join(args.out, p)) for f, p in zip(files, paths)))
    say(f"{'linked' if args.link else 'copied'} {len(files)} images into {args.out}/images "
        f"({time.perf_counter() - start:.1f} s)")
    test_rows = np.sort(splits.pop("test"))
    write_dataset(args.out, classes, paths, labels, splits, (paths[test_rows], labels[test_rows]))
    counts = {name: len(rows) for name, rows in splits.items()} | {"test": len(test_rows), "bad_images": n_bad,
                                                                  "duplicates": n_copies}
    return params, counts
