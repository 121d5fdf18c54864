"""data.transforms.evaluate(size) as tensor operations, to the bit: Pillow's bilinear (antialiased) resize of
the shorter side to `size` in Pillow's 8-bit fixed-point arithmetic and pass order, the centre crop, / 255
and ImageNet mean/std, as a torch module (ScaleView) that TorchScript and ONNX can hold.

The resize is two integer matrices, one per axis (pillow_bilinear: Resample.c's coefficients), each pass
rounded back to 8 bits as Pillow does. Which pass comes first depends on the sizes and on Pillow's
version, so build_views tries both against the installed Pillow and says whether the view is exact.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from data.transforms import IMAGENET_MEAN, IMAGENET_STD, evaluate

PRECISION_BITS = 22         # Pillow's fixed point for 8-bit resampling (libImaging/Resample.c)


def pillow_bilinear(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) integer weights, in units of 2**-PRECISION_BITS, of Pillow's bilinear resize
    along one axis of an 8-bit image: precompute_coeffs and normalize_coeffs_8bpc of Resample.c, in the
    same double arithmetic (support widened by the scale when shrinking: antialiased)."""
    weights = np.zeros((out_size, in_size), np.int64)
    if in_size == out_size:   # Pillow skips the pass: the identity
        np.fill_diagonal(weights, 1 << PRECISION_BITS)
        return weights
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale   # the bilinear (triangle) filter's support is 1
    inverse = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [max(0.0, 1.0 - abs((x + xmin - center + 0.5) * inverse)) for x in range(xmax)]
        total = 0.0
        for w in k:   # summed in order, as Pillow does
            total += w
        for x, w in enumerate(k):
            w = w / total if total != 0.0 else w
            weights[xx, xmin + x] = int(0.5 + w * (1 << PRECISION_BITS))
    return weights


def fit_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left) of data.transforms' fit: torchvision's
    Resize(size) (shorter side to `size`) and CenterCrop(size), with their rounding."""
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_h, new_w = size, int(size * width / height)
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def _requantise(x: torch.Tensor) -> torch.Tensor:
    """A pass's float64 sums of 8-bit values x integer weights (exact) back to 8 bits as Pillow's clip8
    does: + half a unit, floor, clamp to 0..255."""
    return torch.floor((x + 2097152.0) / 4194304.0).clamp(0.0, 255.0)   # 2**21, 2**PRECISION_BITS


class ScaleView(nn.Module):
    """data.transforms.evaluate(size) of an (N, 3, H, W) float64 batch of 8-bit values: the resize and crop
    as a vertical and a horizontal pass of integer weights (rows (size, H), cols (W, size)), each rounded
    to 8 bits, in Pillow's order; then / 255 and ImageNet mean/std, as torchvision does them."""

    def __init__(self, size: int, rows: np.ndarray, cols: np.ndarray, vertical_first: bool):
        super().__init__()
        self.size = size
        self.vertical_first = vertical_first
        self.register_buffer("rows", torch.from_numpy(rows).double())
        self.register_buffer("cols", torch.from_numpy(cols).double().t().contiguous())
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1))

    def forward(self, levels: torch.Tensor) -> torch.Tensor:
        if self.vertical_first:
            x = _requantise(torch.matmul(_requantise(torch.matmul(self.rows, levels)), self.cols))
        else:
            x = _requantise(torch.matmul(self.rows, _requantise(torch.matmul(levels, self.cols))))
        x = x.float() * (1.0 / 255)   # ToDtype(float32, scale=True)
        return (x - self.mean) / self.std   # Normalize


def pixel_levels(images: List[Image.Image]) -> torch.Tensor:
    """Decoded RGB images of one size -> their (N, 3, H, W) uint8 pixel values."""
    return torch.stack([torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1) for im in images])


def build_views(scales: List[int], height: int, width: int, probes: List[Image.Image]) -> tuple[list, list]:
    """One ScaleView per scale for H x W images, and whether it equals data.transforms.evaluate(scale) to
    the bit on `probes` (images of that size); of the two pass orders, the one closer to the installed
    Pillow on them."""
    levels = pixel_levels(probes).double()
    views, exact = [], []
    for size in scales:
        new_h, new_w, top, left = fit_geometry(height, width, size)
        rows = pillow_bilinear(height, new_h)[top:top + size]
        cols = pillow_bilinear(width, new_w)[left:left + size]
        reference = torch.stack([evaluate(size)(im) for im in probes])
        candidates = []
        for vertical_first in (False, True):
            view = ScaleView(size, rows, cols, vertical_first)
            with torch.no_grad():
                gap = (view(levels) - reference).abs().max().item()
            candidates.append((gap, vertical_first, view))
        gap, _, view = min(candidates, key=lambda c: c[0])
        views.append(view)
        exact.append(gap == 0.0)
    return views, exact
