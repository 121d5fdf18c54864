"""The GPU smoke run's CPU twin (`make gpu-smoke DEVICE=cpu`), so the script cannot rot between GPU runs."""
import importlib.util
import json
import os
import subprocess
import sys

import gpu_smoke
from tiny import ENV, ROOT


def test_smoke_on_cpu_passes_every_step_it_can_run(tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_smoke.py"), "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=900, env=ENV)
    summary = json.load(open(out / "smoke.json"))
    status = {s["step"]: s["status"] for s in summary["steps"]}
    failed = {s["step"]: s["detail"] for s in summary["steps"] if s["status"] == "FAIL"}
    assert proc.returncode == 0 and not failed, failed or proc.stderr[-2000:]
    # what this machine has must run: data, collectives, numerics, stages, benchmarks, 2-rank pseudolabel
    assert all(status[s] == "PASS" for s in ("S0", "S1", "S2", "S3", "S4", "S4v", "S8", "S10")), status
    assert status["S11"] == "SKIP"   # two GPUs
    detail = {s["step"]: s["detail"] for s in summary["steps"]}
    # every stage under torchrun --nproc_per_node 1 in a real gloo group, predict among them; the FixMatch
    # variants' statistics in that group, with auto's precision said
    assert "every stage under torchrun --nproc_per_node 1 in a gloo group" in detail["S4"] and "predict (" in detail["S4"]
    assert all(f"{variant} bf16" in detail["S4v"] or f"{variant} fp32" in detail["S4v"]
               for variant in ("flexmatch", "freematch", "softmatch")), detail["S4v"]
    # label propagation, k-means and kNN where faiss imports; a SKIP that says so where it does not
    if importlib.util.find_spec("faiss"):
        assert status["S4f"] == "PASS", detail["S4f"]
    else:
        assert status["S4f"] == "SKIP" and "faiss not installed" in detail["S4f"]
    assert status["S3s"] == "SKIP" and "CUDA tensors only" in detail["S3s"]   # torch's SyncBatchNorm kernels
    table = (out / "smoke.md").read_text()
    assert table.count("\n") == len(summary["steps"]) + 2 and "| S4 | stages end to end | PASS |" in table


def test_stages_outside_a_process_group_fail_the_stage_step(tmp_path, monkeypatch):
    """The earlier smoke's blind spot: stages started as plain processes create no group, so DDP, the
    synchronised BatchNorm and every collective skip the backend, and S4 passed all the same. Started so
    (torchrun left out of the command), S4 FAILs naming the missing group, and what needs it SKIPs."""
    plain = gpu_smoke.Smoke.command
    monkeypatch.setattr(gpu_smoke.Smoke, "command", lambda smoke, script, *args, nproc=0: plain(smoke, script, *args))
    out = tmp_path / "smoke"
    assert gpu_smoke.main(["--device", "cpu", "--out", str(out), "--only", "S4v"]) == 1
    steps = {s["step"]: s for s in json.load(open(out / "smoke.json"))["steps"]}
    assert steps["S4"]["status"] == "FAIL"
    assert "pretrain joined no gloo process group of 1 rank" in steps["S4"]["detail"], steps["S4"]["detail"]
    assert steps["S4v"]["status"] == "SKIP" and steps["S4v"]["detail"] == "S4 did not pass"


def test_smoke_never_replaces_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_smoke.py"), "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("expected a new, empty or earlier smoke folder")
    assert os.listdir(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine\n"
