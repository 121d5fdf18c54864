"""Semi-supervised algorithms, chosen by name (fixmatch.variant): launch/fixmatch.py builds the loaders, the
model and its optimizer, then `ALGORITHMS[name](setup)`, and trains with its `train_step`.

An algorithm writes its loss and nothing else: from the logits of a labeled batch and of the weak and
strong views of an unlabeled one, the supervised and unsupervised terms and each unlabeled image's
pseudo-label and weight (SemiSupervisedLoss). The base class does the rest alike for every algorithm: one
forward over [labeled, weak, strong], the optimizer step, the EMA of the weights, the epoch's sums and the
choice between the EMA and the live weights on val. What must survive a restart is in `state`, by name (not
the recipe's own: model, optimizer, scaler, best);
the recipe registers it with trainer.runtime.loop, so a killed run of any algorithm resumes where it
stopped without code of its own. An entry is what, called with the Setup, returns the Algorithm: a
subclass itself, or a function (as the FixMatch variants, trainer/algorithms/fixmatch.py, register):

    @register("mine")
    class Mine(Algorithm):
        def __init__(self, setup):
            super().__init__(setup)
            self.state["my_statistics"] = ...   # an object with state_dict() / load_state_dict()

        def loss(self, logits_labeled, labels, logits_weak, logits_strong, index) -> SemiSupervisedLoss: ...
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.algorithms import batchnorm
from trainer.algorithms.ema import EMA
from trainer.runtime.registry import SEMI_SUPERVISED as ALGORITHMS
from trainer import dist
from trainer.runtime import amp
from trainer.runtime.config import FixmatchConfig
from trainer.runtime.loop import BestModel, EpochSums, Stateful
from trainer.runtime.predict import accuracy

register = ALGORITHMS.register


@dataclass
class Setup:
    """What the recipe built, that an algorithm trains with."""
    cfg: FixmatchConfig
    rt: dist.Runtime
    model: nn.Module      # not DDP-wrapped: the EMA follows its weights (train_step gets the wrapper)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: str
    num_classes: int
    num_unlabeled: int    # images in the unlabeled split: batch["index"] counts rows of it
    # the unlabeled images' hidden labels on the device (simulations only): they measure the pseudo-labels,
    # never train; None for real unlabeled data
    hidden_labels: torch.Tensor | None


@dataclass
class SemiSupervisedLoss:
    total: torch.Tensor          # what is back-propagated
    supervised: torch.Tensor     # the labeled batch's term
    unsupervised: torch.Tensor   # the unlabeled batch's term
    pseudo_labels: torch.Tensor  # the class each unlabeled image is taken for
    # the weight in [0, 1] of each pseudo-label (0 or 1 where a threshold decides), so that the logged mask
    # rate is the mean weight
    mask: torch.Tensor


class Algorithm:
    def __init__(self, setup: Setup):
        self.setup = setup
        self.ema = EMA(setup.model, setup.cfg.fixmatch.ema)
        self.sums = EpochSums(EPOCH_SUMS, setup.rt.device)
        self.state: dict[str, Stateful] = {"ema": self.ema, "epoch_sums": self.sums}

    def loss(self, logits_labeled: torch.Tensor, labels: torch.Tensor, logits_weak: torch.Tensor,
             logits_strong: torch.Tensor, index: torch.Tensor) -> SemiSupervisedLoss:
        """This step's loss; `index`: the unlabeled images' rows in their split."""
        raise NotImplementedError

    def train_step(self, network: nn.Module, labeled: dict, unlabeled: dict, step: int) -> dict[str, torch.Tensor]:
        """One update through `network` (the model, DDP-wrapped where there are ranks); what the Loop logs.
        One forward over [labeled, weak, strong], so that BatchNorm normalises with the whole batch's
        statistics. A step skipped for a non-finite loss (train.on_nan=skip) adds nothing to the sums."""
        s, device = self.setup, self.setup.rt.device
        views = [labeled["views"][0], *unlabeled["views"]]
        sizes = [len(v) for v in views]
        x = torch.cat([v.to(device, non_blocking=True) for v in views])
        with amp.autocast(s.precision, device):
            logits_l, logits_w, logits_s = network(x).split(sizes)
        index = unlabeled["index"].to(device)
        out = self.loss(logits_l, labeled["label"].to(device), logits_w, logits_s, index)
        updated = amp.step_optimizer(out.total, s.optimizer, s.scaler, step, s.cfg.train.on_nan)
        self.ema.update(s.model)
        if updated:
            self.sums.add(step_sums(out, None if s.hidden_labels is None else s.hidden_labels[index]))
        return {"loss": out.total, "loss_s": out.supervised, "loss_u": out.unsupervised, "mask_rate": out.mask.mean()}

    def summarise_epoch(self) -> dict:
        """The epoch's means over every rank (losses, mask rate, pseudo-label accuracy); the sums restart."""
        return epoch_summary(self.sums.mean_over_ranks(), self.setup.hidden_labels is not None)

    def validate(self, val_loader, bn_loader, best: BestModel, epoch: int) -> dict[str, float]:
        """Val accuracy of the live and the EMA weights, each offered to `best`, which holds the starting
        model first: whatever the algorithm, its results replace that model only by beating it on this same
        val pass (trainer/runtime/keep.py). The EMA usually scores higher than the live weights, but not
        always: val chooses, a tie keeping the EMA. With `bn_loader` (fixmatch.bn_batches),
        the EMA is evaluated with BatchNorm statistics of its own weights on that loader's clean images."""
        s = self.setup
        live = accuracy(s.model, val_loader, s.rt, s.precision)
        if bn_loader is not None:
            batchnorm.recalibrate(self.ema.model, bn_loader, s.cfg.fixmatch.bn_batches, s.rt.device)
        averaged = accuracy(self.ema.model, val_loader, s.rt, s.precision)
        best.offer(averaged["top1"], epoch, self.ema.model, "EMA")
        best.offer(live["top1"], epoch, s.model, "live")
        return {"val_top1": live["top1"], "val_top1_ema": averaged["top1"], "val_top5_ema": averaged["top5"]}


# What an epoch reports, summed step by step (trainer.runtime.loop.EpochSums) and divided at its end.
EPOCH_SUMS = ("loss", "loss_s", "loss_u", "steps", "unlabeled", "masked", "pseudo_hits", "masked_pseudo_hits")


@torch.no_grad()
def step_sums(out: SemiSupervisedLoss, hidden_labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One step's contribution to EPOCH_SUMS; `hidden_labels` (of this step's unlabeled images) measure the
    pseudo-labels."""
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
