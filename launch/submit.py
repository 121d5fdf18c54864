"""Submit a stage to Slurm with submitit: one task per GPU, requeued from its checkpoint on preemption.

    python launch/submit.py STAGE --config CFG --nodes M --gpus-per-node N [options] [key=value ...]
    python launch/submit.py STAGE ... --sweep train.lr=0.1,0.2 --sweep run.seed=[0,1]  # one job array
    python launch/submit.py collect SWEEP_DIR [--csv OUT]                           # final metrics table

STAGE names a script in launch/ (pretrain, finetune, ...); it may also be a path to any script
with `main(argv)`. Each Slurm task gets torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and runs `main(["--config", CFG, *overrides])`.
`pipeline` is the exception: one task on one node that runs each stage under its own torchrun
(pipeline.nproc=N). A GPU job without --cpus-per-task / --mem-gb gets each GPU's share of the
smallest node that sinfo lists. On preemption or time-out Slurm signals the job, submitit
requeues it, and the stage resumes from run.dir/checkpoint.pt. A sweep runs every combination of
the --sweep values as one job array, each in its own run dir (run.dir/<key=value_...>), listed
in run.dir/sweep.json for `collect`.
"""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import NamedTuple

import cloudpickle
import submitit
import yaml

from trainer import config, rundir
from trainer.dist import shutdown

LAUNCH_DIR = Path(__file__).resolve().parent
NOT_STAGES = {
    "submit": "it is this launcher",
    "bench": "it takes no --config; run `python launch/bench.py ...` on a node",
    "prepare": "it takes no --config; run `python launch/prepare.py ...` directly, or under srun",
    "gpu_smoke": "it takes no --config; run `python launch/gpu_smoke.py` on a GPU node (srun --gpus=1 ...)",
}
PIPELINE = LAUNCH_DIR / "pipeline.py"
SWEEP_MANIFEST = "sweep.json"
PORT_BASE, PORT_SPAN = 20000, 12000  # MASTER_PORT stays below Linux's ephemeral ports (32768+)
# A GPU job's share of a node when sinfo cannot say: a common ratio on GPU nodes.
FALLBACK_CPUS_PER_GPU, FALLBACK_MEM_GB_PER_GPU = 8, 32
SINFO_TIMEOUT_S = 10
# sbatch options that the launcher sets itself (through --slurm-param they would silently win)
# or that Slurm refuses next to them.
OWN_SBATCH_OPTIONS = {
    "nodes": "--nodes",
    "ntasks": "--gpus-per-node or --tasks-per-node",
    "ntasks-per-node": "--gpus-per-node or --tasks-per-node",
    "gpus": "--gpus-per-node",
    "gpus-per-node": "--gpus-per-node",
    "gpus-per-task": "--gpus-per-node",
    "gres": "--gres",
    "cpus-per-task": "--cpus-per-task",
    "cpus-per-gpu": "--cpus-per-task",
    "mem": "--mem-gb",
    "mem-per-cpu": "--mem-gb",
    "mem-per-gpu": "--mem-gb",
    "time": "--time",
    "partition": "--partition",
    "account": "--account",
    "qos": "--qos",
    "array": "--sweep",
}
# ... and those that submitit's logs and requeue depend on.
SUBMITIT_SBATCH_OPTIONS = {"requeue", "signal", "output", "error", "open-mode"}


class UsageError(ValueError):
    """Bad command line or config; main() prints it on one line and exits with status 2."""


# ---------------------------------------------------------------- what runs inside each task


def distributed_env(job: submitit.JobEnvironment) -> dict[str, str]:
    """torchrun's variables for this task; the port is derived from the job id so that
    concurrent jobs on a shared node do not collide and a requeued job gets the same one."""
    return {
        "RANK": str(job.global_rank),
        "LOCAL_RANK": str(job.local_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes),
        "MASTER_ADDR": job.hostnames[0],
        "MASTER_PORT": str(PORT_BASE + zlib.crc32(job.raw_job_id.encode()) % PORT_SPAN),
    }


def load_script(path: str | Path):
    """Import a script by path (launch/ is a folder of scripts, not a package)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"semiscale_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that its classes pickle and its dataclasses resolve
    spec.loader.exec_module(module)
    return module


class StageJob:
    """The callable submitit pickles: sets up the distributed environment, runs the stage."""

    def __init__(self, script: str, argv: list[str]):
        self.script = script
        self.argv = argv

    def __call__(self):
        job = submitit.JobEnvironment()
        # A peer of a preempted run may have left an error result: drop it so that the
        # submitter waits for this run's outcome.
        job.paths.result_pickle.unlink(missing_ok=True)
        os.environ.update(distributed_env(job))

        try:
            status = load_script(self.script).main(list(self.argv))
        finally:
            # A stage that raises leaves its process group open; an NCCL group still open at exit
            # can hang the interpreter's shutdown instead of letting the task fail.
            shutdown()
        if status not in (None, 0):
            raise RuntimeError(f"{self.script} main() returned exit status {status}")
        return status

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # The stage keeps its own resumable state in run.dir/checkpoint.pt: resubmit as is.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ---------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> Parser:
    parser = Parser(
        prog="launch/submit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", help="stage name in launch/, or a path to a script with main(argv)")
    parser.add_argument("--config", required=True, help="the stage's YAML config")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, required=True, help="one task per GPU; 0 for a CPU job")
    parser.add_argument("--tasks-per-node", type=int, help="tasks per node of a CPU job (default 1)")
    parser.add_argument(
        "--cpus-per-task", type=int, help="default for a GPU job: each GPU's share of the smallest node (sinfo)"
    )
    parser.add_argument(
        "--mem-gb", type=float, help="memory per node; default for a GPU job: its GPUs' share of the smallest node"
    )
    parser.add_argument("--gres", help="e.g. gpu:a100:8; replaces --gpus-per-node in the sbatch script")
    parser.add_argument("--time", type=int, default=60, help="time limit per run, minutes")
    parser.add_argument("--max-timeouts", type=int, default=3, help="requeues after --time runs out")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument(
        "--slurm-param", action="append", default=[], metavar="KEY=VALUE",
        help="repeatable: extra '#SBATCH --KEY=VALUE' (KEY= for a flag without a value)",
    )
    parser.add_argument("--folder", help="submitit logs and pickles (default: RUN_DIR/submitit)")
    parser.add_argument(
        "--sweep", action="append", default=[], metavar="KEY=V1,V2",
        help="repeatable: grid; KEY=[V1, V2] is read as a YAML list (values may hold commas)",
    )
    parser.add_argument("--max-parallel", type=int, default=256, help="array tasks running at once")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait for the jobs; print the sweep table")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_intermixed_args(argv)
    args.script = resolve_stage(args.stage)
    if not Path(args.config).is_file():
        raise UsageError(f"config file not found: {args.config}")
    for flag in ("nodes", "time", "max_parallel"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("gpus_per_node", "max_timeouts"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}")
    if args.gpus_per_node and args.tasks_per_node not in (None, args.gpus_per_node):
        raise UsageError("--tasks-per-node is fixed to --gpus-per-node (one task per GPU); drop it")
    args.tasks_per_node = args.gpus_per_node or args.tasks_per_node or 1
    if args.tasks_per_node < 1:
        raise UsageError(f"--tasks-per-node must be at least 1, got {args.tasks_per_node}")
    if args.gres is not None and gres_gpu_count(args.gres) not in (None, args.gpus_per_node):
        raise UsageError(f"--gres {args.gres} and --gpus-per-node {args.gpus_per_node} disagree on the GPU count")
    args.overrides = unique_keys((split_assignment(item, "override") for item in args.overrides), "override")
    args.sweep = unique_keys((split_sweep(item) for item in args.sweep), "--sweep")
    args.slurm_param = unique_keys((split_slurm_param(item) for item in args.slurm_param), "--slurm-param")
    if "run.dir" in args.sweep:
        raise UsageError("--sweep run.dir: each sweep point gets its own run dir below run.dir already")
    both = sorted(args.sweep.keys() & args.overrides.keys())
    if both:
        raise UsageError(f"{both[0]} is both swept and overridden: drop one")
    if args.script == str(PIPELINE):
        one_task_runs_torchrun(args)
    return args


def one_task_runs_torchrun(args: argparse.Namespace) -> None:
    """pipeline.py runs each stage under its own torchrun: Slurm starts it once, with the node's
    GPUs as pipeline.nproc, rather than once per GPU (8 pipelines racing on one run dir)."""
    if args.nodes > 1:
        raise UsageError("pipeline runs on one node (its torchrun is --standalone): drop --nodes")
    if "pipeline.nproc" in args.overrides or "pipeline.nproc" in args.sweep:
        raise UsageError("pipeline.nproc follows --gpus-per-node (or --tasks-per-node for CPUs): drop it")
    args.overrides["pipeline.nproc"] = str(args.tasks_per_node)
    args.tasks_per_node = 1


def resolve_stage(stage: str) -> str:
    if stage.endswith(".py"):
        path = Path(stage).resolve()
        if not path.is_file():
            raise UsageError(f"stage script not found: {stage}")
    else:
        path = LAUNCH_DIR / f"{stage}.py"
        if stage in NOT_STAGES:
            raise UsageError(f"{stage} cannot be submitted as a stage: {NOT_STAGES[stage]}")
        if not path.is_file():
            known = sorted(p.stem for p in LAUNCH_DIR.glob("[!_]*.py") if p.stem not in NOT_STAGES)
            choices = ", ".join(known) or "(none)"
            raise UsageError(f"unknown stage {stage!r}: expected one of {choices} or a script path")
    tree = ast.parse(path.read_text(), filename=str(path))
    if not any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
        raise UsageError(f"{path}: no top-level main(argv) to run")
    return str(path)


def split_assignment(item: str, what: str, form: str = "dotted.key=value") -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"{what} {item!r}: expected {form}")
    return key, value


def unique_keys(pairs, what: str) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise UsageError(f"{what} {key} given twice")
        result[key] = value
    return result


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


def split_slurm_param(item: str) -> tuple[str, str | bool]:
    key, value = split_assignment(item, "--slurm-param", "KEY=VALUE")
    option = key.replace("_", "-")  # submitit writes both as the same sbatch option
    if not re.fullmatch(r"[a-z][a-z0-9-]*", option):
        raise UsageError(f"--slurm-param {item!r}: {key!r} is not an sbatch option name")
    if option in OWN_SBATCH_OPTIONS:
        raise UsageError(f"--slurm-param {option}: set by launch/submit.py, use {OWN_SBATCH_OPTIONS[option]}")
    if option in SUBMITIT_SBATCH_OPTIONS:
        raise UsageError(f"--slurm-param {option}: submitit's logs and requeue need their own value")
    return option, value or True  # submitit writes True as a bare flag: "#SBATCH --exclusive"


def base_run_dir(args: argparse.Namespace) -> Path:
    if "run.dir" in args.overrides:
        return Path(args.overrides["run.dir"]).absolute()
    try:
        tree = yaml.safe_load(Path(args.config).read_text()) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"{args.config}: not valid YAML ({str(error).splitlines()[0]})") from None
    run_dir = (tree.get("run") or {}).get("dir") if isinstance(tree, dict) else None
    if not run_dir:
        raise UsageError(f"{args.config}: run.dir is not set (set it in the config or pass run.dir=...)")
    return Path(run_dir).absolute()


# ---------------------------------------------------------------- node sizes from sinfo


class NodeKind(NamedTuple):
    cpus: int
    mem_mb: int
    gpus: int | None  # None: sinfo names no GPU count


def gres_gpu_count(gres: str) -> int | None:
    """GPUs named in a gres string such as `gpu:8`, `gpu:a100:8(S:0-1)` or `gpu:a:4,gpu:b:2`."""
    counts = []
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):  # "(S:0,1)": socket lists hold commas
        name, *fields = item.strip().split(":")
        if name == "gpu" and fields and fields[-1].isdigit():
            counts.append(int(fields[-1]))
    return sum(counts) if counts else None


def sinfo_node_kinds(partition: str | None) -> list[NodeKind]:
    """One entry per distinct node size in the partition (all partitions without one)."""
    command = ["sinfo", "-h", "-o", "%c %m %G", *(["-p", partition] if partition else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=SINFO_TIMEOUT_S)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise ValueError(f"sinfo failed: {last_line}")
    kinds = []
    for line in result.stdout.splitlines():
        fields = line.split(maxsplit=2)
        # "64+" means "64 or more" in sinfo's grouped lines: the smaller number is the safe one.
        numbers = [field.rstrip("+") for field in fields[:2]]
        if len(fields) != 3 or not all(number.isdigit() for number in numbers):
            raise ValueError(f"unreadable sinfo line {line!r}")
        kinds.append(NodeKind(int(numbers[0]), int(numbers[1]), gres_gpu_count(fields[2])))
    if not kinds:
        raise ValueError("sinfo lists no nodes" + (f" in partition {partition}" if partition else ""))
    return kinds


def fill_gpu_job_defaults(args: argparse.Namespace) -> None:
    """Give a GPU job without --cpus-per-task / --mem-gb its GPUs' share of the smallest node, so
    that data loading does not run on Slurm's default of one CPU per task."""
    if not args.gpus_per_node or (args.cpus_per_task is not None and args.mem_gb is not None):
        return
    gpus_per_task = args.gpus_per_node // args.tasks_per_node
    try:
        kinds = sinfo_node_kinds(args.partition)
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        source = f"the fallback of {FALLBACK_CPUS_PER_GPU} CPUs and {FALLBACK_MEM_GB_PER_GPU} GB per GPU"
        print(f"launch/submit.py: no node sizes from sinfo ({' '.join(str(error).split())}): using {source}",
              file=sys.stderr)
        cpus_per_task = FALLBACK_CPUS_PER_GPU * gpus_per_task
        mem_gb = float(FALLBACK_MEM_GB_PER_GPU * args.gpus_per_node)
    else:
        # Nodes with fewer GPUs than asked for cannot run the job: they do not bound its share.
        fitting = [kind for kind in kinds if kind.gpus and kind.gpus >= args.gpus_per_node] or kinds
        cpus_per_task = max(1, min(kind.cpus // (kind.gpus or args.gpus_per_node) for kind in fitting)
                            * gpus_per_task)
        mem_mb = min(kind.mem_mb * args.gpus_per_node // (kind.gpus or args.gpus_per_node) for kind in fitting)
        mem_gb = mem_mb / 1024
        source = "the GPUs' share of the smallest node in sinfo"
    if args.cpus_per_task is None:
        args.cpus_per_task = cpus_per_task
    if args.mem_gb is None:
        args.mem_gb = mem_gb
    print(f"launch/submit.py: --cpus-per-task {args.cpus_per_task} --mem-gb {args.mem_gb:g}"
          f" (those not given: {source})", file=sys.stderr)


# ---------------------------------------------------------------- runs, executor, submission


def plan_runs(args: argparse.Namespace) -> list[dict[str, str]]:
    """One override set per run; each sweep point writes into its own run dir."""
    base = base_run_dir(args)
    if not args.sweep:
        return [{**args.overrides, "run.dir": str(base)}]
    runs = []
    for values in itertools.product(*args.sweep.values()):
        point = dict(zip(args.sweep, values))
        label = "_".join(f"{key}={value}" for key, value in point.items()).replace(os.sep, "-")
        runs.append({**args.overrides, **point, "run.dir": str(base / label)})
    return runs


def check_configs(args: argparse.Namespace, runs: list[dict[str, str]]) -> None:
    """Every run's full config loads here, before anything is queued: a typo in one sweep point must not
    surface hours later in a job. Scripts given by path are not semiscale stages and are not checked."""

    stage = Path(args.script).stem
    if Path(args.script).parent != LAUNCH_DIR or stage not in config.STAGE_CONFIGS:
        return
    for overrides in runs:
        try:
            config.load(config.STAGE_CONFIGS[stage], args.config, [f"{k}={v}" for k, v in overrides.items()])
        except config.ConfigError as error:
            point = {k: overrides[k] for k in args.sweep}
            raise UsageError(f"{error}" + (f" (sweep point {point})" if point else "")) from None


def make_executor(args: argparse.Namespace, folder: Path) -> submitit.AutoExecutor:
    try:
        executor = submitit.AutoExecutor(
            folder=folder, cluster="slurm", slurm_max_num_timeout=args.max_timeouts
        )
    except RuntimeError as error:  # submitit checks for srun
        raise UsageError(f"no Slurm client here: {error}") from None
    params = {
        "name": f"semiscale-{Path(args.script).stem}",
        "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node,
        "timeout_min": args.time,
        "slurm_array_parallelism": args.max_parallel,
        # Requeueable even where the site default (JobRequeue=0) says otherwise.
        "slurm_additional_parameters": {"requeue": True, **args.slurm_param},
        # srun of Slurm 22.05-23.02 does not inherit sbatch's --cpus-per-task (each task would get
        # one CPU); --kill-on-bad-exit ends the other tasks when one fails, instead of leaving them
        # blocked in a collective until the time limit.
        "slurm_srun_args": [
            *(["--cpus-per-task", str(args.cpus_per_task)] if args.cpus_per_task else []),
            "--kill-on-bad-exit=1",
        ],
    }
    optional = {
        "gpus_per_node": None if args.gres else (args.gpus_per_node or None),
        "slurm_gres": args.gres,
        "cpus_per_task": args.cpus_per_task,
        "mem_gb": args.mem_gb,
        "slurm_partition": args.partition,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
    }
    executor.update_parameters(**params, **{k: v for k, v in optional.items() if v is not None})
    # No "#SBATCH --wckey=submitit": sites that enforce wckeys reject an unknown one. The
    # AutoExecutor drops None values, so only the Slurm executor itself can unset it.
    executor._executor.update_parameters(wckey=None)
    return executor


def stage_argv(args: argparse.Namespace, overrides: dict[str, str]) -> list[str]:
    return ["--config", str(Path(args.config).resolve()), *(f"{k}={v}" for k, v in overrides.items())]


def sbatch_script(executor: submitit.AutoExecutor, num_runs: int) -> str:
    """The sbatch file submitit would write. submitit has no public dry run: this calls the
    function its SlurmExecutor uses to write that file, with the array size it would add."""
    slurm = executor._executor
    params = dict(slurm.parameters, **({"map_count": num_runs} if num_runs > 1 else {}))
    return submitit.slurm.slurm._make_sbatch_string(
        command=slurm._submitit_command_str, folder=slurm.folder, **params
    )


def submit(args: argparse.Namespace) -> list[submitit.Job]:
    runs = plan_runs(args)
    check_configs(args, runs)
    base = base_run_dir(args)
    folder = Path(args.folder).absolute() if args.folder else base / "submitit"
    fill_gpu_job_defaults(args)
    executor = make_executor(args, folder)
    jobs_to_run = [StageJob(args.script, stage_argv(args, overrides)) for overrides in runs]
    if args.dry_run:
        print(sbatch_script(executor, len(runs)))
        for index, job in enumerate(jobs_to_run):
            print(f"# task {index}: {Path(args.script).stem} {' '.join(job.argv)}")
        return []
    if __name__ != "__main__" and __name__ in sys.modules:
        # The job's interpreter cannot import this script by module name: pickle StageJob by value.
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with executor.batch():
        jobs = [executor.submit(job) for job in jobs_to_run]
    if args.sweep:
        base.mkdir(parents=True, exist_ok=True)
        manifest = [
            {"job_id": job.job_id, "run_dir": run["run.dir"], "overrides": {k: run[k] for k in args.sweep}}
            for job, run in zip(jobs, runs)
        ]
        (base / SWEEP_MANIFEST).write_text(json.dumps(manifest, indent=1))
    for job, run in zip(jobs, runs):
        print(f"submitted job {job.job_id}: {Path(args.script).stem} -> {run['run.dir']}")
        print(f"  stdout: {job.paths.stdout}\n  stderr: {job.paths.stderr}")
        print(f"  follow: tail -f {job.paths.stdout} {job.paths.stderr}")
    return jobs


# ---------------------------------------------------------------- sweep results


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
    rows = collect(sweep_dir)
    csv_path = csv_path or sweep_dir / "sweep.csv"
    write_csv(rows, csv_path)
    print(markdown_table(rows))
    print(f"wrote {csv_path}")
    return rows


def collect_main(argv: list[str]) -> int:
    parser = Parser(prog="launch/submit.py collect", description="final metrics of a sweep as one table")
    parser.add_argument("sweep_dir")
    parser.add_argument("--csv", help="CSV output (default: SWEEP_DIR/sweep.csv)")
    args = parser.parse_args(argv)
    report_sweep(Path(args.sweep_dir), Path(args.csv) if args.csv else None)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["collect"]:
            return collect_main(argv[1:])
        args = parse_args(argv)
        jobs = submit(args)
    except UsageError as error:
        print(f"launch/submit.py: error: {error}", file=sys.stderr)
        return 2
    if args.wait and jobs:
        failed = [job for job in jobs if job.exception() is not None]
        if args.sweep:
            report_sweep(base_run_dir(args))
        for job in failed:
            print(f"job {job.job_id} failed: see {job.paths.stderr}", file=sys.stderr)
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
