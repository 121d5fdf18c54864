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

from data import same_content
from data.datasets import check_dataset, load_image, read_split
from data.prepare.dataset_folder import INCOMPLETE, SCORED_COPIES
from launch import prepare

PROJECT = Path(__file__).resolve().parents[1]
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def rows(root, name):
    with open(Path(root) / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


def listed(root, name):
    """ROOT/<name> (duplicates.txt) as {first column: the other columns}."""
    return {line.split("\t")[0]: line.split("\t")[1:] for line in (Path(root) / name).read_text().splitlines()}


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


def test_fashion_mnist_records_its_copy_check_so_stages_read_no_image(fashion, monkeypatch):
    manifest = json.loads((fashion / "prepare.json").read_text())
    assert manifest["counts"]["duplicates"] == 0 and (fashion / "duplicates.txt").read_text() == ""
    assert manifest[same_content.CHECKED].keys() == set(same_content.CSVS)
    read = []
    digest = same_content.file_digest
    monkeypatch.setattr(same_content, "file_digest", lambda path: read.append(os.path.basename(path)) or digest(path))
    monkeypatch.setattr(same_content, "byte_copies", lambda splits: pytest.fail("compared the images again"))
    assert check_dataset(fashion) == [] and sorted(read) == sorted(same_content.CSVS)   # the CSVs only


# ---- Fashion-MNIST IDX files of our own: copies across the splits ----

def write_idx_source(folder, train_images, train_labels, test_images, test_labels):
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("train-images-idx3-ubyte.gz", train_images), ("train-labels-idx1-ubyte.gz", train_labels),
                        ("t10k-images-idx3-ubyte.gz", test_images), ("t10k-labels-idx1-ubyte.gz", test_labels)):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
        with gzip.open(folder / name, "wb") as f:
            f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())
    return folder


def small_idx(folder):
    """10 classes: 4 train images each, 10 test images, all distinct (8 x 8 random pixels)."""
    rng = np.random.default_rng(0)
    train_labels, test_labels = np.repeat(np.arange(10), 4), np.arange(10)
    images = rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)
    return images[:40], train_labels, images[40:], test_labels


def prepare_small(source, out):
    return prepare.main(["fashion-mnist", "--source", str(source), "--out", str(out), "--labels-per-class", "1",
                         "--val-size", "10"])


def train_split(root):
    """{train row: its split} from ROOT's CSVs."""
    return {int(Path(r["path"]).stem): name for name in ("labeled", "val", "unlabeled") for r in rows(root, name)}


def test_fashion_mnist_lists_copies_across_splits_and_keeps_them(tmp_path, capsys):
    train, train_labels, test, test_labels = small_idx(tmp_path)
    assert prepare_small(write_idx_source(tmp_path / "clean", train, train_labels, test, test_labels),
                         tmp_path / "clean-out") == 0
    where = train_split(tmp_path / "clean-out")   # the draw depends on the labels alone: the same below
    first = {name: min(row for row, split in where.items() if split == name) for name in ("labeled", "val")}
    unlabeled = sorted(row for row, split in where.items() if split == "unlabeled")
    test[0] = train[first["labeled"]]                      # a test copy of a labeled picture
    test[1] = train[unlabeled[0]]                          # ... of an unlabeled one: listed in unlabeled
    test[3] = test[2]                                      # twice in test
    test[4], test_labels[4] = train[first["val"]], (train_labels[first["val"]] + 1) % 10   # another label
    train[unlabeled[2]] = train[unlabeled[1]]              # twice in the unlabeled pool: not listed
    out = tmp_path / "out"
    capsys.readouterr()
    assert prepare_small(write_idx_source(tmp_path / "copies", train, train_labels, test, test_labels), out) == 0
    said = capsys.readouterr().out
    stay = "(Fashion-MNIST's splits stay as published): the same picture is"
    png = "images/{}/{:05d}.png".format
    assert listed(out, "duplicates.txt") == {
        png("test", 0): [png("train", first["labeled"]), f"kept in test {stay} in labeled"],
        png("train", unlabeled[0]): [png("test", 1), f"kept in unlabeled {stay} in test"],
        png("test", 3): [png("test", 2), f"kept in test {stay} listed before it"],
        png("test", 4): [png("train", first["val"]), f"kept in test {stay} in val"]}
    assert "kept 4 copies of a picture in another split or listed before" in said
    assert "3 of them are val or test pictures with a copy in another split" in said and "duplicates 4 /" in said
    for name in ("labeled", "val", "unlabeled"):                              # nothing left out: the same splits
        assert rows(out, name) == rows(tmp_path / "clean-out", name), name
    assert [r["path"] for r in rows(out, "test")] == [png("test", i) for i in range(10)]
    manifest = json.loads((out / "prepare.json").read_text())
    assert manifest["counts"]["duplicates"] == 4 and manifest["counts"][SCORED_COPIES] == 3
    assert same_content.CHECKED not in manifest   # so every stage goes on warning of them, by their bytes
    warnings = check_dataset(out)
    assert any("test.csv have a copy with the same bytes" in w and "labeled.csv" in w for w in warnings), warnings


def test_a_fashion_mnist_dataset_prepared_before_the_check_gets_it_on_a_rerun(tmp_path, capsys):
    source, out = write_idx_source(tmp_path / "idx", *small_idx(tmp_path)), tmp_path / "out"
    assert prepare_small(source, out) == 0
    recorded = json.loads((out / "prepare.json").read_text())

    def as_before():   # the manifest an earlier prepare wrote: no duplicates count, no record
        counts = {k: v for k, v in recorded["counts"].items() if k != "duplicates"}
        (out / "prepare.json").write_text(json.dumps({"params": recorded["params"], "counts": counts}))
        (out / "duplicates.txt").unlink()
    as_before()
    capsys.readouterr()
    assert prepare_small(source, out) == 0
    assert "recorded it in prepare.json" in capsys.readouterr().out
    assert json.loads((out / "prepare.json").read_text()) == recorded and (out / "duplicates.txt").read_text() == ""
    as_before()
    (out / "val.csv").write_text((out / "val.csv").read_text() + "images/train/00000.png,0\n")   # edited since
    assert prepare_small(source, out) == 0
    assert "val.csv is not the CSV prepare wrote" in capsys.readouterr().out
    assert same_content.CHECKED not in json.loads((out / "prepare.json").read_text())


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
