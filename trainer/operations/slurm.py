"""Running a stage as a Slurm job through submitit (launch/submit.py): the job object submitit pickles,
torchrun's variables from submitit's JobEnvironment, node sizes from sinfo and the CPU/memory defaults
they give a GPU job, and the checked sbatch parameters of the executor.

The functions that take `args` read launch/submit.py's parsed command line (an argparse.Namespace).
StageJob is pickled by reference: the compute node imports it from this module (trainer is installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import NamedTuple

import submitit

from trainer.dist import shutdown

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
    """Bad command line or config; launch/submit.py prints it on one line and exits with status 2."""


def split_assignment(item: str, what: str, form: str = "dotted.key=value") -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"{what} {item!r}: expected {form}")
    return key, value


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


# ---------------------------------------------------------------- sbatch parameters and the executor


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


def sbatch_script(executor: submitit.AutoExecutor, num_runs: int) -> str:
    """The sbatch file submitit would write. submitit has no public dry run: this calls the
    function its SlurmExecutor uses to write that file, with the array size it would add."""
    slurm = executor._executor
    params = dict(slurm.parameters, **({"map_count": num_runs} if num_runs > 1 else {}))
    return submitit.slurm.slurm._make_sbatch_string(
        command=slurm._submitit_command_str, folder=slurm.folder, **params
    )
