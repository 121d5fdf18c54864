"""GPU smoke run: every path that behaves differently on CUDA, on one GPU, in minutes, with no install
step and no network. The same script on the CPU (`--device cpu`: gloo, torch loaders) runs in `make test`.

    python tests/gpu_smoke.py [--device cuda|cpu] [--out runs/gpu-smoke]      # = make gpu-smoke [DEVICE=cpu]

Assumes only torch, torchvision, numpy, pillow, pyyaml, tqdm and matplotlib. A step that needs DALI,
faiss, submitit or apex says SKIP with the reason when that piece is missing. Data is generated on the
spot. Writes OUT/smoke.json and OUT/smoke.md (a PASS / FAIL / SKIP table); exit status 1 on any FAIL.

Steps (docs/gpu.md says what each one catches):
  S0 environment          S1 data (prepare)            S2 collectives in a one-rank group
  S3 device and numerics  S4 every stage end to end    S5 DALI on the device
  S6 faiss on the GPU     S7 apex LARC                 S8 benchmarks
  S9 Slurm script         S10 pseudolabel, 2 gloo ranks S11 two GPUs under torchrun
"""
import os
import sys

import argparse
import copy
import importlib
import json
import platform
import random
import shutil
import signal
import subprocess
import tempfile
import time
import traceback

import numpy as np
import torch
from PIL import Image

from trainer import dist
from trainer.runtime import amp, checkpoint, engine, models, optim, stages
from trainer.algorithms import losses, self_supervised, tta
from trainer.runtime.config import EvaluateConfig
from trainer.algorithms.ema import EMA
from trainer.algorithms.semi_supervised import EPOCH_SUMS, epoch_summary
from trainer.runtime.loop import EpochSums

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(PROJECT, "configs", "demo")
SIZE, CLASSES, PER_CLASS = 32, 4, 60


class Skip(Exception):
    """The step cannot run here; the message says why."""


def optional(module: str):
    """The module, or None when it does not import (a missing optional piece, not a failure)."""
    try:
        return importlib.import_module(module)
    except Exception:   # ImportError, or a wheel whose native libraries fail to load
        return None


def faiss_gpus() -> int:
    faiss = optional("faiss")
    return faiss.get_num_gpus() if faiss else 0


# ---------------------------------------------------------------- running stages

class Smoke:
    def __init__(self, device: str, out: str):
        self.device, self.out = device, out
        self.cuda = device == "cuda"
        self.data = os.path.join(out, "data")
        self.runs = os.path.join(out, "runs")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "SEMISCALE_CACHE": os.path.join(out, "cache"),
                    "PYTHONPATH": os.pathsep.join([PROJECT, *filter(None, [os.environ.get("PYTHONPATH")])])}
        if not self.cuda:
            self.env["OMP_NUM_THREADS"] = "1"   # two processes share the cores in S10
        self.backend = "auto" if self.cuda else "torch"
        self.precision = "fp16" if self.cuda else "bf16"
        self.has_faiss = optional("faiss") is not None

    def command(self, script: str, *args, nproc: int = 0) -> list[str]:
        path = os.path.join(PROJECT, "launch", f"{script}.py")
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                    if nproc else [sys.executable])
        return [*launcher, path, *map(str, args)]

    def run(self, script: str, *args, nproc: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.command(script, *args, nproc=nproc), capture_output=True, text=True,
                              timeout=timeout, env=self.env, cwd=PROJECT)
        if proc.returncode != 0:
            raise AssertionError(f"{script}.py exited {proc.returncode}: {tail(proc.stderr)}")
        return proc

    def stage(self, script: str, run_dir: str, *overrides, nproc: int = 0, config: str = "") -> subprocess.CompletedProcess:
        return self.run(script, "--config", config or os.path.join(CONFIGS, f"{script}.yaml"), f"run.dir={run_dir}",
                        f"data.root={self.data}", f"data.backend={self.backend}", f"run.device={self.device}",
                        "data.workers=2", "run.log_every=1", f"data.image_size={SIZE}", *overrides, nproc=nproc)

    def dir(self, name: str) -> str:
        return os.path.join(self.runs, name)


def tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def events(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check(condition: bool, message: str):
    if not condition:
        raise AssertionError(message)


TINY_MODEL = ["model.width=8"]
TINY_FINETUNE = [*TINY_MODEL, "train.batch_size=16", "finetune.eval_every=1"]


def smoke_steps(smoke) -> dict[str, list[str]]:
    """Tiny settings of the pipeline steps the smoke runs, at the smoke's precision; the steps' order, stages
    and wiring are the registry's (trainer.runtime.stages.RECIPE). pretrain runs before them on its own: it
    is killed and resumed."""
    train, inference = f"train.precision={smoke.precision}", f"inference.precision={smoke.precision}"
    finetune = [*TINY_FINETUNE, train]
    return {
        "finetune": [*finetune, "train.epochs=3"],
        "pseudolabel": ["pseudo.top_k=2", "pseudo.schedule=[10]", "pseudo.fixmatch_p=4", "pseudo.pseudo_epochs=1",
                        "pseudo.labeled_epochs=1", "inference.batch_size=64", inference,
                        f"pseudo.finetune_overrides=[{','.join(finetune + [f'data.image_size={SIZE}'])}]"],
        "fixmatch": ["train.batch_size=8", "fixmatch.mu=2", "train.max_steps=6", "fixmatch.bn_batches=2", train],
        "active": ["active.clusters=2", "active.budget=4", "active.oracle=true", "inference.batch_size=64"],
        "evaluate_knn": ["inference.batch_size=64"],
        "evaluate_fixmatch": ["evaluate.scales=[32,40]", "evaluate.tta=val", "inference.batch_size=64", inference],
    }


FAISS_STEPS = ("active", "evaluate_knn")   # k-means and the kNN search need faiss


# ---------------------------------------------------------------- S0, S1

def s0_environment(smoke: Smoke) -> str:
    found = {name: bool(optional(module)) for name, module in
             (("dali", "nvidia.dali"), ("faiss", "faiss"), ("submitit", "submitit"), ("apex", "apex.parallel.LARC"))}
    device = dist.resolve_device(smoke.device)   # run.device=cuda refuses a torch that cannot use the GPU
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": optional("torchvision").__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda, "device": str(device), "optional": found, "faiss_gpus": faiss_gpus()}
    if smoke.cuda:
        info.update(gpu=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count(),
                    cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())))
    with open(os.path.join(smoke.out, "environment.json"), "w") as f:
        json.dump(info, f, indent=2)
    return (f"torch {info['torch']}, {info.get('gpu', 'CPU')}; optional: "
            + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in found.items()))


def synthetic_image(label: int, rng: random.Random) -> np.ndarray:
    """Learnable classes: horizontal stripes, vertical stripes, a bright square, a diagonal; noisy colours."""
    y, x = np.mgrid[:SIZE, :SIZE]
    period, phase = rng.randint(4, 7), rng.randint(0, 6)
    pattern = [((y + phase) // period) % 2, ((x + phase) // period) % 2,
               (abs(y - SIZE / 2 - phase + 3) < 8) & (abs(x - SIZE / 2 + phase - 3) < 8),
               (abs(x - y - phase + 3) < 4)][label].astype(np.float32)
    colour = np.array([rng.uniform(0.4, 1.0) for _ in range(3)], np.float32)
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 0.08, (SIZE, SIZE, 3))
    return (np.clip(pattern[..., None] * colour + 0.1 + noise, 0, 1) * 255).astype(np.uint8)


def s1_data(smoke: Smoke) -> str:
    source = os.path.join(smoke.out, "source")
    rng = random.Random(0)
    for label in range(CLASSES):
        folder = os.path.join(source, f"class{label}")
        os.makedirs(folder, exist_ok=True)
        for i in range(PER_CLASS):
            image = Image.fromarray(synthetic_image(label, rng))
            if i % 10 == 1:
                image.convert("L").save(os.path.join(folder, f"{i:03d}.png"))
            elif i % 10 == 2:
                image.convert("RGBA").save(os.path.join(folder, f"{i:03d}.png"))
            else:
                image.save(os.path.join(folder, f"{i:03d}.jpg"), quality=95)
    good = os.path.join(source, "class0", "000.jpg")
    with open(good, "rb") as f:
        head = f.read()[:200]
    with open(os.path.join(source, "class1", "truncated.jpg"), "wb") as f:
        f.write(head)
    open(os.path.join(source, "class2", "empty.png"), "wb").close()
    smoke.run("prepare", "folder", source, "--out", smoke.data, "--labels-per-class", 6, "--val-per-class", 10,
              "--test-per-class", 10, "--seed", 0)
    with open(os.path.join(smoke.data, "bad_images.txt")) as f:
        bad = sorted(os.path.basename(line.split("\t")[0]) for line in f if line.strip())
    check(bad == ["empty.png", "truncated.jpg"], f"bad_images.txt names {bad}, expected the empty and truncated files")
    rows = {name: sum(1 for _ in open(os.path.join(smoke.data, f"{name}.csv"))) - 1
            for name in ("labeled", "val", "test", "unlabeled")}
    return ", ".join(f"{k} {v}" for k, v in rows.items()) + "; bad_images.txt names both bad files"


# ---------------------------------------------------------------- S2, S3: in this process, one-rank group

def one_rank_group(smoke: Smoke) -> dist.Runtime:
    device = dist.resolve_device(smoke.device)
    if smoke.cuda:
        torch.cuda.set_device(device)
    store = os.path.join(tempfile.mkdtemp(prefix="semiscale-smoke-"), "store")
    torch.distributed.init_process_group("nccl" if smoke.cuda else "gloo", init_method=f"file://{store}", rank=0,
                                         world_size=1, device_id=device if smoke.cuda else None)
    return dist.Runtime(0, 0, 1, device)


def small_classifier(rt):
    torch.manual_seed(0)
    return rt.place(models.Classifier(models.build_backbone("small", False, 8), CLASSES))


def s2_collectives(smoke: Smoke) -> str:
    from data.datasets import read_split
    from trainer.runtime.loading import eval_loader
    from trainer.runtime.predict import accuracy, embed, write_predictions
    rt = one_rank_group(smoke)
    notes = []
    if smoke.cuda:   # the check itself can fail: NCCL refuses what the helpers are there to fix
        check(dist.refuses_cpu_tensors(), "NCCL accepted a CPU tensor: this step would prove nothing")
        notes.append("a raw NCCL all-reduce of a CPU tensor raises")
    counts = dist.all_reduce_(torch.tensor([1.0, 2.0], dtype=torch.float64))   # CPU tensor, any backend
    check(counts.device.type == "cpu" and counts.tolist() == [1.0, 2.0], f"all_reduce_ gave {counts}")
    mean = dist.all_reduce_mean_(torch.ones(2, device=rt.device))
    check(mean.device == rt.device and mean.tolist() == [1.0, 1.0], "all_reduce_mean_ on the device")
    check(dist.all_gather_object({"a": 1}) == [{"a": 1}] and dist.broadcast_object(7) == 7, "object collectives")
    x = torch.ones(3, device=rt.device, requires_grad=True)
    dist.all_reduce_sum(x * 2).sum().backward()
    check(x.grad.tolist() == [2.0] * 3, "differentiable all_reduce_sum")
    dist.barrier()

    # every call site that crosses ranks, with the real loaders and models
    cfg = engine.parse(EvaluateConfig, ["--config", os.path.join(CONFIGS, "evaluate.yaml"),
                       f"data.root={smoke.data}", f"data.backend={smoke.backend}", f"data.image_size={SIZE}",
                       "inference.batch_size=32", "evaluate.scales=[32,40]"], "smoke")
    val = read_split(smoke.data, "val")
    model = small_classifier(rt)
    loader = eval_loader(val, cfg, rt, 32)
    got = accuracy(model, loader, rt)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b["views"][0].to(rt.device)).float().cpu() for b in loader.epoch(0)])
    expected = (logits.argmax(1).numpy() == val.labels).mean()
    check(abs(got["top1"] - expected) < 1e-6, f"accuracy {got['top1']} vs counted by hand {expected}")
    hits = tta.hit_counts(model, eval_loader(val, cfg, rt, 32, [32, 40]), val.labels, 2, [((0, 1), True)], rt, "fp32")
    check(int(hits[0, 2]) == len(val) and hits.device.type == "cpu", f"hit_counts counted {hits[0, 2]} images")
    features = embed(model.backbone, loader, rt, len(val))
    check(features.shape == (len(val), model.backbone.out_dim), f"embed gave {features.shape}")
    out_dir = os.path.join(smoke.out, "s2_predictions")
    write_predictions(model, loader, rt, out_dir, len(val), top_k=2)
    check(np.load(os.path.join(out_dir, "topk_class.npy")).shape == (len(val), 2), "write_predictions")
    sums = EpochSums(EPOCH_SUMS, rt.device)
    sums.add({name: torch.ones((), device=rt.device) for name in EPOCH_SUMS})
    summary = epoch_summary(sums.mean_over_ranks(), True)
    check(summary["mask_rate"] == 1.0, f"FixMatch epoch sums gave {summary}")
    return "; ".join(notes + ["all_reduce_/mean/sum, objects, barrier, accuracy, hit_counts, embed, "
                              "write_predictions, FixMatch epoch sums"])


def s3_numerics(smoke: Smoke) -> str:
    rt = dist.Runtime(0, 0, 1, dist.resolve_device(smoke.device))   # the one-rank group of S2 is still up
    batch = 16
    torch.manual_seed(0)
    views = [torch.randn(batch, 3, SIZE, SIZE, device=rt.device) for _ in range(2)]

    def barlow_twins():
        torch.manual_seed(0)
        return self_supervised.BarlowTwins(models.build_backbone("small", False, 8), [64, 64], 0.0051, batch)

    model = rt.place(dist.sync_batchnorm(barlow_twins()))
    sync_type = torch.nn.SyncBatchNorm if smoke.cuda else dist.GlobalBatchNorm
    check(any(isinstance(m, sync_type) for m in model.modules()), f"no {sync_type.__name__} after sync_batchnorm")
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    check(conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.device == rt.device,
          "conv weights not channels-last on the device")
    ddp = dist.wrap_ddp(model, rt)
    if smoke.cuda:
        check(ddp.device_ids == [rt.device.index], f"DDP device_ids {ddp.device_ids}")
    correlation_dtypes = []
    plain_loss = losses.barlow_twins
    losses.barlow_twins = lambda a, b, *rest: (correlation_dtypes.append(a.dtype), plain_loss(a, b, *rest))[1]
    try:
        opt = optim.build_optimizer("lars", model, lr_weights=0.1, lr_biases=0.01, weight_decay=1e-6)
        scaler = amp.grad_scaler(smoke.precision, rt.device)
        for step in range(2):
            with amp.autocast(smoke.precision, rt.device):
                loss = ddp(*views)
            amp.step_optimizer(loss, opt, scaler, step)
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        check(not missing, f"no finite gradient on {missing[:3]}")
        for precision in ("fp16", "bf16") if smoke.cuda else ("bf16",):
            with torch.no_grad(), amp.autocast(precision, rt.device):
                model(*views)
    finally:
        losses.barlow_twins = plain_loss
    check(set(correlation_dtypes) == {torch.float32}, f"Barlow Twins correlation in {set(correlation_dtypes)}")

    # a loss-scaled step is the plain fp32 step (the scaler unscales before LARS reads the gradients)
    twins = [rt.place(barlow_twins()) for _ in range(2)]
    opts = [optim.build_optimizer("lars", m, lr_weights=0.1, lr_biases=0.01, weight_decay=1e-6) for m in twins]
    scaled = torch.amp.GradScaler(rt.device.type, init_scale=2.0 ** 12)
    amp.step_optimizer(twins[0](*views), opts[0], scaled, 0)
    amp.step_optimizer(twins[1](*views), opts[1], amp.grad_scaler("fp32", rt.device), 0)
    gap = max((a - b).abs().max().item() for a, b in zip(twins[0].parameters(), twins[1].parameters()))
    check(gap < 1e-5, f"GradScaler LARS step differs from the fp32 step by {gap}")

    ema = EMA(model, 0.99)
    ema.update(model)
    check(all(p.device == rt.device for p in ema.model.parameters()), "EMA weights off the device")
    path = os.path.join(smoke.out, "s3_checkpoint.pt")
    checkpoint.save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    saved = torch.load(path, weights_only=True)   # no map_location: a GPU tensor in the file would land on the GPU
    on_gpu = [k for k, v in saved["model"].items() if v.device.type != "cpu"]
    check(not on_gpu, f"checkpoint holds device tensors: {on_gpu[:3]}")
    restored = rt.place(dist.sync_batchnorm(barlow_twins()))
    restored.load_state_dict(saved["model"])
    check(all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values())),
          "checkpoint round trip changed the weights")
    dist.shutdown()
    return (f"{sync_type.__name__}, channels-last, DDP; 2 {smoke.precision} LARS steps; correlation fp32; "
            f"scaled step = fp32 step (gap {gap:.1e}); EMA on {rt.device}; checkpoint CPU round trip")


# ---------------------------------------------------------------- S4: stages, each in its own process

def kill_after_checkpoint(smoke: Smoke, args: list, run_dir: str, min_step: int) -> int:
    proc = subprocess.Popen(smoke.command("pretrain", *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=smoke.env, cwd=PROJECT)
    path, deadline = os.path.join(run_dir, "checkpoint.pt"), time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(path) and checkpoint.load(path)["step"] >= min_step:
                break
            time.sleep(0.02)
        check(proc.poll() is None, "pretrain ended before it could be killed")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return checkpoint.load(path)["step"]


def s4_stages(smoke: Smoke) -> str:
    d = smoke.dir
    knn = [f"knn.every_epochs={1 if smoke.has_faiss else 0}"]
    pretrain = ["--config", os.path.join(CONFIGS, "pretrain.yaml"), f"run.dir={d('pretrain')}",
                f"data.root={smoke.data}", f"data.backend={smoke.backend}", f"run.device={smoke.device}",
                f"data.image_size={SIZE}", "data.workers=2", *TINY_MODEL, "barlow.projector=[64,64]",
                "train.batch_size=32", f"train.precision={smoke.precision}", "train.epochs=100", "train.max_steps=120",
                "run.checkpoint_every=2", "run.log_every=1", *knn]
    killed_at = kill_after_checkpoint(smoke, pretrain, d("pretrain"), 4)
    resumed = smoke.run("pretrain", *pretrain)
    check(f"resumed from {d('pretrain')}/checkpoint.pt at step {killed_at}" in resumed.stdout + resumed.stderr,
          "pretrain did not resume from its checkpoint")
    check(max(e.get("step", 0) for e in events(d("pretrain"))) == 120, "pretrain did not reach 120 steps")
    done = [f"pretrain {smoke.precision} killed at step {killed_at} and resumed"]
    if smoke.cuda:
        smoke.stage("pretrain", d("pretrain_bf16"), *TINY_MODEL, "barlow.projector=[64,64]", "train.batch_size=32",
                    "train.precision=bf16", "train.max_steps=10", *knn)
        done.append("pretrain bf16")
    loads_on_cpu = subprocess.run(
        [sys.executable, "-c", "import sys, torch; sd = torch.load(sys.argv[1], weights_only=True); "
                               "assert all(v.device.type == 'cpu' for v in sd.values()), 'device tensors'",
         os.path.join(d("pretrain"), "backbone.pt")],
        capture_output=True, text=True, env={**smoke.env, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    check(loads_on_cpu.returncode == 0, f"backbone.pt in a CPU-only process: {tail(loads_on_cpu.stderr)}")
    done.append("backbone.pt loads without a GPU")

    settings = smoke_steps(smoke)
    for step in stages.RECIPE:   # the pipeline's order and wiring, each step in its own process
        if step.name in settings and (smoke.has_faiss or step.name not in FAISS_STEPS):
            smoke.stage(step.stage, d(step.name), *stages.wired_inputs(step, smoke.runs, active_learning=True),
                        *settings[step.name])
            check(os.path.exists(os.path.join(d(step.name), step.done)), f"{step.name} wrote no {step.done}")
    finetune_val = engine.read_done(d("finetune"))["val_top1"]
    selection = engine.read_json(os.path.join(d("pseudolabel"), "selection.json"))
    check(len(selection["iterations"]) == 2, "pseudolabel did not run its iteration")
    check(any("val_top1_ema" in e for e in events(d("fixmatch"))), "fixmatch: no EMA val")
    done.append(f"finetune (val {finetune_val:.2f}), pseudolabel, fixmatch")
    if smoke.has_faiss:
        check(sum(1 for _ in open(os.path.join(d("active"), "queries.csv"))) == 5, "active: not 4 queries")
        done.append("active, evaluate (kNN)")
    else:
        done.append(f"{' and '.join(FAISS_STEPS)} not run (no faiss)")
    scores = engine.read_json(os.path.join(d("evaluate_fixmatch"), "eval.json"))["splits"]
    check(scores["val"]["images"] == 40 and scores["test"]["images"] == 40, f"evaluate counted {scores['val']['images']}")
    done.append(f"evaluate TTA (test {scores['test']['tta']['top1']:.2f})")
    return "; ".join(done)


# ---------------------------------------------------------------- S5-S11: optional pieces and scale

def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def gpu_used_mib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def s5_dali(smoke: Smoke) -> str:
    if not optional("nvidia.dali"):
        raise Skip("nvidia.dali does not import")
    from data import dali
    from data.datasets import read_split
    from data.loaders import build_loader
    device = dist.resolve_device(smoke.device)
    split = read_split(smoke.data, "unlabeled")

    def loader(kind, dev=device, **kw):
        kw.setdefault("global_batch", 16)
        if kind == "eval":
            kw.update(shuffle=False, drop_last=False)
        return build_loader(split, kind, image_size=SIZE, backend="dali", device=dev, workers=2, **kw)

    for kind in ("barlow_twins", "train", "weak", "weak_strong", "eval"):
        views = next(loader(kind, scales=[32, 40] if kind == "eval" else None).epoch(0))["views"]
        for v in views:
            check(v.device.type == device.type and v.dtype == torch.float32 and v.dim() == 4 and v.shape[1] == 3,
                  f"{kind}: a view of {v.dtype} {tuple(v.shape)} on {v.device}")
    notes = ["5 kinds give float32 NCHW on " + device.type]
    if smoke.cuda:   # nvJPEG vs the CPU decoder on PNG: lossless, so within one 8-bit level
        pngs = [i for i, p in enumerate(split.paths) if p.endswith(".png")][:16]
        png_split = type(split)(**{**split.__dict__, "paths": [split.paths[i] for i in pngs], "hidden_labels": None})
        per_device = [next(build_loader(png_split, "eval", image_size=SIZE, global_batch=len(pngs), shuffle=False,
                                        drop_last=False, backend="dali", device=dev).epoch(0))["views"][0].cpu()
                      for dev in (device, torch.device("cpu"))]
        levels = ((per_device[0] - per_device[1]).abs() * 0.229 * 255).max().item()   # smallest std of the three
        check(levels <= 1.01, f"GPU and CPU decodes differ by {levels:.2f} levels")
        notes.append(f"GPU vs CPU PNG decode within {levels:.2f} levels")
    ranks = [loader("train", rank=r, world=2) for r in range(2)]
    whole = loader("train")
    for step, (a, b, one) in enumerate(zip(*(r.epoch(1) for r in ranks), whole.epoch(1))):
        check(sorted(a["index"].tolist() + b["index"].tolist()) == sorted(one["index"].tolist()),
              f"two ranks do not partition step {step}")
    notes.append("2 ranks partition every batch")
    small = loader("weak")
    memory = []
    for epoch in range(40):   # what FixMatch's labeled loader did before stream(): one pipeline per epoch
        for _ in small.epoch(epoch):
            pass
        if epoch in (9, 39):
            memory.append((rss_mib(), gpu_used_mib() if smoke.cuda else 0.0))
    rss_growth, gpu_growth = memory[1][0] - memory[0][0], memory[1][1] - memory[0][1]
    check(rss_growth < 200 and gpu_growth < 200, f"30 epoch rebuilds grew RSS {rss_growth:.0f} MiB, GPU {gpu_growth:.0f} MiB")
    builds, build = [], dali._build_pipeline
    dali._build_pipeline = lambda *a, **kw: (builds.append(1), build(*a, **kw))[1]
    try:
        t0, stream = time.time(), small.stream(0)
        for _ in range(40 * small.steps_per_epoch):
            next(stream)
        stream_s = time.time() - t0
        t0 = time.time()
        for epoch in range(40):
            for _ in small.epoch(epoch):
                pass
        epochs_s = time.time() - t0
    finally:
        dali._build_pipeline = build
    notes.append(f"40 epoch rebuilds: RSS +{rss_growth:.0f} MiB, GPU +{gpu_growth:.0f} MiB; 40 epochs as a stream "
                 f"{stream_s:.1f} s with {len(builds) - 40} pipeline(s) vs {epochs_s:.1f} s with 40")
    return "; ".join(notes)


def s6_faiss(smoke: Smoke) -> str:
    if not optional("faiss"):
        raise Skip("faiss does not import")
    if faiss_gpus() == 0:
        raise Skip("faiss sees no GPU (CPU build or no device)")
    from trainer.algorithms import cluster, knn
    rng = np.random.default_rng(0)
    base, queries = rng.normal(size=(5000, 64)).astype(np.float32), rng.normal(size=(500, 64)).astype(np.float32)
    cpu, gpu = knn.cosine_search(base, queries, 10), knn.cosine_search(base, queries, 10, gpu=0)
    same = (cpu[1] == gpu[1]).mean()
    check(same > 0.99, f"GPU and CPU neighbours agree on {same:.3f}")
    objectives = [cluster.spherical_kmeans(base, 20, niter=10, gpu=g).objective for g in (None, 0)]
    check(abs(objectives[0] - objectives[1]) < 1e-2, f"k-means objectives {objectives}")
    notes = [f"neighbours agree {same:.4f}, k-means objective {objectives[1]:.4f} vs CPU {objectives[0]:.4f}"]
    if faiss_gpus() > 1:
        index = knn.inner_product_index(64, 1)
        check(index.getDevice() == 1, f"the index for GPU 1 is on GPU {index.getDevice()}")
        notes.append("the index for GPU 1 lives on GPU 1")
    return "; ".join(notes)


def s7_apex(smoke: Smoke) -> str:
    if not optional("apex.parallel.LARC"):
        raise Skip("NVIDIA apex (apex.parallel.LARC) does not import")
    smoke.stage("pretrain", smoke.dir("pretrain_apex"), *TINY_MODEL, "barlow.projector=[64,64]", "train.batch_size=32",
                "lars.impl=apex", "train.max_steps=3", "knn.every_epochs=0", f"train.precision={smoke.precision}")
    return "3 pretraining steps with lars.impl=apex"


def s8_bench(smoke: Smoke) -> str:
    suites = ["lars"] + (["loader"] if optional("nvidia.dali") else [])
    out = os.path.join(smoke.out, "bench.json")
    smoke.run("bench", *(a for s in suites for a in ("--suite", s)), "--quick", "--json", out, timeout=600)
    figures = engine.read_json(out)
    lars = figures["lars"]
    return f"LARS native vs reference {lars['ratio']:.2f}x on {lars['device']}" + (
        f"; loader suite: {len(figures['loader'])} figures" if "loader" in figures else "; loader suite needs DALI")


def s9_slurm(smoke: Smoke) -> str:
    if not optional("submitit"):
        raise Skip("submitit does not import")
    fake = os.path.join(smoke.out, "fake_slurm")
    os.makedirs(fake, exist_ok=True)
    for name, body in (("srun", "exit 0"), ("sbatch", "exit 1"), ("sinfo", "echo '64 512000 gpu:8(S:0-1)'")):
        with open(os.path.join(fake, name), "w") as f:
            f.write(f"#!/bin/sh\n{body}\n")
        os.chmod(os.path.join(fake, name), 0o755)
    env = {**smoke.env, "PATH": fake + os.pathsep + os.environ.get("PATH", "")}
    argv = [sys.executable, os.path.join(PROJECT, "launch", "submit.py"), "pretrain", "--config",
            os.path.join(PROJECT, "configs", "paper", "pretrain.yaml"), "--nodes", "2", "--gpus-per-node", "8",
            "--dry-run"]
    script = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    check(script.returncode == 0, f"submit --dry-run: {tail(script.stderr)}")
    text = script.stdout
    for needed in ("--cpus-per-task=8", "--mem", "--requeue", "--kill-on-bad-exit=1"):
        check(needed in text, f"the sbatch script lacks {needed}")
    check("wckey" not in text, "the sbatch script sets a wckey")
    mapping = subprocess.run(
        [sys.executable, "-c", "import json, submitit\nfrom trainer.operations.slurm import distributed_env\n"
         "print(json.dumps(distributed_env(submitit.JobEnvironment())))"],
        capture_output=True, text=True, timeout=120,
        env={**env, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NODEID": "1"})
    check(mapping.returncode == 0, f"distributed_env: {tail(mapping.stderr)}")
    got = json.loads(mapping.stdout.strip().splitlines()[-1])
    want = {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu07"}
    check(all(got[k] == v for k, v in want.items()), f"2 x 8 job mapped to {got}")
    return "sbatch: 8 CPUs per task (also on srun), memory, requeue, kill-on-bad-exit, no wckey; 2 x 8 env mapping"


def s10_pseudolabel_two_ranks(smoke: Smoke) -> str:
    smoke_cpu = copy.copy(smoke)
    smoke_cpu.device, smoke_cpu.backend = "cpu", "torch"
    smoke_cpu.env = {**smoke.env, "OMP_NUM_THREADS": "1"}
    finetune = TINY_FINETUNE + ["train.precision=fp32", f"data.image_size={SIZE}"]
    seconds = []
    for attempt in range(2):   # the race was intermittent: two fresh runs
        run_dir = smoke.dir(f"pseudolabel_2ranks_{attempt}")
        t0 = time.time()
        smoke_cpu.stage("pseudolabel", run_dir, "pseudo.top_k=2", "pseudo.schedule=[8,12]", "pseudo.fixmatch_p=2",
                        "pseudo.pseudo_epochs=1", "pseudo.labeled_epochs=1", "inference.batch_size=32",
                        f"pseudo.model={smoke.dir('finetune')}/model.pt",
                        f"pseudo.finetune_overrides=[{','.join(finetune)}]", nproc=2)
        seconds.append(time.time() - t0)
        iterations = engine.read_json(os.path.join(run_dir, "selection.json"))["iterations"]
        check(len(iterations) == 3, f"run {attempt}: {len(iterations) - 1} iterations, expected 2")
    return "two fresh runs, two iterations each: " + ", ".join(f"{s:.0f} s" for s in seconds)


def s11_two_gpus(smoke: Smoke) -> str:
    if not smoke.cuda or torch.cuda.device_count() < 2:
        raise Skip(f"needs two GPUs ({torch.cuda.device_count() if smoke.cuda else 0} here)")
    runs = {}
    for nproc in (0, 2):
        run_dir = smoke.dir(f"finetune_torchrun{nproc}")
        smoke.stage("finetune", run_dir, *TINY_FINETUNE, "train.precision=fp32", "train.epochs=2",
                    f"finetune.backbone={smoke.dir('pretrain')}/backbone.pt", nproc=nproc)
        runs[nproc] = engine.read_done(run_dir)["val_top1"]
    check(abs(runs[0] - runs[2]) <= 0.1, f"val top-1 one rank {runs[0]} vs two {runs[2]}")
    return f"finetune val top-1: 1 rank {runs[0]:.3f}, 2 ranks {runs[2]:.3f}"


STEPS = [("S0", "environment", s0_environment), ("S1", "data", s1_data), ("S2", "collectives", s2_collectives),
         ("S3", "device and numerics", s3_numerics), ("S4", "stages end to end", s4_stages),
         ("S5", "DALI", s5_dali), ("S6", "faiss GPU", s6_faiss), ("S7", "apex LARC", s7_apex),
         ("S8", "benchmarks", s8_bench), ("S9", "Slurm script", s9_slurm),
         ("S10", "pseudolabel, 2 gloo ranks", s10_pseudolabel_two_ranks), ("S11", "two GPUs", s11_two_gpus)]
NEEDS = {"S2": "S1", "S3": "S2", "S4": "S1", "S5": "S1", "S10": "S4", "S11": "S4"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GPU smoke run (or its CPU twin with --device cpu)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default=os.path.join(PROJECT, "runs", "gpu-smoke"))
    parser.add_argument("--only", action="append", metavar="STEP", help="run these steps (and what they need)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):   # only a previous smoke run's folder is replaced
        if not os.path.exists(os.path.join(args.out, "smoke.json")) and os.listdir(args.out):
            print(f"gpu_smoke.py: error: --out {args.out} holds something other than a smoke run; "
                  "expected a new, empty or earlier smoke folder", file=sys.stderr)
            return 2
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    engine.write_json(os.path.join(args.out, "smoke.json"), {"status": "running"})   # marks the folder as ours
    smoke = Smoke(args.device, os.path.abspath(args.out))
    wanted = set(args.only or [s[0] for s in STEPS])
    while any(NEEDS.get(s) and NEEDS[s] not in wanted for s in wanted):
        wanted |= {NEEDS[s] for s in wanted if s in NEEDS}
    wanted.add("S0")
    results, t_start = [], time.time()
    for step, name, fn in STEPS:
        if step not in wanted:
            continue
        t0 = time.time()
        needed = NEEDS.get(step)
        if needed and next(r for r in results if r["step"] == needed)["status"] != "PASS":
            status, detail = "SKIP", f"{needed} did not pass"
        else:
            try:
                status, detail = "PASS", fn(smoke)
            except Skip as reason:
                status, detail = "SKIP", str(reason)
            except Exception as error:
                status, detail = "FAIL", f"{type(error).__name__}: {error}"
                with open(os.path.join(smoke.out, f"{step}.traceback.txt"), "w") as f:
                    f.write(traceback.format_exc())
        results.append({"step": step, "name": name, "status": status, "seconds": round(time.time() - t0, 1),
                        "detail": detail})
        print(f"{step:>3} {status:4} {results[-1]['seconds']:6.1f} s  {name}: {detail}", flush=True)
    dist.shutdown()
    summary = {"device": args.device, "seconds": round(time.time() - t_start, 1), "steps": results,
               "environment": engine.read_json(os.path.join(smoke.out, "environment.json"))
               if os.path.exists(os.path.join(smoke.out, "environment.json")) else None,
               "counts": {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "SKIP")}}
    engine.write_json(os.path.join(smoke.out, "smoke.json"), summary)
    table = ["| step | what | result | s | detail |", "|---|---|---|---|---|"]
    table += [f"| {r['step']} | {r['name']} | {r['status']} | {r['seconds']} | {r['detail']} |" for r in results]
    with open(os.path.join(smoke.out, "smoke.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"{summary['counts']} in {summary['seconds']} s; wrote {os.path.join(smoke.out, 'smoke.json')}")
    return 1 if summary["counts"]["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
