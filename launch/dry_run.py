"""A pipeline config's every stage at its own shapes, on a generated pile and a few steps a stage: before a
cluster spends its hours, the backbone, projector, class count, image size, embedding width and TTA scales of
the config meet every stage once. Prints each step's wall seconds and peak memory (resident, and the GPU's
where there is one) and writes them to OUT/dry_run.json.

    python launch/dry_run.py --config configs/paper/pipeline.yaml --classes 800 --out runs/dry-run
        [--steps 2] [--batch 8] [--per-class 1] [--unlabeled 512] [--eval-images 64] [--nproc 1]

The pile (OUT/data): square PNGs at the pretraining config's data.image_size, a colour and a noise pattern a
class; --per-class labeled images of each class, --unlabeled images (their hidden labels answer active
learning's queries) and --eval-images each for val and test. OUT/pipeline.yaml is the config with, on every
stage, train.max_steps=--steps, batches of --batch, no loader workers, fp16 as bf16 on a CPU (fp16 needs
CUDA), and an active-learning budget of as many queries as the config has clusters; then the pipeline runs
in this process (--nproc 1, so that each step's peak memory is its own) or each stage under torchrun (peak
memory not measured). A finished dry run is not repeated: rerunning goes on where a killed one stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import torch
import yaml
from PIL import Image

from data.errors import InputError
from launch import pipeline
from trainer import dist
from trainer.runtime import config, engine, stages
from trainer.runtime.memory import measured_from_here, memory_kib
from trainer.runtime.config import PipelineConfig
from trainer.runtime.stages import STAGES


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="dry_run", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the pipeline config to try (configs/paper/pipeline.yaml)")
    parser.add_argument("--classes", type=int, required=True, help="classes of the pile (the paper: 800)")
    parser.add_argument("--out", required=True, help="folder for the pile, the run and dry_run.json")
    parser.add_argument("--steps", type=int, default=2, help="train.max_steps of every training run")
    parser.add_argument("--batch", type=int, default=8, help="train.batch_size (inference: 8x) of every stage")
    parser.add_argument("--per-class", type=int, default=1, help="labeled images of each class")
    parser.add_argument("--unlabeled", type=int, default=512, help="unlabeled images")
    parser.add_argument("--eval-images", type=int, default=64, help="images of val and of test each")
    parser.add_argument("--nproc", type=int, default=1, help="processes per stage (more: under torchrun)")
    args = parser.parse_args(argv)
    for name in ("classes", "steps", "batch", "per_class", "unlabeled", "eval_images", "nproc"):
        least = 2 if name == "classes" else 1
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected at least {least}")
    return args


def generate_pile(root: str, classes: int, size: int, per_class: int, unlabeled: int, eval_images: int):
    """ROOT/classes.txt, the four split CSVs and images/: a class's pictures share a colour and a stripe
    frequency, each with its own noise."""
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 216, (classes, 3))
    ramp = np.linspace(0, 2 * np.pi, size)[None, :, None]
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    splits = {"labeled": np.repeat(np.arange(classes), per_class),
              **{name: rng.integers(0, classes, count) for name, count in
                 (("val", eval_images), ("test", eval_images), ("unlabeled", unlabeled))}}
    for name, labels in splits.items():
        rows = []
        for i, label in enumerate(labels):
            stripes = 30 * np.sin(ramp * (1 + label % 9))
            pixels = colours[label] + stripes + rng.normal(0, 12, (size, size, 3))
            path = f"images/{name}-{i:06d}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(root, path))
            rows.append(f"{path},{label}\n")
        engine.write_text(os.path.join(root, f"{name}.csv"), "path,label\n" + "".join(rows))
    engine.write_text(os.path.join(root, "classes.txt"), "".join(f"class{c:04d}\n" for c in range(classes)))


def dry_overrides(stage_config: type, args, queries: int, gpu: bool) -> list[str]:
    """key=value settings that make a run of a stage config small, where the config declares the key."""
    wanted = {"train.max_steps": args.steps, "train.batch_size": args.batch, "train.fit_batch": "true",
              "data.workers": 0, "inference.batch_size": 8 * args.batch, "active.budget": queries}
    if not gpu:   # fp16 needs CUDA
        wanted.update({"train.precision": "bf16", "inference.precision": "bf16"})
    return [f"{key}={value}" for key, value in wanted.items() if stages.declares(stage_config, key)]


def dry_config(args, cfg: PipelineConfig, data_root: str, gpu: bool) -> dict:
    """The pipeline config file as a dict (`cfg`: as loaded), every spec's overrides followed by the dry run's."""
    with open(args.config) as f:
        raw = yaml.safe_load(f) or {}
    p = cfg.pipeline
    active = STAGES["active"].parse(["--config", p.active.config, *p.active.overrides]).active
    specs = raw.setdefault("pipeline", {})
    steps = stages.recipe(p.active_learning) + stages.baseline_steps(p)
    fields = {f.name for f in dataclasses.fields(p)}   # not fixmatch_active: pipeline.fixmatch's, then its own
    for name, stage in {s.spec: s.stage for s in steps if s.spec in fields}.items():
        extra = dry_overrides(STAGES[stage].config, args, min(active.clusters, args.unlabeled // 2), gpu)
        if stage == "pseudolabel":   # its iterations' fine-tunes
            inner = dry_overrides(STAGES["finetune"].config, args, 0, gpu)
            extra.append(f"pseudo.finetune_overrides=[{','.join(inner)}]")
        spec = specs.setdefault(name, {})
        spec["overrides"] = [*spec.get("overrides", []), *extra]
    raw.setdefault("run", {})["dir"] = os.path.join(args.out, "run")
    raw.setdefault("data", {})["root"] = data_root
    specs.update(nproc=args.nproc, oracle=True, answers="")
    return raw


def measure_steps(record: dict, gpu: bool):
    """Stage.run, timed and its peak memory counted from its start into `record` (the outermost run only:
    pseudolabel's fine-tunes are inside its own)."""
    plain, depth = stages.Stage.run, [0]

    def run(stage, argv, nproc=1):
        depth[0] += 1
        try:
            if depth[0] > 1:
                return plain(stage, argv, nproc)
            name = os.path.basename(next(a for a in argv if a.startswith("run.dir=")).split("=", 1)[1])
            before = measured_from_here()
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            plain(stage, argv, nproc)
            record[name] = {"stage": stage.name, "seconds": round(time.perf_counter() - start, 1)}
            if nproc == 1:
                record[name]["peak_rss_mb"] = round(memory_kib()["VmHWM"] / 1024)
                record[name]["rss_before_mb"] = round(before / 1024)
                if gpu:
                    record[name]["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        finally:
            depth[0] -= 1
    stages.Stage.run = run


def main(argv=None):
    args = parse_args(argv)
    data_root = os.path.join(args.out, "data")
    cfg = config.load(PipelineConfig, args.config, [])   # the config's own checks, with its own file named
    gpu = dist.resolve_device(cfg.run.device).type == "cuda"
    pretrain = cfg.pipeline.pretrain
    size = STAGES["pretrain"].parse(["--config", pretrain.config, *pretrain.overrides]).data.image_size
    classes_file = os.path.join(data_root, "classes.txt")   # written last: a pile cut short is made again
    if os.path.exists(classes_file):
        with open(classes_file) as f:
            made = sum(1 for _ in f)
        if made != args.classes:
            raise InputError(f"{classes_file}: this pile has {made} classes, not --classes {args.classes}: "
                             "expected another --out")
    else:
        os.makedirs(args.out, exist_ok=True)
        generate_pile(data_root, args.classes, size, args.per_class, args.unlabeled, args.eval_images)
    config_path = os.path.join(args.out, "pipeline.yaml")
    engine.write_text(config_path, yaml.safe_dump(dry_config(args, cfg, data_root, gpu), sort_keys=False))
    summary_path = os.path.join(args.out, "dry_run.json")
    # a resumed dry run keeps the figures of the steps an earlier run finished
    record = engine.read_json(summary_path)["stages"] if os.path.exists(summary_path) else {}
    measure_steps(record, gpu)
    start = time.perf_counter()
    pipeline.main(["--config", config_path])
    summary = {"config": args.config, "classes": args.classes, "image_size": size, "steps": args.steps,
               "device": "cuda" if gpu else "cpu", "seconds": round(time.perf_counter() - start, 1),
               "stages": record}
    engine.write_json(summary_path, summary)
    print(f"[dry_run] {args.config}: {args.classes} classes at {size} px, every stage ran "
          f"({summary['seconds']:.0f} s); peak memory of each step:")
    for name, step in record.items():
        memory = (f"{step['peak_rss_mb']} MB resident" if "peak_rss_mb" in step else "not measured under torchrun")
        device = f", {step['peak_gpu_mb']} MB GPU" if "peak_gpu_mb" in step else ""
        print(f"  {name:<24} {step['seconds']:>7.1f} s  {memory}{device}")


if __name__ == "__main__":
    engine.cli(main)
