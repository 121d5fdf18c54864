"""Labels out: a classifier's predicted class, confidence and top-k for every image of a split, of a CSV
of images or of a folder of images.

    python launch/predict.py --config configs/demo/predict.yaml [predict.model=RUN_DIR|MODEL.pt]
        [predict.input=SPLIT|CSV|DIR] [predict.scales=[PX,...] [predict.mirror=true] | predict.tta_from=EVAL_RUN]
        [run.dir=OUT] [--restart] [key=value ...]
    torchrun --nproc_per_node=8 launch/predict.py --config configs/paper/predict.yaml   # every rank its share

predict.model: a model.pt, or the run dir that holds one (config.yaml records the model.pt). predict.input:
a split name (labeled, val, test, unlabeled: data.root/<name>.csv; ./test is a folder of that name); a CSV
file (ending in .csv) with a `path` column whose paths are relative to data.root, as a split's (an optional
`label` column of class ids scores the predictions); or a folder: every image in its tree (.jpg .jpeg .png
.bmp .gif .tif .tiff .webp .ppm .pgm, any case; names starting with '.' skipped), paths written relative to
it. A symlink that leads out of the folder refuses the run. data.root/classes.txt names the classes.

TTA views, averaged with trainer.tta's functions (evaluate's): predict.scales=[28,36] averages the softmax
over the image's views at those sizes, predict.mirror=true adds each view's horizontal mirror;
predict.tta_from=EVALUATE_RUN_DIR (or its eval.json) takes the scales and mirrors evaluate chose on val
(tta_scales, tta_mirror; an eval.json without tta_mirror: no mirrors) and excludes both keys; with neither
predict.scales nor predict.tta_from, the image size the model was trained at (data.image_size of the
config.yaml beside model.pt). data.image_size itself is not read here.

Unreadable images: data.on_bad_image=skip (predict's default) leaves them out of predictions.csv and lists
them in bad_images.txt; error stops the run at the first chunk that holds one, naming it (the chunks
finished before it are kept).

Writes in run.dir:
    predictions.csv  path,class,confidence,top1_class,top1_prob,...: one row per readable image, in input
                     order; class = the most probable class's name, confidence its probability;
                     topI_class/topI_prob the I-th most probable, I up to predict.top_k (at most the
                     model's classes); probabilities with 6 decimals
    bad_images.txt   the unreadable images, `path<TAB>reason` a line (empty when none)
    summary.json     counts, scales, mirror, top-1/top-5 when the input has labels, img/s
    run.json, config.yaml, metrics.jsonl (one line per chunk, then a done event), inputs.json (what a
                     resumed run must find unchanged: the rows, the model's bytes, the TTA views)
Every rank labels its block of each chunk of predict.chunk_size rows and writes its rows' lines; rank 0
joins them into chunks/chunk-K.csv, and at the end the chunks into predictions.csv: no process holds more
than its share of one chunk. Resumable: chunks/ keeps the finished chunks (removed at the end). A killed
run, rerun with the same config, goes on after its last finished chunk; a finished run is not redone;
another config (run.device, data.workers, inference.batch_size, run.log_every may change), input, model
or TTA views in the same run.dir are refused unless --restart (which moves the old run aside into
run.dir/replaced/).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import yaml
from tqdm import tqdm

from data.datasets import SPLITS, BadImageError, Split, load_image, read_classes, read_split
from trainer import config, dist, engine, rundir
from trainer.config import ConfigError, PredictConfig
from trainer.engine import StageError
from trainer.loading import eval_loader
from trainer.models import load_classifier
from trainer.predict import outputs
from trainer.tta import scale_probabilities, tta_probabilities

STAGE = "predict"
TOP_K_SCORED = 5   # summary.json's top-5, whatever predict.top_k writes
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
PREDICTIONS, BAD_IMAGES, SUMMARY, INPUTS, CHUNKS = (
    "predictions.csv", "bad_images.txt", "summary.json", "inputs.json", "chunks")


def check(cfg):
    """The checks that read no file (the pipeline runs them before any stage runs)."""
    p = cfg.predict
    if p.scales and p.tta_from:
        raise ConfigError(f"predict.scales={p.scales}, predict.tta_from={p.tta_from}: give one (tta_from takes the "
                          "scales evaluate chose; predict.tta_from= clears it)")
    if p.mirror and p.tta_from:
        raise ConfigError(f"predict.mirror=true: only without predict.tta_from ({p.tta_from}: its eval.json's "
                          "tta_mirror decides)")


# ---- what to label, at which scales ----

def shown(path: str) -> str:
    """`path` on one line of UTF-8 text (as prepare's bad_images.txt): line breaks and tabs escaped."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def unlistable(rel: str) -> str | None:
    """Why predictions.csv (UTF-8) or DALI's file lists (one path a line) cannot hold `rel`; None when they can."""
    if "\n" in rel or "\r" in rel or rel != rel.rstrip():
        return "its name holds a line break or ends in whitespace, which a file list cannot hold"
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    return None


def _inside(real: str, folder_real: str) -> bool:
    return real == folder_real or real.startswith(folder_real.rstrip(os.sep) + os.sep)


def image_folder(folder: str) -> tuple[Split, list[tuple[str, str]]]:
    """(the images of `folder`'s tree as a Split with root `folder`, sorted; (path, reason) of the image
    files it cannot list). A symlinked image or folder that leads outside `folder` raises StageError;
    symlinked folders inside are not followed (their images are listed under their own path)."""
    root = os.path.abspath(folder)
    root_real = os.path.realpath(root)
    files, unlisted = [], []
    for here, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        images = [name for name in names if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
        for name in subfolders + images:
            full = os.path.join(here, name)
            if os.path.islink(full) and not _inside(os.path.realpath(full), root_real):
                raise StageError(f"predict.input={folder}: {shown(os.path.relpath(full, root))} is a symlink to "
                                 f"{shown(os.path.realpath(full))}, outside the folder: refused (copy it in)")
        for name in images:
            rel = os.path.relpath(os.path.join(here, name), root)
            reason = unlistable(rel)
            if reason:
                unlisted.append((rel, reason))
            else:
                files.append(rel)
    files.sort()
    return Split(root, os.path.basename(root), [f"{root}/{rel}" for rel in files], None, None), unlisted


def read_input(spec: str, data_root: str) -> tuple[Split, list[tuple[str, str]]]:
    """The images predict.input names, as a Split whose paths are root + '/' + the path to write; plus the
    folder's image files it cannot list (always none for a split or CSV)."""
    if spec in SPLITS:
        split, unlisted = read_split(data_root, spec), []
    elif spec.endswith(".csv"):
        if not os.path.isfile(spec):
            raise StageError(f"predict.input={spec}: no such file")
        split, unlisted = read_split(data_root, spec), []
    elif os.path.isdir(spec):
        split, unlisted = image_folder(spec)
    else:
        raise StageError(f"predict.input={spec}: expected a split name ({', '.join(SPLITS)}), a CSV file or a folder")
    if len(split) == 0:
        raise StageError(f"predict.input={spec}: no images to label"
                         + (f" ({', '.join(IMAGE_EXTENSIONS)} files)" if os.path.isdir(spec) else ""))
    return split, unlisted


def trained_image_size(model: str) -> int:
    """data.image_size of the config.yaml a stage wrote beside `model`."""
    path = os.path.join(os.path.dirname(os.path.abspath(model)), rundir.CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            size = (yaml.safe_load(f) or {}).get("data", {}).get("image_size")
    except (OSError, yaml.YAMLError, AttributeError):
        size = None
    if not isinstance(size, int) or size < 8:
        raise ConfigError(f"predict.scales=[]: {path} does not say which image size {model} was trained at; "
                          "set predict.scales=[PX] (or predict.tta_from)")
    return size


def evaluated_views(tta_from: str, model: str, warn: bool = True) -> tuple[list[int], bool]:
    """The TTA scales and mirrors an evaluate run chose on val (or used, evaluate.tta=all): its eval.json's
    tta_scales and tta_mirror (absent, as before evaluate.mirror: no mirrors)."""
    path = tta_from if os.path.isfile(tta_from) else os.path.join(tta_from, "eval.json")
    key = f"predict.tta_from={tta_from}"
    try:
        result = engine.read_json(path)
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path} ({e.strerror})") from None
    except ValueError as e:
        raise ConfigError(f"{key}: {path} is not JSON ({e})") from None
    splits = result.get("splits") if isinstance(result, dict) else None
    chosen = (splits.get("val") or next(iter(splits.values()), None)) if isinstance(splits, dict) else None
    scales = chosen.get("tta_scales") if isinstance(chosen, dict) else None
    if scales is None:
        raise ConfigError(f"{key}: {path} records no TTA scales (a kNN evaluation?)")
    if not isinstance(scales, list) or not scales or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 8 for s in scales):
        raise ConfigError(f"{key}: {path}: tta_scales {scales!r}: expected sizes >= 8 px")
    mirror = chosen.get("tta_mirror", False)
    if not isinstance(mirror, bool):
        raise ConfigError(f"{key}: {path}: tta_mirror {mirror!r}: expected true or false")
    scored = result.get("model", "")   # as evaluate was given it: relative to where it ran, maybe not here
    if (warn and isinstance(scored, str) and os.path.isfile(scored)
            and os.path.realpath(scored) != os.path.realpath(model)):
        tqdm.write(f"warning: {key}: {path} chose its views for {scored}, not {model}", file=sys.stderr)
    return scales, mirror


def tta_views(cfg, rt) -> tuple[list[int], bool]:
    """(scales, mirrored): predict.scales and predict.mirror, or tta_from's, or the trained image size."""
    p = cfg.predict
    if p.tta_from:
        return evaluated_views(p.tta_from, p.model, warn=rt.is_main)
    return (list(p.scales) or [trained_image_size(p.model)]), p.mirror


def sha1_of_file(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(split: Split, model: str, scales: list[int], mirror: bool) -> dict:
    """What a resumed run must find unchanged: the rows (their paths, in order), the model's bytes and the
    TTA views (tta_from's eval.json may have changed since)."""
    rows = hashlib.sha1("\n".join(relative_paths(split)).encode("utf-8", "surrogateescape")).hexdigest()
    return {"rows": len(split), "rows_sha1": rows, "model_sha1": sha1_of_file(model), "scales": scales,
            "mirror": mirror}


def relative_paths(split: Split) -> list[str]:
    return [p[len(split.root) + 1:] for p in split.paths]


# ---- the run dir: resumed, finished ----

def check_previous_inputs(cfg, inputs: dict):
    """Reads only, on rank 0 before engine.Run claims run.dir: its own refusals first (rundir.check), then
    a started run's inputs.json against this run's (a changed input, model or TTA views refuse it)."""
    out = cfg.run.dir
    rundir.check(out, STAGE, config.to_dict(cfg), cfg.run.restart)
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
    raise rundir.RunDirError(f"run.dir={out}: holds a {STAGE} run made before {' and '.join(changed or ['its inputs'])} "
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


# ---- labeling ----

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
                with open(base + ".csv.tmp", "wb") as joined:
                    for r in range(rt.world):
                        with open(f"{base}.rank-{r}.csv", "rb") as f:
                            shutil.copyfileobj(f, joined)
                os.replace(base + ".csv.tmp", base + ".csv")
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
    with open(os.path.join(out, PREDICTIONS + ".tmp"), "w", encoding="utf-8", newline="") as f:
        f.write(",".join(header) + "\n")
        for k in range(count):
            chunk = engine.read_json(chunk_base(out, k) + ".json")
            with open(chunk_base(out, k) + ".csv", encoding="utf-8", newline="") as part:
                shutil.copyfileobj(part, f)
            for key in totals:
                totals[key] += chunk.get(key, 0)
            bad += [tuple(b) for b in chunk["bad"]]
    os.replace(os.path.join(out, PREDICTIONS + ".tmp"), os.path.join(out, PREDICTIONS))
    engine.write_text(os.path.join(out, BAD_IMAGES), "".join(f"{shown(p)}\t{reason}\n" for p, reason in bad))
    return {**totals, "bad": bad}


def main(argv=None):
    cfg = engine.parse(PredictConfig, argv, "A classifier's class, confidence and top-k for every image of a "
                                            "split, a CSV or a folder, written to run.dir/predictions.csv")
    check(cfg)
    if os.path.isdir(cfg.predict.model):   # config.yaml records the model.pt read
        cfg = replace(cfg, predict=replace(cfg.predict, model=os.path.join(cfg.predict.model, "model.pt")))
    names = read_classes(cfg.data.root)
    split, unlisted = read_input(cfg.predict.input, cfg.data.root)
    refuse_bad_images(cfg, unlisted)
    labels = split.labels if split.labels is not None else split.hidden_labels
    rt = dist.init(cfg.run.device)
    scales, mirror = tta_views(cfg, rt)
    if cfg.inference.batch_size % rt.world:
        raise ConfigError(f"inference.batch_size={cfg.inference.batch_size}: expected a multiple of the "
                          f"{rt.world} ranks")
    model, _ = load_classifier(cfg.predict.model, num_classes=len(names))
    model = rt.place(model).eval()
    count = -(-len(split) // cfg.predict.chunk_size)
    inputs = fingerprint(split, cfg.predict.model, scales, mirror) if rt.is_main else None
    refusal = None
    if rt.is_main:
        try:
            check_previous_inputs(cfg, inputs)
        except rundir.RunDirError as e:
            refusal = str(e)
    refusal = dist.broadcast_object(refusal)   # every rank stops with rank 0's one line
    if refusal:
        raise rundir.RunDirError(refusal)
    run = engine.Run(STAGE, cfg, rt)   # every check has passed: the first write
    claimed = None
    if rt.is_main:
        try:
            claimed = resume_point(run, inputs, count)
        except rundir.RunDirError as e:
            claimed = str(e)
    claimed = dist.broadcast_object(claimed)
    if isinstance(claimed, str):
        raise rundir.RunDirError(claimed)
    finished, done = claimed
    views = f"scales {scales} px{' and their mirrors' if mirror else ''}"
    if finished:
        if rt.is_main and os.path.isdir(run.path(CHUNKS)):
            shutil.rmtree(run.path(CHUNKS))
        run.say(f"{run.dir} holds a finished run of this config ({run.path(PREDICTIONS)}); nothing to do "
                "(--restart redoes it)")
        return
    if done:
        run.say(f"resuming: {len(done)} of {count} chunks already labeled")
    t0 = time.time()
    labeled = label_chunks(model, split, cfg, rt, run, scales, mirror, names, labels, done)
    seconds = time.time() - t0
    if rt.is_main:
        totals = merge(run.dir, count, min(cfg.predict.top_k, len(names)), unlisted)
        bad = totals.pop("bad")
        summary = {"model": cfg.predict.model, "input": cfg.predict.input, "images": len(split) + len(unlisted),
                   "labeled": totals["labeled"], "bad_images": len(bad), "scales": scales, "mirror": mirror,
                   "ranks": rt.world, "seconds": round(seconds, 3), "images_this_run": labeled,
                   "img_per_s": round(labeled / seconds, 1) if labeled else None}
        if totals["scored"]:
            summary.update(top1=totals["top1_hits"] / totals["scored"], top5=totals["top5_hits"] / totals["scored"],
                           scored=totals["scored"])
        engine.write_json(run.path(SUMMARY), summary)
        run.log(event="done", **{k: summary[k] for k in ("labeled", "bad_images", "img_per_s")})
        shutil.rmtree(run.path(CHUNKS))
        if bad:
            run.say(f"skipped {len(bad)} unreadable image(s) (listed in {run.path(BAD_IMAGES)}): "
                    + ", ".join(shown(p) for p, _ in bad[:5]) + (", ..." if len(bad) > 5 else ""))
        scored = (f"; top-1 {summary['top1']:.4f}, top-5 {summary['top5']:.4f} on {summary['scored']} labeled "
                  "images" if "top1" in summary else "")
        rate = (f"{labeled} images read by this run in {seconds:.1f} s: {summary['img_per_s']:.0f} img/s on "
                f"{rt.world} rank(s)" if labeled else "nothing left to label")
        run.say(f"{summary['labeled']} of {summary['images']} images -> {run.path(PREDICTIONS)} ({views}){scored}; "
                f"{rate}")
    dist.barrier()


if __name__ == "__main__":
    engine.cli(main)
