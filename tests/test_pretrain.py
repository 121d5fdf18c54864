import json
import math
import os
import shutil

import torch
import torchvision

from tiny import (ROOT, TINY_PRETRAIN, assert_same_weights, assert_trained_alike, fashion, initial_backbone,
                  kill_after_checkpoint, stage)

CONFIG = os.path.join(ROOT, "configs", "demo", "pretrain.yaml")


def pretrain(data, run_dir, *extra, **kw):
    return stage("pretrain", "--config", CONFIG, f"data.root={data}", f"run.dir={run_dir}",
                 *TINY_PRETRAIN, *extra, **kw)


def weights(run_dir):
    return torch.load(os.path.join(run_dir, "backbone.pt"), weights_only=True)


def test_two_ranks_equal_one_rank(tmp_path_factory, tmp_path):
    """Same global batch: 2 gloo ranks (synchronised BN, all-reduced correlation, averaged grads)
    train the same weights as 1 process, up to float reordering (see assert_trained_alike)."""
    data = fashion(tmp_path_factory)
    # the kNN monitor runs too: sharded inference through the synchronised BatchNorm in eval mode
    pretrain(data, tmp_path / "one", "train.max_steps=6", "knn.every_epochs=1")
    pretrain(data, tmp_path / "two", "train.max_steps=6", "knn.every_epochs=1", torchrun=2)
    knn = [[json.loads(line)["knn_top1"] for line in open(tmp_path / run / "metrics.jsonl") if "knn_top1" in line]
           for run in ("one", "two")]
    assert len(knn[0]) == 2 and knn[0] == knn[1]
    assert_trained_alike(weights(tmp_path / "one"), weights(tmp_path / "two"), initial_backbone(CONFIG, *TINY_PRETRAIN))


def test_kill_and_resume_matches_uninterrupted(tmp_path_factory, tmp_path):
    data = fashion(tmp_path_factory)
    args = ["train.max_steps=30", "run.checkpoint_every=3"]
    pretrain(data, tmp_path / "straight", *args)
    killed = tmp_path / "killed"
    ckpt = killed / "checkpoint.pt"
    killed_at = kill_after_checkpoint("pretrain", ["--config", CONFIG, f"data.root={data}", f"run.dir={killed}",
                                                   *TINY_PRETRAIN, *args], killed, min_step=6)
    assert 6 <= killed_at < 30
    out = pretrain(data, killed, *args)
    assert f"resumed from {ckpt} at step {killed_at}" in out.stderr + out.stdout
    assert_same_weights(weights(tmp_path / "straight"), weights(killed), atol=1e-6)


def test_backbone_loads_into_torchvision(tmp_path_factory, tmp_path):
    data = fashion(tmp_path_factory)
    pretrain(data, tmp_path, "model.backbone=resnet18", "train.max_steps=1", "barlow.projector=[16,16]")
    net = torchvision.models.resnet18()
    result = net.load_state_dict(weights(tmp_path), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_checkpoint_of_another_architecture_is_refused(tmp_path_factory, tmp_path):
    data = fashion(tmp_path_factory)
    pretrain(data, tmp_path / "narrow", "train.max_steps=1")
    pretrain(data, tmp_path / "wide", "train.max_steps=1", "model.width=16")
    # a changed config is refused before any checkpoint is read...
    proc = pretrain(data, tmp_path / "narrow", "train.max_steps=1", "model.width=16", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"pretrain.py: error: run.dir={tmp_path}/narrow: holds a pretrain run made with another config "
        "(model.width: 8 -> 16)")
    # ... and a checkpoint of another architecture under the same config is refused when it is read
    shutil.copyfile(tmp_path / "wide" / "checkpoint.pt", tmp_path / "narrow" / "checkpoint.pt")
    proc = pretrain(data, tmp_path / "narrow", "train.max_steps=1", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pretrain.py: error: {tmp_path}/narrow/checkpoint.pt: written for another architecture")


def test_apex_larc_trains_through_the_engine(tmp_path_factory, tmp_path, monkeypatch):
    """lars.impl=apex: LARC is a wrapper whose zero_grad() takes no arguments (it died on step 1 when the
    engine called zero_grad(set_to_none=True)); its state goes into the checkpoints."""
    import apex_larc
    from launch.pretrain import main as pretrain_main
    apex_larc.install(monkeypatch)
    data = fashion(tmp_path_factory)
    pretrain_main(["--config", CONFIG, f"data.root={data}", f"run.dir={tmp_path}", *TINY_PRETRAIN,
                   "lars.impl=apex", "train.max_steps=3", "run.checkpoint_every=1"])
    trained = weights(tmp_path)
    moved = [k for k, v in initial_backbone(CONFIG, *TINY_PRETRAIN).items()
             if v.is_floating_point() and not torch.equal(v, trained[k])]
    assert moved and all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]["optimizer"]["state"]   # SGD momentum
