import csv
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from tiny import ENV, ROOT, fashion, other_dataset, pixels, stage, tiny_classifier, without_class_names
from data.datasets import read_classes, read_split
from launch import predict
from trainer.runtime.engine import StageError

SCRIPT = os.path.join(ROOT, "launch", "predict.py")
CONFIG = os.path.join(ROOT, "configs", "demo", "predict.yaml")
SCALES = ["28", "40"]
TWO_SCALES = f"predict.scales=[{','.join(SCALES)}]"


def options(data, *more):
    """The demo config on the test data, without its tta_from (these tests give their scales), then `more`."""
    return ["--config", CONFIG, f"data.root={data}", "inference.batch_size=16", "data.workers=0",
            "data.backend=torch", "run.device=cpu", "predict.tta_from=", *more]


def predicting(model, input, out, *more):
    return [f"predict.model={model}", f"predict.input={input}", f"run.dir={out}", *more]


def rows(out):
    with open(os.path.join(out, "predictions.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_same_predictions(one, two):
    """Paths, classes and top-5 classes equal; probabilities within float32 noise (other batches) plus the
    6 decimals written."""
    assert [r["path"] for r in one] == [r["path"] for r in two]
    for a, b in zip(one, two):
        names = [k for k in a if not k.endswith("prob") and k != "confidence"]
        assert {k: a[k] for k in names} == {k: b[k] for k in names}
        for k in [k for k in a if k.endswith("prob")] + ["confidence"]:
            assert float(a[k]) == pytest.approx(float(b[k]), abs=2e-6), (a["path"], k)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs on one intra-op thread, as tiny.ENV gives the stage processes: 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The test split labeled in one run, with two-scale TTA, in chunks of 24 rows (the last one short)."""
    data = fashion(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("predict")
    model = tiny_classifier(data, tmp / "model.pt")
    out = str(tmp / "out")
    predict.main(options(data, *predicting(tmp / "model.pt", "test", out, TWO_SCALES, "predict.chunk_size=24")))
    return data, model, str(tmp / "model.pt"), out


def independent(model, paths, scales, mirror=False):
    """The TTA mean computed here: softmax of each scale's view (and of its left-right mirror), averaged."""
    with torch.no_grad():
        views = [pixels(paths, int(s)) for s in scales]
        views += [v.flip(-1) for v in views] if mirror else []
        return np.mean([torch.softmax(model(v), 1).numpy() for v in views], axis=0)


def assert_rows_are(got, probs, names, k=5):
    """Each row's class and top-k against `probs`: within 3e-5, as this model's standardising head amplifies
    float32 noise, and channels-last kernels (the stage's) alone move its probabilities by ~6e-6 from the
    contiguous ones computed here."""
    assert len(got) == len(probs)
    for row, p, top in zip(got, probs, np.argsort(-probs, axis=1)[:, :k]):
        assert row["class"] == row["top1_class"] == names[top[0]]
        assert [row[f"top{i}_class"] for i in range(1, k + 1)] == [names[c] for c in top]
        assert float(row["confidence"]) == pytest.approx(p[top[0]], abs=3e-5)
        assert [float(row[f"top{i}_prob"]) for i in range(1, k + 1)] == pytest.approx(p[top], abs=3e-5)


def test_split_predictions_match_an_independent_computation(reference):
    data, model, _, out = reference
    split, names = read_split(data, "test"), read_classes(data)
    probs = independent(model, split.paths, SCALES)
    ranked = np.argsort(-probs, axis=1)[:, :5]
    got = rows(out)
    assert list(got[0]) == ["path", "class", "confidence"] + [f"top{i}_{x}" for i in range(1, 6)
                                                              for x in ("class", "prob")]
    assert [r["path"] for r in got] == [p[len(data) + 1:] for p in split.paths]
    assert_rows_are(got, probs, names)
    assert len({r["class"] for r in got}) > 2   # a model whose answer depends on the image
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["top1"] == pytest.approx(float((ranked[:, 0] == split.labels).mean()))
    assert summary["top5"] == pytest.approx(float((ranked == split.labels[:, None]).any(1).mean()))
    assert (summary["images"], summary["labeled"], summary["bad_images"], summary["scales"]) == (800, 800, 0, [28, 40])
    assert open(os.path.join(out, "bad_images.txt")).read() == ""
    assert not os.path.exists(os.path.join(out, "chunks"))


def test_a_finished_run_is_not_redone(reference, capsys):
    data, _, model, out = reference
    before = os.stat(os.path.join(out, "predictions.csv")).st_mtime_ns
    predict.main(options(data, *predicting(model, "test", out, TWO_SCALES, "predict.chunk_size=24")))
    assert "nothing to do" in capsys.readouterr().out
    assert os.stat(os.path.join(out, "predictions.csv")).st_mtime_ns == before
    with pytest.raises(ValueError, match=r"another config \(predict.scales: \[28, 40\] -> \[28\]\); pass --restart"):
        predict.main(options(data, *predicting(model, "test", out, "predict.scales=[28]", "predict.chunk_size=24")))


def test_a_killed_run_resumes_to_the_same_csv(reference, tmp_path, capsys):
    data, _, model, out = reference
    args = options(data, *predicting(model, "test", tmp_path, TWO_SCALES, "predict.chunk_size=24"))
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    done = tmp_path / "chunks" / "chunk-000002.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not done.exists():
        time.sleep(0.01)
    assert proc.poll() is None, "predict ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "predictions.csv").exists()
    capsys.readouterr()
    predict.main(args)
    resumed = re.findall(r"resuming: (\d+) of 34 chunks already labeled", capsys.readouterr().out)
    assert len(resumed) == 1 and 3 <= int(resumed[0]) < 34
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["labeled"] == 800 and summary["images_this_run"] == 800 - 24 * int(resumed[0])   # none redone
    # the same batches as the uninterrupted run: the same bytes
    assert (tmp_path / "predictions.csv").read_bytes() == open(os.path.join(out, "predictions.csv"), "rb").read()
    logged = [json.loads(line)["chunk"] for line in open(tmp_path / "metrics.jsonl") if '"chunk"' in line]
    assert len(logged) == len(set(logged))


def test_two_ranks_give_the_same_csv(reference, tmp_path):
    """The test split's images as a folder, plus unreadable images where a stand-in would come from the other
    rank (last row of rank 0's block of chunk 0) and from the start of the chunk (the last row): 2 ranks
    with other chunks (300 rows) and batches (8 a rank) give the predictions of the 1-rank reference."""
    data, _, model, out = reference
    folder = tmp_path / "images"
    for path in read_split(data, "test").paths:
        rel = os.path.relpath(path, data)   # images/test/NNNNN.png: the split's paths
        os.makedirs(os.path.dirname(folder / rel), exist_ok=True)
        shutil.copyfile(path, folder / rel)
    for name in ("00148_bad.png", "zz_bad.png"):   # rows 149 and 801, sorted among the others
        (folder / "images" / "test" / name).write_bytes(b"not a png")
    stage("predict", *options(data, *predicting(model, folder, tmp_path / "out", TWO_SCALES, "predict.chunk_size=300")),
          torchrun=2)
    assert_same_predictions(rows(str(tmp_path / "out")), rows(out))
    bad = [line.split("\t")[0] for line in open(tmp_path / "out" / "bad_images.txt")]
    assert bad == ["images/test/00148_bad.png", "images/test/zz_bad.png"]
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert (summary["ranks"], summary["labeled"], summary["bad_images"]) == (2, 800, 2)


def image_tree(data, folder, count=12):
    """`count` test images copied into a nested folder (sorted as the split), plus files that are not images."""
    split = read_split(data, "test")
    names = []
    for i, path in enumerate(split.paths[:count]):
        rel = os.path.join("a" if i % 2 else "b/c", f"img{i:02d}.png")
        os.makedirs(os.path.dirname(folder / rel), exist_ok=True)
        shutil.copyfile(path, folder / rel)
        names.append((rel, path[len(data) + 1:]))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"skipped: hidden")
    return dict(names)


def test_a_folder_with_a_corrupt_image(reference, tmp_path, capsys, caplog):
    data, _, model, out = reference
    folder = tmp_path / "images"
    copied = image_tree(data, folder)
    (folder / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    predict.main(options(data, *predicting(model, folder, tmp_path / "out", TWO_SCALES)))
    got = rows(str(tmp_path / "out"))
    assert [r["path"] for r in got] == sorted(copied)
    expected = {r["path"]: r for r in rows(out)}
    assert_same_predictions(got, [{**expected[copied[r["path"]]], "path": r["path"]} for r in got])
    bad = open(tmp_path / "out" / "bad_images.txt").read().splitlines()
    assert len(bad) == 1 and bad[0].startswith("b/broken.jpg\tcannot decode")
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert (summary["images"], summary["labeled"], summary["bad_images"]) == (13, 12, 1)
    assert "top1" not in summary   # a folder has no labels
    captured = capsys.readouterr()
    logged = (captured.out + captured.err).splitlines() + [r.getMessage() for r in caplog.records]
    assert len([line for line in logged if "broken.jpg" in line]) == 1   # one line, not one per process or retry


def test_a_chunk_without_a_readable_image(reference, tmp_path):
    data, _, model, _ = reference
    folder = tmp_path / "images"
    image_tree(data, folder, count=2)   # a/img01.png, b/c/img00.png
    for name in ("b/a1.png", "b/a2.png", "b/a3.png"):   # rows 1-3: the second chunk of 3 rows
        (folder / name).write_bytes(b"")
    predict.main(options(data, *predicting(model, folder, tmp_path / "out", "predict.scales=[28]",
                                           "predict.chunk_size=3")))
    assert [r["path"] for r in rows(str(tmp_path / "out"))] == ["a/img01.png", "b/c/img00.png"]
    assert open(tmp_path / "out" / "bad_images.txt").read() == "".join(
        f"b/a{i}.png\tempty file (0 bytes)\n" for i in (1, 2, 3))


def test_a_symlink_out_of_the_folder_is_refused(reference, tmp_path):
    data, _, model, _ = reference
    folder = tmp_path / "images"
    image_tree(data, folder, count=2)
    os.symlink(os.path.join(data, "classes.txt"), folder / "a" / "outside.png")
    with pytest.raises(StageError, match=r"a/outside.png is a symlink to .*classes.txt, outside the folder: refused"):
        predict.main(options(data, *predicting(model, folder, tmp_path / "out", "predict.scales=[28]")))
    assert not (tmp_path / "out").exists()


def test_a_csv_of_paths(reference, tmp_path):
    data, _, model, out = reference
    expected = rows(out)[5:25:2]
    listing = tmp_path / "some.csv"
    listing.write_text("path\n" + "".join(r["path"] + "\n" for r in expected))
    predict.main(options(data, *predicting(model, listing, tmp_path / "out", TWO_SCALES)))
    assert_same_predictions(rows(str(tmp_path / "out")), expected)
    listing.write_text("path\n../escape.png\n")
    with pytest.raises(ValueError, match=r"some.csv:2: expected a path relative to and inside"):
        predict.main(options(data, *predicting(model, listing, tmp_path / "out2", "predict.scales=[28]")))


def some_rows(data, tmp_path, count=40):
    """A CSV of the first `count` test images (paths relative to data.root) and their labels; their paths."""
    split = read_split(data, "test")
    paths = split.paths[:count]
    listing = tmp_path / "some.csv"
    listing.write_text("path,label\n" + "".join(f"{p[len(data) + 1:]},{y}\n" for p, y in zip(paths, split.labels)))
    return str(listing), paths


def write_eval(folder, model, **val):
    os.makedirs(folder, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps({"model": model, "splits": {"val": val, "test": val}}))


def test_mirrored_views_match_an_independent_computation(reference, tmp_path, capsys):
    """predict.mirror=true: each scale's view and its mirror averaged; tta_from's eval.json decides the scales
    and mirrors (tta_mirror absent: none); a run dir as predict.model without scales: the size it trained at."""
    data, model, path, out = reference
    names = read_classes(data)
    listing, paths = some_rows(data, tmp_path)
    mirrored = independent(model, paths, SCALES, mirror=True)
    assert np.abs(mirrored - independent(model, paths, SCALES)).max() > 1e-2   # mirrors change the answer

    evaluated = tmp_path / "evaluate"
    write_eval(evaluated, path, tta_scales=[28, 40], tta_mirror=True)
    predict.main(options(data, *predicting(path, listing, tmp_path / "a", f"predict.tta_from={evaluated}")))
    assert_rows_are(rows(str(tmp_path / "a")), mirrored, names)
    summary = json.load(open(tmp_path / "a" / "summary.json"))
    assert (summary["scales"], summary["mirror"], summary["labeled"]) == ([28, 40], True, 40)
    assert "scales [28, 40] px and their mirrors" in capsys.readouterr().out

    predict.main(options(data, *predicting(path, listing, tmp_path / "b", TWO_SCALES, "predict.mirror=true")))
    assert (tmp_path / "b" / "predictions.csv").read_bytes() == (tmp_path / "a" / "predictions.csv").read_bytes()

    # an eval.json written before evaluate.mirror: no mirrors, the reference's rows
    write_eval(evaluated, path, tta_scales=[28, 40])
    predict.main(options(data, *predicting(path, listing, tmp_path / "c", f"predict.tta_from={evaluated / 'eval.json'}")))
    assert_same_predictions(rows(str(tmp_path / "c")), rows(out)[:40])
    # the same config over an eval.json that now says otherwise: not mixed into a finished run's views
    write_eval(evaluated, path, tta_scales=[28, 40], tta_mirror=True)
    with pytest.raises(ValueError, match=r"made before the TTA views \(scales \[28, 40\] -> \[28, 40\], mirror False "
                                         r"-> True\) changed; pass --restart"):
        predict.main(options(data, *predicting(path, listing, tmp_path / "c", f"predict.tta_from={evaluated / 'eval.json'}")))

    # predict.model a run dir, no scales: the image size of the config.yaml beside its model.pt, mirrored
    trained = tmp_path / "trained"
    os.makedirs(trained)
    shutil.copyfile(path, trained / "model.pt")
    (trained / "config.yaml").write_text("data:\n  image_size: 28\n")
    predict.main(options(data, *predicting(trained, listing, tmp_path / "d", "predict.mirror=true")))
    assert_rows_are(rows(str(tmp_path / "d")), independent(model, paths, ["28"], mirror=True), names)
    written = yaml.safe_load(open(tmp_path / "d" / "config.yaml"))["predict"]
    assert (written["model"], written["scales"], written["mirror"]) == (str(trained / "model.pt"), [], True)


def test_top_k_columns(reference, tmp_path):
    """predict.top_k pairs per row, at most the classes; summary.json's top-5 whatever it is."""
    data, model, path, out = reference
    names = read_classes(data)
    listing, paths = some_rows(data, tmp_path, count=10)
    probs = independent(model, paths, SCALES)
    for k, columns in ((2, 2), (30, 10)):
        predict.main(options(data, *predicting(path, listing, tmp_path / f"top{k}", TWO_SCALES, f"predict.top_k={k}")))
        got = rows(str(tmp_path / f"top{k}"))
        assert list(got[0])[3:] == [f"top{i}_{x}" for i in range(1, columns + 1) for x in ("class", "prob")]
        assert_rows_are(got, probs, names, k=columns)
        summary = json.load(open(tmp_path / f"top{k}" / "summary.json"))
        labels = read_split(data, "test").labels[:10]
        assert summary["top5"] == pytest.approx(float((np.argsort(-probs, 1)[:, :5] == labels[:, None]).any(1).mean()))
    assert sum(float(got[0][f"top{i}_prob"]) for i in range(1, 11)) == pytest.approx(1, abs=1e-5)


def test_on_bad_image_error_stops_naming_the_image(reference, tmp_path):
    data, _, model, _ = reference
    folder = tmp_path / "images"
    image_tree(data, folder, count=2)
    (folder / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(StageError, match=r"b/broken.png: cannot decode.*; data.on_bad_image=error stops at an "
                                         r"unreadable image \(skip lists them in bad_images.txt\)$"):
        predict.main(options(data, *predicting(model, folder, tmp_path / "out", "predict.scales=[28]",
                                               "data.on_bad_image=error")))
    assert not (tmp_path / "out" / "predictions.csv").exists()


@pytest.mark.parametrize("overrides, message", [
    (["predict.scales=[28]", "predict.tta_from=runs/x"],
     "predict.scales=[28], predict.tta_from=runs/x: give one (tta_from takes the scales evaluate chose; "
     "predict.tta_from= clears it)"),
    (["predict.mirror=true", "predict.tta_from=runs/x"],
     "predict.mirror=true: only without predict.tta_from (runs/x: its eval.json's tta_mirror decides)"),
    (["predict.tta_from={tmp}/none"], "predict.tta_from={tmp}/none: cannot read {tmp}/none/eval.json (No such file or "
                                      "directory)"),
    (["predict.tta_from={eval}"], "predict.tta_from={eval}: {eval} records no TTA scales (a kNN evaluation?)"),
    ([], "predict.scales=[]: {model_dir}/config.yaml does not say which image size {model} was trained at; set "
         "predict.scales=[PX] (or predict.tta_from)"),
    (["predict.scales=[28,4]"], "predict.scales[1]=4: expected an integer >= 8"),
    (["predict.top_k=0"], "predict.top_k=0: expected an integer >= 1"),
    (["predict.chunk_size=0"], "predict.chunk_size=0: expected an integer >= 1"),
    (["predict.mirror=yes please"], "predict.mirror: expected bool, got str 'yes please'"),
    (["predict.model="], "predict.model: required: the model.pt that labels the images (or the run dir that holds it)"),
    (["predict.input=nowhere"], "predict.input=nowhere: expected a split name (labeled, val, test, unlabeled), a CSV "
                                "file or a folder"),
])
def test_bad_config_one_line_naming_the_key(reference, tmp_path, overrides, message):
    data, _, model, _ = reference
    (tmp_path / "eval.json").write_text(json.dumps({"backbone": "b.pt", "knn": {"val": 0.5}}))
    fill = {"tmp": str(tmp_path), "eval": str(tmp_path / "eval.json"), "model": model,
            "model_dir": os.path.dirname(model)}
    with pytest.raises(ValueError) as e:
        predict.main(options(data, *predicting(model, "test", tmp_path / "out"),
                             *(o.format(**fill) for o in overrides)))
    assert str(e.value) == message.format(**fill)
    assert not (tmp_path / "out").exists()


def test_cli_exit_status_2_with_one_line(reference, tmp_path):
    data, _, model, _ = reference
    proc = stage("predict", *options(data, *predicting(model, "test", tmp_path / "out"), "predict.top_k=-1"),
                 check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["predict.py: error: predict.top_k=-1: expected an integer >= 1"]


def test_a_model_of_another_datasets_classes_is_refused(reference, tmp_path):
    """As many classes under other names: its outputs would be labeled with the wrong names."""
    data, _, model, _ = reference
    other = other_dataset(data, tmp_path / "other", read_classes(data)[::-1])
    proc = stage("predict", *options(other, *predicting(model, "test", tmp_path / "out", TWO_SCALES)), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"predict.py: error: {model}: a model of other classes than {other}/classes.txt names: class 0 is "
        "'T-shirt/top' in the model, 'Ankle boot' in classes.txt; label a dataset with a model trained on its classes"]
    assert not (tmp_path / "out").exists()


def test_a_model_saved_without_class_names_still_labels(reference, tmp_path, caplog):
    data, _, model, out = reference
    old = without_class_names(model, tmp_path / "old.pt")
    with caplog.at_level(logging.WARNING):
        predict.main(options(data, *predicting(old, "test", tmp_path / "out", TWO_SCALES)))
    assert f"{old} records no class names (saved by an older semiscale)" in caplog.text
    assert_same_predictions(rows(str(tmp_path / "out")), rows(out))
