import csv
import json
import os
import signal
import subprocess
import sys
import time

import yaml

from tiny import ROOT, TINY_FINETUNE, TINY_PRETRAIN, fashion
from data.datasets import read_classes, read_split
from trainer.runtime import stages
from trainer.runtime.predict import whole_top_k

COMMON = ["data.workers=0", "run.log_every=1"]
TINY_STAGES = {
    "supervised": TINY_FINETUNE + ["train.epochs=2"],
    "pretrain": TINY_PRETRAIN + ["train.max_steps=4"],
    "finetune": TINY_FINETUNE + ["train.epochs=2"],
    "pseudolabel": ["pseudo.top_k=3", "pseudo.schedule=[5]", "pseudo.fixmatch_p=2", "pseudo.pseudo_epochs=1",
                    "pseudo.labeled_epochs=1", "inference.batch_size=64",
                    f"pseudo.finetune_overrides=[{','.join(TINY_FINETUNE)}]"],
    "fixmatch": ["train.batch_size=8", "fixmatch.mu=2", "train.max_steps=3", "train.precision=fp32"],
    "active": ["active.clusters=3", "active.budget=6", "inference.batch_size=64"],
    "evaluate": ["evaluate.scales=[28,32]", "inference.batch_size=64"],
    "predict": ["inference.batch_size=64"],
}


def write_config(tmp_path, data):
    spec = {name: {"config": os.path.join(ROOT, "configs", "demo", f"{name}.yaml"),
                   "overrides": COMMON + overrides} for name, overrides in TINY_STAGES.items()}
    path = tmp_path / "pipeline.yaml"
    spec["fixmatch_active_overrides"] = ["train.max_steps=2"]
    path.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "run")},
                                    "data": {"root": data, "backend": "torch"}, "pipeline": spec}))
    return str(path)


def command(config):
    return [sys.executable, os.path.join(ROOT, "launch", "pipeline.py"), "--config", config]


def steps(run_dir):
    return max(e.get("step", 0) for e in map(json.loads, open(run_dir / "metrics.jsonl")))


def assert_unlabeled_pile_labeled(run, data):
    """The last stage's predictions.csv: one row per unlabeled image, in order, but the unreadable ones
    (bad_images.txt), each with a class name; made with the TTA views evaluate chose for the final model."""
    unlabeled = [p[len(data) + 1:] for p in read_split(data, "unlabeled").paths]
    bad = {line.split("\t")[0] for line in open(run / "predict" / "bad_images.txt")}
    rows = list(csv.DictReader(open(run / "predict" / "predictions.csv", newline="")))
    assert [r["path"] for r in rows] == [p for p in unlabeled if p not in bad] and len(rows) > 0
    names = set(read_classes(data))
    assert all(r["class"] in names and r["top5_class"] in names for r in rows)
    summary = json.load(open(run / "predict" / "summary.json"))
    chosen = json.load(open(run / "evaluate_fixmatch_active" / "eval.json"))["splits"]["val"]
    assert (summary["scales"], summary["mirror"]) == (chosen["tta_scales"], chosen["tta_mirror"])
    assert summary["model"] == str(run / "fixmatch_active" / "model.pt")


def test_pipeline_runs_resumes_after_kill_and_reports(tmp_path_factory, tmp_path):
    data = fashion(tmp_path_factory)
    config = write_config(tmp_path, data)
    run = tmp_path / "run"
    # kill it inside a stage: once pseudo-labelling has started, everything before it is done
    proc = subprocess.Popen(command(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (run / "pseudolabel" / "config.yaml").exists():
        time.sleep(0.1)
    assert proc.poll() is None, "the pipeline ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = {s for s in ("supervised", "pretrain", "finetune") if (run / s / "config.yaml").exists()}
    assert finished_before == {"supervised", "pretrain", "finetune"}
    mtime = (run / "pretrain" / "backbone.pt").stat().st_mtime

    out = subprocess.run(command(config), capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("supervised", "pretrain", "finetune"):
        assert f"[pipeline] {stage}: done, skipped" in out.stdout
    assert (run / "pretrain" / "backbone.pt").stat().st_mtime == mtime   # not redone

    report = json.load(open(run / "report.json"))
    stages = [row["stage"] for row in report["accuracy"]]
    assert stages == ["supervised", "knn", "finetune", "pseudolabel", "fixmatch", "fixmatch_active", "tta"]
    for row in report["accuracy"]:   # each figure is the stage's own eval.json, not a copy
        assert 0 <= row["test"] <= 1
    # the FixMatch after active learning takes its own overrides after FixMatch's (3 steps -> 2)
    assert [steps(run / s) for s in ("fixmatch", "fixmatch_active")] == [3, 2]
    final = json.load(open(run / "evaluate_fixmatch_active" / "eval.json"))["splits"]["test"]
    assert report["accuracy"][-1]["test"] == final["tta"]["top1"]
    assert [r["iteration"] for r in report["iterations"]] == [0, 1]
    assert set(report["stage_seconds"]) >= {"pseudolabel", "fixmatch", "active", "evaluate_knn"}
    for png in report["plots"]:
        assert (run / png).stat().st_size > 1000
    assert "| + multi-scale TTA |" in (run / "report.md").read_text()
    labels = len(read_split(data, "labeled"))   # the run's own label count, whatever the dataset
    answered = json.load(open(run / "active" / "answers_summary.json"))["answered"]
    assert report["accuracy"][0]["name"] == f"Supervised only ({labels} labels, random init)"
    assert report["accuracy"][5]["name"] == f"+ active learning ({answered} answers), FixMatch again"
    chain = [row for row in report["accuracy"] if row["stage"] != "supervised"]
    assert report["val_drops"] == [b["stage"] for a, b in zip(chain, chain[1:]) if b["val"] < a["val"]]

    assert_unlabeled_pile_labeled(run, data)

    again = subprocess.run(command(config), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == len(report["stage_seconds"])


def test_pipeline_with_two_ranks_per_stage(tmp_path_factory, tmp_path):
    """pipeline.nproc=2: every stage under torchrun with 2 gloo ranks — pseudolabel's in-process
    fine-tunes, active learning's sharded inference, evaluation's summed hit counts."""
    data = fashion(tmp_path_factory)
    config = write_config(tmp_path, data)
    run = tmp_path / "run"
    # the pipeline's seed and a pipeline-wide data.augment key (not a default) reach every run it makes
    out = subprocess.run(command(config) + ["pipeline.nproc=2", "data.augment.flip=false", "run.seed=7"], capture_output=True,
                         text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 rank(s)" in out.stdout   # the stages say how many ranks they run on
    report = json.load(open(run / "report.json"))
    assert [row["stage"] for row in report["accuracy"]] == ["supervised", "knn", "finetune", "pseudolabel", "fixmatch",
                                                             "fixmatch_active", "tta"]
    val_rows = sum(1 for _ in open(os.path.join(data, "val.csv"))) - 1
    for stage in ("supervised", "finetune", "pseudolabel", "fixmatch", "fixmatch_active"):
        scores = json.load(open(run / f"evaluate_{stage}" / "eval.json"))["splits"]["val"]
        assert scores["images"] == val_rows   # each rank's share counted once
    predictions = whole_top_k(run / "pseudolabel" / "predictions")[0]
    assert len(predictions) == sum(1 for _ in open(os.path.join(data, "unlabeled.csv"))) - 1
    assert (predictions >= 0).all()
    queries = list(csv.DictReader(open(run / "active" / "queries.csv")))
    assert len(queries) == 6 and len({q["path"] for q in queries}) == 6
    assert_unlabeled_pile_labeled(run, data)
    assert json.load(open(run / "predict" / "summary.json"))["ranks"] == 2
    resolved = {str(path.parent.relative_to(run)): yaml.safe_load(open(path)) for path in run.rglob("config.yaml")}
    nested = [f"pseudolabel/iter1/{fine_tune}" for fine_tune in ("pseudo", "labeled")]
    assert set(nested) < set(resolved) and len(resolved) == 1 + len(stages.RECIPE) + len(nested)
    for where, recorded in resolved.items():   # nested fine-tunes included
        augment = recorded["data"]["augment"]
        assert recorded["run"]["seed"] == 7 and augment["flip"] is False, where
        # the pipeline-wide key joins each stage's own augment keys (the demo's FixMatch sets cutout 0)
        assert augment["cutout"] == (0 if where.startswith("fixmatch") else 0.5), where


def test_what_reruns_when_active_learnings_answers_change():
    """The steps that read active learning's labels, directly or through another step: those a rerun with
    corrected answers redoes (launch/pipeline.py), and no other."""
    assert stages.readers("active", True) == ["fixmatch_active", "evaluate_fixmatch_active", "predict"]
    assert stages.readers("fixmatch", False) == ["evaluate_fixmatch", "predict"]
    assert stages.readers("predict", True) == []
