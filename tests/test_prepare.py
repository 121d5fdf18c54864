"""launch/prepare.py: Fashion-MNIST from the Debian package and an ImageFolder tree with bad files."""
import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.datasets import load_image, read_split
from data.prepare.dataset_folder import INCOMPLETE
from launch import prepare

PROJECT = Path(__file__).resolve().parents[1]
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def rows(root, name):
    with open(Path(root) / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


def idx_array(name, header_bytes):
    with gzip.open(os.path.join(FASHION_MNIST, name)) as f:
        return np.frombuffer(f.read(), np.uint8, offset=header_bytes)


# ---- Fashion-MNIST: the first 1500 train and test images (the hidden --limit; all 70k take 12-40 s) ----

LIMIT = 1500
FASHION_ARGS = ["--labels-per-class", "3", "--val-size", "50", "--limit", str(LIMIT)]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    if not os.path.isdir(FASHION_MNIST):
        pytest.skip(f"{FASHION_MNIST} missing (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("fashion")
    assert prepare.main(["fashion-mnist", "--out", str(root), *FASHION_ARGS]) == 0
    return root


def test_fashion_mnist_splits_are_balanced_disjoint_and_cover_train(fashion):
    train_labels = idx_array("train-labels-idx1-ubyte.gz", 8)[:LIMIT]
    splits = {name: rows(fashion, name) for name in ("labeled", "val", "unlabeled", "test")}
    assert {name: len(r) for name, r in splits.items()} == \
        {"labeled": 30, "val": 50, "unlabeled": LIMIT - 80, "test": LIMIT}
    train_rows = {name: [int(Path(r["path"]).stem) for r in splits[name]] for name in ("labeled", "val", "unlabeled")}
    assert sorted(sum(train_rows.values(), [])) == list(range(LIMIT))       # disjoint and covering
    for name, indices in train_rows.items():
        assert all(r["path"].startswith("images/train/") for r in splits[name])
        assert [int(r["label"]) for r in splits[name]] == train_labels[indices].tolist()   # labels = IDX labels
    assert np.bincount(train_labels[train_rows["labeled"]]).tolist() == [3] * 10
    left = np.bincount(train_labels, minlength=10) - 3                      # val is stratified over what is left
    assert np.abs(np.bincount(train_labels[train_rows["val"]], minlength=10) - 50 * left / left.sum()).max() < 1
    test_labels = idx_array("t10k-labels-idx1-ubyte.gz", 8)[:LIMIT]
    assert [r["path"] for r in splits["test"]] == [f"images/test/{i:05d}.png" for i in range(LIMIT)]
    assert [int(r["label"]) for r in splits["test"]] == test_labels.tolist()
    assert (fashion / "classes.txt").read_text().splitlines()[0] == "T-shirt/top"
    assert json.loads((fashion / "prepare.json").read_text())["counts"]["unlabeled"] == LIMIT - 80


def test_fashion_mnist_pngs_hold_the_idx_pixels(fashion):
    train_images = idx_array("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    test_images = idx_array("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    for part, images in (("train", train_images), ("test", test_images)):
        for i in (0, 1, 1234, LIMIT - 1):
            with Image.open(fashion / "images" / part / f"{i:05d}.png") as png:
                assert png.mode == "L"
                np.testing.assert_array_equal(np.asarray(png), images[i])
    split = read_split(fashion, "unlabeled")
    assert split.labels is None and len(split.hidden_labels) == LIMIT - 80
    assert np.asarray(load_image(split.paths[0])).shape == (28, 28, 3)


def test_fashion_mnist_rerun_is_a_no_op_and_other_parameters_are_refused(fashion, capsys):
    manifest = fashion / "prepare.json"
    before = manifest.stat().st_mtime_ns
    assert prepare.main(["fashion-mnist", "--out", str(fashion), *FASHION_ARGS]) == 0
    assert "already holds this dataset" in capsys.readouterr().out
    assert manifest.stat().st_mtime_ns == before
    assert prepare.main(["fashion-mnist", "--out", str(fashion), *FASHION_ARGS, "--seed", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("prepare: error: ") and "other parameters" in error and error.count("\n") == 1


# ---- an ImageFolder tree with every kind of image and three bad files ----

def save(path, pixels, mode=None, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(path, **options)


def make_tree(src):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fish"):
        rgb = lambda: rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)   # noqa: E731
        save(src / name / "rgb.jpg", rgb())
        save(src / name / "grey.png", rgb()[..., 0])
        save(src / name / "rgba.png", np.dstack([rgb(), rng.integers(0, 256, (20, 24), dtype=np.uint8)]))
        save(src / name / "cmyk.jpg", rgb(), "CMYK")
        save(src / name / "palette.PNG", rgb(), "P")
        save(src / name / "nested" / "grey16.png", rgb()[..., 0].astype(np.uint16) * 257)
        (src / name / "notes.txt").write_text("not an image")
        (src / name / ".hidden.png").write_bytes(b"")
    (src / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (src / "cat" / "empty.png").write_bytes(b"")
    save(src / "dog" / "truncated.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (src / "dog" / "truncated.png").write_bytes((src / "dog" / "truncated.png").read_bytes()[:-500])
    return src


def prepare_folder(src, out, *extra, labels=2, val=1, test=1):
    return prepare.main(["folder", str(src), "--out", str(out), "--labels-per-class", str(labels),
                         "--val-per-class", str(val), "--test-per-class", str(test), *extra])


@pytest.mark.parametrize("placement", [[], ["--link"]])   # copies unless --link
def test_folder_skips_and_lists_bad_images_and_splits_per_class(tmp_path, capsys, placement):
    src, out = make_tree(tmp_path / "src"), tmp_path / "out"
    assert prepare_folder(src, out, *placement) == 0
    assert "skipped 3 unreadable images" in capsys.readouterr().out
    bad = dict(line.split("\t") for line in (out / "bad_images.txt").read_text().splitlines())
    assert sorted(bad) == ["cat/.hidden.png", "cat/corrupt.jpg", "cat/empty.png", "dog/.hidden.png",
                           "dog/truncated.png", "fish/.hidden.png"]
    assert "empty" in bad["cat/empty.png"] and "truncated" in bad["dog/truncated.png"]
    assert bad["fish/.hidden.png"].startswith("hidden")
    assert (out / "classes.txt").read_text() == "cat\ndog\nfish\n"
    good = {f"images/{c}/{f}" for c in ("cat", "dog", "fish")
            for f in ("rgb.jpg", "grey.png", "rgba.png", "cmyk.jpg", "palette.PNG", "nested/grey16.png")}
    seen = []
    for name, per_class in (("labeled", 2), ("val", 1), ("test", 1), ("unlabeled", 2)):
        split = rows(out, name)
        assert sorted(int(r["label"]) for r in split) == sorted([0, 1, 2] * per_class), name
        for r in split:
            assert r["path"].split("/")[1] == ["cat", "dog", "fish"][int(r["label"])]
            image = load_image(out / r["path"])
            assert image.mode == "RGB" and image.size == (24, 20)
            source = src / r["path"].removeprefix("images/")
            if placement:
                assert os.readlink(out / r["path"]) == str(source)
            else:
                assert not (out / r["path"]).is_symlink() and (out / r["path"]).read_bytes() == source.read_bytes()
        seen += [r["path"] for r in split]
    assert len(seen) == len(set(seen)) and set(seen) == good


def test_folder_is_seeded_idempotent_and_rebuilt_with_force(tmp_path, capsys):
    src, out = make_tree(tmp_path / "src"), tmp_path / "out"
    assert prepare_folder(src, out) == 0
    first = rows(out, "labeled")
    assert prepare_folder(src, out) == 0
    assert "already holds" in capsys.readouterr().out and rows(out, "labeled") == first
    assert prepare_folder(src, out, "--seed", "1") == 2
    assert prepare_folder(src, out, "--seed", "1", "--force") == 0
    labeled = [rows(out, "labeled")]
    for seed in (2, 3):
        assert prepare_folder(src, out, "--seed", str(seed), "--force") == 0
        labeled.append(rows(out, "labeled"))
    assert any(split != first for split in labeled)


def test_an_interrupted_run_is_redone_not_trusted(tmp_path):
    src, out = make_tree(tmp_path / "src"), tmp_path / "out"
    (out / "images" / "old").mkdir(parents=True)
    (out / "images" / "old" / "stale.png").write_bytes(b"")
    (out / "labeled.csv").write_text("path,label\nimages/old/stale.png,0\n")
    (out / INCOMPLETE).write_text("")
    assert prepare_folder(src, out) == 0
    assert not (out / "images" / "old").exists() and not (out / INCOMPLETE).exists()
    assert len(rows(out, "labeled")) == 6 and (out / "prepare.json").exists()


def expect_error(capsys, status, *words):
    assert status == 2
    error = capsys.readouterr().err
    assert error.startswith("prepare: error: ") and error.count("\n") == 1, error
    for word in words:
        assert word in error, error


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    src = make_tree(tmp_path / "src")
    expect_error(capsys, prepare_folder(tmp_path / "nowhere", tmp_path / "a"), "nowhere", "no such directory")
    expect_error(capsys, prepare_folder(src / "cat" / "nested", tmp_path / "b"), "one sub-folder per class")
    expect_error(capsys, prepare_folder(src, tmp_path / "c", labels=5), "class 'fish' has 6 images",
                 "fewer than the 7 requested (labeled 5 + val 1 + test 1)")
    (src / "fish" / "more.png").write_bytes((src / "fish" / "grey.png").read_bytes())
    expect_error(capsys, prepare_folder(src, tmp_path / "c", labels=5), "class 'cat' has 6 readable images")
    assert not (tmp_path / "c").exists()                   # nothing written before the input is known good
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("keep me")
    expect_error(capsys, prepare_folder(src, tmp_path / "d"), "not empty and is not a semiscale dataset")
    assert (tmp_path / "d" / "mine.txt").exists()

    partial = tmp_path / "idx"
    partial.mkdir()
    images = b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (3, 2, 2)) + bytes(12)
    labels = b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03"
    for name, content in (("train-images-idx3-ubyte.gz", images), ("train-labels-idx1-ubyte.gz", labels),
                          ("t10k-images-idx3-ubyte.gz", images)):
        with gzip.open(partial / name, "wb") as f:
            f.write(content)
    fashion = ["fashion-mnist", "--out", str(tmp_path / "e"), "--source", str(partial)]
    expect_error(capsys, prepare.main(fashion), "missing t10k-labels-idx1-ubyte.gz")
    with gzip.open(partial / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01")
    expect_error(capsys, prepare.main(fashion), "t10k-labels-idx1-ubyte.gz", "announces shape (5,) but holds 1")


def test_command_line_exit_status(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(PROJECT / "launch" / "prepare.py"), "fashion-mnist",
                             "--out", str(tmp_path / "out"), "--source", str(tmp_path / "none")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"prepare: error: source {tmp_path / 'none'}: no such directory " \
                            "(install the dataset-fashion-mnist package or pass --source)\n"
