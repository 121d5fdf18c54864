"""launch/prepare.py fashion-mnist's variants (data.prepare.pool_variants) on IDX files of our own: a
long-tailed pool, classes outside the class list (open set), a small pool, fewer labels; and what the
pseudo-label and active-learning stages count of the open-set images on a tiny run."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch

from test_prepare import expect_error, rows, write_idx_source
from tiny import ROOT, TINY_FINETUNE, TINY_INFERENCE, save_backbone, stage
from data.datasets import read_classes, read_split
from data.labels import OUTSIDE_CLASSES
from data.prepare.fashion_mnist import FASHION_MNIST_CLASSES
from launch import active, prepare
from trainer.runtime.models import Classifier, build_backbone, save_classifier

PER_CLASS, TEST_PER_CLASS = 60, 5


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """IDX files of 10 classes: PER_CLASS train images each (labels shuffled), TEST_PER_CLASS test images
    each, all distinct (8 x 8 random pixels)."""
    rng = np.random.default_rng(0)
    train_labels = rng.permutation(np.repeat(np.arange(10), PER_CLASS))
    test_labels = np.repeat(np.arange(10), TEST_PER_CLASS)
    images = rng.integers(0, 256, (len(train_labels) + len(test_labels), 8, 8), dtype=np.uint8)
    folder = write_idx_source(tmp_path_factory.mktemp("idx"), images[:len(train_labels)], train_labels,
                              images[len(train_labels):], test_labels)
    return folder, train_labels, test_labels


def make(source, out, *options, labels=2, val=50):
    return prepare.main(["fashion-mnist", "--source", str(source[0]), "--out", str(out), "--labels-per-class",
                         str(labels), "--val-size", str(val), *map(str, options)])


def idx_rows(root, split):
    """The IDX row of each image a split lists (its file is images/<part>/<row>.png)."""
    return np.array([int(Path(r["path"]).stem) for r in rows(root, split)], np.int64)


def pool_counts(root, source):
    """Images per Fashion-MNIST class in ROOT's unlabeled pool, by the IDX labels."""
    return np.bincount(source[1][idx_rows(root, "unlabeled")], minlength=10)


def variant(root):
    return json.loads((Path(root) / "prepare.json").read_text())["params"].get("variant")


def largest_first(root):
    """The classes of ROOT's long-tailed pool, largest first, as its record names them (IDX ids)."""
    return [FASHION_MNIST_CLASSES.index(name) for name in variant(root)["classes_largest_pool_first"]]


def test_long_tail_pool_falls_geometrically_and_the_other_splits_stay_balanced(source, tmp_path):
    plain, tail = tmp_path / "plain", tmp_path / "tail"
    assert make(source, plain) == 0 and make(source, tail, "--long-tail", 5) == 0
    for split in ("labeled", "val", "test"):   # the draws of the same seed without the option
        assert (tail / f"{split}.csv").read_text() == (plain / f"{split}.csv").read_text(), split
    assert sorted(largest_first(tail)) == list(range(10)) and variant(tail)["long_tail"] == 5
    available = pool_counts(plain, source)                                # all that labeled and val left
    assert available.tolist() == [PER_CLASS - 2 - 5] * 10
    expected = np.round(available.min() * 5 ** (-np.arange(10) / 9))     # the largest as large as every class allows
    counts = pool_counts(tail, source)
    assert counts[largest_first(tail)].tolist() == expected.tolist()
    assert abs(counts.max() / counts.min() - 5) <= 5 * (1 / counts.min() + 1 / counts.max())   # R within rounding
    assert set(idx_rows(tail, "unlabeled")) <= set(idx_rows(plain, "unlabeled"))   # dropped, not moved
    listed = {f"{i:05d}.png" for split in ("labeled", "val", "unlabeled") for i in idx_rows(tail, split)}
    assert set(os.listdir(tail / "images" / "train")) == listed           # the dropped images are not written
    assert json.loads((tail / "prepare.json").read_text())["counts"]["unlabeled"] == counts.sum()


def test_unlabeled_size_is_a_balanced_or_long_tailed_pile_of_that_many(source, tmp_path):
    assert make(source, tmp_path / "small", "--unlabeled-size", 95) == 0
    assert pool_counts(tmp_path / "small", source).tolist() == [10] * 5 + [9] * 5   # 95 over 10 classes
    assert variant(tmp_path / "small") == {"unlabeled_size": 95}
    assert make(source, tmp_path / "both", "--unlabeled-size", 200, "--long-tail", 4) == 0
    counts = pool_counts(tmp_path / "both", source)
    weights = 4 ** (-np.arange(10) / 9)
    assert counts.sum() == 200
    assert np.abs(counts[largest_first(tmp_path / "both")] - 200 * weights / weights.sum()).max() < 1
    assert len(rows(tmp_path / "both", "labeled")) == 20 and len(rows(tmp_path / "both", "val")) == 50


def test_fewer_labels_per_class_keep_val_balanced_and_labels_nested(source, tmp_path):
    assert make(source, tmp_path / "ten", labels=10) == 0 and make(source, tmp_path / "two", labels=2) == 0
    for root, n in ((tmp_path / "ten", 10), (tmp_path / "two", 2)):
        assert np.bincount(source[1][idx_rows(root, "labeled")]).tolist() == [n] * 10
        assert np.bincount(source[1][idx_rows(root, "val")]).tolist() == [5] * 10
    # each class's shuffle is the seed's: two labels are the first two of the ten
    assert set(idx_rows(tmp_path / "two", "labeled")) < set(idx_rows(tmp_path / "ten", "labeled"))


@pytest.fixture(scope="module")
def open_set(source, tmp_path_factory):
    """A pool of 40 images, 8 of them (20%) of the 2 classes outside the class list."""
    root = tmp_path_factory.mktemp("open") / "data"
    assert make(source, root, "--open-set-classes", 2, "--open-set-fraction", 0.2, "--unlabeled-size", 40,
                labels=2, val=16) == 0
    return root


def test_open_set_classes_are_in_the_pool_only_with_their_names_as_hidden_labels(source, tmp_path):
    open_set = tmp_path / "open"
    assert make(source, open_set, "--open-set-classes", 2, "--open-set-fraction", 0.2, labels=2, val=16) == 0
    names = variant(open_set)["open_set_classes"]
    assert len(names) == 2 and variant(open_set)["open_set_fraction"] == 0.2
    outside = [FASHION_MNIST_CLASSES.index(name) for name in names]
    classes = read_classes(open_set)
    assert classes == [name for name in FASHION_MNIST_CLASSES if name not in names]
    for split, labels in (("labeled", source[1]), ("val", source[1]), ("test", source[2])):
        listed = rows(open_set, split)
        truth = labels[idx_rows(open_set, split)]
        assert not np.isin(truth, outside).any(), split
        assert [classes[int(r["label"])] for r in listed] == [FASHION_MNIST_CLASSES[c] for c in truth], split
    assert len(rows(open_set, "test")) == 8 * TEST_PER_CLASS
    pool = rows(open_set, "unlabeled")
    truth = source[1][idx_rows(open_set, "unlabeled")]
    assert [r["label"] for r in pool] == [FASHION_MNIST_CLASSES[c] if c in outside else str(classes.index(
        FASHION_MNIST_CLASSES[c])) for c in truth]
    opened = np.isin(truth, outside)
    assert len(pool) == 8 * (PER_CLASS - 2) - 16 + opened.sum()         # every listed class's images left
    assert abs(opened.sum() - 0.2 * len(pool)) <= 1                      # F of the pool, within rounding
    assert abs(np.diff(np.bincount(truth[opened])[outside])).max() <= 1   # the open-set classes evenly
    assert json.loads((open_set / "prepare.json").read_text())["counts"]["open_set"] == opened.sum()
    hidden = read_split(open_set, "unlabeled").hidden_labels   # readers: no class the model can predict
    assert (hidden[opened] == OUTSIDE_CLASSES).all() and (hidden[~opened] >= 0).all()


def test_a_small_open_set_pool_holds_its_share(source, open_set):
    truth = source[1][idx_rows(open_set, "unlabeled")]
    outside = [FASHION_MNIST_CLASSES.index(name) for name in variant(open_set)["open_set_classes"]]
    counts = np.bincount(truth, minlength=10)
    assert counts[outside].tolist() == [4, 4]                            # 0.2 x 40, evenly
    assert np.delete(counts, outside).tolist() == [4] * 8                # the other 32, balanced


def test_hidden_labels_outside_the_list_are_names_and_nothing_else(tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "unlabeled.csv").write_text("path,label\na.png,1\nb.png, wolf \nc.png,0\n")
    assert read_split(tmp_path, "unlabeled").hidden_labels.tolist() == [1, OUTSIDE_CLASSES, 0]
    for bad, said in (("2", "'2'"), ("-1", "'-1'"), ("", "''"), ("dog", "'dog' (a class of the list: its id")):
        (tmp_path / "unlabeled.csv").write_text(f"path,label\na.png,1\nb.png,{bad}\n")
        with pytest.raises(ValueError) as caught:
            read_split(tmp_path, "unlabeled")
        assert str(caught.value).startswith(f"{tmp_path / 'unlabeled.csv'}:3: hidden label {said}"), caught.value


def test_bad_variant_options_are_one_line_naming_the_option(source, tmp_path, capsys):
    out = tmp_path / "out"
    expect_error(capsys, make(source, out, "--long-tail", 1), "--long-tail 1: expected a ratio above 1")
    expect_error(capsys, make(source, out, "--open-set-classes", 9, "--open-set-fraction", 0.2),
                 "--open-set-classes 9: expected 1 to 8")
    expect_error(capsys, make(source, out, "--open-set-classes", 2), "--open-set-classes: expected --open-set-fraction")
    expect_error(capsys, make(source, out, "--open-set-fraction", 0.2),
                 "--open-set-fraction: expected --open-set-classes")
    expect_error(capsys, make(source, out, "--open-set-classes", 2, "--open-set-fraction", 1), "--open-set-fraction 1:")
    expect_error(capsys, make(source, out, "--unlabeled-size", 0), "--unlabeled-size 0: expected at least 1")
    expect_error(capsys, make(source, out, "--unlabeled-size", 1000), "--unlabeled-size 1000: class ", "has 53 left")
    expect_error(capsys, make(source, out, "--unlabeled-size", 5), "--unlabeled-size 5: class ", "no image")
    expect_error(capsys, make(source, out, "--open-set-classes", 2, "--open-set-fraction", 0.9),
                 "--open-set-classes 2 --open-set-fraction 0.9: class ", "would give")
    assert not out.exists()
    assert make(source, out, "--long-tail", 3) == 0 and make(source, out, "--long-tail", 3) == 0
    assert "already holds this dataset" in capsys.readouterr().out
    expect_error(capsys, make(source, out, "--long-tail", 4), "other parameters")


# ---- what the stages count of the open-set images: every image picked, so the answer is the pool's ----

def random_classifier(data, path):
    torch.manual_seed(0)
    classes = read_classes(data)
    save_classifier(Classifier(build_backbone("small", width=8), len(classes)).eval(),
                    {"backbone": "small", "small_stem": False, "width": 8, "num_classes": len(classes)}, classes,
                    str(path))
    return str(path)


def hidden_of(data):
    """{path: unlabeled.csv's hidden label as written}."""
    return {r["path"]: r["label"] for r in rows(data, "unlabeled")}


def test_pseudo_labels_on_open_set_images_are_counted_and_wrong(open_set, tmp_path):
    run, pool = tmp_path / "pl", rows(open_set, "unlabeled")
    opened = sum(not r["label"].isdigit() for r in pool)
    proc = stage("pseudolabel", "--config", os.path.join(ROOT, "configs/demo/pseudolabel.yaml"),
                 f"data.root={open_set}", f"run.dir={run}", "data.backend=torch", "data.workers=0",
                 f"pseudo.model={random_classifier(open_set, tmp_path / 'model.pt')}",   # the demo's top_k 10
                 "pseudo.schedule=[1000]", "pseudo.scorer=classifier", "pseudo.class_adaptive=false",
                 "pseudo.fixmatch_p=1000",
                 "pseudo.pseudo_epochs=1", "pseudo.labeled_epochs=1", "inference.batch_size=64",
                 f"pseudo.finetune_config={os.path.join(ROOT, 'configs/demo/finetune.yaml')}",
                 f"pseudo.finetune_overrides=[{','.join(TINY_FINETUNE)}]")
    hidden = hidden_of(open_set)
    for folder, name in ((run / "iter1", "selection.json"), (run, "fixmatch_selection.json")):
        summary = json.loads((folder / name).read_text())
        with open(folder / "pseudo_labels.csv") as f:
            chosen = list(csv.DictReader(f))
        assert len(chosen) == len(pool) == summary["selected"]           # P above the pool: every image
        assert summary["outside_classes"] == opened == sum(not hidden[r["path"]].isdigit() for r in chosen)
        assert summary["precision"] == pytest.approx(np.mean([hidden[r["path"]] == r["label"] for r in chosen]))
    said = proc.stdout + proc.stderr
    landed = f"{opened} of {len(pool)} pseudo-labels landed on images of classes outside the class list"
    assert said.count(landed) == 2, said   # the iteration's line and the FixMatch selection's
    iterations = json.loads((run / "selection.json").read_text())["iterations"]
    assert iterations[1]["outside_classes"] == opened
    # the demo's 10 classes per image on a pile of 8 classes: every class a candidate, said once
    assert said.count("pseudo.top_k=10 of 8 classes: every class is a candidate") == 1, said
    assert yaml.safe_load((run / "config.yaml").read_text())["pseudo"]["top_k"] == 10   # as given: reruns compare it


def test_oracle_answers_none_of_the_classes_on_open_set_images(open_set, tmp_path, capsys):
    torch.manual_seed(1)
    save_backbone(build_backbone("small", width=8).eval(), str(tmp_path / "backbone.pt"))
    pool, labeled = rows(open_set, "unlabeled"), rows(open_set, "labeled")
    active.main(["--config", os.path.join(ROOT, "configs/demo/active.yaml"), f"data.root={open_set}",
                 f"active.model={random_classifier(open_set, tmp_path / 'model.pt')}",
                 f"active.backbone={tmp_path / 'backbone.pt'}", f"active.budget={len(pool)}", "active.clusters=2",
                 "active.max_points_per_centroid=0", *TINY_INFERENCE, f"run.dir={tmp_path / 'run'}",
                 "active.oracle=true"])
    hidden = hidden_of(open_set)
    queries = rows(tmp_path / "run", "queries")
    assert len(queries) == len(pool)                                     # the budget buys every image
    inside = [q["path"] for q in queries if hidden[q["path"]].isdigit()]
    summary = json.loads((tmp_path / "run" / "answers_summary.json").read_text())
    assert summary["outside_classes"] == len(pool) - len(inside) > 0
    assert summary["answered"] == len(inside) and summary["answer_accuracy"] == 1.0
    merged = rows(tmp_path / "run", "labeled")                           # the open-set images stay out
    assert merged == labeled + [{"path": p, "label": hidden[p]} for p in inside]
    said = capsys.readouterr().out
    assert (f"{len(inside)} of {len(pool)} queries answered (oracle); {len(pool) - len(inside)} of {len(pool)} "
            "queries landed on images of classes outside the class list (the oracle answers them none of the "
            "classes: they stay out of labeled.csv)") in said, said


def test_report_says_how_the_pile_was_shaped_and_what_landed_outside_the_classes(open_set, tmp_path):
    from trainer.operations import report
    run = tmp_path / "pipeline"
    (run / "pseudolabel").mkdir(parents=True)
    (run / "active").mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"root": str(open_set)}}))
    iterations = [{"iteration": 0, "val_top1": 0.5},
                  {"iteration": 1, "selected": 30, "outside_classes": 7, "val_top1": 0.6}]
    (run / "pseudolabel" / "selection.json").write_text(json.dumps(
        {"iterations": iterations, "fixmatch_selection": {"selected": 12, "outside_classes": 2}}))
    (run / "active" / "answers_summary.json").write_text(json.dumps({"queries": 9, "answered": 8,
                                                                     "outside_classes": 1}))
    coat, bag = variant(open_set)["open_set_classes"]
    assert report.data_line(str(run)) == (f"Data: `{open_set}`; pile shaped by prepare: unlabeled size 40; "
                                          f"open set classes {coat}, {bag}; open set fraction 0.2.")
    assert report.open_set_lines(str(run), iterations) == [
        "", "Landed on images of classes outside the class list: iteration 1: 7 of 30 pseudo-labels; "
            "FixMatch's selection: 2 of 12; active learning: 1 of 9 queries."]
    # a pile without such images: nothing said
    assert report.open_set_lines(str(run), iterations[:1] + [{"iteration": 1, "selected": 30}]) == [
        "", "Landed on images of classes outside the class list: FixMatch's selection: 2 of 12; active learning: "
            "1 of 9 queries."]
