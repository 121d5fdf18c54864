"""Balanced pseudo-label selection: the top-P images of every class, from per-image top-K predictions.

Every (image, class, score) in an image's top-K is a candidate for that class; each class keeps its P
best-scoring candidates, so at most P·C pseudo-labels. An image kept by several classes counts as a
duplicate and stays once, under its highest-scoring class.

Ties are broken exactly and independently of chunking:
  - within a class, equal scores -> the lower image index ranks first;
  - for a duplicate image, equal scores -> the lower class id wins.

Selection streams: `TopPerClass.update` takes the top-K rows chunk by chunk and keeps only the current
top-P of every class, so memory is O(chunk·K + P·C), never O(N·C). Across ranks nothing is merged but
candidates: every rank keeps the top-P of its own rows (trainer.runtime.predict's per-rank top-K files, or
its block of a scorer's whole files) and rank 0 keeps the top-P of the world x C x P candidates it gathers
(`select_across_ranks`). The top-P of a union is the top-P of the parts' top-Ps under one total order, so
the selection is the one a single process makes over every row, ties included.

A selection becomes the pseudo-label CSV the fine-tune and FixMatch stages read; in simulations its
precision is measured against the hidden labels.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from data import atomic
from data.errors import InputError
from trainer import dist

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Selection:
    """The chosen pseudo-labels, ordered by image index."""

    indices: np.ndarray       # (M,) int64 image indices, ascending, each at most once
    labels: np.ndarray        # (M,) int64 pseudo-label of each image
    scores: np.ndarray        # (M,) float32 score of that label
    class_counts: np.ndarray  # (C,) int64 images kept per class (after removing duplicates)
    num_duplicates: int       # images that were among the top-P of more than one class
    num_dropped: int          # (image, class) selections removed because the image stayed elsewhere

    def summary(self) -> dict:
        return {"selected": int(len(self.indices)), "duplicates": self.num_duplicates,
                "dropped": self.num_dropped, "class_counts": self.class_counts.tolist()}


def _check_params(num_classes: int, p: int) -> None:
    if num_classes < 1:
        raise InputError(f"num_classes must be >= 1, got {num_classes}")
    if p <= 0:
        raise InputError(f"p (images per class) must be >= 1, got {p}")


class BadRowError(InputError):
    """A top-K row that cannot be used; `array` is "topk_class" or "topk_prob", `row` counts from 0."""

    def __init__(self, array: str, row: int, reason: str):
        super().__init__(f"{array} row {row}: {reason}")
        self.array, self.row, self.reason = array, row, reason


def _first_bad_row(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))[0])


def _sortable(score: np.ndarray) -> np.ndarray:
    """float32 -> uint32 whose unsigned order is the float order (sign flip / bit inversion)."""
    bits = score.view(np.uint32)
    return bits ^ np.where(bits >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))


def _unsortable(key: np.ndarray) -> np.ndarray:
    key = key.astype(np.uint32)
    return (key ^ np.where(key >> 31, np.uint32(0x80000000), np.uint32(0xFFFFFFFF))).view(np.float32)


def _sort_candidates(cls, score, idx, num_classes):
    """Sort candidates by (class, score descending, image index).

    numpy's SIMD sort of one packed uint64 key (class | inverted score | index) is faster than
    np.lexsort over three keys. Indices too large to pack with the class (>= 2^(32 - class bits): 4M
    images at 800 classes) but below 2^32 sort each class's segment by one key (_sort_within_classes),
    as fast; larger ones take np.lexsort, 6x slower. Kept over faiss's k-selection
    (float_minheap_array_t.addn, one heap per class), which needs the sparse top-K scattered into a dense
    class x image block and was slower for the whole selection (and faiss's Python API has no
    standalone GPU k-select). Timings: docs/results.md, selection.
    """
    class_bits = max(1, (num_classes - 1).bit_length())
    index_bits = 32 - class_bits
    largest = int(idx.max()) if len(idx) else 0
    if largest >= 1 << 32:
        order = np.lexsort((idx, -score, cls))
        return cls[order], score[order], idx[order]
    if index_bits <= 0 or largest >= (1 << index_bits):
        return _sort_within_classes(cls, score, idx, num_classes)
    key = cls.astype(np.uint64) << (32 + index_bits)
    key |= (~_sortable(score)).astype(np.uint64) << index_bits
    key |= idx.astype(np.uint64)
    key.sort()
    cls = (key >> (32 + index_bits)).astype(np.int32)
    score = _unsortable(~((key >> index_bits) & 0xFFFFFFFF))
    idx = (key & ((1 << index_bits) - 1)).astype(np.int64)
    return cls, score, idx


def _sort_within_classes(cls, score, idx, num_classes):
    """_sort_candidates for indices below 2^32: the candidates grouped by class (a radix sort where the
    ids fit 16 bits), then each class's segment sorted by one uint64 key (inverted score | index)."""
    order = np.argsort(cls.astype(np.int16) if num_classes <= 1 << 15 else cls, kind="stable")
    cls = cls[order]
    key = (~_sortable(score[order])).astype(np.uint64) << np.uint64(32)
    key |= idx[order].astype(np.uint64)
    bounds = np.searchsorted(cls, np.arange(num_classes + 1)).tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        key[start:end].sort()
    return cls, _unsortable(~(key >> np.uint64(32))), (key & np.uint64(0xFFFFFFFF)).astype(np.int64)


class TopPerClass:
    """Streaming top-P images per class over chunks of top-K predictions (see module docstring)."""

    def __init__(self, num_classes: int, p: int):
        _check_params(num_classes, p)
        self.num_classes, self.p = num_classes, p
        # kept candidates, sorted by (class, score desc, index), at most p per class
        self._cls = np.empty(0, np.int32)
        self._score = np.empty(0, np.float32)
        self._idx = np.empty(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._num_pending = 0
        # a candidate scoring below its class's threshold (the p-th kept score) can never enter
        self._threshold = np.full(num_classes, -np.inf, np.float32)

    def update(self, topk_class, topk_prob, first_index: int = 0) -> "TopPerClass":
        """Add rows of top-K predictions: row r is image first_index + r."""
        topk_class, topk_prob = np.asarray(topk_class), np.asarray(topk_prob)
        self._validate(topk_class, topk_prob)
        n, k = topk_class.shape
        if first_index < 0:
            raise InputError(f"first_index must be >= 0, got {first_index}")
        row_index = np.arange(first_index, first_index + n, dtype=np.int64)
        cls = topk_class.astype(np.int32, copy=False).ravel()
        score = topk_prob.astype(np.float32, copy=False).ravel() + np.float32(0)  # -0.0 -> +0.0
        passing = np.flatnonzero(score >= self._threshold[cls])
        self._add_pending(cls[passing], score[passing], row_index[passing // k])
        return self

    def add_kept(self, cls, score, idx) -> "TopPerClass":
        """Add the candidates another TopPerClass kept (its `kept()`: another rank's, of other images)."""
        passing = np.flatnonzero(score >= self._threshold[cls])
        self._add_pending(cls[passing], score[passing], idx[passing])
        return self

    def kept(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(class, score, image index) of every kept candidate, sorted by class, score desc, index."""
        self._compact()
        return self._cls, self._score, self._idx

    def result(self) -> Selection:
        """The selection, each duplicate image kept under its highest-scoring (then lowest) class."""
        cls, score, idx = self.kept()
        order = np.lexsort((cls, -score, idx))
        cls, score, idx = cls[order], score[order], idx[order]
        first = np.ones(len(idx), bool)
        first[1:] = idx[1:] != idx[:-1]
        group_sizes = np.diff(np.append(np.flatnonzero(first), len(idx)))
        labels = cls[first].astype(np.int64)
        return Selection(indices=idx[first], labels=labels, scores=score[first],
                         class_counts=np.bincount(labels, minlength=self.num_classes).astype(np.int64),
                         num_duplicates=int((group_sizes > 1).sum()), num_dropped=int((~first).sum()))

    def _validate(self, topk_class, topk_prob) -> None:
        if topk_class.ndim != 2 or topk_class.shape != topk_prob.shape:
            raise InputError(f"topk_class {topk_class.shape} and topk_prob {topk_prob.shape} must have the "
                             "same 2-D shape (images, K)")
        if not np.issubdtype(topk_class.dtype, np.integer):
            raise InputError(f"topk_class must hold integer class ids, got dtype {topk_class.dtype}")
        k = topk_class.shape[1]
        if k < 1:
            raise InputError("top-K arrays have no columns: K must be >= 1")
        if k > self.num_classes:
            raise InputError(f"K={k} predictions per image exceeds num_classes={self.num_classes}")
        if not len(topk_class):
            return
        bad = (topk_class < 0) | (topk_class >= self.num_classes)
        if bad.any():
            row = _first_bad_row(bad)
            raise BadRowError("topk_class", row, f"class ids {topk_class[row].tolist()} outside "
                              f"[0, {self.num_classes})")
        nan = np.isnan(topk_prob)
        if nan.any():
            raise BadRowError("topk_prob", _first_bad_row(nan), "contains NaN")
        sorted_cls = np.sort(topk_class, axis=1)
        repeated = sorted_cls[:, 1:] == sorted_cls[:, :-1]
        if repeated.any():
            row = _first_bad_row(repeated)
            raise BadRowError("topk_class", row, f"repeats a class: {topk_class[row].tolist()}")

    def _add_pending(self, cls, score, idx) -> None:
        self._pending.append((cls, score, idx))
        self._num_pending += len(cls)
        if self._num_pending > self.p * self.num_classes:
            self._compact()

    def _compact(self) -> None:
        if not self._pending:
            return
        cls, score, idx = (np.concatenate([kept] + [part[i] for part in self._pending])
                           for i, kept in enumerate((self._cls, self._score, self._idx)))
        self._pending, self._num_pending = [], 0
        cls, score, idx = _sort_candidates(cls, score, idx, self.num_classes)
        class_start = np.searchsorted(cls, np.arange(self.num_classes))
        keep = np.arange(len(cls)) - class_start[cls] < self.p
        self._cls, self._score, self._idx = cls[keep], score[keep], idx[keep]
        counts = np.bincount(self._cls, minlength=self.num_classes)
        full = counts == self.p
        self._threshold[full] = self._score[np.cumsum(counts)[full] - 1]


def _npy_header(path: PathLike) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a C-ordered .npy file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise InputError(f"{path}: unsupported .npy format version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if fortran_order or dtype.hasobject:
            raise InputError(f"{path}: expected a C-ordered numeric array, got fortran_order={fortran_order} "
                             f"dtype={dtype}")
        return shape, dtype, f.tell()


def npy_chunks(path: PathLike, chunk: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
    """Rows start..stop (all: None) of a .npy file, `chunk` rows at a time, read straight from the file.

    np.fromfile rather than np.load(mmap_mode="r"): pages of a memory map stay resident (and count in
    the process's RSS) until unmapped, so memory would grow to the whole file.
    """
    shape, dtype, offset = _npy_header(path)
    row_size = int(np.prod(shape[1:], dtype=np.int64))
    stop = shape[0] if stop is None else stop
    with open(path, "rb") as f:
        f.seek(offset + start * row_size * dtype.itemsize)
        for first in range(start, stop, chunk):
            rows = min(chunk, stop - first)
            block = np.fromfile(f, dtype=dtype, count=rows * row_size)
            if block.size != rows * row_size:
                raise InputError(f"{path}: file truncated at row {first}")
            yield block.reshape((rows,) + tuple(shape[1:]))


def _stream_rows(tracker: TopPerClass, class_path: PathLike, prob_path: PathLike, first_image: int = 0,
                 start: int = 0, stop: int | None = None, *, chunk: int) -> TopPerClass:
    """Rows start..stop (all: None) of .npy files of top-K class ids (N, K) and scores (N, K), file row r
    being image first_image + r, into `tracker`, `chunk` rows at a time."""
    shape = _npy_header(class_path)[0]
    paths = {"topk_class": class_path, "topk_prob": prob_path}
    if len(shape) != 2 or _npy_header(prob_path)[0] != shape:
        raise InputError(f"{class_path} {shape} and {prob_path} {_npy_header(prob_path)[0]} must have the "
                         "same 2-D shape (images, K)")
    stop = shape[0] if stop is None else stop
    for first, (classes, probs) in zip(range(start, stop, chunk), zip(npy_chunks(class_path, chunk, start, stop),
                                                                       npy_chunks(prob_path, chunk, start, stop))):
        try:
            tracker.update(classes, probs, first_image + first)
        except BadRowError as error:
            raise InputError(f"{paths[error.array]} row {first + error.row}: {error.reason}") from None
        except ValueError as error:
            raise InputError(f"{class_path} / {prob_path}: {error}") from None
    return tracker


def select_balanced_from_npy(class_path: PathLike, prob_path: PathLike, num_classes: int, p: int, *,
                             chunk: int = 32768) -> Selection:
    """Balanced selection streamed from .npy files of top-K class ids (N, K) and scores (N, K), row r
    being image r, `chunk` rows at a time: memory stays O(chunk·K + P·C)."""
    _check_params(num_classes, p)
    return _stream_rows(TopPerClass(num_classes, p), class_path, prob_path, chunk=chunk).result()


def select_across_ranks(parts, num_classes: int, p: int, *, chunk: int = 32768) -> Selection | None:
    """Balanced selection over every rank's `parts`, (class_path, prob_path, first_image, start, stop) each
    (trainer.runtime.predict.TopKRows: file rows start..stop, row r being image first_image + r): each rank
    streams its own parts into a TopPerClass, rank 0 gathers the C x P candidates of every rank and keeps
    their top-P per class. The same selection as select_balanced_from_npy over every row in one process,
    ties included (module docstring), on rank 0; None on the others. A bad row on any rank stops every rank
    with its line."""
    _check_params(num_classes, p)

    def own_candidates():
        tracker = TopPerClass(num_classes, p)
        for part in parts:
            _stream_rows(tracker, *part, chunk=chunk)
        return tracker.kept()

    gathered = dist.gathered_on_rank0(own_candidates)
    if gathered is None:
        return None
    merged = TopPerClass(num_classes, p)
    for candidates in gathered:
        merged.add_kept(*candidates)
    return merged.result()


def confidence_adapted(selection: Selection, num_classes: int) -> Selection:
    """Class-adaptive P: class c keeps its best round(n_c x m_c / max m) images, m_c being the mean score
    of its n_c selected ones. A fixed P takes as many images from a class the model is unsure of as
    from one it knows, so the unsure class's pseudo-labels reach deep into wrong ones; its lower mean
    confidence now buys it fewer. The most confident class keeps all of its own."""
    means = np.array([selection.scores[selection.labels == c].mean() if (selection.labels == c).any() else 0.0
                      for c in range(num_classes)])
    quota = np.round(selection.class_counts * means / max(means.max(), 1e-12)).astype(np.int64)
    order = np.lexsort((selection.indices, -selection.scores, selection.labels))   # by class, best first
    rank = np.empty(len(order), np.int64)
    starts = np.searchsorted(selection.labels[order], np.arange(num_classes))
    rank[order] = np.arange(len(order)) - starts[selection.labels[order]]
    keep = rank < quota[selection.labels]
    labels = selection.labels[keep]
    return Selection(indices=selection.indices[keep], labels=labels, scores=selection.scores[keep],
                     class_counts=np.bincount(labels, minlength=num_classes).astype(np.int64),
                     num_duplicates=selection.num_duplicates, num_dropped=selection.num_dropped + int((~keep).sum()))


@dataclass(frozen=True)
class ConfiguredP:
    """A P as the config gives it: `given` images per class, or with `fraction` that fraction of the
    unlabeled images per class; `key` names it (pseudo.schedule[0], pseudo.fixmatch_fraction)."""

    key: str
    given: float
    fraction: bool

    def images(self, unlabeled: int, num_classes: int) -> int:
        """Images per class: a count as given; a fraction of this dataset's unlabeled images per class,
        round(given x unlabeled / num_classes) and at least 1, so that one config suits datasets of any size."""
        return max(1, round(self.given * unlabeled / num_classes)) if self.fraction else int(self.given)

    def recorded(self):
        """As selection.json records it (p_given): a count as an int, a fraction as it was written."""
        return self.given if self.fraction else int(self.given)

    def describe(self, p: int, unlabeled: int, num_classes: int) -> str:
        """P=1700 (pseudo.schedule_fraction[0]=0.3108 of 5470 unlabeled images per class), or P=200 for a count."""
        return f"P={p}" + (f" ({self.key}={self.given} of {unlabeled / num_classes:g} unlabeled images per class)"
                           if self.fraction else "")


def configured_p(pseudo) -> tuple[list[ConfiguredP], ConfiguredP | None]:
    """(the P of each iteration, the FixMatch selection's or None) from a config's pseudo section, whichever
    key of each pair gives them: numbers of images (pseudo.schedule, pseudo.fixmatch_p) or fractions of the
    unlabeled images per class (pseudo.schedule_fraction, pseudo.fixmatch_fraction)."""
    fraction = bool(pseudo.schedule_fraction)
    key = "pseudo.schedule_fraction" if fraction else "pseudo.schedule"
    schedule = [ConfiguredP(f"{key}[{i}]", p, fraction)
                for i, p in enumerate(pseudo.schedule_fraction if fraction else pseudo.schedule)]
    if pseudo.fixmatch_fraction:
        return schedule, ConfiguredP("pseudo.fixmatch_fraction", pseudo.fixmatch_fraction, True)
    return schedule, ConfiguredP("pseudo.fixmatch_p", pseudo.fixmatch_p, False) if pseudo.fixmatch_p else None


def selection_precision(selection: Selection, hidden_labels: np.ndarray, num_classes: int) -> dict:
    """Simulations only: the share of pseudo-labels equal to the hidden label, over all of them and per
    class (None where nothing was chosen). The hidden labels measure the selection, never train."""
    correct = hidden_labels[selection.indices] == selection.labels
    per_class = [float(correct[selection.labels == c].mean()) if (selection.labels == c).any() else None
                 for c in range(num_classes)]
    return {"precision": float(correct.mean()) if len(correct) else None, "class_precision": per_class}


def write_pseudo_labels(path: str, selection: Selection, split) -> None:
    """The pseudo-label CSV (path,label,score; paths relative to the split's root) of the rows of `split`
    the selection chose."""
    with atomic.writing(path) as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "score"])
        for i, label, score in zip(selection.indices, selection.labels, selection.scores):
            writer.writerow([os.path.relpath(split.paths[i], split.root), int(label), f"{score:.6f}"])
