"""Labels out: a classifier's predicted class, confidence and top-k for every image of a split, of a CSV
of images or of a folder of images.

    python launch/predict.py --config configs/demo/predict.yaml [predict.model=RUN_DIR|MODEL.pt]
        [predict.input=SPLIT|CSV|DIR] [predict.scales=[PX,...] [predict.mirror=true] | predict.tta_from=EVAL_RUN]
        [run.dir=OUT] [--restart] [key=value ...]
    torchrun --nproc_per_node=8 launch/predict.py --config configs/paper/predict.yaml   # every rank its share

predict.model: a model.pt, or the run dir that holds one (config.yaml records the model.pt). predict.input:
a split name (labeled, val, test, unlabeled: data.root/<name>.csv; ./test is a folder of that name); a CSV
file (ending in .csv) with a `path` column whose paths are relative to data.root, as a split's (an optional
`label` column of class ids scores the predictions); or a folder: every image in its tree (.jpg .jpeg .jfif
.png .bmp .gif .tif .tiff .webp .ppm .pgm .avif .heic .heif, any case; names starting with '.' skipped; one
this Pillow cannot decode is listed in bad_images.txt with why), paths written relative to it. A symlink that leads out of the folder refuses the run. data.root/classes.txt names the classes.

TTA views, averaged with trainer.algorithms.tta's functions (evaluate's): predict.scales=[28,36] averages the softmax
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

The machinery: trainer.operations.labeling_inputs (what to label, at which views; a folder: data.image_folders) and
trainer.operations.predictions_csv (the chunked, resumable writer).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace

from data.datasets import read_classes
from trainer.operations.labeling_inputs import check_views, read_input, tta_views
from trainer.operations.predictions_csv import (CHUNKS, PREDICTIONS, SUMMARY, claim_run_dir, fingerprint, label_chunks,
                                                merge, refuse_bad_images, say_done, scores)
from trainer import dist
from trainer.runtime import engine
from trainer.runtime.config import ConfigError
from trainer.runtime.stages import STAGES
from trainer.runtime.models import load_classifier

STAGE = "predict"


def check(cfg):
    """The checks that read no file (the pipeline runs them before any stage runs)."""
    check_views(cfg)


def main(argv=None):
    cfg = STAGES["predict"].parse(argv)
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
    model, _ = load_classifier(cfg.predict.model, cfg.data.root)
    model = rt.place(model).eval()
    count = -(-len(split) // cfg.predict.chunk_size)
    inputs = fingerprint(split, cfg.predict.model, scales, mirror) if rt.is_main else None
    run, finished, done = claim_run_dir(cfg, rt, STAGE, inputs, count)   # rank 0 checks run.dir, then claims it
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
                   "img_per_s": round(labeled / seconds, 1) if labeled else None} | scores(totals)
        engine.write_json(run.path(SUMMARY), summary)
        run.log(event="done", **{k: summary[k] for k in ("labeled", "bad_images", "img_per_s")})
        shutil.rmtree(run.path(CHUNKS))
        say_done(run, summary, bad, seconds)
    dist.barrier()


if __name__ == "__main__":
    engine.cli(main)
