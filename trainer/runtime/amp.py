"""Mixed precision: choosing it (train.precision=auto), running under it, and stepping an optimizer with it.

Kept apart from trainer.runtime.engine (the command line and run dir) so that inference imports it alone.
"""
from __future__ import annotations

import contextlib
import copy
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
    bf16 (fp16 where bf16 is unsupported). On a CPU: whichever of fp32 and bf16 autocast runs a training
    step of `model` (a copy: its weights and BatchNorm statistics stay untouched) on a random batch of
    this rank's `batch` shape faster, best of 3 after a warm-up; CPUs differ by 2x either way. Every rank
    measures (a synchronised BatchNorm's collectives stay in step) and takes rank 0's answer."""
    if precision != "auto":
        return precision, {}
    if rt.device.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), {}
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


def step_optimizer(loss, optimizer, scaler, step: int, on_nan: str = "stop") -> bool:
    """One update from `loss`; False when it was skipped. A loss that is not finite on any rank stops the
    run with one line naming the step (on_nan=stop) or skips the update on every rank (on_nan=skip,
    logged). Checked before backward, so that no rank enters DDP's gradient all-reduce alone."""
    bad = dist.all_reduce_((~torch.isfinite(loss.detach())).float().reshape(1)).item()
    if bad:
        if on_nan == "stop":
            raise NonFiniteLoss(f"step {step + 1}: the loss is {loss.item()} on {int(bad)} rank(s); stopping "
                                "(lower the learning rate, or train.on_nan=skip to skip such steps)")
        log.warning("step %d: the loss is %s: update skipped (train.on_nan=skip)", step + 1, loss.item())
        return False
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.zero_grad(set_to_none=True)
    else:   # apex's LARC wraps an optimizer and its zero_grad() takes no arguments
        optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return True
