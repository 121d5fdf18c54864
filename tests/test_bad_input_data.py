"""Hostile input to the data side: prepare's source and output folders, file names DALI cannot list,
check_dataset's split checks, and images that go bad while a DALI loader runs.

Every case asserts the outcome (exit status 2 / the error or warning), that the message is one line
naming the file and what was expected, and that every file the user had is intact afterwards."""
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.datasets import BadImageError, check_dataset, labeled_with_pseudo_labels, read_classes, read_split
from data.errors import InputError
from data.loaders import build_loader
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from data.prepare.dataset_folder import MANIFEST, OUTPUTS
from launch import prepare
from trainer.algorithms import label_propagation
from trainer.operations import annotations
from trainer.runtime import batch, config

PROJECT = Path(__file__).resolve().parents[1]


def snapshot(*roots) -> dict:
    """Every entry under `roots`: a file's sha256, a link's target, or 'dir'."""
    found = {}
    for root in map(str, roots):
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    found[path] = "-> " + os.readlink(path)
                elif os.path.isdir(path):
                    found[path] = "dir"
                else:
                    with open(path, "rb") as f:
                        found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


def png(path, value=0, size=(12, 10)):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path, format="PNG")


def make_source(src, classes=("cat", "dog"), per_class=4):
    for c, name in enumerate(classes):
        for i in range(per_class):
            png(src / name / f"{i}.png", 40 * c + i)
    return src


def run_prepare(capsys, *args) -> tuple[int, str, str]:
    status = prepare.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def folder_args(src, out, *extra):
    return ["folder", src, "--out", out, "--labels-per-class", 1, "--val-per-class", 1, "--test-per-class", 1, *extra]


def assert_one_line_error(err, *words):
    assert err.startswith("prepare: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


# ---- prepare: never deletes what it has not made ----

@pytest.fixture
def prepared(tmp_path, capsys):
    """(SRC, ROOT): ROOT prepared from SRC."""
    src, root = make_source(tmp_path / "src"), tmp_path / "root"
    assert run_prepare(capsys, *folder_args(src, root))[0] == 0
    return src, root


@pytest.mark.parametrize("force", [["--force"], []])
def test_resplitting_a_dataset_from_its_own_images_is_refused_and_deletes_nothing(prepared, force):
    """The hostile-input sweep's case, on the real command line: it used to delete ROOT/images, then crash."""
    src, root = prepared
    before = snapshot(src, root)
    result = subprocess.run([sys.executable, str(PROJECT / "launch" / "prepare.py"),
                             *map(str, folder_args(root / "images", root, "--seed", "1", *force))],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert result.returncode == 2
    assert_one_line_error(result.stderr, f"source {root / 'images'} lies inside --out {root}",
                          "expected a source outside --out")
    assert snapshot(src, root) == before


def test_an_output_inside_the_source_is_refused_before_anything_is_written(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    before = snapshot(src)
    status, _, err = run_prepare(capsys, *folder_args(src, src / "dataset"))
    assert status == 2
    assert_one_line_error(err, f"--out {src / 'dataset'} lies inside the source {src}")
    assert snapshot(src) == before


def test_a_source_reached_through_a_symlink_is_still_inside_the_output(prepared, tmp_path, capsys):
    src, root = prepared
    (tmp_path / "alias").symlink_to(root / "images", target_is_directory=True)
    before = snapshot(src, root)
    status, _, err = run_prepare(capsys, *folder_args(tmp_path / "alias", root, "--force"))
    assert status == 2
    assert_one_line_error(err, f"source {tmp_path / 'alias'} lies inside --out {root}")
    assert snapshot(src, root) == before


def test_fashion_mnist_source_inside_the_output_is_refused(prepared, capsys):
    src, root = prepared
    before = snapshot(src, root)
    status, _, err = run_prepare(capsys, "fashion-mnist", "--source", root / "images", "--out", root, "--force")
    assert status == 2
    assert_one_line_error(err, f"source {root / 'images'} lies inside --out {root}")
    assert snapshot(src, root) == before


def test_force_removes_only_prepares_own_outputs(prepared, capsys):
    src, root = prepared
    (root / "notes.txt").write_text("mine")
    (root / "runs" / "pretrain").mkdir(parents=True)
    (root / "runs" / "pretrain" / "checkpoint.pt").write_bytes(b"weeks of training")
    (root / "labeled.csv.bak").write_text("path,label\n")
    before = snapshot(src, root)
    assert run_prepare(capsys, *folder_args(src, root, "--seed", "1", "--force"))[0] == 0
    after = snapshot(src, root)
    outputs = [str(root / name) for name in OUTPUTS]
    mine = {path: digest for path, digest in before.items()
            if not any(path == out or path.startswith(out + os.sep) for out in outputs)}
    assert str(root / "labeled.csv.bak") in mine
    assert {path: after.get(path) for path in mine} == mine     # the source and every non-output file
    assert len(read_split(root, "labeled")) == 2


def test_output_that_is_a_file_and_an_unreadable_manifest_are_one_line_errors(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / MANIFEST).write_text("{ not json")
    before = snapshot(tmp_path)
    status, _, err = run_prepare(capsys, *folder_args(src, tmp_path / "file"))
    assert status == 2
    assert_one_line_error(err, f"--out {tmp_path / 'file'} is a file", "expected a new or empty folder")
    status, _, err = run_prepare(capsys, *folder_args(src, tmp_path / "root"))
    assert status == 2
    assert_one_line_error(err, f"{tmp_path / 'root' / MANIFEST}: cannot read the parameters", "--force")
    assert snapshot(tmp_path) == before


# ---- prepare: source folders it cannot use ----

@pytest.mark.parametrize("layout, words", [
    ({}, ["source {src}: expected one sub-folder per class (at least two), found none"]),
    ({"cat": 4}, ["source {src}: expected one sub-folder per class (at least two), found 'cat'"]),
    ({"cat": 4, "dog": 0}, ["class 'dog' has 0 images, fewer than the 3 requested (labeled 1 + val 1 + test 1)"]),
])
def test_source_without_two_usable_classes_is_refused(tmp_path, capsys, layout, words):
    src = tmp_path / "src"
    src.mkdir()
    for name, count in layout.items():
        (src / name).mkdir()
        for i in range(count):
            png(src / name / f"{i}.png", i)
    before = snapshot(tmp_path)
    status, _, err = run_prepare(capsys, *folder_args(src, tmp_path / "out"))
    assert status == 2
    assert_one_line_error(err, *(word.format(src=src) for word in words))
    assert snapshot(tmp_path) == before


def test_file_names_dali_cannot_list_are_skipped_listed_and_counted(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    png(src / "cat" / "line\nbreak.png", 7)
    png(src / "dog" / "carriage\rreturn.png", 8)
    with open(os.path.join(os.fsencode(src / "dog"), b"caf\xe9.png"), "wb") as f:   # Latin-1 bytes, not UTF-8
        f.write((src / "dog" / "0.png").read_bytes())
    before = snapshot(src)
    status, out, _ = run_prepare(capsys, *folder_args(src, tmp_path / "out"))
    assert status == 0
    assert all(line.startswith("prepare: ") for line in out.splitlines()), out   # each name on its message's line
    assert "skipped 3 images whose names the dataset cannot hold" in out and "cat/line\\nbreak.png" in out
    listed = dict(line.split("\t") for line in (tmp_path / "out" / "bad_images.txt").read_text().splitlines())
    assert sorted(listed) == ["cat/line\\nbreak.png", "dog/caf\\xe9.png", "dog/carriage\\rreturn.png"]
    assert "line break" in listed["cat/line\\nbreak.png"] and "not valid UTF-8" in listed["dog/caf\\xe9.png"]
    assert '"bad_images": 3' in (tmp_path / "out" / "prepare.json").read_text()
    rows = sum((read_split(tmp_path / "out", name).paths for name in ("labeled", "val", "test", "unlabeled")), [])
    assert len(rows) == 8 and all(os.path.isfile(p) and "\n" not in p and "\r" not in p for p in rows)
    assert snapshot(src) == before


def test_a_class_folder_name_classes_txt_cannot_hold_is_refused(tmp_path, capsys):
    src = make_source(tmp_path / "src", classes=("cat", "big\ndog"))
    before = snapshot(tmp_path)
    status, _, err = run_prepare(capsys, *folder_args(src, tmp_path / "out"))
    assert status == 2
    assert_one_line_error(err, "class folder 'big\\ndog'", "line break", "expected it renamed")
    assert snapshot(tmp_path) == before


# ---- check_dataset: the splits against each other ----

CLASSES = ["ant", "bee", "cow", "dog", "eel", "fox", "gnu"]


def write_layout(root, labeled, val, test, unlabeled, classes=CLASSES):
    """A dataset of real PNGs: each split a list of (name, label); unlabeled lists names."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    for value, name in enumerate(sorted({n for n, _ in labeled + val + test} | set(unlabeled))):
        png(root / "images" / name, value)   # a picture of its own: copies are a warning
    for split, rows in (("labeled", labeled), ("val", val), ("test", test)):
        (root / f"{split}.csv").write_text("path,label\n" + "".join(f"images/{n},{c}\n" for n, c in rows))
    (root / "unlabeled.csv").write_text("path\n" + "".join(f"images/{n}\n" for n in unlabeled))
    return root


GOOD = dict(labeled=[(f"l{i}.png", i) for i in range(7)], val=[(f"v{i}.png", i) for i in range(7)],
            test=[(f"t{i}.png", i) for i in range(7)], unlabeled=[f"u{i}.png" for i in range(10)])


def layout(tmp_path, **changes):
    return write_layout(tmp_path / "data", **{**GOOD, **changes})


def checked_error(root, *words, labeled="labeled"):
    before = snapshot(root.parent)
    with pytest.raises(ValueError) as caught:
        check_dataset(root, labeled)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert snapshot(root.parent) == before
    return message


def checked_warnings(root, labeled="labeled"):
    before = snapshot(root.parent)
    warnings = check_dataset(root, labeled)
    assert all("\n" not in w for w in warnings)
    assert snapshot(root.parent) == before
    return warnings


def test_a_sound_dataset_passes_without_warnings(tmp_path):
    assert checked_warnings(layout(tmp_path)) == []


def test_a_path_twice_in_one_split_names_both_lines(tmp_path):
    root = layout(tmp_path, val=GOOD["val"] + [("v2.png", 2)])
    checked_error(root, f"{root / 'val.csv'}:9: images/v2.png is already listed on line 4",
                  "expected each image once per split (1 repeated row(s))")


def test_a_path_twice_in_unlabeled_spelled_two_ways_is_caught(tmp_path):
    root = layout(tmp_path, unlabeled=GOOD["unlabeled"] + ["./u3.png"])
    (root / "unlabeled.csv").write_text((root / "unlabeled.csv").read_text().replace("images/./u3.png",
                                                                                     "./images//u3.png"))
    checked_error(root, f"{root / 'unlabeled.csv'}:12: ./images//u3.png is already listed on line 5")


def test_one_image_with_two_labels_names_both_files_and_labels(tmp_path):
    root = layout(tmp_path, val=GOOD["val"] + [("l1.png", 1), ("l4.png", 5)])
    checked_error(root, "images/l4.png is labeled 4 ('eel') in", f"{root / 'labeled.csv'}:6",
                  f"5 ('fox') in {root / 'val.csv'}:10", "expected one label per image (2 shared)")


def test_labeled_and_test_sharing_an_image_names_both_files(tmp_path):
    root = layout(tmp_path, test=GOOD["test"] + [("l6.png", 6)])
    checked_error(root, f"images/l6.png is in both {root / 'labeled.csv'}:8 and {root / 'test.csv'}:9",
                  "expected labeled, val and test to share no image (1 shared)")


def test_val_identical_to_labeled_is_an_overlap(tmp_path):
    root = layout(tmp_path, val=GOOD["labeled"])
    checked_error(root, f"images/l0.png is in both {root / 'labeled.csv'}:2 and {root / 'val.csv'}:2",
                  "(7 shared)")


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_val_or_test_image_in_unlabeled_is_a_leak(tmp_path, split):
    root = layout(tmp_path, unlabeled=GOOD["unlabeled"] + [f"{split[0]}3.png"])
    checked_error(root, f"images/{split[0]}3.png is in both {root / f'{split}.csv'}:5 and {root / 'unlabeled.csv'}:12",
                  f"expected no {split} image in unlabeled.csv")


def test_labeled_images_also_in_unlabeled_are_a_counted_warning(tmp_path):
    root = layout(tmp_path, unlabeled=GOOD["unlabeled"] + ["l0.png", "l5.png"])
    assert checked_warnings(root) == [
        f"2 of the 7 images of {root / 'labeled.csv'} are also in {root / 'unlabeled.csv'}: FixMatch and active "
        "learning leave them out of the unlabeled pool, pretraining sees them twice"]


def test_classes_without_labeled_images_and_val_images_of_them_are_warnings(tmp_path):
    root = layout(tmp_path, labeled=[("l0.png", 0), ("l1.png", 0)])
    first, second, third = checked_warnings(root)
    assert first == (f"6 of the 7 classes have no labeled image in {root / 'labeled.csv'}: "
                     "'bee', 'cow', 'dog', 'eel', 'fox', ...")
    assert second == (f"{root / 'val.csv'}: 6 image(s) of 6 class(es) that no labeled image has "
                      "('bee', 'cow', 'dog', 'eel', 'fox', ...), which training cannot learn")
    assert third.startswith(f"{root / 'test.csv'}: 6 image(s) of 6 class(es)")


def test_fewer_than_two_classes_is_an_error(tmp_path):
    root = layout(tmp_path, labeled=[("l0.png", 0)], val=[("v0.png", 0)], test=[], unlabeled=[])
    (root / "classes.txt").write_text("ant\n")
    checked_error(root, f"{root / 'classes.txt'}: expected at least two classes, got 1 ('ant')")


def test_missing_val_and_test_files_name_the_first_and_count(tmp_path):
    root = layout(tmp_path)
    for name in ("v5.png", "t0.png", "t1.png"):
        (root / "images" / name).unlink()
    (root / "images" / "u0.png").unlink()        # unlabeled files are on_bad_image's business
    checked_error(root, f"{root / 'val.csv'}:7: images/v5.png: no such file",
                  "(3 of the labeled, val and test files are missing)")


def test_labeled_may_be_an_active_learning_csv(tmp_path):
    root = layout(tmp_path)
    answers = tmp_path / "run" / "labeled.csv"
    answers.parent.mkdir()
    answers.write_text("path,label\n" + "".join(f"images/l{i}.png,{i}\n" for i in range(7)) + "images/u2.png,3\n")
    assert checked_warnings(root, str(answers)) == [
        f"1 of the 8 images of {answers} are also in {root / 'unlabeled.csv'}: FixMatch and active learning "
        "leave them out of the unlabeled pool, pretraining sees them twice"]
    answers.write_text("path,label\nimages/v0.png,0\n")
    checked_error(root, f"images/v0.png is in both {answers}:2 and {root / 'val.csv'}:2", labeled=str(answers))
    picked = tmp_path / "run" / "picked.csv"        # a CSV whose name does not say it must hold labels
    picked.write_text("path\nimages/l0.png\n")
    checked_error(root, f"{picked}:1: expected a 'label' column", labeled=str(picked))


# ---- DALI: paths its file list cannot hold; images that go bad while it runs ----

@pytest.fixture
def dali(tmp_path, monkeypatch):
    module = pytest.importorskip("data.dali", reason="nvidia.dali does not import (install the [dali] extra)")
    monkeypatch.setenv("SEMISCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(module, "_scans", {})
    return module


@pytest.mark.parametrize("name", ["line\nbreak.png", "carriage\rreturn.png", "trailing.png "])
def test_dali_refuses_a_path_its_file_list_cannot_hold_and_torch_reads_it(tmp_path, dali, name):
    root = layout(tmp_path)
    png(root / "images" / name, 9)
    (root / "labeled.csv").write_text(f'path,label\nimages/l0.png,0\n"images/{name}",1\n')
    split = read_split(root, "labeled")
    before = snapshot(root)
    with pytest.raises(ValueError) as caught:
        build_loader(split, "eval", image_size=8, global_batch=2, shuffle=False, drop_last=False, backend="dali")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"split 'labeled': {'images/' + name!r}: DALI's file list")
    assert "expected the file renamed, or data.backend=torch" in message
    torch_loader = build_loader(split, "eval", image_size=8, global_batch=2, shuffle=False, drop_last=False,
                                workers=0)
    assert next(iter(torch_loader.epoch(0)))["index"].tolist() == [0, 1]
    assert snapshot(root) == before


@pytest.fixture
def photos(tmp_path):
    """24 JPEG rows, labels i % 3."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\nc\n")
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "images" / f"{i:02d}.jpg")
    (root / "labeled.csv").write_text("path,label\n" + "".join(f"images/{i:02d}.jpg,{i % 3}\n" for i in range(24)))
    return root


def assert_intact_but(before, photos, spoiled):
    """Every file of `before` but the one the test spoiled is as it was."""
    spoiled = str(photos / "images" / spoiled)
    after = snapshot(photos)
    assert {p: d for p, d in after.items() if p != spoiled} == {p: d for p, d in before.items() if p != spoiled}


def dali_loader(root, on_bad_image, batch=4):
    """Not shuffled: step s reads rows batch*s.., so where a file goes bad is known."""
    return build_loader(read_split(root, "labeled"), "train", image_size=16, global_batch=batch, shuffle=False,
                        workers=1, backend="dali", on_bad_image=on_bad_image)


def spoil(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif how == "deleted":
        path.unlink()
    else:
        path.write_bytes(b"no longer a jpeg" * 10)


@pytest.mark.parametrize("how", ["truncated", "deleted", "garbage"])
def test_dali_skips_an_image_that_goes_bad_after_the_scan(photos, dali, caplog, how):
    loader = dali_loader(photos, "skip")                      # scanned: every file good
    before = snapshot(photos)
    spoil(photos / "images" / "05.jpg", how)                  # before the pipeline reads it
    with caplog.at_level(logging.WARNING, logger="data.dali"):
        batches = list(loader.epoch(0))
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 6, 6, 7]] + \
        [list(range(s, s + 4)) for s in range(8, 24, 4)]     # full batches, row 6 stands in for row 5
    assert all(b["views"][0].shape == (4, 3, 16, 16) for b in batches)
    assert [b["label"].tolist() for b in batches][1] == [1, 0, 0, 1]
    warned = [r.getMessage() for r in caplog.records if r.name == "data.dali"]
    assert len(warned) == 1 and "05.jpg" in warned[0] and "1 undecodable in the split so far" in warned[0]
    assert_intact_but(before, photos, "05.jpg")


def test_dali_stream_goes_on_past_an_image_that_goes_bad_mid_run_and_warns_once(photos, dali, caplog, monkeypatch):
    monkeypatch.setattr(dali, "STREAM_MIN_STEPS", 36)         # one pipeline for three epochs of 12 steps
    loader = dali_loader(photos, "skip", batch=2)
    before = snapshot(photos)
    stream = loader.stream(0)
    seen = [next(stream)["index"].tolist()]                   # the pipeline runs and reads a few steps ahead,
    spoil(photos / "images" / "21.jpg", "garbage")            # not as far as step 10
    with caplog.at_level(logging.WARNING, logger="data.dali"):
        seen += [next(stream)["index"].tolist() for _ in range(3 * 12 - 1)]
    expected = [[s, s + 1] for s in range(0, 24, 2)]
    expected[10] = [20, 22]
    assert seen == expected * 3                               # full batches, row 21 never again
    warned = [r.getMessage() for r in caplog.records if r.name == "data.dali"]
    assert len(warned) == 1 and "21.jpg" in warned[0]
    assert_intact_but(before, photos, "21.jpg")


def test_dali_error_mode_names_the_image_that_went_bad(photos, dali):
    loader = dali_loader(photos, "error")
    before = snapshot(photos)
    spoil(photos / "images" / "13.jpg", "truncated")
    batches = loader.epoch(0)
    assert next(batches)["index"].tolist() == [0, 1, 2, 3]
    with pytest.raises(BadImageError) as caught:
        list(batches)
    message = str(caught.value)
    assert caught.value.path == str(photos / "images" / "13.jpg")
    assert message.startswith(f"{photos / 'images' / '13.jpg'}: cannot decode") and "\n" not in message
    assert_intact_but(before, photos, "13.jpg")


def test_dali_reads_a_file_swapped_mid_run_for_a_format_it_cannot_decode_through_a_converted_copy(photos, dali):
    """A JPEG replaced by a GIF of other pixels: DALI's decoder fails on it (with no file name); the
    rescan converts it as the up-front scan would have, and the batches go on, that row included."""
    loader = dali_loader(photos, "skip", batch=8)
    before = snapshot(photos)
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).convert("P").save(photos / "images" / "05.jpg", format="GIF")
    batches = list(loader.epoch(0))
    assert [b["index"].tolist() for b in batches] == [list(range(s, s + 8)) for s in range(0, 24, 8)]
    assert loader.files[5] != loader.split.paths[5] and loader.files[5].endswith(".png")
    grey = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)   # a flat image: any crop
    torch.testing.assert_close(batches[0]["views"][0][5].mean(dim=(1, 2)), grey, atol=0.02, rtol=0)
    assert_intact_but(before, photos, "05.jpg")


def test_a_dali_failure_with_no_changed_file_keeps_dalis_error(photos, dali, monkeypatch):
    """A failure the rescan cannot trace to a file is DALI's own (or a bug): it goes up unchanged after
    one rescan of the steps DALI may have read, and nothing is skipped."""
    loader = dali_loader(photos, "skip")
    rescanned = []
    inspect = dali._inspect
    monkeypatch.setattr(dali, "_inspect", lambda path, *args: rescanned.append(path) or inspect(path, *args))

    def broken(*args, **kwargs):
        raise RuntimeError("Critical error in pipeline: an operator failed")
    monkeypatch.setattr(dali, "_build_pipeline", broken)
    with pytest.raises(RuntimeError, match="^Critical error in pipeline: an operator failed$"):
        next(loader.epoch(0))
    assert sorted(rescanned) == read_split(photos, "labeled").paths[:4 * dali.READ_AHEAD_STEPS]
    assert (loader.stand_in == np.arange(24)).all() and loader.files == read_split(photos, "labeled").paths


# ---- labels as people write them: spaces, byte-order marks, Unicode forms, ids and names mixed ----

NFC, NFD = "caf\u00e9", "cafe\u0301"   # 'café' typed, and as a macOS folder name spells it


def own_pile(base, labels, val=None) -> list:
    """prepare own's sources under `base`: 4 unlabeled PNGs and labeled.csv listing a PNG per label of
    `labels` (val.csv too when `val` gives its labels); the arguments of a run with --out base/out."""
    for i in range(4):
        png(base / "pile" / f"u{i}.png", 200 + i)
    rows = []
    for i, label in enumerate(labels):
        png(base / "labeled" / f"l{i}.png", i)
        rows.append(f"labeled/l{i}.png,{label}\n")
    (base / "labeled.csv").write_text("path,label\n" + "".join(rows), encoding="utf-8")
    split = ["--val-per-class", 1]
    if val is not None:
        for i in range(len(val)):
            png(base / "val" / f"v{i}.png", 100 + i)
        (base / "val.csv").write_text("path,label\n" + "".join(f"val/v{i}.png,{v}\n" for i, v in enumerate(val)),
                                      encoding="utf-8")
        split = ["--val", base / "val.csv"]
    return ["own", "--out", base / "out", "--unlabeled", base / "pile", "--labeled", base / "labeled.csv", *split,
            "--test-per-class", 1]


def labeled_classes(root) -> list:
    """Each labeled image's class name, in labeled.csv's order."""
    classes = (root / "classes.txt").read_text(encoding="utf-8").splitlines()
    return [classes[label] for label in read_split(root, "labeled").labels]


@pytest.mark.parametrize("labels, classes", [
    (["cat", "cat ", " cat", "dog", "dog\t", " dog "] * 2, ["cat", "dog"]),     # spaces around a label
    ([NFC, NFD, NFC, "dog", "dog", "dog"] * 2, [NFC, "dog"]),                  # two Unicode forms of one name
])
def test_labels_that_print_alike_make_one_class_in_prepare_own(tmp_path, capsys, labels, classes):
    status, _, err = run_prepare(capsys, *own_pile(tmp_path, labels))
    assert status == 0, err
    assert (tmp_path / "out" / "classes.txt").read_text(encoding="utf-8").splitlines() == classes
    assert check_dataset(tmp_path / "out") == []


@pytest.mark.parametrize("text, message", [
    ("cat\ncat \n", "classes.txt:2: class 'cat ' already named on line 1 as 'cat' (U+0063 U+0061 U+0074 and U+0063 "
                    "U+0061 U+0074 U+0020: one name once the spaces around it are dropped and its Unicode is "
                    "normalised to NFC)"),
    (f"{NFC}\nbee\n{NFD}\n", f"classes.txt:3: class '{NFD}' already named on line 1 as '{NFC}' (U+0063 U+0061 U+0066 "
                             "U+00E9 and U+0063 U+0061 U+0066 U+0065 U+0301: one name once the spaces around it are "
                             "dropped and its Unicode is normalised to NFC)"),
])
def test_classes_txt_naming_a_class_twice_in_two_spellings_shows_both(tmp_path, text, message):
    root = layout(tmp_path)
    (root / "classes.txt").write_text(text + "".join(f"{c}\n" for c in CLASSES[3:]), encoding="utf-8")
    assert checked_error(root) == f"{root / message}"


def test_class_folders_in_two_unicode_forms_are_refused_before_any_decoding(tmp_path, capsys):
    src = make_source(tmp_path / "src", classes=(NFC, NFD, "dog"))
    before = snapshot(tmp_path)
    status, _, err = run_prepare(capsys, *folder_args(src, tmp_path / "out"))
    assert status == 2
    # sorted, the NFD folder comes first: 'e' (U+0065) sorts before 'é' (U+00E9)
    assert_one_line_error(err, f"source {src}: classes '{NFD}' and '{NFC}' are one class (U+0063 U+0061 U+0066 U+0065 "
                               "U+0301 and U+0063 U+0061 U+0066 U+00E9: one name once the spaces around it are dropped "
                               "and its Unicode is normalised to NFC); expected one name for it")
    assert snapshot(tmp_path) == before


def test_a_label_column_of_ids_and_names_is_refused_in_prepare_own(tmp_path, capsys):
    args = own_pile(tmp_path, ["cat", "dog"] * 3, val=["dog", "cat", "1"])
    before = snapshot(tmp_path)
    status, _, err = run_prepare(capsys, *args)
    assert status == 2
    assert_one_line_error(err, f"{tmp_path / 'val.csv'}:4: label '1' is a class id, but line 2's 'dog' is a class "
                               "name: expected a column of class names or of class ids, not both")
    assert snapshot(tmp_path) == before


def answers_setup(tmp_path, label_lines, encoding="utf-8"):
    """(answers CSV, queries, root, classes) for annotations.import_answers: queries of three unlabeled images."""
    root = layout(tmp_path)
    queries = [{"path": f"images/u{i}.png"} for i in range(3)]
    answers = tmp_path / "answers.csv"
    answers.write_text("path,label\n" + "".join(f"images/u{i}.png,{label}\n" for i, label in enumerate(label_lines)),
                       encoding=encoding)
    return str(answers), queries, str(root), [*CLASSES[:2], NFC, *CLASSES[3:]]


@pytest.mark.parametrize("labels, expected", [
    (["ant", " bee ", NFD], [0, 1, 2]),   # names: spaces dropped, the NFD spelling of class 2's NFC name
    (["0", " 1", ""], [0, 1]),             # ids; an empty label: the annotator could not tell
])
def test_answers_match_classes_after_spaces_and_unicode_form(tmp_path, labels, expected):
    answers, queries, root, classes = answers_setup(tmp_path, labels)
    got = annotations.import_answers(answers, queries, "queries.csv", root, classes)
    assert got == {f"images/u{i}.png": c for i, c in enumerate(expected)}


def test_an_answers_column_of_names_and_ids_is_refused(tmp_path):
    answers, queries, root, classes = answers_setup(tmp_path, ["ant", "", "3"])
    with pytest.raises(InputError) as caught:
        annotations.import_answers(answers, queries, "queries.csv", root, classes)
    assert str(caught.value) == (f"{answers}:4: label '3' is a class id, but line 2's 'ant' is a class name: "
                                 "expected a column of class names or of class ids, not both")


BOM = "\ufeff"


def with_bom(path):
    path = Path(path)
    path.write_text(BOM + path.read_text(encoding="utf-8"), encoding="utf-8")


@pytest.mark.parametrize("reader", ["split", "classes.txt", "pseudo-labels", "answers", "queries", "prepare own"])
def test_a_byte_order_mark_is_read_past_by_every_reader(tmp_path, capsys, reader):
    if reader == "prepare own":
        args = own_pile(tmp_path, ["cat", "dog"] * 3, val=["cat", "dog"])
        for name in ("labeled.csv", "val.csv"):
            with_bom(tmp_path / name)
        assert run_prepare(capsys, *args)[0] == 0
        assert sorted(labeled_classes(tmp_path / "out")) == ["cat", "cat", "dog", "dog"]   # one each drawn for test
        return
    if reader in ("answers", "queries"):
        answers, queries, root, classes = answers_setup(tmp_path, ["bee", "dog", "ant"])
        queries_csv = tmp_path / "queries.csv"
        queries_csv.write_text("path,cluster,margin,guess\n" + "".join(f"{q['path']},0,0.1,ant\n" for q in queries))
        with_bom(answers if reader == "answers" else queries_csv)
        read = annotations.read_queries(str(queries_csv))
        assert [q["path"] for q in read] == [q["path"] for q in queries]
        assert annotations.import_answers(answers, read, str(queries_csv), root, classes) == {
            "images/u0.png": 1, "images/u1.png": 3, "images/u2.png": 0}
        return
    root = layout(tmp_path)
    pseudo = tmp_path / "pseudo.csv"
    pseudo.write_text("path,label,score\nimages/u0.png,4,0.9\nimages/u1.png,5,0.8\n")
    with_bom({"split": root / "labeled.csv", "classes.txt": root / "classes.txt", "pseudo-labels": pseudo}[reader])
    assert checked_warnings(root) == []
    assert read_classes(root) == CLASSES
    split = labeled_with_pseudo_labels(root, "labeled", str(pseudo))
    assert split.labels.tolist() == [*range(7), 4, 5]


def test_label_ids_with_spaces_around_them_are_the_ids(tmp_path):
    root = layout(tmp_path)
    (root / "labeled.csv").write_text("path,label\n" + "".join(f"images/l{i}.png, {i} \n" for i in range(7)))
    assert read_split(root, "labeled").labels.tolist() == list(range(7))


# ---- scorers that tell no image from another ----

@pytest.mark.parametrize("labels, k, iterations, message", [
    # labels of one class only: every image it reaches gets that class for certain
    ([0, 0, 0, 0], 8, 20, "label propagation gave the 12 unlabeled images it reached one and the same class "
                          "distribution (1, 0): every score would be equal"),
    # one conjugate-gradient step spreads nothing beyond the labeled images
    ([0, 1, 0, 1], 3, 1, "label propagation reached none of the 12 unlabeled images from the labeled ones "
                         "(propagation.k=3, propagation.iterations=1): every score would be 0"),
])
def test_a_propagation_that_ranks_nothing_is_refused(tmp_path, labels, k, iterations, message):
    # close to one direction: every cosine similarity near 1, so the kNN graph is connected
    x = 1 + 0.05 * np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    (tmp_path / "labeled").mkdir()
    np.save(tmp_path / "embeddings.npy", x[:12])
    np.save(tmp_path / "labeled" / "embeddings.npy", x[12:])
    with pytest.raises(InputError) as caught:
        label_propagation.write_scores(str(tmp_path), np.array(labels), 2, "propagation", 2, k, 0.99, iterations,
                                       3.0, None, str(tmp_path / "scores"))
    assert str(caught.value).startswith(message) and "the selection the first files in order" in str(caught.value)
    assert not (tmp_path / "scores").exists()


@pytest.mark.parametrize("stage, overrides, message", [
    # more neighbours than images: every image's neighbourhood is the whole pile
    ("pseudolabel", ["pseudo.top_k=2", "propagation.k=17"],
     "propagation.k=17: expected fewer than the 17 labeled + unlabeled images"),
    # more queries (each cluster gives one) than candidates: every image would be queried, none chosen
    ("active", ["active.budget=12", "active.clusters=46"],
     "active.clusters=12, active.budget -> 12 queries: expected 1 <= clusters <= queries <= the 10 candidate images"),
])
def test_a_selection_with_nothing_to_choose_is_refused_by_the_stage_check(tmp_path, stage, overrides, message):
    from trainer.runtime.stages import STAGES
    inputs = {"pseudolabel": ["pseudo.model=m.pt"],
              "active": ["active.model=m.pt", "active.backbone=b.pt", "active.oracle=false"]}[stage]
    cfg = config.load(STAGES[stage].config, str(PROJECT / "configs" / "demo" / f"{stage}.yaml"),
                      [f"data.root={layout(tmp_path)}", *inputs, *overrides])
    with pytest.raises(config.ConfigError) as caught:
        STAGES[stage].check(cfg)
    assert str(caught.value) == message


# ---- training batches against the images they are drawn from ----

def stage_config(stage, root, *overrides):
    """The demo config of `stage` on the dataset `root`, its inputs set to files that need not exist."""
    from trainer.runtime.stages import STAGES
    inputs = {"finetune": ["finetune.backbone=random"], "fixmatch": ["fixmatch.model=m.pt", "fixmatch.pseudo_labels="],
              "pretrain": [], "pseudolabel": ["pseudo.model=m.pt", "pseudo.top_k=2", "propagation.k=5"]}[stage]
    return config.load(STAGES[stage].config, str(PROJECT / "configs" / "demo" / f"{stage}.yaml"),
                       [f"data.root={root}", *inputs, *overrides])


@pytest.mark.parametrize("stage, overrides, message", [
    ("finetune", [], "train.batch_size=64: expected at most 7: a batch is drawn from the 7 training images (labeled)"),
    ("fixmatch", [], "train.batch_size=32: expected at most 1: fixmatch.mu=7 times the batch is drawn from the 10 "
                     "unlabeled images"),
    ("fixmatch", ["fixmatch.mu=1", "train.batch_size=8", "fixmatch.pseudo_labels=PSEUDO"],
     "train.batch_size=8: expected at most 7: a batch is drawn from the 7 labeled images (labeled), not counting the "
     "pseudo-labels of PSEUDO (not written yet)"),
    ("pretrain", [], "train.batch_size=256: expected at most 17: a batch is drawn from the 17 labeled + unlabeled "
                     "images"),
    ("pretrain", ["train.batch_size=16"], "knn.k=20: expected 1..7 (the labeled images, which vote in the kNN "
                                          "monitor; knn.every_epochs=0 turns it off)"),
    # pseudolabel's fine-tunes on the labeled images alone, checked before its first predictions
    ("pseudolabel", [], "the iterations' fine-tunes (configs/demo/finetune.yaml + pseudo.finetune_overrides): "
                        "train.batch_size=64: expected at most 7: a batch is drawn from the 7 training images (labeled)"),
])
def test_a_batch_larger_than_its_images_is_refused_by_the_stage_check(tmp_path, stage, overrides, message):
    from trainer.runtime.stages import STAGES
    root = layout(tmp_path)
    pseudo = str(tmp_path / "pseudolabel" / "pseudo_labels.csv")
    cfg = stage_config(stage, root, *(o.replace("PSEUDO", pseudo) for o in overrides))
    with pytest.raises(config.ConfigError) as caught:
        STAGES[stage].check(cfg)
    expected = message.replace("PSEUDO", pseudo)
    assert str(caught.value) in (expected, f"{expected}; lower it, or set train.fit_batch=true to train with the "
                                           "largest batch the images allow")


@pytest.mark.parametrize("stage, world, fitted", [("finetune", 1, 7), ("finetune", 2, 6), ("fixmatch", 1, 1),
                                                  ("pretrain", 4, 16)])
def test_fit_batch_lowers_the_batch_to_what_the_images_allow(tmp_path, stage, world, fitted):
    from launch import finetune, fixmatch, pretrain
    from trainer.runtime.stages import STAGES
    root = layout(tmp_path)
    cfg = stage_config(stage, root, "train.fit_batch=true", "knn.k=5" if stage == "pretrain" else "run.seed=0")
    STAGES[stage].check(cfg)   # passes: the images allow a batch
    labeled, unlabeled = read_split(root, "labeled"), read_split(root, "unlabeled")
    limits = {"finetune": lambda: finetune.batch_limits(labeled),
              "fixmatch": lambda: fixmatch.batch_limits(cfg, labeled, unlabeled),
              "pretrain": lambda: pretrain.batch_limits(len(labeled) + len(unlabeled))}[stage]()
    chosen, said = batch.fit(cfg, limits, world)
    assert chosen == fitted and said.startswith(f"train.batch_size={cfg.train.batch_size} lowered to {fitted} "
                                                "(train.fit_batch=true): ")


def test_a_later_stages_batch_is_refused_before_the_pipeline_runs_its_first(tmp_path):
    import yaml
    root = write_layout(tmp_path / "data", labeled=[(f"l{i}.png", i % 2) for i in range(8)],
                        val=[("v0.png", 0), ("v1.png", 1)], test=[("t0.png", 0), ("t1.png", 1)],
                        unlabeled=[f"u{i}.png" for i in range(40)], classes=["ant", "bee"])
    demo = PROJECT / "configs" / "demo"
    spec = {name: {"config": str(demo / f"{name}.yaml")} for name in
            ("supervised", "pretrain", "finetune", "pseudolabel", "fixmatch", "active", "evaluate", "predict")}
    spec["supervised"]["overrides"] = spec["finetune"]["overrides"] = ["train.batch_size=8"]
    spec["pretrain"]["overrides"] = ["train.batch_size=16", "knn.k=4"]
    spec["pseudolabel"]["overrides"] = ["pseudo.top_k=2", "pseudo.finetune_overrides=[train.batch_size=8]"]
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "run")}, "data": {"root": str(root)},
        "pipeline": {**spec, "active_learning": False}}))
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, str(PROJECT / "launch" / "pipeline.py"), "--config",
                           str(tmp_path / "pipeline.yaml")], capture_output=True, text=True, timeout=300,
                          cwd=PROJECT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "pipeline.py: error: stage fixmatch: train.batch_size=32: expected at most 5: fixmatch.mu=7 times the batch "
        "is drawn from the 40 unlabeled images; lower it, or set train.fit_batch=true to train with the largest batch "
        "the images allow"]
    assert not (tmp_path / "run").exists() and snapshot(tmp_path) == before
