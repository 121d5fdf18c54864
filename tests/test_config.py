import glob
import os
import subprocess
import sys

import pytest

from trainer.runtime.config import STAGE_CONFIGS, ConfigError, PretrainConfig, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_and_overrides(tmp_path):
    cfg = load(PretrainConfig, write(tmp_path, "train:\n  epochs: 7\nbarlow:\n  lambd: 0.01\n"),
               ["data.root=d", "train.batch_size=64", "barlow.projector=[16,16]", "lars.warmup_epochs=2", "run.dir=out"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.barlow.projector) == (7, 64, [16, 16])
    assert cfg.barlow.lambd == 0.01 and cfg.lars.warmup_epochs == 2.0 and cfg.run.dir == "out"
    assert cfg.model.backbone == "small"   # default kept


@pytest.mark.parametrize("text, overrides, message", [
    ("train:\n  epoch: 3\n", [], "unknown key train.epoch; allowed keys in train: epochs,"),
    ("", ["train.epochs=many"], "train.epochs: expected int, got str 'many'"),
    ("", ["train.epochs=1.5"], "train.epochs: expected int, got float 1.5"),
    ("", ["model.backbone=vgg"], "model.backbone: 'vgg' is not one of small, resnet18, resnet50"),
    ("", ["barlow.projector=[8, x]"], "barlow.projector[1]: expected int"),
    ("train: 5\n", [], "train: expected a section"),
    ("", ["nosuch.key=1"], "unknown key nosuch; allowed keys in the top level: run, data"),
    ("", ["train.epochs"], "expected dotted.key=value"),
])
def test_errors_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as e:
        load(PretrainConfig, write(tmp_path, text), ["data.root=d", *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file /nope.yaml: not found"):
        load(PretrainConfig, "/nope.yaml")


def test_shipped_configs_load():
    shipped = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml")))
    stage_of = {"supervised": "finetune", "pipeline_full": "pipeline"}
    for path in shipped:
        name = os.path.basename(path)[:-len(".yaml")]
        load(STAGE_CONFIGS[stage_of.get(name, name)], path)
    assert len(shipped) >= 16


def test_cli_exit_status_2_with_one_line():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"),
                           "--config", os.path.join(ROOT, "configs/demo/pretrain.yaml"), "train.epochz=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "pretrain.py: error: unknown key train.epochz; allowed keys in train: epochs, batch_size, "
        "max_steps, precision, on_nan"]
