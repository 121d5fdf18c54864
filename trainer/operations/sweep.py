"""Sweeps submitted by launch/submit.py: the --sweep grid read as override values, one run (and run dir)
per grid point, each run's config checked before anything is queued, the sweep.json manifest that
lists the runs, and `collect`: the last metrics line of every run as one table (Markdown and CSV).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from pathlib import Path

import yaml

from trainer.runtime import config, rundir
from trainer.operations.slurm import UsageError, split_assignment
from trainer.runtime.stages import STAGES

SWEEP_MANIFEST = "sweep.json"


def split_sweep(item: str) -> tuple[str, list[str]]:
    form = "key=v1,v2,... or key=[v1, v2, ...]"
    key, text = split_assignment(item, "--sweep", form)
    if text.startswith("["):
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError:
            values = None
        if not isinstance(values, list):
            raise UsageError(f"--sweep {item!r}: not a YAML list")
        choices = [yaml_text(value) for value in values]
    else:
        choices = [value for value in text.split(",") if value]
    if not choices:
        raise UsageError(f"--sweep {item!r}: expected {form}")
    if len(set(choices)) < len(choices):
        raise UsageError(f"--sweep {item!r}: a value repeats (its runs would share one run dir)")
    return key, choices


def yaml_text(value) -> str:
    """How an override spells `value` so that the config's YAML reads it back unchanged
    (1e-05 as 1.0e-05: YAML reads "1e-05" as a string)."""
    dumped = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True)
    return dumped.removesuffix("\n").removesuffix("\n...")  # "..." ends a plain scalar's document


def plan_runs(base: Path, overrides: dict[str, str], sweep: dict[str, list[str]]) -> list[dict[str, str]]:
    """One override set per run; each sweep point writes into its own run dir below `base`."""
    if not sweep:
        return [{**overrides, "run.dir": str(base)}]
    runs = []
    for values in itertools.product(*sweep.values()):
        point = dict(zip(sweep, values))
        label = "_".join(f"{key}={value}" for key, value in point.items()).replace(os.sep, "-")
        runs.append({**overrides, **point, "run.dir": str(base / label)})
    return runs


def check_run_configs(stage: str, config_path: str, runs: list[dict[str, str]], swept: list[str]) -> None:
    """Every run's full config of `stage` (a key of stages.STAGES) loads, before anything is queued:
    a typo in one sweep point must not surface hours later in a job."""
    for overrides in runs:
        try:
            config.load(STAGES[stage].config, config_path, [f"{k}={v}" for k, v in overrides.items()])
        except config.ConfigError as error:
            point = {k: overrides[k] for k in swept}
            raise UsageError(f"{error}" + (f" (sweep point {point})" if point else "")) from None


def write_manifest(base: Path, job_ids: list[str], runs: list[dict[str, str]], swept: list[str]) -> None:
    """base/sweep.json: each run's job id, run dir and sweep point, for `collect`."""
    base.mkdir(parents=True, exist_ok=True)
    manifest = [
        {"job_id": job_id, "run_dir": run["run.dir"], "overrides": {k: run[k] for k in swept}}
        for job_id, run in zip(job_ids, runs)
    ]
    (base / SWEEP_MANIFEST).write_text(json.dumps(manifest, indent=1))


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per sweep run: its overrides and the last line of its metrics.jsonl."""
    manifest_path = Path(sweep_dir) / SWEEP_MANIFEST
    if not manifest_path.is_file():
        raise UsageError(f"{manifest_path} not found: not a sweep made by launch/submit.py")

    rows = []
    for entry in json.loads(manifest_path.read_text()):
        metrics_path = Path(entry["run_dir"]) / rundir.METRICS
        events = rundir.read_lines(str(metrics_path)) if metrics_path.is_file() else []
        final = events[-1] if events else {"status": "no metrics yet"}
        rows.append({"job_id": entry["job_id"], **entry["overrides"], **final})
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(col, "")) for col in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def report_sweep(sweep_dir: Path, csv_path: Path | None = None) -> list[dict]:
    """Print the sweep's table and write it as CSV (default: SWEEP_DIR/sweep.csv)."""
    rows = collect(sweep_dir)
    csv_path = csv_path or sweep_dir / "sweep.csv"
    write_csv(rows, csv_path)
    print(markdown_table(rows))
    print(f"wrote {csv_path}")
    return rows
