"""Never worse: a stage that takes a classifier in (pseudolabel, fixmatch) keeps it when everything it
produced scores below it on val, records both sides in kept.json, and the pipeline's report says so
beside the stage's figure."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from tiny import ROOT, TINY_FINETUNE, TINY_INFERENCE, pixels, stage, tiny_classifier
from data.datasets import read_classes, read_split
from trainer.operations import report
from trainer.runtime import checkpoint, keep, stages
from trainer.runtime.loop import BestModel
from trainer.runtime.models import Classifier, build_backbone, load_classifier, save_classifier

ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")   # 2 shared cores: intra-op threads only contend
FIXMATCH = ["--config", os.path.join(ROOT, "configs", "demo", "fixmatch.yaml"), "train.batch_size=8",
            "fixmatch.mu=2", "fixmatch.pseudo_labels=", "fixmatch.ema=0.9", "data.backend=torch", "data.workers=0",
            "train.precision=fp32", "run.log_every=1"]
# learning rates that wreck the model in its first steps: every evaluation scores below the start
WRECKING = ["train.max_steps=5", "sgd.lr_backbone=50", "sgd.lr_head=50"]
# threshold 0.95: a model this weak is never that sure, so the labeled term alone trains the 10 steps
# (a low threshold lets confident wrong pseudo-labels collapse it onto one class)
LEARNING = ["train.max_steps=10", "sgd.lr_backbone=0.05", "sgd.lr_head=0.05", "fixmatch.threshold=0.95"]


def events(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(model_pt):
    return torch.load(model_pt, weights_only=True)["model"]


def assert_equal_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def val_top1(data, model_pt) -> float:
    """The model's val top-1 from views built here (tiny.pixels), not by the stages' loaders."""
    val = read_split(data, "val")
    with torch.no_grad():
        predicted = load_classifier(model_pt)[0].eval()(pixels(val.paths, 28)).argmax(1).numpy()
    return float((predicted == val.labels).mean())


def fixmatch_own_results(run_dir) -> list[tuple[float, str]]:
    """(val top-1, what) of each evaluation's EMA and live weights, in the order the stage offers them."""
    return [(e[key], f"epoch {e['epoch']}, {what} weights") for e in events(run_dir) if "val_top1_ema" in e
            for key, what in (("val_top1_ema", "EMA"), ("val_top1", "live"))]


@pytest.fixture(scope="module")
def pipeline(data, tmp_path_factory):
    """A pipeline's run dir as launch/pipeline.py lays it out, with the model steps that lose: finetune/model.pt
    (tiny.tiny_classifier), pseudolabel whose fine-tunes cannot learn (learning rates 0 and a fresh head), and
    FixMatch from pseudolabel's model.pt at learning rates that wreck it."""
    run = tmp_path_factory.mktemp("pipeline")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"root": data}}))
    os.makedirs(run / "finetune")
    tiny_classifier(data, run / "finetune" / "model.pt")
    frozen = TINY_FINETUNE + ["sgd.lr_backbone=0", "sgd.lr_head=0"]
    stage("pseudolabel", "--config", os.path.join(ROOT, "configs", "demo", "pseudolabel.yaml"), f"data.root={data}",
          f"run.dir={run / 'pseudolabel'}", "data.backend=torch", "data.workers=0",
          f"pseudo.model={run / 'finetune' / 'model.pt'}", "pseudo.top_k=3", "pseudo.schedule=[5,10]",
          "pseudo.fixmatch_p=0", "pseudo.scorer=classifier", "pseudo.pseudo_epochs=1", "pseudo.labeled_epochs=1",
          f"pseudo.finetune_config={os.path.join(ROOT, 'configs', 'demo', 'finetune.yaml')}",
          "inference.batch_size=64", f"pseudo.finetune_overrides=[{','.join(frozen)}]", env=ONE_THREAD)
    stage("fixmatch", *FIXMATCH, f"data.root={data}", f"run.dir={run / 'fixmatch'}",
          f"fixmatch.model={run / 'pseudolabel' / 'model.pt'}", *WRECKING, env=ONE_THREAD)
    return run


def test_pseudolabel_that_loses_keeps_its_input(data, pipeline):
    given = pipeline / "finetune" / "model.pt"
    kept = keep.read(pipeline / "pseudolabel")
    iterations = json.load(open(pipeline / "pseudolabel" / "selection.json"))["iterations"]
    logged = {e["iteration"]: e["val_top1"] for e in events(pipeline / "pseudolabel") if "iteration" in e}
    own = [logged[1], logged[2]]
    assert max(own) < logged[0]   # the fine-tunes could not learn: what the test forces
    assert kept == {"input": str(given), "input_val": logged[0], "own_best": f"iteration {own.index(max(own)) + 1}",
                    "own_best_val": max(own), "kept": "input"}
    assert [r["val_top1"] for r in iterations] == [logged[0], *own]
    assert kept["input_val"] == pytest.approx(val_top1(data, given), abs=1e-12)
    # and each iteration's figure is the stage's own val pass of that model, the pass that scored the input
    assert own == pytest.approx([val_top1(data, r["model"]) for r in iterations[1:]], abs=1e-12)
    assert_equal_weights(weights(pipeline / "pseudolabel" / "model.pt"), weights(given))


def test_fixmatch_that_loses_keeps_its_input(data, pipeline):
    given = pipeline / "pseudolabel" / "model.pt"
    run = pipeline / "fixmatch"
    kept = keep.read(run)
    start = next(e["val_top1"] for e in events(run) if e.get("step") == 0 and "val_top1" in e)
    own = fixmatch_own_results(run)
    best_val, best = max(own, key=lambda r: r[0])   # max keeps the first of equals, as the stage does
    assert best_val < start   # the learning rates wrecked it: what the test forces
    assert kept == {"input": str(given), "input_val": start, "own_best": best, "own_best_val": best_val,
                    "kept": "input"}
    assert kept["input_val"] == pytest.approx(val_top1(data, given), abs=1e-12)
    assert_equal_weights(weights(run / "model.pt"), weights(given))
    assert events(run)[-1]["best_weights"] == BestModel.INPUT


def test_the_report_says_which_stages_kept_their_input(data, pipeline):
    for step in ("finetune", "pseudolabel", "fixmatch"):
        stage("evaluate", "--config", os.path.join(ROOT, "configs", "demo", "evaluate.yaml"), f"data.root={data}",
              f"run.dir={pipeline / f'evaluate_{step}'}", f"evaluate.model={pipeline / step / 'model.pt'}",
              "evaluate.scales=[28]", *TINY_INFERENCE, env=ONE_THREAD)
    steps = [s for s in stages.recipe(False) if s.name in ("finetune", "pseudolabel", "fixmatch")]
    report.write(str(pipeline), {}, steps)

    rows = {r["stage"]: r for r in json.load(open(pipeline / "report.json"))["accuracy"]}
    text = (pipeline / "report.md").read_text()
    for step in ("pseudolabel", "fixmatch"):
        kept = json.load(open(pipeline / step / "kept.json"))
        assert rows[step]["kept"] == kept
        points = 100 * (kept["input_val"] - kept["own_best_val"])
        assert points > 0
        # the figure is the kept model's, the input's: the same as the row before it
        assert rows[step]["val"] == rows["finetune"]["val"]
        name = next(s.row for s in steps if s.name == step)
        assert (f"| {name} (kept its input: best result −{points:.2f} val) | {100 * rows[step]['val']:.2f} |"
                in text)
    assert "| + fine-tune (backbone + linear head) |" in text   # a stage that takes no model in has no note
    assert "Every stage at least as good as the one before it on val: yes." in text


def test_fixmatch_that_wins_keeps_its_own_result(data, tmp_path):
    """From a random model: ten steps on the labeled images beat it."""
    torch.manual_seed(0)
    given = tmp_path / "given.pt"
    save_classifier(Classifier(build_backbone("small", width=8), 10),
                    {"backbone": "small", "small_stem": False, "width": 8, "num_classes": 10}, read_classes(data),
                    str(given))
    run = tmp_path / "fixmatch"
    stage("fixmatch", *FIXMATCH, *LEARNING, f"data.root={data}", f"run.dir={run}", f"fixmatch.model={given}",
          env=ONE_THREAD)

    kept = keep.read(run)
    start = next(e["val_top1"] for e in events(run) if e.get("step") == 0 and "val_top1" in e)
    best_val, best = max(fixmatch_own_results(run), key=lambda r: r[0])
    assert start == pytest.approx(val_top1(data, given), abs=1e-12)
    assert kept == {"input": str(given), "input_val": start, "own_best": best, "own_best_val": best_val,
                    "kept": "own"}
    assert best_val > start and keep.note(kept) == ""
    saved = checkpoint.load(str(run / "checkpoint.pt"))["state"]
    expected = saved["ema"]["model"] if best.endswith("EMA weights") else saved["model"]
    assert_equal_weights(weights(run / "model.pt"), expected)


def test_a_tie_keeps_the_input(tmp_path):
    """Strict argmax: a result that only equals the input does not replace it, in the weights and the record."""
    given, produced = nn.Linear(2, 2), nn.Linear(2, 2)
    best = BestModel()
    best.offer_input(0.5, given)
    best.offer(0.5, 1, produced, "EMA")
    best.offer(0.25, 1, produced, "live")
    assert_equal_weights(best.weights, given.state_dict())
    assert (best.source, best.own_top1, best.own_source) == (BestModel.INPUT, 0.5, "EMA")
    run = SimpleNamespace(rt=SimpleNamespace(is_main=True), path=lambda name: str(tmp_path / name))
    keep.write(run, "given.pt", best.input_top1, best.own_top1, "epoch 1, EMA weights")
    kept = keep.read(tmp_path)
    assert kept["kept"] == "input" and keep.note(kept) == "kept its input: best result only tied it on val"
    # a fall too small for two decimals still reads as one
    assert keep.note({**kept, "own_best_val": 0.5 - 1e-6}) == "kept its input: best result −0.01 val"
