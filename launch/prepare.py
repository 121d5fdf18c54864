"""Builds a semiscale dataset (classes.txt, labeled/val/test/unlabeled.csv, images/) from a source.

    python launch/prepare.py fashion-mnist --out ROOT [--labels-per-class 30 --val-size 5000 --seed 0]
    python launch/prepare.py folder SRC --out ROOT --labels-per-class N --val-per-class M --test-per-class T [--link]

Splits are class-balanced and seeded; unlabeled.csv keeps the true label as a hidden column for
simulations. Folder images are copied into ROOT/images, or symlinked there with --link. A finished
dataset records its parameters in ROOT/prepare.json (written last), so re-running with the same
parameters is a no-op and an interrupted run is redone from scratch.
A rebuild (--force, or after an interrupted run) removes only the OUTPUTS below, and the source and
--out must not lie inside one another. Folder images that cannot be read, or whose names the dataset's
files cannot hold (a line break: DALI's file lists are one path per line; not UTF-8: the CSVs are),
are skipped and listed with the reason in ROOT/bad_images.txt.
Bad input ends with one line `prepare: error: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import gzip
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

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MANIFEST, INCOMPLETE = "prepare.json", ".prepare-incomplete"
OUTPUTS = ("images", "classes.txt", "labeled.csv", "val.csv", "test.csv", "unlabeled.csv", "bad_images.txt", MANIFEST)


class PrepareError(Exception):
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
    import data.datasets  # noqa: F401
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


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="prepare", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fashion = commands.add_parser("fashion-mnist", help="Fashion-MNIST from the dataset-fashion-mnist Debian package")
    fashion.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    fashion.add_argument("--labels-per-class", type=int, default=30)
    fashion.add_argument("--val-size", type=int, default=5000, help="validation images taken from train, stratified")
    fashion.add_argument("--limit", type=int, help=argparse.SUPPRESS)   # first N train/test images: for fast tests
    folder = commands.add_parser("folder", help="an ImageFolder-style tree SRC/<class>/<images>")
    folder.add_argument("src")
    folder.add_argument("--labels-per-class", type=int, required=True)
    folder.add_argument("--val-per-class", type=int, required=True)
    folder.add_argument("--test-per-class", type=int, required=True)
    folder.add_argument("--link", action="store_true", help="symlink the images into ROOT/images instead of "
                        "copying them, the default (SRC must then stay in place)")
    for command in (fashion, folder):
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
        done = prepare_fashion_mnist(args) if args.command == "fashion-mnist" else prepare_folder(args)
    except PrepareError as e:
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
