"""predictions.csv written in chunks, every rank labeling its block of each chunk, resumable: the writer
behind launch/predict.py.

Every rank labels its block of each chunk of predict.chunk_size rows and writes its rows' lines to
chunks/chunk-K.rank-R.csv; rank 0 joins them into chunks/chunk-K.csv, then writes chunks/chunk-K.json
(the chunk's counts and unreadable images: the chunk is done); at the end, merge joins the chunks into
predictions.csv and bad_images.txt. No process holds more than its share of one chunk. inputs.json
(fingerprint) records what a resumed run must find unchanged: the rows, the model's bytes, the TTA views.
The run ends with summary.json's scores and the lines that sum the run up (say_done).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import replace

import numpy as np
import torch

from data import atomic
from data.datasets import BadImageError, Split, load_image
from data.prepare_messages import shown
from data.same_content import file_digest
from trainer import dist
from trainer.runtime import config, engine, rundir
from trainer.runtime.engine import StageError
from trainer.runtime.loading import eval_loader
from trainer.runtime.predict import outputs
from trainer.algorithms.tta import scale_probabilities, tta_probabilities

TOP_K_SCORED = 5   # summary.json's top-5, whatever predict.top_k writes
PREDICTIONS, BAD_IMAGES, SUMMARY, INPUTS, CHUNKS = (
    "predictions.csv", "bad_images.txt", "summary.json", "inputs.json", "chunks")


# ---- what a resumed run must find unchanged ----

def fingerprint(split: Split, model: str, scales: list[int], mirror: bool) -> dict:
    """What a resumed run must find unchanged: the rows (their paths, in order), the model's bytes and the
    TTA views (tta_from's eval.json may have changed since)."""
    rows = hashlib.sha1("\n".join(relative_paths(split)).encode("utf-8", "surrogateescape")).hexdigest()
    return {"rows": len(split), "rows_sha1": rows, "model_sha1": file_digest(model, "sha1").hex(), "scales": scales,
            "mirror": mirror}


def relative_paths(split: Split) -> list[str]:
    """The split's paths as predictions.csv writes them: relative to its root."""
    return [p[len(split.root) + 1:] for p in split.paths]


# ---- the run dir: resumed, finished ----

def check_previous_inputs(cfg, inputs: dict, stage: str):
    """Reads only, on rank 0 before engine.Run claims run.dir: its own refusals first (rundir.check), then
    a started run's inputs.json against this run's (a changed input, model or TTA views refuse it)."""
    out = cfg.run.dir
    rundir.check(out, stage, config.to_dict(cfg), cfg.run.restart, config.to_dict(type(cfg)()))
    if cfg.run.restart or not os.path.exists(os.path.join(out, rundir.METRICS)):
        return
    try:
        previous = engine.read_json(os.path.join(out, INPUTS))
    except (OSError, ValueError):
        previous = None
    if previous == inputs:
        return
    previous = previous if isinstance(previous, dict) else {}
    changed = []
    if {k: previous.get(k) for k in ("rows", "rows_sha1")} != {k: inputs[k] for k in ("rows", "rows_sha1")}:
        changed.append(f"the images ({previous.get('rows')} -> {inputs['rows']} rows)")
    if previous.get("model_sha1") != inputs["model_sha1"]:
        changed.append("the model's bytes")
    if {k: previous.get(k) for k in ("scales", "mirror")} != {k: inputs[k] for k in ("scales", "mirror")}:
        changed.append(f"the TTA views (scales {previous.get('scales')} -> {inputs['scales']}, mirror "
                       f"{previous.get('mirror')} -> {inputs['mirror']})")
    raise rundir.RunDirError(f"run.dir={out}: holds a {stage} run made before {' and '.join(changed or ['its inputs'])} "
                             f"changed; pass --restart to start over (the old run moves to {rundir.REPLACED}/), "
                             "or choose another run.dir")


def resume_point(run, inputs: dict, count: int) -> tuple[bool, set[int]]:
    """On rank 0 once engine.Run holds run.dir: inputs.json written; (finished, the finished chunks)."""
    metrics = run.path(rundir.METRICS)
    started = os.path.exists(metrics)   # engine.Run moved a --restart's previous run aside
    engine.write_json(run.path(INPUTS), inputs)
    finished = (started and os.path.exists(run.path(PREDICTIONS))
                and any(e.get("event") == "done" for e in rundir.read_lines(metrics)))
    return finished, (set() if finished else finished_chunks(run.dir, count))


def claim_run_dir(cfg, rt, stage: str, inputs: dict, count: int) -> tuple[engine.Run, bool, set[int]]:
    """(the engine.Run that holds run.dir, finished, the finished chunks): rank 0 checks run.dir
    (check_previous_inputs) and claims it (resume_point); a refusal stops every rank with rank 0's one line."""
    dist.rank0_decides(lambda: check_previous_inputs(cfg, inputs, stage))
    run = engine.Run(stage, cfg, rt)   # every check has passed: the first write
    finished, done = dist.rank0_decides(lambda: resume_point(run, inputs, count))
    return run, finished, done


def chunk_base(out: str, k: int) -> str:
    return os.path.join(out, CHUNKS, f"chunk-{k:06d}")


def finished_chunks(out: str, count: int) -> set[int]:
    """The chunks whose .json (written last) is there; every other chunk file is a leftover and goes."""
    folder = os.path.join(out, CHUNKS)
    os.makedirs(folder, exist_ok=True)
    done = {k for k in range(count) if os.path.exists(chunk_base(out, k) + ".json")}
    keep = {os.path.basename(chunk_base(out, k)) + ext for k in done for ext in (".json", ".csv")}
    for name in os.listdir(folder):
        if name not in keep:
            os.remove(os.path.join(folder, name))
    return done

# ---- labeling, chunk by chunk ----

class WholeChunkUnreadable:
    """An eval loader over a chunk that stops, instead of raising, when the chunk holds no readable image
    (the only BadImageError on_bad_image=skip raises): every rank finds it so, none is left waiting."""

    def __init__(self, part: Split, cfg, rt, batch_size: int, scales: list[int]):
        self.unreadable = False
        try:
            self.loader = eval_loader(part, cfg, rt, batch_size, scales)
        except BadImageError:   # DALI scans the chunk when the loader is made
            self.loader, self.unreadable = None, True

    def epoch(self, epoch: int):
        if self.loader is None:
            return
        try:
            yield from self.loader.epoch(epoch)
        except BadImageError:   # the torch loader finds out at the first batch
            self.unreadable = True


def csv_field(text: str) -> str:
    """`text` as csv.writer's default dialect writes it (quoted only when it must be)."""
    if any(c in text for c in ',"\r\n') or text != text.strip():
        return '"' + text.replace('"', '""') + '"'
    return text


def label_block(top_k, loader: WholeChunkUnreadable, rt, precision: str, lo: int, hi: int, k_kept: int):
    """(classes, probs, produced) of this rank's rows lo..hi of a chunk: an eval loader walks them in order,
    one slot a row (data.sampler), and a row whose slot reports another row (its stand-in:
    on_bad_image=skip) was not produced. Holds this rank's share of one chunk, nothing more."""
    classes = np.zeros((hi - lo, k_kept), np.int32)
    probs = np.zeros((hi - lo, k_kept), np.float32)
    produced = np.zeros(hi - lo, bool)
    slots = 0
    for index, out in outputs(top_k, loader, rt, precision):
        own = index.numpy() == np.arange(lo + slots, lo + slots + len(index))
        rows = np.arange(slots, slots + len(index))[own]
        classes[rows] = out[own, :k_kept].numpy()
        probs[rows] = out[own, k_kept:].numpy()
        produced[rows] = True
        slots += len(index)
    if slots != hi - lo and not loader.unreadable:
        raise RuntimeError(f"rank {rt.rank}: the eval loader gave {slots} rows of its block {lo}..{hi}: expected "
                           "contiguous blocks, one row a slot (data.sampler)")
    return classes, probs, produced


def write_block(path: str, classes, probs, produced, rel: list[str], names: list[str]):
    """The produced rows as predictions.csv lines (no header), in row order, one (class, prob) pair per
    column of `classes`."""
    quoted = [csv_field(name) for name in names]
    line = ",".join(["%s", "%s,%.6f"] + ["%s,%.6f"] * classes.shape[1]) + "\n"
    with open(path, "w", encoding="utf-8", newline="") as f:
        for i, c, p in zip(np.flatnonzero(produced).tolist(), classes[produced].tolist(),
                           probs[produced].astype(np.float64).tolist()):
            f.write(line % (csv_field(rel[i]), quoted[c[0]], p[0], *(v for pair in zip((quoted[j] for j in c), p)
                                                                       for v in pair)))


def block_summary(classes, produced, paths: list[str], rel: list[str], labels) -> dict:
    """Counts of a rank's block, its unreadable images with their reasons, top-1/top-5 hits with labels."""
    bad = []
    for i in np.flatnonzero(~produced):
        try:
            load_image(paths[i])
            reason = "unreadable when labeled"   # readable again now: it stays out of this run's predictions
        except BadImageError as e:
            reason = e.reason
        bad.append((rel[i], reason))
    summary = {"labeled": int(produced.sum()), "bad": bad}
    if labels is not None:
        y = labels[produced]
        summary.update(scored=len(y), top1_hits=int((classes[produced, 0] == y).sum()),
                       top5_hits=int((classes[produced, :TOP_K_SCORED] == y[:, None]).any(1).sum()))
    return summary


def refuse_bad_images(cfg, bad: list[tuple[str, str]]):
    """data.on_bad_image=error: the first unreadable image stops the run (every rank, with the same line)."""
    if bad and cfg.data.on_bad_image == "error":
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise StageError(f"predict.input={cfg.predict.input}: {shown(path)}: {reason}{more}; data.on_bad_image="
                         "error stops at an unreadable image (skip lists them in bad_images.txt)")


def label_chunks(model, split: Split, cfg, rt, run, scales: list[int], mirror: bool, names: list[str], labels,
                 done: set[int]) -> int:
    """Labels every chunk not in `done`: each rank runs its block of the chunk, writes its rows' lines to
    chunks/chunk-K.rank-R.csv, and rank 0 joins them, in rank order, into chunk-K.csv, then writes
    chunk-K.json (the chunk is done). Returns the rows labeled by this run."""
    n, size = len(split), cfg.predict.chunk_size
    k_written = min(cfg.predict.top_k, len(names))
    k_kept = min(max(cfg.predict.top_k, TOP_K_SCORED), len(names))   # the summary's top-5 needs 5
    rel = relative_paths(split)
    # the loader always skips (a row it could not read is left out of the block); data.on_bad_image=error
    # stops the run once the chunk's unreadable images are known on every rank
    loading = replace(cfg, data=replace(cfg.data, on_bad_image="skip"))
    initial = sum(min(n, (k + 1) * size) - k * size for k in done)
    bar = run.progress(n, initial)
    end = 0

    def top_k(views):
        probs, classes = tta_probabilities(scale_probabilities(model, views, mirror)).topk(k_kept, dim=1)
        bar.update(max(0, min(len(views[0]) * rt.world, end - bar.n)))   # rank 0's share x the ranks: an estimate
        return torch.cat([classes.float(), probs], 1)   # class ids < 2**24: exact in float32

    labeled = 0
    quiet = [logging.getLogger(name) for name in ("data.datasets", "data.dali")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:   # one line per image per process otherwise: bad_images.txt lists them, a line sums up
        logger.setLevel(logging.ERROR)
    try:
        for k in range(-(-n // size)):
            if k in done:
                continue
            t0 = time.time()
            start, end = k * size, min(n, (k + 1) * size)
            lo, hi = rt.rank * (end - start) // rt.world, (rt.rank + 1) * (end - start) // rt.world
            part = replace(split, paths=split.paths[start:end], labels=None, hidden_labels=None)
            loader = WholeChunkUnreadable(part, loading, rt, cfg.inference.batch_size, scales)
            classes, probs, produced = label_block(top_k, loader, rt, cfg.inference.precision, lo, hi, k_kept)
            base = chunk_base(run.dir, k)
            block = slice(start + lo, start + hi)
            write_block(f"{base}.rank-{rt.rank}.csv", classes[:, :k_written], probs[:, :k_written], produced,
                        rel[block], names)
            parts = dist.all_gather_object(block_summary(classes, produced, split.paths[block], rel[block],
                                                         None if labels is None else labels[block]))
            bad = [b for p in parts for b in p["bad"]]
            refuse_bad_images(cfg, bad)   # before the chunk is done: a rerun relabels it
            if rt.is_main:
                with atomic.writing(base + ".csv", "wb") as joined:
                    for r in range(rt.world):
                        with open(f"{base}.rank-{r}.csv", "rb") as f:
                            shutil.copyfileobj(f, joined)
                chunk = {"rows": end - start, "seconds": round(time.time() - t0, 3),
                         **{key: sum(p[key] for p in parts) for key in parts[0] if key != "bad"}, "bad": bad}
                engine.write_json(base + ".json", chunk)   # atomic: the chunk is done
                for r in range(rt.world):
                    os.remove(f"{base}.rank-{r}.csv")
                run.log(chunk=k, rows=chunk["rows"], labeled=chunk["labeled"], bad=len(bad), seconds=chunk["seconds"])
            dist.barrier()
            bar.update(end - bar.n)
            labeled += end - start
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
        bar.close()
    return labeled


def merge(out: str, count: int, k_top: int, unlisted: list[tuple[str, str]]) -> dict:
    """predictions.csv and bad_images.txt from the chunks, in row order; the summary's counts."""
    header = ["path", "class", "confidence", *(f"top{i}_{x}" for i in range(1, k_top + 1) for x in ("class", "prob"))]
    totals = {"labeled": 0, "scored": 0, "top1_hits": 0, "top5_hits": 0}
    bad = list(unlisted)
    with atomic.writing(os.path.join(out, PREDICTIONS)) as f:
        f.write(",".join(header) + "\n")
        for k in range(count):
            chunk = engine.read_json(chunk_base(out, k) + ".json")
            with open(chunk_base(out, k) + ".csv", encoding="utf-8", newline="") as part:
                shutil.copyfileobj(part, f)
            for key in totals:
                totals[key] += chunk.get(key, 0)
            bad += [tuple(b) for b in chunk["bad"]]
    engine.write_text(os.path.join(out, BAD_IMAGES), "".join(f"{shown(p)}\t{reason}\n" for p, reason in bad))
    return {**totals, "bad": bad}


# ---- the end of a run ----

def scores(totals: dict) -> dict:
    """summary.json's top-1, top-5 and the images they were scored on, from merge's counts; none without labels."""
    if not totals["scored"]:
        return {}
    return {"top1": totals["top1_hits"] / totals["scored"], "top5": totals["top5_hits"] / totals["scored"],
            "scored": totals["scored"]}


def say_done(run, summary: dict, bad: list[tuple[str, str]], seconds: float):
    """The unreadable images skipped, then where the predictions went, at which views, their scores and
    this run's speed."""
    if bad:
        run.say(f"skipped {len(bad)} unreadable image(s) (listed in {run.path(BAD_IMAGES)}): "
                + ", ".join(shown(p) for p, _ in bad[:5]) + (", ..." if len(bad) > 5 else ""))
    scored = (f"; top-1 {summary['top1']:.4f}, top-5 {summary['top5']:.4f} on {summary['scored']} labeled "
              "images" if "top1" in summary else "")
    views = f"scales {summary['scales']} px{' and their mirrors' if summary['mirror'] else ''}"
    labeled = summary["images_this_run"]
    rate = (f"{labeled} images read by this run in {seconds:.1f} s: {summary['img_per_s']:.0f} img/s on "
            f"{summary['ranks']} rank(s)" if labeled else "nothing left to label")
    run.say(f"{summary['labeled']} of {summary['images']} images -> {run.path(PREDICTIONS)} ({views}){scored}; "
            f"{rate}")
