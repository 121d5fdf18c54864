"""One picture under two names (a copy, or the same pixels in another encoding), found by the digest
of its decoded pixels that the decode check leaves (data.prepare.decode_check): no second read or
decode, and one sort of 16-byte digests.

Each picture is kept once: in the first of labeled, val, test and unlabeled that holds it, there as
its first listed copy. Every other copy is left out and listed in ROOT/duplicates.txt with the copy
kept, so a val or test picture is never trained on and a labeled one never weighs double; copies
within the unlabeled pool all stay (the pipeline labels every file of the pile). A picture with two
different labels is refused: which label is right is the user's call. `prepare fashion-mnist` finds
its copies so too but keeps them, listed (data.prepare.from_fashion_mnist says why)."""
from __future__ import annotations

import os

import numpy as np

from data import atomic
from data.prepare.dataset_folder import DUPLICATES
from data.prepare.own_sources import SPLIT_CODES
from data.prepare_messages import PrepareError, say_skipped, shown

UNLABELED = SPLIT_CODES["unlabeled"]


def find_copies(digests: np.ndarray, good: np.ndarray, split: np.ndarray, label: np.ndarray, name,
                classes: list[str], one_label: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(rows left out, the row kept for each) among the `good` rows: `digests` holds decode_check's
    digests (a "V16" column), `split` codes in the order labeled, val, test, unlabeled, `label` class ids
    (-1: none); raises for a picture with two labels, naming both files by `name(row)` (with `one_label`
    False: returns it as any other copy)."""
    rows = np.flatnonzero(good)
    order = rows[np.lexsort((rows, split[rows], digests[rows]))]   # per picture: the kept copy first
    new = np.r_[True, digests[order[1:]] != digests[order[:-1]]]
    kept = order[np.flatnonzero(new)][np.cumsum(new) - 1]
    copy, kept = order[~new], kept[~new]
    relabeled = (label[copy] != label[kept]) & (split[copy] != UNLABELED)
    if one_label and relabeled.any():
        one, other = copy[relabeled][0], kept[relabeled][0]
        raise PrepareError(f"{name(one)} is the same picture as {name(other)}, labeled "
                           f"{classes[label[other]]!r} there and {classes[label[one]]!r} here: expected one "
                           f"label per picture; remove or relabel one copy ({int(relabeled.sum())} such pictures)")
    pooled = (split[copy] == UNLABELED) & (split[kept] == UNLABELED)
    return copy[~pooled], kept[~pooled]


def write_duplicates(root: str, copy: np.ndarray, kept: np.ndarray, split: np.ndarray, split_names, name,
                     stay: str = "") -> int:
    """ROOT/duplicates.txt: `copy<TAB>copy kept<TAB>why` a line (files by `name(row)`), said in one line;
    returns how many. `stay`: why the copies were not left out (fashion-mnist), said in place of
    "left out"."""
    entries = [(name(c), name(k), (f"kept in {split_names[split[c]]} ({stay})" if stay else
                                   f"left out of {split_names[split[c]]}") + ": the same picture is "
                + ("listed before it" if split[c] == split[k] else f"in {split_names[split[k]]}"))
               for c, k in zip(copy, kept)]
    listing = os.path.join(root, DUPLICATES)
    if stay:
        say_skipped([(c, why) for c, _, why in entries], "copies of a picture in another split or listed before "
                    f"(each with its first copy; {stay})", listing, "kept")
    else:
        say_skipped([(c, why) for c, _, why in entries], "copies of a picture kept in another split or listed "
                    "before (each with the copy kept)", listing)
    atomic.write_text(listing, "".join(f"{shown(c)}\t{shown(k)}\t{why}\n" for c, k, why in entries))
    return len(entries)
