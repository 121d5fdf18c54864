"""The FixMatch loss: supervised cross-entropy + lambda_u x confidence-masked pseudo-label cross-entropy."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class FixmatchLoss:
    total: torch.Tensor          # supervised + lambda_u * unsupervised (what is back-propagated)
    supervised: torch.Tensor     # cross-entropy on the labeled batch
    unsupervised: torch.Tensor   # masked cross-entropy on the strong views
    pseudo_labels: torch.Tensor  # argmax of the weak view's prediction, per unlabeled image
    mask: torch.Tensor           # 1.0 where that prediction's probability reaches the threshold


def fixmatch_loss(logits_labeled: torch.Tensor, labels: torch.Tensor, logits_weak: torch.Tensor,
                  logits_strong: torch.Tensor, threshold: float, lambda_u: float) -> FixmatchLoss:
    """Weak-view predictions become hard targets for the strong views (no gradient through them).

    The unsupervised term is averaged over the whole unlabeled batch, masked images counting as 0,
    so its weight falls when few predictions are confident. Logits are taken in float32.
    """
    supervised = F.cross_entropy(logits_labeled.float(), labels)
    with torch.no_grad():
        confidence, pseudo_labels = torch.softmax(logits_weak.detach().float(), dim=1).max(dim=1)
        mask = (confidence >= threshold).float()
    per_image = F.cross_entropy(logits_strong.float(), pseudo_labels, reduction="none")
    unsupervised = (per_image * mask).mean()
    return FixmatchLoss(supervised + lambda_u * unsupervised, supervised, unsupervised, pseudo_labels, mask)


# What a FixMatch epoch reports, summed step by step (trainer.loop.EpochSums) and divided at its end.
EPOCH_SUMS = ("loss", "loss_s", "loss_u", "steps", "unlabeled", "masked", "pseudo_hits", "masked_pseudo_hits")


@torch.no_grad()
def step_sums(out: FixmatchLoss, hidden_labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One step's contribution to EPOCH_SUMS. Hidden labels (simulations only) measure the pseudo-labels;
    they never train."""
    mask = out.mask.double()
    hits = torch.zeros_like(mask) if hidden_labels is None else (out.pseudo_labels == hidden_labels).double()
    return {"loss": out.total, "loss_s": out.supervised, "loss_u": out.unsupervised, "steps": torch.ones_like(mask[0]),
            "unlabeled": torch.full_like(mask[0], len(mask)), "masked": mask.sum(), "pseudo_hits": hits.sum(),
            "masked_pseudo_hits": (hits * mask).sum()}


def epoch_summary(sums: dict[str, float], has_hidden: bool) -> dict:
    """Per-epoch means from the EPOCH_SUMS totals."""
    steps = max(sums["steps"], 1)
    out = {"loss": sums["loss"] / steps, "loss_s": sums["loss_s"] / steps, "loss_u": sums["loss_u"] / steps,
           "mask_rate": sums["masked"] / max(sums["unlabeled"], 1)}
    if has_hidden:
        out["pseudo_acc"] = sums["pseudo_hits"] / max(sums["unlabeled"], 1)
        out["pseudo_acc_masked"] = sums["masked_pseudo_hits"] / sums["masked"] if sums["masked"] else None
    return out
