"""Growth with N: seconds and peak memory of the pseudo-label selection on generated predictions of the
paper's shape (C = 800 classes, K = 10 per image), with 1 and 2 ranks.

The top-K files are written as trainer.runtime.predict leaves them after 2 ranks predicted (a file per rank
and shards.json). Two P: 500 images per class whatever N (memory should then stay flat in N), and N / 1024,
a fixed fraction as pseudo.schedule_fraction gives it (500 at 512k: the candidates rank 0 gathers grow with
N). balanced_selection.select_across_ranks reads them on 1 rank (both files) and on 2 gloo ranks under
torchrun (one file each, rank 0 merging the candidates); each run is a fresh process, so its peak resident
memory is its own, counted from just before the selection. 1 and 2 ranks must choose the same pseudo-labels.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from launch.benches.select import memory_kib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL = (500_000, 2_000_000, 8_000_000)   # the largest N whose runs keep the suite within 3 minutes on 2 cores
QUICK = (50_000, 200_000)
CLASSES, TOP_K = 800, 10
P = {"p500": lambda n: 500, "pn1024": lambda n: max(1, n // 1024)}   # images per class at N images
WRITERS = 2   # the ranks that "predicted": the files the selection reads
ROW_BLOCK = 1 << 20   # rows generated at a time


def generate_predictions(folder: str, rows: int, seed: int = 0) -> None:
    """Top-K class ids and probabilities of `rows` images in predict's per-rank layout: K distinct classes per
    row (a random first class, then steps that stay within C), probabilities descending and summing below 1."""
    from data.sampler import eval_block
    from trainer.runtime.predict import TOP_K_FILES, rank_file, record_shards
    rng = np.random.default_rng(seed)
    blocks = [eval_block(rows, rank, WRITERS) for rank in range(WRITERS)]
    for rank, (first, end) in enumerate(blocks):
        classes, probs = (np.lib.format.open_memmap(rank_file(os.path.join(folder, name), rank), "w+", dtype,
                                                    (end - first, TOP_K))
                          for name, dtype in zip(TOP_K_FILES, (np.int32, np.float32)))
        for start in range(0, end - first, ROW_BLOCK):
            n = min(ROW_BLOCK, end - first - start)
            steps = rng.integers(1, CLASSES // TOP_K, size=(n, TOP_K), dtype=np.int32)
            steps[:, 0] = rng.integers(0, CLASSES, size=n, dtype=np.int32)
            classes[start:start + n] = np.cumsum(steps, axis=1) % CLASSES
            scores = -np.sort(-rng.random((n, TOP_K), dtype=np.float32), axis=1)
            probs[start:start + n] = scores / (scores.sum(axis=1, keepdims=True) + 1)
        classes.flush()
        probs.flush()
        del classes, probs
    record_shards(folder, rows, TOP_K, blocks)


def select_in_child(argv: list[str]) -> None:
    """One rank's selection (a plain process: rank 0 of 1; under torchrun: its rank); rank 0 prints every
    rank's seconds and peak memory, and a digest of the selection."""
    from trainer import dist
    from trainer.algorithms.balanced_selection import select_across_ranks
    from trainer.runtime.predict import top_k_share
    folder, p = argv[0], int(argv[1])
    rt = dist.init("cpu")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")   # peak := now: imports and the group's start are not the selection's
    before = memory_kib()["VmRSS"]
    dist.barrier()
    start = time.perf_counter()
    selection = select_across_ranks(top_k_share(folder, rt.rank, rt.world), CLASSES, p)
    seconds = time.perf_counter() - start
    ranks = dist.gather_object({"seconds": seconds, "rss_increase_mb": (memory_kib()["VmHWM"] - before) / 1024})
    if rt.is_main:
        digest = hashlib.sha1(selection.indices.tobytes() + selection.labels.tobytes()).hexdigest()
        print(json.dumps({"ranks": ranks, "selected": len(selection.indices), "digest": digest}))
    dist.shutdown()


def select(folder: str, p: int, world: int) -> dict:
    """select_in_child on `world` ranks (torchrun for more than one) in fresh processes."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m"]
                if world > 1 else [sys.executable, "-m"])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    child = subprocess.run(launcher + ["launch.benches.scale", folder, str(p)], env=env, cwd=ROOT,
                           capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"selection on {world} rank(s) failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def slope(sizes, values) -> float:
    """The fitted exponent b of value ~ a N^b (least squares in log-log)."""
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def run(args) -> dict:
    sizes = QUICK if args.quick else FULL
    figures = {"classes": float(CLASSES), "top_k": float(TOP_K)}
    seconds = {(rule, world): [] for rule in P for world in (1, 2)}
    for n in sizes:
        label = f"{n / 1e6:g}M"
        figures[f"{label}_read_mb"] = n * TOP_K * 8 / 2**20
        with tempfile.TemporaryDirectory(prefix="semiscale-bench-scale-") as folder:
            generate_predictions(folder, n)
            for rule, images in P.items():
                p = images(n)
                runs = {world: select(folder, p, world) for world in (1, 2)}
                if runs[1]["digest"] != runs[2]["digest"]:
                    raise AssertionError(f"N={n}, P={p}: 1 and 2 ranks selected differently")
                key = f"{label}_{rule}"
                figures[f"{key}_selected"] = float(runs[1]["selected"])
                figures[f"{key}_gathered_at_most_mb"] = 2 * CLASSES * p * 16 / 2**20   # 2 ranks x C x P x 16 bytes
                for world, result in runs.items():
                    seconds[rule, world].append(max(r["seconds"] for r in result["ranks"]))
                    figures[f"{key}_{world}rank_s"] = seconds[rule, world][-1]
                    figures[f"{key}_{world}rank_peak_rss_mb"] = max(r["rss_increase_mb"] for r in result["ranks"])
                figures[f"{key}_2rank_speedup"] = seconds[rule, 1][-1] / seconds[rule, 2][-1]
    for (rule, world), times in seconds.items():
        figures[f"time_slope_{rule}_{world}rank"] = slope(sizes, times)
    figures["identical_1_and_2_ranks"] = 1.0
    return figures


if __name__ == "__main__":
    select_in_child(sys.argv[1:])
