"""Active learning: labels for the unlabeled images the model is least sure of, spread over the
clusters of their self-supervised embeddings.

    python launch/active.py [run] --config configs/demo/active.yaml [key=value ...]
    python launch/active.py import ANSWERS.csv --config configs/demo/active.yaml [key=value ...]

run: embeds every unlabeled image that active.labeled does not already label with active.backbone
(L2-normalised, streamed to run.dir/embeddings.npy) and classifies it with active.model (top2.npy,
guess.npy); clusters the embeddings with spherical k-means (active.clusters); takes from each cluster the images with the
smallest margin p1 - p2 of the model's softmax, the budget split evenly over the clusters. Writes
run.dir/queries.csv (path,cluster,margin,guess; most uncertain first; query number = data row),
assignment.npy (every candidate's cluster) and contact sheets for the annotator: queries.png
(queries 1-100), queries-2.png (101-200), ... With active.oracle=true the hidden labels of
unlabeled.csv then answer the queries (simulations; nothing beyond the queries is revealed).

import (the same as active.answers=ANSWERS.csv): an annotator's answers to run.dir/queries.csv, a CSV
with columns path and label (label = class name or class id; an empty label leaves the image out), e.g.
a copy of queries.csv with a label column added.

Answers become run.dir/labeled.csv = active.labeled + the answers (paths relative to data.root, so
`fixmatch.labeled=RUN_DIR/labeled.csv` reads it) and run.dir/answers_summary.json.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import csv  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import posixpath  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw, ImageFont, ImageOps  # noqa: E402

from data.datasets import load_image, read_classes, read_split  # noqa: E402
from trainer import cluster, config, dist, engine, knn  # noqa: E402
from trainer.config import ActiveConfig  # noqa: E402
from trainer.loading import eval_loader  # noqa: E402
from trainer.models import build_backbone, load_backbone_weights, load_classifier  # noqa: E402
from trainer.predict import stream_rows  # noqa: E402

QUERY_COLUMNS = ["path", "cluster", "margin", "guess"]


# ---- configuration ----

def parse(argv):
    """`[run] ...` or `import ANSWERS.csv ...` -> the config (import sets active.answers)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["import"]:
        if len(argv) < 2 or argv[1].startswith("-"):
            raise config.ConfigError("import: expected the answers CSV: active.py import ANSWERS.csv --config ...")
        argv = argv[2:] + [f"active.answers={argv[1]}", "active.oracle=false"]   # the file answers, not the oracle
    elif argv[:1] == ["run"]:
        argv = argv[1:]
    cfg = engine.parse(ActiveConfig, argv, "Active learning: margin queries per cluster, then their answers")
    if cfg.active.oracle and cfg.active.answers:
        raise config.ConfigError("active.oracle and active.answers: choose one source of answers")
    return cfg


def query_count(budget: float, pool: int) -> int:
    """active.budget < 1: that fraction of the labeled + unlabeled images (rounded); >= 1: a number of queries."""
    if budget >= 1 and budget != int(budget):
        raise config.ConfigError(f"active.budget={budget}: a number of queries must be whole (or < 1 for a fraction)")
    count = round(budget * pool) if budget < 1 else int(budget)
    if count < 1:
        raise config.ConfigError(f"active.budget={budget}: asks for {count} queries out of a pool of {pool} images")
    return count


def check_counts(clusters: int, queries: int, images: int):
    if not 1 <= clusters <= queries <= images:
        raise config.ConfigError(f"active.clusters={clusters}, active.budget -> {queries} queries: expected "
                                 f"1 <= clusters <= queries <= the {images} candidate images")


def candidates(cfg):
    """(unlabeled images not in active.labeled, active.labeled, the size of the pool the budget counts)."""
    unlabeled = read_split(cfg.data.root, "unlabeled")
    labeled = read_split(cfg.data.root, cfg.active.labeled)
    if labeled.labels is None:
        raise config.ConfigError(f"active.labeled={cfg.active.labeled!r}: expected a split with a label column")
    known = set(labeled.paths)
    keep = np.array([p not in known for p in unlabeled.paths], bool)
    hidden = None if unlabeled.hidden_labels is None else unlabeled.hidden_labels[keep]
    pool = dataclasses.replace(unlabeled, name="candidates", paths=[p for p, k in zip(unlabeled.paths, keep) if k],
                               hidden_labels=hidden)
    return pool, labeled, len(known | set(unlabeled.paths))


def relative(split, path: str) -> str:
    return os.path.relpath(path, split.root)


# ---- inference: unit SSL embeddings (streamed) and the model's top-2 ----

@torch.no_grad()
def predict(ssl, model, loader, rt, out_dir: str, num_rows: int, precision: str):
    """out_dir/{embeddings,top2,guess}.npy: unit SSL embeddings, the model's top-2 probabilities and
    its guess per row, streamed; rank 0 gets the mask of rows covered (an undecodable image's is not)."""
    ssl.eval()
    model.eval()

    def embedding_top2_guess(views):
        probs, classes = torch.softmax(model(views[0]).float(), 1).topk(2, dim=1)
        return torch.cat([F.normalize(ssl(views[0]).float(), dim=1), probs, classes[:, :1].float()], 1)

    columns = [(os.path.join(out_dir, "embeddings.npy"), ssl.out_dim, np.float32),
               (os.path.join(out_dir, "top2.npy"), 2, np.float32), (os.path.join(out_dir, "guess.npy"), 1, np.int64)]
    return stream_rows(embedding_top2_guess, loader, rt, columns, num_rows, precision)


# ---- queries ----

def select_queries(embeddings, top2, covered, count, cfg, gpu=None):
    """(chosen rows ordered by margin, their margins, every row's cluster (-1: uncovered), k-means seconds)."""
    rows = np.flatnonzero(covered)
    check_counts(cfg.active.clusters, count, len(rows))
    x = embeddings if len(rows) == len(covered) else embeddings[rows]
    t0 = time.time()
    kmeans = cluster.spherical_kmeans(x, cfg.active.clusters, niter=cfg.active.niter, seed=cfg.run.seed,
                                      max_points_per_centroid=cfg.active.max_points_per_centroid or None, gpu=gpu)
    seconds = time.time() - t0
    chosen = cluster.margin_query(top2[rows], kmeans.assignment, count, cfg.active.clusters)
    assignment = np.full(len(covered), -1, np.int64)
    assignment[rows] = kmeans.assignment
    return rows[chosen], cluster.margins(top2[rows[chosen]]), assignment, seconds


def write_queries(path, split, chosen, margin, assignment, guess, classes):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(QUERY_COLUMNS)
        for row, m in zip(chosen, margin):
            writer.writerow([relative(split, split.paths[row]), int(assignment[row]), f"{m:.6f}", classes[guess[row]]])
    os.replace(tmp, path)


def read_queries(path) -> list[dict]:
    if not os.path.exists(path):
        raise engine.StageError(f"{path}: not found; run `launch/active.py --config ...` with this run.dir first")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


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
        sheet.save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
        written.append(path)
    return written


# ---- answers ----

def class_of(text: str, classes: list[str]):
    """A class id from a class name or an id; None when it is neither. Names win over ids."""
    if text in classes:
        return classes.index(text)
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 <= value < len(classes) else None


def import_answers(path: str, queries: list[dict], queries_path: str, root: str, classes: list[str]) -> dict:
    """{query path: class id} from an annotator's CSV; bad rows raise one line naming path:line."""
    queried = {q["path"] for q in queries}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header, *rows = list(csv.reader(f)) or [[]]
    except (OSError, UnicodeDecodeError) as e:
        raise engine.StageError(f"{path}: cannot read the answers ({e})") from None
    if "path" not in header or "label" not in header:
        raise engine.StageError(f"{path}:1: expected a header with columns path and label, got {header}")
    path_col, label_col = header.index("path"), header.index("label")
    answers, lines = {}, {}
    for lineno, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise engine.StageError(f"{path}:{lineno}: expected {len(header)} fields ({','.join(header)}), got {row}")
        rel, label = posixpath.normpath(row[path_col].strip()), row[label_col].strip()
        if rel.startswith("/") or rel == ".." or rel.startswith("../"):
            raise engine.StageError(f"{path}:{lineno}: path {row[path_col]!r} escapes the dataset: expected a path "
                                    f"relative to and inside {root}")
        if rel not in queried:
            raise engine.StageError(f"{path}:{lineno}: {rel} is not one of the {len(queried)} queries in "
                                    f"{queries_path}")
        if rel in lines:
            raise engine.StageError(f"{path}:{lineno}: {rel} is already answered on line {lines[rel]}")
        lines[rel] = lineno
        if not label:   # the annotator could not tell
            continue
        answer = class_of(label, classes)
        if answer is None:
            raise engine.StageError(f"{path}:{lineno}: label {label!r} is neither a class name in "
                                    f"{root}/classes.txt nor a class id in [0, {len(classes)})")
        answers[rel] = answer
    return answers


def oracle_answers(queries: list[dict], unlabeled) -> dict:
    """The hidden labels of the queried images, and of no other image."""
    if unlabeled.hidden_labels is None:
        raise engine.StageError(f"active.oracle: {unlabeled.root}/unlabeled.csv has no hidden label column")
    hidden = dict(zip((relative(unlabeled, p) for p in unlabeled.paths), unlabeled.hidden_labels))
    return {q["path"]: int(hidden[q["path"]]) for q in queries}


def write_labeled(path: str, labeled, answers: dict):
    """labeled.csv = the labeled split's rows, then the answers; paths relative to the dataset root."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows((relative(labeled, p), int(y)) for p, y in zip(labeled.paths, labeled.labels))
        writer.writerows((p, y) for p, y in answers.items())
    os.replace(tmp, path)


def summarise(source, queries, answers, labeled, unlabeled, classes) -> dict:
    answered = [q for q in queries if q["path"] in answers]
    guess_right = [classes.index(q["guess"]) == answers[q["path"]] for q in answered]
    summary = {"source": source, "queries": len(queries), "answered": len(answered),
               "labeled_before": len(labeled), "labeled_after": len(labeled) + len(answered),
               "guess_accuracy": float(np.mean(guess_right)) if answered else None,   # the model on its queries
               "answer_accuracy": None,
               "class_counts": np.bincount(list(answers.values()), minlength=len(classes)).tolist()}
    if unlabeled.hidden_labels is not None and answered:   # simulations: how good the answers were
        hidden = dict(zip((relative(unlabeled, p) for p in unlabeled.paths), unlabeled.hidden_labels))
        summary["answer_accuracy"] = float(np.mean([hidden[q["path"]] == answers[q["path"]] for q in answered]))
    return summary


# ---- the stage ----

def check(cfg) -> tuple:
    """(candidate pool, query count) once the checks that need the data but no model have passed; the
    pipeline runs them too before it deletes or runs anything."""
    pool, _, pool_size = candidates(cfg)
    count = query_count(cfg.active.budget, pool_size)
    check_counts(cfg.active.clusters, count, len(pool))
    return pool, count


def query_inputs(cfg, rt, classes):
    """(candidate pool, query count, classifier, SSL backbone, loader), every check done, nothing written."""
    pool, count = check(cfg)
    model, arch = load_classifier(cfg.active.model)
    if arch["num_classes"] != len(classes):
        raise engine.StageError(f"{cfg.active.model}: a {arch['num_classes']}-class model, but "
                                f"{cfg.data.root}/classes.txt names {len(classes)} classes")
    ssl = build_backbone(cfg.model.backbone, cfg.model.small_stem, cfg.model.width)
    load_backbone_weights(ssl, cfg.active.backbone)
    return pool, count, model, ssl, eval_loader(pool, cfg, rt, cfg.inference.batch_size)


def make_queries(cfg, rt, run, classes, inputs) -> dict:
    pool, count, model, ssl, loader = inputs
    run.say(f"{len(pool)} candidate images, {count} queries over {cfg.active.clusters} clusters")
    t0 = time.time()
    covered = predict(rt.place(ssl), rt.place(model), loader, rt, run.dir, len(pool), cfg.inference.precision)
    timing = {"inference_seconds": time.time() - t0}
    if rt.is_main:
        embeddings = np.load(run.path("embeddings.npy"), mmap_mode="r")
        top2, guess = np.load(run.path("top2.npy")), np.load(run.path("guess.npy"))[:, 0]
        chosen, margin, assignment, timing["kmeans_seconds"] = select_queries(embeddings, top2, covered, count, cfg,
                                                                              knn.faiss_gpu(rt.device))
        np.save(run.path("assignment.npy"), assignment)
        write_queries(run.path("queries.csv"), pool, chosen, margin, assignment, guess, classes)
        t1 = time.time()
        sheets = write_contact_sheets(run.dir, [pool.paths[i] for i in chosen], [classes[guess[i]] for i in chosen])
        timing["sheet_seconds"] = time.time() - t1
        run.say(f"{len(chosen)} queries in {run.path('queries.csv')}, contact sheets {', '.join(sheets)}; "
                f"k-means {timing['kmeans_seconds']:.1f} s")
        run.log(candidates=len(pool), uncovered=int((~covered).sum()), queries=len(chosen),
                mean_margin=float(margin.mean()), **{k: round(v, 3) for k, v in timing.items()})
    dist.barrier()
    return {"queries": count, **timing}


def collect_answers(cfg, classes):
    """(source, queries, answers, unlabeled, labeled): the oracle's or the annotator's CSV, checked."""
    queries_csv = os.path.join(cfg.run.dir, "queries.csv")
    queries = read_queries(queries_csv)
    unlabeled = read_split(cfg.data.root, "unlabeled")
    labeled = read_split(cfg.data.root, cfg.active.labeled)
    if cfg.active.oracle:
        return "oracle", queries, oracle_answers(queries, unlabeled), unlabeled, labeled
    answers = import_answers(cfg.active.answers, queries, queries_csv, os.path.abspath(cfg.data.root), classes)
    return cfg.active.answers, queries, answers, unlabeled, labeled


def answer_queries(cfg, run, classes, collected) -> dict:
    source, queries, answers, unlabeled, labeled = collected or collect_answers(cfg, classes)
    write_labeled(run.path("labeled.csv"), labeled, answers)
    summary = summarise(source, queries, answers, labeled, unlabeled, classes)
    engine.write_json(run.path("answers_summary.json"), summary)
    run.say(f"{summary['answered']} of {summary['queries']} queries answered ({source}); "
            f"{run.path('labeled.csv')} holds {summary['labeled_after']} labels")
    return {k: summary[k] for k in ("answered", "labeled_after", "guess_accuracy", "answer_accuracy")}


def main(argv=None):
    cfg = parse(argv)
    classes = read_classes(cfg.data.root)
    rt = dist.init(cfg.run.device)
    engine.check_dataset(cfg, rt, cfg.active.labeled)
    # an annotator's answers are checked before anything is written; the oracle's follow the queries
    imported = collect_answers(cfg, classes) if cfg.active.answers else None
    inputs = None if cfg.active.answers else query_inputs(cfg, rt, classes)
    run = engine.Run("active", cfg, rt)   # every check has passed: the first write
    t0 = time.time()
    done = make_queries(cfg, rt, run, classes, inputs) if inputs else {}
    if rt.is_main and (cfg.active.oracle or cfg.active.answers):
        done.update(answer_queries(cfg, run, classes, imported))
    run.log(event="done", total_seconds=round(time.time() - t0, 3), **done)
    dist.barrier()


if __name__ == "__main__":
    engine.cli(main)
