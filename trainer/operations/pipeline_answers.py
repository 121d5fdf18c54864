"""Active learning's answers in the pipeline: who answers the queries (the hidden labels, your CSV, or no
one yet), checked before any stage runs, and the line that pauses the pipeline for your labels."""
import os
import shlex

import yaml

from data.datasets import read_classes, read_split
from trainer.operations import annotate, annotations
from trainer.runtime import config, rundir
from trainer.runtime.config import PipelineSection
from trainer.runtime.stages import STAGES


def answers_from(p: PipelineSection) -> list[str]:
    """Who answers active learning's queries: the hidden labels (oracle), your CSV, or no one yet (queries only)."""
    if p.oracle:
        return ["active.oracle=true"]
    return ["active.oracle=false", f"active.answers={os.path.abspath(p.answers) if p.answers else ''}"]


def queries_waiting(folder: str, argv: list[str]) -> bool:
    """The active stage's folder holds finished queries, not yet answered, made with the config it would run
    with now: rerunning it would only compute them again."""
    metrics = os.path.join(folder, rundir.METRICS)
    if not os.path.exists(os.path.join(folder, "queries.csv")) or not os.path.exists(metrics):
        return False
    if not any(e.get("event") == "done" for e in rundir.read_lines(metrics)):
        return False
    with open(os.path.join(folder, rundir.CONFIG), encoding="utf-8") as f:
        previous = yaml.safe_load(f)
    current = config.to_dict(STAGES["active"].parse(argv))
    return not rundir.config_differences(previous, current)


def check_answers(cfg, active_dir: str, active_argv: list[str] | None, forced: bool) -> int:
    """Active learning's answers can come from where the config says, before anything runs: hidden labels for
    the oracle; for pipeline.answers, queries made with this config, and every row of the file a query and a
    class of classes.txt (or empty). `active_argv`: the active step's, None when active learning is off;
    `forced`: its folder is deleted first (--force). Returns how many answers differ from those a finished
    active step imported (0 when it has imported none yet): the pipeline imports them again and reruns the
    steps that read them."""
    p = cfg.pipeline
    if active_argv is None:
        return 0
    finished = not forced and os.path.exists(os.path.join(active_dir, STAGES["active"].done))
    if p.oracle and p.answers:
        raise config.ConfigError(f"pipeline.answers={p.answers}: with pipeline.oracle=true the hidden labels answer "
                                 "the queries; pass pipeline.oracle=false to use your answers")
    if p.oracle and not finished and read_split(cfg.data.root, "unlabeled").hidden_labels is None:
        raise config.ConfigError(f"pipeline.oracle=true: {cfg.data.root}/unlabeled.csv has no hidden labels to answer "
                                 "active learning's queries (your own images): pass pipeline.oracle=false to label "
                                 "the queries yourself, or pipeline.active_learning=false to leave active learning out")
    if not p.answers:
        return 0
    if not finished and (forced or not queries_waiting(active_dir, active_argv)):
        raise config.ConfigError(f"pipeline.answers={p.answers}: no queries to answer in {active_dir}/queries.csv yet: "
                                 "run without pipeline.answers first; it stops once they are written")
    queries_csv = os.path.join(active_dir, "queries.csv")
    answers = annotations.import_answers(p.answers, annotations.read_queries(queries_csv), queries_csv,
                                         os.path.abspath(cfg.data.root), read_classes(cfg.data.root))
    if not finished:
        return 0
    imported = annotations.imported_answers(active_dir)
    changed = sum(answers.get(path) != imported.get(path) for path in answers.keys() | imported.keys())
    if changed and not queries_waiting(active_dir, active_argv):
        raise config.ConfigError(f"pipeline.answers={p.answers}: differs from the answers in {active_dir}/labeled.csv, "
                                 f"but {active_dir}/queries.csv was made with another active config than this run's: "
                                 "pass --force active to make new queries")
    return changed


def pause_line(script: str, args, cfg, active_dir: str) -> str:
    """What to label, where to write it, and the command (`script` with the same config and overrides, and
    pipeline.answers) that goes on from there; the annotation page (`active.py serve`, named first) learns
    the last two from active_dir/answering.json, written here."""
    queries = os.path.join(active_dir, "queries.csv")
    with open(queries, encoding="utf-8") as f:
        count = sum(1 for _ in f) - 1
    sheets = sorted((n for n in os.listdir(active_dir) if n.startswith("queries") and n.endswith(".png")),
                    key=lambda n: (len(n), n))
    answers = os.path.join(cfg.run.dir, "answers.csv")
    command = ["python", os.path.relpath(script), "--config", args.config,
               *(o for o in args.overrides if not o.startswith("pipeline.answers=")), f"pipeline.answers={answers}"]
    annotate.write_next_step(active_dir, answers, command)
    serve = ["python", os.path.relpath(os.path.join(os.path.dirname(script), "active.py")), "serve", active_dir]
    return (f"[pipeline] paused for your labels: answer them in your browser with {shlex.join(serve)} (a page "
            f"on 127.0.0.1:8000 that writes {answers}), or label the {count} images of {queries} (pictures: "
            f"{', '.join(sheets)}) in {answers} by hand, columns path,label (e.g. queries.csv with its column guess "
            f"renamed label and the wrong guesses corrected; a label is a class name of "
            f"{os.path.join(cfg.data.root, 'classes.txt')}, empty when unsure), then continue with: "
            f"{shlex.join(command)}")
