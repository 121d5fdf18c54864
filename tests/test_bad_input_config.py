"""Out-of-range, non-finite and mistyped config values are refused at load time, before a stage starts
work, with one line naming the key, the value and what was expected."""
import dataclasses
import os
import subprocess
import sys
import typing

import pytest

from trainer.runtime import config, config_fields
from trainer.runtime.config import ConfigError, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# each stage's config class and its demo YAML, as the launch scripts load them
STAGES = {
    "pretrain": (config.PretrainConfig, "configs/demo/pretrain.yaml"),
    "finetune": (config.FinetuneConfig, "configs/demo/finetune.yaml"),
    "pseudolabel": (config.PseudolabelConfig, "configs/demo/pseudolabel.yaml"),
    "fixmatch": (config.FixmatchConfig, "configs/demo/fixmatch.yaml"),
    "evaluate": (config.EvaluateConfig, "configs/demo/evaluate.yaml"),
    "active": (config.ActiveConfig, "configs/demo/active.yaml"),
    "pipeline": (config.PipelineConfig, "configs/demo/pipeline.yaml"),
}


def load_stage(stage, *overrides):
    cls, path = STAGES[stage]
    return load(cls, os.path.join(ROOT, path), list(overrides))


@pytest.mark.parametrize("stage, override, message", [
    # shared sections
    ("pretrain", "train.epochs=-1", "train.epochs=-1: expected an integer >= 1"),
    ("finetune", "train.epochs=0", "train.epochs=0: expected an integer >= 1"),
    ("fixmatch", "train.batch_size=0", "train.batch_size=0: expected an integer >= 1"),
    ("pretrain", "train.max_steps=-5", "train.max_steps=-5: expected an integer >= 0"),
    ("pretrain", "run.log_every=0", "run.log_every=0: expected an integer >= 1"),
    ("fixmatch", "run.checkpoint_every=-1", "run.checkpoint_every=-1: expected an integer >= 1"),
    ("active", "run.seed=-1", "run.seed=-1: expected an integer in [0, 2147483647]"),
    ("active", "run.seed=4294967296", "run.seed=4294967296: expected an integer in [0, 2147483647]"),
    ("finetune", "data.image_size=4", "data.image_size=4: expected an integer >= 8"),
    ("pretrain", "data.workers=-1", "data.workers=-1: expected an integer >= 0"),
    # data.augment: the training views' augmentations
    ("finetune", "data.augment.translate=0.6", "data.augment.translate=0.6: expected a finite number in [0, 0.5]"),
    ("fixmatch", "data.augment.translate=-0.1", "data.augment.translate=-0.1: expected a finite number in [0, 0.5]"),
    ("finetune", "data.augment.crop_min_scale=0",
     "data.augment.crop_min_scale=0.0: expected a finite number in (0, 1]"),
    ("finetune", "data.augment.crop_min_scale=1.5",
     "data.augment.crop_min_scale=1.5: expected a finite number in (0, 1]"),
    ("fixmatch", "data.augment.rand_augment_ops=-1",
     "data.augment.rand_augment_ops=-1: expected an integer in [0, 14]"),
    ("fixmatch", "data.augment.rand_augment_ops=15",
     "data.augment.rand_augment_ops=15: expected an integer in [0, 14]"),
    ("fixmatch", "data.augment.rand_augment_magnitude=0",
     "data.augment.rand_augment_magnitude=0: expected an integer in [1, 10]"),
    ("fixmatch", "data.augment.rand_augment_magnitude=11",
     "data.augment.rand_augment_magnitude=11: expected an integer in [1, 10]"),
    ("fixmatch", "data.augment.cutout=0.95", "data.augment.cutout=0.95: expected a finite number in [0, 0.9]"),
    ("fixmatch", "data.augment.cutout=-0.5", "data.augment.cutout=-0.5: expected a finite number in [0, 0.9]"),
    ("fixmatch", "data.augment.cutout=nan", "data.augment.cutout=nan: expected a finite number in [0, 0.9]"),
    ("pretrain", "data.augment.flip=sometimes", "data.augment.flip: expected bool, got str 'sometimes'"),
    ("pretrain", "data.augment.rotate=10", "unknown key data.augment.rotate; allowed keys in data.augment: flip, "
                                           "translate, crop_min_scale, rand_augment_ops, rand_augment_magnitude, "
                                           "cutout"),
    ("pretrain", "data.augment=false", "data.augment: expected a section (mapping), got False"),
    ("finetune", "model.width=0", "model.width=0: expected an integer >= 1"),
    ("pseudolabel", "inference.batch_size=0", "inference.batch_size=0: expected an integer >= 1"),
    ("pipeline", "pipeline.nproc=0", "pipeline.nproc=0: expected an integer >= 1"),
    # pretrain: LARS, Barlow Twins, kNN monitor
    ("pretrain", "lars.lr_weights=-0.1", "lars.lr_weights=-0.1: expected a finite number >= 0"),
    ("pretrain", "lars.warmup_epochs=nan", "lars.warmup_epochs=nan: expected a finite number >= 0"),
    ("pretrain", "lars.weight_decay=-1e-6", "lars.weight_decay=-1e-06: expected a finite number >= 0"),
    ("pretrain", "barlow.lambd=.inf", "barlow.lambd=inf: expected a finite number >= 0"),
    ("pretrain", "barlow.projector=[512,0]", "barlow.projector[1]=0: expected an integer >= 1"),
    ("pretrain", "barlow.projector=[]", "barlow.projector=[]: expected a non-empty list of integers >= 1"),
    ("pretrain", "knn.k=0", "knn.k=0: expected an integer >= 1"),
    ("pretrain", "knn.temperature=0", "knn.temperature=0.0: expected a finite number > 0"),
    ("pretrain", "knn.every_epochs=-1", "knn.every_epochs=-1: expected an integer >= 0"),
    # finetune: SGD
    ("finetune", "sgd.lr_head=nan", "sgd.lr_head=nan: expected a finite number >= 0"),
    ("finetune", "sgd.lr_backbone=-inf", "sgd.lr_backbone=-inf: expected a finite number >= 0"),
    ("finetune", "sgd.momentum=1", "sgd.momentum=1.0: expected a finite number in [0, 1)"),
    ("finetune", "sgd.momentum=-0.5", "sgd.momentum=-0.5: expected a finite number in [0, 1)"),
    ("finetune", "finetune.eval_every=0", "finetune.eval_every=0: expected an integer >= 1"),
    # fixmatch
    ("fixmatch", "fixmatch.threshold=0", "fixmatch.threshold=0.0: expected a finite number in (0, 1]"),
    ("fixmatch", "fixmatch.threshold=1.5", "fixmatch.threshold=1.5: expected a finite number in (0, 1]"),
    ("fixmatch", "fixmatch.ema=1", "fixmatch.ema=1.0: expected a finite number in [0, 1)"),
    ("fixmatch", "fixmatch.ema=NaN", "fixmatch.ema=nan: expected a finite number in [0, 1)"),
    ("fixmatch", "fixmatch.mu=0", "fixmatch.mu=0: expected an integer >= 1"),
    ("fixmatch", "fixmatch.lambda_u=-1", "fixmatch.lambda_u=-1.0: expected a finite number >= 0"),
    ("fixmatch", "fixmatch.eval_every=0", "fixmatch.eval_every=0: expected an integer >= 1"),
    ("fixmatch", "fixmatch.bn_batches=-1", "fixmatch.bn_batches=-1: expected an integer >= 0"),
    # pseudolabel
    ("pseudolabel", "pseudo.top_k=0", "pseudo.top_k=0: expected an integer >= 1"),
    # P: numbers of images in pseudo.schedule / pseudo.fixmatch_p, fractions in *_fraction, one key of each pair
    ("pseudolabel", "pseudo.schedule=[]", "pseudo.schedule=[] and pseudo.schedule_fraction=[]: expected P per "
                                          "iteration in one of them (numbers of images per class, or fractions of "
                                          "the unlabeled images per class)"),
    ("pseudolabel", "pseudo.schedule=[1700,-1]", "pseudo.schedule[1]=-1: expected an integer >= 1"),
    ("pseudolabel", "pseudo.schedule=[3,0]", "pseudo.schedule[1]=0: expected an integer >= 1"),
    ("pseudolabel", "pseudo.schedule=[3,2.5]",
     "pseudo.schedule[1]=2.5: expected a whole number of images; fractions moved to pseudo.schedule_fraction"),
    ("pseudolabel", "pseudo.fixmatch_p=16.5",
     "pseudo.fixmatch_p=16.5: expected a whole number of images; fractions moved to pseudo.fixmatch_fraction"),
    ("pseudolabel", "pseudo.fixmatch_p=-1", "pseudo.fixmatch_p=-1: expected an integer >= 0"),
    ("pseudolabel", "pseudo.schedule=[ten]", "pseudo.schedule[0]: expected int, got str 'ten'"),
    # the retired form: a fraction in the key of numbers of images names the key that took fractions over
    ("pseudolabel", "pseudo.schedule=[0.3108,0.6216]",
     "pseudo.schedule[0]=0.3108: expected a whole number of images; fractions moved to pseudo.schedule_fraction"),
    ("pseudolabel", "pseudo.fixmatch_p=0.0256",
     "pseudo.fixmatch_p=0.0256: expected a whole number of images; fractions moved to pseudo.fixmatch_fraction"),
    ("pseudolabel", "pseudo.schedule_fraction=[0.5,1.5]",
     "pseudo.schedule_fraction[1]=1.5: expected a finite number in (0, 1]"),
    ("pseudolabel", "pseudo.schedule_fraction=[0]",
     "pseudo.schedule_fraction[0]=0.0: expected a finite number in (0, 1]"),
    ("pseudolabel", "pseudo.schedule_fraction=[0.3,.nan]",
     "pseudo.schedule_fraction[1]=nan: expected a finite number in (0, 1]"),
    ("pseudolabel", "pseudo.fixmatch_fraction=2", "pseudo.fixmatch_fraction=2.0: expected a finite number in [0, 1]"),
    # label propagation: alpha 0 spreads no label (every unlabeled image scores 0), 1 never converges
    ("pseudolabel", "propagation.alpha=0", "propagation.alpha=0.0: expected a finite number in (0, 1)"),
    ("pseudolabel", "propagation.alpha=1", "propagation.alpha=1.0: expected a finite number in (0, 1)"),
    ("pseudolabel", "pseudo.pseudo_epochs=0", "pseudo.pseudo_epochs=0: expected an integer >= 1"),
    ("pseudolabel", "pseudo.labeled_epochs=-2", "pseudo.labeled_epochs=-2: expected an integer >= 1"),
    ("pseudolabel", "pseudo.chunk=0", "pseudo.chunk=0: expected an integer >= 1"),
    # evaluate
    ("evaluate", "evaluate.scales=[28,0]", "evaluate.scales[1]=0: expected an integer >= 8"),
    ("evaluate", "evaluate.scales=-28", "evaluate.scales[0]=-28: expected an integer >= 8"),
    ("evaluate", "evaluate.scales=[]", "evaluate.scales=[]: expected a non-empty list of integers >= 8"),
    ("evaluate", "evaluate.splits=[]", "evaluate.splits=[]: expected a non-empty list"),
    ("evaluate", "knn.k=0", "knn.k=0: expected an integer >= 1"),
    ("evaluate", "knn.temperature=-0.07", "knn.temperature=-0.07: expected a finite number > 0"),
    ("evaluate", "knn.every_epochs=1", "unknown key knn.every_epochs; allowed keys in knn: k, temperature"),
    # active
    # the budget: a number of queries in active.budget, a fraction of the images in active.budget_fraction
    ("active", "active.budget=0", "active.budget=0: expected an integer >= 1"),
    ("active", "active.budget=-3", "active.budget=-3: expected an integer >= 1"),
    ("active", "active.budget=12.5",
     "active.budget=12.5: expected a whole number of queries; fractions moved to active.budget_fraction"),
    ("active", "active.budget=.nan",
     "active.budget=nan: expected a whole number of queries; fractions moved to active.budget_fraction"),
    ("active", "active.budget=ten", "active.budget: expected int, got str 'ten'"),
    # the retired form: the demo's fraction in the key of numbers of queries names the key that took it over
    ("active", "active.budget=0.0025",
     "active.budget=0.0025: expected a whole number of queries; fractions moved to active.budget_fraction"),
    ("active", "active.budget_fraction=0", "active.budget_fraction=0.0: expected a finite number in (0, 1]"),
    ("active", "active.budget_fraction=-0.5", "active.budget_fraction=-0.5: expected a finite number in (0, 1]"),
    ("active", "active.budget_fraction=1.5", "active.budget_fraction=1.5: expected a finite number in (0, 1]"),
    ("active", "active.budget_fraction=.nan", "active.budget_fraction=nan: expected a finite number in (0, 1]"),
    ("active", "active.clusters=0", "active.clusters=0: expected an integer >= 1"),
    ("active", "active.niter=0", "active.niter=0: expected an integer >= 1"),
    ("active", "active.max_points_per_centroid=-1", "active.max_points_per_centroid=-1: expected an integer >= 0"),
    # wrong types and choices
    ("pretrain", "train.epochs=ten", "train.epochs: expected int, got str 'ten'"),
    ("finetune", "train.batch_size=6.4", "train.batch_size: expected int, got float 6.4"),
    ("finetune", "sgd.lr_backbone=fast", "sgd.lr_backbone: expected float, got str 'fast'"),
    ("finetune", "model.width=true", "model.width: expected int, got bool True"),
    ("evaluate", "model.width=8", "model: the backbone's architecture is read from backbone.json next to "
                                  "evaluate.backbone; drop the model section"),
    ("evaluate", "evaluate.scales=[28,big]", "evaluate.scales[1]: expected int, got str 'big'"),
    # keys users' older configs have: one line naming what replaced them
    ("pretrain", "optim.lr_weights=0.2", "optim: renamed lars (learning rates per 256 images of global batch)"),
    ("finetune", "optim.lr_head=0.1", "optim: renamed sgd (learning rates as given, not scaled by batch size)"),
    ("fixmatch", "optim.nesterov=true", "optim: renamed sgd (learning rates as given, not scaled by batch size)"),
    ("finetune", "finetune.init=x.pt", "finetune.init: renamed finetune.backbone (a path, or random)"),
    ("fixmatch", "fixmatch.init=x.pt", "fixmatch.init: renamed fixmatch.model"),
    ("evaluate", "evaluate.knn=true", "evaluate.knn: kNN scores are computed when evaluate.backbone is given, "
                                      "TTA scores when evaluate.model is"),
    ("evaluate", "evaluate.k=10", "evaluate.k: moved to knn.k (the knn section, as in pretrain)"),
    ("evaluate", "evaluate.temperature=0.1",
     "evaluate.temperature: moved to knn.temperature (the knn section, as in pretrain)"),
    # inputs have no demo default: an empty one is named
    ("finetune", "finetune.backbone=", "finetune.backbone: required: backbone.pt, a model.pt whose backbone "
                                       "is reused, or random"),
    ("fixmatch", "fixmatch.model=", "fixmatch.model: required: the model.pt (backbone + head) FixMatch starts from"),
    ("active", "active.backbone=", "active.backbone: required: the backbone.pt whose embeddings are clustered"),
    ("pretrain", "data.root=", "data.root: required: a prepared dataset folder (launch/prepare.py)"),
    ("pipeline", "pipeline.active.config=", "pipeline.active.config: required: the stage's YAML config"),
    ("fixmatch", "train.on_nan=ignore", "train.on_nan: 'ignore' is not one of stop, skip"),
])
def test_bad_values_are_refused_naming_the_key(stage, override, message):
    with pytest.raises(ConfigError) as e:
        load_stage(stage, override)
    assert str(e.value) == message


@pytest.mark.parametrize("stage, override, key, value", [
    ("fixmatch", "fixmatch.threshold=1", "fixmatch.threshold", 1.0),   # (0, 1]: 1 is in
    ("fixmatch", "fixmatch.ema=0", "fixmatch.ema", 0.0),                # [0, 1): 0 is in
    ("fixmatch", "train.max_steps=0", "train.max_steps", 0),            # 0 = no cap
    ("pretrain", "data.workers=0", "data.workers", 0),
    ("pretrain", "knn.every_epochs=0", "knn.every_epochs", 0),          # 0 = no kNN monitor
    ("pretrain", "data.image_size=8", "data.image_size", 8),
    ("active", "run.seed=2147483647", "run.seed", 2147483647),
    ("pseudolabel", "pseudo.fixmatch_p=0", "pseudo.fixmatch_p", 0),
    ("pseudolabel", "pseudo.fixmatch_fraction=0.0256", "pseudo.fixmatch_fraction", 0.0256),
    ("pseudolabel", "pseudo.schedule_fraction=[0.999,1]", "pseudo.schedule_fraction", [0.999, 1.0]),   # 1: all
    ("pseudolabel", "pseudo.schedule=[1,1700]", "pseudo.schedule", [1, 1700]),     # 1: one image per class
    ("pseudolabel", "pseudo.fixmatch_p=16.0", "pseudo.fixmatch_p", 16),           # an older config.yaml's count
    ("pseudolabel", "propagation.alpha=0.999", "propagation.alpha", 0.999),
    ("active", "active.budget=1", "active.budget", 1),                  # one query
    ("active", "active.budget=12.0", "active.budget", 12),              # an older config.yaml's count
    ("active", "active.budget_fraction=1", "active.budget_fraction", 1.0),   # (0, 1]: 1 is in
    ("finetune", "sgd.lr_backbone=0", "sgd.lr_backbone", 0.0),      # a frozen backbone
    ("finetune", "sgd.weight_decay=5e-4", "sgd.weight_decay", 5e-4),   # YAML 1.1 reads 5e-4 as text
    ("finetune", "train.on_nan=skip", "train.on_nan", "skip"),
])
def test_values_at_the_edges_are_accepted(stage, override, key, value):
    cfg = load_stage(stage, override)
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


@pytest.mark.parametrize("file, overrides, message", [
    # in one file, or both on one command line: neither wins silently
    ({"schedule": [200], "schedule_fraction": [0.3]}, [],
     "pseudo.schedule and pseudo.schedule_fraction: expected one of the two (a number of images, or a fraction of "
     "them), got both"),
    ({"fixmatch_p": 16, "fixmatch_fraction": 0.03}, [],
     "pseudo.fixmatch_p and pseudo.fixmatch_fraction: expected one of the two (a number of images, or a fraction of "
     "them), got both"),
    ({}, ["pseudo.schedule=[5]", "pseudo.schedule_fraction=[0.1]"],
     "pseudo.schedule and pseudo.schedule_fraction: expected one of the two (a number of images, or a fraction of "
     "them), got both"),
])
def test_a_count_and_a_fraction_of_one_p_are_refused_together(tmp_path, file, overrides, message):
    import yaml
    path = tmp_path / "pseudolabel.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": "x"}, "pseudo": {"model": "m.pt", "finetune_config": "f.yaml",
                                                                      **file}}))
    with pytest.raises(ConfigError) as e:
        load(config.PseudolabelConfig, str(path), overrides)
    assert str(e.value) == message


@pytest.mark.parametrize("file, overrides", [
    ({"budget": 100, "budget_fraction": 0.0025}, []),
    ({}, ["active.budget=100", "active.budget_fraction=0.01"]),
])
def test_a_count_and_a_fraction_of_the_budget_are_refused_together(tmp_path, file, overrides):
    import yaml
    path = tmp_path / "active.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": "x"}, "active": {"model": "m.pt", "backbone": "b.pt", **file}}))
    with pytest.raises(ConfigError) as e:
        load(config.ActiveConfig, str(path), overrides)
    assert str(e.value) == ("active.budget and active.budget_fraction: expected one of the two (a number of queries, "
                            "or a fraction of the labeled + unlabeled images), got both")


def test_the_budget_comes_from_exactly_one_key():
    assert (config.ActiveSection().budget, config.ActiveSection().budget_fraction) == (0, 0.0025)
    for given in ({"budget": 100}, {"budget_fraction": 0}):   # two, or none
        with pytest.raises(ConfigError, match=r"^active.budget=\d+ and active.budget_fraction=[\d.]+: expected the "
                                              r"budget in one of them \(a number of queries, or a fraction of the "
                                              r"labeled \+ unlabeled images\)$"):
            config.ActiveSection(**given)


@pytest.mark.parametrize("file, overrides, budget", [
    ({"budget_fraction": 0.0025}, [], (0, 0.0025)),                               # the demo's
    ({"budget_fraction": 0.0025}, ["active.budget=100"], (100, 0.0)),             # configs/own's override
    ({"budget": 100}, [], (100, 0.0)),
    ({"budget": 100}, ["active.budget_fraction=0.01"], (0, 0.01)),
    ({}, [], (0, 0.0025)),                                                        # the defaults
])
def test_an_override_of_one_budget_key_replaces_the_files_other(tmp_path, file, overrides, budget):
    import yaml
    path = tmp_path / "active.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": "x"}, "active": {"model": "m.pt", "backbone": "b.pt", **file}}))
    active = load(config.ActiveConfig, str(path), overrides).active
    assert (active.budget, active.budget_fraction) == budget


@pytest.mark.parametrize("path, overrides, queries", [
    ("configs/demo/active.yaml", [], 138),            # 0.25%: the demo's 138 answers (docs/results.md)
    ("configs/paper/active.yaml", [], 138),           # the same fraction on a pool of the demo's size
    ("configs/demo/active.yaml", ["active.budget=100"], 100),   # configs/own/pipeline.yaml's
])
def test_the_shipped_configs_resolve_the_same_queries_as_before(path, overrides, queries):
    """Before the split, active.budget=0.0025 (< 1) meant round(0.0025 x the pool): 137.5 -> 138 on the demo's."""
    from trainer.algorithms.active_learning import query_count
    pool = 300 + 54700   # prepared Fashion-MNIST's labeled + unlabeled images, the pool the demo's budget counts
    assert round(0.0025 * pool) == 138   # the old rule, for the old value
    cfg = load(config.ActiveConfig, os.path.join(ROOT, path), ["data.root=x", "active.model=m.pt",
                                                               "active.backbone=b.pt", *overrides])
    assert query_count(cfg.active, pool) == queries


def test_configs_own_asks_for_100_queries():
    import yaml
    with open(os.path.join(ROOT, "configs/own/pipeline.yaml")) as f:
        overrides = yaml.safe_load(f)["pipeline"]["active"]["overrides"]
    assert "active.budget=100" in overrides
    active = load_stage("active", *overrides).active
    assert (active.budget, active.budget_fraction) == (100, 0.0)


@pytest.mark.parametrize("overrides, schedule, fixmatch", [
    ([], ([], [0.3108, 0.6216]), (0, 0.0256)),                                    # the demo's fractions
    (["pseudo.schedule=[5]", "pseudo.fixmatch_p=2"], ([5], []), (2, 0.0)),        # an override of the other key
    (["pseudo.fixmatch_p=0"], ([], [0.3108, 0.6216]), (0, 0.0)),                  # no FixMatch selection
])
def test_an_override_of_one_key_of_a_pair_replaces_the_files_other(overrides, schedule, fixmatch):
    pseudo = load_stage("pseudolabel", *overrides).pseudo
    assert ((pseudo.schedule, pseudo.schedule_fraction), (pseudo.fixmatch_p, pseudo.fixmatch_fraction)) == \
        (schedule, fixmatch)


@pytest.mark.parametrize("path, overrides, p, fixmatch_p", [
    ("configs/demo/pseudolabel.yaml", [], [1700, 3400], 140),
    ("configs/demo/pseudolabel.yaml", ["pseudo.schedule_fraction=[0.3108,0.4662,0.6216,0.777]"],   # pipeline_full
     [1700, 2550, 3400, 4250], 140),
    ("configs/paper/pseudolabel.yaml", [], [200, 300, 400, 500], 16),
])
def test_the_shipped_configs_resolve_the_same_p_as_before(path, overrides, p, fixmatch_p):
    """On prepared Fashion-MNIST (54,700 unlabeled images, 10 classes) the demo's P are those of docs/results.md."""
    from trainer.algorithms.balanced_selection import configured_p
    cfg = load(config.PseudolabelConfig, os.path.join(ROOT, path), ["data.root=x", "pseudo.model=m.pt", *overrides])
    schedule, fixmatch = configured_p(cfg.pseudo)
    assert [given.images(54700, 10) for given in schedule] == p and fixmatch.images(54700, 10) == fixmatch_p


def test_pipeline_full_gives_the_schedule_as_fractions():
    import yaml
    with open(os.path.join(ROOT, "configs/demo/pipeline_full.yaml")) as f:
        overrides = yaml.safe_load(f)["pipeline"]["pseudolabel"]["overrides"]
    assert "pseudo.schedule_fraction=[0.3108,0.4662,0.6216,0.777]" in overrides
    load_stage("pseudolabel", *overrides)


@pytest.mark.parametrize("stage, override, key, value", [
    ("finetune", "data.augment.translate=0", "translate", 0.0),              # no translation
    ("finetune", "data.augment.translate=0.5", "translate", 0.5),
    ("finetune", "data.augment.crop_min_scale=1", "crop_min_scale", 1.0),
    ("fixmatch", "data.augment.rand_augment_ops=0", "rand_augment_ops", 0),   # no RandAugment
    ("fixmatch", "data.augment.rand_augment_magnitude=1", "rand_augment_magnitude", 1),
    ("fixmatch", "data.augment.cutout=0", "cutout", 0.0),                    # no cutout
    ("fixmatch", "data.augment.cutout=0.9", "cutout", 0.9),
    ("pretrain", "data.augment.flip=false", "flip", False),
])
def test_augment_values_at_the_edges_are_accepted(stage, override, key, value):
    assert getattr(load_stage(stage, override).data.augment, key) == value


def test_nan_in_a_yaml_file_is_refused_naming_its_key(tmp_path):
    with open(os.path.join(ROOT, "configs/demo/fixmatch.yaml")) as f:
        text = f.read()
    assert "  lambda_u: 1.0\n" in text
    path = tmp_path / "fixmatch.yaml"
    path.write_text(text.replace("  lambda_u: 1.0\n", "  lambda_u: .nan\n"))
    with pytest.raises(ConfigError) as e:
        load(config.FixmatchConfig, str(path))
    assert str(e.value) == "fixmatch.lambda_u=nan: expected a finite number >= 0"

    path.write_text(text.replace("  lambda_u: 1.0\n", "  lambda_u: -.inf\n"))
    with pytest.raises(ConfigError, match=r"^fixmatch.lambda_u=-inf: expected a finite number >= 0$"):
        load(config.FixmatchConfig, str(path))


def config_classes():
    return [obj for obj in vars(config).values()
            if dataclasses.is_dataclass(obj) and obj.__module__ == config.__name__]


def numeric(hint) -> bool:
    if typing.get_origin(hint) is list:
        (hint,) = typing.get_args(hint)
    return hint in (int, float)


def test_every_number_declares_a_range():
    undeclared = [f"{cls.__name__}.{f.name}" for cls in config_classes()
                  for f in dataclasses.fields(cls)
                  if numeric(typing.get_type_hints(cls)[f.name]) and "bounds" not in f.metadata]
    assert undeclared == []


@pytest.mark.parametrize("cls", config_classes(), ids=lambda cls: cls.__name__)
def test_defaults_satisfy_their_own_ranges(cls):
    # load checks every field, the defaults of keys it was not given included; inputs have no default
    given = required_keys(cls)
    if given:
        with pytest.raises(ConfigError, match=f"^{given[0]}: required: "):
            load(cls, None)
    expected = cls()
    for key in given:
        *sections, name = key.split(".")
        node = expected
        for section in sections:
            node = getattr(node, section)
        setattr(node, name, "x")
    assert load(cls, None, [f"{key}=x" for key in given]) == expected


def required_keys(cls, prefix="") -> list[str]:
    """The dotted keys of `cls` (nested sections included) that have no default, in load order."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += required_keys(hint, f"{prefix}{f.name}.")
        elif "required" in f.metadata:
            keys.append(prefix + f.name)
    return keys


def test_a_default_outside_its_range_is_caught():
    @dataclasses.dataclass
    class Broken:
        steps: int = config_fields.number(0, ">= 1")

    with pytest.raises(ConfigError, match=r"^steps=0: expected an integer >= 1$"):
        load(Broken, None)


def test_bounds_specs():
    half_open = config_fields.Bounds.parse("(0, 1]")
    assert (0 in half_open, 0.5 in half_open, 1 in half_open, 1.01 in half_open) == (False, True, True, False)
    assert (-1 in config_fields.Bounds.parse(">= -1"), -1 in config_fields.Bounds.parse("> -1")) == (True, False)
    with pytest.raises(ValueError, match="bounds 'positive'"):
        config_fields.Bounds.parse("positive")


@pytest.mark.parametrize("script, override, message", [
    ("pretrain.py", "train.epochs=-1", "train.epochs=-1: expected an integer >= 1"),
    ("finetune.py", "sgd.lr_head=nan", "sgd.lr_head=nan: expected a finite number >= 0"),
    ("fixmatch.py", "fixmatch.threshold=1.5", "fixmatch.threshold=1.5: expected a finite number in (0, 1]"),
    ("evaluate.py", "evaluate.scales=[28,0]", "evaluate.scales[1]=0: expected an integer >= 8"),
    ("fixmatch.py", "data.augment.cutout=1", "data.augment.cutout=1.0: expected a finite number in [0, 0.9]"),
    ("pseudolabel.py", "pseudo.schedule=[0.3108,0.6216]",
     "pseudo.schedule[0]=0.3108: expected a whole number of images; fractions moved to pseudo.schedule_fraction"),
    ("active.py", "active.budget=0.0025",
     "active.budget=0.0025: expected a whole number of queries; fractions moved to active.budget_fraction"),
])
def test_cli_refuses_before_creating_the_run_dir(tmp_path, script, override, message):
    stage = script[:-3]
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script),
                           "--config", os.path.join(ROOT, STAGES[stage][1]), override, f"run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"{script}: error: {message}"]
    assert not run_dir.exists()
