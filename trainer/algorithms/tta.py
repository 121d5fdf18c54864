"""Test-time augmentation: a classifier's softmax probabilities averaged over views of an image at
several scales (and, as a candidate, their horizontal mirrors), with top-1/top-5 counted per scale and
per candidate, and the candidate chosen on val.

A candidate is (subset of the scales, mirrored): its views are the subset's scales, plus each of their
mirror images when mirrored. Rescaling helps large photos and hurts small images trained at one size;
mirrors help where a left-right flip preserves the class. Val decides, per model and dataset.
"""
from __future__ import annotations

import itertools

import torch

from trainer import dist
from trainer.dist import Runtime
from trainer.runtime.predict import outputs


def tta_probabilities(per_scale: torch.Tensor) -> torch.Tensor:
    """(scales, N, C) softmax probabilities -> (N, C) their mean over the scales."""
    return per_scale.mean(0)


def scale_probabilities(model, views, mirrored: bool = False) -> torch.Tensor:
    """(scales, N, C): the model's softmax on each scale's view of the batch; mirrored: (2 x scales, N, C),
    the views' horizontal mirrors after them."""
    views = [*views, *(v.flip(-1) for v in views)] if mirrored else views
    return torch.stack([torch.softmax(model(v).float(), 1) for v in views])


def scale_subsets(num_scales: int, mode: str) -> list[tuple[int, ...]]:
    """TTA candidates as tuples of scale indices: all the scales, or (mode "val") every non-empty
    subset, fewest scales first so that a tie on val goes to the cheaper one."""
    if mode == "all":
        return [tuple(range(num_scales))]
    return [c for size in range(1, num_scales + 1) for c in itertools.combinations(range(num_scales), size)]


def candidates(num_scales: int, mode: str, mirror: bool) -> list[tuple[tuple[int, ...], bool]]:
    """(scale subset, mirrored) pairs: scale_subsets' subsets, each also mirrored when `mirror`; fewest
    views first (a subset before its mirrored twin), so that a tie on val goes to the cheaper one."""
    pairs = [(s, m) for s in scale_subsets(num_scales, mode) for m in ((False, True) if mirror else (False,))]
    return sorted(pairs, key=lambda c: len(c[0]) * (1 + c[1]))


def candidate_views(candidate: tuple[tuple[int, ...], bool], num_scales: int) -> list[int]:
    """Rows of scale_probabilities(..., mirrored=True) that a candidate averages."""
    subset, mirrored = candidate
    return [*subset, *(num_scales + i for i in subset)] if mirrored else list(subset)


@torch.no_grad()
def hit_counts(model, loader, labels, num_scales: int, tried, rt: Runtime, precision: str) -> torch.Tensor:
    """(scales + candidates, 3) top-1 hits, top-5 hits and images per scale, then per TTA candidate
    (`tried`, from candidates()), summed over ranks."""
    model.eval()
    counts = torch.zeros(num_scales + len(tried), 3, dtype=torch.float64)
    mirrored = any(m for _, m in tried)
    for index, views in outputs(lambda v: scale_probabilities(model, v, mirrored), loader, rt, precision):
        probs = torch.cat([views[:num_scales],
                           *(tta_probabilities(views[candidate_views(c, num_scales)])[None] for c in tried)])
        y = torch.from_numpy(labels[index.numpy()])
        hit = probs.topk(min(5, probs.shape[2]), dim=2).indices == y[None, :, None]
        batch = torch.stack([hit[..., 0].sum(1), hit.any(2).sum(1), torch.full((len(probs),), len(y))], 1)
        counts += batch.double()
    return dist.all_reduce_(counts)


def top1_top5(counts: torch.Tensor, num_scales: int, tried) -> tuple[list[dict], dict]:
    """hit_counts' rows as rates: ([{"top1", "top5"} per scale], {candidate: {"top1", "top5"}})."""
    rates = [{"top1": (c[0] / c[2]).item(), "top5": (c[1] / c[2]).item()} for c in counts]
    return rates[:num_scales], dict(zip(tried, rates[num_scales:]))


def best_subset(per_candidate: dict):
    """The candidate with the best top-1 (scored on val, it is the one test is scored with). max keeps the
    first of equals, and candidates() lists the fewest views first."""
    return max(per_candidate, key=lambda c: per_candidate[c]["top1"])
