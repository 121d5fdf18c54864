"""The GPU smoke run's CPU twin (`make gpu-smoke DEVICE=cpu`), so the script cannot rot between GPU runs."""
import json
import os
import subprocess
import sys

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
    assert all(status[s] == "PASS" for s in ("S0", "S1", "S2", "S3", "S4", "S8", "S10")), status
    assert status["S11"] == "SKIP"   # two GPUs
    table = (out / "smoke.md").read_text()
    assert table.count("\n") == len(summary["steps"]) + 2 and "| S4 | stages end to end | PASS |" in table


def test_smoke_never_replaces_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_smoke.py"), "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("expected a new, empty or earlier smoke folder")
    assert os.listdir(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine\n"
