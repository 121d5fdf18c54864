"""launch/submit.py against a real one-node Slurm cluster (the `slurm_cluster` fixture)."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from slurm_harness import slurm
from trainer.operations import slurm as slurm_jobs

ROOT = Path(__file__).resolve().parents[1]
TOY_STAGE = str(ROOT / "tests" / "slurm_harness" / "toy_stage.py")
JOB_TIMEOUT_S = 150  # the 2 cores are shared; a job normally takes 5-20 s


def load_submit():
    spec = importlib.util.spec_from_file_location("semiscale_submit_under_test", ROOT / "launch" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


submit = load_submit()


def toy_config(tmp_path: Path, steps: int = 2, step_s: float = 0.1) -> Path:
    config = {"run": {"dir": str(tmp_path / "run")}, "toy": {"steps": steps, "step_s": step_s, "value": 0}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def submit_toy(config: Path, *extra: str):
    argv = [TOY_STAGE, "--config", str(config), "--nodes", "1", "--gpus-per-node", "0", "--time", "5", *extra]
    return submit.submit(submit.parse_args(argv))


def wait_for(jobs, cluster) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not all(job.done() for job in jobs):
        if time.monotonic() > deadline:
            cluster.run("scancel", *(job.job_id for job in jobs), check=False)
            ids = [job.job_id for job in jobs]
            pytest.fail(f"jobs {ids} not done after {JOB_TIMEOUT_S} s\n{cluster.logs_tail()}")
        time.sleep(0.5)
    for job in jobs:
        assert job.exception() is None, job.exception()


def wait_for_state(cluster, job_id: str, state: str) -> dict[str, str]:
    """Slurm's view lags submitit's result files by the batch script's exit."""
    deadline = time.monotonic() + 30
    while (fields := cluster.job_fields(job_id))["JobState"] != state and time.monotonic() < deadline:
        time.sleep(0.2)
    return fields


def checkpointed_steps(run_dir: Path) -> list[list[int]]:
    path = run_dir / "checkpoint.pt"
    return torch.load(path, weights_only=True)["steps"] if path.exists() else []


def test_two_tasks_form_one_gloo_group(slurm_cluster, tmp_path):
    # Real sbatch and srun accept the passthrough option and the srun --cpus-per-task it adds.
    extra = ["--cpus-per-task", "1", "--slurm-param", "comment=two-tasks"]
    (job,) = submit_toy(toy_config(tmp_path), "--tasks-per-node", "2", *extra)
    wait_for([job], slurm_cluster)
    fields = slurm_cluster.job_fields(job.job_id)
    assert (fields["Comment"], fields["CPUs/Task"]) == ("two-tasks", "1")

    run_dir = tmp_path / "run"
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["local_rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["rank_sum"] == 0 + 1 for r in ranks)
    node = fields["NodeList"]
    first_host = slurm_cluster.run("scontrol", "show", "hostnames", node).split()[0]
    host, port = ranks[0]["master"].split(":")
    assert ranks[1]["master"] == ranks[0]["master"] and host == first_host
    assert slurm_jobs.PORT_BASE <= int(port) < slurm_jobs.PORT_BASE + slurm_jobs.PORT_SPAN
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    assert (run_dir / "submitit" / f"{job.job_id}_0_log.out").exists()


def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(slurm_cluster, tmp_path):
    steps = 10
    (job,) = submit_toy(toy_config(tmp_path, steps=steps, step_s=0.3), "--tasks-per-node", "2")
    run_dir = tmp_path / "run"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(checkpointed_steps(run_dir)) < 3:
        assert time.monotonic() < deadline, f"no progress\n{slurm_cluster.logs_tail()}"
        time.sleep(0.2)
    # What Slurm does before a preemption or the time limit: USR2 to every task of the job.
    slurm_cluster.run("scancel", "--signal=USR2", job.job_id)
    wait_for([job], slurm_cluster)

    fields = wait_for_state(slurm_cluster, job.job_id, "COMPLETED")
    assert (fields["JobState"], fields["Restarts"]) == ("COMPLETED", "1")
    attempts = (run_dir / "attempts.log").read_text().split()
    assert attempts[:2] == ["restart=0", "from_step=0"] and attempts[2] == "restart=1" and len(attempts) == 4
    resumed_at = int(attempts[3].split("=")[1])
    assert 3 <= resumed_at < steps
    # Every step ran exactly once: those before the requeue in the first run, the rest after.
    expected = [[s, 0] for s in range(resumed_at)] + [[s, 1] for s in range(resumed_at, steps)]
    assert checkpointed_steps(run_dir) == expected
    assert all(json.loads((run_dir / f"rank{r}.json").read_text())["restart"] == 1 for r in range(2))


def test_sweep_is_one_job_array_and_collects_one_table(slurm_cluster, tmp_path, capsys):
    jobs = submit_toy(toy_config(tmp_path), "--sweep", "toy.value=1,2", "--sweep", "toy.steps=1,3")
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1
    assert sorted(job.job_id.split("_")[1] for job in jobs) == ["0", "1", "2", "3"]
    wait_for(jobs, slurm_cluster)
    capsys.readouterr()

    sweep_dir = tmp_path / "run"
    assert submit.main(["collect", str(sweep_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len([line for line in table if line.startswith("|")]) == 2 + 4
    with open(sweep_dir / "sweep.csv") as rows_file:
        rows = list(csv.DictReader(rows_file))
    got = {(row["toy.value"], row["toy.steps"], row["value"], row["step"]) for row in rows}
    assert got == {(v, s, v, s) for v in ("1", "2") for s in ("1", "3")}
    assert all(row["job_id"] in {job.job_id for job in jobs} for row in rows)
    assert (sweep_dir / "toy.value=2_toy.steps=3" / "metrics.jsonl").exists()


def dry_run(argv: list[str], capsys):
    """What a --dry-run prints: the sbatch script and task lines on stdout, notes on stderr."""
    assert submit.main(argv + ["--dry-run"]) == 0
    return capsys.readouterr()


def sbatch_options(script: str) -> set[str]:
    return {line.removeprefix("#SBATCH --") for line in script.splitlines() if line.startswith("#SBATCH --")}


def srun_line(script: str) -> str:
    (line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    return line


def fake_sinfo(tmp_path: Path, monkeypatch, body: str) -> Path:
    """Put an `sinfo` running the shell `body` first on PATH; returns the file its arguments go to."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    argv_file = bin_dir / "sinfo.argv"
    sinfo = bin_dir / "sinfo"
    sinfo.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {argv_file}\n{body}\n")
    sinfo.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return argv_file


# Node kinds as sinfo -o "%c %m %G" prints them: the 4-GPU node and the CPU node cannot host an
# 8-GPU job, so the 64-CPU, 500 GB 8-GPU node is the smallest that bounds the defaults.
MIXED_PARTITION = """cat <<'EOF'
96 1024000 gpu:a100:8(S:0-1)
64 512000 gpu:a100:8(S:0-1)
16 128000 gpu:v100:4
2 8000 (null)
EOF"""


def test_dry_run_prints_the_sbatch_script_without_submitting(slurm_cluster, tmp_path, capsys):
    config = str(toy_config(tmp_path))
    resources = ["--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "3", "--mem-gb", "5"]
    placement = ["--time", "30", "--partition", "debug", "--qos", "high"]
    gpu_script = dry_run([TOY_STAGE, "--config", config, *resources, *placement], capsys).out
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=3", "--mem=5GB",
                 "--time=30", "--partition=debug", "--qos=high", "--requeue", "--signal=USR2@90"):
        assert f"#SBATCH {line}\n" in gpu_script
    assert "srun --unbuffered" in gpu_script and "submitit.core._submit" in gpu_script
    assert not (tmp_path / "run" / "submitit").exists()

    # Slurm itself accepts a CPU script, and rejects the same with one GPU on this GPU-less node.
    script = tmp_path / "job.sh"
    for gpus in ("0", "1"):
        text = dry_run([TOY_STAGE, "--config", config, "--gpus-per-node", gpus], capsys).out
        script.write_text(text.split("\n# task 0:")[0])
        if gpus == "0":
            slurm_cluster.run("sbatch", "--test-only", str(script))
        else:
            with pytest.raises(RuntimeError, match="Invalid generic resource"):
                slurm_cluster.run("sbatch", "--test-only", str(script))

    sweep = ["--sweep", "toy.value=1,2,3"]
    sweep_script = dry_run([TOY_STAGE, "--config", config, "--gpus-per-node", "0", *sweep], capsys).out
    assert "#SBATCH --array=0-2%3\n" in sweep_script
    assert [line.split()[-1] for line in sweep_script.splitlines() if line.startswith("# task")] == [
        f"run.dir={tmp_path / 'run' / f'toy.value={v}'}" for v in (1, 2, 3)
    ]


def test_gpu_job_gets_the_smallest_fitting_node_share_from_sinfo(slurm_cluster, tmp_path, monkeypatch, capsys):
    sinfo_argv = fake_sinfo(tmp_path, monkeypatch, MIXED_PARTITION)
    argv = [TOY_STAGE, "--config", str(toy_config(tmp_path)), "--gpus-per-node", "8", "--partition", "gpu"]
    printed = dry_run(argv, capsys)

    assert sinfo_argv.read_text().splitlines() == ["-h", "-o", "%c %m %G", "-p", "gpu"]
    options = sbatch_options(printed.out)
    assert {"cpus-per-task=8", "mem=500GB", "gpus-per-node=8", "ntasks-per-node=8", "requeue"} <= options
    assert "wckey" not in printed.out
    srun = srun_line(printed.out)
    assert " --cpus-per-task 8 " in srun and " --kill-on-bad-exit=1 " in srun
    (chosen,) = printed.err.splitlines()
    assert chosen.startswith("launch/submit.py: --cpus-per-task 8 --mem-gb 500 (")
    assert "smallest node in sinfo" in chosen


def test_given_resources_win_over_sinfo(slurm_cluster, tmp_path, monkeypatch, capsys):
    fake_sinfo(tmp_path, monkeypatch, MIXED_PARTITION)
    argv = [TOY_STAGE, "--config", str(toy_config(tmp_path)), "--gpus-per-node", "4", "--cpus-per-task", "3"]
    options = sbatch_options(dry_run(argv, capsys).out)
    # 4 GPUs fit on the 4-GPU node as well: its 125 GB bound the memory (the 8-GPU nodes give 250 GB or more).
    assert {"cpus-per-task=3", "mem=125GB"} <= options


@pytest.mark.parametrize(
    "sinfo_body, reason",
    [
        ("echo 'sinfo: error: Unable to contact slurm controller' >&2; exit 1", "Unable to contact slurm controller"),
        ("echo 'PARTITION AVAIL'", "unreadable sinfo line 'PARTITION AVAIL'"),
        ("true", "sinfo lists no nodes in partition gpu"),
    ],
)
def test_gpu_job_falls_back_to_fixed_shares_without_sinfo(
    slurm_cluster, tmp_path, monkeypatch, capsys, sinfo_body, reason
):
    fake_sinfo(tmp_path, monkeypatch, sinfo_body)
    argv = [TOY_STAGE, "--config", str(toy_config(tmp_path)), "--gpus-per-node", "2", "--partition", "gpu"]
    printed = dry_run(argv, capsys)

    per_gpu = f"{slurm_jobs.FALLBACK_CPUS_PER_GPU} CPUs and {slurm_jobs.FALLBACK_MEM_GB_PER_GPU} GB per GPU"
    assert {
        f"cpus-per-task={slurm_jobs.FALLBACK_CPUS_PER_GPU}", f"mem={2 * slurm_jobs.FALLBACK_MEM_GB_PER_GPU}GB"
    } <= sbatch_options(printed.out)
    note, chosen = printed.err.splitlines()
    assert note.startswith("launch/submit.py: no node sizes from sinfo (") and reason in note
    assert note.endswith(f"using the fallback of {per_gpu}")
    assert chosen.startswith(f"launch/submit.py: --cpus-per-task {slurm_jobs.FALLBACK_CPUS_PER_GPU} --mem-gb")


def test_gres_and_slurm_params_reach_the_sbatch_script(slurm_cluster, tmp_path, capsys):
    argv = [TOY_STAGE, "--config", str(toy_config(tmp_path)), "--gpus-per-node", "8", "--gres", "gpu:a100:8",
            "--cpus-per-task", "4", "--mem-gb", "10", "--slurm-param", "constraint=a100",
            "--slurm-param", "mail_type=END", "--slurm-param", "exclusive="]
    options = sbatch_options(dry_run(argv, capsys).out)
    assert {"gres=gpu:a100:8", "constraint=a100", "mail-type=END", "exclusive", "ntasks-per-node=8"} <= options
    assert not any(option.startswith("gpus-per-node") for option in options)


def test_pipeline_is_one_task_per_node_that_runs_torchrun(slurm_cluster, tmp_path, monkeypatch, capsys):
    fake_sinfo(tmp_path, monkeypatch, MIXED_PARTITION)
    demo = str(ROOT / "configs" / "demo" / "pipeline.yaml")
    argv = ["pipeline", "--config", demo, "--gpus-per-node", "8", "data.backend=torch", f"run.dir={tmp_path}/run"]
    script = dry_run(argv, capsys).out

    # The single task gets the whole node's share: 8 GPUs x 8 CPUs.
    assert {"nodes=1", "ntasks-per-node=1", "gpus-per-node=8", "cpus-per-task=64", "mem=500GB"} <= (
        sbatch_options(script)
    )
    assert " --cpus-per-task 64 " in srun_line(script)
    (task,) = [line for line in script.splitlines() if line.startswith("# task")]
    assert task.split()[-3:] == ["data.backend=torch", f"run.dir={tmp_path}/run", "pipeline.nproc=8"]


def test_sweep_values_in_brackets_are_a_yaml_list(tmp_path):
    argv = [TOY_STAGE, "--config", str(toy_config(tmp_path)), "--gpus-per-node", "0",
            "--sweep", "toy.value=['a,b', c, 'true']", "--sweep", "toy.steps=[1, 2.5e-5, true]",
            "--sweep", "run.seed=0,1"]
    args = submit.parse_args(argv)
    assert args.sweep == {
        "toy.value": ["a,b", "c", "'true'"], "toy.steps": ["1", "2.5e-05", "true"], "run.seed": ["0", "1"]
    }
    # Each value as the stage's config loader (YAML) reads the override back: the list's own items.
    assert [yaml.safe_load(value) for value in args.sweep["toy.value"]] == ["a,b", "c", "true"]
    assert [yaml.safe_load(value) for value in args.sweep["toy.steps"]] == [1, 2.5e-5, True]
    run_dirs = [run["run.dir"] for run in submit.plan_runs(args)]
    assert len(run_dirs) == len(set(run_dirs)) == 3 * 3 * 2
    assert str(tmp_path / "run" / "toy.value=a,b_toy.steps=true_run.seed=1") in run_dirs


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nope", "--gpus-per-node", "0"], "unknown stage 'nope'"),
        ([TOY_STAGE, "--gpus-per-node", "0", "--config", "no.yaml"], "config file not found: no.yaml"),
        ([TOY_STAGE], "--gpus-per-node"),
        ([TOY_STAGE, "--gpus-per-node", "0", "toy.value"], "override 'toy.value': expected dotted.key=value"),
        ([TOY_STAGE, "--gpus-per-node", "2", "--tasks-per-node", "3"], "one task per GPU"),
        ([TOY_STAGE, "--gpus-per-node", "0", "--sweep", "toy.value="], "--sweep 'toy.value=': expected"),
        ([str(ROOT / "tests" / "conftest.py"), "--gpus-per-node", "0"], "no top-level main(argv)"),
        (["prepare", "--gpus-per-node", "0"], "prepare cannot be submitted as a stage: it takes no --config"),
        (["submit", "--gpus-per-node", "0"], "submit cannot be submitted as a stage"),
        (["pipeline", "--gpus-per-node", "8", "--nodes", "2"], "pipeline runs on one node"),
        (["pipeline", "--gpus-per-node", "8", "pipeline.nproc=4"], "pipeline.nproc follows --gpus-per-node"),
        ([TOY_STAGE, "--gpus-per-node", "0", "--sweep", "a=1,2", "--sweep", "a=3"], "--sweep a given twice"),
        ([TOY_STAGE, "--gpus-per-node", "0", "--sweep", "a=1,2,1"], "a value repeats"),
        ([TOY_STAGE, "--gpus-per-node", "0", "--sweep", "a=[1, 2"], "--sweep 'a=[1, 2': not a YAML list"),
        ([TOY_STAGE, "--gpus-per-node", "0", "--sweep", "a=[]"], "--sweep 'a=[]': expected"),
        ([TOY_STAGE, "--gpus-per-node", "0", "a=1", "a=2"], "override a given twice"),
        ([TOY_STAGE, "--gpus-per-node", "0", "a=1", "--sweep", "a=2,3"], "a is both swept and overridden"),
        ([TOY_STAGE, "--gpus-per-node", "0", "--slurm-param", "constraint"], "expected KEY=VALUE"),
        ([TOY_STAGE, "--gpus-per-node", "0", "--slurm-param", "a.b=1"], "is not an sbatch option name"),
        ([TOY_STAGE, "--gpus-per-node", "0", "--slurm-param", "mail_type=END", "--slurm-param", "mail-type=ALL"],
         "--slurm-param mail-type given twice"),
        ([TOY_STAGE, "--gpus-per-node", "0", "--slurm-param", "time=5"], "set by launch/submit.py, use --time"),
        ([TOY_STAGE, "--gpus-per-node", "0", "--slurm-param", "signal=USR1@60"], "requeue need their own value"),
        ([TOY_STAGE, "--gpus-per-node", "4", "--gres", "gpu:a100:8"], "disagree on the GPU count"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    config = ["--config", str(toy_config(tmp_path))] if "--config" not in argv else []
    assert submit.main(argv + config) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_every_sweep_point_is_checked_before_anything_is_queued(tmp_path, capsys):
    """A bad value in one sweep point, or a config that is not YAML: one line, nothing submitted (no Slurm
    client is needed to refuse)."""
    demo = str(ROOT / "configs" / "demo" / "finetune.yaml")
    argv = ["finetune", "--gpus-per-node", "0", "--config", demo, f"run.dir={tmp_path / 'sweep'}"]
    assert submit.main(argv + ["--sweep", "train.epochs=2,-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.epochs=-1: expected an integer >= 1 (sweep point {'train.epochs': '-1'})" in err
    assert submit.main(argv + ["sgd.lr_head=nan"]) == 2
    assert "sgd.lr_head" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {epochs: 3\n")
    assert submit.main(["finetune", "--gpus-per-node", "0", "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{broken}: not valid YAML" in err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    "gres, gpus",
    [("gpu:8", 8), ("gpu:a100:8(S:0-1)", 8), ("gpu:a100:4(S:0,1),gpu:v100:2", 6), ("mps:100,gpu:2", 2),
     ("gpu:a100", None), ("(null)", None)],
)
def test_gres_gpu_count(gres, gpus):
    assert slurm_jobs.gres_gpu_count(gres) == gpus


# A stage that joins a one-rank gloo group and never destroys it; "fail" makes it raise as well.
LEAKING_STAGE = """
import torch.distributed as dist


def main(argv):
    store, outcome = argv
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if outcome == "fail":
        raise RuntimeError("the stage failed inside its group")
    return 0
"""


@pytest.mark.parametrize("outcome", ["fail", "succeed"])
def test_stage_job_destroys_the_process_group_the_stage_left(tmp_path, monkeypatch, outcome):
    job = SimpleNamespace(
        global_rank=0, local_rank=0, num_tasks=1, num_nodes=1, hostnames=["127.0.0.1"], raw_job_id="7",
        paths=SimpleNamespace(result_pickle=tmp_path / "result.pkl"),
    )
    monkeypatch.setattr(slurm_jobs.submitit, "JobEnvironment", lambda: job)
    for name in slurm_jobs.distributed_env(job):  # restored after the test: StageJob exports them
        monkeypatch.setenv(name, "")
    script = tmp_path / "leaking_stage.py"
    script.write_text(LEAKING_STAGE)
    stage_job = slurm_jobs.StageJob(str(script), [str(tmp_path / "store"), outcome])

    if outcome == "fail":
        with pytest.raises(RuntimeError, match="the stage failed inside its group"):
            stage_job()
    else:
        assert stage_job() == 0
    assert not torch.distributed.is_initialized()


def test_cluster_left_by_a_dead_run_is_cleaned_up(tmp_path, monkeypatch):
    # A root of its own: a test worker starting a real cluster beside this one would otherwise clean up the
    # left-behind home before its daemon starts, and this test's own clean-up would find nothing to kill.
    monkeypatch.setattr(slurm, "CLUSTERS_ROOT", tmp_path / "clusters")
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    owner.wait()  # its PID is now free: the "crashed test run"
    slurm.CLUSTERS_ROOT.mkdir(parents=True)
    home = slurm.CLUSTERS_ROOT / f"{slurm.home_prefix(owner.pid)}left-behind"
    home.mkdir()
    daemon = subprocess.Popen(["sleep", "60"], env={**os.environ, slurm.MARKER: str(home)})
    slurm.remove_stale_clusters()
    assert daemon.wait(timeout=10) == -15
    assert not home.exists()
