"""Active learning's queries in Label Studio's formats, and its exports back as answers.

Out (`active.py export RUN_DIR --format label-studio`): OUT/tasks.json, one import task per query, in the
order of queries.csv: data.image (the image as Label Studio's local file storage serves it,
/data/local-files/?d=PATH with PATH relative to LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; or --url-prefix
+ the dataset path, for images served over HTTP), data.path (the query's path in queries.csv: what
brings an answer back to its query), data.query/cluster/margin, and the model's guess as a prediction
whose score is the guess's probability; OUT/labeling_config.xml, an image with one choice per class of
classes.txt (from_name "label", to_name "image").

Back (`active.py import EXPORT`, `pipeline.answers=EXPORT`): a Label Studio JSON export of those tasks
(answer_rows here), its JSON-MIN export, or its CSV export, which is a CSV with the columns path (the
task's data) and label (the choice) that annotations.import_answers reads as it reads any answers CSV.
A task no one annotated, or whose annotations were all skipped (was_cancelled), stays unanswered.
"""
from __future__ import annotations

import json
import os
import urllib.parse
from xml.sax.saxutils import quoteattr

from data import atomic
from data.errors import InputError

FROM_NAME, TO_NAME = "label", "image"   # the labeling config's Choices and Image: the CSV export's label column
LOCAL_FILES = "/data/local-files/?d="
MODEL_VERSION = "semiscale"


def labeling_config(classes: list[str]) -> str:
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in classes)
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" showInline="true">\n'
            f"{choices}\n  </Choices>\n</View>\n")


def image_url(root: str, path: str, document_root: str, url_prefix: str) -> str:
    """Where Label Studio finds the query at `path` (relative to the dataset `root`)."""
    if url_prefix:
        return url_prefix.rstrip("/") + "/" + urllib.parse.quote(path)
    inside = os.path.relpath(os.path.join(root, path), document_root)
    if inside == ".." or inside.startswith("../"):
        raise InputError(f"--document-root {document_root}: {os.path.join(root, path)} is not inside it: expected "
                         "the folder LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT names, holding the dataset")
    return LOCAL_FILES + urllib.parse.quote(inside)


def tasks(queries: list[dict], root: str, document_root: str, url_prefix: str) -> list[dict]:
    """One Label Studio import task per query (queries.csv's rows), the model's guess as its prediction."""
    out = []
    for n, q in enumerate(queries):
        confidence = float(q["confidence"]) if q.get("confidence") else None
        result = {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [q["guess"]]}}
        prediction = {"model_version": MODEL_VERSION, "result": [result],
                      **({"score": confidence} if confidence is not None else {})}
        out.append({"data": {"image": image_url(root, q["path"], document_root, url_prefix), "path": q["path"],
                             "query": n + 1, "cluster": int(q["cluster"]), "margin": float(q["margin"])},
                    "predictions": [prediction]})
    return out


def export(out_dir: str, queries: list[dict], classes: list[str], root: str, document_root: str,
           url_prefix: str) -> list[str]:
    """OUT/tasks.json and OUT/labeling_config.xml; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "tasks.json"), os.path.join(out_dir, "labeling_config.xml")]
    atomic.write_json(written[0], tasks(queries, root, document_root, url_prefix))
    atomic.write_text(written[1], labeling_config(classes))
    return written


def answer_rows(path: str) -> list[tuple[str, str, str]]:
    """(where, query path, label) per answered task of a Label Studio JSON or JSON-MIN export: `where` names the
    task ("task ID") in messages; label "" where the annotator chose no class. Bad structure raises one line."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            exported = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it as a Label Studio JSON export ({e})") from None
    exported = [exported] if isinstance(exported, dict) else exported
    if not isinstance(exported, list):
        raise InputError(f"{path}: expected a Label Studio JSON export (a list of tasks), got {type(exported).__name__}")
    rows = []
    for position, task in enumerate(exported, start=1):
        if not isinstance(task, dict):
            raise InputError(f"{path}: item {position}: expected a task (a JSON object), got {task!r:.60}")
        where = f"task {task.get('id', position)}"
        full = "data" in task   # the JSON export; JSON-MIN flattens each annotation with its task's data
        data = task["data"] if full else task
        if not isinstance(data, dict) or not isinstance(data.get("path"), str):
            raise InputError(f"{path}:{where}: no data.path: expected tasks made by `active.py export --format "
                             "label-studio`, whose data.path names the query")
        labels = _annotated_labels(path, where, task) if full else [_choice(path, where, task.get(FROM_NAME))]
        if len(set(labels)) > 1:
            raise InputError(f"{path}:{where}: its annotations disagree ({', '.join(map(repr, labels))}): expected "
                             "one class per image; settle it in Label Studio and export again")
        if labels:
            rows.append((where, data["path"], labels[0]))
    return rows


def _annotated_labels(path: str, where: str, task: dict) -> list[str]:
    """The class each annotation of `task` that was not skipped chose ("" for none)."""
    labels = []
    for annotation in task.get("annotations") or task.get("completions") or []:
        if annotation.get("was_cancelled") or annotation.get("skipped"):
            continue
        chosen = [r.get("value", {}).get("choices") for r in annotation.get("result", [])
                  if r.get("from_name") == FROM_NAME and r.get("type") == "choices"]
        labels.append(_choice(path, where, {"choices": chosen[0]} if chosen else None))
    return labels


def _choice(path: str, where: str, value) -> str:
    """A choices result's class: a name (JSON-MIN's one choice), {"choices": [name]}, or none ("")."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value
    choices = value.get("choices") if isinstance(value, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], str):
        raise InputError(f"{path}:{where}: {FROM_NAME} {value!r}: expected one chosen class")
    return choices[0]
