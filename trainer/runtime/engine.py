"""What every stage shares: command line, run dir, metrics, progress, precision, resume.

A stage script stays a readable recipe; this file holds the plumbing around its loop.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import random
import sys
import time

import torch
from tqdm import tqdm

from data import datasets
from data.errors import InputError
from trainer.runtime import checkpoint, config, dist, rundir
from trainer.runtime.dist import Runtime, barrier, shutdown

log = logging.getLogger(__name__)


class StageError(InputError):
    """Bad input found while a stage runs; printed as one line, exit status 2."""


def parse(cls, argv, description: str):
    """`--config FILE [dotted.key=value ...]` -> a config of type `cls`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config (defaults apply to what it leaves out)")
    parser.add_argument("--restart", action="store_true",
                        help="run.dir holds a previous run: move it aside (to run.dir/replaced/) and start over")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.epochs=5")
    args = parser.parse_intermixed_args(argv)
    return config.load(cls, args.config, args.overrides + (["run.restart=true"] if args.restart else []))


def cli(main):
    """Run a stage's main(); known input errors become one line on stderr and exit status 2."""
    try:
        main()
        shutdown()
    except InputError as e:   # a genuine bug keeps its traceback
        for bar in list(tqdm._instances):   # an open progress bar would redraw itself after the message
            bar.close()
        prog = os.path.basename(sys.argv[0])
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def check_dataset(cfg, rt: Runtime, labeled: str = "labeled"):
    """The dataset's splits against each other (data.datasets.check_dataset) before a stage's first write:
    errors stop every rank with one line, rank 0 prints the warnings."""
    for warning in datasets.check_dataset(cfg.data.root, labeled):
        if rt.is_main:
            tqdm.write(f"warning: {warning}", file=sys.stderr)


class Run:
    """A stage's run dir (trainer.runtime.rundir): claimed before anything is written, then config.yaml,
    metrics.jsonl and checkpoint.pt; rank 0 writes. Make it after every check that can refuse the run."""

    def __init__(self, stage: str, cfg, rt: Runtime):
        self.stage, self.cfg, self.rt = stage, cfg, rt
        self.dir = cfg.run.dir
        self.checkpoint_path = os.path.join(self.dir, "checkpoint.pt")
        self._lock = None
        refusal = None
        if rt.is_main:
            try:
                self._claim()
            except rundir.RunDirError as e:
                refusal = str(e)
        refusal = dist.broadcast_object(refusal)   # every rank stops with rank 0's one line
        if refusal:
            raise rundir.RunDirError(refusal)
        self._t0 = time.time()

    def _claim(self):
        resolved = config.to_dict(self.cfg)
        replace = rundir.check(self.dir, self.stage, resolved, self.cfg.run.restart,
                               config.to_dict(type(self.cfg)()))
        try:
            os.makedirs(self.dir, exist_ok=True)
            self._lock = rundir.Lock(self.dir)
        except OSError as e:
            raise rundir.RunDirError(f"run.dir={self.dir}: cannot write there ({e.strerror})") from None
        if replace:
            self.say(f"--restart: the previous run moved to {rundir.move_aside(self.dir)}")
        stray = rundir.remove_stray_temporaries(self.dir)
        if stray:
            self.say(f"removed {stray} temporary file(s) left by an interrupted write")
        if not os.path.exists(self.path(rundir.RUN_RECORD)):
            write_json(self.path(rundir.RUN_RECORD), {"stage": self.stage})
        write_text(self.path(rundir.CONFIG), config.dumps(self.cfg))

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def log(self, **event):
        """One JSON object per line; rank 0 only. Other ranks' values must be reduced first."""
        if not self.rt.is_main:
            return
        event = {"stage": self.stage, "time": round(time.time() - self._t0, 3), **event}
        rundir.append_line(self.path(rundir.METRICS), json.dumps(event))

    def say(self, message: str):
        if self.rt.is_main:
            tqdm.write(f"[{self.stage}] {message}")

    def progress(self, total: int, initial: int = 0, desc: str = ""):
        return tqdm(total=total, initial=initial, desc=desc or self.stage, disable=not self.rt.is_main,
                    dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    # ---- checkpoints ----

    def save_checkpoint(self, state: dict, step: int, epoch: int, step_in_epoch: int, model):
        """checkpoint.pt: the named states (trainer.runtime.loop registers them), the position in the data and
        the RNG; rank 0 writes, every rank waits for the file."""
        if self.rt.is_main:
            checkpoint.save_checked({
                "stage": self.stage, "arch": checkpoint.architecture_of(model.state_dict()), "step": step,
                "epoch": epoch, "step_in_epoch": step_in_epoch, "rng": checkpoint.rng_state(), "state": state,
            }, self.checkpoint_path)
        barrier()

    def load_checkpoint(self, model) -> dict | None:
        """run.dir/checkpoint.pt checked against this stage and `model`'s architecture (every rank reads
        it), with the RNG restored; None when there is none."""
        if not os.path.exists(self.checkpoint_path):
            return None
        saved = checkpoint.load_checked(self.checkpoint_path)
        if saved.get("stage") != self.stage or "state" not in saved:
            raise checkpoint.CheckpointError(
                f"{self.checkpoint_path}: not a checkpoint of this version's {self.stage} stage: pass --restart")
        checkpoint.check_architecture(self.checkpoint_path, saved["arch"], model)
        checkpoint.set_rng_state(saved["rng"])
        self.say(f"resumed from {self.checkpoint_path} at step {saved['step']} "
                 f"(epoch {saved['epoch']}, step {saved['step_in_epoch']} of it)")
        return saved


# ---- small files ----

def write_text(path: str, text: str):
    """Atomically: a reader never sees half a file, a failed write leaves the old one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise rundir.RunDirError(f"{path}: cannot write ({e.strerror}); the previous file is kept") from None


def write_json(path: str, obj):
    write_text(path, json.dumps(obj, indent=2))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_done(run_dir: str) -> dict:
    """The final event of a finished stage's metrics.jsonl."""
    done = [e for e in rundir.read_lines(os.path.join(run_dir, rundir.METRICS)) if e.get("event") == "done"]
    if not done:
        raise StageError(f"{run_dir}/metrics.jsonl: the stage has not finished (no 'done' event)")
    return done[-1]


# ---- precision ----

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


class NonFiniteLoss(StageError):
    """A loss that is NaN or infinite with train.on_nan=stop."""


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


def seed_everything(seed: int):
    torch.manual_seed(seed)
    random.seed(seed)
