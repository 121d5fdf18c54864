"""The README's "Your own data" walkthrough, run as written on a small generated pile of images.

A pile of 3 classes (red, green, blue: a square of the class's colour on grey noise, 28x28 PNGs) is laid
out as the README says: my-images/unlabeled/ (a nested tree), my-images/labeled/<class>/ and
my-images/val.csv. The ```sh block of the section is then run command by command from the repository
root (a trailing backslash continues a line; '#' lines are comments), changed only mechanically:
  - `python` -> this interpreter;
  - the README's folders `my-images/`, `datasets/own` and `runs/own` -> the same names in a temporary folder;
  - every `launch/pipeline.py` command gets tiny sizes appended (the stages take seconds): each stage's
    overrides are configs/own/pipeline.yaml's followed by TINY below (tests/test_pipeline.py's sizes);
  - before the command that passes `pipeline.answers=FILE`, the test is the annotator the comment above
    it addresses: FILE = queries.csv with its column guess renamed label and every guess set right.
The section's ```python block (running the exported model.onnx) runs in a fresh process, as written but
for "photo.jpg" -> each of some of the pile's images in turn.
"""
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml
from PIL import Image

from test_pipeline import COMMON, TINY_STAGES
from tiny import ENV, ROOT, TINY_FINETUNE

CLASSES = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}
UNLABELED_FOLDERS = ["2023/holiday", "2023/garden/day1", "2024", "2024/misc/old"]
TINY = {   # after configs/own/pipeline.yaml's own overrides of each stage, which set the image size
    "supervised": TINY_STAGES["supervised"],
    "pretrain": TINY_STAGES["pretrain"],
    "finetune": TINY_STAGES["finetune"],
    "pseudolabel": ["pseudo.schedule=[5]", "pseudo.fixmatch_p=2", "pseudo.pseudo_epochs=1",
                    "pseudo.labeled_epochs=1", "inference.batch_size=64"],   # + its fine-tunes' overrides
    "fixmatch": TINY_STAGES["fixmatch"],
    "active": ["active.budget=6", "inference.batch_size=64"],   # configs/own's 46 clusters -> 6
    "evaluate": ["inference.batch_size=64"],
    "predict": ["inference.batch_size=64"],
}


def section(name: str) -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(f"\n## {name}\n")
    return text[start:text.index("\n## ", start + 1)]


def block(text: str, language: str) -> str:
    (found,) = re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.S | re.M)
    return found


def readme_commands() -> list[str]:
    lines = block(section("Your own data"), "sh").replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def tiny_overrides() -> list[str]:
    """Every stage's overrides: configs/own/pipeline.yaml's, then tiny sizes."""
    with open(os.path.join(ROOT, "configs", "own", "pipeline.yaml")) as f:
        own = yaml.safe_load(f)["pipeline"]
    out = []
    for stage, tiny in TINY.items():
        overrides = own[stage].get("overrides", [])
        if stage == "pseudolabel":   # its fine-tunes: configs/own's overrides of them, then tiny sizes
            (given,) = [o for o in overrides if o.startswith("pseudo.finetune_overrides=")]
            finetunes = yaml.safe_load(given.partition("=")[2]) + TINY_FINETUNE
            tiny = tiny + [f"pseudo.finetune_overrides=[{','.join(finetunes)}]"]
        out.append(f"pipeline.{stage}.overrides={json.dumps(overrides + COMMON + tiny)}")
    out.append(f"pipeline.fixmatch_active_overrides={json.dumps(own['fixmatch_active_overrides'] + ['train.max_steps=2'])}")
    return out


def draw(rng, colour) -> Image.Image:
    """Grey noise with a square of `colour` (noisy too) somewhere in it."""
    pixels = rng.integers(70, 180, (28, 28, 1)).repeat(3, axis=2)
    side = int(rng.integers(10, 18))
    top, left = rng.integers(0, 28 - side, 2)
    pixels[top:top + side, left:left + side] = np.clip(np.array(colour) + rng.integers(-30, 30, (side, side, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def make_pile(folder) -> dict:
    """my-images/ as the README lays it out; returns {unlabeled image path relative to my-images/unlabeled: class}."""
    rng = np.random.default_rng(0)
    truth = {}
    names = list(CLASSES)
    for i in range(150):
        cls = names[i % 3]
        rel = f"{UNLABELED_FOLDERS[i % len(UNLABELED_FOLDERS)]}/IMG_{i:04d}.png"
        os.makedirs(os.path.dirname(folder / "unlabeled" / rel), exist_ok=True)
        draw(rng, CLASSES[cls]).save(folder / "unlabeled" / rel)
        truth[rel] = cls
    for cls, colour in CLASSES.items():
        os.makedirs(folder / "labeled" / cls)
        for i in range(10):
            draw(rng, colour).save(folder / "labeled" / cls / f"{i}.png")
    os.makedirs(folder / "val")
    with open(folder / "val.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for i in range(15):
            cls = names[i % 3]
            draw(rng, CLASSES[cls]).save(folder / "val" / f"v{i:02d}.png")
            writer.writerow([f"val/v{i:02d}.png", cls])
    return truth


def answer(queries_csv, answers_csv, truth_of):
    """The annotator: queries.csv with its column guess renamed label and every guess set right."""
    with open(queries_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(answers_csv, "w", newline="") as f:
        header = ["label" if c == "guess" else c for c in rows[0]]
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        writer.writerows({**{k: v for k, v in r.items() if k != "guess"}, "label": truth_of(r["path"])} for r in rows)
    return len(rows)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("walkthrough")
    truth = make_pile(tmp / "my-images")
    data, run = tmp / "datasets" / "own", tmp / "runs" / "own"
    unlabeled_prefix = "images/unlabeled/unlabeled/"   # prepare own: images/unlabeled/<folder name>/...

    def truth_of(path):   # a path of the dataset (relative to data.root) -> its true class
        assert path.startswith(unlabeled_prefix), path
        return truth[path[len(unlabeled_prefix):]]

    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["launch/prepare.py", "launch/pipeline.py", "launch/pipeline.py",
                                                "launch/export.py"]
    outputs = []
    for command in commands:
        for name in ("my-images/", "datasets/own", "runs/own"):
            command = command.replace(name, f"{tmp}/{name}")
        argv = shlex.split(command)
        assert argv[0] == "python"
        if argv[1] == "launch/pipeline.py":
            argv += tiny_overrides()
            answers = [a.partition("=")[2] for a in argv if a.startswith("pipeline.answers=")]
            if answers:
                assert answer(run / "active" / "queries.csv", answers[0], truth_of) == 6
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outputs.append((argv, proc.stdout))
        if len(outputs) == 2:   # not in the README: the same command again before answering
            mtime = os.stat(run / "active" / "queries.csv").st_mtime_ns
            again = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True,
                                   timeout=600)
            assert again.returncode == 0 and os.stat(run / "active" / "queries.csv").st_mtime_ns == mtime
            repeated = again.stdout
    return {"repeated": repeated, "tmp": tmp, "data": data, "run": run, "truth": truth, "truth_of": truth_of, "outputs": outputs,
            "export": tmp / "runs" / "own" / "export"}


def test_the_pipeline_stops_for_labels_and_says_how_to_go_on(walkthrough):
    (first, out), (second, out2) = walkthrough["outputs"][1:3]
    run = walkthrough["run"]
    # the budget of 6 queries is below configs/own's 46 clusters: 6 clusters, said in one line
    assert "[active] active.clusters=46 is more than the 6 queries that active.budget=6 buys: 6 clusters" in out
    (paused,) = [line for line in out.splitlines() if line.startswith("[pipeline] paused for your labels")]
    assert f"label the 6 images of {run}/active/queries.csv (pictures: queries.png)" in paused
    # the command it gives is the README's next one (with the same tiny overrides)
    command = shlex.split(paused.partition("then continue with: ")[2])
    assert command == first + [f"pipeline.answers={run}/answers.csv"]
    assert sorted(command) == sorted(second)
    assert "[pipeline] fixmatch_active" not in out and "[pipeline] evaluate" not in out   # nothing after active ran
    for stage in ("supervised", "pretrain", "finetune", "pseudolabel", "fixmatch"):
        assert f"[pipeline] {stage}: done, skipped" in out2
    # run again before the answers: the queries are not made again, and it stops with the same line
    assert f"[pipeline] active: queries written before, not answered yet ({run}/active/queries.csv)" in \
        walkthrough["repeated"]
    assert walkthrough["repeated"].strip().splitlines()[-1] == paused
    summary = json.load(open(run / "active" / "answers_summary.json"))
    assert (summary["answered"], summary["source"], summary["labeled_after"]) == (6, f"{run}/answers.csv", 21)


def test_every_unlabeled_image_gets_a_class(walkthrough):
    run, truth = walkthrough["run"], walkthrough["truth"]
    with open(run / "predict" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == len(truth) == 150
    assert {walkthrough["truth_of"](p) for p in paths} and all(r["class"] in CLASSES for r in rows)
    assert sorted(p.partition("images/unlabeled/unlabeled/")[2] for p in paths) == sorted(truth)
    summary = json.load(open(run / "predict" / "summary.json"))
    assert summary["model"] == str(run / "fixmatch_active" / "model.pt")
    report = json.load(open(run / "report.json"))   # no hidden labels: no pseudo-label precision
    assert [r["stage"] for r in report["accuracy"]] == ["supervised", "knn", "finetune", "pseudolabel", "fixmatch",
                                                        "fixmatch_active", "tta"]
    assert all(r["precision"] is None for r in report["iterations"][1:])


def test_the_exported_onnx_model_gives_the_predictions_probabilities(walkthrough):
    export, run, tmp = walkthrough["export"], walkthrough["run"], walkthrough["tmp"]
    assert open(export / "classes.txt").read().splitlines() == sorted(CLASSES)
    assert open(walkthrough["data"] / "classes.txt").read() == open(export / "classes.txt").read()
    with open(run / "predict" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))[::10]
    code = block(section("Your own data"), "python").replace('"photo.jpg"', "path").replace("runs/own", f"{tmp}/runs/own")
    assert "path" in code and f"{tmp}/runs/own/export/model.onnx" in code
    script = ("import json, sys\nout = []\nfor path in json.loads(sys.argv[1]):\n" + textwrap.indent(code, "    ")
              + "    out.append(probabilities[0].tolist())\nprint(json.dumps(out))\n")
    images = [str(tmp / "my-images" / "unlabeled" / r["path"].partition("images/unlabeled/unlabeled/")[2]) for r in rows]
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(images)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    classes = sorted(CLASSES)
    for row, probabilities in zip(rows, json.loads(proc.stdout)):
        assert classes[int(np.argmax(probabilities))] == row["class"]
        expected = {row[f"top{i}_class"]: float(row[f"top{i}_prob"]) for i in range(1, 4)}
        np.testing.assert_allclose(probabilities, [expected[c] for c in classes], atol=1e-4)
        assert abs(max(probabilities) - float(row["confidence"])) <= 1e-4


def test_without_active_learning_fixmatch_labels_the_pile(walkthrough):
    """pipeline.active_learning=false: no labelling; FixMatch's model labels the pile (only predict reruns)."""
    argv = walkthrough["outputs"][1][0]
    run = walkthrough["run"]
    proc = subprocess.run([sys.executable, *argv[1:], "pipeline.active_learning=false", "--force", "predict"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[pipeline] predict: predict.py" in proc.stdout
    assert not [line for line in proc.stdout.splitlines() if re.match(r"\[pipeline\] (\w+_)?active", line)]
    summary = json.load(open(run / "predict" / "summary.json"))
    assert summary["model"] == str(run / "fixmatch" / "model.pt")
    report = json.load(open(run / "report.json"))
    assert [r["stage"] for r in report["accuracy"]] == ["supervised", "knn", "finetune", "pseudolabel", "fixmatch", "tta"]


def test_the_demo_oracle_on_your_own_images_stops_before_any_work(walkthrough, tmp_path):
    proc = subprocess.run([sys.executable, "launch/pipeline.py", "--config", "configs/demo/pipeline.yaml",
                           f"data.root={walkthrough['data']}", f"run.dir={tmp_path / 'run'}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert proc.stderr.strip().splitlines() == [
        f"pipeline.py: error: pipeline.oracle=true: {walkthrough['data']}/unlabeled.csv has no hidden labels to "
        "answer active learning's queries (your own images): pass pipeline.oracle=false to label the queries "
        "yourself, or pipeline.active_learning=false to leave active learning out"]


def test_answers_before_any_queries_stop_before_any_work(walkthrough, tmp_path):
    argv = [a.replace(str(walkthrough["run"]), str(tmp_path / "run")) for a in walkthrough["outputs"][2][0]]
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert proc.stderr.strip().splitlines() == [
        f"pipeline.py: error: pipeline.answers={tmp_path}/run/answers.csv: no queries to answer in "
        f"{tmp_path}/run/active/queries.csv yet: run without pipeline.answers first; it stops once they are written"]
