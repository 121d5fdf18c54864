"""BatchNorm recalibration: running statistics recomputed for a model's own weights on clean images."""
from __future__ import annotations

import itertools

import torch


def recalibrate(model: torch.nn.Module, loader, batches: int, device: torch.device):
    """Running statistics of `model`'s own weights, averaged over `batches` batches of `loader`'s first
    view (torch's SWA helper). An EMA copies the live model's buffers, which belong to other weights and,
    in FixMatch, to a batch that is mostly strong views; evaluation sees clean images."""
    images = (batch["views"][0] for batch in itertools.islice(loader.epoch(0), batches))
    torch.optim.swa_utils.update_bn(images, model, device)
