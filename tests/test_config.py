import glob
import os
import subprocess
import sys

import pytest

from trainer.runtime import config, stages
from trainer.runtime.config import ConfigError, FixmatchConfig, PipelineConfig, PretrainConfig, load
from trainer.runtime.stages import STAGES

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
    """Every shipped config loads as what uses it: a pipeline config as the pipeline's, and each config a
    pipeline (or a pseudolabel config's fine-tunes) names as the config of the stage that step runs."""
    shipped = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml")))
    loaded = set()

    def load_as(stage, path, overrides=()):
        cfg = load(STAGES[stage].config, os.path.join(ROOT, path), list(overrides))
        loaded.add(os.path.join(ROOT, path))
        if stage == "pseudolabel":
            load_as("finetune", cfg.pseudo.finetune_config, cfg.pseudo.finetune_overrides)

    for path in shipped:
        if os.path.basename(path).startswith("pipeline"):
            pipeline = load(PipelineConfig, path).pipeline
            loaded.add(path)
            for step in [*stages.RECIPE, *stages.BASELINES.values()]:
                spec = getattr(pipeline, step.spec)
                if spec.config or step.name not in stages.BASELINES:   # a baseline is optional
                    load_as(step.stage, spec.config, spec.overrides)
    assert loaded == set(shipped) and len(shipped) >= 16


def test_cli_exit_status_2_with_one_line():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"),
                           "--config", os.path.join(ROOT, "configs/demo/pretrain.yaml"), "train.epochz=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "pretrain.py: error: unknown key train.epochz; allowed keys in train: epochs, steps, warmup_steps, batch_size, "
        "fit_batch, max_steps, minutes, precision, on_nan"]


def dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    return [key for name, value in tree.items()
            for key in (dotted_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [prefix + name])]


def test_help_lists_every_key_with_its_range_default_and_comment():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "fixmatch.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    lines = out[out.index("keys (set them in the --config YAML, or as dotted.key=value):"):]   # the epilog
    # a key's line is indented 2, its section's comment 4, its own comment 6
    listed = [line.split()[0] for line in lines if line.startswith("  ") and line[2] != " "]
    assert sorted(listed) == sorted(dotted_keys(config.to_dict(FixmatchConfig())))

    def described(key: str) -> tuple[str, str]:
        """The key's line (after the key) and its comment, unwrapped."""
        (at,) = [i for i, line in enumerate(lines) if line.startswith(f"  {key} ")]
        comment = []
        for line in lines[at + 1:]:
            if not line.startswith("      "):
                break
            comment.append(line.strip())
        return lines[at].strip()[len(key):], " ".join(comment)

    assert described("fixmatch.threshold") == (" = 0.95  (float in (0, 1])",
                                               "fixmatch, flexmatch: confidence needed for a pseudo-label")
    assert described("train.batch_size") == (" = 256  (int >= 1)", "global: each of N ranks takes batch_size / N")
    flip, comment = described("data.augment.flip")
    assert flip == " = true  (bool)" and comment.startswith("horizontal flip, p=0.5, in every training view")
    variant = described("fixmatch.variant")[0]
    assert variant.startswith(" = fixmatch  (one of ") and "flexmatch" in variant and "softmatch" in variant
    assert described("sgd.lr_backbone")[0] == " = 0.01  (float >= 0)"   # FixmatchConfig's own default, not sgd's
    assert described("fixmatch.model") == ("  (required path)", "the model.pt (backbone + head) FixMatch starts from")
    # comments written on the lines above a key, and a section's (data.augment's docstring) under its heading
    assert described("fixmatch.bn_batches")[1].startswith("Before each evaluation, BatchNorm statistics")
    assert lines[lines.index("data.augment") + 1].startswith("    What the training views' augmentations do")


def test_pipeline_help_lists_its_keys(capsys):
    from launch import pipeline
    with pytest.raises(SystemExit):
        pipeline.main(["--help"])
    out = capsys.readouterr().out
    assert "  pipeline.nproc = 1  (int >= 1)\n      processes per stage: 1 runs inline, more under torchrun" in out
    assert "  pipeline.predict.config  (required path)\n      the stage's YAML config\n" in out


def test_stage_configs_start_with_run_and_data():
    # config.yaml opens with run and data (StageConfig), as it did when each stage declared them
    for stage in STAGES.values():
        assert list(config.to_dict(stage.config()))[:2] == ["run", "data"]
    assert config.PredictConfig().data.on_bad_image == "skip"   # its own default, kept under the shared section
