"""What a finished run can still be turned into; today TensorBoard's event files.

    python launch/report.py tb RUN_DIR

tb: RUN_DIR/tb/ from RUN_DIR/metrics.jsonl, and the same for every run dir inside RUN_DIR (a pipeline's
stages, pseudolabel's fine-tunes), through the trackers a live run uses with run.log=[tensorboard]
(trainer.runtime.tracking): the same names and steps, so a run made before tracking, or with
run.log=[jsonl], is watched like any other (`tensorboard --logdir RUN_DIR`). What the event files hold
already is kept and not written again, so it may be run again at any time, but not while the run is live.
The pipeline's report itself is written by launch/pipeline.py (trainer.operations.report).
"""
import argparse

from data.errors import InputError
from trainer.runtime import engine, tracking


def main(argv=None):
    parser = argparse.ArgumentParser(description="What a finished run can still be turned into")
    commands = parser.add_subparsers(dest="command", required=True)
    tb = commands.add_parser("tb", help="TensorBoard event files (RUN_DIR/tb/) from metrics.jsonl")
    tb.add_argument("run_dir", metavar="RUN_DIR", help="a stage's run dir, or a pipeline's (every stage in it)")
    args = parser.parse_args(argv)
    found = tracking.run_dirs(args.run_dir)
    if not found:
        raise InputError(f"{args.run_dir}: no run dir (run.json and metrics.jsonl) in it or below it")
    for run_dir in found:
        added = tracking.write_event_files(run_dir)
        print(f"{run_dir}/tb: {added} scalars added" if added else f"{run_dir}/tb: up to date", flush=True)


if __name__ == "__main__":
    engine.cli(main)
