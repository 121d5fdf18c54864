"""launch/prepare.py own: a user's own unlabeled folders, labeled ImageFolder or CSV, and val/test splits
given as they are or drawn from the labeled images; its errors; and the stages reading the result."""
import csv
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.datasets import check_dataset, read_split
from launch import prepare
from test_prepare import expect_error
from tiny import ROOT, TINY_FINETUNE, stage

PROJECT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fish")


def save(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_csv(path, rows, header=("path", "label")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_pile(base):
    """Two unlabeled trees (nested folders, both named 'photos', a corrupt file, non-images), a labeled
    ImageFolder of 5 images per class (and one image outside its class folders), and val images listed by lists/val.csv (class names; its paths
    climb out of its folder with '..', one is absolute)."""
    seed = iter(range(10_000))
    for rel in ("a/1.png", "a/2.jpg", "a/b/c/3.png", "a/b/4.png", "5.png"):
        save(base / "photos" / rel, next(seed))
    for rel in ("x/1.png", "2.png"):
        save(base / "more" / "photos" / rel, next(seed))
    (base / "photos" / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (base / "photos" / "a" / "notes.txt").write_text("not an image")
    (base / "photos" / ".cache").mkdir()
    save(base / "photos" / ".cache" / "hidden.png", next(seed))
    for name in CLASSES:
        for i in range(4):
            save(base / "labeled" / name / f"{i}.png", next(seed))
        save(base / "labeled" / name / "deeper" / "4.jpg", next(seed))
    save(base / "labeled" / "loose.png", next(seed))   # in no class folder: left out, said once
    rows = []
    for name in CLASSES:
        for i in range(2):
            rows.append((f"../valimgs/{name}_{i}.png", name))
            save(base / "valimgs" / f"{name}_{i}.png", next(seed))
    rows[-1] = (str(base / "valimgs" / "fish_1.png"), "fish")   # an absolute path
    write_csv(base / "lists" / "val.csv", rows)
    return base


def own(base, out, *extra, val=("--val", "lists/val.csv"), test=("--test-per-class", "1"), labeled="labeled",
        unlabeled=("photos", "more/photos")):
    def given(path):
        return path if os.path.isabs(path) else str(base / path)

    def split(option, value):   # (--val, a path) or (--val-per-class, N)
        return [option, given(value) if option in ("--val", "--test") else value]
    return prepare.main(["own", "--out", str(out), "--unlabeled", *map(given, unlabeled),
                         "--labeled", given(labeled), *split(*val), *split(*test), *extra])


def rows(root, name):
    with open(Path(root) / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


def source_of(root, rel, link):
    """What stands for the user's file behind ROOT/rel: the file its links resolve to, or (a copy) its bytes."""
    path = Path(root) / rel
    return os.path.realpath(path) if link else path.read_bytes()


@pytest.fixture(scope="module", params=["copy", "link"])
def prepared(request, tmp_path_factory):
    base = make_pile(tmp_path_factory.mktemp(f"pile-{request.param}"))
    out = base.parent / f"{base.name}-out"
    extra = ["--link"] if request.param == "link" else []
    assert own(base, out, *extra) == 0
    return base, out, request.param == "link"


def test_splits_hold_the_given_images_and_a_seeded_test_draw(prepared, capsys):
    base, out, link = prepared
    assert (out / "classes.txt").read_text() == "cat\ndog\nfish\n"
    labeled, val, test, unlabeled = (rows(out, name) for name in ("labeled", "val", "test", "unlabeled"))
    assert (len(labeled), len(val), len(test), len(unlabeled)) == (12, 6, 3, 7)

    # labeled + test: the ImageFolder's 15 images, test one per class, labels from the folders
    for r in labeled + test:
        assert r["path"].startswith("images/labeled/") and r["path"].split("/")[2] == CLASSES[int(r["label"])]
    assert sorted(int(r["label"]) for r in test) == [0, 1, 2]
    every_labeled = {f"images/labeled/{name}/{f}" for name in CLASSES for f in ("0.png", "1.png", "2.png", "3.png",
                                                                                 "deeper/4.jpg")}
    assert {r["path"] for r in labeled + test} == every_labeled

    # val: exactly the CSV's images, labels by class name; '..' and absolute rows land inside ROOT
    expected = {str(base / "valimgs" / f"{name}_{i}.png"): c for c, name in enumerate(CLASSES) for i in range(2)}
    assert all(r["path"].startswith("images/val/_abs/") for r in val)
    got = {}
    for r in val:
        source = source_of(out, r["path"], link)
        matches = [p for p in expected if (source == os.path.realpath(p) if link else source == Path(p).read_bytes())]
        assert len(matches) == 1, r
        got[matches[0]] = int(r["label"])
    assert got == expected

    # unlabeled: both trees (the second 'photos' gets its own folder), no label column, bad file left out
    with open(out / "unlabeled.csv", newline="") as f:
        assert next(csv.reader(f)) == ["path"]
    assert sorted(r["path"] for r in unlabeled) == sorted(
        [f"images/unlabeled/photos/{p}" for p in ("a/1.png", "a/2.jpg", "a/b/c/3.png", "a/b/4.png", "5.png")]
        + [f"images/unlabeled/photos-2/{p}" for p in ("x/1.png", "2.png")])
    bad = dict(line.split("\t") for line in (out / "bad_images.txt").read_text().splitlines())
    assert sorted(bad) == [str(base / "labeled" / "loose.png"), str(base / "photos" / ".cache") + "/",
                           str(base / "photos" / "a" / "corrupt.png")]
    assert "cannot decode" in bad[str(base / "photos" / "a" / "corrupt.png")]
    assert "no class folder" in bad[str(base / "labeled" / "loose.png")]
    assert "hidden folder" in bad[str(base / "photos" / ".cache") + "/"]

    # no image in two splits, by ROOT path and by the user's file
    paths = [r["path"] for split in (labeled, val, test, unlabeled) for r in split]
    assert len(paths) == len(set(paths))
    if link:   # a link per source folder, and per image of a CSV
        assert os.readlink(out / "images" / "labeled") == str(base / "labeled")
        assert os.readlink(out / "images" / "unlabeled" / "photos") == str(base / "photos")
        assert os.readlink(out / "images" / "unlabeled" / "photos-2") == str(base / "more" / "photos")
        assert all(os.readlink(out / r["path"]) == str(base / "valimgs" / Path(r["path"]).name) for r in val)
        targets = [os.path.realpath(out / p) for p in paths]
        assert len(set(targets)) == len(targets) and all(t.startswith(str(base) + "/") for t in targets)
    else:
        assert not any(parent.is_symlink() for p in paths for parent in [out / p, *(out / p).parents])


def test_the_prepared_root_passes_the_dataset_checks(prepared):
    _, out, _ = prepared
    assert check_dataset(out) == []
    unlabeled = read_split(out, "unlabeled")
    assert unlabeled.labels is None and unlabeled.hidden_labels is None and len(unlabeled) == 7
    assert all(os.path.isfile(p) for p in unlabeled.paths)


def test_rerun_is_a_no_op_and_the_draw_is_seeded(prepared, capsys, tmp_path):
    base, out, link = prepared
    extra = ["--link"] if link else []
    before = (out / "prepare.json").stat().st_mtime_ns
    assert own(base, out, *extra) == 0
    said = capsys.readouterr().out
    assert "already holds this dataset" in said
    assert f"--labeled {base / 'labeled'}: left out 1 images that lie in no class folder" in said
    assert (out / "prepare.json").stat().st_mtime_ns == before
    again = tmp_path / "again"
    assert own(base, again, *extra) == 0
    assert rows(again, "test") == rows(out, "test")
    draws = []
    for seed in ("1", "2", "3"):
        assert own(base, again, *extra, "--seed", seed, "--force") == 0
        draws.append(rows(again, "test"))
        assert rows(again, "val") == rows(out, "val")   # a given split is never redrawn
    assert any(d != rows(out, "test") for d in draws)
    assert sorted(p.name for p in (base / "labeled" / "cat").rglob("*")) == ["0.png", "1.png", "2.png", "3.png",
                                                                         "4.jpg", "deeper"]   # rebuilds keep sources
    assert sum(p.is_file() for p in (base / "photos").rglob("*")) == 8


def test_labeled_csv_with_class_ids_val_drawn_and_test_folder(tmp_path):
    base = make_pile(tmp_path / "pile")
    (base / "classes.txt").write_text("cat\ndog\nfish\n")
    labeled = [(f"labeled/{name}/{i}.png", str(c)) for c, name in enumerate(CLASSES) for i in range(4)]
    write_csv(base / "labels.csv", labeled)
    for c, name in enumerate(CLASSES):   # a test ImageFolder
        save(base / "testimgs" / name / "t.png", 5000 + c)
    out = tmp_path / "out"
    assert own(base, out, "--classes", str(base / "classes.txt"), labeled="labels.csv",
               val=("--val-per-class", "1"), test=("--test", "testimgs")) == 0
    assert len(rows(out, "labeled")) == 9 and len(rows(out, "val")) == 3
    assert sorted((r["path"], r["label"]) for r in rows(out, "test")) == \
        [(f"images/test/{name}/t.png", str(c)) for c, name in enumerate(CLASSES)]
    for r in rows(out, "labeled") + rows(out, "val"):
        assert r["path"].startswith("images/labeled/labeled/") and r["path"].split("/")[3] == CLASSES[int(r["label"])]
    assert check_dataset(out) == []


def test_bad_input_is_one_line_naming_the_file_or_class(tmp_path, capsys):
    base = make_pile(tmp_path / "pile")
    out = tmp_path / "out"
    val_csv = base / "lists" / "val.csv"
    val_rows = list(csv.reader(open(val_csv)))[1:]

    # a class the labeled set does not have
    write_csv(val_csv, val_rows[:1] + [("../valimgs/cat_1.png", "zebra")])
    expect_error(capsys, own(base, out), f"{val_csv}:3", "label 'zebra' is neither a class name of the labeled set")
    # a class id out of range; an id in range names that class
    write_csv(val_csv, val_rows[:1] + [("../valimgs/cat_1.png", "7")])
    expect_error(capsys, own(base, out), f"{val_csv}:3", "label '7' is neither a class name of the labeled set",
                 "nor a class id in [0, 3)")
    # one image listed twice (another spelling of the same file)
    write_csv(val_csv, val_rows[:2] + [("../lists/../valimgs/cat_0.png", "cat")])
    expect_error(capsys, own(base, out), str(base / "valimgs" / "cat_0.png"), "listed twice",
                 f"--val {base / 'lists/val.csv'}:2", f"--val {base / 'lists/val.csv'}:4")
    # one image in two splits: val lists a labeled image (through a symlink)
    os.symlink(base / "labeled" / "dog" / "0.png", base / "valimgs" / "alias.png")
    write_csv(val_csv, val_rows + [("../valimgs/alias.png", "dog")])
    expect_error(capsys, own(base, out), str(base / "valimgs" / "alias.png"),
                 f"the same file as {base / 'labeled' / 'dog' / '0.png'}", "in two splits", "--labeled", "--val")
    # an unlabeled tree that holds the labeled one
    write_csv(val_csv, val_rows)
    expect_error(capsys, own(base, out, unlabeled=(str(base / "photos"), str(base / "labeled"))),
                 str(base / "labeled" / "cat" / "0.png"), "in two splits")
    # a class folder of val/test that the labeled set does not have
    save(base / "testimgs" / "zebra" / "z.png", 1)
    expect_error(capsys, own(base, out, test=("--test", "testimgs")), "class folder 'zebra'", "--test")
    # an empty labeled set: class folders without images, or a CSV without rows
    for name in CLASSES:
        (base / "empty" / name).mkdir(parents=True)
    expect_error(capsys, own(base, out, labeled="empty"), f"--labeled {base / 'empty'}", "labeled set is empty")
    write_csv(base / "none.csv", [])
    expect_error(capsys, own(base, out, labeled="none.csv"), "labeled set is empty")
    # a class too small for the draw; a CSV without its header
    expect_error(capsys, own(base, out, test=("--test-per-class", "5")), "class 'cat' has 5 readable labeled images",
                 "expected at least 6")
    write_csv(val_csv, val_rows, header=("file", "class"))
    expect_error(capsys, own(base, out), f"{val_csv}:1", "'path' and 'label'")
    write_csv(val_csv, val_rows)
    # --on-bad-image error stops at the corrupt file
    expect_error(capsys, own(base, out, "--on-bad-image", "error"), str(base / "photos" / "a" / "corrupt.png"),
                 "--on-bad-image skip")
    # a source inside --out, or --out inside a source
    expect_error(capsys, own(base, base / "photos" / "out"), "lies inside the source")
    assert not out.exists() and not (base / "photos" / "out").exists()   # nothing written for bad input
    assert own(base, out) == 0


def test_a_tiny_finetune_trains_on_the_prepared_root(tmp_path):
    base = make_pile(tmp_path / "pile")
    assert own(base, tmp_path / "out", "--link") == 0
    start = time.perf_counter()
    proc = stage("finetune", "--config", os.path.join(ROOT, "configs", "demo", "finetune.yaml"),
                 f"data.root={tmp_path / 'out'}", f"run.dir={tmp_path / 'run'}", "finetune.backbone=random",
                 *TINY_FINETUNE, "train.epochs=1")
    assert proc.returncode == 0 and (tmp_path / "run" / "model.pt").exists()
    assert time.perf_counter() - start < 60
