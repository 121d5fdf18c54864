import json
import os

import numpy as np
import pytest
import torch

from tiny import ROOT, TINY_INFERENCE, fashion, pixels, save_backbone, stage, tiny_classifier
from data.datasets import read_split
from launch import evaluate
from trainer.runtime import checkpoint, config
from trainer.algorithms import tta
from trainer.algorithms.knn import knn_accuracy
from trainer.runtime.models import build_backbone, load_classifier

EVALUATE = os.path.join(ROOT, "configs", "demo", "evaluate.yaml")
SCALES = [28, 40]


def top1_top5(probs, labels):
    top = np.argsort(-probs, axis=1)[:, :5]
    return float((top[:, 0] == labels).mean()), float((top == labels[:, None]).any(1).mean())


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    data = fashion(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("evaluate")
    model = tiny_classifier(data, tmp / "model.pt")
    evaluate.main(["--config", EVALUATE, f"data.root={data}", f"run.dir={tmp / 'run'}",
                   f"evaluate.model={tmp / 'model.pt'}", f"evaluate.scales={SCALES}", *TINY_INFERENCE])
    return data, model, tmp / "run"


def test_tta_averages_probabilities_not_logits():
    sharp = torch.tensor([[0.9, 0.0999, 0.0001]])
    split = torch.tensor([[0.0001, 0.5, 0.4999]])
    mean = tta.tta_probabilities(torch.stack([sharp, split]))
    torch.testing.assert_close(mean, (sharp + split) / 2)
    assert mean.argmax(1).item() == 0          # averaging logits (a geometric mean) would pick class 1
    assert (sharp * split).argmax(1).item() == 1


def test_val_mode_tries_every_subset_fewest_scales_first_and_a_tie_goes_to_the_first():
    assert tta.scale_subsets(3, "all") == [(0, 1, 2)]
    assert tta.scale_subsets(3, "val") == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert tta.best_subset({(0,): {"top1": 0.5}, (1,): {"top1": 0.7}, (0, 1): {"top1": 0.7}}) == (1,)


def test_candidates_pair_each_subset_with_its_mirrored_twin_fewest_views_first():
    assert tta.candidates(2, "val", mirror=False) == [((0,), False), ((1,), False), ((0, 1), False)]
    assert tta.candidates(2, "val", mirror=True) == [((0,), False), ((1,), False), ((0,), True), ((1,), True),
                                                     ((0, 1), False), ((0, 1), True)]
    assert tta.candidates(2, "all", mirror=True) == [((0, 1), False), ((0, 1), True)]
    assert tta.candidate_views(((1,), True), num_scales=3) == [1, 4]


def test_mirrored_tta_matches_an_independent_computation(classifier_run, tmp_path):
    data, model, run = classifier_run
    evaluate.main(["--config", EVALUATE, f"data.root={data}", f"run.dir={tmp_path}", "evaluate.mirror=true", "evaluate.tta=all",
                   f"evaluate.model={json.load(open(run / 'eval.json'))['model']}",
                   f"evaluate.scales={SCALES}", *TINY_INFERENCE])
    result = json.load(open(tmp_path / "eval.json"))["splits"]
    for name in ("val", "test"):
        split = read_split(data, name)
        with torch.no_grad():
            views = [pixels(split.paths, s) for s in SCALES]
            probs = [torch.softmax(model(v), 1).numpy() for v in views + [v.flip(-1) for v in views]]
        expected = dict(zip(("top1", "top5"), top1_top5(np.mean(probs, axis=0), split.labels)))
        assert result[name]["tta"] == pytest.approx(expected) and result[name]["tta_mirror"] is True
    plain = json.load(open(run / "eval.json"))["splits"]
    assert result["test"]["tta"] != plain["test"]["tta"]   # the mirrors changed the figure: the check above bites


def test_a_model_for_another_number_of_classes_is_refused(classifier_run, tmp_path):
    data, _, run = classifier_run
    model = json.load(open(run / "eval.json"))["model"]
    assert load_classifier(model, data)[1]["num_classes"] == 10
    (tmp_path / "classes.txt").write_text("".join(f"c{i}\n" for i in range(12)))
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf": a model of other classes than {tmp_path}/classes.txt names: class 0 is 'T-shirt/top' "
                             r"in the model, 'c0' in classes.txt; label a dataset with a model trained on its classes$"):
        load_classifier(model, str(tmp_path))


def test_eval_json_matches_an_independent_computation(classifier_run):
    data, model, run = classifier_run
    result = json.load(open(run / "eval.json"))
    assert set(result["splits"]) == {"val", "test"}
    done = [json.loads(line) for line in open(run / "metrics.jsonl") if '"done"' in line][-1]
    for name, scores in result["splits"].items():
        split = read_split(data, name)
        with torch.no_grad():
            probs = [torch.softmax(model(pixels(split.paths, s)), 1).numpy() for s in SCALES]
        assert scores["images"] == len(split)
        for s, p in zip(SCALES, probs):
            assert scores["scales"][str(s)] == pytest.approx(dict(zip(("top1", "top5"), top1_top5(p, split.labels))))
        averaged = dict(zip(("top1", "top5"), top1_top5(np.mean(probs, axis=0), split.labels)))
        assert scores["tta"] == pytest.approx(averaged)
        assert done[f"{name}_top1"] == scores["tta"]["top1"]
    # the scales really disagree on this model, so the comparison above could fail
    assert result["splits"]["test"]["scales"]["28"] != result["splits"]["test"]["scales"]["40"]


def test_two_ranks_give_the_same_eval_json(classifier_run, tmp_path):
    data, _, run = classifier_run
    config = json.load(open(run / "eval.json"))
    stage("evaluate", "--config", EVALUATE, f"data.root={data}", f"run.dir={tmp_path}",
          f"evaluate.model={config['model']}", f"evaluate.scales={SCALES}", *TINY_INFERENCE, torchrun=2)
    assert json.load(open(tmp_path / "eval.json")) == config   # hit counts: exact


def test_knn_mode_equals_trainer_knn(tmp_path_factory, tmp_path):
    data = fashion(tmp_path_factory)
    torch.manual_seed(1)
    backbone = build_backbone("small", width=8).eval()
    save_backbone(backbone, str(tmp_path / "backbone.pt"))
    evaluate.main(["--config", EVALUATE, f"data.root={data}", f"run.dir={tmp_path / 'run'}",
                   f"evaluate.backbone={tmp_path / 'backbone.pt'}", "knn.k=5", *TINY_INFERENCE])
    result = json.load(open(tmp_path / "run" / "eval.json"))
    labeled = read_split(data, "labeled")
    with torch.no_grad():
        references = backbone(pixels(labeled.paths, 28)).numpy()
        for name in ("val", "test"):
            split = read_split(data, name)
            expected = knn_accuracy(references, labeled.labels, backbone(pixels(split.paths, 28)).numpy(),
                                    split.labels, 10, k=5, temperature=0.07)
            assert result["knn"][name] == pytest.approx(expected, abs=1e-9)


def test_unlabeled_split_is_refused_before_any_work(tmp_path_factory, tmp_path):
    data = fashion(tmp_path_factory)
    with pytest.raises(config.ConfigError, match="^evaluate.splits: 'unlabeled' has no label column to score against$"):
        evaluate.main(["--config", EVALUATE, f"data.root={data}", f"run.dir={tmp_path / 'run'}",
                       "evaluate.splits=[val,unlabeled]", *TINY_INFERENCE])
    assert not os.path.exists(tmp_path / "run")


def test_tta_val_mode_picks_the_subset_best_on_val_and_scores_test_with_it(classifier_run, tmp_path):
    data, _, run = classifier_run
    model = json.load(open(run / "eval.json"))["model"]
    scales = [28, 40, 20]
    evaluate.main(["--config", EVALUATE, f"data.root={data}", f"run.dir={tmp_path / 'val'}", f"evaluate.model={model}",
                   f"evaluate.scales={scales}", "evaluate.tta=val", "evaluate.splits=[test,val]", *TINY_INFERENCE])
    chosen = json.load(open(tmp_path / "val" / "eval.json"))["splits"]
    # every subset scored on its own in the plain mode, fewest scales first
    subsets = [[28], [40], [20], [28, 40], [28, 20], [40, 20], [28, 40, 20]]
    alone = []
    for i, subset in enumerate(subsets):
        evaluate.main(["--config", EVALUATE, f"data.root={data}", f"run.dir={tmp_path / str(i)}",
                       f"evaluate.model={model}", f"evaluate.scales={subset}", *TINY_INFERENCE])
        alone.append(json.load(open(tmp_path / str(i) / "eval.json"))["splits"])
    val_top1 = [a["val"]["tta"]["top1"] for a in alone]
    best = val_top1.index(max(val_top1))
    assert chosen["val"]["tta_scales"] == chosen["test"]["tta_scales"] == subsets[best]
    assert chosen["val"]["tta"] == alone[best]["val"]["tta"] and chosen["test"]["tta"] == alone[best]["test"]["tta"]
    assert len(set(val_top1)) > 1   # the subsets disagree on val, so picking the best one is a real choice


def test_tta_val_mode_needs_val(classifier_run, tmp_path):
    data, _, run = classifier_run
    with pytest.raises(config.ConfigError, match="evaluate.tta=val chooses the TTA scales on val"):
        evaluate.main(["--config", EVALUATE, f"data.root={data}", f"run.dir={tmp_path}", "evaluate.tta=val",
                       "evaluate.splits=[test]", *TINY_INFERENCE])
