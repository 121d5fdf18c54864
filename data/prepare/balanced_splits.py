"""Class-balanced, seeded splits of labeled rows: per-class counts drawn in order from a shuffle."""
from __future__ import annotations

import numpy as np

from data.prepare_messages import PrepareError


def draw_per_class(labels: np.ndarray, classes: list[str], takes: dict, rng, noun: str) -> dict:
    """Row indices per split: `takes` maps split name -> per-class counts, drawn in order; the rest is 'unlabeled'."""
    drawn = {name: [] for name in takes} | {"unlabeled": []}
    for c, class_name in enumerate(classes):
        rows = rng.permutation(np.flatnonzero(labels == c))
        wanted = {name: int(counts[c]) for name, counts in takes.items()}
        if sum(wanted.values()) > len(rows):
            request = " + ".join(f"{name} {n}" for name, n in wanted.items())
            raise PrepareError(f"class {class_name!r} has {len(rows)} {noun}s, fewer than the "
                               f"{sum(wanted.values())} requested ({request})")
        start = 0
        for name, n in wanted.items():
            drawn[name].append(rows[start:start + n])
            start += n
        drawn["unlabeled"].append(rows[start:])
    return {name: np.concatenate(parts) if parts else np.empty(0, np.int64) for name, parts in drawn.items()}


def stratified_counts(available: np.ndarray, total: int) -> np.ndarray:
    """Splits `total` across classes in proportion to `available` (largest remainders get the leftovers)."""
    if total > available.sum():
        raise PrepareError(f"--val-size {total}: only {available.sum()} images are left after the labeled split")
    return apportion(available, total)


def apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """`total` split into whole counts in proportion to `weights` (largest remainders get the leftovers)."""
    exact = total * weights / weights.sum() if weights.sum() > 0 else np.zeros(len(weights))
    counts = np.floor(exact).astype(np.int64)
    leftover = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:leftover]] += 1
    return counts


def draw_from_labeled(labels: np.ndarray, classes: list[str], takes: dict, seed: int) -> dict:
    """Row indices of `labels` per split: val/test per `takes` (per-class counts), drawn seeded per class;
    every class keeps at least one labeled image."""
    per_class = np.bincount(labels, minlength=len(classes))
    wanted = sum(takes.values())
    short = np.flatnonzero(per_class <= wanted)
    if len(short):
        c = short[0]
        request = " + ".join(f"{name} {n}" for name, n in takes.items())
        draw = f" after the {request} drawn from it" if takes else ""
        raise PrepareError(f"class {classes[c]!r} has {per_class[c]} readable labeled images: expected at least "
                           f"{wanted + 1}, one to train on{draw} ({len(short)} class(es) short)")
    drawn = draw_per_class(labels, classes, {name: np.full(len(classes), n) for name, n in takes.items()},
                           np.random.default_rng(seed), "readable labeled image")
    drawn["labeled"] = drawn.pop("unlabeled")
    return drawn
