"""Active learning's queries out to Label Studio and its exports back (trainer/operations/label_studio.py).

The exports are fixtures written here in the formats Label Studio 1.23 (label-studio 1.23.2 on PyPI)
documents and writes: the JSON export (a list of tasks, each with its data, annotations and predictions;
an annotation's result a list of {from_name, to_name, type: "choices", value: {choices: [...]}}, skipped
ones was_cancelled), and its converter's CSV and JSON-MIN exports (one record per annotation that was not
skipped, and one with no label per task no one annotated; the CSV's columns sorted, strings quoted). The
label-studio package itself is not installed here: label-studio-sdk 2.1.2, which holds the converter,
brings some forty packages (opencv-python-headless, pandas, nltk, black, ...) and would take this
environment's numpy from 2.4 back to 2.2, and label-studio (the server) adds Django to them.
"""
import copy
import csv
import json
import os
import re
import urllib.parse
import xml.etree.ElementTree as ET

import pytest

import test_annotate
from test_active import QUERIES, rows
from data.datasets import read_classes
from data.errors import InputError
from launch import active

oracle_run, queries_run = test_annotate.oracle_run, test_annotate.queries_run   # the fixtures this module builds on


@pytest.fixture(scope="module")
def exported(queries_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("label-studio")
    active.main(["export", str(queries_run), "--format", "label-studio", "--out", str(out)])
    with open(out / "tasks.json") as f:
        return json.load(f), out


def test_the_queries_become_import_tasks_with_the_guess_as_a_prediction(oracle_run, queries_run, exported):
    data = oracle_run[0]
    tasks, out = exported
    queries, classes = rows(queries_run / "queries.csv"), read_classes(data)
    assert len(tasks) == QUERIES
    for n, (task, query) in enumerate(zip(tasks, queries)):
        assert task["data"] == {"image": "/data/local-files/?d=" + urllib.parse.quote(query["path"]),
                                "path": query["path"], "query": n + 1, "cluster": int(query["cluster"]),
                                "margin": float(query["margin"])}
        (prediction,) = task["predictions"]
        assert prediction["score"] == float(query["confidence"]) and 0 < prediction["score"] <= 1
        assert prediction["result"] == [{"from_name": "label", "to_name": "image", "type": "choices",
                                         "value": {"choices": [query["guess"]]}}]
    view = ET.parse(out / "labeling_config.xml").getroot()
    (image,), (choices,) = view.findall("Image"), view.findall("Choices")
    assert (image.get("name"), image.get("value")) == ("image", "$image")
    assert (choices.get("name"), choices.get("toName")) == ("label", "image")
    assert [c.get("value") for c in choices.findall("Choice")] == classes


def test_images_are_found_under_the_document_root_or_a_url(oracle_run, queries_run, tmp_path, capsys):
    data = oracle_run[0]
    path = rows(queries_run / "queries.csv")[0]["path"]
    parent = os.path.dirname(data)
    for option, image in ((["--document-root", parent], f"/data/local-files/?d={os.path.basename(data)}/{path}"),
                          (["--url-prefix", "https://host/my data/"], f"https://host/my data/{path}")):
        active.main(["export", str(queries_run), "--format", "label-studio", "--out", str(tmp_path), *option])
        with open(tmp_path / "tasks.json") as f:
            assert json.load(f)[0]["data"]["image"] == image
    with pytest.raises(InputError, match=f"^--document-root {re.escape(str(tmp_path))}: .* is not inside it"):
        active.main(["export", str(queries_run), "--format", "label-studio", "--out", str(tmp_path),
                     "--document-root", str(tmp_path)])


STAMP = "2026-09-14T10:00:00.000000Z"


def annotation(task_id, number, choice, cancelled=False):
    """An annotation as Label Studio's JSON export has it; choice None: submitted without a class."""
    result = [] if choice is None else [{"id": f"r{task_id}-{number}", "type": "choices", "value": {"choices": [choice]},
                                         "origin": "manual", "to_name": "image", "from_name": "label"}]
    return {"id": 100 * task_id + number, "completed_by": number, "result": result, "was_cancelled": cancelled,
            "ground_truth": False, "created_at": STAMP, "updated_at": STAMP, "draft_created_at": None,
            "lead_time": 4.2, "prediction": {}, "result_count": len(result), "unique_id": f"u{task_id}-{number}",
            "import_id": None, "last_action": None, "bulk_created": False, "task": task_id, "project": 1,
            "updated_by": number, "parent_prediction": None, "parent_annotation": None, "last_created_by": None}


def label_studio_export(tasks, annotate):
    """The JSON export of the imported `tasks`, annotated by `annotate(n)` -> [(choice, cancelled), ...]."""
    out = []
    for n, task in enumerate(tasks):
        task_id = n + 1
        annotations = [annotation(task_id, k + 1, choice, cancelled) for k, (choice, cancelled) in enumerate(annotate(n))]
        out.append({"id": task_id, "annotations": annotations, "file_upload": "tasks.json", "drafts": [],
                    "predictions": [{"id": task_id, "model_version": "semiscale", "created_ago": "1 hour",
                                     "score": p["score"], "result": copy.deepcopy(p["result"]), "cluster": None, "neighbors": None,
                                     "mislabeling": 0, "created_at": STAMP, "updated_at": STAMP, "model": None,
                                     "model_run": None, "task": task_id, "project": 1}
                                    for p in task["predictions"]],
                    "data": copy.deepcopy(task["data"]), "meta": {}, "created_at": STAMP, "updated_at": STAMP, "inner_id": task_id,
                    "total_annotations": sum(not c for _, c in annotate(n)),
                    "cancelled_annotations": sum(c for _, c in annotate(n)), "total_predictions": 1,
                    "comment_count": 0, "unresolved_comment_count": 0, "last_comment_updated_at": None,
                    "project": 1, "updated_by": 1, "comment_authors": []})
    return out


def converter_records(export):
    """The converter's records, as its CSV and JSON-MIN exports write them: one per annotation not skipped, one
    without a label per task no one annotated (its data, the choice under from_name, who and when)."""
    records = []
    for task in export:
        kept = [a for a in task["annotations"] if not a["was_cancelled"]]
        for a in kept or ([] if task["annotations"] else [{}]):
            record = {"id": task["id"], **task["data"], "annotator": a.get("completed_by"),
                      "annotation_id": a.get("id"), "created_at": a.get("created_at"), "updated_at": a.get("updated_at"),
                      "lead_time": a.get("lead_time"), "was_cancelled": a.get("was_cancelled")}
            for r in a.get("result", []):
                record[r["from_name"]] = r["value"]["choices"][0]   # one choice: the converter writes the name
            records.append(record)
    return records


def write_csv_export(path, records):
    keys = sorted({"annotator", "annotation_id", "created_at", "updated_at", "lead_time", "was_cancelled"}
                  .union(*map(set, records)))
    with open(path, "w", encoding="utf8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, quoting=csv.QUOTE_NONNUMERIC)
        writer.writeheader()
        writer.writerows(records)


def test_label_studios_exports_import_as_the_labels_chosen_in_it(oracle_run, queries_run, exported, tmp_path):
    data, _, _, _, args = oracle_run
    tasks, _ = exported
    classes, queries = read_classes(data), rows(queries_run / "queries.csv")
    hidden = {r["path"]: int(r["label"]) for r in rows(os.path.join(data, "unlabeled.csv"))}
    truth = [classes[hidden[q["path"]]] for q in queries]

    def annotate(n):   # what the annotators did with query n
        return {1: [(truth[1], True)],                        # skipped: unanswered
                2: [],                                        # no one got to it
                3: [(truth[3], False), (truth[3], False)],    # two annotators who agree
                4: [(None, False)],                           # submitted without a class: unsure
                5: [(classes[0], True), (truth[5], False)],   # one skipped, one answered
                }.get(n, [(truth[n], False)])

    export = label_studio_export(tasks, annotate)
    files = {"json": tmp_path / "export.json", "csv": tmp_path / "export.csv", "json-min": tmp_path / "min.json"}
    files["json"].write_text(json.dumps(export, indent=2))
    write_csv_export(files["csv"], converter_records(export))
    files["json-min"].write_text(json.dumps(converter_records(export)))
    answered = [n for n in range(QUERIES) if n not in (1, 2, 4)]
    expected = rows(os.path.join(data, "labeled.csv")) + [{"path": queries[n]["path"], "label": str(hidden[queries[n]["path"]])}
                                                         for n in answered]
    for kind, path in files.items():
        run = test_annotate.copy_run(queries_run, tmp_path / kind)
        active.main(["import", str(path), *args, f"run.dir={run}"])
        assert rows(run / "labeled.csv") == expected, kind
        summary = json.load(open(run / "answers_summary.json"))
        assert (summary["answered"], summary["answer_accuracy"]) == (len(answered), 1.0), kind


@pytest.mark.parametrize("edit, message", [
    (lambda t: t[6]["annotations"].append(annotation(7, 2, "Coat")), "task 7: its annotations disagree ('QUERY7', 'Coat')"),
    (lambda t: t[6]["annotations"][0]["result"][0]["value"].update(choices=["Dragon"]),
     "task 7: label 'Dragon' is neither a class name"),
    (lambda t: t[6]["annotations"][0]["result"][0]["value"].update(choices=["Bag", "Coat"]),
     "task 7: label {'choices': ['Bag', 'Coat']}: expected one chosen class"),
    (lambda t: t[6]["data"].pop("path"), "task 7: no data.path: expected tasks made by `active.py export"),
    (lambda t: t[6]["data"].update(path="images/train/99999.png"), "task 7: images/train/99999.png is not one of the"),
    (lambda t: t[7]["data"].update(path=t[6]["data"]["path"]), "task 8: QUERYPATH7 is already answered on task 7"),
])
def test_a_bad_export_names_the_task(oracle_run, queries_run, exported, tmp_path, edit, message):
    data, _, _, _, args = oracle_run
    tasks, _ = exported
    queries = rows(queries_run / "queries.csv")
    export = label_studio_export(tasks, lambda n: [("Bag" if n == 7 else "Shirt", False)])
    export[6]["annotations"][0]["result"][0]["value"]["choices"] = ["Sandal"]
    edit(export)
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    message = message.replace("QUERY7", "Sandal").replace("QUERYPATH7", queries[6]["path"])
    run = test_annotate.copy_run(queries_run, tmp_path / "run")
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}:{re.escape(message)}"):
        active.main(["import", str(path), *args, f"run.dir={run}"])
    assert not os.path.exists(run / "labeled.csv")


def test_a_file_that_is_not_an_export_is_refused_in_one_line(oracle_run, queries_run, tmp_path):
    args = oracle_run[4]
    path = tmp_path / "export.json"
    path.write_text('{"tasks": [1, 2')
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: cannot read it as a Label Studio JSON export"):
        active.main(["import", str(path), *args, f"run.dir={test_annotate.copy_run(queries_run, tmp_path / 'run')}"])
