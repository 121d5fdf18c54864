"""Losses: Barlow Twins' redundancy reduction (the FixMatch loss and its variants: trainer/algorithms/fixmatch.py)."""
from __future__ import annotations

import torch

from trainer.dist import all_reduce_sum


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float, global_batch: int) -> torch.Tensor:
    """Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij², C the cross-correlation of the batch-standardised
    embeddings over the GLOBAL batch: each rank adds its share of C, summed across ranks."""
    c = all_reduce_sum(z1.T @ z2 / global_batch)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag
