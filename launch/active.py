"""Active learning: labels for the unlabeled images the model is least sure of, spread over the
clusters of their self-supervised embeddings.

    python launch/active.py [run] --config configs/demo/active.yaml [key=value ...]
    python launch/active.py import ANSWERS.csv --config configs/demo/active.yaml [key=value ...]

run: embeds every unlabeled image that active.labeled does not already label with active.backbone
(L2-normalised, streamed to run.dir/embeddings.npy) and classifies it with active.model (top2.npy,
guess.npy); clusters the embeddings with spherical k-means (active.clusters, or as many clusters as queries when
the budget buys fewer: said in one line); takes from each cluster the images with the smallest margin p1 - p2 of
the model's softmax, the budget split evenly over the clusters. Writes
run.dir/queries.csv (path,cluster,margin,guess; most uncertain first; query number = data row),
assignment.npy (every candidate's cluster) and contact sheets for the annotator: queries.png
(queries 1-100), queries-2.png (101-200), ... With active.oracle=true the hidden labels of
unlabeled.csv then answer the queries (simulations; nothing beyond the queries is revealed); a query on
an image of a class outside the class list (`prepare fashion-mnist --open-set-classes`) is answered
"none of the classes" and stays out of labeled.csv, and answers_summary.json counts such queries
(outside_classes), as the summary line says.

import (the same as active.answers=ANSWERS.csv): an annotator's answers to run.dir/queries.csv, a CSV
with columns path and label (label = class name or class id; an empty label leaves the image out), e.g.
a copy of queries.csv with a label column added.

Answers become run.dir/labeled.csv = active.labeled + the answers (paths relative to data.root, so
`fixmatch.labeled=RUN_DIR/labeled.csv` reads it) and run.dir/answers_summary.json.
"""
import sys
import time

from data import atomic
from data.datasets import read_classes
from trainer import dist
from trainer.algorithms import active_learning, knn
from trainer.operations import annotations
from trainer.runtime import config, engine, stages
from trainer.runtime.loading import eval_loader
from trainer.runtime.models import load_backbone, load_classifier


def parse(argv):
    """`[run] ...` or `import ANSWERS.csv ...` -> the config (import sets active.answers)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["import"]:
        argv = annotations.import_argv(argv)
    elif argv[:1] == ["run"]:
        argv = argv[1:]
    cfg = stages.STAGES["active"].parse(argv)
    if cfg.active.oracle and cfg.active.answers:
        raise config.ConfigError("active.oracle and active.answers: choose one source of answers")
    return cfg


def check(cfg) -> tuple:
    """(candidate pool, query count, cluster count) once the checks that need the data but no model have
    passed; the pipeline runs them too before it deletes or runs anything. A budget that buys fewer queries
    than active.clusters gets one cluster per query (each cluster gives at least one)."""
    pool, _, pool_size = active_learning.candidates(cfg.data.root, cfg.active.labeled)
    annotations.check_oracle(cfg, pool)
    count = active_learning.query_count(cfg.active, pool_size)
    clusters = min(cfg.active.clusters, count)
    active_learning.check_counts(clusters, count, len(pool), active_learning.budget(cfg.active)[0])
    return pool, count, clusters


def query_inputs(cfg, rt, classes):
    """(candidate pool, query count, cluster count, classifier, SSL backbone, loader), every check done,
    nothing written."""
    pool, count, clusters = check(cfg)
    model, _ = load_classifier(cfg.active.model, cfg.data.root)
    ssl = load_backbone(cfg.active.backbone)
    return pool, count, clusters, model, ssl, eval_loader(pool, cfg, rt, cfg.inference.batch_size)


def make_queries(cfg, rt, run, classes, inputs) -> dict:
    pool, count, clusters, model, ssl, loader = inputs
    if clusters < cfg.active.clusters:
        key, given = active_learning.budget(cfg.active)
        run.say(f"active.clusters={cfg.active.clusters} is more than the {count} queries that {key}={given} buys: "
                f"{clusters} clusters instead, one query each")
    run.say(f"{len(pool)} candidate images, {count} queries over {clusters} clusters")
    t0 = time.time()
    covered = active_learning.embed_and_classify(rt.place(ssl), rt.place(model), loader, rt, run.dir, len(pool),
                                                 cfg.inference.precision)
    timing = {"inference_seconds": time.time() - t0}
    if rt.is_main:
        embeddings, top2, guess = active_learning.read_embedded(run.dir)
        chosen, margin, assignment, timing["kmeans_seconds"] = active_learning.select_queries(
            embeddings, top2, covered, count, clusters, niter=cfg.active.niter, seed=cfg.run.seed,
            max_points_per_centroid=cfg.active.max_points_per_centroid or None, gpu=knn.faiss_gpu(rt.device))
        atomic.save_npy(run.path("assignment.npy"), assignment)
        annotations.write_queries(run.path("queries.csv"), pool, chosen, margin, assignment, guess, classes)
        t1 = time.time()
        sheets = annotations.write_contact_sheets(run.dir, [pool.paths[i] for i in chosen],
                                                  [classes[guess[i]] for i in chosen])
        timing["sheet_seconds"] = time.time() - t1
        run.say(f"{len(chosen)} queries in {run.path('queries.csv')}, contact sheets {', '.join(sheets)}; "
                f"k-means {timing['kmeans_seconds']:.1f} s")
        run.log(candidates=len(pool), uncovered=int((~covered).sum()), queries=len(chosen), clusters=clusters,
                mean_margin=float(margin.mean()), **{k: round(v, 3) for k, v in timing.items()})
    dist.barrier()
    return {"queries": count, **timing}


def main(argv=None):
    cfg = parse(argv)
    classes = read_classes(cfg.data.root)
    rt = dist.init(cfg.run.device)
    engine.check_dataset(cfg, rt, cfg.active.labeled)
    # an annotator's answers are checked before anything is written; the oracle's follow the queries
    imported = annotations.collect_answers(cfg, classes) if cfg.active.answers else None
    inputs = None if cfg.active.answers else query_inputs(cfg, rt, classes)
    run = engine.Run("active", cfg, rt)   # every check has passed: the first write
    t0 = time.time()
    done = make_queries(cfg, rt, run, classes, inputs) if inputs else {}
    if rt.is_main and (cfg.active.oracle or cfg.active.answers):
        done.update(annotations.record_answers(run, classes, imported or annotations.collect_answers(cfg, classes)))
    run.log(event="done", total_seconds=round(time.time() - t0, 3), **done)
    dist.barrier()


if __name__ == "__main__":
    engine.cli(main)
