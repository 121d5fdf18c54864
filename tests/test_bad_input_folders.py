"""Folders that are the user's: a run.dir or an export --out holding files that semiscale did not write is
refused with one line and exit status 2, and every file in it stays byte for byte as it was. semiscale
replaces and cleans up only what it can prove it wrote: a run dir's files once run.json names the stage, an
export's files while export.json records their bytes, temporaries by data.atomic's exact names."""
import json
import os
import shutil
import subprocess

import pytest

from tiny import ENV, ROOT, TINY_PRETRAIN, stage, tiny_classifier
from test_bad_input_rundir import finetune, pipeline_config, pretrain, refused, tree
from data import atomic
from launch import export
from trainer.operations import export as export_folder

USER_FILES = {"README": "my notes\n", "classes.txt": "cat\ndog\n", "model.onnx": "my own model",
              "foo.tmp": "a draft", "photos/holiday.tmp": "half a download", "config.yaml": "mine: 1\n",
              "metrics.jsonl": '{"my": 1}\n'}
EXPORTED = ["README", "classes.txt", "export.json", "model.onnx", "model.ts"]


def users_folder(path, files=USER_FILES):
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def model(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    tiny_classifier(data, path)
    return str(path)


# ---- run dirs ----

def test_atomic_temporaries_are_told_from_the_users_tmp_files(tmp_path):
    with atomic.replacing(str(tmp_path / "checkpoint.pt")) as tmp:
        assert atomic.temporary_target(os.path.basename(tmp)) == "checkpoint.pt"
        open(tmp, "w").close()
    assert atomic.temporary_target("run.json.0123abcd.tmp") == "run.json"
    for theirs in ("notes.tmp", "config.yaml.tmp", "a.abc123.tmp", "a.0123ABCD.tmp", "a.0123abcd.tmp.txt",
                   ".0123abcd.tmp"):
        assert atomic.temporary_target(theirs) is None, theirs


def predict(data, model, run_dir, *extra, **kw):
    return stage("predict", "--config", os.path.join(ROOT, "configs", "demo", "predict.yaml"), f"data.root={data}",
                 f"run.dir={run_dir}", f"predict.model={model}", "predict.input=test", "predict.tta_from=",
                 "predict.scales=[28]", "data.backend=torch", "data.workers=0", "inference.batch_size=64", *extra, **kw)


@pytest.mark.parametrize("script, restart", [("pretrain", False), ("pretrain", True), ("finetune", True),
                                             ("predict", False), ("predict", True)])
def test_a_stage_refuses_a_folder_of_the_users(data, model, tmp_path, script, restart):
    folder = users_folder(tmp_path / "mine")
    before = tree(folder)
    extra = ["--restart"] if restart else []
    proc = (predict(data, model, folder, *extra, check=False) if script == "predict"
            else {"pretrain": pretrain, "finetune": finetune}[script](data, folder, *extra, check=False))
    refused(proc, script, f"run.dir={folder}: holds files semiscale did not write (README, classes.txt, config.yaml, "
                          "...; no run.json); choose an empty or new run.dir")
    assert tree(folder) == before and not (folder / "replaced").exists()


@pytest.mark.parametrize("force", [[], ["--force", "all"]])
def test_the_pipeline_refuses_a_folder_of_the_users(data, tmp_path, force):
    import test_pipeline
    folder = users_folder(tmp_path / "mine")
    before = tree(folder)
    proc = subprocess.run([*test_pipeline.command(pipeline_config(tmp_path, data)), *force, f"run.dir={folder}"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    refused(proc, "pipeline", f"run.dir={folder}: holds files semiscale did not write",
            "choose an empty or new run.dir")
    assert tree(folder) == before


def test_an_empty_folder_and_one_a_killed_claim_left_are_run_dirs_to_be(data, tmp_path):
    """A claim killed after it took the lock and before run.json was whole leaves .lock and a temporary of
    run.json: the rerun goes on there."""
    empty = tmp_path / "empty"
    empty.mkdir()
    pretrain(data, empty)
    assert json.loads((empty / "run.json").read_text()) == {"stage": "pretrain"}
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ".lock").touch()
    (killed / "run.json.0123abcd.tmp").write_text('{"sta')
    out = pretrain(data, killed)
    assert "removed 1 temporary file(s)" in out.stdout
    assert json.loads((killed / "run.json").read_text()) == {"stage": "pretrain"} and (killed / "backbone.pt").exists()


def test_submit_refuses_a_folder_of_the_users_before_queuing(tmp_path, capsys):
    from test_submit import submit
    folder = users_folder(tmp_path / "mine")
    before = tree(folder)
    demo = os.path.join(ROOT, "configs", "demo", "finetune.yaml")
    assert submit.main(["finetune", "--gpus-per-node", "0", "--config", demo, f"run.dir={folder}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"run.dir={folder}: holds files semiscale did not write" in err, err
    assert tree(folder) == before


def test_a_submitted_stage_runs_in_the_run_dir_submit_recorded(slurm_cluster, data, tmp_path):
    """submitit's logs go into RUN_DIR/submitit/ before the stage starts: the stage still finds its own
    run dir there, recorded by submit.py."""
    from test_submit import submit, wait_for
    config = os.path.join(ROOT, "configs", "demo", "pretrain.yaml")
    run_dir = tmp_path / "run"
    (job,) = submit.submit(submit.parse_args(["pretrain", "--config", config, "--nodes", "1", "--gpus-per-node", "0",
                                              "--time", "5", f"data.root={data}", f"run.dir={run_dir}",
                                              *TINY_PRETRAIN, "train.max_steps=2"]))
    wait_for([job], slurm_cluster)
    assert json.loads((run_dir / "run.json").read_text()) == {"stage": "pretrain"}
    assert (run_dir / "backbone.pt").exists() and (run_dir / "submitit").is_dir()


# ---- export --out ----

def export_args(data, model, out, *extra):
    return ["--model", model, "--data-root", data, "--out", str(out), "--scales", "28", *extra]


@pytest.fixture(scope="module")
def exported(data, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "export"
    export.main(export_args(data, model, out))
    return out


def previous_export(exported, tmp_path):
    return shutil.copytree(exported, tmp_path / "export")


@pytest.mark.parametrize("name", ["README", "classes.txt", "model.onnx", "foo.tmp"])
def test_export_refuses_an_out_folder_holding_a_file_of_the_users(data, model, tmp_path, name):
    folder = users_folder(tmp_path / "mine", {name: USER_FILES[name]})
    before = tree(folder)
    proc = stage("export", *export_args(data, model, folder), check=False)
    refused(proc, "export", f"--out {folder}: holds {name}, which no export wrote there (export.json does not list "
                            "it); choose a new or empty --out")
    assert tree(folder) == before


def test_export_records_its_files_and_replaces_them_again(data, model, exported, tmp_path):
    out = previous_export(exported, tmp_path)
    (out / "model.onnx.0123abcd.tmp").write_bytes(b"half a model, left by a killed export")
    recorded = json.loads((out / "export.json").read_text())["files"]
    assert recorded == {name: {"size": os.path.getsize(out / name), "sha256": tree(out)[name]}
                        for name in EXPORTED if name != "export.json"}
    export.main(export_args(data, model, out, "--mirror"))
    assert sorted(os.listdir(out)) == EXPORTED and json.loads((out / "export.json").read_text())["mirror"] is True


def test_export_refuses_a_previous_export_with_a_file_of_the_users_beside_it(data, model, exported, tmp_path):
    out = previous_export(exported, tmp_path)
    (out / "notes.tmp").write_text("mine")
    before = tree(out)
    refused(stage("export", *export_args(data, model, out), check=False), "export",
            f"--out {out}: holds notes.tmp, which no export wrote there")
    assert tree(out) == before


def test_export_refuses_a_previous_export_whose_readme_was_edited(data, model, exported, tmp_path):
    out = previous_export(exported, tmp_path)
    with open(out / "README", "a") as f:
        f.write("Deployed on the shop's tills since May.\n")
    before = tree(out)
    refused(stage("export", *export_args(data, model, out), check=False), "export",
            f"--out {out}: README has changed since it was exported (its sha256 is not the one export.json records); "
            "move it away or choose a new or empty --out")
    assert tree(out) == before


def test_export_refuses_an_export_json_that_records_no_files(data, model, tmp_path):
    """An export.json of the user's, or of an export from before export.json recorded the files."""
    out = users_folder(tmp_path / "old", {"export.json": '{"scales": [28]}', "model.ts": "weights"})
    before = tree(out)
    refused(stage("export", *export_args(data, model, out), check=False), "export",
            f"--out {out}: holds export.json, which does not list the files an export wrote there")
    assert tree(out) == before


@pytest.mark.parametrize("stop", ["check", "rename"])
def test_an_interrupted_export_is_finished_by_the_next(data, model, exported, tmp_path, monkeypatch, stop):
    """Stopped after the files were written (the check), or as model.onnx took its name: the folder holds
    the new files, or some of the previous export's, and export.partial.json, which proves them; the next
    export replaces them and finishes."""
    out = previous_export(exported, tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    if stop == "check":
        monkeypatch.setattr(export, "check_parity", interrupted)
    else:
        rename = os.replace
        monkeypatch.setattr(atomic.os, "replace", lambda source, target, **kw: interrupted() if target.endswith(
            "model.onnx") else rename(source, target, **kw))
    with pytest.raises(KeyboardInterrupt):
        export.main(export_args(data, model, out, "--mirror"))
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["README", "classes.txt", export_folder.PARTIAL, "model.onnx", "model.ts"]
    export.main(export_args(data, model, out, "--mirror"))
    assert sorted(os.listdir(out)) == EXPORTED and json.loads((out / "export.json").read_text())["mirror"] is True
