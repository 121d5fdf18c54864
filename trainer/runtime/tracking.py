"""Where a run's events go: metrics.jsonl always, and the trackers that run.log adds (TensorBoard, W&B, MLflow).

Run.log (trainer.runtime.engine) hands each event to `Tracking.log`, on rank 0. metrics.jsonl takes the
event whole, one JSON line each: the run's record, which the pipeline and its report read. The other
trackers take the event's numbers as scalars named <stage>[/<event>][/<split>]/<key> (pretrain/loss,
fixmatch/mask_rate, evaluate/test/top1_tta, finetune/done/val_top1) at a step that counts the images the
loop has trained on (its events' `images`), so that runs of different batch sizes line up; an event
without that count is placed by its own (pseudolabel's iterations, predict's chunks, or the optimizer step
of a run made before events counted images) or at the run's last step (evaluation passes, the final `done`).

A resumed run logs again the steps between its checkpoint and where it was killed, so each tracker skips
a scalar at a step no later than the last one it holds under that name: its steps never repeat or go
backwards. A tracker opened on a run that has events already first takes those it lacks: TensorBoard
reads its event files back, so one added on resume, or written by `launch/report.py tb` for a finished
run, holds the run from its first event; W&B and MLflow, which this does not read back, hold what an
earlier process of the run gave them (their run ids are in run.dir/tracking.json) and otherwise start
from every earlier event.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time

import numpy as np
import yaml
from PIL import Image

from data import atomic
from trainer.runtime import rundir
from trainer.runtime.config_fields import ConfigError

# the first an event has is its step; `step` (optimizer steps) places the loop's events of a run made
# before they counted images, so that such a run's curves still run along an axis
STEP_KEYS = ("images", "iteration", "chunk", "step")
NAME_KEYS = ("stage", "event", "split")          # text fields that name an event's scalars
PLACING = {*STEP_KEYS, "step", "epoch", "time"}  # numbers that place an event rather than measure
IDS = "tracking.json"                            # the W&B and MLflow runs of a run dir, which a resumed run continues


class Tracker:
    """One destination of a run's events; `module` is what it imports, `package` what installs it."""
    module = package = ""
    shows_images = False

    def __init__(self, run_dir: str, stage: str, config_text: str):
        pass

    def catch_up(self, earlier: list[tuple[int, dict[str, float]]]):
        """The run's events before this process, as (step, scalars): what the tracker may lack of them."""

    def log(self, event: dict, step: int, scalars: dict[str, float]):
        raise NotImplementedError

    def image(self, tag: str, path: str, step: int):
        pass

    def close(self):
        pass


BACKENDS: dict[str, type[Tracker]] = {}   # run.log's choices


def backend(name: str):
    def register(cls):
        BACKENDS[name] = cls
        return cls
    return register


@backend("jsonl")
class Jsonl(Tracker):
    """run.dir/metrics.jsonl, every event as it comes (resumed steps included: it is the record)."""

    def __init__(self, run_dir: str, stage: str, config_text: str):
        self.path = os.path.join(run_dir, rundir.METRICS)

    def log(self, event: dict, step: int, scalars: dict[str, float]):
        rundir.append_line(self.path, json.dumps(event))


class ScalarTracker(Tracker):
    """Scalars by name and step; a value at a step no later than the last one held under its name is skipped."""

    def __init__(self):
        self.held: dict[str, int] = {}
        self.added = 0   # scalars written by this process

    def read_back(self) -> dict[str, int] | None:
        """{name: last step} of what earlier processes wrote here; None where it cannot tell (then it holds
        what the earlier events gave it)."""
        return {}

    def catch_up(self, earlier):
        held = self.read_back()
        if held is None:   # it cannot tell: it holds what the earlier events gave it
            held = {}
            for step, scalars in earlier:
                held |= {tag: max(step, held.get(tag, -1)) for tag in scalars}
        self.held = held
        for step, scalars in earlier:
            self.log({}, step, scalars)

    def log(self, event: dict, step: int, scalars: dict[str, float]):
        new = {tag: value for tag, value in scalars.items() if step > self.held.get(tag, -1)}
        if new:
            self.write(step, new)
            self.held |= dict.fromkeys(new, step)
            self.added += len(new)

    def write(self, step: int, scalars: dict[str, float]):
        raise NotImplementedError


@backend("tensorboard")
class TensorBoard(ScalarTracker):
    """run.dir/tb/, an event file per process that writes, each event flushed as it comes (a killed run
    loses none); the resolved config as text, once; images (the report's figures, active learning's
    contact sheets)."""
    module = package = "tensorboard"
    shows_images = True

    def __init__(self, run_dir: str, stage: str, config_text: str):
        super().__init__()
        self.dir = os.path.join(run_dir, "tb")
        self.config_text = config_text
        self._writer = None

    @property
    def writer(self):
        """Opened at the first write: a process that adds nothing (a run caught up already) leaves no file."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            new = not os.path.isdir(self.dir) or not os.listdir(self.dir)
            self._writer = SummaryWriter(self.dir)
            if new:   # indented: markdown shows it as the YAML it is
                self._writer.add_text("config", "\n".join("    " + line for line in self.config_text.splitlines()), 0)
        return self._writer

    def read_back(self) -> dict[str, int]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        if not os.path.isdir(self.dir):
            return {}
        events = EventAccumulator(self.dir, size_guidance={"scalars": 0, "images": 0})
        events.Reload()
        tags = events.Tags()
        return {**{tag: max(e.step for e in events.Scalars(tag)) for tag in tags["scalars"]},
                **{tag: max(e.step for e in events.Images(tag)) for tag in tags["images"]}}

    def write(self, step: int, scalars: dict[str, float]):
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def image(self, tag: str, path: str, step: int):
        if step > self.held.get(tag, -1):
            with Image.open(path) as picture:
                self.writer.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
            self.writer.flush()
            self.held[tag] = step

    def close(self):
        if self._writer:
            self._writer.close()


def _outermost(run_dir: str) -> str:
    """The outermost run dir that `run_dir` lies in (a pipeline's for its stages, pseudolabel's for its
    fine-tunes), or `run_dir` itself: W&B and MLflow keep the files of all its runs there, in one place."""
    path = outer = os.path.abspath(run_dir)
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        if os.path.exists(os.path.join(path, rundir.RUN_RECORD)):
            outer = path
    return outer


def _run_ids(run_dir: str) -> dict:
    path = os.path.join(run_dir, IDS)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _keep_run_id(run_dir: str, name: str, run_id: str):
    atomic.write_json(os.path.join(run_dir, IDS), _run_ids(run_dir) | {name: run_id})


@backend("wandb")
class WandB(ScalarTracker):
    """Weights & Biases, offline unless WANDB_MODE says otherwise, in wandb/ of the outermost run dir
    (`wandb sync` uploads an offline run); project WANDB_PROJECT or semiscale; the run dir names the W&B run."""
    module = package = "wandb"

    def __init__(self, run_dir: str, stage: str, config_text: str):
        import wandb
        super().__init__()
        run_id = _run_ids(run_dir).get("wandb")
        self.resumed = run_id is not None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "semiscale"), dir=_outermost(run_dir), id=run_id,
                              name=os.path.normpath(run_dir), job_type=stage, resume="allow",
                              mode=os.environ.get("WANDB_MODE", "offline"), config=yaml.safe_load(config_text),
                              settings=wandb.Settings(quiet=True, console="off"),   # the stage's output stays its own
                              reinit="create_new")   # pseudolabel's fine-tunes open theirs inside its own
        if not self.resumed:
            _keep_run_id(run_dir, "wandb", self.run.id)
        self.run.define_metric("step")   # the x of every chart: W&B's own step must only grow, ours need not
        self.run.define_metric("*", step_metric="step")

    def read_back(self):
        return None if self.resumed else {}

    def write(self, step: int, scalars: dict[str, float]):
        self.run.log({"step": step, **scalars})

    def close(self):
        self.run.finish()


@backend("mlflow")
class MLflow(ScalarTracker):
    """MLflow at MLFLOW_TRACKING_URI, else a file store in mlruns/ of the outermost run dir (a pipeline's
    stages side by side); experiment MLFLOW_EXPERIMENT_NAME or semiscale; the resolved config as the
    artifact config.yaml."""
    module, package = "mlflow", "mlflow-skinny"

    def __init__(self, run_dir: str, stage: str, config_text: str):
        from mlflow.tracking import MlflowClient
        super().__init__()
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:   # MLflow 3 keeps its file store behind this flag ("maintenance mode"); it is the one asked for
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = f"file://{os.path.join(_outermost(run_dir), 'mlruns')}"
        self.client = MlflowClient(uri)
        self.run_id = _run_ids(run_dir).get("mlflow")
        self.resumed = self.run_id is not None
        if self.resumed:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "semiscale")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=os.path.normpath(run_dir),
                                             tags={"stage": stage}).info.run_id
        _keep_run_id(run_dir, "mlflow", self.run_id)
        self.client.log_text(self.run_id, config_text, "config.yaml")

    def read_back(self):
        return None if self.resumed else {}

    def write(self, step: int, scalars: dict[str, float]):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(tag, value, now, step) for tag, value in scalars.items()])

    def close(self):
        self.client.set_terminated(self.run_id)


def check(names: list[str]):
    """Every tracker in `names` (run.log) importable: before any work, one line naming what to install."""
    for name in names:
        tracker = BACKENDS[name]
        if tracker.module and importlib.util.find_spec(tracker.module) is None:
            raise ConfigError(f"run.log: {name} needs the {tracker.package} package, which is not installed: "
                              f"pip install {tracker.package} (or leave {name} out of run.log)")


class Tracking:
    """metrics.jsonl and the trackers `names` (run.log) of the run in `run_dir`, which holds its run.json
    and config.yaml: rank 0's, made once the run dir is claimed."""

    def __init__(self, names: list[str], run_dir: str):
        with open(os.path.join(run_dir, rundir.RUN_RECORD)) as f:
            self.stage = json.load(f)["stage"]
        with open(os.path.join(run_dir, rundir.CONFIG)) as f:
            config_text = f.read()
        metrics = os.path.join(run_dir, rundir.METRICS)
        self.step = 0   # the step of the last event
        self.trackers = [BACKENDS[name](run_dir, self.stage, config_text) for name in dict.fromkeys(["jsonl", *names])]
        if len(self.trackers) > 1:   # metrics.jsonl alone needs no catching up: not read at every start
            earlier = [self._place(event) for event in (rundir.read_lines(metrics) if os.path.exists(metrics) else [])]
            for tracker in self.trackers:
                tracker.catch_up(earlier)

    def _place(self, event: dict) -> tuple[int, dict[str, float]]:
        """(the event's step, its scalars by name)."""
        self.step = next((event[key] for key in STEP_KEYS if key in event), self.step)
        prefix = "/".join(str(event[key]) for key in NAME_KEYS if key in event)
        return self.step, {f"{prefix}/{key}": float(value) for key, value in event.items()
                           if key not in PLACING and isinstance(value, (int, float)) and not isinstance(value, bool)}

    def log(self, event: dict):
        step, scalars = self._place(event)
        for tracker in self.trackers:
            tracker.log(event, step, scalars)

    def image(self, path: str):
        """A PNG of the run, named <stage>/<file name>, to the trackers that show images."""
        tag = f"{self.stage}/{os.path.splitext(os.path.basename(path))[0]}"
        for tracker in self.trackers:
            tracker.image(tag, path, self.step)

    def close(self):
        for tracker in self.trackers:
            tracker.close()


def log_images(run_dir: str, paths: list[str]):
    """PNGs written for the run in `run_dir` (the pipeline's report), to the trackers of its config.yaml's
    run.log that show images."""
    with open(os.path.join(run_dir, rundir.CONFIG)) as f:
        names = [n for n in yaml.safe_load(f).get("run", {}).get("log", []) if BACKENDS[n].shows_images]
    if names and paths:
        tracking = Tracking(names, run_dir)
        for path in paths:
            tracking.image(path)
        tracking.close()


def run_dirs(folder: str) -> list[str]:
    """The run dirs in `folder`, itself included (a pipeline's stages, pseudolabel's fine-tunes); not the
    runs that --restart moved aside."""
    found = []
    for parent, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(s for s in subfolders if s != rundir.REPLACED)
        if rundir.RUN_RECORD in files and rundir.METRICS in files:
            found.append(parent)
    return found


def write_event_files(run_dir: str) -> int:
    """TensorBoard's event files for the run in `run_dir` from its metrics.jsonl (what they lack of it, so
    a second call adds nothing); the number of scalars added."""
    lock = rundir.Lock(run_dir)   # not a live run's
    try:
        tracking = Tracking(["tensorboard"], run_dir)
        tracking.close()
    finally:
        lock.release()
    return sum(tracker.added for tracker in tracking.trackers if isinstance(tracker, ScalarTracker))
