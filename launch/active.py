"""Active learning: labels for the unlabeled images the model is least sure of, spread over the
clusters of their self-supervised embeddings.

    python launch/active.py [run] --config configs/demo/active.yaml [key=value ...]
    python launch/active.py import ANSWERS.csv --config configs/demo/active.yaml [key=value ...]
    python launch/active.py serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--answers ANSWERS.csv]
    python launch/active.py export RUN_DIR --format label-studio [--out DIR] [--document-root DIR | --url-prefix URL]

run: embeds every unlabeled image that active.labeled does not already label with active.backbone
(L2-normalised, each rank's block of candidates streamed to run.dir/embeddings.rank-<r>.npy) and classifies it
with active.model (top2.rank-<r>.npy, guess.rank-<r>.npy); clusters the embeddings with spherical k-means
(active.clusters, or as many clusters as queries when the budget buys fewer: said in one line), fitted on
active.clusters x active.max_points_per_centroid of them; takes from each cluster the images with the
smallest margin p1 - p2 of the model's softmax, the budget split evenly over the clusters. Every rank assigns
and ranks its own rows a chunk at a time and rank 0 merges their candidates
(trainer/algorithms/active_learning.select_queries). Writes
run.dir/queries.csv (path,cluster,margin,guess,runner_up,confidence: the guess's probability; most uncertain
first; query number = data row),
assignment.rank-<r>.npy (the clusters of rank r's candidates; the ranks' files in rank order are the
candidates in order) and contact sheets for the annotator: queries.png
(queries 1-100), queries-2.png (101-200), ... With active.oracle=true the hidden labels of
unlabeled.csv then answer the queries (simulations; nothing beyond the queries is revealed); a query on
an image of a class outside the class list (`prepare fashion-mnist --open-set-classes`) is answered
"none of the classes" and stays out of labeled.csv, and answers_summary.json counts such queries
(outside_classes), as the summary line says. Without answers (active.oracle=false), run.dir/answering.json
names where they go (run.dir/answers.csv) and the import command that reads them, for serve.

serve: the annotation page (trainer/operations/annotate.py) for the queries of RUN_DIR, on 127.0.0.1:8000
(through an SSH tunnel from a laptop): one query at a time, the model's guess and runner-up first, every
class a click or a key; each answer is written to the answers CSV the moment it is given (default:
answering.json's), and once all are given the page shows the command that goes on.

export --format label-studio: the queries of RUN_DIR as Label Studio import tasks, DIR/tasks.json (the
model's guess as a prediction scored by its probability) and DIR/labeling_config.xml (one choice per class);
DIR defaults to RUN_DIR/label-studio (trainer/operations/label_studio.py). Images as Label Studio's local
file storage serves them, relative to --document-root (its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; default:
data.root), or --url-prefix + their dataset paths.

import (the same as active.answers=ANSWERS.csv): an annotator's answers to run.dir/queries.csv, a CSV
with columns path and label (label = class name or class id; an empty label leaves the image out), e.g.
a copy of queries.csv with a label column added, the annotation page's answers, or Label Studio's CSV
export of the exported tasks; or Label Studio's JSON (or JSON-MIN) export of them, ANSWERS.json.

Answers become run.dir/labeled.csv = active.labeled + the answers (paths relative to data.root, so
`fixmatch.labeled=RUN_DIR/labeled.csv` reads it) and run.dir/answers_summary.json.
"""
import argparse
import os
import shlex
import sys
import time

from data.datasets import read_classes
from trainer import dist
from trainer.algorithms import active_learning, knn
from trainer.operations import annotate, annotations
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
    shard = active_learning.embed_and_classify(rt.place(ssl), rt.place(model), loader, rt, run.dir, len(pool),
                                               cfg.inference.precision)
    timing = {"inference_seconds": time.time() - t0}
    queries, seconds = active_learning.select_queries(
        shard, count, clusters, niter=cfg.active.niter, seed=cfg.run.seed,
        max_points_per_centroid=cfg.active.max_points_per_centroid or None, gpu=knn.faiss_gpu(rt.device))
    timing.update(seconds)
    if rt.is_main:
        annotations.write_queries(run.path("queries.csv"), pool, queries, classes)
        t1 = time.time()
        sheets = annotations.write_contact_sheets(run.dir, [pool.paths[i] for i in queries.rows],
                                                  [classes[guess] for guess in queries.guesses[:, 0]])
        timing["sheet_seconds"] = time.time() - t1
        for sheet in sheets:
            run.log_image(sheet)
        run.say(f"{len(queries.rows)} queries in {run.path('queries.csv')}, contact sheets {', '.join(sheets)}; "
                f"k-means {timing['kmeans_seconds']:.1f} s, assignment {timing['assignment_seconds']:.1f} s, "
                f"choice {timing['choice_seconds']:.1f} s")
        run.log(candidates=len(pool), uncovered=queries.uncovered, queries=len(queries.rows), clusters=clusters,
                mean_margin=float(queries.margin.mean()), **{k: round(v, 3) for k, v in timing.items()})
    dist.barrier()
    return {"queries": count, **timing}


def serve(argv):
    parser = argparse.ArgumentParser(prog="active.py serve", description="The annotation page for the queries "
                                     "of an active learning run dir (see launch/active.py).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the active stage's run.dir, holding queries.csv")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port, said when it starts")
    parser.add_argument("--answers", help="the answers CSV to write (default: the one RUN_DIR/answering.json "
                                          "names, else RUN_DIR/answers.csv)")
    args = parser.parse_args(argv)
    annotate.serve(args.run_dir, args.answers, args.host, args.port)


def export(argv):
    parser = argparse.ArgumentParser(prog="active.py export", description="The queries of an active learning run "
                                     "dir as another tool's import (see launch/active.py).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the active stage's run.dir, holding queries.csv")
    parser.add_argument("--format", required=True, choices=["label-studio"])
    parser.add_argument("--out", help="the folder to write (default: RUN_DIR/label-studio)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--document-root", help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, a folder "
                                               "holding the dataset (default: data.root)")
    where.add_argument("--url-prefix", default="", help="images at URL_PREFIX/<dataset path> instead (a web server)")
    args = parser.parse_args(argv)
    print("[active] " + annotations.export_label_studio(args.run_dir, args.out, args.document_root, args.url_prefix),
          flush=True)


def ask_for_answers(run, argv: list[str]):
    """The queries wait for a person: answering.json names run.dir/answers.csv and the command that imports it
    (the pipeline puts its own in their place when it pauses), and one line names the annotation page."""
    script = os.path.relpath(os.path.abspath(__file__))
    answers = run.path("answers.csv")
    given = [a for a in (argv[1:] if argv[:1] == ["run"] else argv)
             if not a.startswith(("active.answers=", "active.oracle="))]
    annotate.write_next_step(run.dir, answers, ["python", script, "import", answers, *given])
    run.say(f"answer them in your browser: {shlex.join(['python', script, 'serve', run.dir])} (its page ends "
            f"with the command that goes on), or by hand in {answers}, columns path,label")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    if argv[:1] == ["export"]:
        return export(argv[1:])
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
    elif rt.is_main:
        ask_for_answers(run, argv)
    run.log(event="done", total_seconds=round(time.time() - t0, 3), **done)
    dist.barrier()


if __name__ == "__main__":
    engine.cli(main)
