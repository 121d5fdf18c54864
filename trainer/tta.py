"""Multi-scale test-time augmentation: a classifier's softmax probabilities averaged over views of an
image at several scales, with top-1/top-5 counted per scale and per subset of the scales, and the
subset chosen on val.
"""
from __future__ import annotations

import itertools

import torch

from trainer import dist
from trainer.dist import Runtime
from trainer.predict import outputs


def tta_probabilities(per_scale: torch.Tensor) -> torch.Tensor:
    """(scales, N, C) softmax probabilities -> (N, C) their mean over the scales."""
    return per_scale.mean(0)


def scale_probabilities(model, views) -> torch.Tensor:
    """(scales, N, C): the model's softmax on each scale's view of the batch."""
    return torch.stack([torch.softmax(model(v).float(), 1) for v in views])


def scale_subsets(num_scales: int, mode: str) -> list[tuple[int, ...]]:
    """TTA candidates as tuples of scale indices: all the scales, or (mode "val") every non-empty
    subset, fewest scales first so that a tie on val goes to the cheaper one."""
    if mode == "all":
        return [tuple(range(num_scales))]
    return [c for size in range(1, num_scales + 1) for c in itertools.combinations(range(num_scales), size)]


@torch.no_grad()
def hit_counts(model, loader, labels, num_scales: int, subsets, rt: Runtime, precision: str) -> torch.Tensor:
    """(scales + subsets, 3) top-1 hits, top-5 hits and images per scale, then per TTA subset, summed over ranks."""
    model.eval()
    counts = torch.zeros(num_scales + len(subsets), 3, dtype=torch.float64)
    for index, per_scale in outputs(lambda views: scale_probabilities(model, views), loader, rt, precision):
        probs = torch.cat([per_scale, *(tta_probabilities(per_scale[list(s)])[None] for s in subsets)])
        y = torch.from_numpy(labels[index.numpy()])
        hit = probs.topk(min(5, probs.shape[2]), dim=2).indices == y[None, :, None]
        batch = torch.stack([hit[..., 0].sum(1), hit.any(2).sum(1), torch.full((len(probs),), len(y))], 1)
        counts += batch.double()
    return dist.all_reduce_(counts)


def top1_top5(counts: torch.Tensor, num_scales: int, subsets) -> tuple[list[dict], dict]:
    """hit_counts' rows as rates: ([{"top1", "top5"} per scale], {subset: {"top1", "top5"}})."""
    rates = [{"top1": (c[0] / c[2]).item(), "top5": (c[1] / c[2]).item()} for c in counts]
    return rates[:num_scales], dict(zip(subsets, rates[num_scales:]))


def best_subset(per_subset: dict) -> tuple[int, ...]:
    """The subset with the best top-1 (scored on val, it is the one test is scored with). max keeps the
    first of equals, and scale_subsets lists the fewest scales first."""
    return max(per_subset, key=lambda s: per_subset[s]["top1"])
