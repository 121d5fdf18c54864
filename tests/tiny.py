"""Small real datasets and stage runs for the tests (built once per test session)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One intra-op thread per stage process: several torch processes share 2 cores here, and with the
# default thread count each step is several times slower from oversubscription.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
_built = {}


def fashion(tmp_path_factory, limit: int = 800) -> str:
    """The first `limit` Fashion-MNIST train/test images, prepared with 4 labels per class."""
    if limit not in _built:
        out = str(tmp_path_factory.mktemp(f"fashion{limit}") / "data")
        subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prepare.py"), "fashion-mnist",
                        "--out", out, "--labels-per-class", "4", "--val-size", "100", "--seed", "0",
                        "--limit", str(limit)], check=True, capture_output=True)
        _built[limit] = out
    return _built[limit]


def stage(name: str, *args: str, torchrun: int = 0, check: bool = True, script: str | None = None,
          **kw) -> subprocess.CompletedProcess:
    """Run launch/<name>.py, or `script` in its place (under torchrun with `torchrun` processes when > 0)."""
    script = script or os.path.join(ROOT, "launch", f"{name}.py")
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", script]
    else:
        cmd = [sys.executable, script]
    kw.setdefault("env", ENV)
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


# a pretraining run small enough for seconds on CPU
TINY_PRETRAIN = ["model.width=8", "barlow.projector=[32,32]", "train.batch_size=16", "train.precision=fp32",
                 "data.backend=torch", "data.workers=0", "knn.every_epochs=0", "run.log_every=1"]


def kill_after_checkpoint(name: str, args: list, run_dir, min_step: int) -> int:
    """Start launch/<name>.py, SIGKILL it once its checkpoint holds step >= min_step; returns that step."""
    import signal
    import time

    from trainer.runtime import checkpoint
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", f"{name}.py"), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(ckpt) and checkpoint.load(ckpt)["step"] >= min_step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"{name} ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return checkpoint.load(ckpt)["step"]


def pretrained_backbone(tmp_path_factory, data: str) -> str:
    """A tiny pretrained backbone.pt (a few Barlow Twins steps) for the later stages' tests."""
    if "backbone" not in _built:
        out = tmp_path_factory.mktemp("pretrained")
        stage("pretrain", "--config", os.path.join(ROOT, "configs/demo/pretrain.yaml"), f"data.root={data}",
              f"run.dir={out}", *TINY_PRETRAIN, "train.max_steps=3")
        _built["backbone"] = str(out / "backbone.pt")
    return _built["backbone"]


TINY_FINETUNE = ["model.width=8", "train.batch_size=8", "train.precision=fp32", "data.backend=torch",
                 "data.workers=0", "run.log_every=1", "finetune.eval_every=1"]


def initial_backbone(config_path: str, *overrides) -> dict:
    """The backbone pretrain.py starts from: same config, same seed, same constructor."""
    from trainer.runtime import config, engine
    from trainer.runtime.config import PretrainConfig
    from trainer.runtime.models import build_backbone
    cfg = config.load(PretrainConfig, config_path, list(overrides))
    engine.seed_everything(cfg.run.seed)
    return build_backbone(cfg.model.backbone, cfg.model.small_stem, cfg.model.width).state_dict()


def assert_same_weights(a: dict, b: dict, atol: float, rtol: float = 0.0):
    """Two state_dicts with the same keys whose tensors agree within atol (+ rtol), compared in float64."""
    import torch
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=rtol, atol=atol, msg=k)


def assert_trained_alike(one: dict, two: dict, init: dict, atol: float = 1e-3, share: float = 0.05):
    """Two runs' weights agree per tensor within min(atol, `share` of how far training moved it),
    so tensors that training barely moves are still compared meaningfully. The default `share` sits
    between the gap that channels-last kernels leave by reordering float sums by batch size and the far
    larger one that local instead of synchronised BatchNorm on 2 ranks gives (figures: docs/results.md,
    run-to-run agreement)."""
    import torch
    assert one.keys() == two.keys() == init.keys()
    for k in one:
        if not one[k].is_floating_point():   # BatchNorm step counters
            assert torch.equal(one[k], two[k]), k
            continue
        moved = (one[k] - init[k]).abs().max().item()
        gap = (one[k] - two[k]).abs().max().item()
        assert moved > 0 and gap <= min(atol, share * moved), f"{k}: runs differ by {gap}, training moved {moved}"


# the inference stages (evaluate, active) over a width-8 model, small enough for seconds on CPU
TINY_INFERENCE = ["data.backend=torch", "data.workers=0", "inference.batch_size=64"]


def save_backbone(backbone, path):
    """A backbone.pt as pretrain writes it: the plain state_dict plus backbone.json beside it."""
    import json

    import torch
    torch.save(backbone.state_dict(), path)
    with open(os.path.join(os.path.dirname(path), "backbone.json"), "w") as f:
        json.dump({"backbone": "small", "small_stem": False, "width": backbone.stem[0].out_channels}, f)


def pixels(paths, size):
    """The evaluation view, built here with torchvision's functional ops: shorter side to `size`, centre crop."""
    import torch
    import torchvision.transforms.functional as TF

    from data.datasets import load_image

    def view(path):
        image = TF.resize(load_image(path), size)
        x = TF.to_tensor(TF.center_crop(image, size))
        return TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return torch.stack([view(p) for p in paths])


def tiny_classifier(data, path, seed=0):
    """A random width-8 backbone with a nearest-class-mean head on the labeled images' standardised features:
    a quick classifier whose predictions depend on the image (and on its scale), saved as model.pt."""
    import torch

    from data.datasets import read_classes, read_split
    from trainer.runtime.models import Classifier, build_backbone, save_classifier
    torch.manual_seed(seed)
    model = Classifier(build_backbone("small", width=8), 10).eval()
    labeled = read_split(data, "labeled")
    with torch.no_grad():
        features = model.backbone(pixels(labeled.paths, 28))
        mean, std = features.mean(0), features.std(0) + 1e-6
        standardised = (features - mean) / std
        means = torch.stack([standardised[torch.from_numpy(labeled.labels == c)].mean(0) for c in range(10)])
        model.head.weight.copy_(means / std)
        model.head.bias.copy_(-(mean / std) @ means.T)
    save_classifier(model, {"backbone": "small", "small_stem": False, "width": 8, "num_classes": 10},
                    read_classes(data), str(path))
    return model


def other_dataset(data, folder, classes) -> str:
    """`data` under other class names (`classes`, as many): every file linked but classes.txt, written anew.
    A model trained on `data` must not label it."""
    os.makedirs(folder)
    for name in os.listdir(data):
        if name != "classes.txt":
            os.symlink(os.path.join(data, name), os.path.join(folder, name))
    with open(os.path.join(folder, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{name}\n" for name in classes))
    return str(folder)


def without_class_names(model_pt, path) -> str:
    """`model_pt` as semiscale saved it before model.pt kept the class names: arch and weights only."""
    import torch
    state = torch.load(model_pt, weights_only=True)
    torch.save({"arch": state["arch"], "model": state["model"]}, path)
    return str(path)
