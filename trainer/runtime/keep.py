"""Never worse: a stage that takes a classifier in (pseudolabel; fixmatch, whatever its semi-supervised
algorithm) outputs its own best result on val unless that scores below its input, and says which it kept.

Both sides are scored by the stage's one val pass (the same images, batches and precision), and the choice
is a strict argmax with the input first (trainer.runtime.loop.BestModel.beats): the stage's best result
replaces its input only when it scores higher, so a tie keeps the input. run.dir/kept.json records it:

    {"input": <the model.pt it took in>, "input_val": <its val top-1>, "own_best": <which result was the
     stage's best>, "own_best_val": <its val top-1>, "kept": "input" | "own"}

The pipeline's report reads it to say, beside the stage's figure, that the stage's own result was worse.
"""
from __future__ import annotations

import json
import os

from trainer.runtime import engine
from trainer.runtime.loop import BestModel

KEPT = "kept.json"


def write(run: engine.Run, input_path: str, input_val: float, own_best_val: float, own_best: str) -> dict:
    """run.dir/kept.json (rank 0 writes; written before the stage's done file); the record."""
    record = {"input": input_path, "input_val": input_val, "own_best": own_best, "own_best_val": own_best_val,
              "kept": "own" if BestModel.beats(own_best_val, input_val) else "input"}
    if run.rt.is_main:
        engine.write_json(run.path(KEPT), record)
    return record


def read(run_dir: str) -> dict | None:
    """A stage run's record; None for a stage that takes no classifier in (or a run from before the record)."""
    path = os.path.join(run_dir, KEPT)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def note(record: dict | None) -> str:
    """What the report says beside a stage that kept its input: how far its best result fell short, in points."""
    if not record or record["kept"] != "input":
        return ""
    short = 100 * (record["input_val"] - record["own_best_val"])
    if short == 0:
        return "kept its input: best result only tied it on val"
    return f"kept its input: best result −{max(short, 0.01):.2f} val"   # a fall under 0.005 points is no "−0.00"
