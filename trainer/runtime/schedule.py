"""Learning-rate schedule: linear warm-up, then cosine decay to a small fraction (Barlow Twins style).

The factor multiplies each param group's `base_lr`. Scaling the base learning rates by
global_batch / 256 is the caller's job, done once when the groups are built, e.g.
`lars_param_groups(model, 0.2 * B / 256, 0.0048 * B / 256, wd)`.
"""
import math
from data.errors import InputError


def plan(epochs: int, max_steps: int, warmup_epochs: float, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, warm-up steps): epochs x steps_per_epoch, capped by max_steps when it is set."""
    total = epochs * steps_per_epoch
    if max_steps:
        total = min(total, max_steps)
    return total, min(int(warmup_epochs * steps_per_epoch), total)


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
