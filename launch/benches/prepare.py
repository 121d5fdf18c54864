"""prepare.py own --link on a pile of generated images: images/s and peak memory; then check_dataset
on the result, trusting prepare's record of the CSVs it compared, and without it (sizes, then bytes).

500,000 unlabeled 16 px greyscale PNGs (--quick: 20,000) in 500 nested folders, plus a labeled
ImageFolder of 10 classes x 100, 5 corrupt files and 5 copies of labeled images among the unlabeled
ones, written under /tmp and deleted afterwards.
prepare runs in a fresh process (`prepare_in_child`); its peak memory is measured three ways: the
main process's VmHWM (/proc, reset by exec, unlike ru_maxrss which Linux carries over from the
parent), the largest pool worker's ru_maxrss (RUSAGE_CHILDREN: it counts pages shared with the main
process at fork), and the largest sum of PSS over the main process and its workers, sampled every
0.2 s (shared pages counted once: the figure that says what the run costs the machine).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL = dict(images=500_000, folders=500)
QUICK = dict(images=20_000, folders=40)
CLASSES, PER_CLASS, CORRUPT, COPIES, SIDE = 10, 100, 5, 5, 16


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


HEAD = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", SIDE, SIDE, 8, 0, 0, 0, 0))
TAIL = _chunk(b"IEND", b"")


def png_bytes(i: int) -> bytes:
    """A 16 x 16 greyscale PNG of its own for each i (a gradient shifted by i, the first 4 pixels i's
    bytes: prepare leaves out copies of one picture), encoded by hand."""
    row = bytes((x * 16 + i) % 256 for x in range(SIDE))
    rows = [row[y:] + row[:y] for y in range(SIDE)]
    rows[0] = i.to_bytes(4, "big") + rows[0][4:]
    pixels = b"".join(b"\x00" + r for r in rows)   # filter byte 0 per row
    return HEAD + _chunk(b"IDAT", zlib.compress(pixels, 1)) + TAIL


def _write_folder(job):
    folder, first, count = job
    os.makedirs(folder, exist_ok=True)
    for i in range(first, first + count):
        with open(os.path.join(folder, f"{i:07d}.png"), "wb") as f:
            f.write(png_bytes(i))
    return count


def generate(base: str, images: int, folders: int) -> dict:
    """base/unlabeled/<a>/<b>/*.png (folders of images/folders each), base/labeled/<class>/*.png and
    CORRUPT truncated files and COPIES copies of labeled images among the unlabeled ones."""
    per = images // folders
    jobs = [(os.path.join(base, "unlabeled", f"{k // 20:03d}", f"{k % 20:02d}"), k * per, per) for k in range(folders)]
    jobs += [(os.path.join(base, "labeled", f"class{c}"), 10**7 - (c + 1) * PER_CLASS, PER_CLASS)
             for c in range(CLASSES)]
    start = time.perf_counter()
    with multiprocessing.Pool(min(2, os.cpu_count() or 1)) as pool:
        written = sum(pool.imap_unordered(_write_folder, jobs))
    for k in range(CORRUPT):   # cut short: decodes fail
        path = os.path.join(jobs[k * (folders // CORRUPT)][0], f"{k * (folders // CORRUPT) * per:07d}.png")
        with open(path, "r+b") as f:
            f.truncate(30)
    for k in range(COPIES):   # a labeled image over an unlabeled one: prepare leaves it out of the pool
        folder, first, _ = jobs[k * (folders // COPIES) + 1]
        labeled, labeled_first, _ = jobs[folders + k]
        shutil.copyfile(os.path.join(labeled, f"{labeled_first:07d}.png"), os.path.join(folder, f"{first:07d}.png"))
    return {"written": written, "generate_s": time.perf_counter() - start}


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def _children(pid: int) -> list[int]:
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found


def prepare_in_child(argv: list[str]) -> None:
    """Run prepare.main(argv) in this (fresh) process; print its wall time and memory figures as JSON."""
    from launch import prepare

    peak = {"pss_kib": 0}
    done = threading.Event()

    def sample():
        me = os.getpid()
        while not done.wait(0.2):
            peak["pss_kib"] = max(peak["pss_kib"], _pss_kib(me) + sum(_pss_kib(c) for c in _children(me)))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    status = prepare.main(argv)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    print(json.dumps({"status": status, "wall_s": wall, "main_hwm_kib": int(fields["VmHWM"].split()[0]),
                      "worker_maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                      "pss_peak_kib": peak["pss_kib"]}), flush=True)


def run_prepare(argv: list[str]) -> tuple[dict, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    child = subprocess.run([sys.executable, "-c", "import sys; from launch.benches.prepare import prepare_in_child; "
                            "prepare_in_child(sys.argv[1:])", *argv],
                           env=env, cwd=ROOT, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"prepare failed ({child.returncode}): {child.stderr[-2000:]}")
    lines = child.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


def phase_seconds(log: str, word: str) -> float:
    found = re.search(rf"prepare: {word} .*?\(([\d.]+) s", log)
    return float(found.group(1)) if found else float("nan")


def run(args) -> dict:
    size = QUICK if args.quick else FULL
    workers = min(2, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="semiscale-bench-prepare-", dir="/tmp") as base:
        made = generate(base, size["images"], size["folders"])
        total = made["written"]
        out = os.path.join(base, "out")
        figures, log = run_prepare(["own", "--out", out, "--unlabeled", os.path.join(base, "unlabeled"),
                                    "--labeled", os.path.join(base, "labeled"), "--val-per-class", "10",
                                    "--test-per-class", "10", "--link", "--workers", str(workers)])
        with open(os.path.join(out, "prepare.json")) as f:
            counts = json.load(f)["counts"]
        assert counts["bad_images"] == CORRUPT and counts["duplicates"] == COPIES, counts
        assert counts["unlabeled"] == size["images"] - CORRUPT - COPIES, counts
        checks = check_dataset_seconds(out)
        csv_mb = sum(os.path.getsize(os.path.join(out, f"{s}.csv")) for s in ("labeled", "val", "test", "unlabeled"))
        start = time.perf_counter()
        shutil.rmtree(base)
        os.makedirs(base)   # TemporaryDirectory removes it again
        cleanup = time.perf_counter() - start
    return {
        "images": float(total), "workers": float(workers), "generate_s": made["generate_s"],
        "prepare_wall_s": figures["wall_s"], "images_per_s": total / figures["wall_s"],
        "list_s": phase_seconds(log, "listed"), "stat_s": phase_seconds(log, "found"),
        "decode_s": phase_seconds(log, "decoded"), "link_s": phase_seconds(log, "linked"),
        "decode_images_per_s": total / phase_seconds(log, "decoded"),
        "main_peak_rss_mb": figures["main_hwm_kib"] / 1024, "worker_peak_rss_mb": figures["worker_maxrss_kib"] / 1024,
        "total_peak_pss_mb": figures["pss_peak_kib"] / 1024, "csv_mb": csv_mb / 2**20,
        "bad_images": float(counts["bad_images"]), "duplicates": float(counts["duplicates"]), "cleanup_s": cleanup,
    } | checks


def check_dataset_seconds(out: str) -> dict:
    """check_dataset's seconds on the prepared dataset, with prepare's record of the CSVs it compared
    and without it (every file's size, then the bytes of the files whose size a val or test file has)."""
    from data import same_content
    from data.datasets import check_dataset
    start = time.perf_counter()
    assert check_dataset(out) == []
    trusted = time.perf_counter() - start
    manifest = os.path.join(out, same_content.MANIFEST)
    with open(manifest) as f:
        record = json.load(f)
    del record[same_content.CHECKED]
    with open(manifest, "w") as f:
        json.dump(record, f)
    start = time.perf_counter()
    assert check_dataset(out) == []
    return {"check_dataset_recorded_s": trusted, "check_dataset_unrecorded_s": time.perf_counter() - start}
