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
import sys
from pathlib import Path

import submitit
import yaml

from data import atomic
from trainer.operations import slurm, sweep
from trainer.operations.slurm import UsageError
from trainer.runtime import rundir
from trainer.runtime.stages import STAGES

LAUNCH_DIR = Path(__file__).resolve().parent
PIPELINE = LAUNCH_DIR / "pipeline.py"


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
    if args.gres is not None and slurm.gres_gpu_count(args.gres) not in (None, args.gpus_per_node):
        raise UsageError(f"--gres {args.gres} and --gpus-per-node {args.gpus_per_node} disagree on the GPU count")
    args.overrides = unique_keys((slurm.split_assignment(item, "override") for item in args.overrides), "override")
    args.sweep = unique_keys((sweep.split_sweep(item) for item in args.sweep), "--sweep")
    args.slurm_param = unique_keys((slurm.split_slurm_param(item) for item in args.slurm_param), "--slurm-param")
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
    elif stage in STAGES:
        path = LAUNCH_DIR / f"{stage}.py"
    elif (LAUNCH_DIR / f"{stage}.py").is_file():   # a launch/ script that is no stage: prepare, bench, submit ...
        raise UsageError(f"{stage} cannot be submitted as a stage: it takes no --config; run `python launch/{stage}.py "
                         f"...` directly, or under srun (the stages: {', '.join(STAGES)})")
    else:
        raise UsageError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)} or a script path")
    tree = ast.parse(path.read_text(), filename=str(path))
    if not any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
        raise UsageError(f"{path}: no top-level main(argv) to run")
    return str(path)


def unique_keys(pairs, what: str) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise UsageError(f"{what} {key} given twice")
        result[key] = value
    return result


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


def plan_runs(args: argparse.Namespace) -> list[dict[str, str]]:
    return sweep.plan_runs(base_run_dir(args), args.overrides, args.sweep)


def semiscale_stage(args: argparse.Namespace) -> str | None:
    """The stage that args.script is; None for a script given by path, which is not a semiscale stage."""
    stage = Path(args.script).stem
    return stage if Path(args.script).parent == LAUNCH_DIR and stage in STAGES else None


def check_configs(args: argparse.Namespace, runs: list[dict[str, str]]) -> None:
    """Every run's config loads before anything is queued. Scripts given by path are not checked."""
    stage = semiscale_stage(args)
    if stage:
        sweep.check_run_configs(stage, args.config, runs, list(args.sweep))


def claim_run_dir(args: argparse.Namespace, base: Path) -> None:
    """submitit writes into RUN_DIR/submitit/ before the stage starts, so a stage's run dir is checked and
    recorded as the stage's here first (trainer.runtime.rundir), as the stage would: the stage then finds a
    run dir of its own, and a folder of the user's is refused before anything is queued. A sweep's points
    get run dirs of their own below RUN_DIR, which their stages claim."""
    stage = semiscale_stage(args)
    if stage is None or args.sweep:
        return
    try:
        if not rundir.check_owner(str(base), stage):
            base.mkdir(parents=True, exist_ok=True)
            atomic.write_json(str(base / rundir.RUN_RECORD), {"stage": stage})
    except rundir.RunDirError as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise UsageError(f"run.dir={base}: cannot write there ({error.strerror})") from None


def stage_argv(args: argparse.Namespace, overrides: dict[str, str]) -> list[str]:
    return ["--config", str(Path(args.config).resolve()), *(f"{k}={v}" for k, v in overrides.items())]


def submit(args: argparse.Namespace) -> list[submitit.Job]:
    runs = plan_runs(args)
    check_configs(args, runs)
    base = base_run_dir(args)
    folder = Path(args.folder).absolute() if args.folder else base / "submitit"
    slurm.fill_gpu_job_defaults(args)
    executor = slurm.make_executor(args, folder)
    # StageJob pickles by reference: the job's interpreter imports it from trainer.operations.slurm.
    jobs_to_run = [slurm.StageJob(args.script, stage_argv(args, overrides)) for overrides in runs]
    if args.dry_run:
        print(slurm.sbatch_script(executor, len(runs)))
        for index, job in enumerate(jobs_to_run):
            print(f"# task {index}: {Path(args.script).stem} {' '.join(job.argv)}")
        return []
    claim_run_dir(args, base)
    with executor.batch():
        jobs = [executor.submit(job) for job in jobs_to_run]
    if args.sweep:
        sweep.write_manifest(base, [job.job_id for job in jobs], runs, list(args.sweep))
    for job, run in zip(jobs, runs):
        print(f"submitted job {job.job_id}: {Path(args.script).stem} -> {run['run.dir']}")
        print(f"  stdout: {job.paths.stdout}\n  stderr: {job.paths.stderr}")
        print(f"  follow: tail -f {job.paths.stdout} {job.paths.stderr}")
    return jobs


def collect_main(argv: list[str]) -> int:
    parser = Parser(prog="launch/submit.py collect", description="final metrics of a sweep as one table")
    parser.add_argument("sweep_dir")
    parser.add_argument("--csv", help="CSV output (default: SWEEP_DIR/sweep.csv)")
    args = parser.parse_args(argv)
    sweep.report_sweep(Path(args.sweep_dir), Path(args.csv) if args.csv else None)
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
            sweep.report_sweep(base_run_dir(args))
        for job in failed:
            print(f"job {job.job_id} failed: see {job.paths.stderr}", file=sys.stderr)
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
