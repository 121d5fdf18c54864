"""A stage's length as a time budget (train.minutes) or in steps (train.steps): the run trains that long and
its learning-rate schedule ends where the run does, a killed budgeted run resuming with the same schedule."""
import json
import math
import os
from types import SimpleNamespace

import pytest

from tiny import ROOT, kill_after_checkpoint, stage
from trainer.runtime import checkpoint, schedule

LR = 0.05   # sgd.lr_backbone: param group 0's base learning rate
# a fine-tune from random weights on 40 labeled images: 5 steps per epoch of batch 8, no warm-up, a
# cosine down to 0
FINETUNE = ["--config", os.path.join(ROOT, "configs", "demo", "finetune.yaml"), "finetune.backbone=random",
            "model.width=8", "train.batch_size=8", "train.precision=fp32", "data.backend=torch", "data.workers=0",
            f"sgd.lr_backbone={LR}", "sgd.warmup_epochs=0", "run.log_every=1", "finetune.eval_every=2"]
STEPS_PER_EPOCH = 5


def finetune_args(data, run_dir, *overrides) -> list[str]:
    return [*FINETUNE, f"data.root={data}", f"run.dir={run_dir}", *overrides]


def events(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def last_lr_of(total: int) -> float:
    """The lr of a run's last step (step total - 1, counted from 0): the cosine from LR to 0 over `total`."""
    return LR * 0.5 * (1 + math.cos(math.pi * (total - 1) / total))


def step_lrs(run_dir) -> dict[int, float]:
    """Each step's logged lr; a step logged twice (redone after a resume) keeps its last line."""
    return {e["step"]: e["lr"] for e in events(run_dir) if "lr" in e}


# ---- the length without a stage ----

def test_plan_takes_steps_over_epochs_and_caps_them_by_max_steps():
    train = SimpleNamespace(epochs=3, steps=0, max_steps=0, warmup_steps=0)
    assert schedule.plan(train, 0.5, 10) == (30, 5)
    assert schedule.plan(SimpleNamespace(epochs=3, steps=70, max_steps=0, warmup_steps=5), 0.5, 10) == (70, 5)
    assert schedule.plan(SimpleNamespace(epochs=3, steps=70, max_steps=40, warmup_steps=5), 0.5, 10) == (40, 5)
    # warm-up <= total
    assert schedule.plan(SimpleNamespace(epochs=3, steps=4, max_steps=0, warmup_steps=5), 0.5, 10) == (4, 4)


def test_a_length_in_steps_has_its_warm_up_in_steps_whatever_the_pile():
    for steps_per_epoch in (10, 1000):   # a small pile and a large one: the same warm-up
        assert schedule.plan(SimpleNamespace(epochs=3, steps=700, max_steps=0, warmup_steps=50), 10,
                             steps_per_epoch) == (700, 50)
    # warmup_steps applies to lengths in steps only: a length in epochs keeps its warm-up in epochs
    assert schedule.plan(SimpleNamespace(epochs=3, steps=0, max_steps=0, warmup_steps=50), 0.5, 10) == (30, 5)


class Clock:
    """A clock the test moves: each step below takes the seconds it is told."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def take_steps(budget: schedule.TimeBudget, clock: Clock, first: int, last: int, seconds: float) -> list[int]:
    """Steps first..last of `seconds` each; the steps after which the budget asked to be sized, sized then."""
    asked = []
    for step in range(first, last + 1):
        clock.now += seconds
        if budget.due(step):
            asked.append(step)
            budget.sized(budget.estimate(step)[0], step)
    return asked


def test_the_budget_sizes_the_run_after_ten_timed_steps_then_only_shortens_it():
    clock = Clock()
    budget = schedule.TimeBudget(1.0, planned=1000, clock=clock)
    budget.start()
    clock.now += 5.0   # set-up inside the loop (the first batch): spent, not timed
    assert take_steps(budget, clock, 1, 11, 1.0) == [11]   # the first step not timed, then ten
    # 16 s spent after 11 steps, 1 s a step: 44 more fit
    assert (budget.total, budget.estimates) == (55, 1)
    # the steps slow to 2 s from step 12: at step 27 (half of 55) the rate of steps 2..27 (42 s over 26 steps)
    # leaves (60 - 48) / (42 / 26) = 7.4 steps; at step 34 the run ends before three quarters need a new one
    assert take_steps(budget, clock, 12, 34, 2.0) == [27]
    assert (budget.total, budget.estimates) == (27 + 7, 2)

    faster = schedule.TimeBudget(1.0, planned=1000, clock=clock)
    faster.start()
    take_steps(faster, clock, 1, 11, 1.0)   # 11 s spent after 11 steps: 49 more fit
    assert faster.total == 60
    take_steps(faster, clock, 12, 60, 0.25)   # more steps would fit now: the schedule is not stretched
    assert (faster.total, faster.estimates) == (60, 4)

    capped = schedule.TimeBudget(1.0, planned=30, clock=clock)
    capped.start()
    take_steps(capped, clock, 1, 11, 1.0)
    assert capped.total == 30   # more fit the budget than were planned


def test_a_machine_that_slows_after_half_way_still_ends_the_run_on_time():
    clock = Clock()
    budget = schedule.TimeBudget(1.0, planned=1000, clock=clock)
    budget.start()
    clock.now += 5.0
    take_steps(budget, clock, 1, 27, 1.0)   # sized at 11 and, at the same rate, again at 27: 55 steps
    assert (budget.total, budget.estimates) == (55, 2)
    # from step 28 a step takes 2 s: at three quarters (41) the 14 steps since step 27 give the rate, and
    # the 60 s are spent: the run ends there instead of taking 28 s more at the average rate of the first 27
    assert take_steps(budget, clock, 28, 41, 2.0) == [41]
    assert budget.total == 41 and budget.spent() == pytest.approx(60.0)

    steady = schedule.TimeBudget(1.0, planned=1000, clock=clock)
    steady.start()
    clock.now += 5.0
    # at an unchanged rate the late estimates change nothing; the one at seven eighths (48) waits for ten
    # steps since the one at three quarters (41)
    assert take_steps(steady, clock, 1, 55, 1.0) == [11, 27, 41, 51]
    assert steady.total == 55 and steady.spent() == pytest.approx(60.0)


def test_the_budget_counts_the_time_of_earlier_processes():
    clock = Clock()
    killed = schedule.TimeBudget(2.0, planned=1000, clock=clock)
    killed.start()
    take_steps(killed, clock, 1, 21, 1.0)
    saved = killed.state_dict()
    assert saved == {"total": 120, "estimates": 1, "spent": 21.0}

    resumed = schedule.TimeBudget(2.0, planned=1000, clock=clock)
    resumed.load_state_dict(saved)
    clock.now += 3600   # the hour between the kill and the rerun is not the run's
    resumed.start()
    # half way (60) at 1 s a step: sized for the 120 - 21 - 39 s left at step 60, as the first process would
    assert take_steps(resumed, clock, 22, 70, 1.0) == [60]
    assert resumed.total == 120 and resumed.spent() == pytest.approx(21 + 49)


# ---- the stages ----

def test_a_time_budget_stops_the_run_where_its_schedule_ends(data, tmp_path):
    budget_s = 3.0
    proc = stage("finetune", *finetune_args(data, tmp_path, "train.epochs=1000", f"train.minutes={budget_s / 60}"))
    out = proc.stdout + proc.stderr
    sized = [e for e in events(tmp_path) if e.get("event") == "time_budget"]
    # sized after 10 timed steps, then half way (and later ones, only shortening)
    assert [e["step"] for e in sized][:2] == [11, max(12, sized[0]["total"] // 2)]
    assert all(e["total"] <= before["total"] for before, e in zip(sized, sized[1:]))
    total = sized[-1]["total"]
    assert total <= sized[0]["total"] and f"-> {sized[0]['total']:,} steps" in out
    lrs = step_lrs(tmp_path)
    assert sorted(lrs) == list(range(1, total + 1)) and total < 1000 * STEPS_PER_EPOCH   # stopped before its epochs
    assert lrs[total] == pytest.approx(last_lr_of(total), rel=1e-6, abs=1e-12)   # the schedule's end
    assert all(later <= earlier for earlier, later in zip(lrs.values(), list(lrs.values())[1:]))
    # the steps that fit the budget at the measured rate (exactly so at most: the first step's time is
    # spent, not timed); within a factor of it at least, whatever the machine's load
    rate = sized[1]["s_per_step"]   # the average over the first half of the run
    assert budget_s / rate / 4 <= total <= budget_s / rate + 1
    finals = [e for e in events(tmp_path) if e.get("step") == total and "val_top1" in e and "event" not in e]
    assert len(finals) == 1   # the last (partial) epoch is evaluated
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["state"]["time_budget"]["total"] == total
    assert (tmp_path / "model.pt").exists()


def test_a_killed_budgeted_run_resumes_with_its_total_and_its_time_spent(data, tmp_path):
    args = finetune_args(data, tmp_path, "train.epochs=1000", "train.minutes=0.2", "run.checkpoint_every=1")
    killed_at = kill_after_checkpoint("finetune", args, tmp_path, min_step=12)   # sized at step 11
    before = checkpoint.load(str(tmp_path / "checkpoint.pt"))["state"]["time_budget"]
    assert before["total"] > killed_at and before["estimates"] >= 1

    resumed = stage("finetune", *args)
    out = resumed.stdout + resumed.stderr
    assert f"{before['spent'] / 60:.3g} min spent, {before['total']:,} steps as sized" in out
    assert "the steps are sized after" not in out   # not measured again from scratch
    after = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    budget = after["state"]["time_budget"]
    assert budget["estimates"] >= 2 and budget["spent"] > before["spent"]
    total = budget["total"]
    assert after["step"] == total and total <= before["total"]
    lrs = step_lrs(tmp_path)
    assert sorted(lrs) == list(range(1, total + 1))
    # the first step after the resume follows the saved total's cosine, not the planned 5,000 steps'
    assert lrs[killed_at + 1] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * killed_at / before["total"])),
                                               rel=1e-6)
    assert lrs[total] == pytest.approx(last_lr_of(total), rel=1e-6, abs=1e-12)


def test_train_steps_sets_the_length_and_the_schedule_ends_there(data, tmp_path):
    # steps wins over epochs: 3 epochs would be 15 steps; 7 are one epoch and two steps of the next
    stage("finetune", *finetune_args(data, tmp_path, "train.steps=7", "train.epochs=3", "finetune.eval_every=1"))
    lrs = step_lrs(tmp_path)
    assert sorted(lrs) == list(range(1, 8))
    assert lrs[7] == pytest.approx(last_lr_of(7), rel=1e-6)
    assert lrs[1] == pytest.approx(LR)   # step 0 of a cosine over 7 steps
    evaluated = [e["step"] for e in events(tmp_path) if "val_top1" in e and "event" not in e]
    assert evaluated == [5, 7]   # each pass's end, and the run's
    saved = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert saved["step"] == 7 and "time_budget" not in saved["state"]   # no budget, no budget state
