"""One picture in two splits under two names, and files prepare's walks do not take.

prepare own/folder: a copy (the same bytes) or a re-encoding (the same pixels, other bytes) of a
labeled, val or test picture is left out of the unlabeled pool, a val copy of a labeled picture out of
val, each listed in duplicates.txt with the copy kept; a picture with two labels is refused. Symlinked
sub-folders, hidden files and folders and formats this Pillow cannot decode are listed in
bad_images.txt with the reason. check_dataset warns when val or test shares bytes with another split,
and trusts prepare's record while the CSVs are unchanged."""
import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import same_content
from data.datasets import check_dataset
from launch import prepare
from test_prepare import expect_error

CLASSES = ("cat", "dog")


def save(path, seed, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **options)
    return path


def reencode(source, path):
    """The same pixels in other bytes: PNG without compression."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        image.save(path, compress_level=0)
    assert path.read_bytes() != source.read_bytes()
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(source)))
    return path


def copy(source, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    return path


def make_pile(base):
    """labeled/<class>/ (4 each), val/<class>/ (2 each) and pile/ (6 images in two folders)."""
    seed = iter(range(1000))
    for name in CLASSES:
        for i in range(4):
            save(base / "labeled" / name / f"{i}.png", next(seed))
        for i in range(2):
            save(base / "val" / name / f"v{i}.png", next(seed))
    for rel in ("a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png", "2.png"):
        save(base / "pile" / rel, next(seed))
    return base


def own(base, out, *extra, val=("--val", "val"), test=("--test-per-class", "1")):
    option, value = val   # (--val, a folder of base) or (--val-per-class, N)
    value = str(base / value) if option == "--val" else value
    return prepare.main(["own", "--out", str(out), "--unlabeled", str(base / "pile"), "--labeled",
                         str(base / "labeled"), option, value, *test, *extra])


def rows(root, name):
    with open(Path(root) / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


def listed(root, name):
    """ROOT/<name> (bad_images.txt, duplicates.txt) as {first column: the other columns}."""
    lines = (Path(root) / name).read_text().splitlines()
    return {line.split("\t")[0]: line.split("\t")[1:] for line in lines}


def counts(root):
    return json.loads((Path(root) / "prepare.json").read_text())["counts"]


# ---- copies across splits ----

@pytest.mark.parametrize("link", [False, True])
def test_copies_of_val_and_labeled_pictures_leave_the_unlabeled_pool(tmp_path, capsys, link):
    base = make_pile(tmp_path / "pile")
    copy(base / "val" / "cat" / "v0.png", base / "pile" / "a" / "copied.png")               # the same bytes
    reencode(base / "val" / "dog" / "v1.png", base / "pile" / "b" / "reencoded.png")        # the same pixels
    copy(base / "labeled" / "dog" / "2.png", base / "pile" / "from-labeled.png")
    out = tmp_path / "out"
    assert own(base, out, *(["--link"] if link else [])) == 0
    said = capsys.readouterr().out
    assert "skipped 3 copies of a picture kept in another split or listed before" in said
    assert "duplicates 3 ->" in said   # the closing summary line
    unlabeled = {r["path"] for r in rows(out, "unlabeled")}
    assert unlabeled == {f"images/unlabeled/pile/{rel}" for rel in ("a/0.png", "a/1.png", "a/2.png", "b/0.png",
                                                                     "b/1.png", "2.png")}
    assert listed(out, "duplicates.txt") == {
        str(base / "pile" / "a" / "copied.png"): [str(base / "val" / "cat" / "v0.png"),
                                                  "left out of unlabeled: the same picture is in val"],
        str(base / "pile" / "b" / "reencoded.png"): [str(base / "val" / "dog" / "v1.png"),
                                                     "left out of unlabeled: the same picture is in val"],
        str(base / "pile" / "from-labeled.png"): [str(base / "labeled" / "dog" / "2.png"),
                                                  "left out of unlabeled: the same picture is in labeled"]}
    assert counts(out)["duplicates"] == 3 and counts(out)["unlabeled"] == 6
    assert len(rows(out, "val")) == 4 and check_dataset(out) == []


def test_a_labeled_picture_copied_into_val_leaves_val_and_stays_labeled(tmp_path, capsys):
    base = make_pile(tmp_path / "pile")
    copy(base / "labeled" / "cat" / "1.png", base / "val" / "cat" / "v9.png")
    out = tmp_path / "out"
    assert own(base, out) == 0
    assert {r["path"] for r in rows(out, "val")} == {f"images/val/{c}/v{i}.png" for c in CLASSES for i in (0, 1)}
    assert "images/labeled/cat/1.png" in {r["path"] for r in rows(out, "labeled") + rows(out, "test")}
    assert listed(out, "duplicates.txt") == {str(base / "val" / "cat" / "v9.png"): [
        str(base / "labeled" / "cat" / "1.png"), "left out of val: the same picture is in labeled"]}
    assert "copies of a picture" in capsys.readouterr().out


def test_a_picture_with_two_labels_is_refused_and_nothing_written(tmp_path, capsys):
    base = make_pile(tmp_path / "pile")
    reencode(base / "labeled" / "cat" / "1.png", base / "val" / "dog" / "v9.png")
    out = tmp_path / "out"
    expect_error(capsys, own(base, out), str(base / "val" / "dog" / "v9.png"), "the same picture as",
                 str(base / "labeled" / "cat" / "1.png"), "labeled 'cat' there and 'dog' here",
                 "expected one label per picture", "(1 such pictures)")
    assert not out.exists()


def test_a_labeled_picture_twice_is_kept_once_so_no_draw_splits_it(tmp_path):
    base = make_pile(tmp_path / "pile")
    for name in CLASSES:   # every labeled picture twice: a draw that ignored copies would split some pair
        for i in range(4):
            copy(base / "labeled" / name / f"{i}.png", base / "labeled" / name / f"again-{i}.png")   # listed after
    out = tmp_path / "out"
    assert own(base, out, val=("--val-per-class", "1")) == 0
    taken = [r["path"] for split in ("labeled", "val", "test") for r in rows(out, split)]
    assert len(taken) == 8 and not any("again" in p for p in taken)
    assert len(listed(out, "duplicates.txt")) == 8
    assert all(why == "left out of labeled: the same picture is listed before it"
               for _, why in listed(out, "duplicates.txt").values())


def test_copies_within_the_pool_all_stay(tmp_path):
    base = make_pile(tmp_path / "pile")
    copy(base / "pile" / "a" / "0.png", base / "pile" / "b" / "same.png")
    out = tmp_path / "out"
    assert own(base, out) == 0
    assert {"images/unlabeled/pile/a/0.png", "images/unlabeled/pile/b/same.png"} <= \
        {r["path"] for r in rows(out, "unlabeled")}
    assert (out / "duplicates.txt").read_text() == "" and counts(out)["duplicates"] == 0


def test_folder_keeps_one_copy_per_class_and_refuses_one_picture_in_two_classes(tmp_path, capsys):
    src = tmp_path / "src"
    for c, name in enumerate(CLASSES):
        for i in range(4):
            save(src / name / f"{i}.png", 10 * c + i)
    reencode(src / "cat" / "0.png", src / "cat" / "zz-again.png")
    out = tmp_path / "out"
    args = ["folder", str(src), "--out", str(out), "--labels-per-class", "2", "--val-per-class", "1",
            "--test-per-class", "1"]
    assert prepare.main(args) == 0
    every = [r["path"] for split in ("labeled", "val", "test", "unlabeled") for r in rows(out, split)]
    assert len(every) == 8 and "images/cat/zz-again.png" not in every
    assert listed(out, "duplicates.txt") == {"cat/zz-again.png": [
        "cat/0.png", "left out of the source: the same picture is listed before it"]}
    copy(src / "cat" / "1.png", src / "dog" / "9.png")
    expect_error(capsys, prepare.main(args + ["--force"]), str(src / "dog" / "9.png"), str(src / "cat" / "1.png"),
                 "labeled 'cat' there and 'dog' here")


# ---- files the walks do not take ----

def test_symlinked_folders_hidden_files_and_undecodable_formats_are_listed(tmp_path, capsys):
    base = make_pile(tmp_path / "pile")
    save(base / "elsewhere" / "x.png", 500)
    os.symlink(base / "elsewhere", base / "pile" / "linked")
    os.symlink(base / "pile", base / "pile" / "a" / "loop")                  # would loop if followed
    save(base / "pile" / "a" / ".hidden.png", 501)
    save(base / "pile" / ".thumbnails" / "t.png", 502)
    (base / "pile" / "b" / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))   # no HEIF plugin
    save(base / "pile" / "b" / "photo.jfif", 503, format="JPEG")           # .jfif is a JPEG: taken
    out = tmp_path / "out"
    assert own(base, out) == 0
    said = capsys.readouterr().out
    bad = listed(out, "bad_images.txt")
    pile = base / "pile"
    assert set(bad) == {f"{pile}/linked/", f"{pile}/a/loop/", f"{pile}/a/.hidden.png", f"{pile}/.thumbnails/",
                        f"{pile}/b/photo.heic"}
    assert bad[f"{pile}/linked/"][0].startswith("a symlinked folder: not followed, as a link may loop")
    assert bad[f"{pile}/a/.hidden.png"][0].startswith("hidden")
    assert bad[f"{pile}/.thumbnails/"][0].startswith("a hidden folder")
    assert "this Pillow has no decoder for .heic files" in bad[f"{pile}/b/photo.heic"][0]
    assert "skipped 1 unreadable images" in said and "skipped 4 files and folders not searched" in said
    assert "bad_images 5 " in said and counts(out)["bad_images"] == 5
    unlabeled = {r["path"] for r in rows(out, "unlabeled")}
    assert "images/unlabeled/pile/b/photo.jfif" in unlabeled
    assert not any("linked" in p or "loop" in p for p in unlabeled)


def test_an_avif_is_taken_where_pillow_decodes_it(tmp_path):
    if ".avif" not in Image.registered_extensions():
        pytest.skip("this Pillow has no AVIF codec: the .heic case covers a format it cannot decode")
    base = make_pile(tmp_path / "pile")
    save(base / "pile" / "photo.avif", 600, quality=90)
    out = tmp_path / "out"
    assert own(base, out) == 0
    assert "images/unlabeled/pile/photo.avif" in {r["path"] for r in rows(out, "unlabeled")}


def test_on_bad_image_error_stops_at_a_format_pillow_cannot_decode(tmp_path, capsys):
    base = make_pile(tmp_path / "pile")
    (base / "pile" / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    save(base / "pile" / ".hidden.png", 1)   # a skip that never stops the run
    expect_error(capsys, own(base, tmp_path / "out", "--on-bad-image", "error"), str(base / "pile" / "photo.heic"),
                 "no decoder for .heic files")


def test_a_source_whose_only_images_lie_behind_a_symlink_says_so(tmp_path, capsys):
    base = make_pile(tmp_path / "pile")
    shutil.rmtree(base / "pile")
    (base / "pile").mkdir()
    os.symlink(base / "labeled", base / "pile" / "link")
    expect_error(capsys, own(base, tmp_path / "out"), f"--unlabeled {base / 'pile'}: no images found",
                 f"left out 1, the first {base / 'pile' / 'link'}/: a symlinked folder: not followed")


# ---- check_dataset: splits that share content ----

@pytest.fixture
def prepared(tmp_path):
    base = make_pile(tmp_path / "pile")
    out = tmp_path / "out"
    assert own(base, out) == 0
    return out


def test_a_prepared_dataset_is_trusted_while_its_csvs_are_unchanged(prepared, monkeypatch):
    assert json.loads((prepared / "prepare.json").read_text())[same_content.CHECKED].keys() == set(same_content.CSVS)

    def compared(splits):
        raise AssertionError("check_dataset compared files that prepare had compared")
    monkeypatch.setattr(same_content, "byte_copies", compared)
    assert check_dataset(prepared) == []


def test_a_val_image_copied_into_unlabeled_after_prepare_is_a_warning(prepared):
    val = rows(prepared, "val")[0]["path"]
    copy(prepared / val, prepared / "images" / "extra" / "copy.png")
    with open(prepared / "unlabeled.csv", "a") as f:
        f.write("images/extra/copy.png\n")
    (warning,) = check_dataset(prepared)
    assert warning.startswith(f"1 image(s) of {prepared / 'val.csv'} have a copy with the same bytes under another "
                              f"name in {prepared / 'unlabeled.csv'} (the first: {val} and images/extra/copy.png): "
                              "training sees them, so the score on val can be inflated")


def test_active_learnings_labeled_csv_needs_no_second_look(prepared, monkeypatch, tmp_path):
    answered = rows(prepared, "unlabeled")[:2]
    labeled = tmp_path / "run" / "labeled.csv"
    labeled.parent.mkdir()
    labeled.write_text((prepared / "labeled.csv").read_text() + "".join(f"{r['path']},0\n" for r in answered))
    monkeypatch.setattr(same_content, "byte_copies", lambda splits: pytest.fail("compared again"))
    assert all("same bytes" not in w for w in check_dataset(prepared, str(labeled)))


def test_without_a_record_val_and_test_copies_are_found_by_size_then_bytes(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("cat\ndog\n")
    for i in range(6):
        save(root / "images" / f"{i}.png", i)
    copy(root / "images" / "3.png", root / "images" / "3-copy.png")
    big = (root / "images" / "0.png").read_bytes() + b"\0" * 64   # a size no other file has: never read
    (root / "images" / "big.png").write_bytes(big)
    (root / "labeled.csv").write_text("path,label\nimages/0.png,0\nimages/1.png,1\n")
    (root / "val.csv").write_text("path,label\nimages/2.png,0\nimages/3.png,1\n")
    (root / "test.csv").write_text("path,label\nimages/3-copy.png,1\n")
    (root / "unlabeled.csv").write_text("path\nimages/4.png\nimages/5.png\nimages/big.png\n")
    read = []
    digest = same_content.file_digest
    monkeypatch.setattr(same_content, "file_digest", lambda path: read.append(os.path.basename(path)) or digest(path))
    (warning,) = check_dataset(root)
    assert warning.startswith(f"1 image(s) of {root / 'val.csv'} have a copy with the same bytes under another name "
                              f"in {root / 'test.csv'} (the first: images/3.png and images/3-copy.png): both splits "
                              "score them")
    sizes = {name: os.path.getsize(root / "images" / name) for name in os.listdir(root / "images")}
    assert "big.png" not in read and all(list(sizes.values()).count(sizes[name]) > 1 for name in read)
