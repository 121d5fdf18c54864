"""Run dirs, checkpoints, metrics logs and faults, as a hostile but honest user meets them: every refusal
is exit status 2 with one line naming the file or key and what was expected, and leaves every file the
user had exactly as it was."""
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml

from data import atomic
from tiny import ENV, ROOT, TINY_FINETUNE, TINY_PRETRAIN, kill_after_checkpoint, stage
from trainer.runtime import checkpoint, rundir

PRETRAIN = os.path.join(ROOT, "configs", "demo", "pretrain.yaml")
FINETUNE = os.path.join(ROOT, "configs", "demo", "finetune.yaml")


def tree(folder) -> dict:
    """Every file below `folder` with a hash of its bytes: equal trees hold the same files, unchanged."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def pretrain(data, run_dir, *extra, **kw):
    return stage("pretrain", "--config", PRETRAIN, f"data.root={data}", f"run.dir={run_dir}", *TINY_PRETRAIN,
                 "train.max_steps=2", "run.checkpoint_every=1", *extra, **kw)


def finetune(data, run_dir, *extra, **kw):
    return stage("finetune", "--config", FINETUNE, f"data.root={data}", f"run.dir={run_dir}", "finetune.backbone=random",
                 *TINY_FINETUNE, "train.epochs=1", *extra, **kw)


def refused(proc, script: str, *fragments: str) -> str:
    """The one stderr line of a refusal; asserts exit status 2 and that it holds every fragment."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = lines[-1]
    assert last.startswith(f"{script}.py: error: "), last
    for fragment in fragments:
        assert fragment in last, last
    return last


@pytest.fixture(scope="module")
def finished_pretrain(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "pretrain"
    pretrain(data, run_dir)
    return run_dir


def copy_of(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


# ---- a run dir records its stage and config; nothing is written before the checks pass ----

def test_a_finished_run_records_its_stage_and_config(finished_pretrain):
    assert json.load(open(finished_pretrain / "run.json")) == {"stage": "pretrain"}
    assert yaml.safe_load(open(finished_pretrain / "config.yaml"))["run"]["dir"] == str(finished_pretrain)
    assert {"backbone.pt", "checkpoint.pt", "metrics.jsonl", ".lock"} <= set(os.listdir(finished_pretrain))


def test_another_stages_run_dir_is_refused_untouched(data, finished_pretrain, tmp_path):
    run_dir = copy_of(finished_pretrain, tmp_path)
    before = tree(run_dir)
    last = refused(finetune(data, run_dir, check=False), "finetune", f"run.dir={run_dir}: a pretrain run dir")
    assert "choose another run.dir" in last and tree(run_dir) == before


def test_a_changed_config_is_refused_untouched(data, finished_pretrain, tmp_path):
    run_dir = copy_of(finished_pretrain, tmp_path)
    before = tree(run_dir)
    refused(pretrain(data, run_dir, "barlow.lambd=0.01", check=False), "pretrain",
            "another config (barlow.lambd: 0.0051 -> 0.01)", "--restart")
    assert tree(run_dir) == before


def test_the_same_config_reruns_and_result_neutral_keys_may_change(data, finished_pretrain, tmp_path):
    run_dir = copy_of(finished_pretrain, tmp_path)
    pretrain(data, run_dir, "run.log_every=5", "data.workers=1")
    assert torch.load(run_dir / "backbone.pt", weights_only=True).keys() == \
        torch.load(finished_pretrain / "backbone.pt", weights_only=True).keys()


def test_a_key_added_since_the_run_compares_as_its_default(data, finished_pretrain, tmp_path):
    # a run made before data.augment.cutout existed did what its default does: it reruns; another value
    # is a change; a key the run had and the config no longer has is one too
    run_dir = copy_of(finished_pretrain, tmp_path)
    recorded = yaml.safe_load(open(run_dir / "config.yaml"))
    del recorded["data"]["augment"]["cutout"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    before = tree(run_dir)
    refused(pretrain(data, run_dir, "data.augment.cutout=0.25", check=False), "pretrain",
            "another config (data.augment.cutout: '(absent)' -> 0.25)")
    assert tree(run_dir) == before
    pretrain(data, run_dir)
    recorded["data"]["retired_key"] = 1
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    refused(pretrain(data, run_dir, check=False), "pretrain", "another config (data.retired_key: 1 -> '(absent)')")


def test_restart_moves_the_previous_run_aside(data, finished_pretrain, tmp_path):
    run_dir = copy_of(finished_pretrain, tmp_path)
    before = tree(run_dir)
    pretrain(data, run_dir, "barlow.lambd=0.01", "--restart")
    (replaced,) = os.listdir(run_dir / "replaced")
    kept = tree(run_dir / "replaced" / replaced)
    assert kept == {k: v for k, v in before.items() if k != ".lock"}   # every old file, byte for byte
    assert yaml.safe_load(open(run_dir / "config.yaml"))["barlow"]["lambd"] == 0.01
    assert (run_dir / "backbone.pt").exists()


def test_a_second_live_writer_is_refused(data, finished_pretrain, tmp_path):
    run_dir = copy_of(finished_pretrain, tmp_path)
    holder = subprocess.Popen(   # a run that is still going, in its own process as a real one would be
        [sys.executable, "-c", "import sys, time; from trainer.runtime import rundir; lock = rundir.Lock(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(300)", str(run_dir)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(run_dir)
        refused(pretrain(data, run_dir, check=False), "pretrain", "another live run is writing to it")
        assert tree(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    pretrain(data, run_dir)   # the lock dies with its holder, even killed


def test_a_run_dir_that_is_a_file_is_refused(data, tmp_path):
    path = tmp_path / "run"
    path.write_text("my notes\n")
    refused(pretrain(data, path, check=False), "pretrain", f"run.dir={path}: exists and is not a folder")
    assert path.read_text() == "my notes\n"


def test_a_folder_with_results_but_no_record_is_not_reused(data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    refused(pretrain(data, run_dir, check=False), "pretrain", "holds files semiscale did not write (metrics.jsonl")
    assert os.listdir(run_dir) == ["metrics.jsonl"]


def test_stray_temporaries_of_a_killed_write_are_removed(data, finished_pretrain, tmp_path):
    """Only data.atomic's temporaries (<name>.<8 hex>.tmp) go, and only in the run's own folders: a *.tmp
    of the user's stays, as do the temporaries of a sub-run and of a replaced run."""
    run_dir = copy_of(finished_pretrain, tmp_path)
    (run_dir / "checkpoint.pt.abc12345.tmp").write_bytes(b"half a checkpoint")
    (run_dir / "own").mkdir()
    (run_dir / "own" / "chunk.json.0123abcd.tmp").write_text("{")
    theirs = {"config.yaml.tmp": "run:", "notes.tmp": "mine", "notes.abc123.tmp": "mine too",
              "own/notes.tmp": "mine", "replaced/20240101T000000.000000Z/checkpoint.pt.abc12345.tmp": "an old run's",
              "sub/run.json": '{"stage": "finetune"}', "sub/model.pt.abc12345.tmp": "a sub-run's"}
    for name, text in theirs.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)
    out = pretrain(data, run_dir)
    assert "removed 2 temporary file(s)" in out.stdout
    assert not (run_dir / "checkpoint.pt.abc12345.tmp").exists()
    assert not (run_dir / "own" / "chunk.json.0123abcd.tmp").exists()
    assert {name: (run_dir / name).read_text() for name in theirs} == theirs


@pytest.mark.parametrize("script, args", [
    ("pretrain", [f"--config={PRETRAIN}", *TINY_PRETRAIN, "train.batch_size=2000"]),
    ("finetune", [f"--config={FINETUNE}", *TINY_FINETUNE, "finetune.backbone=random", "train.batch_size=4096"]),
    ("finetune", [f"--config={FINETUNE}", *TINY_FINETUNE, "finetune.backbone=/no/such/backbone.pt"]),
    ("fixmatch", [f"--config={os.path.join(ROOT, 'configs', 'demo', 'fixmatch.yaml')}", "fixmatch.model=/no/model.pt"]),
    ("pseudolabel", [f"--config={os.path.join(ROOT, 'configs', 'demo', 'pseudolabel.yaml')}", "pseudo.model=/no/m.pt"]),
    ("active", [f"--config={os.path.join(ROOT, 'configs', 'demo', 'active.yaml')}", "active.model=/no/m.pt"]),
    ("evaluate", [f"--config={os.path.join(ROOT, 'configs', 'demo', 'evaluate.yaml')}", "evaluate.model=/no/m.pt"]),
])
def test_every_stage_writes_nothing_before_its_checks_pass(data, finished_pretrain, tmp_path, script, args):
    """A refused run creates no run dir, and leaves an existing one of its own stage as it was."""
    fresh = tmp_path / "fresh"
    refused(stage(script, *args, f"data.root={data}", f"run.dir={fresh}", check=False), script)
    assert not fresh.exists()
    own = tmp_path / "own"
    own.mkdir()
    (own / "run.json").write_text(json.dumps({"stage": script}))
    before = tree(own)
    refused(stage(script, *args, f"data.root={data}", f"run.dir={own}", check=False), script)
    assert tree(own) == before


# ---- metrics.jsonl: whole lines only ----

def test_a_torn_last_line_is_cut_on_append_and_skipped_on_read(tmp_path, caplog):
    path = str(tmp_path / "metrics.jsonl")
    rundir.append_line(path, json.dumps({"step": 1}))
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')   # a crash mid-write
    assert rundir.read_lines(path) == [{"step": 1}]
    assert "torn last line" in caplog.text
    rundir.append_line(path, json.dumps({"step": 2}))
    assert open(path).read() == '{"step": 1}\n{"step": 2}\n'


def test_a_bad_line_in_the_middle_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(rundir.RunDirError, match=r"metrics.jsonl:2: not a JSON line"):
        rundir.read_lines(str(path))


def test_a_torn_log_is_mended_by_the_next_run_and_read_around_by_readers(data, tmp_path):
    from trainer.runtime import engine
    run_dir = tmp_path / "run"
    finetune(data, run_dir)
    done = engine.read_done(str(run_dir))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"event": "do')   # a crash, or a full disk, mid-line
    assert engine.read_done(str(run_dir)) == done   # the report, pseudolabel and collect read this way
    finetune(data, run_dir)   # the same run again: the torn line is cut before the next one
    lines = open(run_dir / "metrics.jsonl").read().splitlines()
    assert all(json.loads(line) for line in lines) and '{"event": "do' not in lines


@contextlib.contextmanager
def tmpfs(path, size: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk, leave_pages: int):
    """Fill the filesystem, then free `leave_pages` pages of 4 KiB."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    with open(filler, "r+b") as f:
        f.truncate(max(0, filler.stat().st_size - leave_pages * 4096))
    return filler


def test_a_metrics_line_that_does_not_fit_leaves_the_log_as_it_was(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        log = disk / "metrics.jsonl"
        rundir.append_line(str(log), '{"step": 1}')
        fill(disk, 1)   # one page left: a 10 KiB line does not fit
        with pytest.raises(rundir.RunDirError, match=r"cannot append \(No space left on device\); the log is "
                                                     r"left as it was$"):
            rundir.append_line(str(log), '{"note": "' + "x" * 10240 + '"}')
        assert log.read_text() == '{"step": 1}\n'
        rundir.append_line(str(log), '{"step": 2}')   # a line that fits still goes in
        assert rundir.read_lines(str(log)) == [{"step": 1}, {"step": 2}]


def test_a_full_disk_leaves_whole_files_and_one_line(data, tmp_path):
    with tmpfs(tmp_path / "disk", "4m") as disk:
        run_dir = disk / "run"
        args = ["--config", PRETRAIN, f"data.root={data}", f"run.dir={run_dir}", *TINY_PRETRAIN,
                "train.max_steps=300", "run.checkpoint_every=1"]
        killed_at = kill_after_checkpoint("pretrain", args, run_dir, 2)
        # a kill that lands inside a checkpoint's write leaves its temporary, which the next start removes
        before = {path: digest for path, digest in tree(run_dir).items()
                  if atomic.temporary_target(os.path.basename(path)) is None}
        # no room at all: refused at the first write, the config
        filler = fill(disk, 0)
        refused(stage("pretrain", *args, check=False), "pretrain",
                f"{run_dir}/config.yaml: cannot write (No space left on device); the previous file is kept")
        assert tree(run_dir) == before
        # room for the small files only: the run goes on until a write does not fit, then stops on one line
        # (a checkpoint fits while the one before it is released: checkpoint.pt.prev takes no new space)
        filler.unlink()
        filler = fill(disk, 3)
        last = refused(stage("pretrain", *args, check=False), "pretrain")
        # whichever write finds the disk full first: a checkpoint or config (replaced atomically) or a
        # metrics line (appended, the torn part undone)
        assert last.endswith((": cannot write (No space left on device); the previous file is kept",
                              ": cannot append (No space left on device); the log is left as it was")), last
        assert str(run_dir) in last
        assert checkpoint.load_checked(str(run_dir / "checkpoint.pt"))["step"] >= killed_at   # whole, checksum ok
        rundir.read_lines(str(run_dir / "metrics.jsonl"))   # whole lines only
        assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]
        filler.unlink()
        stage("pretrain", *args)   # room again: it resumes and finishes
        last_step = max(e.get("step", 0) for e in rundir.read_lines(str(run_dir / "metrics.jsonl")))
        assert last_step == checkpoint.load_checked(str(run_dir / "checkpoint.pt"))["step"] > killed_at
        assert (run_dir / "backbone.pt").exists()


def test_a_read_only_run_dir_is_one_line(data, finished_pretrain, tmp_path):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        run_dir = disk / "run"
        shutil.copytree(finished_pretrain, run_dir)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        before = tree(run_dir)
        refused(pretrain(data, run_dir, check=False), "pretrain",
                f"run.dir={run_dir}: cannot write there (Read-only file system)")
        assert tree(run_dir) == before


# ---- checkpoints carry a checksum ----

def flip_a_byte_inside_a_tensor(path):
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    with open(path, "r+b") as f:
        f.seek(offset + info.file_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_damaged_checkpoint_is_refused_and_the_previous_one_kept(data, finished_pretrain, tmp_path):
    run_dir = copy_of(finished_pretrain, tmp_path)
    assert (run_dir / "checkpoint.pt.prev").exists()   # written when the last one replaced it
    torch.load(run_dir / "checkpoint.pt", weights_only=True)   # torch itself does not notice...
    flip_a_byte_inside_a_tensor(run_dir / "checkpoint.pt")
    torch.load(run_dir / "checkpoint.pt", weights_only=True)   # ...even after the flip
    before = tree(run_dir)
    refused(pretrain(data, run_dir, check=False), "pretrain",
            f"{run_dir}/checkpoint.pt: damaged (its checksum does not match its contents)",
            f"{run_dir}/checkpoint.pt.prev holds the checkpoint before it")
    kept = ("checkpoint.pt", "checkpoint.pt.prev", "backbone.pt")
    assert {k: tree(run_dir)[k] for k in kept} == {k: before[k] for k in kept}
    shutil.move(run_dir / "checkpoint.pt.prev", run_dir / "checkpoint.pt")   # what the message says to do
    out = pretrain(data, run_dir)
    assert f"resumed from {run_dir}/checkpoint.pt at step 1" in out.stdout + out.stderr


def test_a_training_checkpoint_where_a_model_is_expected_is_one_line(data, finished_pretrain, tmp_path):
    ckpt = finished_pretrain / "checkpoint.pt"
    refused(stage("evaluate", "--config", os.path.join(ROOT, "configs", "demo", "evaluate.yaml"),
                  f"data.root={data}", f"run.dir={tmp_path / 'eval'}", f"evaluate.model={ckpt}", check=False),
            "evaluate", f"{ckpt}: not a semiscale model.pt")
    assert not (tmp_path / "eval").exists()


# ---- numbers that go bad during training ----

def test_a_non_finite_loss_stops_the_run_naming_the_step(data, tmp_path):
    last = refused(finetune(data, tmp_path / "run", "sgd.lr_backbone=1e30", "sgd.lr_head=1e30", "train.epochs=3",
                            check=False), "finetune", "the loss is", "train.on_nan=skip")
    step = int(last.split("step ")[1].split(":")[0])
    assert step >= 2 and not (tmp_path / "run" / "model.pt").exists()


def test_on_nan_skip_leaves_weights_and_optimizer_untouched(caplog):
    from trainer.runtime import amp
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = amp.grad_scaler("fp32", torch.device("cpu"))
    assert amp.step_optimizer(model(torch.ones(4, 3)).sum(), optimizer, scaler, step=0)
    weights, state = [p.clone() for p in model.parameters()], str(optimizer.state_dict())
    nan_loss = model(torch.full((4, 3), float("nan"))).sum()
    assert not amp.step_optimizer(nan_loss, optimizer, scaler, step=1, on_nan="skip")
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert str(optimizer.state_dict()) == state and "step 2: the loss is nan: update skipped" in caplog.text
    amp.step_optimizer(nan_loss, optimizer, scaler, step=1)   # on_nan=stop: noted, stopped at the loop's check
    with pytest.raises(amp.NonFiniteLoss, match=r"^step 2: the loss is nan on 1 rank\(s\); stopping"):
        amp.check_losses()


# ---- the pipeline checks every stage before it deletes or runs anything ----

def pipeline_config(tmp_path, data, **overrides):
    from test_pipeline import write_config
    path = write_config(tmp_path, data)
    cfg = yaml.safe_load(open(path))
    for name, extra in overrides.items():
        cfg["pipeline"][name]["overrides"] += extra
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def test_pipeline_force_with_a_bad_override_deletes_nothing(data, tmp_path):
    import test_pipeline
    run = tmp_path / "run"
    (run / "supervised").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"stage": "pipeline"}))
    (run / "supervised" / "run.json").write_text(json.dumps({"stage": "finetune"}))
    (run / "supervised" / "model.pt").write_bytes(b"a finished stage")
    for bad, message in ((dict(supervised=["train.epochs=-3"]), "stage supervised: train.epochs=-3: expected an integer >= 1"),
                         (dict(active=["active.budget=100000"]), "stage active: active.clusters=3, active.budget -> 100000 queries")):
        config = pipeline_config(tmp_path, data, **bad)
        before = tree(run)
        proc = subprocess.run([*test_pipeline.command(config), "--force", "supervised"], capture_output=True,
                              text=True, env=ENV, timeout=300)
        refused(proc, "pipeline", message)
        assert tree(run) == before


def test_input_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    from data.errors import InputError
    from trainer.runtime import engine

    def bad_input():
        raise InputError("train.epochs=-1: expected an integer >= 1")

    def bug():
        raise ValueError("operands could not be broadcast together")   # numpy's words for a shape bug

    with pytest.raises(SystemExit) as exit_status:
        engine.cli(bad_input)
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.endswith("error: train.epochs=-1: expected an integer >= 1\n")
    with pytest.raises(ValueError, match="broadcast"):   # not swallowed into one line
        engine.cli(bug)
