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
import torch
import yaml
from PIL import Image

from test_pipeline import COMMON, TINY_STAGES
from tiny import ENV, ROOT, TINY_FINETUNE
from data.datasets import read_split
from trainer.runtime import stages

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


def tiny_overrides(sizes: dict = TINY, finetune_sizes: list = TINY_FINETUNE) -> list[str]:
    """Every stage's overrides: configs/own/pipeline.yaml's, then `sizes` (pseudolabel's fine-tunes:
    `finetune_sizes`)."""
    with open(os.path.join(ROOT, "configs", "own", "pipeline.yaml")) as f:
        own = yaml.safe_load(f)["pipeline"]
    out = []
    for stage, tiny in sizes.items():
        overrides = own[stage].get("overrides", [])
        if stage == "pseudolabel":   # its fine-tunes: configs/own's overrides of them, then tiny sizes
            (given,) = [o for o in overrides if o.startswith("pseudo.finetune_overrides=")]
            finetunes = yaml.safe_load(given.partition("=")[2]) + finetune_sizes
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


def make_pile(folder, classes: dict = CLASSES, unlabeled: int = 150, labeled: int = 10, val: int = 15) -> dict:
    """my-images/ as the README lays it out, `labeled` images a class and `val` in val.csv (the classes in turn);
    returns {unlabeled image path relative to my-images/unlabeled: class}."""
    rng = np.random.default_rng(0)
    truth = {}
    names = list(classes)
    for i in range(unlabeled):
        cls = names[i % len(names)]
        rel = f"{UNLABELED_FOLDERS[i % len(UNLABELED_FOLDERS)]}/IMG_{i:04d}.png"
        os.makedirs(os.path.dirname(folder / "unlabeled" / rel), exist_ok=True)
        draw(rng, classes[cls]).save(folder / "unlabeled" / rel)
        truth[rel] = cls
    for cls, colour in classes.items():
        os.makedirs(folder / "labeled" / cls)
        for i in range(labeled):
            draw(rng, colour).save(folder / "labeled" / cls / f"{i}.png")
    os.makedirs(folder / "val")
    with open(folder / "val.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for i in range(val):
            cls = names[i % len(names)]
            draw(rng, classes[cls]).save(folder / "val" / f"v{i:02d}.png")
            writer.writerow([f"val/v{i:02d}.png", cls])
    return truth


def files(folder) -> dict:
    """Every file under `folder` with its size and modification time: what a refused run leaves as it was."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def readme_argv(command: str, tmp, overrides: list[str]) -> list[str]:
    """A command of the README's sh block as the module docstring says: its folders in `tmp`, `overrides`
    appended to a launch/pipeline.py command."""
    for name in ("my-images/", "datasets/own", "runs/own"):
        command = command.replace(name, f"{tmp}/{name}")
    argv = shlex.split(command)
    assert argv[0] == "python"
    return argv + overrides if argv[1] == "launch/pipeline.py" else argv


def answers_of(argv: list[str]) -> str:
    """The pipeline.answers=FILE a command passes ("" if none): the file the annotator writes before it runs."""
    return next((a.partition("=")[2] for a in argv if a.startswith("pipeline.answers=")), "")


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
        argv = readme_argv(command, tmp, tiny_overrides())
        if answers_of(argv):
            assert answer(run / "active" / "queries.csv", answers_of(argv), truth_of) == 6
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
            # nor in the README: answers that name no class, refused by the pipeline's checks, which write nothing
            answer(run / "active" / "queries.csv", tmp / "unknown.csv", lambda path: "cat")
            before = files(run)
            refused = subprocess.run([sys.executable, *argv[1:], f"pipeline.answers={tmp / 'unknown.csv'}"], cwd=ROOT,
                                     env=ENV, capture_output=True, text=True, timeout=600)
            unknown = (refused, files(run) == before)
    return {"repeated": repeated, "unknown": unknown, "tmp": tmp, "data": data, "run": run, "truth": truth, "truth_of": truth_of, "outputs": outputs,
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


def test_answers_naming_no_class_stop_before_any_work(walkthrough):
    """While the queries wait: the pipeline reads the answers before it writes anything, so a file whose
    labels are no class of classes.txt is refused with its line, not after the run has started."""
    refused, unchanged = walkthrough["unknown"]
    assert refused.returncode == 2 and unchanged
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith(f"pipeline.py: error: {walkthrough['tmp']}/unknown.csv:2: label 'cat' is neither a class "
                           f"name of {walkthrough['data']}/classes.txt") and line.endswith("nor a class id in [0, 3)")


def with_answers(walkthrough, answers) -> subprocess.CompletedProcess:
    """The README's command that imports the answers, with `answers` in place of its pipeline.answers."""
    argv = [a for a in walkthrough["outputs"][2][0][1:] if not a.startswith("pipeline.answers=")]
    return subprocess.run([sys.executable, *argv, f"pipeline.answers={answers}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_every_model_of_the_run_carries_the_datasets_class_names(walkthrough):
    run = walkthrough["run"]
    models = {str(path.parent.relative_to(run)): path for path in run.rglob("model.pt")}
    assert set(models) >= {"supervised", "finetune", "pseudolabel", "pseudolabel/iter1/pseudo",
                           "pseudolabel/iter1/labeled", "fixmatch", "fixmatch_active"}
    for where, path in models.items():
        assert torch.load(path, weights_only=True)["classes"] == sorted(CLASSES), where


def test_the_same_answers_again_redo_nothing(walkthrough, tmp_path):
    """The same answers, as written or as another file with the same labels (class ids, other order): every
    step skipped, no stage folder touched."""
    run = walkthrough["run"]
    with open(run / "answers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "ids.csv", "w", newline="") as f:
        f.write("label,path\n" + "".join(f"{sorted(CLASSES).index(r['label'])},{r['path']}\n" for r in rows[::-1]))
    before = {k: v for k, v in files(run).items() if os.sep in k}
    for answers in (run / "answers.csv", tmp_path / "ids.csv"):
        proc = with_answers(walkthrough, answers)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("done, skipped") == len(stages.recipe(True)) and "importing them again" not in proc.stdout
    assert {k: v for k, v in files(run).items() if os.sep in k} == before


@pytest.mark.parametrize("rows, line, message", [
    (lambda queries: [(q, "cat") for q in queries], 2, "label 'cat' is neither a class name of {data}/classes.txt"),
    (lambda queries: [(queries[0], "2"), (queries[1], "0"), (queries[2], "7")], 4,
     "label '7' is neither a class name of {data}/classes.txt"),
    (lambda queries: [(queries[0], "red"), ("images/unlabeled/unlabeled/2024/IMG_9999.png", "red")], 3,
     "images/unlabeled/unlabeled/2024/IMG_9999.png is not one of the 6 queries in {run}/active/queries.csv"),
])
def test_bad_answers_after_the_run_finished_are_refused_before_any_work(walkthrough, tmp_path, rows, line, message):
    """Once the run has finished too: the answers are read and checked row by row, not skipped unread."""
    run = walkthrough["run"]
    with open(run / "active" / "queries.csv", newline="") as f:
        queries = [r["path"] for r in csv.DictReader(f)]
    (tmp_path / "answers.csv").write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows(queries)))
    before = files(run)
    proc = with_answers(walkthrough, tmp_path / "answers.csv")
    assert proc.returncode == 2 and files(run) == before
    (said,) = proc.stderr.strip().splitlines()   # one line, starting with the file, the line and the bad value
    assert said.startswith(f"pipeline.py: error: {tmp_path}/answers.csv:{line}: "
                           + message.format(data=walkthrough["data"], run=run))


def test_corrected_answers_are_imported_and_what_read_them_reruns(walkthrough):
    """The annotator corrects answers.csv after the run finished (two images now unsure, one relabeled) and runs
    the same command: labeled.csv, FixMatch after active learning, its evaluation and the pile's labels are
    redone from them, said in one line; the steps before active learning are left as they were."""
    run, truth_of, classes = walkthrough["run"], walkthrough["truth_of"], sorted(CLASSES)
    with open(run / "active" / "queries.csv", newline="") as f:
        queries = [r["path"] for r in csv.DictReader(f)]
    corrected = {queries[0]: "", queries[1]: "", queries[2]: next(c for c in classes if c != truth_of(queries[2]))}
    answer(run / "active" / "queries.csv", run / "answers.csv", lambda path: corrected.get(path, truth_of(path)))
    rerun = ("active", "fixmatch_active", "evaluate_fixmatch_active", "predict")
    kept = {k: v for k, v in files(run).items() if os.sep in k and k.split(os.sep)[0] not in rerun}
    old_model = torch.load(run / "fixmatch_active" / "model.pt", weights_only=True)["model"]
    old_predictions = (run / "predict" / "predictions.csv").read_bytes()

    proc = with_answers(walkthrough, run / "answers.csv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in proc.stdout.splitlines() if "importing them again" in line] == [
        f"[pipeline] active: {run}/answers.csv changes 3 of the answers in {run}/active/labeled.csv: importing them "
        "again, then rerunning fixmatch_active, evaluate_fixmatch_active, predict"]
    assert proc.stdout.count("done, skipped") == len(stages.recipe(True)) - len(rerun)
    with open(run / "active" / "labeled.csv", newline="") as f:
        labeled = list(csv.DictReader(f))
    assert len(labeled) == 15 + 4
    assert {r["path"]: int(r["label"]) for r in labeled if r["path"] in queries} == {
        p: classes.index(corrected.get(p, truth_of(p))) for p in queries[2:]}
    summary = json.load(open(run / "active" / "answers_summary.json"))
    assert (summary["answered"], summary["labeled_after"]) == (4, 19)
    with open(run / "pseudolabel" / "pseudo_labels.csv", newline="") as f:   # FixMatch's other labels
        pseudo = {r["path"] for r in csv.DictReader(f)} - {r["path"] for r in labeled}
    assert f"[fixmatch] {19 + len(pseudo)} labeled images (" in proc.stdout   # FixMatch again, on the corrected labels
    new_model = torch.load(run / "fixmatch_active" / "model.pt", weights_only=True)["model"]
    assert any(not torch.equal(old_model[k], new_model[k]) for k in new_model)
    assert json.load(open(run / "predict" / "summary.json"))["model"] == str(run / "fixmatch_active" / "model.pt")
    assert (run / "predict" / "predictions.csv").read_bytes() != old_predictions
    report = json.load(open(run / "report.json"))
    assert report["accuracy"][5]["name"] == "+ active learning (4 answers), FixMatch again"
    assert {k: v for k, v in files(run).items() if os.sep in k and k.split(os.sep)[0] not in rerun} == kept


# ---- the walkthrough on the smallest pile the README documents ----

MINIMUM_CLASSES = {"blue": CLASSES["blue"], "red": CLASSES["red"]}   # fewer than two classes is refused
# speed only: every batch size stays configs/own's (the demo's, which train.fit_batch fits to the pile)
FAST = {
    "supervised": ["model.width=8", "train.precision=fp32", "train.epochs=1", "finetune.eval_every=1"],
    "pretrain": ["model.width=8", "barlow.projector=[32,32]", "train.precision=fp32", "train.max_steps=1",
                 "data.backend=torch"],
    "finetune": ["model.width=8", "train.precision=fp32", "train.epochs=1", "finetune.eval_every=1"],
    "pseudolabel": ["pseudo.pseudo_epochs=1", "pseudo.labeled_epochs=1", "inference.batch_size=64"],
    "fixmatch": ["train.max_steps=1", "train.precision=fp32", "data.backend=torch"],
    "active": ["inference.batch_size=64"],
    "evaluate": ["inference.batch_size=64"],
    "predict": ["inference.batch_size=64"],
}
FAST_FINETUNE = ["model.width=8", "train.precision=fp32", "finetune.eval_every=1"]


def readme_minimum() -> dict:
    """The smallest pile the README's "Your own data" documents: unlabeled images, labeled images a class and
    how many of those the test split takes."""
    text = " ".join(section("Your own data").split())
    found = re.search(r"\(the pile, in any tree of folders: (\d+) images or more.*a few images per class that you "
                      r"labelled: (\d+) or more, as (\d+) per class become the test split", text)
    return dict(zip(("pile", "per_class", "test"), map(int, found.groups())))


@pytest.fixture(scope="module")
def minimum(tmp_path_factory):
    """The README's commands on a pile of exactly its documented minimum (two classes, a val image each),
    configs/own's batch sizes untouched: only epochs, steps and the network's width are made small."""
    tmp = tmp_path_factory.mktemp("minimum")
    size = readme_minimum()
    truth = make_pile(tmp / "my-images", MINIMUM_CLASSES, unlabeled=size["pile"], labeled=size["per_class"],
                      val=len(MINIMUM_CLASSES))
    prefix = "images/unlabeled/unlabeled/"
    outputs = []
    for command in readme_commands():
        argv = readme_argv(command, tmp, tiny_overrides(FAST, FAST_FINETUNE))
        if answers_of(argv):
            answer(tmp / "runs" / "own" / "active" / "queries.csv", answers_of(argv),
                   lambda path: truth[path[len(prefix):]])
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    return {"tmp": tmp, "size": size, "outputs": outputs}


def test_the_walkthrough_runs_on_the_smallest_documented_pile_with_batches_fitted_to_it(minimum):
    tmp, size, (_, first, second, _) = minimum["tmp"], minimum["size"], minimum["outputs"]
    data, run = tmp / "datasets" / "own", tmp / "runs" / "own"
    labeled = len(MINIMUM_CLASSES) * (size["per_class"] - size["test"])
    assert {name: len(read_split(data, name)) for name in ("labeled", "val", "test", "unlabeled")} == {
        "labeled": labeled, "val": 2, "test": 2 * size["test"], "unlabeled": size["pile"]}
    # every training stage trains with the largest batch the pile allows, and says so
    for line in (f"[finetune] train.batch_size=64 lowered to {labeled} (train.fit_batch=true): a batch is drawn from "
                 f"the {labeled} training images (labeled)",
                 f"[pretrain] train.batch_size=256 lowered to {size['pile'] + labeled} (train.fit_batch=true): a batch "
                 f"is drawn from the {size['pile'] + labeled} labeled + unlabeled images"):
        assert line in first.splitlines()
    assert re.search(r"^\[fixmatch\] train\.batch_size=32 lowered to \d+ \(train\.fit_batch=true\): ", first, re.M)
    # after the 100 answers, FixMatch's unlabeled batches (mu = 7 times the batch) fit in the rest of the pile
    assert re.search(r"^\[fixmatch\] train\.batch_size=32 lowered to \d+ \(train\.fit_batch=true\): fixmatch\.mu=7 "
                     r"times the batch is drawn from the \d+ unlabeled images$", second, re.M)
    assert json.load(open(run / "active" / "answers_summary.json"))["answered"] == 100
    with open(run / "predict" / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == size["pile"]
    assert (run / "export" / "model.onnx").exists()
