"""One file listed twice, found by device and inode (symlinks, '..' and hard links resolved): within a
split it would weigh double, across two it would leak one split into another. (Two files holding one
picture, a copy or a re-encoding, are data.prepare.same_pictures' business.)"""
from __future__ import annotations

import os

import numpy as np

from data.prepare_messages import PrepareError, shown


def file_identity(path: str):
    """A pool worker: (st_dev, st_ino, None) of the file `path` resolves to, or (0, 0, why it cannot be read)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0, 0, "file not found"
    except OSError as e:
        return 0, 0, f"cannot stat ({e.strerror})"
    return st.st_dev, st.st_ino, None


def find_listed(pool, listing) -> list[str | None]:
    """Stats every row of `listing` in `pool` and raises should two rows be one file; returns per row
    why its file cannot be read, None when it can."""
    n = len(listing.rel)
    dev, ino = np.zeros(n, np.uint64), np.zeros(n, np.uint64)
    reasons: list[str | None] = [None] * n
    for i, (d, i_node, reason) in enumerate(pool.imap(file_identity, (listing.src(i) for i in range(n)),
                                                      chunksize=1024)):
        dev[i], ino[i], reasons[i] = d, i_node, reason
    refuse_repeats(listing, dev, ino, np.array([r is None for r in reasons], bool))
    return reasons


def refuse_repeats(listing, dev: np.ndarray, ino: np.ndarray, found: np.ndarray):
    """Raises when one file (same device and inode: symlinks, '..' and hard links resolved) is listed
    twice, within a split or across two; `found` marks the rows whose file exists."""
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
