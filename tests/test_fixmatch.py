import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from data.datasets import read_split
from data.loaders import build_loader
from tiny import ROOT, assert_same_weights, assert_trained_alike, fashion, stage
from trainer.runtime import checkpoint
from trainer.algorithms.ema import EMA
from trainer.algorithms.fixmatch import FixMatch, fixmatch_loss
from trainer.runtime.models import build_backbone

CONFIG = os.path.join(ROOT, "configs", "demo", "fixmatch.yaml")
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")   # 2 shared cores: intra-op threads only contend
# threshold 0.15: the barely trained tiny model is 10-25% sure of its pseudo-labels, and the
# unlabeled term must take part
TINY = ["train.batch_size=8", "fixmatch.mu=2", "fixmatch.threshold=0.15", "fixmatch.pseudo_labels=",
        "data.backend=torch", "data.workers=0", "train.precision=fp32", "run.log_every=1"]


# ---- the loss, against a float64 computation written out by hand ----

def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_masked_loss_and_gradients_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    b, u, classes, tau, lam = 3, 4, 5, 0.95, 2.0
    labeled, strong = torch.randn(b, classes, generator=g), torch.randn(u, classes, generator=g)
    # weak-view confidences 0.99, 0.50, 0.97, 0.30: only rows 0 and 2 pass tau
    weak = torch.zeros(u, classes)
    for row, (cls, conf) in enumerate([(3, 0.99), (1, 0.50), (0, 0.97), (4, 0.30)]):
        weak[row] = np.log((1 - conf) / (classes - 1))
        weak[row, cls] = np.log(conf)
    labels = torch.tensor([0, 4, 2])
    logits = torch.cat([labeled, weak, strong]).requires_grad_()
    out = fixmatch_loss(logits[:b], labels, logits[b:b + u], logits[b + u:], FixMatch(tau), lambda_u=lam)
    out.total.backward()

    L, W, S = (t.double().numpy() for t in (labeled, weak, strong))
    y = labels.numpy()
    p_weak = np.exp(log_softmax(W))
    targets, mask = p_weak.argmax(1), p_weak.max(1) >= tau
    assert targets.tolist() == [3, 1, 0, 4] and mask.tolist() == [True, False, True, False]
    supervised = -log_softmax(L)[np.arange(b), y].mean()
    unsupervised = sum(-log_softmax(S)[i, targets[i]] for i in range(u) if mask[i]) / u   # over the whole batch
    assert out.pseudo_labels.tolist() == targets.tolist() and out.mask.tolist() == mask.astype(float).tolist()
    assert out.supervised.item() == pytest.approx(supervised, rel=1e-6)
    assert out.unsupervised.item() == pytest.approx(unsupervised, rel=1e-6)
    assert out.total.item() == pytest.approx(supervised + lam * unsupervised, rel=1e-6)

    # d/dz of mean cross-entropy = (softmax - one-hot) / n; the targets and weak logits get none
    grad = logits.grad.double().numpy()
    expected_l = (np.exp(log_softmax(L)) - np.eye(classes)[y]) / b
    expected_s = lam * mask[:, None] * (np.exp(log_softmax(S)) - np.eye(classes)[targets]) / u
    np.testing.assert_allclose(grad[:b], expected_l, atol=1e-7)
    assert (grad[b:b + u] == 0).all()
    np.testing.assert_allclose(grad[b + u:], expected_s, atol=1e-7)
    assert (grad[b + u:][~mask] == 0).all()


# ---- the EMA, against the formula ----

def test_ema_averages_parameters_with_warmup_and_copies_buffers():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.2)   # warm-up (1+t)/(10+t) = 0.1, 0.18, then capped at 0.2
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    decays = []
    for t in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        model(torch.randn(8, 4, generator=g))   # train mode: BatchNorm running statistics move
        decays.append(ema.current_decay())
        ema.update(model)
        d = min(0.2, (1 + t) / (10 + t))
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach().double()
    assert decays == pytest.approx([0.1, 2 / 11, 0.2, 0.2])
    averaged = dict(ema.model.named_parameters())
    for n in expected:
        torch.testing.assert_close(averaged[n].double(), expected[n], rtol=0, atol=1e-6, msg=n)
        assert not averaged[n].requires_grad
    for (n, mine), theirs in zip(ema.model.named_buffers(), model.buffers()):
        assert torch.equal(mine, theirs), n
    assert model[1].num_batches_tracked.item() == 4

    # a restored EMA continues exactly like the original
    restored = EMA(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), decay=0.2)
    restored.load_state_dict(ema.state_dict())
    ema.update(model)
    restored.update(model)
    for a, b in zip(ema.model.state_dict().values(), restored.model.state_dict().values()):
        assert torch.equal(a, b)


# ---- the stage ----

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny dataset and a model.pt fine-tuned by launch/finetune.py from a random width-8 backbone."""
    data = fashion(tmp_path_factory)
    folder = tmp_path_factory.mktemp("fixmatch_init")
    torch.save(build_backbone("small", width=8).state_dict(), folder / "backbone.pt")
    stage("finetune", "--config", os.path.join(ROOT, "configs", "demo", "finetune.yaml"), f"data.root={data}",
          f"run.dir={folder / 'finetune'}", "model.width=8", f"finetune.backbone={folder / 'backbone.pt'}",
          "train.batch_size=8", "train.max_steps=5", "train.precision=fp32", "data.backend=torch",
          "data.workers=0", env=ONE_THREAD)
    return data, str(folder / "finetune" / "model.pt")


def fixmatch_args(setup, run_dir, *extra):
    data, init = setup
    return ["--config", CONFIG, f"data.root={data}", f"run.dir={run_dir}", f"fixmatch.model={init}", *TINY, *extra]


def fixmatch(setup, run_dir, *extra, **kw):
    kw.setdefault("env", ONE_THREAD)
    return stage("fixmatch", *fixmatch_args(setup, run_dir, *extra), **kw)


def final_state(run_dir):
    state = checkpoint.load(os.path.join(run_dir, "checkpoint.pt"))
    return state["state"]["model"], state["state"]["ema"]["model"]


def epoch_events(run_dir):
    """The figures logged at the end of each epoch (its last record), without wall-clock ones."""
    events = {}
    for event in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))):
        if "val_top1_ema" in event:
            events[event["epoch"]] = {k: v for k, v in event.items()
                                      if isinstance(v, (int, float)) and k not in ("time", "img_s")}
    return events


def test_kill_and_resume_matches_uninterrupted(setup, tmp_path):
    # FlexMatch with distribution alignment: the variant with the most state (a prediction per unlabeled
    # image, running class statistics), which must survive the kill like the weights
    args = ["train.max_steps=10", "run.checkpoint_every=2",   # the labeled loader (5 steps) cycles twice
            "fixmatch.variant=flexmatch", "fixmatch.distribution_alignment=true"]
    fixmatch(setup, tmp_path / "straight", *args)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "fixmatch.py"),
                             *fixmatch_args(setup, killed, *args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and checkpoint.load(str(ckpt))["step"] >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.load(str(ckpt))["step"]
    assert 4 <= killed_at < 10
    out = fixmatch(setup, killed, *args)
    assert f"resumed from {ckpt} at step {killed_at}" in out.stdout + out.stderr

    straight_model, straight_ema = final_state(tmp_path / "straight")
    resumed_model, resumed_ema = final_state(killed)
    assert_same_weights(straight_ema, resumed_ema, atol=1e-6)
    assert_same_weights(straight_model, resumed_model, atol=1e-6)
    straight_labeler, resumed_labeler = (checkpoint.load(str(d / "checkpoint.pt"))["state"]["pseudo_labeler"]
                                         for d in (tmp_path / "straight", killed))
    assert torch.equal(straight_labeler["latest"], resumed_labeler["latest"])   # FlexMatch's per-image classes
    assert (straight_labeler["latest"] >= 0).any()    # some images were confident: the check bites
    torch.testing.assert_close(straight_labeler["alignment"]["p_model"], resumed_labeler["alignment"]["p_model"])
    assert_same_weights(torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["model"],
                        torch.load(killed / "model.pt", weights_only=True)["model"], atol=1e-6)
    # the epoch's figures (losses, mask rate, pseudo-label accuracy, val) survive the kill too
    straight_events, resumed_events = epoch_events(tmp_path / "straight"), epoch_events(killed)
    assert list(straight_events) == [1] and straight_events[1]["mask_rate"] > 0   # FlexMatch warm-up: may be all
    assert resumed_events[1] == pytest.approx(straight_events[1], rel=1e-6)


def write_pseudo_labels(data, path, rows):
    """The first `rows` unlabeled images with their hidden labels (a perfect pseudo-label file)."""
    with open(os.path.join(data, "unlabeled.csv")) as f:
        unlabeled = list(csv.reader(f))[1:rows + 1]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "score"], *[[p, label, "0.9"] for p, label in unlabeled]])
    return unlabeled


def test_two_ranks_equal_one_rank(setup, tmp_path):
    """Same global batch (8 labeled + 16 unlabeled): 2 gloo ranks (global-batch BatchNorm over the
    concatenated [labeled, weak, strong] batch, averaged gradients) train what 1 process trains,
    up to float reordering, with pseudo-labels joining the labeled set. Reordering weighs more here
    than in pretraining: after one step 1 process with and without channels-last differ by 0.2% or
    6.1% of what the weights moved, depending on the fixture's model (2 ranks then match one of the
    two); local instead of global-batch BatchNorm moves the stem 58-167% off. Within 20% after 1 step."""
    data, init = setup
    pseudo = tmp_path / "pseudo.csv"
    write_pseudo_labels(data, pseudo, rows=8)
    # threshold 0.1: the largest of 10 probabilities is at least 0.1, so every unlabeled image takes part
    # and no weak-view confidence sits on the edge of the mask, where a last-bit difference between
    # the runs would flip it and move the weights by ~2e-4 (seen with threshold 0.15)
    args = ["train.max_steps=1", f"fixmatch.pseudo_labels={pseudo}", "fixmatch.threshold=0.1"]
    out = fixmatch(setup, tmp_path / "one", *args)
    assert "48 labeled images (labeled+pseudo), 652 unlabeled" in out.stdout + out.stderr
    fixmatch(setup, tmp_path / "two", *args, torchrun=2)
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    start = torch.load(init, weights_only=True)["model"]
    assert_trained_alike(one[0], two[0], start, share=0.2)
    assert_trained_alike(one[1], two[1], start, share=0.2)   # the EMA
    losses = [[e["loss"] for e in map(json.loads, open(tmp_path / run / "metrics.jsonl")) if "lr" in e]
              for run in ("one", "two")]
    assert len(losses[0]) == 1 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_bad_pseudo_label_row_is_named(setup, tmp_path):
    data, _ = setup
    pseudo = tmp_path / "pseudo.csv"
    write_pseudo_labels(data, pseudo, rows=2)
    with open(pseudo, "a") as f:
        f.write("images/train/missing.png,3,0.9\n")   # line 4: not an image of unlabeled.csv
    proc = fixmatch(setup, tmp_path / "run", f"fixmatch.pseudo_labels={pseudo}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fixmatch.py: error: {pseudo}:4: images/train/missing.png is not an image of unlabeled.csv")


@pytest.mark.parametrize("lr", [50, 0.05])
def test_model_is_the_best_by_val_among_start_ema_and_live(setup, tmp_path, lr):
    # lr 50 wrecks the model (the starting model should win); at 0.05 the EMA and the live weights compete.
    # Whichever val ranks first (ties: start, then EMA, then live) is model.pt, and the done event names it.
    out = fixmatch(setup, tmp_path, "train.max_steps=5", f"sgd.lr_backbone={lr}", f"sgd.lr_head={lr}",
                   "fixmatch.ema=0.9")
    events = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    start = next(e["val_top1"] for e in events if e.get("step") == 0 and "val_top1" in e)
    epoch = next(e for e in events if "val_top1_ema" in e)
    live_weights, ema_weights = final_state(tmp_path)
    candidates = [(start, "start", torch.load(setup[1], weights_only=True)["model"]),
                  (epoch["val_top1_ema"], "EMA", ema_weights), (epoch["val_top1"], "live", live_weights)]
    top1, source, weights = max(candidates, key=lambda c: c[0])   # max keeps the first of equals
    done = events[-1]
    assert (done["event"], done["val_top1"], done["best_weights"]) == ("done", top1, source)
    assert_same_weights(torch.load(tmp_path / "model.pt", weights_only=True)["model"], weights, atol=0)
    if source == "start":
        assert "the starting model (no epoch beat it)" in out.stdout + out.stderr


def test_ema_batchnorm_statistics_come_from_clean_unlabeled_batches(setup, tmp_path):
    """fixmatch.bn_batches=2: before evaluation the EMA's BatchNorm statistics are recomputed with
    its own weights over the first 2 clean (eval-view) unlabeled batches, averaged batch by batch."""
    data, _ = setup
    fixmatch(setup, tmp_path, "train.max_steps=3", "fixmatch.bn_batches=2", "run.seed=3")
    ema = final_state(tmp_path)[1]
    loader = build_loader(read_split(data, "unlabeled"), "eval", image_size=28, global_batch=16, seed=3 + 2,
                          workers=0)
    means, variances = [], []
    for batch in itertools.islice(loader.epoch(0), 2):
        stem = nn.functional.conv2d(batch["views"][0], ema["backbone.stem.0.weight"], padding=1)
        channels = stem.transpose(0, 1).flatten(1).double()
        means.append(channels.mean(1))
        variances.append(channels.var(1))   # unbiased, as BatchNorm's running estimate
    # float32 channels-last BatchNorm sums in another order than this float64 reference (seen: 4e-5 relative)
    torch.testing.assert_close(ema["backbone.stem.1.running_mean"].double(), torch.stack(means).mean(0),
                               rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(ema["backbone.stem.1.running_var"].double(), torch.stack(variances).mean(0),
                               rtol=2e-4, atol=1e-5)
    assert ema["backbone.stem.1.num_batches_tracked"].item() == 2
    # the live model keeps the statistics of its training batches
    assert not torch.equal(final_state(tmp_path)[0]["backbone.stem.1.running_mean"],
                           ema["backbone.stem.1.running_mean"])
