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

from torch import nn

from trainer.algorithms.registry import SELF_SUPERVISED as METHODS
from trainer.runtime.config import PretrainConfig
from trainer.runtime.models import BarlowTwins

register = METHODS.register


@dataclass(frozen=True)
class Method:
    views: str   # the loader kind whose views a batch holds (data/views.py)
    build: Callable[[nn.Module, PretrainConfig, int], nn.Module]   # (backbone, cfg, global batch) -> the model


register("barlow_twins")(Method(
    views="barlow_twins",
    build=lambda backbone, cfg, global_batch: BarlowTwins(backbone, cfg.barlow.projector, cfg.barlow.lambd,
                                                           global_batch)))
