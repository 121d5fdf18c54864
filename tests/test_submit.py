"""launch/submit.py against a real one-node Slurm cluster (the `slurm_cluster` fixture)."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cluster import slurm

ROOT = Path(__file__).resolve().parents[1]
TOY_STAGE = str(ROOT / "tests" / "cluster" / "toy_stage.py")
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
    (job,) = submit_toy(toy_config(tmp_path), "--tasks-per-node", "2")
    wait_for([job], slurm_cluster)

    run_dir = tmp_path / "run"
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["local_rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["rank_sum"] == 0 + 1 for r in ranks)
    node = slurm_cluster.job_fields(job.job_id)["NodeList"]
    first_host = slurm_cluster.run("scontrol", "show", "hostnames", node).split()[0]
    host, port = ranks[0]["master"].split(":")
    assert ranks[1]["master"] == ranks[0]["master"] and host == first_host
    assert submit.PORT_BASE <= int(port) < submit.PORT_BASE + submit.PORT_SPAN
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


def dry_run(argv: list[str], capsys) -> str:
    assert submit.main(argv + ["--dry-run"]) == 0
    return capsys.readouterr().out


def test_dry_run_prints_the_sbatch_script_without_submitting(slurm_cluster, tmp_path, capsys):
    config = str(toy_config(tmp_path))
    resources = ["--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "3", "--mem-gb", "5"]
    placement = ["--time", "30", "--partition", "debug", "--qos", "high"]
    gpu_script = dry_run([TOY_STAGE, "--config", config, *resources, *placement], capsys)
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=3", "--mem=5GB",
                 "--time=30", "--partition=debug", "--qos=high", "--requeue", "--signal=USR2@90"):
        assert f"#SBATCH {line}\n" in gpu_script
    assert "srun --unbuffered" in gpu_script and "submitit.core._submit" in gpu_script
    assert not (tmp_path / "run" / "submitit").exists()

    # Slurm itself accepts a CPU script, and rejects the same with one GPU on this GPU-less node.
    script = tmp_path / "job.sh"
    for gpus in ("0", "1"):
        text = dry_run([TOY_STAGE, "--config", config, "--gpus-per-node", gpus], capsys)
        script.write_text(text.split("\n# task 0:")[0])
        if gpus == "0":
            slurm_cluster.run("sbatch", "--test-only", str(script))
        else:
            with pytest.raises(RuntimeError, match="Invalid generic resource"):
                slurm_cluster.run("sbatch", "--test-only", str(script))

    sweep = ["--sweep", "toy.value=1,2,3"]
    sweep_script = dry_run([TOY_STAGE, "--config", config, "--gpus-per-node", "0", *sweep], capsys)
    assert "#SBATCH --array=0-2%3\n" in sweep_script
    assert [line.split()[-1] for line in sweep_script.splitlines() if line.startswith("# task")] == [
        f"run.dir={tmp_path / 'run' / f'toy.value={v}'}" for v in (1, 2, 3)
    ]


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
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    config = ["--config", str(toy_config(tmp_path))] if "--config" not in argv else []
    assert submit.main(argv + config) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_cluster_left_by_a_dead_run_is_cleaned_up():
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    owner.wait()  # its PID is now free: the "crashed test run"
    slurm.CLUSTERS_ROOT.mkdir(parents=True, exist_ok=True)
    home = slurm.CLUSTERS_ROOT / f"{slurm.home_prefix(owner.pid)}left-behind"
    home.mkdir(exist_ok=True)
    daemon = subprocess.Popen(["sleep", "60"], env={**os.environ, slurm.MARKER: str(home)})
    slurm.remove_stale_clusters()
    assert daemon.wait(timeout=10) == -15
    assert not home.exists()
