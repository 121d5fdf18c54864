"""What an annotator sees and sends back in active learning: queries.csv, contact sheets of the queried
images, and the answers (an annotator's CSV, handed in by `active.py import`, checked row by row; or the
hidden labels of a simulation) merged into labeled.csv with a summary of how they went (launch/active.py).
"""
from __future__ import annotations

import csv
import math
import os
import posixpath

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont, ImageOps

from data import atomic
from data.datasets import Split, load_image, read_classes, read_split
from data.labels import OUTSIDE_CLASSES, label_ids, landed_outside, outside_classes, read_csv
from trainer.operations import label_studio
from trainer.runtime import engine, rundir
from trainer.runtime.config import ConfigError
from trainer.runtime.engine import StageError

QUERY_COLUMNS = ["path", "cluster", "margin", "guess", "runner_up", "confidence"]


def _relative(split: Split, path: str) -> str:
    return os.path.relpath(path, split.root)


# ---- queries.csv ----

def write_queries(path, split: Split, queries, classes):
    """queries.csv: path,cluster,margin,guess,runner_up,confidence per query (active_learning.Queries: rows of
    `split`), in their order (query n = data row n); confidence: the guess's probability."""
    with atomic.writing(path) as f:
        writer = csv.writer(f)
        writer.writerow(QUERY_COLUMNS)
        for row, cluster, margin, (guess, runner_up), (confidence, _) in zip(
                queries.rows, queries.cluster, queries.margin, queries.guesses, queries.top2):
            writer.writerow([_relative(split, split.paths[row]), int(cluster), f"{margin:.6f}", classes[guess],
                             classes[runner_up], f"{confidence:.6f}"])


def active_run_config(run_dir: str) -> dict:
    """The resolved config of the active learning run in `run_dir` (its config.yaml), for what reads its
    queries after the run: the annotation page, the Label Studio export."""
    if rundir.recorded_stage(run_dir) != "active":
        raise StageError(f"{run_dir}: not an active learning run dir (no {rundir.RUN_RECORD} naming the active "
                         "stage): expected the run.dir of `launch/active.py`, e.g. runs/demo/active")
    with open(os.path.join(run_dir, rundir.CONFIG), encoding="utf-8") as f:
        return yaml.safe_load(f)


def export_label_studio(run_dir: str, out: str | None, document_root: str | None, url_prefix: str) -> str:
    """RUN_DIR's queries as Label Studio's import (OUT, default RUN_DIR/label-studio: tasks.json and the
    labeling config); returns the line that says what to do with them."""
    root = os.path.abspath(active_run_config(run_dir)["data"]["root"])
    document_root = os.path.abspath(document_root or root)
    written = label_studio.export(out or os.path.join(run_dir, "label-studio"),
                                  read_queries(os.path.join(run_dir, "queries.csv")), read_classes(root), root,
                                  document_root, url_prefix)
    storage = ("" if url_prefix else f"add a local files storage for {root} (LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"
               f"=true, LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={document_root}), ")
    return (f"Label Studio: {', '.join(written)}. In a project, paste the labeling config as its labeling "
            f"interface, {storage}import tasks.json; once labeled, export JSON or CSV and pass that file to "
            "`active.py import` or pipeline.answers=")


def read_queries(path) -> list[dict]:
    """queries.csv's rows as dicts keyed by QUERY_COLUMNS."""
    if not os.path.exists(path):
        raise StageError(f"{path}: not found; run `launch/active.py --config ...` with this run.dir first")
    header, rows = read_csv(path, "the queries")
    return [dict(zip(header, row)) for row in rows]


# ---- contact sheets ----

THUMB, COLUMNS, ROWS_PER_PAGE, PAD, LINE = 128, 10, 10, 6, 16


def sheet_names(num_queries: int, per_page: int) -> list[str]:
    """queries.png, then queries-2.png, queries-3.png, ... for the following pages."""
    pages = max(1, math.ceil(num_queries / per_page))
    return ["queries.png"] + [f"queries-{p}.png" for p in range(2, pages + 1)]


def _fit_text(draw, text, font, width):
    while draw.textlength(text, font=font) > width and len(text) > 1:
        text = text[:-2] + "…"
    return text


def write_contact_sheets(out_dir, image_paths, captions, per_page=COLUMNS * ROWS_PER_PAGE) -> list[str]:
    """Numbered thumbnails (query number, caption below) in pages of `per_page`; returns the files written.

    Small images are enlarged to THUMB px so an annotator can judge them.
    """
    font, bold = ImageFont.load_default(size=13), ImageFont.load_default(size=15)
    cell_w, cell_h = THUMB + 2 * PAD, THUMB + 2 * LINE + 2 * PAD
    n = len(image_paths)
    written = []
    for page, name in enumerate(sheet_names(n, per_page)):
        first, last = page * per_page, min(n, (page + 1) * per_page)
        rows = max(1, math.ceil((last - first) / COLUMNS))
        sheet = Image.new("RGB", (COLUMNS * cell_w, 2 * LINE + rows * cell_h), "white")
        draw = ImageDraw.Draw(sheet)
        draw.text((PAD, PAD), f"queries {first + 1}-{last} of {n} (page {page + 1}): #n = row n of queries.csv "
                              "after its header; below it, the model's guess", fill="black", font=bold)
        for i in range(first, last):
            x = (i - first) % COLUMNS * cell_w + PAD
            y = 2 * LINE + (i - first) // COLUMNS * cell_h + PAD
            image = ImageOps.contain(load_image(image_paths[i]), (THUMB, THUMB), Image.Resampling.BICUBIC)
            sheet.paste(image, (x + (THUMB - image.width) // 2, y + (THUMB - image.height) // 2))
            draw.rectangle((x - 1, y - 1, x + THUMB, y + THUMB), outline="#999999")
            draw.text((x, y + THUMB + 2), f"#{i + 1}", fill="black", font=bold)
            draw.text((x, y + THUMB + 2 + LINE), _fit_text(draw, captions[i], font, THUMB), fill="#333333", font=font)
        path = os.path.join(out_dir, name)
        with atomic.replacing(path) as tmp:
            sheet.save(tmp, format="PNG")
        written.append(path)
    return written


# ---- answers ----

def import_answers(path: str, queries: list[dict], queries_path: str, root: str, classes: list[str]) -> dict:
    """{query path: class id}, in query order, from an annotator's answers: a CSV with columns path and label
    (the annotation page's, one by hand, Label Studio's CSV export) or Label Studio's JSON export (.json);
    bad rows raise one line naming path:line (path:task ID). Its labels are class names or class ids
    (data.labels.label_ids: a column of one kind)."""
    queried = {q["path"] for q in queries}
    rows = label_studio.answer_rows(path) if path.endswith(".json") else _csv_answer_rows(path)
    answered, lines = [], {}   # (path, label, line) of the rows that give a label; path -> (line, label)
    for line, given_path, label in rows:
        rel, label = posixpath.normpath(given_path.strip()), label.strip()
        if rel.startswith("/") or rel == ".." or rel.startswith("../"):
            raise StageError(f"{path}:{line}: path {given_path!r} escapes the dataset: expected a path "
                             f"relative to and inside {root}")
        if rel not in queried:
            raise StageError(f"{path}:{line}: {rel} is not one of the {len(queried)} queries in {queries_path}")
        if rel in lines:   # the same answer twice (Label Studio's CSV: a row per annotator) is one answer
            if lines[rel][1] == label:
                continue
            first = lines[rel][0]
            on = f"line {first}" if isinstance(first, int) else first
            raise StageError(f"{path}:{line}: {rel} is already answered on {on}, with another label")
        lines[rel] = (line, label)
        if label:   # empty: the annotator could not tell
            answered.append((rel, label, line))
    ids = label_ids([label for _, label, _ in answered], [line for *_, line in answered], path, classes,
                    f"{root}/classes.txt")
    given = {rel: c for (rel, _, _), c in zip(answered, ids)}
    # in the order of the queries, not of the rows (the annotation page writes them as given): labeled.csv,
    # and so what trains on it, does not depend on the order in which the queries were answered
    return {q["path"]: given[q["path"]] for q in queries if q["path"] in given}


def _csv_answer_rows(path: str) -> list[tuple[int, str, str]]:
    """(line, path, label) per row of an answers CSV, whose header names the columns path and label."""
    header, rows = read_csv(path, "the answers")
    if "path" not in header or "label" not in header:
        raise StageError(f"{path}:1: expected a header with columns path and label, got {header}")
    path_col, label_col = header.index("path"), header.index("label")
    for lineno, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise StageError(f"{path}:{lineno}: expected {len(header)} fields ({','.join(header)}), got {row}")
    return [(lineno, row[path_col], row[label_col]) for lineno, row in enumerate(rows, start=2)]


def imported_answers(run_dir: str) -> dict:
    """{query path: class id} that run_dir/labeled.csv took from the answers (its rows of queried images): what
    the steps after active learning were trained on, whatever file or oracle gave them."""
    queried = {q["path"] for q in read_queries(os.path.join(run_dir, "queries.csv"))}
    header, rows = read_csv(os.path.join(run_dir, "labeled.csv"), "the labeled images")
    path, label = header.index("path"), header.index("label")
    return {row[path]: int(row[label]) for row in rows if row[path] in queried}


def check_oracle(cfg, pool: Split):
    """active.oracle=true answers with the hidden labels of unlabeled.csv: a simulation's, not your own images'."""
    if cfg.active.oracle and not cfg.active.answers and pool.hidden_labels is None:
        raise ConfigError(f"active.oracle=true: {cfg.data.root}/unlabeled.csv has no hidden labels to answer "
                          "the queries with (your own images): active.oracle=false writes the queries for "
                          "you to label")


def oracle_answers(queries: list[dict], unlabeled: Split) -> dict:
    """The hidden labels of the queried images, and of no other image. An image of a class outside the
    class list (an open-set simulation) is answered "none of the classes": no answer, as an annotator's
    empty label, so it stays out of labeled.csv (answers_summary counts it)."""
    if unlabeled.hidden_labels is None:
        raise StageError(f"active.oracle: {unlabeled.root}/unlabeled.csv has no hidden label column")
    hidden = dict(zip((_relative(unlabeled, p) for p in unlabeled.paths), unlabeled.hidden_labels))
    return {q["path"]: int(hidden[q["path"]]) for q in queries if hidden[q["path"]] != OUTSIDE_CLASSES}


def import_argv(argv: list[str]) -> list[str]:
    """active.py's `import ANSWERS.csv ARGS...` as a run's ARGS: the CSV answers, not the oracle."""
    if len(argv) < 2 or argv[1].startswith("-"):
        raise ConfigError("import: expected the answers CSV: active.py import ANSWERS.csv --config ...")
    return argv[2:] + [f"active.answers={argv[1]}", "active.oracle=false"]


def collect_answers(cfg, classes) -> tuple:
    """(source, queries, answers, unlabeled, labeled): the oracle's answers (active.oracle) or the
    annotator's CSV (active.answers), checked."""
    queries_csv = os.path.join(cfg.run.dir, "queries.csv")
    queries = read_queries(queries_csv)
    unlabeled = read_split(cfg.data.root, "unlabeled")
    labeled = read_split(cfg.data.root, cfg.active.labeled)
    if cfg.active.oracle:
        return "oracle", queries, oracle_answers(queries, unlabeled), unlabeled, labeled
    answers = import_answers(cfg.active.answers, queries, queries_csv, os.path.abspath(cfg.data.root), classes)
    return cfg.active.answers, queries, answers, unlabeled, labeled


def record_answers(run, classes, collected: tuple) -> dict:
    """run.dir/labeled.csv and answers_summary.json from collect_answers' answers; the summary's headline
    numbers for the run's done event."""
    source, queries, answers, unlabeled, labeled = collected
    write_labeled(run.path("labeled.csv"), labeled, answers)
    summary = answers_summary(source, queries, answers, labeled, unlabeled, classes)
    engine.write_json(run.path("answers_summary.json"), summary)
    outside = landed_outside(summary, summary["queries"], "queries")
    if summary.get("outside_classes") and source == "oracle":
        outside += " (the oracle answers them none of the classes: they stay out of labeled.csv)"
    run.say(f"{summary['answered']} of {summary['queries']} queries answered ({source}){outside}; "
            f"{run.path('labeled.csv')} holds {summary['labeled_after']} labels")
    return {k: summary[k] for k in ("answered", "labeled_after", "guess_accuracy", "answer_accuracy", "outside_classes")
            if k in summary}


def write_labeled(path: str, labeled: Split, answers: dict):
    """labeled.csv = the labeled split's rows, then the answers; paths relative to the dataset root."""
    with atomic.writing(path) as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows((_relative(labeled, p), int(y)) for p, y in zip(labeled.paths, labeled.labels))
        writer.writerows((p, y) for p, y in answers.items())


def answers_summary(source, queries, answers, labeled: Split, unlabeled: Split, classes) -> dict:
    """answers_summary.json: how many queries were answered, and how often the model's guess was right."""
    answered = [q for q in queries if q["path"] in answers]
    guess_right = [classes.index(q["guess"]) == answers[q["path"]] for q in answered]
    summary = {"source": source, "queries": len(queries), "answered": len(answered),
               "labeled_before": len(labeled), "labeled_after": len(labeled) + len(answered),
               "guess_accuracy": float(np.mean(guess_right)) if answered else None,   # the model on its queries
               "answer_accuracy": None,
               "class_counts": np.bincount(list(answers.values()), minlength=len(classes)).tolist()}
    if unlabeled.hidden_labels is not None:   # simulations: how good the answers were, how many queries were wasted
        hidden = dict(zip((_relative(unlabeled, p) for p in unlabeled.paths), unlabeled.hidden_labels))
        if answered:
            summary["answer_accuracy"] = float(np.mean([hidden[q["path"]] == answers[q["path"]] for q in answered]))
        summary.update(outside_classes(unlabeled.hidden_labels, np.array([hidden[q["path"]] for q in queries])))
    return summary
