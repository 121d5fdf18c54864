"""Copies of one image under two names in two splits, as check_dataset looks for them: a val or test
image that training also sees (or that the other scored split holds) inflates the score.

`prepare own` and `prepare folder` compare the decoded pixels of every image as they decode it,
`prepare fashion-mnist` the pixels of its IDX arrays (data.prepare.same_pictures), and record in
ROOT/prepare.json the digest of each split CSV they wrote; while a CSV is unchanged its rows are not
looked at again. Otherwise (a dataset made by hand, a CSV edited since, or a fashion-mnist dataset that
kept a copy of a val or test picture) the files are compared by their bytes, which needs no
decoding: every file's size first (one stat), and only the files whose size a val or test file shares
are read and hashed. A re-encoded copy (the same pixels in other bytes) is found by prepare only."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

MANIFEST = "prepare.json"   # written last by launch/prepare.py (data.prepare.dataset_folder.finish)
CHECKED = "content_checked"   # its key: {CSV name: digest} of the CSVs whose images prepare compared
CSVS = ("labeled.csv", "val.csv", "test.csv", "unlabeled.csv")
SCORED = ("val", "test")


def file_digest(path: str, algorithm: str = "sha256") -> bytes:
    """The digest of a file's bytes, read in 1 MiB blocks (hashlib.file_digest is Python 3.11+; 3.10 is
    supported)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


def csv_digests(root: str) -> dict[str, str]:
    """What prepare records as checked: the digest of each split CSV of ROOT."""
    return {name: file_digest(os.path.join(root, name)).hex() for name in CSVS}


def checked_csvs(root: str) -> set[str]:
    """The split CSVs of ROOT whose images prepare compared, unchanged since."""
    try:
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            recorded = json.load(f).get(CHECKED) or {}
        return {name for name in CSVS if name in recorded and file_digest(os.path.join(root, name)).hex()
                == recorded[name]}
    except (OSError, ValueError, AttributeError):   # no record, or not one prepare wrote: nothing is checked
        return set()


def _sizes(paths: list[str]) -> np.ndarray:
    """Each file's size; -1 where it cannot be read (check_dataset and on_bad_image speak of those)."""
    sizes = np.full(len(paths), -1, np.int64)
    for i, path in enumerate(paths):
        try:
            sizes[i] = os.stat(path).st_size
        except OSError:
            pass
    return sizes


def byte_copies(splits: dict[str, list[str]]) -> dict[tuple[str, str], tuple[int, str, str]]:
    """{(scored split, other split): (how many files of the scored split have a byte-identical copy in
    the other, the first such file, its copy)} over `splits` (name -> paths, none listed twice): each
    scored split (SCORED) against every other split, val against test once."""
    names = list(splits)
    paths = [p for name in names for p in splits[name]]
    owner = np.repeat(np.arange(len(names)), [len(splits[name]) for name in names])
    scored = np.isin(owner, [i for i, name in enumerate(names) if name in SCORED])
    sizes = _sizes(paths)
    unique, counts = np.unique(sizes[sizes >= 0], return_counts=True)
    shared = np.intersect1d(unique[counts > 1], sizes[scored])   # a size met twice, once in a scored split
    groups: dict[bytes, list[int]] = {}
    for row in np.flatnonzero(np.isin(sizes, shared)):   # only these files are read
        try:
            groups.setdefault(file_digest(paths[row]), []).append(int(row))
        except OSError:
            continue
    found: dict[tuple[str, str], list] = {}
    for group in (g for g in groups.values() if len(g) > 1):
        for one in (row for row in group if scored[row]):
            copies = {}   # other split -> its first copy: val's copies in test counted as val's, not again
            for other in group:
                if owner[other] != owner[one] and not (scored[other] and owner[other] < owner[one]):
                    copies.setdefault(owner[other], other)
            for split, other in copies.items():
                entry = found.setdefault((names[owner[one]], names[split]), [0, paths[one], paths[other]])
                entry[0] += 1
    return {pair: tuple(entry) for pair, entry in found.items()}
