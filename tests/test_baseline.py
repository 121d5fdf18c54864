"""pipeline.baselines=[fixmatch_only]: FixMatch from random init on the run's labeled split, for the minutes the
recipe's final model took, evaluated as that model is and set against it in the report."""
import json
import os
import subprocess

import pytest
import yaml

import test_pipeline   # its tiny stage settings (the module: pytest collects its tests from it alone)
from tiny import ENV, ROOT
from data.datasets import read_split
from launch import pipeline
from trainer.runtime import stages
from trainer.runtime.config import ConfigError

# the tiny FixMatch of test_pipeline, 2 steps
BASELINE = [*test_pipeline.COMMON, *test_pipeline.TINY_STAGES["fixmatch"], "train.max_steps=2"]


def write_config(tmp_path, data, baseline=BASELINE) -> str:
    path = test_pipeline.write_config(tmp_path, data)
    tree = yaml.safe_load(open(path))
    tree["pipeline"].update(active_learning=False, baselines=["fixmatch_only"], fixmatch_only={
        "config": os.path.join(ROOT, "configs", "demo", "fixmatch_only.yaml"), "overrides": baseline})
    with open(path, "w") as f:
        yaml.safe_dump(tree, f)
    return path


def run_pipeline(config, *overrides):
    out = subprocess.run(test_pipeline.command(config) + list(overrides), capture_output=True, text=True,
                         timeout=1200, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def events(folder):
    return [json.loads(line) for line in open(folder / "metrics.jsonl")]


def tta(folder, split):
    return json.load(open(folder / "eval.json"))["splits"][split]["tta"]["top1"]


def test_fixmatch_only_from_random_init_on_the_labels_at_the_recipes_minutes(data, tmp_path):
    config = write_config(tmp_path, data)
    run = tmp_path / "run"
    out = run_pipeline(config)
    times = json.load(open(run / "stage_times.json"))

    recorded = yaml.safe_load(open(run / "fixmatch_only" / "config.yaml"))
    # random init, the run's labeled split, no pseudo-labels, the recipe's network (the tiny fine-tune's width 8,
    # not the baseline config's 16)
    assert recorded["fixmatch"]["model"] == "random"
    assert (recorded["fixmatch"]["labeled"], recorded["fixmatch"]["pseudo_labels"]) == ("labeled", "")
    assert recorded["model"] == yaml.safe_load(open(run / "finetune" / "config.yaml"))["model"]
    assert recorded["model"]["width"] == 8
    labels = len(read_split(data, "labeled"))
    assert f"[fixmatch] {labels} labeled images (labeled)," in out.stdout
    # its training minutes: the steps that make the final model (active learning is off here)
    made_by = ["pretrain", "finetune", "pseudolabel", "fixmatch"]
    assert recorded["train"]["minutes"] == round(sum(times[s] for s in made_by) / 60, 4) > 0

    # it starts at chance, where the recipe's FixMatch starts from a trained model
    start = {s: next(e["val_top1"] for e in events(run / s) if e.get("step") == 0) for s in ("fixmatch", "fixmatch_only")}
    assert start["fixmatch_only"] <= 0.2 < start["fixmatch"]
    assert max(e["step"] for e in events(run / "fixmatch_only") if "step" in e) == 2

    report = json.load(open(run / "report.json"))
    row = report["accuracy"][-1]
    minutes = (times["fixmatch_only"] + times["evaluate_fixmatch_only"]) / 60
    assert row["name"] == f"FixMatch only (random init, same labels, {minutes:.1f} min)"
    figures = {s: tta(run / "evaluate_fixmatch_only", s) for s in ("val", "test")}
    assert (row["val"], row["test"]) == (figures["val"], figures["test"])
    assert "fixmatch_only" not in report["val_drops"]   # not a step of the recipe's chain
    recipe = {s: tta(run / "evaluate_fixmatch", s) for s in ("val", "test")}
    text = (run / "report.md").read_text()
    (line,) = [line for line in text.splitlines() if line.startswith(f"| {row['name']}")]   # a kept-input note may follow
    assert line.endswith(f" | {100 * figures['val']:.2f} | {100 * figures['test']:.2f} |")
    recipe_minutes = sum(times[s] for s in made_by + ["evaluate_fixmatch"]) / 60
    (versus,) = report["versus_baselines"]
    assert (versus["test"], versus["val"]) == (recipe["test"] - figures["test"], recipe["val"] - figures["val"])
    assert versus["recipe_minutes"] == pytest.approx(recipe_minutes)
    assert (f"recipe − FixMatch only: {100 * (recipe['test'] - figures['test']):+.2f} test "
            f"({100 * (recipe['val'] - figures['val']):+.2f} val) at equal minutes: the recipe's "
            f"{recipe_minutes:.1f} (pretrain, finetune, pseudolabel, fixmatch, evaluate_fixmatch;") in text
    assert f"FixMatch only's {minutes:.1f} (its training and evaluation)." in text

    # kept on a rerun; run again, with its evaluation, once its own config changes
    again = run_pipeline(config)
    assert "[pipeline] fixmatch_only: done, skipped" in again.stdout
    assert json.load(open(run / "stage_times.json")) == times
    changed = write_config(tmp_path, data, [*BASELINE, "train.max_steps=3"])
    third = run_pipeline(changed)
    assert "[pipeline] fixmatch_only: made with another config (train.max_steps: 2 -> 3)" in third.stdout
    assert max(e["step"] for e in events(run / "fixmatch_only") if "step" in e) == 3
    assert "[pipeline] evaluate_fixmatch_only: evaluate.py" in third.stdout
    assert "[pipeline] evaluate_fixmatch: done, skipped" in third.stdout


def test_an_unknown_baseline_is_one_line_naming_the_known_ones(tmp_path):
    config = write_config(tmp_path, str(tmp_path / "no-data"))
    out = subprocess.run(test_pipeline.command(config) + ["pipeline.baselines=[fixmatch_only,mean_teacher]"],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"pipeline.py: error: pipeline.baselines: 'mean_teacher' is not one of {', '.join(stages.BASELINES)}"]
    assert not (tmp_path / "run").exists()


def test_a_baseline_needs_its_config(tmp_path):
    tree = yaml.safe_load(open(write_config(tmp_path, str(tmp_path / "no-data"))))
    del tree["pipeline"]["fixmatch_only"]
    (tmp_path / "unset.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"^pipeline.fixmatch_only.config: required with pipeline.baselines"):
        pipeline.main(["--config", str(tmp_path / "unset.yaml")])


@pytest.mark.parametrize("active_learning, timed", [
    (True, ["pretrain", "finetune", "pseudolabel", "fixmatch", "active", "fixmatch_active", "evaluate_fixmatch_active"]),
    (False, ["pretrain", "finetune", "pseudolabel", "fixmatch", "evaluate_fixmatch"]),
])
def test_the_recipes_minutes_are_those_of_the_steps_that_make_its_final_model(active_learning, timed):
    """Read off the recipe's inputs: the supervised reference, the kNN and other evaluations and predict aside."""
    assert stages.recipe_timed_steps(active_learning) == timed
