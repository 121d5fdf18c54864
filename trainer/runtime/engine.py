"""What every stage shares: command line, run dir, metrics, progress, resume.

A stage script stays a readable recipe; this file holds the plumbing around its loop.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import weakref

import torch
from tqdm import tqdm

from data import atomic, datasets
from data.errors import InputError
from trainer import dist
from trainer.runtime import checkpoint, config, rundir, tracking
from trainer.dist import Runtime, barrier, shutdown


class StageError(InputError):
    """Bad input found while a stage runs; printed as one line, exit status 2."""


class ConfigParser(argparse.ArgumentParser):
    """A command line whose --help lists every key of the config class `cls`, written only when asked for."""

    def __init__(self, cls, description: str):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.config_class = cls

    def format_help(self) -> str:
        self.epilog = config.keys_help(self.config_class)
        return super().format_help()


def parse(cls, argv, description: str):
    """`--config FILE [dotted.key=value ...]` -> a config of type `cls`; --help lists every key of `cls`."""
    parser = ConfigParser(cls, description)
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
    """The dataset's splits against each other (data.datasets.check_dataset) before a stage's first write,
    on rank 0 alone (it reads every CSV, and may stat every image: once per job, not once per rank on a
    shared filesystem): errors stop every rank with its one line, rank 0 prints the warnings."""
    warnings = dist.rank0_decides(lambda: datasets.check_dataset(cfg.data.root, labeled))
    if rt.is_main:
        for warning in warnings:
            tqdm.write(f"warning: {warning}", file=sys.stderr)


class Run:
    """A stage's run dir (trainer.runtime.rundir): claimed before anything is written, then config.yaml,
    metrics.jsonl (and the trackers run.log adds: trainer.runtime.tracking) and checkpoint.pt; rank 0
    writes. Make it after every check that can refuse the run."""

    def __init__(self, stage: str, cfg, rt: Runtime, note: str = ""):
        """`note`: a line to say once the run dir is claimed (e.g. a batch lowered to fit the images)."""
        self.stage, self.cfg, self.rt = stage, cfg, rt
        self.dir = cfg.run.dir
        self.checkpoint_path = os.path.join(self.dir, "checkpoint.pt")
        self._lock = None
        self.tracking = None   # rank 0's
        dist.rank0_decides(self._claim)   # a refusal stops every rank with rank 0's one line
        if self.tracking:   # closed once the stage drops its Run (an inner fine-tune's before its caller's), or at exit
            weakref.finalize(self, self.tracking.close)
        self._t0 = time.time()
        if note:
            self.say(note)

    def _claim(self):
        tracking.check(self.cfg.run.log)
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
        self.tracking = tracking.Tracking(self.cfg.run.log, self.dir)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def log(self, **event):
        """One event: a JSON line of metrics.jsonl, and its numbers to the trackers of run.log; rank 0 only.
        Other ranks' values must be reduced first."""
        if self.rt.is_main:
            self.tracking.log({"stage": self.stage, "time": round(time.time() - self._t0, 3), **event})

    def log_image(self, path: str):
        """A PNG the run wrote (active learning's contact sheets), to the trackers that show images; rank 0 only."""
        if self.rt.is_main:
            self.tracking.image(path)

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
    """data.atomic.write_text; a write the filesystem refuses stops the stage with one line."""
    with atomic.refusing(path, rundir.RunDirError):
        atomic.write_text(path, text)


def write_json(path: str, obj):
    with atomic.refusing(path, rundir.RunDirError):
        atomic.write_json(path, obj)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_done(run_dir: str) -> dict:
    """The final event of a finished stage's metrics.jsonl."""
    done = [e for e in rundir.read_lines(os.path.join(run_dir, rundir.METRICS)) if e.get("event") == "done"]
    if not done:
        raise StageError(f"{run_dir}/metrics.jsonl: the stage has not finished (no 'done' event)")
    return done[-1]


def seed_everything(seed: int):
    torch.manual_seed(seed)
    random.seed(seed)
