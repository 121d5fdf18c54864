"""A tiny distributed stage for the Slurm tests: gloo all-reduce, per-step checkpoints, resume.

    python toy_stage.py --config CFG [toy.steps=N toy.step_s=S toy.value=V run.dir=D]

Every rank joins a gloo group from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, all-reduces its rank
and writes rank<R>.json. Rank 0 then runs toy.steps steps; each step sleeps and is recorded with
the Slurm restart count in checkpoint.pt, written atomically, so a requeued job resumes where it
stopped. Rank 0 appends one line per start to attempts.log and writes metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from data import atomic


def load_config(argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    for item in args.overrides:
        dotted, value = item.split("=", 1)
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(value)
    return config


def main(argv: list[str] | None = None) -> int:
    config = load_config(argv)
    run_dir = Path(config["run"]["dir"])
    toy = config["toy"]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    run_dir.mkdir(parents=True, exist_ok=True)
    facts = {
        "rank": rank,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "world_size": world,
        "rank_sum": total.item(),
        "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        "restart": restart,
    }
    (run_dir / f"rank{rank}.json").write_text(json.dumps(facts))
    if rank == 0:
        checkpoint = run_dir / "checkpoint.pt"
        state = torch.load(checkpoint, weights_only=True) if checkpoint.exists() else {"steps": []}
        with open(run_dir / "attempts.log", "a") as log:
            log.write(f"restart={restart} from_step={len(state['steps'])}\n")
        for step in range(len(state["steps"]), int(toy["steps"])):
            time.sleep(float(toy["step_s"]))
            state["steps"].append([step, restart])
            with atomic.writing(str(checkpoint), "wb") as f:
                torch.save(state, f)
        metrics = {"step": len(state["steps"]), "value": toy.get("value"), "rank_sum": total.item()}
        with open(run_dir / "metrics.jsonl", "a") as out:
            out.write(json.dumps(metrics) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
