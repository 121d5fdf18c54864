"""GPU smoke run: every path that behaves differently on CUDA, on one GPU, in minutes, with no install
step and no network. The same script on the CPU (`--device cpu`: gloo, torch loaders) runs in `make test`.

    python tests/gpu_smoke.py [--device cuda|cpu] [--out runs/gpu-smoke]      # = make gpu-smoke [DEVICE=cpu]
    python tests/gpu_smoke.py --make-bundle gpu-bundle                         # = make gpu-bundle (network)

Assumes only torch, torchvision, numpy and pillow. What else its path imports (BUNDLED: PyYAML, tqdm,
submitit, faiss-cpu and what they need) it installs, where missing, offline from the wheels of the
bundle (`make gpu-bundle`, git-ignored, at most 60 MiB so that it travels with the checkout) into a
temporary folder, then runs itself again with that folder on PYTHONPATH. A step that needs DALI, faiss,
submitit or apex says SKIP with the reason when that piece is missing; a module of semiscale or a
dependency that does not import is S0's FAIL line naming it (traceback in OUT/S0.traceback.txt), never a
traceback before the table. Data is generated on the spot. Writes OUT/smoke.json and OUT/smoke.md (a
PASS / FAIL / SKIP table); exit status 1 on any FAIL.

torch 2.11 (the GPU machines' build) runs its path: checked by reading trainer/, data/ and launch/ for
APIs newer than it. torch.amp.GradScaler(device) and torch.autocast (2.3+), init_process_group's device_id
(2.3+), torch.distributed._functional_collectives, torch.load(weights_only=True) (always passed, so the
2.6 default change does not matter), torch.onnx.export(dynamo=False) (2.5+); DDP keeps
broadcast_buffers=False (deprecated in 2.14 for forward_sync_buffers, which 2.11 lacks); no torch.accelerator,
torch.compile/torch.compiler, torch.nn.attention, DataLoader(in_order=...) or nn.Buffer.

Steps (docs/gpu.md says what each one catches):
  S0 environment          S1 data (prepare)            S2 collectives in a one-rank group
  S3 device and numerics  S3s SyncBatchNorm kernels, fp16/bf16 channels-last
  S4 every stage end to end under torchrun --nproc_per_node 1 (a real group: NCCL, or gloo on the CPU)
  S4f its faiss parts (SKIP without faiss)            S4v FlexMatch/FreeMatch/SoftMatch, precision=auto
  S5 DALI on the device (nvJPEG on 2x JPEGs)          S6 faiss on the GPU
  S7 apex LARC            S8 benchmarks                S9 Slurm script
  S10 pseudolabel, 2 gloo ranks                       S11 two GPUs under torchrun
  S12 paper-shape throughput, memory and MFU
"""
import os
import sys

import argparse
import copy
import importlib.util
import json
import platform
import random
import shutil
import signal
import subprocess
import tempfile
import time
import traceback

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT)   # semiscale from this checkout, installed or not

try:   # what fails to import here is S0's FAIL line: the table prints whatever the machine lacks
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
    IMPORT_FAILURE = None
except Exception as error:   # ImportError, or a module that breaks on this torch
    IMPORT_FAILURE = error

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


# ---------------------------------------------------------------- the bundle: what a bare machine lacks

# module -> the distribution whose wheel brings it: what the smoke's path imports beyond torch, torchvision,
# numpy and pillow (submitit needs cloudpickle and typing_extensions; faiss-cpu needs packaging)
BUNDLED = {"yaml": "pyyaml", "tqdm": "tqdm", "submitit": "submitit", "cloudpickle": "cloudpickle",
           "typing_extensions": "typing-extensions", "faiss": "faiss-cpu", "packaging": "packaging"}
GPU_PYTHON = "3.12"   # the GPU machines' python3; the bundle also holds wheels for the Python that builds it
GPU_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64")
BUNDLE_MIB = 60   # it travels with the checkout, and a copy to a GPU machine holds at most 64 MiB
BUNDLE_REPORT = "SEMISCALE_SMOKE_BUNDLE"   # the rerun's environment: what the bundle installed, and where


def wheels(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".whl")) if os.path.isdir(folder) else []


def make_bundle(folder: str, gpu_python: str) -> int:
    """Download BUNDLED's wheels into `folder` (this needs the network; installing them does not), compiled
    ones for `gpu_python` on x86-64 Linux and for this Python; the folder is replaced only by a complete one."""
    if os.path.exists(folder) and len(wheels(folder)) != len(os.listdir(folder)):
        print(f"gpu_smoke.py: error: --make-bundle {folder} holds files other than wheels; expected a new folder "
              "or an earlier bundle", file=sys.stderr)
        return 2
    partial = folder.rstrip(os.sep) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", partial]
    targets = [["--python-version", gpu_python, "--implementation", "cp", *(f"--platform={p}" for p in GPU_PLATFORMS)]]
    if f"{sys.version_info.major}.{sys.version_info.minor}" != gpu_python:
        targets.append([])   # this Python's own wheels: the bare-venv test installs from the same folder
    for target in targets:
        if subprocess.run([*download, *target, *BUNDLED.values()]).returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            if wheels(folder):   # offline, say: the earlier bundle still serves
                print(f"gpu_smoke.py: warning: pip download failed; {folder} keeps its earlier wheels", file=sys.stderr)
                return 0
            return 1
    mib = sum(os.path.getsize(os.path.join(partial, f)) for f in wheels(partial)) / 2**20
    if mib > BUNDLE_MIB:
        shutil.rmtree(partial)
        print(f"gpu_smoke.py: error: the bundle's wheels take {mib:.1f} MiB; expected at most {BUNDLE_MIB}",
              file=sys.stderr)
        return 1
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(partial, folder)
    print(f"{folder}: {len(wheels(folder))} wheels, {mib:.1f} MiB (at most {BUNDLE_MIB}): {', '.join(wheels(folder))}")
    return 0


def install_missing(folder: str, site: str) -> dict:
    """Install into `site`, offline, the bundle's wheel of each BUNDLED distribution whose module this Python
    lacks; one at a time, so that one without a wheel for this Python leaves the others installed."""
    report = {"site": site, "installed": [], "failed": {}}
    for module, name in BUNDLED.items():
        if importlib.util.find_spec(module) is not None:
            continue
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--no-index", "--no-deps",
                               "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--find-links", folder,
                               "--target", site, name], capture_output=True, text=True,
                              env={**os.environ, "PIP_CONFIG_FILE": os.devnull})   # the bundle alone, whatever pip.conf says
        if proc.returncode == 0:
            report["installed"].append(name)
        else:
            report["failed"][name] = tail(proc.stderr or proc.stdout, 1)
    return report


def rerun_with_bundle(folder: str, argv: list[str]) -> int:
    """The smoke again, in a process whose PYTHONPATH (and so its stages') holds what the bundle installed into
    a temporary folder; the folder goes when the run ends."""
    site = tempfile.mkdtemp(prefix="semiscale-bundle-")
    try:
        report = install_missing(folder, site)
        print(f"bundle {folder}: installed {', '.join(report['installed']) or 'nothing'}"
              + "".join(f"; {name} did not install: {why}" for name, why in report["failed"].items()), flush=True)
        env = {**os.environ, BUNDLE_REPORT: json.dumps(report),
               "PYTHONPATH": os.pathsep.join([site, *filter(None, [os.environ.get("PYTHONPATH")])])}
        return subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env).returncode
    finally:
        shutil.rmtree(site, ignore_errors=True)


def import_failure(error: Exception, folder: str, bundle: dict | None) -> str:
    """S0's FAIL line: the exception, the line of semiscale that imported the module, and why the bundle did
    not bring it."""
    ours = [f for f in traceback.extract_tb(error.__traceback__) if f.filename.startswith(PROJECT + os.sep)]
    where = f" (at {os.path.relpath(ours[-1].filename, PROJECT)}:{ours[-1].lineno})" if ours else ""
    name = BUNDLED.get((getattr(error, "name", None) or "").split(".")[0])
    if name and bundle and name in bundle["failed"]:
        return f"{type(error).__name__}: {error}{where}; the bundle's {name} did not install: {bundle['failed'][name]}"
    if name and not wheels(folder):
        return f"{type(error).__name__}: {error}{where}; no bundle at {folder} to install {name} from (make gpu-bundle)"
    return f"{type(error).__name__}: {error}{where}"


def write_json(path: str, obj):
    with open(path, "w") as f:   # the standard library's: the table is written when semiscale does not import
        json.dump(obj, f, indent=2)


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
            stderr, agent = proc.stderr, proc.stderr.find("torch/distributed/elastic")
            if agent >= 0:   # under torchrun: the worker's last lines, before the agent's report of its failure
                stderr = stderr[:stderr.rfind("\n", 0, agent) + 1]
            raise AssertionError(f"{script}.py exited {proc.returncode}: {tail(stderr)}")
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
                        "pseudo.labeled_epochs=1", "inference.batch_size=64", inference, *pseudolabel_scorer(smoke),
                        f"pseudo.finetune_overrides=[{','.join(finetune + [f'data.image_size={SIZE}'])}]"],
        "fixmatch": ["train.batch_size=8", "fixmatch.mu=2", "train.max_steps=6", "fixmatch.bn_batches=2", train],
        "active": ["active.clusters=2", "active.budget=4", "active.oracle=true", "inference.batch_size=64"],
        "evaluate_knn": ["inference.batch_size=64"],
        "evaluate_fixmatch": ["evaluate.scales=[32,40]", "evaluate.tta=val", "inference.batch_size=64", inference],
        # chunks of 50 rows: a resumable chunk's gather and the merge run more than once
        "predict": ["predict.chunk_size=50", "inference.batch_size=64", inference],
    }


FAISS_STEPS = ("active", "evaluate_knn")   # k-means and the kNN search need faiss (S4f runs them)


def pseudolabel_scorer(smoke) -> list[str]:
    """The demo's pseudolabel scorer, label propagation, needs faiss: without it the classifier's scores, so
    that the rest of the stage step runs (S4f says SKIP for propagation)."""
    return [] if smoke.has_faiss else ["pseudo.scorer=classifier"]


def joined_group(smoke, proc: subprocess.CompletedProcess, what: str):
    """`what` ran in a real process group of one rank (trainer.dist.init's line), on the backend that eight
    ranks would use: its collectives, DDP and synchronised BatchNorm took the paths they take at scale."""
    backend = "nccl" if smoke.cuda else "gloo"
    check(f"[dist] {backend} process group of 1 rank(s)" in proc.stdout,
          f"{what} joined no {backend} process group of 1 rank: {tail(proc.stdout, 2)}")


def run_recipe_steps(smoke, names) -> dict[str, subprocess.CompletedProcess]:
    """The pipeline's steps among `names` with smoke_steps' settings, in the registry's order and wiring, each
    under `torchrun --nproc_per_node 1` (a group of one rank). The wiring's final model is fixmatch's: the
    smoke runs no FixMatch after active learning."""
    settings, procs = smoke_steps(smoke), {}
    for step in stages.RECIPE:
        if step.name in names:
            procs[step.name] = smoke.stage(step.stage, smoke.dir(step.name),
                                           *stages.wired_inputs(step, smoke.runs, active_learning=False),
                                           *settings[step.name], nproc=1)
            check(os.path.exists(os.path.join(smoke.dir(step.name), step.done)), f"{step.name} wrote no {step.done}")
            joined_group(smoke, procs[step.name], step.name)
    return procs


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
    from trainer.runtime.predict import accuracy, embed, whole_top_k, write_predictions
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
    check(whole_top_k(out_dir)[0].shape == (len(val), 2), "write_predictions")
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
        # GradScaler starts at 2**16, where this tiny net's fp16 gradients (they grow as scale / batch) overflow
        # and the step is skipped with inf gradients: step until the scale settles (a step that does not lower
        # it was taken; a disabled scaler's stays 1), then check that step's gradients and update
        for settled_after in range(1, 25):
            before, scale = [p.detach().clone() for p in model.parameters()], scaler.get_scale()
            with amp.autocast(smoke.precision, rt.device):
                loss = ddp(*views)
            amp.step_optimizer(loss, opt, scaler, settled_after - 1)
            if scaler.get_scale() >= scale:
                break
        check(scaler.get_scale() >= scale, f"{settled_after} {smoke.precision} steps overflowed, down to scale "
                                           f"{scaler.get_scale()}")
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        check(not missing, f"no finite gradient on {missing[:3]} at scale {scale}")
        check(any(not torch.equal(a, p) for a, p in zip(before, model.parameters())),
              f"the step taken at scale {scale} left every weight as it was")
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
    return (f"{sync_type.__name__}, channels-last, DDP; {settled_after} {smoke.precision} LARS step(s), the last "
            f"taken at scale {scale:g} with finite gradients; correlation fp32; "
            f"scaled step = fp32 step (gap {gap:.1e}); EMA on {rt.device}; checkpoint CPU round trip")


# the largest gap from fp32 BatchNorm allowed, as a fraction of the largest fp32 value: about 5x what rounding
# the input, the output's gradient and the results to each precision costs (measured in fp32 on the CPU)
SYNC_BN_TOLERANCE = {"fp16": 4e-3, "bf16": 2e-2}


def batchnorm_gaps(normalise, dtype, device) -> dict[str, float]:
    """How far a training-mode BatchNorm on channels-last `dtype` input, `normalise(x, weight, bias,
    running_mean, running_var, eps, momentum)` with fp32 parameters (as under autocast), is from fp32
    BatchNorm: output, gradients and running statistics, each over its largest fp32 value."""
    torch.manual_seed(0)
    channels = 32
    x = torch.randn(16, channels, 12, 12, device=device) * 3 + 1
    weight, bias = torch.rand(channels, device=device) + 0.5, torch.randn(channels, device=device)
    grad = torch.randn_like(x)

    def run(forward, x, grad) -> dict:
        x, w, b = x.detach().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
        mean, var = torch.zeros(channels, device=device), torch.ones(channels, device=device)
        y = forward(x, w, b, mean, var)
        y.backward(grad)
        return {"output": y, "input gradient": x.grad, "weight gradient": w.grad, "bias gradient": b.grad,
                "running mean": mean, "running var": var}

    reference = run(lambda x, w, b, mean, var: torch.nn.functional.batch_norm(x, mean, var, w, b, True, 0.1, 1e-5),
                    x, grad)
    got = run(lambda x, w, b, mean, var: normalise(x, w, b, mean, var, 1e-5, 0.1),
              *(t.to(dtype).contiguous(memory_format=torch.channels_last) for t in (x, grad)))
    check(got["output"].dtype == dtype, f"{dtype} input gave a {got['output'].dtype} output")
    return {name: ((got[name].float() - value).abs().max() / value.abs().max()).item()
            for name, value in reference.items()}


def s3s_sync_batchnorm(smoke: Smoke) -> str:
    """torch's synchronised BatchNorm kernels in fp16 and bf16 on channels-last input, against fp32 BatchNorm.
    SyncBatchNorm itself falls back to plain BatchNorm in a group of one rank, so its autograd function is
    called directly in a one-rank NCCL group: the statistics' all-gather and the backward's all-reduce run."""
    if not smoke.cuda:
        raise Skip("torch's SyncBatchNorm kernels take CUDA tensors only (the CPU's GlobalBatchNorm runs in S3, S4)")
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction
    dist.shutdown()   # a group a failed S2 or S3 left behind
    rt = one_rank_group(smoke)
    try:
        gaps = {precision: batchnorm_gaps(
                    lambda *args: SyncBatchNormFunction.apply(*args, torch.distributed.group.WORLD, 1), dtype, rt.device)
                for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16))}
    finally:
        dist.shutdown()
    for precision, gap in gaps.items():
        worst = max(gap, key=gap.get)
        check(gap[worst] <= SYNC_BN_TOLERANCE[precision], f"{precision}: the {worst} is off by {gap[worst]:.1e} of its "
                                                          f"largest value (at most {SYNC_BN_TOLERANCE[precision]:g})")
    return ("output, gradients and running statistics of channels-last " + ", ".join(
        f"{p} within {max(g.values()):.1e} (at most {SYNC_BN_TOLERANCE[p]:g})" for p, g in gaps.items())
            + " of fp32 BatchNorm")


# ---------------------------------------------------------------- S4: stages, each in its own process

def kill_after_checkpoint(smoke: Smoke, args: list, run_dir: str, min_step: int) -> int:
    """pretrain under `torchrun --nproc_per_node 1`, SIGKILLed with its worker (a node lost) once its checkpoint
    holds step >= min_step; that step."""
    proc = subprocess.Popen(smoke.command("pretrain", *args, nproc=1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=smoke.env, cwd=PROJECT, start_new_session=True)
    path, deadline = os.path.join(run_dir, "checkpoint.pt"), time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(path) and checkpoint.load(path)["step"] >= min_step:
                break
            time.sleep(0.02)
        check(proc.poll() is None, "pretrain ended before it could be killed")
    finally:   # the agent and its worker, which torchrun starts in a session of its own (with its loader's
        # workers): a worker left behind would hold the run dir
        workers = children(proc.pid)
        for group in (proc.pid, *workers):
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:   # ended already
                pass
        proc.wait()
    return checkpoint.load(path)["step"]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:   # "pid (name) state ppid ...": the name may hold spaces
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, IndexError, ValueError):   # ended meanwhile
            pass
    return found


def s4_stages(smoke: Smoke) -> str:
    d = smoke.dir
    knn = [f"knn.every_epochs={1 if smoke.has_faiss else 0}"]
    pretrain = ["--config", os.path.join(CONFIGS, "pretrain.yaml"), f"run.dir={d('pretrain')}",
                f"data.root={smoke.data}", f"data.backend={smoke.backend}", f"run.device={smoke.device}",
                f"data.image_size={SIZE}", "data.workers=2", *TINY_MODEL, "barlow.projector=[64,64]",
                "train.batch_size=32", f"train.precision={smoke.precision}", "train.epochs=100", "train.max_steps=120",
                "run.checkpoint_every=2", "run.log_every=1", *knn]
    killed_at = kill_after_checkpoint(smoke, pretrain, d("pretrain"), 4)
    resumed = smoke.run("pretrain", *pretrain, nproc=1)
    joined_group(smoke, resumed, "pretrain")
    check(f"resumed from {d('pretrain')}/checkpoint.pt at step {killed_at}" in resumed.stdout + resumed.stderr,
          "pretrain did not resume from its checkpoint")
    check(max(e.get("step", 0) for e in events(d("pretrain"))) == 120, "pretrain did not reach 120 steps")
    done = [f"every stage under torchrun --nproc_per_node 1 in a {'nccl' if smoke.cuda else 'gloo'} group",
            f"pretrain {smoke.precision} killed at step {killed_at} and resumed"]
    if smoke.cuda:
        joined_group(smoke, smoke.stage("pretrain", d("pretrain_bf16"), *TINY_MODEL, "barlow.projector=[64,64]",
                                        "train.batch_size=32", "train.precision=bf16", "train.max_steps=10", *knn,
                                        nproc=1), "pretrain bf16")
        done.append("pretrain bf16")
    loads_on_cpu = subprocess.run(
        [sys.executable, "-c", "import sys, torch; sd = torch.load(sys.argv[1], weights_only=True); "
                               "assert all(v.device.type == 'cpu' for v in sd.values()), 'device tensors'",
         os.path.join(d("pretrain"), "backbone.pt")],
        capture_output=True, text=True, env={**smoke.env, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    check(loads_on_cpu.returncode == 0, f"backbone.pt in a CPU-only process: {tail(loads_on_cpu.stderr)}")
    done.append("backbone.pt loads without a GPU")

    run_recipe_steps(smoke, [name for name in smoke_steps(smoke) if name not in FAISS_STEPS])
    finetune_val = engine.read_done(d("finetune"))["val_top1"]
    selection = engine.read_json(os.path.join(d("pseudolabel"), "selection.json"))
    check(len(selection["iterations"]) == 2, "pseudolabel did not run its iteration")
    check(any("val_top1_ema" in e for e in events(d("fixmatch"))), "fixmatch: no EMA val")
    done.append(f"finetune (val {finetune_val:.2f}), pseudolabel ({'propagation' if smoke.has_faiss else 'classifier'} "
                "scores), fixmatch")
    scores = engine.read_json(os.path.join(d("evaluate_fixmatch"), "eval.json"))["splits"]
    check(scores["val"]["images"] == 40 and scores["test"]["images"] == 40, f"evaluate counted {scores['val']['images']}")
    done.append(f"evaluate TTA (test {scores['test']['tta']['top1']:.2f})")
    summary = engine.read_json(os.path.join(d("predict"), "summary.json"))
    unlabeled = sum(1 for _ in open(os.path.join(smoke.data, "unlabeled.csv"))) - 1
    rows = sum(1 for _ in open(os.path.join(d("predict"), "predictions.csv"))) - 1
    check(summary["labeled"] == rows == unlabeled and summary["ranks"] == 1,
          f"predict labeled {summary['labeled']} images in {rows} rows on {summary['ranks']} rank(s), expected the "
          f"{unlabeled} unlabeled images on 1")
    done.append(f"predict ({rows} rows at scales {summary['scales']} from evaluate's choice)")
    return "; ".join(done)


def s4f_faiss_steps(smoke: Smoke) -> str:
    """The stage step's parts that need faiss: pseudolabel's label propagation (S4 ran it where faiss imports),
    active learning's k-means and the kNN evaluation. SKIP, not FAIL, without faiss: S4 then ran the
    classifier's scores, and the rest of the stages."""
    if not smoke.has_faiss:
        raise Skip("faiss not installed: label propagation (S4's pseudolabel used pseudo.scorer=classifier), "
                   "active learning's k-means, the kNN evaluation and pretrain's kNN monitor not run")
    propagated = os.path.join(smoke.dir("pseudolabel"), "iter1", "predictions", "propagation", "topk_prob.npy")
    check(os.path.exists(propagated), f"S4's pseudolabel wrote no {propagated}: label propagation did not run")
    run_recipe_steps(smoke, FAISS_STEPS)
    queries = sum(1 for _ in open(os.path.join(smoke.dir("active"), "queries.csv"))) - 1
    check(queries == 4, f"active learning asked {queries} queries, expected active.budget=4")
    knn = engine.read_json(os.path.join(smoke.dir("evaluate_knn"), "eval.json"))["knn"]
    check(0 <= knn["val"] <= 1, f"kNN val top-1 {knn['val']}")
    return f"label propagation in S4's pseudolabel; active learning (4 queries); kNN evaluation (val {knn['val']:.2f})"


def said_precision(smoke: Smoke, output: str, what: str) -> str:
    """What train.precision=auto chose, as the stage's opening line says it, checked: on a GPU bf16 where it
    computes in bf16 natively (compute capability 8.0 and later), else fp16; on a CPU the faster of the
    two it measured."""
    import re
    said = re.search(r"precision (auto -> )?(fp32|bf16|fp16)(?: \(([^)]*)\))?", output)
    check(said is not None, f"{what}: its output names no precision")
    chosen = said.group(2)
    if smoke.cuda:
        expected = "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"
        check(chosen == expected, f"{what}: auto chose {chosen} on {torch.cuda.get_device_name()}, expected {expected}")
        return chosen
    measured = {name: float(ms) for name, ms in re.findall(r"(\w+) ([\d.]+) ms/step", said.group(3) or "")}
    check(said.group(1) is not None and set(measured) == {"fp32", "bf16"},
          f"{what}: auto on the CPU said no measurement of fp32 and bf16: {said.group(0)!r}")
    check(measured[chosen] == min(measured.values()), f"{what}: auto chose {chosen}, measured {measured} ms/step")
    return f"{chosen}, measured " + ", ".join(f"{name} {ms:g} ms/step" for name, ms in measured.items())


VARIANTS = ("flexmatch", "freematch", "softmatch")


def s4v_variants(smoke: Smoke) -> str:
    """FlexMatch, FreeMatch and SoftMatch with distribution alignment, 3 steps each from S4's models under
    `torchrun --nproc_per_node 1` (their running statistics all-reduced in the group), at train.precision=auto."""
    fixmatch = next(step for step in stages.RECIPE if step.name == "fixmatch")
    chosen = {}
    for variant in VARIANTS:
        run_dir = smoke.dir(f"fixmatch_{variant}")
        proc = smoke.stage("fixmatch", run_dir, *stages.wired_inputs(fixmatch, smoke.runs, active_learning=False),
                           "train.batch_size=8", "fixmatch.mu=2", "train.max_steps=3", "fixmatch.bn_batches=0",
                           "run.checkpoint_every=1", f"fixmatch.variant={variant}",
                           "fixmatch.distribution_alignment=true", "train.precision=auto", nproc=1)
        joined_group(smoke, proc, variant)
        check(f"{variant} + distribution alignment" in proc.stdout, f"{variant}: its opening line names no "
                                                                    f"{variant} + distribution alignment")
        chosen[variant] = said_precision(smoke, proc.stdout, variant)
        epoch = [e for e in events(run_dir) if "mask_rate" in e]
        check(bool(epoch) and 0 <= epoch[-1]["mask_rate"] <= 1 and np.isfinite(epoch[-1]["loss"]),
              f"{variant}: epoch summary {epoch[-1] if epoch else None}")
        state = checkpoint.load(os.path.join(run_dir, "checkpoint.pt"))["state"]["pseudo_labeler"]
        p_model = state["alignment"]["p_model"]
        check(bool(torch.isfinite(p_model).all()) and abs(p_model.sum().item() - 1) < 1e-6
              and not torch.equal(p_model, torch.full_like(p_model, 1 / len(p_model))),
              f"{variant}: distribution alignment's running class distribution {p_model.tolist()}")
        check(all(bool(torch.isfinite(v.double()).all()) for k, v in state.items() if k != "alignment"),
              f"{variant}: statistics not finite: {state}")
    return ("with distribution alignment, its class distribution moved off uniform and every statistic finite; "
            "precision auto -> " + "; ".join(f"{variant} {how}" for variant, how in chosen.items()))


# ---------------------------------------------------------------- S5-S11: optional pieces and scale

def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def gpu_used_mib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


# 8-bit levels: nvJPEG and the CPU's libjpeg-turbo differ in their IDCT and chroma upsampling by a few levels
# at sharp coloured edges, which the 2x downscale averages; a swapped channel or a missed or shifted resize
# moves the mean by tens of levels
JPEG_MEAN_LEVELS, JPEG_MAX_LEVELS = 2.0, 40.0


def nvjpeg_against_cpu(smoke: Smoke, device) -> str:
    """DALI's GPU decode (nvJPEG) and resize against its CPU decode and resize, on JPEGs twice the view's size."""
    from data.datasets import Split
    from data.loaders import build_loader
    from data.transforms import IMAGENET_STD
    folder, rng = os.path.join(smoke.out, "jpeg_2x"), random.Random(1)
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{i:02d}.jpg") for i in range(16)]
    for i, path in enumerate(paths):
        Image.fromarray(synthetic_image(i % CLASSES, rng)).resize((2 * SIZE, 2 * SIZE), Image.Resampling.BICUBIC).save(
            path, quality=90)
    split = Split(folder, "jpeg_2x", paths, None, None)
    views = [next(build_loader(split, "eval", image_size=SIZE, global_batch=len(paths), shuffle=False, drop_last=False,
                               backend="dali", device=dev).epoch(0))["views"][0].cpu()
             for dev in (device, torch.device("cpu"))]
    check(views[0].shape == views[1].shape == (len(paths), 3, SIZE, SIZE),
          f"GPU and CPU views of {tuple(views[0].shape)} and {tuple(views[1].shape)}")
    levels = (views[0] - views[1]).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255   # normalised -> levels
    mean, worst = levels.mean().item(), levels.max().item()
    said = (f"nvJPEG vs CPU decode of {2 * SIZE} px JPEGs resized to {SIZE} px: {mean:.2f} levels on average, "
            f"{worst:.1f} at most (allowed {JPEG_MEAN_LEVELS:g}, {JPEG_MAX_LEVELS:g})")
    check(mean <= JPEG_MEAN_LEVELS and worst <= JPEG_MAX_LEVELS, said)
    return said


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
        notes.append(nvjpeg_against_cpu(smoke, device))
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
                        *pseudolabel_scorer(smoke), f"pseudo.model={smoke.dir('finetune')}/model.pt",
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


SMOKE_BUDGET_S = 480        # a GPU machine is lent for minutes: the whole smoke, steps after the bundle's install
PAPER_SHAPES_BUDGET_S = 60   # S12's timed steps stop here (each case after 3 at least), within the smoke's 8 minutes


def s12_paper_shapes(smoke: Smoke) -> str:
    """`bench.py --suite gpu` in this process: Barlow Twins at the largest batch that fits and FixMatch, at the
    paper's shapes on a GPU (tiny ones on the CPU); every figure in OUT/paper_shapes.json."""
    from launch.benches import gpu
    figures = gpu.measure(dist.init(smoke.device), quick=False, budget_s=PAPER_SHAPES_BUDGET_S)
    engine.write_json(os.path.join(smoke.out, "paper_shapes.json"), figures)

    def shown(value, unit=""):   # "n/a" on a CPU, "unknown" for a GPU without a listed peak
        return value if isinstance(value, str) else f"{value:.3g}{unit}"
    cases = [f"{name} batch {figures[f'{name}_batch']} {figures[f'{name}_img_s']:.0f} img/s, peak memory "
             f"{shown(figures[f'{name}_peak_memory_gib'], ' GiB')}, MFU {shown(figures[f'{name}_mfu'])}"
             for name in ("barlow_twins", "fixmatch")]
    return (f"{figures['device']}, {figures['shapes']} shapes: {'; '.join(cases)}; anchor, not measured: "
            f"{figures['anchor_v100_96px_img_s']:.0f} img/s per V100 at 96 px")


STEPS = [("S0", "environment", s0_environment), ("S1", "data", s1_data), ("S2", "collectives", s2_collectives),
         ("S3", "device and numerics", s3_numerics), ("S3s", "SyncBatchNorm kernels", s3s_sync_batchnorm),
         ("S4", "stages end to end", s4_stages), ("S4f", "faiss: propagation, k-means, kNN", s4f_faiss_steps),
         ("S4v", "FixMatch variants, precision auto", s4v_variants), ("S5", "DALI", s5_dali), ("S6", "faiss GPU", s6_faiss), ("S7", "apex LARC", s7_apex),
         ("S8", "benchmarks", s8_bench), ("S9", "Slurm script", s9_slurm),
         ("S10", "pseudolabel, 2 gloo ranks", s10_pseudolabel_two_ranks), ("S11", "two GPUs", s11_two_gpus),
         ("S12", "paper-shape throughput", s12_paper_shapes)]
NEEDS = {"S2": "S1", "S3": "S2", "S4": "S1", "S4f": "S4", "S4v": "S4", "S5": "S1", "S10": "S4", "S11": "S4"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GPU smoke run (or its CPU twin with --device cpu)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default=os.path.join(PROJECT, "runs", "gpu-smoke"))
    parser.add_argument("--only", action="append", metavar="STEP", help="run these steps (and what they need)")
    parser.add_argument("--bundle", default=os.path.join(PROJECT, "gpu-bundle"),
                        help="wheels to install offline what this Python lacks from (make gpu-bundle)")
    parser.add_argument("--make-bundle", metavar="FOLDER", help="download the bundle's wheels into FOLDER and exit")
    parser.add_argument("--bundle-python", default=GPU_PYTHON,
                        help="the Python version (X.Y) the bundle's compiled wheels are for, besides this one")
    args = parser.parse_args(argv)
    if args.make_bundle:
        return make_bundle(args.make_bundle, args.bundle_python)
    bundle = json.loads(os.environ.get(BUNDLE_REPORT, "null"))   # set: this is the rerun with the bundle
    if bundle is None and wheels(args.bundle) and any(importlib.util.find_spec(m) is None for m in BUNDLED):
        return rerun_with_bundle(args.bundle, sys.argv[1:] if argv is None else argv)
    if os.path.exists(args.out):   # only a previous smoke run's folder is replaced
        if not os.path.exists(os.path.join(args.out, "smoke.json")) and os.listdir(args.out):
            print(f"gpu_smoke.py: error: --out {args.out} holds something other than a smoke run; "
                  "expected a new, empty or earlier smoke folder", file=sys.stderr)
            return 2
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    write_json(os.path.join(args.out, "smoke.json"), {"status": "running"})   # marks the folder as ours
    smoke = Smoke(args.device, os.path.abspath(args.out))
    if IMPORT_FAILURE is not None:
        failure = import_failure(IMPORT_FAILURE, args.bundle, bundle)
        with open(os.path.join(smoke.out, "S0.traceback.txt"), "w") as f:
            f.write("".join(traceback.format_exception(IMPORT_FAILURE)))
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
        if IMPORT_FAILURE is not None:
            status, detail = ("FAIL", failure) if step == "S0" else ("SKIP", "the smoke's modules did not import (S0)")
        elif needed and next(r for r in results if r["step"] == needed)["status"] != "PASS":
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
    if IMPORT_FAILURE is None:
        dist.shutdown()
    environment = os.path.join(smoke.out, "environment.json")
    summary = {"device": args.device, "seconds": round(time.time() - t_start, 1), "budget_s": SMOKE_BUDGET_S, "steps": results,
               "environment": json.load(open(environment)) if os.path.exists(environment) else None,
               "bundle": bundle, "counts": {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "SKIP")}}
    write_json(os.path.join(smoke.out, "smoke.json"), summary)
    table = ["| step | what | result | s | detail |", "|---|---|---|---|---|"]
    table += [f"| {r['step']} | {r['name']} | {r['status']} | {r['seconds']} | {r['detail']} |" for r in results]
    with open(os.path.join(smoke.out, "smoke.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))
    over = (f"within its {SMOKE_BUDGET_S} s budget" if summary["seconds"] <= SMOKE_BUDGET_S
            else f"OVER its {SMOKE_BUDGET_S} s budget by {summary['seconds'] - SMOKE_BUDGET_S:.0f} s: docs/gpu.md's estimate is wrong")
    print(f"{summary['counts']} in {summary['seconds']} s ({over}); wrote {os.path.join(smoke.out, 'smoke.json')}")
    return 1 if summary["counts"]["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
