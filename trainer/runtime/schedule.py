"""Learning-rate schedule: linear warm-up, then cosine decay to a small fraction (Barlow Twins style),
over a run whose length is planned in steps (`plan`) and, under a time budget, sized to it (`TimeBudget`).

The factor multiplies each param group's `base_lr`. Scaling the base learning rates by
global_batch / 256 is the caller's job, done once when the groups are built, e.g.
`lars_param_groups(model, 0.2 * B / 256, 0.0048 * B / 256, wd)`.

A time budget (train.minutes) sets the run's length, not a deadline that cuts it: the cosine must end
when the time does, so the length is estimated early and the schedule runs to it. The loop (loop.Loop)
times its steps and rank 0 sizes the run up to four times, every rank taking its total, at steps that
step counts alone fix (so every rank stops at the same one):
- after TIMED_STEPS steps of this process, not counting its first (loader start-up, kernel choice):
  total = the steps that fit the time left at the measured rate, at most the planned length (train.steps
  or train.epochs, and train.max_steps). Steps alone, not a share of the planned length: a planned
  length far beyond the budget would otherwise spend the budget measuring.
- at half of that total, at the rate of every step since, the end-of-epoch work (evaluation,
  checkpoints) that ran among them included; then at three quarters and seven eighths of the total, at
  the rate of the steps since the estimate before (at least TIMED_STEPS of them): a machine that slows
  late (a shared host, a throttled card) would otherwise run the rest at a rate it no longer has.
  These estimates only shorten the run: the first one, which saw little or none of the end-of-epoch
  work, mostly errs long, and a longer run would raise a cosine already on its way down; a shorter one
  only steepens it. The price: when the first steps ran slower than the later ones, part of the budget
  goes unused rather than the schedule rising again.
The warm-up keeps its length in steps (it tames the first updates, whatever the run's length), at most
the sized total, as under train.max_steps. The budget counts the training loop's time (steps, end-of-
epoch work, checkpoints), not a stage's set-up; the total and the time spent are kept in the checkpoint
(under "time_budget"), so a resumed run keeps its schedule and the time before the kill counts. End-of-
epoch work the estimates never saw (an epoch longer than half the run) runs past the budget.
"""
import math
import time

from data.errors import InputError


def plan(train, warmup_epochs: float, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, warm-up steps) of a stage whose `train` section (config.TrainConfig) is given:
    train.steps with train.warmup_steps, or train.epochs x steps_per_epoch with warmup_epochs when it is 0;
    the total capped by train.max_steps when it is set, the warm-up by the total."""
    total = train.steps or train.epochs * steps_per_epoch
    if train.max_steps:
        total = min(total, train.max_steps)
    warmup = train.warmup_steps if train.steps else int(warmup_epochs * steps_per_epoch)
    return total, min(warmup, total)


def lr_factor(step: int, total_steps: int, warmup_steps: int, final_factor: float = 0.001) -> float:
    """step / warmup_steps while warming up, then a cosine from 1 down to final_factor at total_steps.

    Steps past total_steps stay at final_factor.
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise InputError(f"lr schedule: need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                         f"got total_steps={total_steps}, warmup_steps={warmup_steps}")
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cosine + final_factor * (1 - cosine)


def apply_lr(optimizer, factor: float) -> None:
    """Set every param group's lr to its base_lr * factor."""
    for group in optimizer.param_groups:
        if "base_lr" not in group:
            raise InputError("apply_lr: a param group has no 'base_lr' (build groups with "
                             "trainer.runtime.optim.lars_param_groups)")
        group["lr"] = group["base_lr"] * factor


class TimeBudget:
    """train.minutes as a length in steps (the module docstring says how and why); resumable by name in
    the loop's state. `planned`: the length without a budget, which the budget never exceeds."""

    TIMED_STEPS = 10   # steps timed before an estimate: fewer let one slow batch set the run's length
    ESTIMATES = 4      # after TIMED_STEPS, then at 1/2, 3/4 and 7/8 of the total

    def __init__(self, minutes: float, planned: int, clock=time.monotonic):
        self.minutes, self.planned, self.clock = minutes, planned, clock
        self.total = 0          # the sized length; 0 until the first estimate
        self.estimates = 0      # made so far: ESTIMATES at most
        self.spent_before = 0.0   # seconds of the loop in earlier processes of this run
        self._started = self._timed_from = None
        self._first_timed_step = 0
        self._window = (0.0, 0)   # (clock, step) the late estimates time from: the last sizing in this process

    def start(self):
        """The loop starts in this process: its time counts from here, its steps are timed after the first."""
        self._started, self._timed_from = self.clock(), None

    def spent(self) -> float:
        """Seconds of the budget spent, earlier processes of the run included."""
        return self.spent_before + self.clock() - self._started

    def due(self, step: int) -> bool:
        """Whether the step just taken (the run's `step`-th) is one to estimate after; the same on every rank."""
        if self._timed_from is None:
            self._timed_from, self._first_timed_step = self.clock(), step
            self._window = (self._timed_from, step)
            return False
        if step - self._first_timed_step < self.TIMED_STEPS:
            return False
        if self.estimates == 0:
            return True
        if self.estimates >= self.ESTIMATES or step < int(self.total * (1 - 0.5 ** self.estimates)):
            return False
        return self.estimates == 1 or step - self._window[1] >= self.TIMED_STEPS

    def estimate(self, step: int) -> tuple[int, float, int]:
        """(total steps, seconds per step, steps timed): the steps that fit the time left at the rate of this
        process's timed steps (the late estimates: of those since the last sizing), at most the planned
        length and any earlier estimate, at least `step`."""
        since, first = (self._timed_from, self._first_timed_step) if self.estimates <= 1 else self._window
        timed = step - first
        rate = (self.clock() - since) / timed
        fit = max(0, int((self.minutes * 60 - self.spent()) / rate))
        return min(self.total or self.planned, step + fit), rate, timed

    def sized(self, total: int, step: int):
        """Every rank takes rank 0's `total`, sized after the run's `step`-th step."""
        self.total, self.estimates = total, self.estimates + 1
        self._window = (self.clock(), step)

    def state_dict(self) -> dict:
        return {"total": self.total, "estimates": self.estimates, "spent": self.spent()}

    def load_state_dict(self, state: dict):
        self.total, self.estimates, self.spent_before = state["total"], state["estimates"], state["spent"]
