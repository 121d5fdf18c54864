"""The training loop every training stage runs: a stage supplies its step and its end-of-epoch work.

The loop owns the position in the data (epoch, step in it), the learning-rate schedule, the progress
bar with images/s, the metrics log (what the step returns, averaged over ranks every run.log_every
steps) and the checkpoints (every run.checkpoint_every steps inside an epoch, and at each epoch's end).
What must survive a restart is registered by name: any object with state_dict() / load_state_dict()
(model, optimizer, grad scaler, EMA, best model, per-epoch sums). A resumed run restores each by its
name and continues as if it had never stopped.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Protocol

import torch

from trainer import dist
from trainer.runtime import checkpoint, schedule


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class BestModel:
    """The weights of the best evaluation so far ("the starting model" competes when offered first; a tie
    keeps the earlier offer). `source` says which of several candidates of one epoch won (e.g. EMA, live)."""

    def __init__(self):
        self.top1, self.epoch, self.source, self.weights = -1.0, -1, "", None

    def offer(self, top1: float, epoch: int, model: torch.nn.Module, source: str = "") -> bool:
        if top1 <= self.top1:
            return False
        self.top1, self.epoch, self.source, self.weights = top1, epoch, source, copy.deepcopy(model.state_dict())
        return True

    def state_dict(self) -> dict:
        return {"top1": self.top1, "epoch": self.epoch, "source": self.source, "weights": self.weights}

    def load_state_dict(self, state: dict):
        self.top1, self.epoch, self.source, self.weights = (state["top1"], state["epoch"], state["source"],
                                                            state["weights"])


class EpochSums:
    """Named running sums over an epoch, kept on the device (no step waits for the host)."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names = names
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, values: dict[str, torch.Tensor]):
        self.sums += torch.stack([values[name].detach().double() for name in self.names])

    def mean_over_ranks(self) -> dict[str, float]:
        """Each sum averaged over the ranks (every rank runs the same steps), then the sums restart."""
        totals = dict(zip(self.names, dist.all_reduce_mean_(self.sums.clone()).tolist()))
        self.sums.zero_()
        return totals

    def state_dict(self) -> dict:
        return {"sums": self.sums}

    def load_state_dict(self, state: dict):
        self.sums.copy_(state["sums"])


class Loop:
    """`resume()` then `run_epochs()` trains from wherever the run dir's checkpoint left off to `total` steps.

    step(batch, step) -> {name: scalar tensor}: one update; what it returns is logged.
    end_of_epoch(epoch, step, img_s) -> {name: value}: evaluation and the like, logged with the epoch.
    """

    def __init__(self, run, loader, optimizer, state: dict[str, Stateful], *, total: int, warmup: int,
                 images_per_step: int, final_lr_factor: float = 0.001):
        self.run, self.loader, self.optimizer, self.state = run, loader, optimizer, state
        self.total, self.warmup, self.final_lr_factor = total, warmup, final_lr_factor
        self.images_per_step = images_per_step
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0

    def resume(self) -> bool:
        """Restore every registered object and the position from the run dir's checkpoint, if any."""
        saved = self.run.load_checkpoint(self.state["model"])
        if saved is None:
            return False
        missing = sorted(set(self.state) - set(saved["state"]))
        if missing:
            raise checkpoint.CheckpointError(f"{self.run.checkpoint_path}: holds no {missing[0]!r} state; it was "
                                             "written by another version of this stage: pass --restart")
        for name, obj in self.state.items():
            obj.load_state_dict(saved["state"][name])
        self.step, self.epoch, self.step_in_epoch = saved["step"], saved["epoch"], saved["step_in_epoch"]
        return True

    def save(self):
        self.run.save_checkpoint({name: obj.state_dict() for name, obj in self.state.items()}, self.step,
                                 self.epoch, self.step_in_epoch, self.state["model"])

    def run_epochs(self, step_fn: Callable, end_of_epoch: Callable | None = None):
        cfg, run = self.run.cfg.run, self.run
        bar = run.progress(self.total, self.step)
        while self.step < self.total:
            t0, done = time.time(), 0
            for i, batch in enumerate(self.loader.epoch(self.epoch, self.step_in_epoch), start=self.step_in_epoch):
                schedule.apply_lr(self.optimizer, schedule.lr_factor(self.step, self.total, self.warmup,
                                                                     self.final_lr_factor))
                metrics = step_fn(batch, self.step)
                self.step, done = self.step + 1, done + 1
                bar.update()
                if self.step % cfg.log_every == 0 or self.step == self.total:
                    values = dict(zip(metrics, dist.all_reduce_mean_(torch.stack(
                        [v.detach().float() for v in metrics.values()])).tolist()))
                    img_s = done * self.images_per_step / (time.time() - t0)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()} | {"img_s": f"{img_s:.0f}"})
                    run.log(epoch=self.epoch, step=self.step, **values, lr=self.optimizer.param_groups[0]["lr"],
                            img_s=round(img_s, 1))
                if self.step == self.total:
                    break
                if self.step % cfg.checkpoint_every == 0 and i + 1 < self.loader.steps_per_epoch:
                    self.step_in_epoch = i + 1
                    self.save()
            img_s = done * self.images_per_step / max(time.time() - t0, 1e-9)
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            event = end_of_epoch(self.epoch, self.step, img_s) if end_of_epoch else {}
            if event:
                run.log(epoch=self.epoch, step=self.step, **event)
            self.save()
        bar.close()
