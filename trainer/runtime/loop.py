"""The training loop every training stage runs: a stage supplies its step and its end-of-epoch work.

The loop owns the position in the data (epoch, step in it), the learning-rate schedule, the progress
bar with images/s, the metrics log (what the step returns, averaged over ranks every run.log_every
steps) and the checkpoints (every run.checkpoint_every steps, and at the run's end). A checkpoint holds
the work of every epoch that ended before it: a run resumed from one taken in an earlier epoch does the
later epochs' end-of-epoch work again, on the same state. What must survive a restart is registered by
name: any object with state_dict() / load_state_dict() (model, optimizer, grad scaler, EMA, best model,
per-epoch sums). A resumed run restores each by its name and continues as if it had never stopped.
A loss that is not finite (train.on_nan=stop) is looked for where the loop waits for the device anyway:
at each logged step, before each epoch's end work and before each checkpoint (amp.check_losses).
Each event the loop logs carries `images`, the images trained on so far: run.log's trackers plot by it.
"""
from __future__ import annotations

import copy
import itertools
import time
from typing import Callable, Protocol

import torch

from trainer import dist
from trainer.runtime import amp, checkpoint, schedule


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class BestModel:
    """The weights of the best evaluation so far: an offer replaces them only when it `beats` them, so a tie
    keeps the earlier offer. `source` says which of several candidates of one epoch won (e.g. EMA, live).
    A stage that takes a model in offers it first (`offer_input`): its own results must beat it, and the best
    of them is also kept apart (own_top1, own_epoch, own_source) for the stage's record (trainer/runtime/keep.py)."""

    INPUT = "start"   # the source of the input model's offer
    FIELDS = ("top1", "epoch", "source", "weights", "input_top1", "own_top1", "own_epoch", "own_source")

    def __init__(self):
        self.top1, self.epoch, self.source, self.weights = -1.0, -1, "", None
        self.input_top1 = None   # the input model's, once offered
        self.own_top1, self.own_epoch, self.own_source = -1.0, -1, ""

    @staticmethod
    def beats(top1: float, incumbent: float) -> bool:
        """The one rule of every choice by val: strictly higher replaces; a tie keeps the incumbent."""
        return top1 > incumbent

    def offer_input(self, top1: float, model: torch.nn.Module):
        """The model the stage took in, scored by the stage's own val pass, before anything the stage produced."""
        self.input_top1 = top1
        self._take(top1, 0, model, self.INPUT)

    def offer(self, top1: float, epoch: int, model: torch.nn.Module, source: str = "") -> bool:
        """One of the stage's own results; True when it is now the best of every offer."""
        if self.beats(top1, self.own_top1):
            self.own_top1, self.own_epoch, self.own_source = top1, epoch, source
        if not self.beats(top1, self.top1):
            return False
        self._take(top1, epoch, model, source)
        return True

    def _take(self, top1: float, epoch: int, model: torch.nn.Module, source: str):
        self.top1, self.epoch, self.source, self.weights = top1, epoch, source, copy.deepcopy(model.state_dict())

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state: dict):
        missing = [name for name in self.FIELDS if name not in state]
        if missing:
            raise checkpoint.CheckpointError(f"the checkpoint's best-model record holds no {missing[0]!r}: it was "
                                             "written by another version of this stage: pass --restart")
        for name in self.FIELDS:
            setattr(self, name, state[name])


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
    end_of_epoch(epoch, step, img_s) -> {name: value}: evaluation and the like, logged with the epoch; the
    last epoch's is the one where step == loop.total (read it there: a time budget sets it as the run goes).
    Under train.minutes, `total` is the most the run may take and the budget sizes it (schedule.TimeBudget).
    """

    def __init__(self, run, loader, optimizer, state: dict[str, Stateful], *, total: int, warmup: int,
                 images_per_step: int, final_lr_factor: float = 0.001):
        self.run, self.loader, self.optimizer, self.state = run, loader, optimizer, state
        self.total, self.warmup, self.final_lr_factor = total, warmup, final_lr_factor
        self.images_per_step = images_per_step
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        minutes = run.cfg.train.minutes
        self.budget = schedule.TimeBudget(minutes, total) if minutes else None
        if self.budget:   # only then: a run without a budget reads and writes the checkpoints it always did
            self.state = {**state, "time_budget": self.budget}

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
        if self.budget and self.budget.total:
            self._take_length(self.budget.total)
            self.run.say(f"time budget {self.budget.minutes:g} min: {self.budget.spent_before / 60:.3g} min spent, "
                         f"{self.total:,} steps as sized")
        return True

    def _take_length(self, total: int):
        """Train `total` steps: the schedule ends there (the warm-up too when it is no shorter)."""
        self.total, self.warmup = total, min(self.warmup, total)

    def _fit_budget(self, bar):
        """Rank 0 sizes the run to its time budget; every rank takes the length (schedule.TimeBudget)."""
        total, rate, timed = dist.rank0_decides(lambda: self.budget.estimate(self.step))
        first = not self.budget.estimates
        self.budget.sized(total, self.step)
        if first or total < self.total:
            self.run.say(f"time budget {self.budget.minutes:g} min -> {total:,} steps ({rate:.3g} s/step measured "
                         f"over {timed:,} steps{'' if first else ', end-of-epoch work included'}"
                         f"{', all that were planned' if total == self.budget.planned else ''})")
        self.run.log(event="time_budget", step=self.step, images=self.images, total=total, s_per_step=rate,
                     timed_steps=timed)
        self._take_length(total)
        bar.total = total
        bar.refresh()

    @property
    def images(self) -> int:
        """Images trained on so far (views: a step's images_per_step)."""
        return self.step * self.images_per_step

    def save(self):
        amp.check_losses()   # weights updated with a loss that is not finite are never saved
        self.run.save_checkpoint({name: obj.state_dict() for name, obj in self.state.items()}, self.step,
                                 self.epoch, self.step_in_epoch, self.state["model"])

    def run_epochs(self, step_fn: Callable, end_of_epoch: Callable | None = None):
        cfg, run = self.run.cfg.run, self.run
        bar = run.progress(self.total, self.step)
        if self.budget:
            self.budget.start()
            if not self.budget.total:
                run.say(f"time budget {self.budget.minutes:g} min: the steps are sized after "
                        f"{schedule.TimeBudget.TIMED_STEPS} timed ones (at most {self.total:,})")
        # one iterator over every epoch left: a DALI loader reads on across epochs instead of building a
        # pipeline per epoch (data.dali.DaliLoader.stream)
        spe = self.loader.steps_per_epoch
        batches = self.loader.stream(self.epoch * spe + self.step_in_epoch)
        while self.step < self.total:
            t0, done = time.time(), 0
            epoch_left = itertools.islice(batches, spe - self.step_in_epoch)
            for i, batch in enumerate(epoch_left, start=self.step_in_epoch):
                schedule.apply_lr(self.optimizer, schedule.lr_factor(self.step, self.total, self.warmup,
                                                                     self.final_lr_factor))
                metrics = step_fn(batch, self.step)
                self.step, done = self.step + 1, done + 1
                bar.update()
                if self.budget and self.budget.due(self.step):
                    self._fit_budget(bar)
                if self.step % cfg.log_every == 0 or self.step == self.total:
                    amp.check_losses()
                    values = dict(zip(metrics, dist.all_reduce_mean_(torch.stack(
                        [v.detach().float() for v in metrics.values()])).tolist()))
                    img_s = done * self.images_per_step / (time.time() - t0)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()} | {"img_s": f"{img_s:.0f}"})
                    run.log(epoch=self.epoch, step=self.step, images=self.images, **values,
                            lr=self.optimizer.param_groups[0]["lr"], img_s=round(img_s, 1))
                if self.step == self.total:
                    break
                if self.step % cfg.checkpoint_every == 0 and i + 1 < spe:
                    self.step_in_epoch = i + 1
                    self.save()
            img_s = done * self.images_per_step / max(time.time() - t0, 1e-9)
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            amp.check_losses()   # the epoch's work (a val pass, a best model) is not done on weights gone bad
            event = end_of_epoch(self.epoch, self.step, img_s) if end_of_epoch else {}
            if event:
                run.log(epoch=self.epoch, step=self.step, images=self.images, **event)
            # a checkpoint due at the epoch's last step comes after the epoch's work, so that it holds its
            # results; the run's end always has one (a rerun finds the training done)
            if self.step % cfg.checkpoint_every == 0 or self.step == self.total:
                self.save()
        bar.close()
