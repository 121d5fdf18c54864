"""launch/dry_run.py on the paper's pipeline config: every stage of configs/paper/ once, at its shapes (ResNet-50,
the 8192-8192-8192 projector, 800 classes, 96 px images scored at 96/144/192 px, 2048-d embeddings), on a
generated pile, and each step's peak memory recorded."""
import csv
import json

import numpy as np
import torch
from PIL import Image

from tiny import ROOT, stage
from trainer.runtime import stages


def test_the_paper_configs_run_every_stage_at_their_shapes_and_a_rerun_keeps_the_figures(tmp_path):
    out, unlabeled, evaluated = tmp_path / "dry", 64, 16
    args = ["--config", "configs/paper/pipeline.yaml", "--classes", "800", "--out", str(out),
            "--unlabeled", str(unlabeled), "--eval-images", str(evaluated), "--steps", "1"]
    proc = stage("dry_run", *args, cwd=ROOT)
    summary = json.load(open(out / "dry_run.json"))
    steps = [s.name for s in stages.recipe(active_learning=True)]
    assert list(summary["stages"]) == steps and (summary["classes"], summary["image_size"]) == (800, 96)
    for name, step in summary["stages"].items():   # a step's peak counts from its start, what it held before included
        assert step["peak_rss_mb"] >= step["rss_before_mb"] > 0 and step["seconds"] > 0, (name, step)
        assert f"  {name} " in proc.stdout
    # the pile: 96 px pictures, every class labeled once
    with open(out / "data" / "labeled.csv") as f:
        labels = [int(row["label"]) for row in csv.DictReader(f)]
    assert sorted(labels) == list(range(800))
    assert Image.open(out / "data" / "images" / "unlabeled-000000.png").size == (96, 96)
    # the paper's shapes in what the stages wrote
    run = out / "run"
    pretrained = torch.load(run / "pretrain" / "checkpoint.pt", weights_only=True)["state"]["model"]
    assert [tuple(pretrained[f"projector.{i}.weight"].shape) for i in (0, 3, 6)] == [(8192, 2048), (8192, 8192),
                                                                                    (8192, 8192)]
    final = torch.load(run / "fixmatch_active" / "model.pt", weights_only=True)
    assert final["arch"]["backbone"] == "resnet50" and tuple(final["model"]["head.weight"].shape) == (800, 2048)
    assert np.load(run / "active" / "embeddings.rank-0.npy", mmap_mode="r").shape == (unlabeled, 2048)
    scored = json.load(open(run / "evaluate_fixmatch_active" / "eval.json"))["splits"]
    assert all(list(scored[split]["scales"]) == ["96", "144", "192"] and scored[split]["images"] == evaluated
               for split in ("val", "test"))
    with open(run / "predict" / "predictions.csv") as f:
        assert sum(1 for _ in f) == unlabeled + 1
    # run again: every step is done, and the figures of the first run stay
    again = stage("dry_run", *args, cwd=ROOT)
    assert all(f"[pipeline] {name}: done, skipped" in again.stdout for name in steps), again.stdout[-2000:]
    assert json.load(open(out / "dry_run.json"))["stages"] == summary["stages"]
    # the same folder for another class count: refused, the pile kept
    other = stage("dry_run", *args[:3], "801", *args[4:], cwd=ROOT, check=False)
    assert other.returncode == 2 and other.stderr.strip().endswith(
        "this pile has 800 classes, not --classes 801: expected another --out"), other.stderr[-2000:]
    assert (out / "data" / "classes.txt").read_text().count("\n") == 800


def test_a_pile_of_one_class_is_refused_before_anything_is_written(tmp_path):
    proc = stage("dry_run", "--config", "configs/paper/pipeline.yaml", "--classes", "1", "--out",
                 str(tmp_path / "dry"), cwd=ROOT, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("--classes 1: expected at least 2")
    assert not (tmp_path / "dry").exists()
