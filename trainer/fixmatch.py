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
