"""Growth with N: seconds and peak memory of the pseudo-label selection, label propagation and active
learning's query choice on generated files of the paper's shapes (C = 800 classes, K = 10 per image,
embeddings d = 128 and 2048), with 1 and 2 ranks, one CPU core a rank; the time and memory slopes fitted in
log-log, and with --plots DIR a PNG of both against N (DIR/scale.png).

The top-K files are written as trainer.runtime.predict leaves them after 2 ranks predicted (a file per rank
and shards.json). Two P: 500 images per class whatever N (memory should then stay flat in N), and N / 1024,
a fixed fraction as pseudo.schedule_fraction gives it (500 at 512k: the candidates rank 0 gathers grow with
N). balanced_selection.select_across_ranks reads them on 1 rank (both files) and on 2 gloo ranks under
torchrun (one file each, rank 0 merging the candidates); each run is a fresh process, so its peak resident
memory is its own, counted from just before the selection. 1 and 2 ranks must choose the same pseudo-labels.

Label propagation (trainer.algorithms.label_propagation.propagate, k = 20) on generated embeddings as
write_predictions leaves them (unit float16 rows of d, around one centre a class, 2 labeled images a
class), on 1 rank and on 2 (each searching half the images, rank 0 solving): seconds of the whole call on
rank 0 and, with 2 ranks, of rank 1's (the search: rank 1 waits for rank 0's share of it, then stops),
peak memory (the larger rank's), and how far 2 ranks' top-K scores are from 1 rank's. The exact kNN search
costs N^2 d and the solve N C per step, so its N stop far below the selection's.

Active learning's query choice (trainer.algorithms.active_learning.select_queries) on generated files as
embed_and_classify leaves them (unit float32 embeddings of d, around 1024 centres; top-2 probabilities
and classes), in the paper's settings (configs/paper/active.yaml: 256 clusters, k-means on 256 x 256 of the
embeddings, a budget of 0.25% of N): on 1 rank and on 2 (each assigning and ranking its own half, rank 0
fitting and merging), the seconds of the fit (rank 0's: gathering the sample and Lloyd's iterations), of
the assignment and of the choice, and peak memory, which should stay flat in N beyond the chunk
(active_learning.CHUNK_ROWS). 1 and 2 ranks must choose the same queries.
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

from trainer.runtime.memory import measured_from_here, memory_kib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL = (500_000, 2_000_000, 8_000_000, 32_000_000)   # 32M: 2.4 GiB of top-K files, generated in about a minute
QUICK = (50_000, 200_000)
DIMS = (128, 2048)   # the demo-sized projection and ResNet-50's pooled features, the paper's embedding
# N per embedding width: the exact kNN search costs N^2 d, so d = 2048 stops at a smaller N
PROPAGATION_FULL = {128: (10_000, 20_000, 40_000), 2048: (5_000, 10_000, 20_000)}
PROPAGATION_QUICK = {128: (5_000, 10_000), 2048: (2_000, 4_000)}
LABELED_PER_CLASS, NEIGHBOURS = 2, 20
CLASSES, TOP_K = 800, 10
P = {"p500": lambda n: 500, "pn1024": lambda n: max(1, n // 1024)}   # images per class at N images
WRITERS = 2   # the ranks that "predicted": the files the selection reads
BLOCK_VALUES = 1 << 27   # values generated at a time (a block of rows x width)
# active learning's float32 embeddings are written once per world (1 and 2 ranks' files): 2M x 2048 would be
# 2 x 16 GiB, so d = 2048 stops at 0.5M
ACTIVE_FULL = {128: (500_000, 2_000_000), 2048: (125_000, 500_000)}
ACTIVE_QUICK = {128: (50_000, 200_000), 2048: (10_000, 40_000)}
ACTIVE_CENTRES, ACTIVE_CLUSTERS, ACTIVE_SAMPLE_PER_CLUSTER, ACTIVE_BUDGET = 1024, 256, 256, 0.0025


def block_rows(width: int) -> int:
    return max(1, BLOCK_VALUES // width)


def noise_scale(dim: int) -> np.float32:
    """A generated row's noise as far from its centre at any width: classes overlap alike at d = 128 and 2048."""
    return np.sqrt(128 / dim, dtype=np.float32)


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
        for start in range(0, end - first, block_rows(TOP_K)):
            n = min(block_rows(TOP_K), end - first - start)
            steps = rng.integers(1, CLASSES // TOP_K, size=(n, TOP_K), dtype=np.int32)
            steps[:, 0] = rng.integers(0, CLASSES, size=n, dtype=np.int32)
            classes[start:start + n] = np.cumsum(steps, axis=1) % CLASSES
            scores = -np.sort(-rng.random((n, TOP_K), dtype=np.float32), axis=1)
            probs[start:start + n] = scores / (scores.sum(axis=1, keepdims=True) + 1)
        classes.flush()
        probs.flush()
        del classes, probs
    record_shards(folder, rows, TOP_K, blocks)


def generate_embeddings(folder: str, rows: int, dim: int, seed: int = 0) -> None:
    """What label propagation reads from a prediction folder: embeddings.npy (`rows` unlabeled images) and
    labeled/embeddings.npy (LABELED_PER_CLASS a class), unit float16 rows of `dim` around a random centre per
    class; labels.npy, the labeled images' classes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLASSES, dim)).astype(np.float32)
    spread = noise_scale(dim)

    def around(classes):
        x = centres[classes] + spread * rng.standard_normal((len(classes), dim), dtype=np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

    os.makedirs(os.path.join(folder, "labeled"))
    unlabeled = np.lib.format.open_memmap(os.path.join(folder, "embeddings.npy"), "w+", np.float16, (rows, dim))
    block = block_rows(dim)
    for start in range(0, rows, block):
        unlabeled[start:start + block] = around(rng.integers(0, CLASSES, min(block, rows - start)))
    unlabeled.flush()
    del unlabeled
    labels = np.repeat(np.arange(CLASSES), LABELED_PER_CLASS)
    np.save(os.path.join(folder, "labeled", "embeddings.npy"), around(labels))
    np.save(os.path.join(folder, "labels.npy"), labels)


def generate_embedded(folder: str, rows: int, dim: int, seed: int = 0) -> None:
    """embed_and_classify's files of `rows` candidates as 1 rank and as 2 ranks leave them, the same rows in
    folder/world-1 and folder/world-2: unit embeddings of `dim` around ACTIVE_CENTRES random centres, top-2
    probabilities (p1 > p2, p1 + p2 <= 1) and their classes."""
    from data.sampler import eval_block
    from trainer.algorithms.active_learning import EMBEDDINGS, GUESS, TOP2
    from trainer.runtime.predict import rank_file
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ACTIVE_CENTRES, dim)).astype(np.float32)
    block, spread = block_rows(dim), noise_scale(dim)
    for world in (1, 2):
        os.makedirs(os.path.join(folder, f"world-{world}"))
    one = {name: np.lib.format.open_memmap(rank_file(os.path.join(folder, "world-1", name), 0), "w+", dtype,
                                           (rows, width))
           for name, width, dtype in ((EMBEDDINGS, dim, np.float32), (TOP2, 2, np.float32), (GUESS, 2, np.int64))}
    for start in range(0, rows, block):
        n = min(block, rows - start)
        x = centres[rng.integers(0, ACTIVE_CENTRES, n)] + spread * rng.standard_normal((n, dim), dtype=np.float32)
        one[EMBEDDINGS][start:start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
        first = rng.uniform(0.2, 1, n).astype(np.float32)
        one[TOP2][start:start + n] = np.stack([first, np.minimum(first, 1 - first) * rng.random(n, np.float32)], 1)
        one[GUESS][start:start + n] = rng.integers(0, CLASSES, (n, 2))
    for name, whole in one.items():
        whole.flush()
        for rank in range(2):
            first, end = eval_block(rows, rank, 2)
            own = np.lib.format.open_memmap(rank_file(os.path.join(folder, "world-2", name), rank), "w+", whole.dtype,
                                            (end - first, whole.shape[1]))
            for start in range(first, end, block):
                own[start - first:min(start + block, end) - first] = whole[start:min(start + block, end)]
            own.flush()
            del own
    del one, whole


def propagate_in_child(argv: list[str]) -> None:
    """One rank's label propagation over a generate_embeddings folder; rank 0 prints every rank's seconds and
    peak memory, and saves the top-K of the result as propagated-<world>.npz in the folder."""
    from trainer import dist
    from trainer.algorithms.label_propagation import propagate, top_k
    folder = argv[0]
    rt = dist.init("cpu")
    parts = [np.load(os.path.join(folder, *name), mmap_mode="r") for name in (["embeddings.npy"],
                                                                              ["labeled", "embeddings.npy"])]
    labels = np.load(os.path.join(folder, "labels.npy"))
    before = measured_from_here()
    dist.barrier()
    start = time.perf_counter()
    result = propagate(parts, np.arange(len(parts[0]), len(parts[0]) + len(labels)), labels, CLASSES, NEIGHBOURS)
    seconds = time.perf_counter() - start
    ranks = dist.gather_object({"seconds": seconds, "rss_increase_mb": (memory_kib()["VmHWM"] - before) / 1024})
    if rt.is_main:
        classes, scores = top_k(result.probabilities, TOP_K, result.reached)
        np.savez(os.path.join(folder, f"propagated-{rt.world}.npz"), classes=classes, scores=scores)
        print(json.dumps({"ranks": ranks, "reached": int(result.reached.sum())}))
    dist.shutdown()


def select_in_child(argv: list[str]) -> None:
    """One rank's selection (a plain process: rank 0 of 1; under torchrun: its rank); rank 0 prints every
    rank's seconds and peak memory, and a digest of the selection."""
    from trainer import dist
    from trainer.algorithms.balanced_selection import select_across_ranks
    from trainer.runtime.predict import top_k_share
    folder, p = argv[0], int(argv[1])
    rt = dist.init("cpu")
    before = measured_from_here()
    dist.barrier()
    start = time.perf_counter()
    selection = select_across_ranks(top_k_share(folder, rt.rank, rt.world), CLASSES, p)
    seconds = time.perf_counter() - start
    ranks = dist.gather_object({"seconds": seconds, "rss_increase_mb": (memory_kib()["VmHWM"] - before) / 1024})
    if rt.is_main:
        digest = hashlib.sha1(selection.indices.tobytes() + selection.labels.tobytes()).hexdigest()
        print(json.dumps({"ranks": ranks, "selected": len(selection.indices), "digest": digest}))
    dist.shutdown()


def active_in_child(argv: list[str]) -> None:
    """One rank's active-learning query choice over a generate_embedded folder; rank 0 prints every rank's
    seconds and peak memory, and a digest of the queries."""
    from data.sampler import eval_block
    from trainer import dist
    from trainer.algorithms.active_learning import EmbeddedShard, select_queries
    folder, rows = argv[0], int(argv[1])
    rt = dist.init("cpu")
    first, end = eval_block(rows, rt.rank, rt.world)
    shard = EmbeddedShard(os.path.join(folder, f"world-{rt.world}"), rt.rank, first, end - first, np.empty(0, np.int64))
    count = round(ACTIVE_BUDGET * rows)
    before = measured_from_here()
    dist.barrier()
    # as launch/active.py: a budget of fewer queries than clusters gets one cluster per query
    queries, seconds = select_queries(shard, count, min(ACTIVE_CLUSTERS, count), niter=20, seed=0,
                                      max_points_per_centroid=ACTIVE_SAMPLE_PER_CLUSTER)
    ranks = dist.gather_object({**seconds, "rss_increase_mb": (memory_kib()["VmHWM"] - before) / 1024})
    if rt.is_main:
        digest = hashlib.sha1(queries.rows.tobytes() + queries.cluster.tobytes()).hexdigest()
        print(json.dumps({"ranks": ranks, "queries": len(queries.rows), "digest": digest}))
    dist.shutdown()


def in_child(world: int, work: str, *argv: str) -> dict:
    """CHILDREN[work](argv) on `world` ranks (torchrun for more than one) in fresh processes, one CPU core a
    rank (one rank alone is held to a single core): 2 ranks against 1 is what a second device adds, not the
    same cores shared out again. What rank 0 printed."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m"]
                if world > 1 else [sys.executable, "-m"])
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < world:
        raise RuntimeError(f"{world} ranks need {world} CPU cores, this process may use {len(cores)}")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    child = subprocess.run(launcher + ["launch.benches.scale", work, *argv], env=env, cwd=ROOT,
                           capture_output=True, text=True,
                           preexec_fn=lambda: os.sched_setaffinity(0, cores[:world]))
    if child.returncode:
        raise RuntimeError(f"{work} on {world} rank(s) failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def slope(sizes, values) -> float:
    """The fitted exponent b of value ~ a N^b (least squares in log-log)."""
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def run(args) -> dict:
    """Every figure of the suite; with --plots DIR, DIR/scale.png draws each curve's seconds and peak memory
    against N (log-log) with its fitted slopes."""
    figures, curves = {"classes": float(CLASSES), "top_k": float(TOP_K)}, []
    figures.update(selection(QUICK if args.quick else FULL, curves))
    for dim in DIMS:
        figures.update(propagation(dim, (PROPAGATION_QUICK if args.quick else PROPAGATION_FULL)[dim], curves))
    for dim in DIMS:
        figures.update(active_learning(dim, (ACTIVE_QUICK if args.quick else ACTIVE_FULL)[dim], curves))
    for curve in curves:
        figures[f"time_slope_{curve['name']}"] = slope(curve["sizes"], curve["seconds"])
        figures[f"memory_slope_{curve['name']}"] = slope(curve["sizes"], curve["peak_mb"])
    if args.plots:
        path = os.path.join(args.plots, "scale.png")
        plot(curves, path)
        print(f"bench scale: wrote {path}", flush=True)
    return figures


def selection(sizes, curves: list) -> dict:
    """select_in_child's figures at each N, both P rules, on 1 and 2 ranks; 1 and 2 ranks must agree."""
    figures = {}
    measured = {(rule, world): ([], []) for rule in P for world in (1, 2)}
    for n in sizes:
        label = f"{n / 1e6:g}M"
        figures[f"{label}_read_mb"] = n * TOP_K * 8 / 2**20
        with tempfile.TemporaryDirectory(prefix="semiscale-bench-scale-") as folder:
            generate_predictions(folder, n)
            for rule, images in P.items():
                p = images(n)
                runs = {world: in_child(world, "select", folder, str(p)) for world in (1, 2)}
                if runs[1]["digest"] != runs[2]["digest"]:
                    raise AssertionError(f"N={n}, P={p}: 1 and 2 ranks selected differently")
                key = f"{label}_{rule}"
                figures[f"{key}_selected"] = float(runs[1]["selected"])
                figures[f"{key}_gathered_at_most_mb"] = 2 * CLASSES * p * 16 / 2**20   # 2 ranks x C x P x 16 bytes
                for world, result in runs.items():
                    figures[f"{key}_{world}rank_s"] = max(r["seconds"] for r in result["ranks"])
                    figures[f"{key}_{world}rank_peak_rss_mb"] = max(r["rss_increase_mb"] for r in result["ranks"])
                    measured[rule, world][0].append(figures[f"{key}_{world}rank_s"])
                    measured[rule, world][1].append(figures[f"{key}_{world}rank_peak_rss_mb"])
                figures[f"{key}_2rank_speedup"] = figures[f"{key}_1rank_s"] / figures[f"{key}_2rank_s"]
    curves += [{"name": f"selection_{rule}_{world}rank", "sizes": sizes, "seconds": s, "peak_mb": m}
               for (rule, world), (s, m) in measured.items()]
    figures["identical_1_and_2_ranks"] = 1.0
    return figures


def propagation(dim: int, sizes, curves: list) -> dict:
    """propagate_in_child's figures at each N on 1 and 2 ranks over embeddings `dim` wide."""
    figures, measured = {}, {1: ([], []), 2: ([], [])}
    for n in sizes:
        key = f"propagation_d{dim}_{n / 1e3:g}k"
        figures[f"{key}_read_mb"] = (n + CLASSES * LABELED_PER_CLASS) * dim * 2 / 2**20
        with tempfile.TemporaryDirectory(prefix="semiscale-bench-propagation-") as folder:
            generate_embeddings(folder, n, dim)
            for world in (1, 2):
                result = in_child(world, "propagate", folder)
                figures[f"{key}_{world}rank_s"] = result["ranks"][0]["seconds"]
                figures[f"{key}_{world}rank_peak_rss_mb"] = max(r["rss_increase_mb"] for r in result["ranks"])
                measured[world][0].append(figures[f"{key}_{world}rank_s"])
                measured[world][1].append(figures[f"{key}_{world}rank_peak_rss_mb"])
            figures[f"{key}_2rank_search_s"] = result["ranks"][1]["seconds"]
            figures[f"{key}_reached"] = float(result["reached"])
            one, two = (np.load(os.path.join(folder, f"propagated-{world}.npz")) for world in (1, 2))
            figures[f"{key}_2rank_max_score_diff"] = float(np.abs(one["scores"] - two["scores"]).max())
            figures[f"{key}_2rank_same_top1"] = float((one["classes"][:, 0] == two["classes"][:, 0]).mean())
        figures[f"{key}_2rank_speedup"] = figures[f"{key}_1rank_s"] / figures[f"{key}_2rank_s"]
    curves += [{"name": f"propagation_d{dim}_{world}rank", "sizes": sizes, "seconds": s, "peak_mb": m}
               for world, (s, m) in measured.items()]
    return figures


def active_learning(dim: int, sizes, curves: list) -> dict:
    """active_in_child's figures at each N on 1 and 2 ranks over embeddings `dim` wide; the curves are the
    assignment and choice, which stream over the rows (the fit's sample does not grow with N)."""
    figures, measured = {}, {1: ([], []), 2: ([], [])}
    for n in sizes:
        key = f"active_d{dim}_{n / 1e6:g}M"
        # read: every embedding, the sample again, the top-2, classes and clusters; written: the clusters
        figures[f"{key}_read_mb"] = (n * (dim * 4 + 40) + ACTIVE_CLUSTERS * ACTIVE_SAMPLE_PER_CLUSTER * dim * 4) / 2**20
        figures[f"{key}_written_mb"] = n * 8 / 2**20
        with tempfile.TemporaryDirectory(prefix="semiscale-bench-active-") as folder:
            generate_embedded(folder, n, dim)
            runs = {world: in_child(world, "active", folder, str(n)) for world in (1, 2)}
        if runs[1]["digest"] != runs[2]["digest"]:
            raise AssertionError(f"N={n}, d={dim}: 1 and 2 ranks chose different queries")
        figures[f"{key}_queries"] = float(runs[1]["queries"])
        for world, result in runs.items():
            figures[f"{key}_{world}rank_kmeans_s"] = result["ranks"][0]["kmeans_seconds"]
            for phase in ("assignment", "choice"):
                figures[f"{key}_{world}rank_{phase}_s"] = max(r[f"{phase}_seconds"] for r in result["ranks"])
            figures[f"{key}_{world}rank_peak_rss_mb"] = max(r["rss_increase_mb"] for r in result["ranks"])
            measured[world][0].append(figures[f"{key}_{world}rank_assignment_s"] + figures[f"{key}_{world}rank_choice_s"])
            measured[world][1].append(figures[f"{key}_{world}rank_peak_rss_mb"])
        figures[f"{key}_2rank_assignment_choice_speedup"] = measured[1][0][-1] / measured[2][0][-1]
    curves += [{"name": f"active_d{dim}_{world}rank", "sizes": sizes, "seconds": s, "peak_mb": m}
               for world, (s, m) in measured.items()]
    figures[f"active_d{dim}_identical_1_and_2_ranks"] = 1.0
    return figures


def plot(curves: list, path: str) -> None:
    """Seconds and peak memory against N, log-log, a line per curve labelled with its fitted slope."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    parts = list(dict.fromkeys(curve["name"].rsplit("_", 1)[0] for curve in curves))   # a colour each, 1 and 2 ranks
    for ax, measure, unit in zip(axes, ("seconds", "peak_mb"), ("seconds", "peak resident memory increase, MB")):
        for curve in curves:
            part, ranks = curve["name"].rsplit("_", 1)
            ax.loglog(curve["sizes"], curve[measure], "--" if ranks == "2rank" else "-", marker="o",
                      color=f"C{parts.index(part)}",
                      label=f"{curve['name']} (slope {slope(curve['sizes'], curve[measure]):.2f})")
        ax.set_xlabel("N (images)")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("time (dashed: 2 ranks)")
    axes[1].set_title("memory (dashed: 2 ranks; the larger rank)")
    fig.suptitle(f"launch/bench.py --suite scale: C = {CLASSES}, K = {TOP_K}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


CHILDREN = {"select": select_in_child, "propagate": propagate_in_child, "active": active_in_child}

if __name__ == "__main__":
    CHILDREN[sys.argv[1]](sys.argv[2:])
