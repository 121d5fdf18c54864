import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import ROOT, TINY_INFERENCE, fashion, pixels, save_backbone, stage, tiny_classifier
from data.datasets import read_classes, read_split
from data.errors import InputError
from launch import active
from trainer.algorithms import active_learning
from trainer.operations import annotations
from trainer.runtime import config
from trainer.algorithms.cluster import split_budget
from trainer.runtime.models import build_backbone

ACTIVE = os.path.join(ROOT, "configs", "demo", "active.yaml")
QUERIES, CLUSTERS = 12, 4


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    """A tiny classifier and SSL backbone, and one oracle-answered active run over them."""
    data = fashion(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("active")
    model = tiny_classifier(data, tmp / "model.pt")
    torch.manual_seed(1)
    backbone = build_backbone("small", width=8).eval()
    save_backbone(backbone, str(tmp / "backbone.pt"))
    args = ["--config", ACTIVE, f"data.root={data}", f"active.model={tmp / 'model.pt'}",
            f"active.backbone={tmp / 'backbone.pt'}", f"active.budget={QUERIES}", f"active.clusters={CLUSTERS}",
            "active.max_points_per_centroid=0", *TINY_INFERENCE]
    active.main([*args, f"run.dir={tmp / 'run'}", "active.oracle=true"])
    return data, model, backbone, tmp / "run", args


@pytest.fixture(scope="module")
def expected(oracle_run):
    """Computed here: the candidates (unlabeled minus labeled), their margins, guesses and unit embeddings."""
    data, model, backbone, _, _ = oracle_run
    unlabeled, labeled = read_split(data, "unlabeled"), read_split(data, "labeled")
    candidates = [p for p in unlabeled.paths if p not in set(labeled.paths)]
    with torch.no_grad():
        x = pixels(candidates, 28)
        probs = torch.softmax(model(x), 1).numpy().astype(np.float64)
        embeddings = torch.nn.functional.normalize(backbone(x), dim=1).numpy()
    top2 = np.sort(probs, axis=1)[:, -2:]
    return {"rows": {os.path.relpath(p, unlabeled.root): i for i, p in enumerate(candidates)},
            "margin": top2[:, 1] - top2[:, 0], "confidence": top2[:, 1], "guess": probs.argmax(1),
            "runner_up": np.argsort(probs, 1)[:, -2],
            "embeddings": embeddings}


def whole(run, name):
    """Every candidate's rows of a per-rank file of an active run dir: the ranks' files in rank order."""
    files = [run / f"{name}.rank-{rank}.npy" for rank in range(2)]
    return np.concatenate([np.load(path) for path in files if path.exists()])


def check_queries(run, expected, classes):
    np.testing.assert_allclose(whole(run, "embeddings"), expected["embeddings"], atol=1e-5)
    queries = rows(run / "queries.csv")
    chosen = np.array([expected["rows"][q["path"]] for q in queries])   # KeyError: not a candidate (or labeled)
    assert len(queries) == QUERIES and len(set(chosen)) == QUERIES
    margin = expected["margin"]
    # float32 logits of batches of 64 here and of 660 there differ in the last bits
    np.testing.assert_allclose([float(q["margin"]) for q in queries], margin[chosen], atol=5e-5)
    assert [float(q["margin"]) for q in queries] == sorted(float(q["margin"]) for q in queries)
    np.testing.assert_allclose([float(q["confidence"]) for q in queries], expected["confidence"][chosen], atol=5e-5)
    assert [q["guess"] for q in queries] == [classes[c] for c in expected["guess"][chosen]]
    assert [q["runner_up"] for q in queries] == [classes[c] for c in expected["runner_up"][chosen]]

    assignment = whole(run, "assignment")
    assert assignment.shape == margin.shape and [int(q["cluster"]) for q in queries] == list(assignment[chosen])
    quota = split_budget(np.bincount(assignment, minlength=CLUSTERS), QUERIES)
    for c in range(CLUSTERS):
        members = np.flatnonzero(assignment == c)
        picked = np.isin(members, chosen)
        assert picked.sum() == quota[c]
        assert margin[members[picked]].max() <= margin[members[~picked]].min() + 5e-5


def test_queries_are_the_smallest_margins_of_each_cluster(oracle_run, expected):
    check_queries(oracle_run[3], expected, read_classes(oracle_run[0]))


def test_two_ranks_each_keep_their_rows_and_choose_the_same_queries(oracle_run, expected, tmp_path):
    data, _, _, _, args = oracle_run
    stage("active", *args, f"run.dir={tmp_path}", "active.oracle=false", torchrun=2)
    check_queries(tmp_path, expected, read_classes(data))
    per_rank = [f"{name}.rank-{rank}.npy" for name in ("assignment", "embeddings", "guess") for rank in (0, 1)]
    assert sorted(os.listdir(tmp_path)) == [".lock", "answering.json", *per_rank[:2], "config.yaml", *per_rank[2:],
                                            "metrics.jsonl", "queries.csv", "queries.png", "run.json",
                                            "top2.rank-0.npy", "top2.rank-1.npy"]
    one_rank = rows(oracle_run[3] / "queries.csv")
    # one process's queries, although the two ranks' batches give embeddings and margins other last bits
    assert [q["path"] for q in rows(tmp_path / "queries.csv")] == [q["path"] for q in one_rank]


def test_an_unreadable_candidate_is_never_clustered_nor_queried(oracle_run, expected, tmp_path):
    """data.on_bad_image=skip: the loader fills an undecodable image's slot of a rank's files with the next
    image's outputs; that row gets no cluster (-1) and no query, and the run counts it."""
    data, _, _, _, args = oracle_run
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    smallest = min(expected["rows"], key=lambda path: expected["margin"][expected["rows"][path]])
    (copy / smallest).write_bytes(b"not an image")   # the first query of every run otherwise
    run = tmp_path / "run"
    stage("active", *args, f"data.root={copy}", "data.on_bad_image=skip", f"run.dir={run}",
          "active.oracle=false", torchrun=2)
    queries = [q["path"] for q in rows(run / "queries.csv")]
    assert len(queries) == QUERIES and smallest not in queries
    assignment = whole(run, "assignment")
    assert np.flatnonzero(assignment < 0).tolist() == [expected["rows"][smallest]]
    embeddings = whole(run, "embeddings")
    np.testing.assert_array_equal(embeddings[expected["rows"][smallest]], embeddings[expected["rows"][smallest] + 1])
    assert [e["uncovered"] for e in map(json.loads, open(run / "metrics.jsonl")) if "uncovered" in e] == [1]


def test_oracle_answers_are_the_hidden_labels_merged_into_labeled_csv(oracle_run):
    data, _, _, run, _ = oracle_run
    hidden = {r["path"]: int(r["label"]) for r in rows(os.path.join(data, "unlabeled.csv"))}
    queries = rows(run / "queries.csv")
    original = rows(os.path.join(data, "labeled.csv"))
    merged = rows(run / "labeled.csv")
    assert merged == original + [{"path": q["path"], "label": str(hidden[q["path"]])} for q in queries]
    split = read_split(data, str(run / "labeled.csv"))
    assert len(split) == len(original) + QUERIES and split.labels[-1] == hidden[queries[-1]["path"]]
    classes = read_classes(data)
    summary = json.load(open(run / "answers_summary.json"))
    assert summary["answered"] == QUERIES and summary["answer_accuracy"] == 1.0
    guessed_right = [classes[hidden[q["path"]]] == q["guess"] for q in queries]
    assert summary["guess_accuracy"] == pytest.approx(np.mean(guessed_right))
    assert json.loads(open(run / "metrics.jsonl").read().splitlines()[-1])["event"] == "done"
    sheet = Image.open(run / "queries.png")
    assert sheet.width == annotations.COLUMNS * (annotations.THUMB + 2 * annotations.PAD)
    assert not os.path.exists(run / "queries-2.png")


def answers_file(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_import_merges_names_and_skips_blanks(oracle_run, tmp_path):
    data, _, _, run, args = oracle_run
    for name in ("run.json", "queries.csv"):   # an active run dir's record and queries
        shutil.copy(run / name, tmp_path / name)
    queries = rows(run / "queries.csv")
    answers = answers_file(tmp_path / "answers.csv", ["label,path,note", f"Bag,{queries[0]['path']},sure",
                                                      f" Dress ,./{queries[1]['path']},", f",{queries[2]['path']},no idea"])
    active.main(["import", answers, *args, f"run.dir={tmp_path}"])
    merged = rows(tmp_path / "labeled.csv")
    assert merged[-2:] == [{"path": queries[0]["path"], "label": "8"}, {"path": queries[1]["path"], "label": "3"}]
    assert len(read_split(data, str(tmp_path / "labeled.csv"))) == len(rows(os.path.join(data, "labeled.csv"))) + 2
    summary = json.load(open(tmp_path / "answers_summary.json"))
    assert (summary["queries"], summary["answered"], summary["source"]) == (QUERIES, 2, answers)


@pytest.mark.parametrize("row, message", [
    ("images/train/99999.png,1", "is not one of the 12 queries"),
    ("FIRST_LABELED,1", "is not one of the 12 queries"),
    ("../outside.png,1", "escapes the dataset"),
    ("/etc/passwd,1", "escapes the dataset"),
    ("QUERY,Dragon", "label 'Dragon' is neither a class name"),
    ("QUERY,10", "label '10' is neither a class name"),
    ("QUERY,Bag", "label 'Bag' is a class name, but line 2's '1' is a class id: expected a column of class names or "
                  "of class ids, not both"),
    ("FIRST_QUERY,2", "is already answered on line 2"),
    ("QUERY,1,extra", "expected 2 fields"),
])
def test_import_names_the_bad_line(oracle_run, tmp_path, row, message):
    data, _, _, run, args = oracle_run
    shutil.copy(run / "queries.csv", tmp_path / "queries.csv")
    queries = rows(run / "queries.csv")
    row = (row.replace("FIRST_LABELED", rows(os.path.join(data, "labeled.csv"))[0]["path"])
           .replace("FIRST_QUERY", queries[0]["path"]).replace("QUERY", queries[1]["path"]))
    answers = answers_file(tmp_path / "answers.csv", ["path,label", f"{queries[0]['path']},1", row])
    with pytest.raises(InputError, match=f"^{re.escape(answers)}:3: .*{re.escape(message)}"):
        active.main(["import", answers, *args, f"run.dir={tmp_path}"])
    assert not os.path.exists(tmp_path / "labeled.csv")


def test_import_errors_exit_2_with_one_line(oracle_run, tmp_path):
    _, _, _, run, args = oracle_run
    shutil.copy(run / "queries.csv", tmp_path / "queries.csv")
    answers = answers_file(tmp_path / "answers.csv", ["path,class", "x.png,1"])
    proc = stage("active", "import", answers, *args, f"run.dir={tmp_path}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"active.py: error: {answers}:1: expected a header with columns path and label, got ['path', 'class']"]


def test_budget_is_a_count_or_a_fraction_of_the_pool():
    fraction, count = config.ActiveSection(), config.ActiveSection(budget=12, budget_fraction=0)
    assert active_learning.budget(fraction) == ("active.budget_fraction", 0.0025)
    assert active_learning.query_count(fraction, 55000) == 138
    assert active_learning.budget(count) == ("active.budget", 12)
    assert active_learning.query_count(count, 55000) == 12
    with pytest.raises(config.ConfigError, match=r"^active.budget_fraction=1e-06: asks for 0 queries out of a pool "
                                                 r"of 55000 images$"):
        active_learning.query_count(config.ActiveSection(budget_fraction=0.000001), 55000)


def test_contact_sheets_are_paged(oracle_run, tmp_path):
    data = oracle_run[0]
    paths = read_split(data, "unlabeled").paths[:23]
    written = annotations.write_contact_sheets(str(tmp_path), paths, ["Ankle boot"] * 23, per_page=20)
    assert [os.path.basename(p) for p in written] == ["queries.png", "queries-2.png"]
    first, last = Image.open(written[0]), Image.open(written[1])
    assert last.height < first.height and last.width == first.width   # 2 rows of 10 thumbnails, then 1


def test_a_budget_below_the_clusters_gets_one_cluster_per_query(oracle_run, tmp_path, capsys):
    """active.clusters=4 with a budget of 3 queries: 3 clusters, one query each, said in one line (not a
    refusal after every earlier stage of a pipeline ran)."""
    _, _, _, _, args = oracle_run
    active.main([*args, "active.budget=3", "active.clusters=4", f"run.dir={tmp_path}"])
    said = [line for line in capsys.readouterr().out.splitlines() if "active.clusters=4" in line]
    assert said == ["[active] active.clusters=4 is more than the 3 queries that active.budget=3 buys: "
                    "3 clusters instead, one query each"]
    queries = rows(tmp_path / "queries.csv")
    assert len(queries) == 3 and sorted(int(q["cluster"]) for q in queries) == [0, 1, 2]
    assert set(whole(tmp_path, "assignment")) == {0, 1, 2}
    assert [e["clusters"] for e in map(json.loads, open(tmp_path / "metrics.jsonl")) if "clusters" in e] == [3]
