"""Datasets shaped unlike the demo, drawn from a fully labeled source (`prepare fashion-mnist`'s options):

- --long-tail R: the unlabeled pool's class sizes fall geometrically from the largest class to the
  smallest, largest / smallest = R (within rounding); which classes are large is seeded.
- --open-set-classes N --open-set-fraction F: N classes (seeded) leave the class list: no labeled, val
  or test image; their images make fraction F of the unlabeled pool, where their hidden label is their
  class name (data.labels.OUTSIDE_CLASSES: read as no class the model can predict).
- --unlabeled-size N: a pool of N images, balanced over its classes unless --long-tail shapes it.

Labeled, val and test stay class-balanced (val stratified over the classes of the list). Images left out
of the pool are dropped, not moved to another split. The choices draw from seeded streams of their own,
so that the labeled and val images are those the same seed draws without any option (with open-set
classes, val's share per listed class grows: its first images are those)."""
from __future__ import annotations

import argparse

import numpy as np

from data.prepare.balanced_splits import apportion
from data.prepare_messages import PrepareError

# the streams of np.random.default_rng([seed, stream]): the classes first (no image read), then the pool
CLASS_STREAM, POOL_STREAM = 1, 2


def add_options(parser: argparse.ArgumentParser):
    parser.add_argument("--long-tail", type=float, metavar="R", help="unlabeled pool's class sizes fall "
                        "geometrically, largest / smallest = R (which classes are large is seeded)")
    parser.add_argument("--open-set-classes", type=int, metavar="N", help="N classes (seeded) left out of the class "
                        "list and of labeled/val/test; their images make --open-set-fraction of the unlabeled pool")
    parser.add_argument("--open-set-fraction", type=float, metavar="F", help="the open-set images' share of the "
                        "unlabeled pool, 0 < F < 1 (with --open-set-classes)")
    parser.add_argument("--unlabeled-size", type=int, metavar="N", help="an unlabeled pool of N images, a seeded "
                        "subsample (balanced over its classes unless --long-tail)")


def check(args, num_classes: int):
    """Refuses a value or combination of the options, naming the option."""
    if args.long_tail is not None and not args.long_tail > 1:
        raise PrepareError(f"--long-tail {args.long_tail:g}: expected a ratio above 1 (largest / smallest class of "
                           "the unlabeled pool); leave it out for a pool as balanced as the source")
    if args.open_set_classes is not None and not 1 <= args.open_set_classes <= num_classes - 2:
        raise PrepareError(f"--open-set-classes {args.open_set_classes}: expected 1 to {num_classes - 2} (at "
                           "least two classes stay in the class list)")
    if (args.open_set_classes is None) != (args.open_set_fraction is None):
        given, missing = (("--open-set-classes", "--open-set-fraction") if args.open_set_fraction is None
                          else ("--open-set-fraction", "--open-set-classes"))
        raise PrepareError(f"{given}: expected {missing} too (how many classes leave the class list, and the share "
                           "of the unlabeled pool their images make)")
    if args.open_set_fraction is not None and not 0 < args.open_set_fraction < 1:
        raise PrepareError(f"--open-set-fraction {args.open_set_fraction:g}: expected a share of the unlabeled pool "
                           "above 0 and below 1")
    if args.unlabeled_size is not None and args.unlabeled_size < 1:
        raise PrepareError(f"--unlabeled-size {args.unlabeled_size}: expected at least 1 image")


def given(args) -> str:
    """The pool options as typed, for the errors they cause: '--long-tail 10 --unlabeled-size 5000'."""
    values = {"--long-tail": args.long_tail, "--open-set-classes": args.open_set_classes,
              "--open-set-fraction": args.open_set_fraction, "--unlabeled-size": args.unlabeled_size}
    return " ".join(f"{option} {value:g}" for option, value in values.items() if value is not None)


def seeded_classes(args, num_classes: int) -> tuple[list[int], list[int]]:
    """(the open-set classes, the other classes largest pool first: in class order without --long-tail),
    both drawn from the seed alone."""
    rng = np.random.default_rng([args.seed, CLASS_STREAM])
    open_set = sorted(rng.choice(num_classes, args.open_set_classes, replace=False).tolist()) \
        if args.open_set_classes else []
    listed = [c for c in range(num_classes) if c not in open_set]
    return open_set, (rng.permutation(listed).tolist() if args.long_tail else listed)


def recorded(args, classes: list[str]) -> dict:
    """The dataset record's `variant`: the options given and what the seed made of them (empty without any)."""
    if not given(args):
        return {}
    open_set, by_size = seeded_classes(args, len(classes))
    record = {"long_tail": args.long_tail, "unlabeled_size": args.unlabeled_size}
    if args.long_tail:
        record["classes_largest_pool_first"] = [classes[c] for c in by_size]
    if open_set:
        record |= {"open_set_classes": [classes[c] for c in open_set], "open_set_fraction": args.open_set_fraction}
    return {"variant": {key: value for key, value in record.items() if value is not None}}


def pool_sizes(args, available: np.ndarray, classes: list[str]) -> np.ndarray:
    """Each class's images in the unlabeled pool, from `available` (per class, after the labeled and val
    draws): the listed classes as balanced as `available` (all of it without --unlabeled-size) or falling
    geometrically (--long-tail: the largest pool as large as every class can give), the open-set classes
    evenly sharing --open-set-fraction of the whole."""
    open_set, by_size = seeded_classes(args, len(classes))
    weights = np.zeros(len(classes))
    weights[by_size] = args.long_tail ** (-np.arange(len(by_size)) / (len(by_size) - 1)) if args.long_tail else 1
    fraction = args.open_set_fraction or 0
    if args.unlabeled_size:
        open_total = round(fraction * args.unlabeled_size)
        sizes = apportion(weights, args.unlabeled_size - open_total)
    else:
        sizes = np.zeros(len(classes), np.int64)
        if args.long_tail:
            largest = np.floor(min(available[c] / weights[c] for c in by_size))
            sizes[by_size] = np.round(largest * weights[by_size])
        else:
            sizes[by_size] = available[by_size]
        open_total = round(fraction * sizes.sum() / (1 - fraction))
    if open_set:
        sizes += apportion(np.isin(np.arange(len(classes)), open_set).astype(float), open_total)
    pooled = by_size + open_set
    short = [c for c in pooled if sizes[c] > available[c]]
    if short:
        c = short[0]
        raise PrepareError(f"{given(args)}: class {classes[c]!r} would give {sizes[c]} images to the unlabeled pool "
                           f"but has {available[c]} left after the labeled and val draws "
                           f"({len(short)} class(es) short)")
    empty = [c for c in pooled if sizes[c] < 1]
    if empty:
        raise PrepareError(f"{given(args)}: class {classes[empty[0]]!r} would give no image to the unlabeled pool "
                           f"({len(empty)} class(es) without one): expected at least one image of each class")
    return sizes


def subsample(args, pool: np.ndarray, labels: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The rows of `pool` kept: sizes[c] of each class c (labels[row]), seeded."""
    rng = np.random.default_rng([args.seed, POOL_STREAM])
    return np.concatenate([rng.permutation(pool[labels[pool] == c])[:n] for c, n in enumerate(sizes)])
