"""Builds a semiscale dataset (classes.txt, labeled/val/test/unlabeled.csv, images/) from a source.

    python launch/prepare.py fashion-mnist --out ROOT [--labels-per-class 30 --val-size 5000 --seed 0]
    python launch/prepare.py folder SRC --out ROOT --labels-per-class N --val-per-class M --test-per-class T [--link]
    python launch/prepare.py own --out ROOT --unlabeled DIR [DIR ...] --labeled DIR|CSV [--classes FILE]
        (--val DIR|CSV | --val-per-class N) (--test DIR|CSV | --test-per-class N)
        [--link] [--on-bad-image skip|error] [--seed S] [--workers W]

fashion-mnist and folder split fully labeled images themselves (simulations): splits are
class-balanced and seeded, and unlabeled.csv keeps the true label as a hidden column. `own` takes
your own data as it is: unlabeled.csv lists the images of the --unlabeled folders (no label column),
labeled.csv those of --labeled (DIR/<class>/<images>, or a CSV path,label whose paths are relative to
the CSV's folder or absolute, and whose labels are class names or, names winning, ids into the
class list). Given --val/--test splits are kept as they are; otherwise N images per class are drawn
(seeded) from the labeled ones, and every class keeps at least one labeled image. One file (symlinks,
'..' and hard links resolved) listed twice, in one split or in two, a class that the labeled set (or
--classes) does not have, and an unknown class id are errors.
Images are copied into ROOT/images (own: images/<split>/..., images/unlabeled/<folder name>/...), or
symlinked there with --link, so every path in the CSVs stays inside ROOT (own --link: one link per
source folder, ROOT/images/unlabeled/<folder name> -> the folder, and one per image a CSV lists). A finished dataset records
its parameters in ROOT/prepare.json (written last), so re-running with the same parameters is a no-op
and an interrupted run is redone from scratch.
A rebuild (--force, or after an interrupted run) removes only the OUTPUTS below, and the sources and
--out must not lie inside one another. Images that cannot be read, or whose names the dataset's
files cannot hold (a line break: DALI's file lists are one path per line; not UTF-8: the CSVs are),
are skipped and listed with the reason in ROOT/bad_images.txt (own: or stop the run, with
--on-bad-image error). Images are decoded in --workers processes, nothing but paths held in memory.
Bad input ends with one line `prepare: error: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import importlib
import io
import json
import multiprocessing
import os
import shutil
import struct
import sys
import time
import zlib

import numpy as np

from data.errors import InputError

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MANIFEST, INCOMPLETE = "prepare.json", ".prepare-incomplete"
OUTPUTS = ("images", "classes.txt", "labeled.csv", "val.csv", "test.csv", "unlabeled.csv", "bad_images.txt", MANIFEST)


class PrepareError(InputError):
    """Bad input, reported as one line and exit status 2."""


def say(message: str):
    print(f"prepare: {message}", flush=True)


# ---- the output folder: idempotent, and an interrupted run is never trusted ----

def refuse_nesting(source: str, root: str):
    """Raises when the source and ROOT are one folder or one lies inside the other (symlinks resolved).

    A rebuild replaces ROOT/images, which would delete a source inside ROOT; a ROOT inside a folder
    source would be read back as one more class by the next run.
    """
    source_real, root_real = os.path.realpath(source), os.path.realpath(root)
    common = os.path.commonpath([source_real, root_real])
    if common == root_real:
        raise PrepareError(f"source {source} lies inside --out {root}: rebuilding --out would delete it; "
                           "expected a source outside --out (move the images out first)")
    if common == source_real:
        raise PrepareError(f"--out {root} lies inside the source {source}: expected an --out outside the source")


def already_prepared(root: str, params: dict, force: bool) -> bool:
    """True when ROOT holds a finished dataset built with `params`; raises when ROOT holds something else."""
    if os.path.lexists(root) and not os.path.isdir(root):
        raise PrepareError(f"--out {root} is a file; expected a new or empty folder, or a dataset to rebuild")
    manifest = os.path.join(root, MANIFEST)
    if os.path.exists(manifest):
        if force:
            return False
        try:
            with open(manifest, encoding="utf-8") as f:
                previous = json.load(f)["params"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PrepareError(f"{manifest}: cannot read the parameters of the dataset there ({e}); "
                               "pass --force to rebuild it, or choose another --out") from None
        if previous != params:
            raise PrepareError(f"{root} holds a dataset prepared with other parameters ({previous}); "
                               "pass --force to rebuild it, or choose another --out")
        return all(os.path.exists(os.path.join(root, name)) for name in OUTPUTS)
    if os.path.isdir(root) and os.listdir(root) and not os.path.exists(os.path.join(root, INCOMPLETE)):
        raise PrepareError(f"{root} is not empty and is not a semiscale dataset; choose a new or empty --out")
    return False


def start_fresh(root: str):
    """Marks ROOT incomplete (until `finish`) and removes any earlier outputs."""
    os.makedirs(root, exist_ok=True)
    open(os.path.join(root, INCOMPLETE), "w").close()
    for name in OUTPUTS:
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    os.makedirs(os.path.join(root, "images"))


def finish(root: str, params: dict, counts: dict):
    write_atomically(os.path.join(root, MANIFEST), json.dumps({"params": params, "counts": counts}, indent=2) + "\n")
    os.remove(os.path.join(root, INCOMPLETE))


def write_atomically(path: str, text: str):
    with open(path + ".tmp", "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def csv_text(paths, labels=None) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label"] if labels is not None else ["path"])
    writer.writerows(zip(paths, labels) if labels is not None else ([p] for p in paths))
    return out.getvalue()


def write_dataset(root: str, classes: list[str], paths: np.ndarray, labels: np.ndarray, splits: dict, test: tuple):
    """classes.txt and the four CSVs; `splits` maps labeled/val/unlabeled to row indices, `test` = (paths, labels)."""
    write_atomically(os.path.join(root, "classes.txt"), "".join(f"{name}\n" for name in classes))
    for name, rows in splits.items():
        rows = np.sort(rows)
        write_atomically(os.path.join(root, f"{name}.csv"), csv_text(paths[rows], labels[rows]))
    write_atomically(os.path.join(root, "test.csv"), csv_text(*test))


# ---- class-balanced, seeded splits ----

def draw_per_class(labels: np.ndarray, classes: list[str], takes: dict, rng, noun: str) -> dict:
    """Row indices per split: `takes` maps split name -> per-class counts, drawn in order; the rest is 'unlabeled'."""
    drawn = {name: [] for name in takes} | {"unlabeled": []}
    for c, class_name in enumerate(classes):
        rows = rng.permutation(np.flatnonzero(labels == c))
        wanted = {name: int(counts[c]) for name, counts in takes.items()}
        if sum(wanted.values()) > len(rows):
            request = " + ".join(f"{name} {n}" for name, n in wanted.items())
            raise PrepareError(f"class {class_name!r} has {len(rows)} {noun}s, fewer than the "
                               f"{sum(wanted.values())} requested ({request})")
        start = 0
        for name, n in wanted.items():
            drawn[name].append(rows[start:start + n])
            start += n
        drawn["unlabeled"].append(rows[start:])
    return {name: np.concatenate(parts) if parts else np.empty(0, np.int64) for name, parts in drawn.items()}


def stratified_counts(available: np.ndarray, total: int) -> np.ndarray:
    """Splits `total` across classes in proportion to `available` (largest remainders get the leftovers)."""
    if total > available.sum():
        raise PrepareError(f"--val-size {total}: only {available.sum()} images are left after the labeled split")
    exact = total * available / max(available.sum(), 1)
    counts = np.floor(exact).astype(np.int64)
    leftover = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:leftover]] += 1
    return counts


# ---- Fashion-MNIST from the Debian package (gzip IDX files) ----

def read_idx(path: str) -> np.ndarray:
    """An unsigned-byte IDX array: bytes 0,0,0x08,ndim, then ndim big-endian int32 sizes, then the data.

    Parsed by hand: the format is a dozen bytes of header, not worth a dependency.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise PrepareError(f"{path}: cannot read a gzip IDX file ({e})") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise PrepareError(f"{path}: expected an unsigned-byte IDX header (00 00 08 ndim), got {data[:4].hex()}")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, ">i4", count=ndim, offset=4))
    values = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise PrepareError(f"{path}: header announces shape {shape} but holds {values.size} values")
    return values.reshape(shape)


def read_fashion_mnist(source: str, limit: int | None = None) -> dict:
    """{"train"|"test": (N x H x W uint8 images, N int64 labels)}, optionally only the first `limit` of each."""
    if not os.path.isdir(source):
        raise PrepareError(f"source {source}: no such directory "
                           "(install the dataset-fashion-mnist package or pass --source)")
    for name in sum(FASHION_MNIST_FILES.values(), ()):
        if not os.path.isfile(os.path.join(source, name)):
            raise PrepareError(f"source {source}: missing {name} (expected the Fashion-MNIST IDX files)")
    parts = {}
    for part, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images, labels = read_idx(os.path.join(source, images_name)), read_idx(os.path.join(source, labels_name))
        if images.ndim != 3 or labels.shape != images.shape[:1] or np.any(labels >= len(FASHION_MNIST_CLASSES)):
            raise PrepareError(f"source {source}: {images_name} {images.shape} and {labels_name} {labels.shape} "
                               f"do not pair as N images with N labels in [0, {len(FASHION_MNIST_CLASSES)})")
        parts[part] = (images[:limit], labels[:limit].astype(np.int64))
    return parts


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_pngs(job):
    """Writes 8-bit greyscale PNGs. Encoded by hand: at 28 px PIL's per-image overhead costs more than
    the encoding itself (docs/results.md, loader)."""
    images, paths = job
    n, height, width = images.shape
    rows = np.zeros((n, height, width + 1), np.uint8)   # each PNG row starts with filter type 0 (none)
    rows[:, :, 1:] = images
    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    tail = _png_chunk(b"IEND", b"")
    for pixels, path in zip(rows, paths):
        with open(path, "wb") as f:
            f.write(head + _png_chunk(b"IDAT", zlib.compress(pixels.tobytes())) + tail)
    return n


def prepare_fashion_mnist(args) -> tuple[dict, dict] | None:
    params = {"source": "fashion-mnist", "source_dir": os.path.abspath(args.source), "seed": args.seed,
              "labels_per_class": args.labels_per_class, "val_size": args.val_size, "limit": args.limit}
    if args.labels_per_class < 1 or args.val_size < 0:
        raise PrepareError("--labels-per-class must be >= 1 and --val-size >= 0")
    refuse_nesting(args.source, args.out)
    if already_prepared(args.out, params, args.force):
        return None
    start = time.perf_counter()
    parts = read_fashion_mnist(args.source, args.limit)
    (train_images, train_labels), (test_images, test_labels) = parts["train"], parts["test"]
    classes = FASHION_MNIST_CLASSES
    per_class = np.bincount(train_labels, minlength=len(classes))
    labeled = np.full(len(classes), args.labels_per_class)
    takes = {"labeled": labeled, "val": stratified_counts(np.maximum(per_class - labeled, 0), args.val_size)}
    splits = draw_per_class(train_labels, classes, takes, np.random.default_rng(args.seed), "image")
    say(f"read {len(train_labels)} train + {len(test_labels)} test images from {args.source} "
        f"({time.perf_counter() - start:.1f} s)")
    start_fresh(args.out)
    paths = {}
    for part, images in (("train", train_images), ("test", test_images)):
        os.makedirs(os.path.join(args.out, "images", part))
        paths[part] = np.array([f"images/{part}/{i:05d}.png" for i in range(len(images))])
    written_start = time.perf_counter()
    chunk = 2000
    jobs = [(images[i:i + chunk], [os.path.join(args.out, p) for p in paths[part][i:i + chunk]])
            for part, images in (("train", train_images), ("test", test_images))
            for i in range(0, len(images), chunk)]
    with multiprocessing.Pool(args.workers) as pool:
        written = sum(pool.imap_unordered(_write_pngs, jobs))
    say(f"wrote {written} PNGs with {args.workers} processes ({time.perf_counter() - written_start:.1f} s)")
    write_dataset(args.out, classes, paths["train"], train_labels, splits, (paths["test"], test_labels))
    write_atomically(os.path.join(args.out, "bad_images.txt"), "")
    return params, {name: len(rows) for name, rows in splits.items()} | {"test": len(test_labels)}


# ---- any ImageFolder-style tree SRC/<class>/<images> ----

def shown(name: str) -> str:
    """`name` on one line of UTF-8 text: line breaks and tabs escaped, bytes that are not UTF-8 as \\xNN."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def unlistable(name: str) -> str | None:
    """Why the dataset's text files cannot hold the file or class name `name` (None when they can)."""
    if "\n" in name or "\r" in name:
        return "its name holds a line break, which one-name-per-line lists (DALI's, classes.txt) cannot hold"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8, which the dataset's UTF-8 text files cannot hold"
    return None


def list_folder(src: str) -> tuple[list[str], list[str], np.ndarray, list[tuple[str, str]]]:
    """(class names, image paths relative to SRC, labels, (path, reason) of images whose names the
    dataset cannot hold); classes are the sorted sub-folders."""
    if not os.path.isdir(src):
        raise PrepareError(f"source {src}: no such directory")
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    if len(classes) < 2:
        found = ", ".join(f"'{shown(name)}'" for name in classes) or "none"
        raise PrepareError(f"source {src}: expected one sub-folder per class (at least two), found {found}")
    for name in classes:
        reason = unlistable(name) or ("" if name.strip() else "its name is blank, which classes.txt cannot hold")
        if reason:
            raise PrepareError(f"source {src}: class folder '{shown(name)}': {reason}; expected it renamed")
    files, labels, misnamed = [], [], []
    for c, name in enumerate(classes):
        for folder, subfolders, names in os.walk(os.path.join(src, name)):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for file in sorted(names):
                if not file.startswith(".") and file.lower().endswith(IMAGE_EXTENSIONS):
                    path = os.path.relpath(os.path.join(folder, file), src)
                    reason = unlistable(path)
                    if reason:
                        misnamed.append((path, reason))
                    else:
                        files.append(path)
                        labels.append(c)
    return classes, files, np.asarray(labels, dtype=np.int64), misnamed


def _scan(path):
    from data.datasets import BadImageError, load_image   # imported by prepare_folder before the pool forks
    try:
        load_image(path)
        return None
    except BadImageError as e:
        return e.reason


def _place(job):
    source, target, link = job
    if link:
        os.symlink(source, target)
    else:
        shutil.copyfile(source, target)


def say_skipped(entries: list[tuple[str, str]], what: str, listing: str):
    if entries:
        say(f"skipped {len(entries)} {what} (listed in {listing}): "
            + ", ".join(shown(f) for f, _ in entries[:5]) + (", ..." if len(entries) > 5 else ""))


def prepare_folder(args) -> tuple[dict, dict] | None:
    src = os.path.abspath(args.src)
    params = {"source": "folder", "source_dir": src, "seed": args.seed, "labels_per_class": args.labels_per_class,
              "val_per_class": args.val_per_class, "test_per_class": args.test_per_class,
              "placement": "link" if args.link else "copy"}
    if min(args.labels_per_class, args.val_per_class, args.test_per_class) < 0 or args.labels_per_class < 1:
        raise PrepareError("--labels-per-class must be >= 1, --val-per-class and --test-per-class >= 0")
    refuse_nesting(src, args.out)
    classes, files, labels, misnamed = list_folder(src)
    takes = {"labeled": np.full(len(classes), args.labels_per_class), "val": np.full(len(classes), args.val_per_class),
             "test": np.full(len(classes), args.test_per_class)}
    draw_per_class(labels, classes, takes, np.random.default_rng(args.seed), "image")   # fail fast, before decoding
    if already_prepared(args.out, params, args.force):
        return None
    # Imported here: it brings in torch (seconds), which the fashion-mnist mode does without.
    importlib.import_module("data.datasets")
    start = time.perf_counter()
    with multiprocessing.Pool(args.workers) as pool:
        reasons = pool.map(_scan, [os.path.join(src, f) for f in files], chunksize=64)
        bad = [(f, reason) for f, reason in zip(files, reasons) if reason is not None]
        say(f"decoded {len(files)} images in {len(classes)} classes ({time.perf_counter() - start:.1f} s)")
        good = np.array([reason is None for reason in reasons], dtype=bool)
        files, labels = np.asarray(files)[good], labels[good]
        splits = draw_per_class(labels, classes, takes, np.random.default_rng(args.seed), "readable image")
        start_fresh(args.out)
        listing = os.path.join(args.out, "bad_images.txt")
        say_skipped(misnamed, "images whose names the dataset cannot hold", listing)
        say_skipped(bad, "unreadable images", listing)
        bad = misnamed + bad
        write_atomically(listing, "".join(f"{shown(f)}\t{reason}\n" for f, reason in bad))
        paths = np.array(["images/" + f.replace(os.sep, "/") for f in files])
        for folder in sorted({os.path.dirname(p) for p in paths}):
            os.makedirs(os.path.join(args.out, folder), exist_ok=True)
        start = time.perf_counter()
        pool.map(_place, [(os.path.join(src, f), os.path.join(args.out, p), args.link) for f, p in zip(files, paths)],
                 chunksize=256)
    say(f"{'linked' if args.link else 'copied'} {len(files)} images into {args.out}/images "
        f"({time.perf_counter() - start:.1f} s)")
    test_rows = np.sort(splits.pop("test"))
    write_dataset(args.out, classes, paths, labels, splits, (paths[test_rows], labels[test_rows]))
    counts = {name: len(rows) for name, rows in splits.items()} | {"test": len(test_rows), "bad_images": len(bad)}
    return params, counts


# ---- your own images: unlabeled trees, a labeled ImageFolder or CSV, optional val/test splits ----

OWN_SPLITS = ("labeled", "val", "test", "unlabeled")
SPLIT_CODES = {name: code for code, name in enumerate(OWN_SPLITS)}


class Source:
    """One input of `own`: a folder (class sub-folders when labeled, any tree when unlabeled) or a CSV
    `path,label`. An image is kept as `rel`: its path relative to `base`, or its absolute path when a
    CSV names a file outside the CSV's folder; `src(rel)` is the file, `out(rel)` its name in ROOT."""

    def __init__(self, option: str, given: str, split: str, prefix: str):
        self.option, self.given, self.split, self.prefix = option, given, split, prefix
        self.is_csv = not os.path.isdir(given)
        self.base = os.path.dirname(os.path.abspath(given)) if self.is_csv else os.path.abspath(given)
        self.base_slash = self.base.rstrip("/") + "/"

    def __str__(self):
        return f"{self.option} {self.given}"

    def src(self, rel: str) -> str:
        return rel if rel.startswith("/") else self.base_slash + rel

    def out(self, rel: str) -> str:
        return f"{self.prefix}/_abs{rel}" if rel.startswith("/") else f"{self.prefix}/{rel}"

    def where(self, rel: str, line: int) -> str:
        return f"{self.given}:{line} ({shown(rel)})" if self.is_csv else shown(self.src(rel))


class Listing:
    """Every listed image, one row each: columns, not objects (500k rows cost tens of MB)."""

    def __init__(self):
        self.sources: list[Source] = []
        self.rel: list[str] = []
        self.source, self.label, self.line = [], [], []
        self.misnamed: list[tuple[str, str]] = []    # (source path, reason) of names the dataset cannot hold

    def add(self, source_id: int, rel: str, label: int = -1, line: int = 0):
        reason = unlistable(rel)
        if reason:
            self.misnamed.append((self.sources[source_id].src(rel), reason))
            return
        self.rel.append(rel)
        self.source.append(source_id)
        self.label.append(label)
        self.line.append(line)

    def freeze(self):
        self.source = np.asarray(self.source, np.int32)
        self.label = np.asarray(self.label, np.int64)
        self.line = np.asarray(self.line, np.int64)
        self.split = np.asarray([SPLIT_CODES[s.split] for s in self.sources], np.int8)[self.source]

    def src(self, i: int) -> str:
        return self.sources[self.source[i]].src(self.rel[i])

    def out(self, i: int) -> str:
        return self.sources[self.source[i]].out(self.rel[i])

    def where(self, i: int) -> str:
        return self.sources[self.source[i]].where(self.rel[i], int(self.line[i]))

    def origin(self, i: int) -> str:
        """The option (and CSV line) that listed row i: `--unlabeled DIR`, `--val CSV:LINE`."""
        source = self.sources[self.source[i]]
        return f"{source}:{self.line[i]}" if source.is_csv else str(source)


def walk_images(folder: str):
    """Image paths under `folder` relative to it (sorted, hidden files and folders left out)."""
    for parent, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        rel_parent = os.path.relpath(parent, folder)
        for name in sorted(names):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                yield name if rel_parent == "." else f"{rel_parent}/{name}"


def read_class_list(path: str) -> list[str]:
    """--classes FILE: one class name per line, as classes.txt."""
    try:
        with open(path, encoding="utf-8") as f:
            names = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"--classes {path}: cannot read a class list ({e})") from None
    seen = {}
    for lineno, name in enumerate(names, start=1):
        if not name.strip():
            raise PrepareError(f"--classes {path}:{lineno}: expected a class name, got an empty line")
        if name in seen:
            raise PrepareError(f"--classes {path}:{lineno}: class {name!r} already named on line {seen[name]}")
        seen[name] = lineno
    return names


def class_folders(source: Source) -> list[str]:
    names = sorted(e.name for e in os.scandir(source.base) if e.is_dir() and not e.name.startswith("."))
    for name in names:
        reason = unlistable(name) or ("" if name.strip() else "its name is blank, which classes.txt cannot hold")
        if reason:
            raise PrepareError(f"{source}: class folder '{shown(name)}': {reason}; expected it renamed")
    if not names:
        raise PrepareError(f"{source}: expected one sub-folder per class, found none")
    loose = sum(1 for e in os.scandir(source.base) if e.is_file() and not e.name.startswith(".")
                and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if loose:
        say(f"{source}: left out {loose} images that lie in no class folder")
    return names


def read_csv_rows(source: Source):
    """(line, path, label) of a `path,label` CSV (UTF-8, a header naming both columns)."""
    try:
        with open(source.given, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or "path" not in header or "label" not in header:
                raise PrepareError(f"{source.given}:1: expected a header with 'path' and 'label' columns, "
                                   f"got {header}")
            path_col, label_col, width = header.index("path"), header.index("label"), len(header)
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != width:
                    raise PrepareError(f"{source.given}:{line}: expected {width} fields ({','.join(header)}), "
                                       f"got {row!r}")
                if not row[path_col] or not row[label_col].strip():
                    raise PrepareError(f"{source.given}:{line}: expected a path and a label, got {row!r}")
                yield line, row[path_col], row[label_col]
    except OSError as e:
        raise PrepareError(f"{source}: cannot read the CSV ({e.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise PrepareError(f"{source}: cannot read the CSV ({e})") from None


def csv_rel(source: Source, path: str, root: tuple[str, str]) -> str:
    """`path` of a CSV row as Source.rel: relative to the CSV's folder when inside it, else absolute
    (normalised either way, so '..' never reaches a name in ROOT)."""
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(source.base, path))
    if any(full == r or full.startswith(r + "/") for r in root):
        raise PrepareError(f"{source.given}: {shown(path)} lies inside --out {root[0]}, which a rebuild "
                           "deletes; expected images outside --out")
    return full[len(source.base_slash):] if full.startswith(source.base_slash) else full


class ClassIds:
    """Class names -> ids; a label names a class, or (names win) is an id into the class list."""

    def __init__(self, classes: list[str], origin: str):
        for name in classes:
            reason = unlistable(name) or ("" if name.strip() else "it is blank, which classes.txt cannot hold")
            if reason:
                raise PrepareError(f"{origin}: class '{shown(name)}': {reason}; expected it renamed")
        self.classes, self.origin = classes, origin
        self.ids = {name: c for c, name in enumerate(classes)}

    def of(self, label: str, where: str) -> int:
        if label in self.ids:
            return self.ids[label]
        try:
            value = int(label)
        except ValueError:
            raise PrepareError(f"{where}: class {label!r} is not a class of {self.origin} "
                               f"({_some_names(self.classes)})") from None
        if not 0 <= value < len(self.classes):
            raise PrepareError(f"{where}: label {value} is neither a class name nor a class id in "
                               f"[0, {len(self.classes)}) of {self.origin}")
        return value


def _some_names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def list_labeled(listing: Listing, source_id: int, ids: ClassIds | None, root: tuple[str, str]) -> ClassIds:
    """Adds a labeled source's images; returns the class ids (those given, or the labeled set's own)."""
    source = listing.sources[source_id]
    if source.is_csv:
        rows = list(read_csv_rows(source))
        if ids is None:   # the labeled CSV names the classes
            ids = ClassIds(sorted({label for _, _, label in rows}), f"the labeled set {source.given}")
        for line, path, label in rows:
            listing.add(source_id, csv_rel(source, path, root), ids.of(label, f"{source.given}:{line}"), line)
        return ids
    folders = class_folders(source)
    if ids is None:
        ids = ClassIds(folders, f"the labeled set {source.given}")
    for name in folders:
        if name not in ids.ids:
            raise PrepareError(f"{source}: class folder '{shown(name)}' is not a class of {ids.origin} "
                               f"({_some_names(ids.classes)})")
        for rel in walk_images(os.path.join(source.base, name)):
            listing.add(source_id, f"{name}/{rel}", ids.ids[name])
    return ids


def own_sources(args) -> list[Source]:
    """The inputs in order (labeled, val, test, then the unlabeled trees), each with its folder in ROOT."""
    sources = []
    for option, given, split in (("--labeled", args.labeled, "labeled"), ("--val", args.val, "val"),
                                 ("--test", args.test, "test")):
        if given is None:
            continue
        if not os.path.isdir(given) and not os.path.isfile(given):
            raise PrepareError(f"{option} {given}: no such folder or CSV file")
        sources.append(Source(option, given, split, f"images/{split}"))
    tags = set()
    for i, given in enumerate(args.unlabeled):
        if not os.path.isdir(given):
            raise PrepareError(f"--unlabeled {given}: no such folder (expected a folder of images, in any tree)")
        tag = os.path.basename(os.path.abspath(given)) or "root"
        tag = tag if not unlistable(tag) and not tag.startswith(".") else f"source{i + 1}"
        unique, n = tag, 1
        while unique in tags:
            n += 1
            unique = f"{tag}-{n}"
        tags.add(unique)
        sources.append(Source("--unlabeled", given, "unlabeled", f"images/unlabeled/{unique}"))
    for source in sources:
        refuse_nesting(source.given, args.out)
    return sources


def list_own(args, root: tuple[str, str]) -> tuple[Listing, list[str]]:
    """Every image of every source with its class id (-1: unlabeled); checks classes and labels."""
    listing = Listing()
    listing.sources = own_sources(args)
    ids = ClassIds(read_class_list(args.classes), f"--classes {args.classes}") if args.classes else None
    ids = list_labeled(listing, 0, ids, root)
    if not listing.rel:
        raise PrepareError(f"{listing.sources[0]}: the labeled set is empty; expected labeled images "
                           "(an ImageFolder tree <class>/<image> or a CSV path,label)")
    if len(ids.classes) < 2:
        raise PrepareError(f"{listing.sources[0]}: expected at least two classes, found "
                           f"{len(ids.classes)} ({_some_names(ids.classes)})")
    for source_id, source in enumerate(listing.sources[1:], start=1):
        before = len(listing.rel) + len(listing.misnamed)
        if source.split == "unlabeled":
            for rel in walk_images(source.base):
                listing.add(source_id, rel)
        elif source.is_csv:
            for line, path, label in read_csv_rows(source):
                listing.add(source_id, csv_rel(source, path, root), ids.of(label, f"{source.given}:{line}"), line)
        else:
            for name in class_folders(source):
                if name not in ids.ids:
                    raise PrepareError(f"{source}: class folder '{shown(name)}' is not a class of {ids.origin} "
                                       f"({_some_names(ids.classes)})")
                for rel in walk_images(os.path.join(source.base, name)):
                    listing.add(source_id, f"{name}/{rel}", ids.ids[name])
        if len(listing.rel) + len(listing.misnamed) == before:
            raise PrepareError(f"{source}: " + ("the CSV lists no image" if source.is_csv else
                               f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)}"
                               f"{' in its class folders' if source.split != 'unlabeled' else ''})"))
    listing.freeze()
    clashing_names(listing)
    return listing, ids.classes


def clashing_names(listing: Listing):
    """A CSV row outside its folder goes to <prefix>/_abs/<its absolute path>: raises should that name
    also be one of a row inside the folder (a sub-folder named _abs)."""
    for source_id, source in enumerate(listing.sources):
        if not source.is_csv:
            continue
        rows = np.flatnonzero(listing.source == source_id)
        outside = {listing.rel[i] for i in rows if listing.rel[i].startswith("/")}
        if not outside:
            continue
        for i in rows:
            rel = listing.rel[i]
            if rel.startswith("_abs/") and rel[4:] in outside:
                raise PrepareError(f"{listing.where(i)}: its name in --out would be that of {rel[4:]}, which "
                                   f"{source.given} also lists; expected a folder other than _abs")


def _identify(path):
    """(st_dev, st_ino, None) of the file `path` resolves to, or (0, 0, why it cannot be read)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0, 0, "file not found"
    except OSError as e:
        return 0, 0, f"cannot stat ({e.strerror})"
    return st.st_dev, st.st_ino, None




def refuse_repeats(listing: Listing, dev: np.ndarray, ino: np.ndarray, found: np.ndarray):
    """Raises when one file (same device and inode: symlinks, '..' and hard links resolved) is listed
    twice, within a split or across two."""
    rows = np.flatnonzero(found)
    order = rows[np.lexsort((ino[rows], dev[rows]))]   # stable: within one file, rows in listing order
    same = (dev[order[1:]] == dev[order[:-1]]) & (ino[order[1:]] == ino[order[:-1]])
    if not same.any():
        return
    pairs = np.stack([order[:-1][same], order[1:][same]], axis=1)
    first, again = pairs[np.argmin(pairs[:, 1])]
    count = int(same.sum())
    one, two = listing.split[first], listing.split[again]
    file, other = listing.src(again), listing.src(first)
    same_as = "" if file == other else f" (the same file as {shown(other)})"
    by = f"by {listing.origin(first)} and {listing.origin(again)}"
    if one == two:
        raise PrepareError(f"{shown(file)}{same_as} is listed twice, {by}: expected each image listed once "
                           f"({count} repeated)")
    raise PrepareError(f"{shown(file)}{same_as} is in two splits, {by}: expected each image in one split "
                       f"({count} repeated)")


def _place_chunk(job):
    link, pairs = job
    for source, target in pairs:
        if link:
            os.symlink(source, target)
        else:
            shutil.copyfile(source, target)
    return len(pairs)


def chunks(items: list, size: int):
    return (items[i:i + size] for i in range(0, len(items), size))


def draw_from_labeled(labels: np.ndarray, classes: list[str], takes: dict, seed: int) -> dict:
    """Row indices of `labels` per split: val/test per `takes` (per-class counts), drawn seeded per class;
    every class keeps at least one labeled image."""
    per_class = np.bincount(labels, minlength=len(classes))
    wanted = sum(takes.values())
    short = np.flatnonzero(per_class <= wanted)
    if len(short):
        c = short[0]
        request = " + ".join(f"{name} {n}" for name, n in takes.items())
        draw = f" after the {request} drawn from it" if takes else ""
        raise PrepareError(f"class {classes[c]!r} has {per_class[c]} readable labeled images: expected at least "
                           f"{wanted + 1}, one to train on{draw} ({len(short)} class(es) short)")
    drawn = draw_per_class(labels, classes, {name: np.full(len(classes), n) for name, n in takes.items()},
                           np.random.default_rng(seed), "readable labeled image")
    drawn["labeled"] = drawn.pop("unlabeled")
    return drawn


def write_csv_atomically(path: str, header: list[str], rows):
    with open(path + ".tmp", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def prepare_own(args) -> tuple[dict, dict] | None:
    root = os.path.abspath(args.out)
    for option, n in (("--val-per-class", args.val_per_class), ("--test-per-class", args.test_per_class)):
        if n is not None and n < 0:
            raise PrepareError(f"{option} {n}: expected at least 0")
    params = {"source": "own", "unlabeled": [os.path.abspath(d) for d in args.unlabeled],
              "labeled": os.path.abspath(args.labeled),
              "val": args.val and os.path.abspath(args.val), "test": args.test and os.path.abspath(args.test),
              "classes": args.classes and os.path.abspath(args.classes), "val_per_class": args.val_per_class,
              "test_per_class": args.test_per_class, "seed": args.seed, "placement": "link" if args.link else "copy",
              "on_bad_image": args.on_bad_image}
    start = time.perf_counter()
    listing, classes = list_own(args, (root, os.path.realpath(root)))
    n = len(listing.rel)
    say(f"listed {n} images from {len(listing.sources)} sources, {len(classes)} classes "
        f"({time.perf_counter() - start:.1f} s)")
    if already_prepared(args.out, params, args.force):
        return None
    importlib.import_module("data.datasets")   # torch, seconds: imported once, before the pool forks
    with multiprocessing.Pool(args.workers) as pool:
        start = time.perf_counter()
        dev, ino = np.zeros(n, np.uint64), np.zeros(n, np.uint64)
        reasons: list[str | None] = [None] * n
        for i, (d, i_node, reason) in enumerate(pool.imap(_identify, (listing.src(i) for i in range(n)),
                                                          chunksize=1024)):
            dev[i], ino[i], reasons[i] = d, i_node, reason
        found = np.array([r is None for r in reasons], bool)
        refuse_repeats(listing, dev, ino, found)
        del dev, ino
        say(f"found {int(found.sum())} of the {n} files, none listed twice ({time.perf_counter() - start:.1f} s)")
        start = time.perf_counter()
        todo = np.flatnonzero(found)
        for i, reason in zip(todo, pool.imap(_scan, (listing.src(i) for i in todo), chunksize=256)):
            reasons[i] = reason
        good = np.array([r is None for r in reasons], bool)
        bad = [(listing.src(i), reasons[i]) for i in np.flatnonzero(~good)]
        seconds = time.perf_counter() - start
        say(f"decoded {len(todo)} images with {args.workers} processes ({seconds:.1f} s, "
            f"{len(todo) / max(seconds, 1e-9):.0f} images/s)")
        if (bad or listing.misnamed) and args.on_bad_image == "error":
            path, reason = (listing.misnamed + bad)[0]
            raise PrepareError(f"{shown(path)}: {reason} ({len(bad) + len(listing.misnamed)} images cannot be "
                               "used; pass --on-bad-image skip to leave them out, listed in bad_images.txt)")
        del reasons

        labeled_rows = np.flatnonzero(good & (listing.split == SPLIT_CODES["labeled"]))
        if not len(labeled_rows):
            raise PrepareError(f"{listing.sources[0]}: the labeled set is empty: none of its images can be read")
        takes = {name: getattr(args, f"{name}_per_class") for name in ("val", "test")
                 if getattr(args, name) is None}
        drawn = draw_from_labeled(listing.label[labeled_rows], classes, takes, args.seed)
        splits = {name: np.sort(labeled_rows[rows]) for name, rows in drawn.items()}
        for name in ("val", "test", "unlabeled"):
            if name not in splits:
                splits[name] = np.flatnonzero(good & (listing.split == SPLIT_CODES[name]))

        start_fresh(args.out)
        listing_path = os.path.join(args.out, "bad_images.txt")
        say_skipped(listing.misnamed, "images whose names the dataset cannot hold", listing_path)
        say_skipped(bad, "unreadable images", listing_path)
        write_atomically(listing_path, "".join(f"{shown(f)}\t{reason}\n" for f, reason in listing.misnamed + bad))
        start = time.perf_counter()
        kept = good
        if args.link:   # a source folder: one link to it, ROOT/images/<...> -> the folder
            for source_id, source in enumerate(listing.sources):
                if not source.is_csv:
                    os.makedirs(os.path.dirname(os.path.join(args.out, source.prefix)), exist_ok=True)
                    os.symlink(source.base, os.path.join(args.out, source.prefix))
                    kept = kept & (listing.source != source_id)
        kept = np.flatnonzero(kept)   # files placed one by one: copies, or CSV rows' links
        for folder in sorted({os.path.dirname(listing.out(i)) for i in kept}):
            os.makedirs(os.path.join(args.out, folder), exist_ok=True)
        jobs = ((args.link, [(listing.src(i), os.path.join(args.out, listing.out(i))) for i in part])
                for part in chunks(kept, 512))
        placed = sum(pool.imap_unordered(_place_chunk, jobs))
    linked_folders = sum(not s.is_csv for s in listing.sources) if args.link else 0
    say(f"{'linked' if args.link else 'copied'} {placed} images"
        f"{f' and {linked_folders} folders' if linked_folders else ''} into {args.out}/images "
        f"({time.perf_counter() - start:.1f} s)")
    write_atomically(os.path.join(args.out, "classes.txt"), "".join(f"{name}\n" for name in classes))
    for name in ("labeled", "val", "test"):
        write_csv_atomically(os.path.join(args.out, f"{name}.csv"), ["path", "label"],
                             ((listing.out(i), int(listing.label[i])) for i in splits[name]))
    write_csv_atomically(os.path.join(args.out, "unlabeled.csv"), ["path"],
                         ([listing.out(i)] for i in splits["unlabeled"]))
    counts = {name: len(splits[name]) for name in ("labeled", "val", "test", "unlabeled")}
    return params, counts | {"bad_images": len(bad) + len(listing.misnamed)}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="prepare", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fashion = commands.add_parser("fashion-mnist", help="Fashion-MNIST from the dataset-fashion-mnist Debian package")
    fashion.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    fashion.add_argument("--labels-per-class", type=int, default=30)
    fashion.add_argument("--val-size", type=int, default=5000, help="validation images taken from train, stratified")
    fashion.add_argument("--limit", type=int, help=argparse.SUPPRESS)   # first N train/test images: for fast tests
    folder = commands.add_parser("folder", help="an ImageFolder-style tree SRC/<class>/<images>, all labeled, "
                                 "split here (a simulation: unlabeled.csv keeps the labels, hidden)")
    folder.add_argument("src")
    folder.add_argument("--labels-per-class", type=int, required=True)
    folder.add_argument("--val-per-class", type=int, required=True)
    folder.add_argument("--test-per-class", type=int, required=True)
    own = commands.add_parser("own", help="your own data: folders of unlabeled images, a labeled ImageFolder "
                              "tree or CSV, and val/test given or drawn from the labeled images")
    own.add_argument("--unlabeled", nargs="+", required=True, metavar="DIR",
                     help="folders of unlabeled images, in any tree of sub-folders")
    own.add_argument("--labeled", required=True, metavar="DIR|CSV",
                     help="a folder DIR/<class>/<images> or a CSV path,label (paths relative to the CSV's "
                     "folder or absolute; a label is a class name or a class id)")
    own.add_argument("--classes", metavar="FILE", help="the class names, one a line (classes.txt); default: "
                     "the labeled folder's class folders, or the labeled CSV's labels, sorted")
    for split in ("val", "test"):
        given = own.add_mutually_exclusive_group(required=True)
        given.add_argument(f"--{split}", metavar="DIR|CSV", help=f"the {split} images, as --labeled")
        given.add_argument(f"--{split}-per-class", type=int, metavar="N",
                           help=f"or draw the {split} split from the labeled images: N per class, seeded")
    own.add_argument("--on-bad-image", choices=("skip", "error"), default="skip",
                     help="an image that cannot be decoded: leave it out and list it in ROOT/bad_images.txt "
                     "(the default), or stop")
    for command in (folder, own):
        command.add_argument("--link", action="store_true", help="symlink the images (own: the source folders, "
                             "and a CSV's images) into ROOT/images instead of copying them, the default (the "
                             "sources must then stay in place)")
    for command in (fashion, folder, own):
        command.add_argument("--out", required=True, help="dataset root to create")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
        command.add_argument("--force", action="store_true", help="rebuild even if --out holds a dataset")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        if args.workers < 1:
            raise PrepareError(f"--workers {args.workers}: expected at least 1")
        modes = {"fashion-mnist": prepare_fashion_mnist, "folder": prepare_folder, "own": prepare_own}
        done = modes[args.command](args)
    except InputError as e:   # PrepareError, or one of data's own checks
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    if done is None:
        say(f"{args.out} already holds this dataset (same parameters in {MANIFEST}); nothing to do")
        return 0
    params, counts = done
    finish(args.out, params, counts)
    summary = " / ".join(f"{name} {n}" for name, n in counts.items())
    say(f"{summary} -> {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
