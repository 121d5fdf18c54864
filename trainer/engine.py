"""What every stage shares: command line, run dir, metrics, progress, precision, resume.

A stage script stays a readable recipe; this file holds the plumbing around its loop.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import sys
import time

import torch
from tqdm import tqdm

from trainer import checkpoint, config
from trainer.dist import Runtime, barrier, shutdown


class StageError(RuntimeError):
    """Bad input found while a stage runs; printed as one line, exit status 2."""


def parse(cls, argv, description: str):
    """`--config FILE [dotted.key=value ...]` -> a config of type `cls`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config (defaults apply to what it leaves out)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.epochs=5")
    args = parser.parse_args(argv)
    return config.load(cls, args.config, args.overrides)


def cli(main):
    """Run a stage's main(); known input errors become one line on stderr and exit status 2."""
    try:
        main()
        shutdown()
    except (config.ConfigError, checkpoint.CheckpointError, StageError, ValueError) as e:
        prog = os.path.basename(sys.argv[0])
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")


def stage_module(name: str):
    """launch/<name>.py as a module, so one stage can run another's own code path."""
    spec = importlib.util.spec_from_file_location(f"semiscale_stage_{name}", os.path.join(LAUNCH_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Run:
    """A stage's run dir: resolved config.yaml, metrics.jsonl, checkpoint.pt (rank 0 writes)."""

    def __init__(self, stage: str, cfg, rt: Runtime):
        self.stage, self.cfg, self.rt = stage, cfg, rt
        self.dir = cfg.run.dir
        self.checkpoint_path = os.path.join(self.dir, "checkpoint.pt")
        if rt.is_main:
            os.makedirs(self.dir, exist_ok=True)
            config.dump(cfg, os.path.join(self.dir, "config.yaml"))
        barrier()
        self._t0 = time.time()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def log(self, **event):
        """One JSON object per line; rank 0 only. Other ranks' values must be reduced first."""
        if not self.rt.is_main:
            return
        event = {"stage": self.stage, "time": round(time.time() - self._t0, 3), **event}
        with open(self.path("metrics.jsonl"), "a") as f:
            f.write(json.dumps(event) + "\n")

    def say(self, message: str):
        if self.rt.is_main:
            tqdm.write(f"[{self.stage}] {message}")

    def progress(self, total: int, initial: int = 0, desc: str = ""):
        return tqdm(total=total, initial=initial, desc=desc or self.stage, disable=not self.rt.is_main,
                    dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    # ---- checkpoints ----

    def save_checkpoint(self, model, optimizer, scaler, step: int, epoch: int, step_in_epoch: int,
                        **extra):
        if self.rt.is_main:
            checkpoint.save_atomic({
                "stage": self.stage, "model": model.state_dict(),
                "arch": checkpoint.architecture_of(model.state_dict()), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                "step_in_epoch": step_in_epoch, "rng": checkpoint.rng_state(), **extra,
            }, self.checkpoint_path)
        barrier()

    def resume(self, model, optimizer, scaler) -> dict:
        """Load run.dir/checkpoint.pt into the objects when it exists; every rank reads it."""
        if not os.path.exists(self.checkpoint_path):
            return {"step": 0, "epoch": 0, "step_in_epoch": 0}
        state = checkpoint.load(self.checkpoint_path)
        if state.get("stage") != self.stage:
            raise checkpoint.CheckpointError(
                f"{self.checkpoint_path}: written by stage {state.get('stage')!r}, not {self.stage!r}")
        checkpoint.check_architecture(self.checkpoint_path, state["arch"], model)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.say(f"resumed from {self.checkpoint_path} at step {state['step']} "
                 f"(epoch {state['epoch']}, step {state['step_in_epoch']} of it)")
        return state


# ---- small files ----

def write_json(path: str, obj):
    """Atomically: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_done(run_dir: str) -> dict:
    """The final event of a finished stage's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        done = [e for e in map(json.loads, f) if e.get("event") == "done"]
    if not done:
        raise StageError(f"{run_dir}/metrics.jsonl: the stage has not finished (no 'done' event)")
    return done[-1]


# ---- precision ----

def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise config.ConfigError("train.precision: fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def grad_scaler(precision: str, device: torch.device):
    """Loss scaling only for fp16 (bf16 has fp32's range); disabled scalers pass through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def step_optimizer(loss, optimizer, scaler):
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.zero_grad(set_to_none=True)
    else:   # apex's LARC wraps an optimizer and its zero_grad() takes no arguments
        optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def seed_everything(seed: int):
    torch.manual_seed(seed)
    random.seed(seed)
