"""Writing a prepared dataset's files: classes.txt, the split CSVs, bad_images.txt (each atomically:
data.atomic), and the images, copied or symlinked into ROOT/images by pool workers
(the modes that place images choose with the --link option defined here)."""
from __future__ import annotations

import csv
import io
import itertools
import os
import shutil

import numpy as np

from data import atomic
from data.prepare_messages import say_skipped, shown


def write_csv_atomically(path: str, header: list[str], rows):
    with atomic.writing(path) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def csv_text(paths, labels=None) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label"] if labels is not None else ["path"])
    writer.writerows(zip(paths, labels) if labels is not None else ([p] for p in paths))
    return out.getvalue()


def write_classes(root: str, classes: list[str]):
    atomic.write_text(os.path.join(root, "classes.txt"), "".join(f"{name}\n" for name in classes))


def write_dataset(root: str, classes: list[str], paths: np.ndarray, labels: np.ndarray, splits: dict, test: tuple):
    """classes.txt and the four CSVs; `splits` maps labeled/val/unlabeled to row indices, `test` = (paths, labels)."""
    write_classes(root, classes)
    for name, text in dataset_csvs(paths, labels, splits, test).items():
        atomic.write_text(os.path.join(root, name), text)


def dataset_csvs(paths: np.ndarray, labels: np.ndarray, splits: dict, test: tuple) -> dict[str, str]:
    """{CSV name: its text} as write_dataset writes them."""
    texts = {f"{name}.csv": csv_text(paths[np.sort(rows)], labels[np.sort(rows)]) for name, rows in splits.items()}
    return texts | {"test.csv": csv_text(*test)}


def write_listed_dataset(root: str, classes: list[str], listing, splits: dict):
    """classes.txt and the four CSVs of `listing`'s rows (its `out(i)` and `label`), streamed: `splits`
    maps labeled/val/test/unlabeled to row indices; unlabeled.csv has no label column."""
    write_classes(root, classes)
    for name in ("labeled", "val", "test"):
        write_csv_atomically(os.path.join(root, f"{name}.csv"), ["path", "label"],
                             ((listing.out(i), int(listing.label[i])) for i in splits[name]))
    write_csv_atomically(os.path.join(root, "unlabeled.csv"), ["path"],
                         ([listing.out(i)] for i in splits["unlabeled"]))


def write_bad_images(root: str, misnamed: list[tuple[str, str]], bad: list[tuple[str, str]],
                     skipped: list[tuple[str, str]]) -> int:
    """ROOT/bad_images.txt: one `file<TAB>reason` line per image left out (names the dataset cannot
    hold, unreadable images, then what the walks of the source folders did not take: hidden files
    and folders, symlinked folders, images in no class folder), each kind also said; returns how many."""
    listing = os.path.join(root, "bad_images.txt")
    say_skipped(misnamed, "images whose names the dataset cannot hold", listing)
    say_skipped(bad, "unreadable images", listing)
    say_skipped(skipped, "files and folders not searched or not taken (hidden, symlinked folders, in no class "
                "folder)", listing)
    atomic.write_text(listing, "".join(f"{shown(f)}\t{reason}\n" for f, reason in misnamed + bad + skipped))
    return len(misnamed) + len(bad) + len(skipped)


def make_folders(root: str, names):
    """Creates ROOT/<folder> for the folder of each file name in `names` (relative to ROOT)."""
    for folder in sorted({os.path.dirname(name) for name in names}):
        os.makedirs(os.path.join(root, folder), exist_ok=True)


def link_folders(root: str, links):
    """One symlink per (folder, name relative to ROOT): ROOT/<name> -> folder."""
    for folder, name in links:
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        os.symlink(folder, os.path.join(root, name))


def _place_chunk(job) -> int:
    """A pool worker: copies (or with `link`, symlinks) each (source, target) pair; returns how many."""
    link, pairs = job
    for source, target in pairs:
        if link:
            os.symlink(source, target)
        else:
            shutil.copyfile(source, target)
    return len(pairs)


def place_images(pool, link: bool, pairs, chunk: int = 512) -> int:
    """Copies (or symlinks) each (source, target) of the iterable `pairs` in `pool`, `chunk` at a time
    (only the chunks in flight are held in memory); returns how many files were placed."""
    pairs = iter(pairs)
    jobs = iter(lambda: (link, list(itertools.islice(pairs, chunk))), (link, []))
    return sum(pool.imap_unordered(_place_chunk, jobs))


def add_link_option(parser):
    """--link, for the modes that place images (folder, own): symlinks instead of copies."""
    parser.add_argument("--link", action="store_true", help="symlink the images (own: the source folders, "
                        "and a CSV's images) into ROOT/images instead of copying them, the default (the "
                        "sources must then stay in place)")
