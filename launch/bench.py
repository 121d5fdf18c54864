"""Run benchmark suites (launch/benches/<suite>.py): print one table per suite, optionally write JSON.

    python launch/bench.py [--suite NAME ...] [--quick] [--json OUT] [--plots DIR]
"""
import os
import sys

import argparse
import importlib
import json
import pkgutil
import traceback

BENCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benches")


def available_suites() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([BENCH_DIR]) if not m.name.startswith("_"))


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(suite: str, figures: dict) -> None:
    width = max([len("metric")] + [len(k) for k in figures])
    print(f"== {suite} ==")
    print(f"{'metric':<{width}}  value")
    for metric, value in figures.items():
        print(f"{metric:<{width}}  {format_value(value)}")
    print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="semiscale benchmarks")
    parser.add_argument("--suite", action="append", help="suite to run (repeatable; default: all)")
    parser.add_argument("--json", metavar="OUT", help='write {"suite": {"metric": value}} here')
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for smoke runs")
    parser.add_argument("--plots", metavar="DIR", help="suites that draw their figures (scale) write PNGs here")
    args = parser.parse_args(argv)

    available = available_suites()
    suites = args.suite or available
    unknown = [s for s in suites if s not in available]
    if unknown:
        print(f"bench.py: unknown suite {', '.join(unknown)}; available: {', '.join(available)}", file=sys.stderr)
        return 2

    results, failed = {}, False
    for suite in suites:
        try:
            results[suite] = importlib.import_module(f"launch.benches.{suite}").run(args)
        except Exception as error:  # one broken suite must not hide the others' figures
            traceback.print_exc()
            results[suite] = {"error": f"{type(error).__name__}: {error}"}
            failed = True
        print_table(suite, results[suite])

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            # numpy / torch scalars from suites become plain numbers
            json.dump(results, f, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
