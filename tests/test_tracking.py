"""run.log's trackers (trainer/runtime/tracking.py) read back from their own files against metrics.jsonl:
TensorBoard through a killed and resumed run, W&B offline, MLflow's file store, a missing package, and
`launch/report.py tb` for a run made with metrics.jsonl alone."""
import glob
import importlib.util
import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tiny import ROOT, TINY_FINETUNE, TINY_PRETRAIN, fashion, kill_after_checkpoint, stage
from trainer.runtime import checkpoint, config, rundir
from trainer.runtime.config import PretrainConfig

PRETRAIN = os.path.join(ROOT, "configs", "demo", "pretrain.yaml")
FINETUNE = os.path.join(ROOT, "configs", "demo", "finetune.yaml")
BATCH = 16   # TINY_PRETRAIN's train.batch_size: the images of a step


def pretrain_args(data, run_dir, *extra):
    return ["--config", PRETRAIN, f"data.root={data}", f"run.dir={run_dir}", *TINY_PRETRAIN, *extra]


def events(run_dir):
    return rundir.read_lines(os.path.join(run_dir, "metrics.jsonl"))


def first_logged(run_dir, keys, images_per_step, tag_prefix):
    """{tag: {images: value}} of the training steps' `keys` in metrics.jsonl, each step's first line
    (a resumed run logs again the steps after its checkpoint)."""
    expected = {}
    for event in events(run_dir):
        if "loss" in event:
            for key in keys:
                expected.setdefault(f"{tag_prefix}/{key}", {}).setdefault(images_per_step * event["step"], event[key])
    return expected


def read_event_files(tb_dir) -> EventAccumulator:
    """Every event as written: no purge of steps that go backwards, which would hide them."""
    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0},
                                   purge_orphaned_data=False)
    accumulator.Reload()
    return accumulator


def assert_scalars_once_per_step(tb_dir, expected: dict):
    """Each tag of `expected` in the event files at its steps, once each, in order, with its values; no other tag."""
    written = read_event_files(tb_dir)
    assert set(written.Tags()["scalars"]) == set(expected)
    for tag, values in expected.items():
        points = written.Scalars(tag)
        assert [p.step for p in points] == sorted(values), tag
        assert [p.value for p in points] == pytest.approx([values[s] for s in sorted(values)], rel=1e-6), tag
    return written


def test_killed_and_resumed_run_writes_each_step_once(tmp_path_factory, tmp_path):
    data = fashion(tmp_path_factory)
    run = tmp_path / "run"
    args = pretrain_args(data, run, "train.max_steps=30", "run.checkpoint_every=3", "run.log=[jsonl,tensorboard]")
    assert kill_after_checkpoint("pretrain", args, run, min_step=6) < 30   # test_pretrain's margin
    # resume from the checkpoint before the last: the steps after it are in the event files already
    os.replace(run / "checkpoint.pt.prev", run / "checkpoint.pt")
    resumed_at = checkpoint.load(str(run / "checkpoint.pt"))["step"]
    out = stage("pretrain", *args)
    assert f"at step {resumed_at}" in out.stdout + out.stderr

    steps = [e["step"] for e in events(run) if "loss" in e]
    assert len(steps) > len(set(steps)) and sorted(set(steps)) == list(range(1, 31))   # steps logged twice
    written = assert_scalars_once_per_step(run / "tb", first_logged(run, ("loss", "lr", "img_s"), BATCH, "pretrain"))
    assert len(glob.glob(str(run / "tb" / "events.out.tfevents.*"))) == 2   # one per process
    (text,) = written.Tensors("config/text_summary")   # the resolved config, once: by the first process
    assert text.tensor_proto.string_val[0].decode() == "\n".join(
        "    " + line for line in (run / "config.yaml").read_text().splitlines())


def test_report_tb_writes_a_jsonl_run_as_a_live_run_would(tmp_path_factory, tmp_path):
    """A fine-tune made with run.log=[jsonl], converted by `launch/report.py tb` on the folder above it: its
    training steps at images seen, its val passes at their step's images, its done event at the last step."""
    data = fashion(tmp_path_factory)
    run = tmp_path / "pipeline" / "finetune"
    stage("finetune", "--config", FINETUNE, f"data.root={data}", f"run.dir={run}", *TINY_FINETUNE,
          "finetune.backbone=random", "train.epochs=2")
    assert not os.path.exists(run / "tb")
    out = stage("report", "tb", str(tmp_path / "pipeline"))
    assert out.stdout.startswith(f"{run}/tb: ") and "scalars added" in out.stdout

    batch = config.load(config.FinetuneConfig, FINETUNE, TINY_FINETUNE).train.batch_size
    expected = first_logged(run, ("loss", "lr", "img_s"), batch, "finetune")
    log = events(run)
    for event in log:
        if "val_top1" in event and "event" not in event:
            for key in ("val_top1", "val_top5"):
                expected.setdefault(f"finetune/{key}", {})[batch * event["step"]] = event[key]
    last = batch * max(e["step"] for e in log if "step" in e)
    done = log[-1]
    assert done["event"] == "done"
    expected |= {f"finetune/done/{key}": {last: done[key]} for key in ("best_epoch", "val_top1")}
    assert len(expected["finetune/val_top1"]) == 2
    assert_scalars_once_per_step(run / "tb", expected)

    files = sorted(glob.glob(str(run / "tb" / "*")))
    again = stage("report", "tb", str(run))
    assert again.stdout == f"{run}/tb: up to date\n"
    assert sorted(glob.glob(str(run / "tb" / "*"))) == files   # not even an empty event file
    assert_scalars_once_per_step(run / "tb", expected)


def test_a_tracker_whose_package_is_missing_stops_the_run_before_it_starts(tmp_path_factory, tmp_path):
    """wandb unimportable (None in sys.modules, as Python blocks an import): one line naming run.log and the
    package, exit status 2, no run dir written."""
    data = fashion(tmp_path_factory)
    script = tmp_path / "without_wandb.py"
    script.write_text(f"import runpy, sys\nsys.modules['wandb'] = None\n"
                      f"sys.argv[0] = {os.path.join(ROOT, 'launch', 'pretrain.py')!r}\n"
                      "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    run = tmp_path / "run"
    out = stage("pretrain", *pretrain_args(data, run, "run.log=[tensorboard,wandb]"), script=str(script), check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "pretrain.py: error: run.log: wandb needs the wandb package, which is not installed: pip install wandb "
        "(or leave wandb out of run.log)")
    assert "Traceback" not in out.stderr and not os.path.exists(run)


def test_run_log_names_only_known_trackers():
    with pytest.raises(config.ConfigError, match=r"^run.log: 'tensorbord' is not one of jsonl, tensorboard, wandb, "
                                                 r"mlflow$"):
        config.load(PretrainConfig, None, ["run.log=[jsonl,tensorbord]"])
    assert config.load(PretrainConfig, None, ["run.log=mlflow", "data.root=anywhere"]).run.log == ["mlflow"]


def skip_unless_installed(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed here (pip install -e '.[track]')")


def wandb_records(path):
    """The records of an offline W&B run file: after its 7-byte header, LevelDB's log format (32 KiB blocks of
    chunks, each a 4-byte checksum, a 2-byte length, a type: 1 whole, 2-4 first/middle/last piece), each record
    a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2
    data, block = open(path, "rb").read(), 32768
    assert data[:4] == b":W&B"
    at, pieces = 7, b""
    while at + 7 <= len(data):
        if block - at % block < 7:   # a block's tail too short for a header is padding
            at += block - at % block
            continue
        length, kind = int.from_bytes(data[at + 4:at + 6], "little"), data[at + 6]
        pieces += data[at + 7:at + 7 + length]
        at += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def test_wandb_offline(tmp_path_factory, tmp_path):
    skip_unless_installed("wandb")
    data = fashion(tmp_path_factory)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"OMP_NUM_THREADS": "1"}
    stage("pretrain", *pretrain_args(data, run, "train.max_steps=4", "run.log=[wandb]"), env=env)
    (offline,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))   # offline: nothing uploaded
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
               for record in wandb_records(offline) if record.WhichOneof("record_type") == "history"]
    logged = [(h["step"], h["pretrain/loss"], h["pretrain/lr"]) for h in history if "pretrain/loss" in h]
    assert logged == [(BATCH * e["step"], pytest.approx(e["loss"], rel=1e-12), pytest.approx(e["lr"], rel=1e-12))
                      for e in events(run) if "loss" in e]
    assert len(logged) == 4


def test_mlflow_file_store(tmp_path_factory, tmp_path, monkeypatch):
    skip_unless_installed("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 reads its file store only with it
    from mlflow.tracking import MlflowClient
    data = fashion(tmp_path_factory)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"OMP_NUM_THREADS": "1"}
    stage("pretrain", *pretrain_args(data, run, "train.max_steps=4", "run.log=[mlflow]"), env=env)
    client = MlflowClient(f"file://{run / 'mlruns'}")
    run_id = json.load(open(run / "tracking.json"))["mlflow"]
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("loss", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"pretrain/{key}"))
        assert history == [(BATCH * e["step"], pytest.approx(e[key], rel=1e-12)) for e in events(run) if key in e]


def test_report_figures_go_to_tensorboard_once(tmp_path):
    """The pipeline's report hands its PNGs to the trackers of the pipeline's run.log: TensorBoard shows each
    as an image of its size, and a report written again adds none."""
    import numpy as np
    from PIL import Image
    from trainer.runtime import tracking
    (tmp_path / "run.json").write_text('{"stage": "pipeline"}')
    (tmp_path / "config.yaml").write_text("run:\n  log: [jsonl, tensorboard]\n")
    figure = tmp_path / "ablation.png"
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(figure)
    for _ in range(2):
        tracking.log_images(str(tmp_path), [str(figure)])
    written = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}, purge_orphaned_data=False)
    written.Reload()
    (image,) = written.Images("pipeline/ablation")
    assert (image.step, image.width, image.height) == (0, 50, 30)
