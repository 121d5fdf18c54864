import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

from multiproc import run_ranks
from tiny import (ROOT, TINY_FINETUNE, fashion, kill_after_checkpoint, pretrained_backbone, stage, tiny_classifier,
                  without_class_names)
from data.datasets import read_classes
from trainer.algorithms.balanced_selection import ConfiguredP
from trainer.runtime import checkpoint
from trainer.runtime.predict import whole_top_k

FINETUNE = os.path.join(ROOT, "configs", "demo", "finetune.yaml")
PSEUDO = os.path.join(ROOT, "configs", "demo", "pseudolabel.yaml")


def finetune(data, init, run_dir, *extra, **kw):
    return stage("finetune", "--config", FINETUNE, f"data.root={data}", f"run.dir={run_dir}",
                 f"finetune.backbone={init}", *TINY_FINETUNE, *extra, **kw)


def events(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_finetune_logs_val_and_resumes_after_kill(tmp_path_factory, tmp_path):
    data = fashion(tmp_path_factory)
    backbone = pretrained_backbone(tmp_path_factory, data)
    args = ["train.epochs=6", "run.checkpoint_every=2"]
    finetune(data, backbone, tmp_path / "straight", *args)
    val = [e["val_top1"] for e in events(tmp_path / "straight") if "val_top1" in e and "event" not in e]
    assert len(val) == 6 and all(0 <= v <= 1 for v in val)
    killed = tmp_path / "killed"
    step = kill_after_checkpoint("finetune", ["--config", FINETUNE, f"data.root={data}", f"run.dir={killed}",
                                              f"finetune.backbone={backbone}", *TINY_FINETUNE, *args], killed, 4)
    assert step < 6 * 5   # 40 labeled images / batch 8 = 5 steps per epoch
    finetune(data, backbone, killed, *args)
    a = checkpoint.load(str(tmp_path / "straight" / "model.pt"))["model"]
    b = checkpoint.load(str(killed / "model.pt"))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_bad_pseudo_label_rows_are_named(tmp_path_factory, tmp_path):
    data = fashion(tmp_path_factory)
    backbone = pretrained_backbone(tmp_path_factory, data)
    cases = {"images/train/99999.png,1\n": "is not an image of unlabeled.csv",
             "../outside.png,1\n": "expected a path relative to and inside",
             "images/train/00000.png,10\n": "expected an integer label in [0, 10)"}
    with open(os.path.join(data, "unlabeled.csv")) as f:
        first_unlabeled = f.read().splitlines()[1].split(",")[0]
    for row, message in cases.items():
        bad = tmp_path / "bad.csv"
        bad.write_text(f"path,label\n{first_unlabeled},3\n{row}")
        proc = finetune(data, backbone, tmp_path / "run", f"finetune.pseudo_labels={bad}", check=False)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert f"{bad}:3" in last and message in last, last


@pytest.mark.parametrize("given, unlabeled, classes, p", [
    # the demo's fractions on prepared Fashion-MNIST (5,470 unlabeled images per class): today's P
    (0.3108, 54700, 10, 1700),    # 1700.08
    (0.6216, 54700, 10, 3400),    # 3400.15
    (0.4662, 54700, 10, 2550),    # 2550.11 (pipeline_full.yaml)
    (0.777, 54700, 10, 4250),     # 4250.19 (pipeline_full.yaml)
    (0.0256, 54700, 10, 140),     # 140.03 (fixmatch_fraction)
    # the same fractions on 7,400 images (740 per class)
    (0.3108, 7400, 10, 230),      # 229.99
    (0.6216, 7400, 10, 460),      # 459.98
    (0.0256, 7400, 10, 19),       # 18.94
    (0.15, 660, 10, 10),          # 9.9, the tiny dataset of the stage test
    (0.03, 660, 10, 2),           # 1.98
    (0.001, 660, 10, 1),          # 0.066: at least one image
    (0.31, 800, 3, 83),           # 82.67: classes that do not divide the pool
    (1.0, 660, 10, 66),           # 1: every unlabeled image per class, not one image
])
def test_p_resolves_fractions_of_the_unlabeled_images_per_class(given, unlabeled, classes, p):
    resolved = ConfiguredP("pseudo.schedule_fraction[0]", given, True).images(unlabeled, classes)
    assert resolved == p and type(resolved) is int


@pytest.mark.parametrize("given, unlabeled, classes", [(200, 54700, 10), (1, 660, 10), (16, 512000, 800)])
def test_a_count_is_that_many_images_whatever_the_pool(given, unlabeled, classes):
    resolved = ConfiguredP("pseudo.schedule[0]", given, False).images(unlabeled, classes)
    assert resolved == given and type(resolved) is int


def test_pseudolabel_iterations(tmp_path_factory, tmp_path):
    data = fashion(tmp_path_factory)
    finetune(data, pretrained_backbone(tmp_path_factory, data), tmp_path / "ft", "train.epochs=2")
    run = tmp_path / "pl"
    # 66 unlabeled images per class: P = 0.076 x 66 = 5.02 -> 5, then 0.15 x 66 = 9.9 -> 10; FixMatch's 0.03 x 66 -> 2
    proc = stage("pseudolabel", "--config", PSEUDO, f"data.root={data}", f"run.dir={run}", "data.backend=torch",
                 "data.workers=0", f"pseudo.model={tmp_path / 'ft' / 'model.pt'}", "pseudo.top_k=3",
                 "pseudo.schedule_fraction=[0.076,0.15]", "pseudo.scorer=classifier", "pseudo.class_adaptive=false",
                 "pseudo.fixmatch_fraction=0.03", "pseudo.pseudo_epochs=1",
                 "pseudo.labeled_epochs=1", f"pseudo.finetune_config={FINETUNE}", "inference.batch_size=64",
                 f"pseudo.finetune_overrides=[{','.join(TINY_FINETUNE)}]")
    summary = json.load(open(run / "selection.json"))
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1, 2]
    assert [(r["p"], r["p_given"]) for r in summary["iterations"][1:]] == [(5, 0.076), (10, 0.15)]
    assert (summary["fixmatch_selection"]["p"], summary["fixmatch_selection"]["p_given"]) == (2, 0.03)
    for it, p, given in ((1, 5, 0.076), (2, 10, 0.15)):
        iteration = json.load(open(run / f"iter{it}" / "selection.json"))
        assert (iteration["p"], iteration["p_given"]) == (p, given)
    said = proc.stdout + proc.stderr
    assert "iteration 1: P=5 (pseudo.schedule_fraction[0]=0.076 of 66 unlabeled images per class), " in said
    assert "iteration 2: P=10 (pseudo.schedule_fraction[1]=0.15 of 66 unlabeled images per class), " in said
    assert "FixMatch selection: P=2 (pseudo.fixmatch_fraction=0.03 of 66 unlabeled images per class)" in said
    hidden = {}
    with open(os.path.join(data, "unlabeled.csv")) as f:
        rows = list(csv.DictReader(f))
    hidden = {r["path"]: int(r["label"]) for r in rows}
    order = [r["path"] for r in rows]
    for it, p in ((1, 5), (2, 10)):
        folder = run / f"iter{it}"
        with open(folder / "pseudo_labels.csv") as f:
            chosen = list(csv.DictReader(f))
        topk_class, topk_prob = whole_top_k(folder / "predictions")
        counts = np.bincount([int(r["label"]) for r in chosen], minlength=10)
        assert counts.max() <= p and len({r["path"] for r in chosen}) == len(chosen)
        for r in chosen:   # every pseudo-label is one of the image's top-K with its probability
            i = order.index(r["path"])
            k = list(topk_class[i]).index(int(r["label"]))
            assert abs(topk_prob[i, k] - float(r["score"])) < 1e-5
        precision = np.mean([hidden[r["path"]] == int(r["label"]) for r in chosen])
        assert abs(summary["iterations"][it]["precision"] - precision) < 1e-9
        # the selection's balance, counted here from the CSV (the CSV's class ids are the class list's)
        assert (summary["iterations"][it]["fewest_per_class"], summary["iterations"][it]["most_per_class"]) == \
            (counts.min(), counts.max())
        assert (folder / "labeled" / "model.pt").exists() and (folder / "pseudo" / "model.pt").exists()
    with open(run / "pseudo_labels.csv") as f:
        assert np.bincount([int(r["label"]) for r in csv.DictReader(f)], minlength=10).max() <= 2
    assert (run / "model.pt").exists() and whole_top_k(run / "predictions")[0].shape == (len(rows), 3)
    # the classifier's scores alone: no embeddings written, their one reader (label propagation) does not run
    assert not any(path.name == "embeddings.npy" for path in run.rglob("*.npy"))


def test_reinitialise_starts_each_iteration_from_the_pretrained_backbone(tmp_path_factory, tmp_path):
    import yaml
    data = fashion(tmp_path_factory)
    backbone = pretrained_backbone(tmp_path_factory, data)
    finetune(data, backbone, tmp_path / "ft", "train.epochs=1")
    common = ["--config", PSEUDO, f"data.root={data}", "data.backend=torch", "data.workers=0",
              f"pseudo.model={tmp_path / 'ft' / 'model.pt'}", "pseudo.top_k=3", "pseudo.schedule=[5,10]",
              "pseudo.scorer=classifier", "pseudo.fixmatch_p=0", "pseudo.pseudo_epochs=1", "pseudo.labeled_epochs=1",
              f"pseudo.finetune_config={FINETUNE}", "inference.batch_size=64",
              f"pseudo.finetune_overrides=[{','.join(TINY_FINETUNE)}]"]
    refused = stage("pseudolabel", *common, f"run.dir={tmp_path / 'refused'}", "pseudo.reinitialise=true", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == ["pseudolabel.py: error: pseudo.backbone: required with pseudo.reinitialise=true: "
                                                   "the pretrained backbone.pt each iteration starts from"]
    assert not (tmp_path / "refused").exists()

    def starts(run):
        return [yaml.safe_load(open(run / f"iter{it}" / "pseudo" / "config.yaml"))["finetune"]["backbone"] for it in (1, 2)]
    stage("pseudolabel", *common, f"run.dir={tmp_path / 'again'}", "pseudo.reinitialise=true", f"pseudo.backbone={backbone}")
    assert starts(tmp_path / "again") == [str(backbone)] * 2
    stage("pseudolabel", *common, f"run.dir={tmp_path / 'on'}", f"pseudo.backbone={backbone}")   # given, not used
    assert starts(tmp_path / "on") == [str(tmp_path / "ft" / "model.pt"), str(tmp_path / "on" / "iter1" / "labeled" / "model.pt")]


def test_mean_scorer_ranks_by_the_classifier_and_label_propagation_together(tmp_path_factory, tmp_path):
    from data.datasets import read_split
    from trainer.algorithms import label_propagation
    data = fashion(tmp_path_factory)
    finetune(data, pretrained_backbone(tmp_path_factory, data), tmp_path / "ft", "train.epochs=2")
    run = tmp_path / "pl"
    stage("pseudolabel", "--config", PSEUDO, f"data.root={data}", f"run.dir={run}", "data.backend=torch",
          "data.workers=0", f"pseudo.model={tmp_path / 'ft' / 'model.pt'}", "pseudo.top_k=3", "pseudo.scorer=mean",
          "propagation.k=5", "pseudo.schedule=[5]", "pseudo.fixmatch_p=0", "pseudo.pseudo_epochs=1",
          "pseudo.labeled_epochs=1", f"pseudo.finetune_config={FINETUNE}", "inference.batch_size=64",
          f"pseudo.finetune_overrides=[{','.join(TINY_FINETUNE)}]")
    predictions = run / "iter1" / "predictions"
    unlabeled = np.load(predictions / "embeddings.npy")
    labeled = read_split(data, "labeled")
    embeddings = np.concatenate([unlabeled, np.load(predictions / "labeled" / "embeddings.npy")])
    assert len(embeddings) == len(unlabeled) + len(labeled)
    spread = label_propagation.propagate(embeddings, np.arange(len(unlabeled), len(embeddings)), labeled.labels, 10, k=5)
    classifier = np.zeros((len(unlabeled), 10), np.float32)
    top_classes, top_probs = whole_top_k(predictions)
    np.put_along_axis(classifier, top_classes.astype(np.int64), top_probs, axis=1)
    mean = (spread.probabilities[:len(unlabeled)] + classifier) / 2
    classes, scores = np.load(predictions / "mean" / "topk_class.npy"), np.load(predictions / "mean" / "topk_prob.npy")
    np.testing.assert_array_equal(classes[:, 0], mean.argmax(1))
    np.testing.assert_allclose(scores[:, 0], mean.max(1), atol=1e-6)
    assert (classes[:, 0] != classifier.argmax(1)).any()   # propagation changed some ranking: the check bites
    order = [r["path"] for r in csv.DictReader(open(os.path.join(data, "unlabeled.csv")))]
    for r in csv.DictReader(open(run / "iter1" / "pseudo_labels.csv")):   # chosen by the mean's scores
        i = order.index(r["path"])
        assert abs(mean[i, int(r["label"])] - float(r["score"])) < 1e-5


def _predict(rank, data, world_dir, on_bad_image="error", p=0):
    """write_predictions with embeddings; with p, then the stage's selection of P=p from them (every rank its
    own rows) into world_dir.csv."""
    from types import SimpleNamespace

    from data.datasets import read_split
    from data.loaders import build_loader
    from trainer.dist import init
    from trainer.operations import pseudo_labeling
    from trainer.runtime.models import Classifier, build_backbone
    from trainer.runtime.predict import write_predictions
    torch.manual_seed(0)
    model = Classifier(build_backbone("small", width=8), 10)
    split = read_split(data, "unlabeled")
    rt = init()
    loader = build_loader(split, "eval", image_size=28, global_batch=64, rank=rt.rank, world=rt.world,
                          shuffle=False, drop_last=False, workers=0, backend="torch", on_bad_image=on_bad_image)
    write_predictions(model, loader, rt, world_dir, len(split), 3, embeddings=True)
    if p:
        cfg = SimpleNamespace(pseudo=SimpleNamespace(chunk=100, class_adaptive=False, top_k=3))
        pseudo_labeling.select(world_dir, split, 10, ConfiguredP("pseudo.schedule[0]", p, False), cfg, rt,
                               f"{world_dir}.csv", f"{world_dir}.json")
    return rank


def test_two_rank_predictions_and_selection_equal_one_rank(tmp_path_factory, tmp_path):
    from data.datasets import read_split
    from trainer.algorithms import balanced_selection
    data = fashion(tmp_path_factory)
    run_ranks(_predict, 1, data, str(tmp_path / "one"), "error", 20)
    run_ranks(_predict, 2, data, str(tmp_path / "two"), "error", 20)
    for one, two in zip(whole_top_k(tmp_path / "one"), whole_top_k(tmp_path / "two")):
        assert one.shape == two.shape == (660, 3)
        np.testing.assert_allclose(one, two, rtol=0, atol=1e-5)
    one, two = np.load(tmp_path / "one" / "embeddings.npy"), np.load(tmp_path / "two" / "embeddings.npy")
    assert one.dtype == two.dtype == np.float16 and one.shape == two.shape and len(one) == 660
    np.testing.assert_allclose(np.linalg.norm(two.astype(np.float32), axis=1), 1, atol=2e-3)   # unit rows
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-3)   # float16 steps of unit rows: <= 2^-11
    assert sorted(os.listdir(tmp_path / "two")) == ["embeddings.npy", "shards.json", "topk_class.rank-0.npy",
                                                    "topk_class.rank-1.npy", "topk_prob.rank-0.npy",
                                                    "topk_prob.rank-1.npy"]
    # the stage's selection on 2 ranks is, byte for byte, the one a single process makes over the same rows
    for name, array in zip(("c.npy", "p.npy"), whole_top_k(tmp_path / "two")):
        np.save(tmp_path / name, array)
    alone = balanced_selection.select_balanced_from_npy(tmp_path / "c.npy", tmp_path / "p.npy", 10, 20)
    balanced_selection.write_pseudo_labels(str(tmp_path / "alone.csv"), alone, read_split(data, "unlabeled"))
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "alone.csv").read_text()
    assert len(alone.indices) > 40 and alone.class_counts.max() == 20   # P=20 binds: a ranking decided the rows
    assert json.load(open(tmp_path / "two.json"))["selected"] == len(alone.indices)
    # and the one-rank stage's: its predictions equal the two ranks' bit for bit here (eval mode, per image)
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()


def test_skipped_images_carry_their_stand_ins_predictions(tmp_path_factory, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(fashion(tmp_path_factory), data)
    with open(data / "unlabeled.csv") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    for bad in (5, len(paths) - 1):   # the last one's stand-in wraps around to row 0
        (data / paths[bad]).write_bytes(b"not an image")
    run_ranks(_predict, 1, str(fashion(tmp_path_factory)), str(tmp_path / "clean"))
    run_ranks(_predict, 2, str(data), str(tmp_path / "skip"), "skip")
    arrays = {folder: [*whole_top_k(tmp_path / folder), np.load(tmp_path / folder / "embeddings.npy")]
              for folder in ("clean", "skip")}
    for clean, skip, atol in zip(arrays["clean"], arrays["skip"], (1e-5, 1e-5, 1e-3)):
        expected = clean.copy()
        expected[5], expected[-1] = clean[6], clean[0]
        np.testing.assert_allclose(skip, expected, rtol=0, atol=atol)


def _finetune_then_read_as_pseudolabel_does(rank, data, init, run_dir):
    """Rank 0 writes model.pt slowly; every rank then reads the stage's outputs as pseudolabel.py does
    right after an in-process fine-tune."""
    import time

    from launch import finetune as finetune_stage
    from trainer.runtime import engine
    from trainer.runtime.models import load_classifier
    write = finetune_stage.save_classifier
    finetune_stage.save_classifier = lambda *a: (time.sleep(2), write(*a))
    finetune_stage.main(["--config", FINETUNE, f"data.root={data}", f"run.dir={run_dir}", f"finetune.backbone={init}",
                         *TINY_FINETUNE, "train.epochs=1"])
    load_classifier(os.path.join(run_dir, "model.pt"))
    return engine.read_done(run_dir)["val_top1"]


def test_in_process_finetune_publishes_its_outputs_to_every_rank(tmp_path_factory, tmp_path):
    """With more than one rank, pseudolabel read model.pt and the 'done' event while rank 0 was still
    writing them (no barrier after the save)."""
    data = fashion(tmp_path_factory)
    backbone = pretrained_backbone(tmp_path_factory, data)
    val = run_ranks(_finetune_then_read_as_pseudolabel_does, 2, data, backbone, str(tmp_path / "run"))
    assert val[0] == val[1] and 0 <= val[0] <= 1


def test_the_kept_model_carries_the_class_names_even_from_an_older_model_pt(tmp_path_factory, tmp_path):
    """pseudo.model saved before model.pt kept class names, and frozen fine-tunes (learning rates 0: a random
    head) that cannot beat it: run.dir/model.pt is that model, saved anew with classes.txt's names."""
    data = fashion(tmp_path_factory)
    tiny_classifier(data, tmp_path / "named.pt")
    old = without_class_names(tmp_path / "named.pt", tmp_path / "old.pt")
    run = tmp_path / "pl"
    frozen = TINY_FINETUNE + ["sgd.lr_backbone=0", "sgd.lr_head=0"]
    stage("pseudolabel", "--config", PSEUDO, f"data.root={data}", f"run.dir={run}", "data.backend=torch",
          "data.workers=0", f"pseudo.model={old}", "pseudo.top_k=3", "pseudo.schedule=[5]", "pseudo.fixmatch_p=0",
          "pseudo.scorer=classifier", "pseudo.pseudo_epochs=1", "pseudo.labeled_epochs=1",
          f"pseudo.finetune_config={FINETUNE}", "inference.batch_size=64",
          f"pseudo.finetune_overrides=[{','.join(frozen)}]")
    assert json.load(open(run / "selection.json"))["best_iteration"] == 0
    kept, given = torch.load(run / "model.pt", weights_only=True), torch.load(old, weights_only=True)
    assert kept["classes"] == read_classes(data) and "classes" not in given
    assert kept["model"].keys() == given["model"].keys()
    assert all(torch.equal(kept["model"][k], given["model"][k]) for k in given["model"])
