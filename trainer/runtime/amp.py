"""Mixed precision: choosing it (train.precision=auto), running under it, and stepping an optimizer with it.

Kept apart from trainer.runtime.engine (the command line and run dir) so that inference imports it alone.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import time

import torch

from data.errors import InputError
from trainer import dist
from trainer.runtime import config
from trainer.dist import Runtime

log = logging.getLogger(__name__)


def resolve_precision(precision: str, model: torch.nn.Module, batch: tuple[int, ...], rt: Runtime
                      ) -> tuple[str, dict[str, float]]:
    """train.precision=auto -> (a concrete precision, the seconds per step measured, if any). On a GPU:
    bf16 where the GPU computes it natively (bf16_native), fp16 elsewhere. On a CPU: whichever of fp32
    and bf16 autocast runs a training step of `model` (a copy: its weights and BatchNorm statistics stay
    untouched) on a random batch of this rank's `batch` shape faster, best of 3 after a warm-up; CPUs
    differ by 2x either way. Every rank measures (a synchronised BatchNorm's collectives stay in step)
    and takes rank 0's answer."""
    if precision != "auto":
        return precision, {}
    if rt.device.type == "cuda":
        return ("bf16" if bf16_native() else "fp16"), {}
    trial, x = copy.deepcopy(model).train(), torch.randn(batch, device=rt.device)
    seconds = {}
    for candidate in ("fp32", "bf16"):
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            with autocast(candidate, rt.device):
                trial(x).float().square().mean().backward()
            times.append(time.perf_counter() - t0)
        seconds[candidate] = min(times[1:])
    seconds = dist.broadcast_object(seconds)
    return min(seconds, key=seconds.get), seconds


def bf16_native() -> bool:
    """Whether the current GPU has bf16 tensor cores (compute capability 8.0 on): torch's plain
    is_bf16_supported() also says yes on GPUs that only emulate bf16 (V100, T4), far slower than fp16."""
    if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability() >= (8, 0)


def describe_precision(precision: str, measured: dict[str, float]) -> str:
    """For the stage's opening line: the precision, and what auto measured to choose it."""
    if not measured:
        return f"precision {precision}"
    return f"precision auto -> {precision} (" + ", ".join(f"{p} {1e3 * s:.0f} ms/step" for p, s in measured.items()) + ")"


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise config.ConfigError("train.precision: fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def grad_scaler(precision: str, device: torch.device):
    """Loss scaling only for fp16 (bf16 has fp32's range); disabled scalers pass through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


class NonFiniteLoss(InputError):
    """A loss that is NaN or infinite with train.on_nan=stop: a bad learning rate or data, printed as one line."""


class _UncheckedLosses:
    """train.on_nan=stop without a host sync per step: each step notes on the device whether its loss was
    finite (the first step since the last check whose loss was not, and that loss); `check` reads them
    where the caller waits for the device anyway."""

    def __init__(self):
        self.step = self.loss = None   # device scalars; step -1: every loss so far was finite

    def note(self, loss: torch.Tensor, step: int):
        loss = loss.detach().float().reshape(())
        if self.step is None:
            self.step = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self.loss = torch.zeros((), device=loss.device)
        first = ~torch.isfinite(loss) & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss, self.loss)

    def check(self):
        noted = torch.full((), -1) if self.step is None else self.step
        if not dist.all_reduce_((noted >= 0).float().reshape(1)).item():
            return
        mine = (int(noted), self.loss.item()) if noted >= 0 else None
        found = [f for f in dist.all_gather_object(mine) if f is not None]
        self.step = self.loss = None
        first = min(step for step, _ in found)
        losses = [loss for step, loss in found if step == first]
        raise NonFiniteLoss(f"step {first + 1}: the loss is {losses[0]} on {len(losses)} rank(s); stopping "
                            "(lower the learning rate, or train.on_nan=skip to skip such steps)")


_unchecked = _UncheckedLosses()


def check_losses():
    """Raise NonFiniteLoss naming the first step since the last call whose loss was not finite on some rank
    (train.on_nan=stop). A collective: every rank calls it at the same point (trainer.runtime.loop does at
    each logged step, before each epoch's end work and before each checkpoint)."""
    _unchecked.check()


def step_optimizer(loss, optimizer, scaler, step: int, on_nan: str = "stop") -> bool:
    """One update from `loss`; False when it was skipped: for a loss that is not finite (on_nan=skip), or by
    the fp16 GradScaler for gradients that are not.

    on_nan=stop: a loss that is not finite on any rank stops the run with one line naming its step at the
    next check_losses(). Only noted here, on the device: a check per step would make the CPU wait for the
    GPU's forward before it queues the backward, every step. The steps up to the check update the weights
    with that loss; nothing is written before the check.
    on_nan=skip: the update is skipped on every rank (logged). Decided before backward, so that no rank
    enters DDP's gradient all-reduce alone: one host sync and one all-reduce per step."""
    if on_nan == "skip":
        if dist.all_reduce_((~torch.isfinite(loss.detach())).float().reshape(1)).item():
            log.warning("step %d: the loss is %s: update skipped (train.on_nan=skip)", step + 1, loss.item())
            return False
    else:
        _unchecked.note(loss, step)
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.zero_grad(set_to_none=True)
    else:   # apex's LARC wraps an optimizer and its zero_grad() takes no arguments
        optimizer.zero_grad()
    scaler.scale(loss).backward()
    return _step(optimizer, scaler)


def _step(optimizer, scaler) -> bool:
    """scaler.step() and update(); False when the GradScaler skipped the step (fp16 gradients not finite),
    seen by a hook that only a step taken fires (asking the scaler would wait for the GPU once more)."""
    inner = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optim   # apex's LARC
    taken = []
    hook = inner.register_step_post_hook(lambda *_: taken.append(True))
    try:
        scaler.step(optimizer)
    finally:
        hook.remove()
    scaler.update()
    return bool(taken)
