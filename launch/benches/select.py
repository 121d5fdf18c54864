"""Balanced pseudo-label selection: streaming top-P per class from top-K files vs a naive dense version.

The naive version holds the N x C probability matrix, fully argsorts every row for its top-K, then
sorts each class's candidates. Both must choose exactly the same pseudo-labels.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from trainer.runtime.memory import memory_kib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL = dict(n=512_000, c=800, k=10, p=500)
QUICK = dict(n=20_000, c=100, k=10, p=50)
ROW_BLOCK = 32768  # rows per block when building or argsorting the dense matrix (bounds temporaries)


def dense_probabilities(n: int, c: int, seed: int = 0) -> np.ndarray:
    """Softmax of random logits, (n, c) float32: what a model over the unlabeled set would output."""
    rng = np.random.default_rng(seed)
    probs = np.empty((n, c), np.float32)
    for start in range(0, n, ROW_BLOCK):
        block = probs[start:start + ROW_BLOCK]
        block[:] = rng.standard_normal(block.shape, dtype=np.float32) * 2.5
        block -= block.max(axis=1, keepdims=True)
        np.exp(block, out=block)
        block /= block.sum(axis=1, keepdims=True)
    return probs


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-K classes per row (ties -> lower class id, like a stable argsort), by partition."""
    classes = np.empty((len(probs), k), np.int32)
    for start in range(0, len(probs), ROW_BLOCK):
        block = probs[start:start + ROW_BLOCK]
        part = np.sort(np.argpartition(-block, k - 1, axis=1)[:, :k], axis=1)
        kth = np.take_along_axis(block, part, axis=1).min(axis=1, keepdims=True)
        boundary_tie = (block >= kth).sum(axis=1) > k
        part[boundary_tie] = np.argsort(-block[boundary_tie], axis=1, kind="stable")[:, :k]
        classes[start:start + ROW_BLOCK] = part
    return classes, np.take_along_axis(probs, classes, axis=1)


def naive_select(probs: np.ndarray, k: int, p: int):
    """Full argsort of every row, then a per-class sort; duplicates stay under their best class."""
    n, c = probs.shape
    topk = np.empty((n, k), np.int64)
    for start in range(0, n, ROW_BLOCK):
        topk[start:start + ROW_BLOCK] = np.argsort(-probs[start:start + ROW_BLOCK], axis=1, kind="stable")[:, :k]
    score = np.take_along_axis(probs, topk, axis=1).ravel()
    cls = topk.ravel()
    image = np.repeat(np.arange(n), k)
    chosen = []
    for class_id in range(c):
        members = np.flatnonzero(cls == class_id)
        chosen.append(members[np.lexsort((image[members], -score[members]))[:p]])
    chosen = np.concatenate(chosen)
    order = np.lexsort((cls[chosen], -score[chosen], image[chosen]))
    chosen = chosen[order]
    first = np.r_[True, image[chosen][1:] != image[chosen][:-1]]
    return image[chosen][first], cls[chosen][first]


def stream_in_child(argv: list[str]) -> None:
    """Run the streaming selection in this (fresh) process; print seconds, RSS before and peak RSS."""
    from trainer.algorithms.balanced_selection import select_balanced_from_npy

    class_path, prob_path, c, p, out = argv
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS: imports may have peaked higher
    before = memory_kib()["VmRSS"]
    start = time.perf_counter()
    selection = select_balanced_from_npy(class_path, prob_path, int(c), int(p))
    seconds = time.perf_counter() - start
    peak = memory_kib()["VmHWM"]
    np.savez(out, indices=selection.indices, labels=selection.labels)
    print(json.dumps({"seconds": seconds, "rss_before_kib": before, "rss_peak_kib": peak,
                      "duplicates": selection.num_duplicates}))


def stream_from_disk(class_path: str, prob_path: str, c: int, p: int, out: str) -> dict:
    """stream_in_child in a fresh Python process, so its memory figures are its own."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from launch.benches.select import stream_in_child; "
         "stream_in_child(sys.argv[1:])", class_path, prob_path, str(c), str(p), out],
        env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    figures["rss_increase_mb"] = (figures["rss_peak_kib"] - figures["rss_before_kib"]) / 1024
    return figures


def run(args) -> dict:
    size = QUICK if args.quick else FULL
    n, c, k, p = size["n"], size["c"], size["k"], size["p"]
    probs = dense_probabilities(n, c)
    topk_class, topk_prob = top_k(probs, k)
    with tempfile.TemporaryDirectory(prefix="semiscale-bench-select-") as tmp:
        paths = {name: os.path.join(tmp, f"{name}.npy") for name in ("class", "prob", "class_q", "prob_q")}
        np.save(paths["class"], topk_class)
        np.save(paths["prob"], topk_prob)
        # a quarter of the images: the streaming memory should not depend on N
        np.save(paths["class_q"], topk_class[:n // 4])
        np.save(paths["prob_q"], topk_prob[:n // 4])
        del topk_class, topk_prob
        out = os.path.join(tmp, "selection.npz")
        quarter = stream_from_disk(paths["class_q"], paths["prob_q"], c, p, out)
        streamed = stream_from_disk(paths["class"], paths["prob"], c, p, out)
        with np.load(out) as chosen:
            stream_indices, stream_labels = chosen["indices"], chosen["labels"]

    start = time.perf_counter()
    naive_indices, naive_labels = naive_select(probs, k, p)
    naive_seconds = time.perf_counter() - start
    identical = np.array_equal(stream_indices, naive_indices) and np.array_equal(stream_labels, naive_labels)
    assert identical, "streaming and naive selections differ"

    speedup = naive_seconds / streamed["seconds"]
    return {
        "images": float(n), "classes": float(c), "k": float(k), "p": float(p),
        "selected": float(len(stream_indices)), "duplicates": float(streamed["duplicates"]),
        "naive_s": naive_seconds, "stream_s": streamed["seconds"], "speedup": speedup,
        "stream_peak_rss_increase_mb": streamed["rss_increase_mb"],
        "stream_peak_rss_increase_quarter_n_mb": quarter["rss_increase_mb"],
        "n_x_k_mb": n * k / 2**20,
        "topk_files_mb": n * k * 8 / 2**20,
        "dense_n_x_c_mb": n * c * 4 / 2**20,
        "identical": float(identical),
        "target_speedup_10x_met": float(speedup >= 10),
        "target_stream_3s_met": float(streamed["seconds"] <= 3.0),
    }
