"""Self-supervised pretraining methods, chosen by name (pretrain.method): launch/pretrain.py builds the backbone,
the method wraps it in what its loss needs (a projector, say), and the stage trains the wrapper on batches of
the method's views and writes the backbone.

A method's model takes a batch's views, model(*views), and returns the loss over the global batch; whatever it
learns is its weights, which the stage saves and restores as the model's, so a method needs no code of its
own for kill/resume.

    register("mine")(Method(views="barlow_twins", build=lambda backbone, cfg, global_batch: Mine(backbone)))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from trainer.algorithms import losses
from trainer.runtime.registry import SELF_SUPERVISED as METHODS
from trainer.runtime.config import PretrainConfig

register = METHODS.register


@dataclass(frozen=True)
class Method:
    views: str   # the loader kind whose views a batch holds (data/views.py)
    build: Callable[[nn.Module, PretrainConfig, int], nn.Module]   # (backbone, cfg, global batch) -> the model


class BarlowTwins(nn.Module):
    """Backbone + projector; forward(view1, view2) returns the loss over the global batch."""

    def __init__(self, backbone: nn.Module, projector: list[int], lambd: float, global_batch: int):
        super().__init__()
        self.backbone = backbone
        sizes = [backbone.out_dim] + list(projector)
        layers = []
        for cin, cout in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(sizes[-1], affine=False)   # standardises z over the global batch
        self.lambd = lambd
        self.global_batch = global_batch

    def forward(self, y1, y2):
        p1, p2 = self.projector(self.backbone(y1)), self.projector(self.backbone(y2))
        with torch.autocast(p1.device.type, enabled=False):   # the correlation needs fp32
            return losses.barlow_twins(self.bn(p1.float()), self.bn(p2.float()), self.lambd, self.global_batch)



register("barlow_twins")(Method(
    views="barlow_twins",
    build=lambda backbone, cfg, global_batch: BarlowTwins(backbone, cfg.barlow.projector, cfg.barlow.lambd,
                                                           global_batch)))
