"""The second GPU review's cluster defects (docs/cluster.md), each shown on the CPU: a lock error other than
"held" (D2), rank 0's data backend (D3), label propagation's search shared by the ranks and its solve on every
core of rank 0 (D4), checkpoints that follow run.checkpoint_every (D5), the DALI scan's per-file cache (D6), bf16
only where native (D7), embeddings on rank 0 only (D8), no host sync per step for the finite-loss check (D9), one
DALI pipeline across epochs (D10)."""
import errno
import itertools
import json
import logging
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from multiproc import run_ranks
from tiny import ROOT, kill_after_checkpoint, pixels, stage
from data.datasets import read_split
from data.errors import InputError
from data.loaders import build_loader
from trainer.dist import Runtime
from trainer.runtime import amp, checkpoint, config, engine, rundir
from trainer.runtime.config import FinetuneConfig
from trainer.runtime.loop import BestModel, Loop


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """10 random 32 px PNGs (each row's pixels its own), every split listing all of them."""
    root = tmp_path_factory.mktemp("noise")
    os.makedirs(root / "images")
    (root / "classes.txt").write_text("a\nb\n")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{i % 2}\n")
    for name in ("labeled", "val", "test", "unlabeled"):
        (root / f"{name}.csv").write_text("path,label\n" + "".join(rows))
    return str(root)


# ---- D2: a filesystem without POSIX locks ----

def _lockf_failing(code):
    def lockf(*args):
        raise OSError(code, os.strerror(code))
    return lockf


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_lock_the_filesystem_cannot_take_warns_once_and_goes_on(tmp_path, monkeypatch, caplog, code):
    monkeypatch.setattr(rundir.fcntl, "lockf", _lockf_failing(code))
    with caplog.at_level(logging.WARNING, logger=rundir.__name__):
        lock = rundir.Lock(str(tmp_path))
    assert [r.getMessage() for r in caplog.records] == [
        f"run.dir={tmp_path}: cannot lock {tmp_path}/.lock ({os.strerror(code)}): going on without the guard "
        "against a second live run writing to it"]
    lock.release()


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.EACCES])
def test_a_lock_held_by_another_process_still_refuses(tmp_path, monkeypatch, code):
    monkeypatch.setattr(rundir.fcntl, "lockf", _lockf_failing(code))
    with pytest.raises(rundir.RunDirError, match="another live run is writing to it"):
        rundir.Lock(str(tmp_path))


# ---- D3, D4, D8: two gloo ranks ----

def _on_two_ranks(rank, root, pred_dir):
    """What each rank gets: the data backend when DALI imports on one rank only (either), embed's result,
    and the threads that label propagation's search (every rank) and solve (rank 0) ran on and those each
    rank had after it, from one thread each."""
    import faiss

    from trainer.algorithms import label_propagation
    from trainer.runtime.loading import data_backend
    from trainer.runtime.models import build_backbone
    from trainer.runtime.predict import embed

    auto = types.SimpleNamespace(data=types.SimpleNamespace(backend="auto"))
    got = {}
    for importer in (0, 1):   # the rank where nvidia.dali imports (a stand-in module); on the other it does not
        sys.modules["nvidia.dali"] = types.ModuleType("nvidia.dali") if rank == importer else None
        try:
            got[f"dali_on_{importer}"] = data_backend(auto)
        except InputError as e:
            got[f"dali_on_{importer}"] = f"refused: {e}"
    del sys.modules["nvidia.dali"]

    torch.manual_seed(0)
    backbone = build_backbone("small", width=8)
    split = read_split(root, "val")
    loader = build_loader(split, "eval", image_size=32, global_batch=4, rank=rank, world=2, shuffle=False,
                          drop_last=False, workers=0)
    got["embedded"] = embed(backbone, loader, Runtime(rank, rank, 2), len(split.paths))

    torch.set_num_threads(1)   # as torchrun's OMP_NUM_THREADS=1 leaves each rank
    faiss.omp_set_num_threads(1)
    search, solve = label_propagation._neighbours, label_propagation._conjugate_gradient

    def threads_of(step, run):
        def counted(*args):
            got[f"{step}_threads"] = torch.get_num_threads(), faiss.omp_get_max_threads()
            return run(*args)
        return counted
    label_propagation._neighbours = threads_of("search", search)
    label_propagation._conjugate_gradient = threads_of("solve", solve)
    label_propagation.write_scores(pred_dir, np.array([0, 0, 1, 1]), 2, "propagation", 2, 3, 0.99, 20, 3.0, None,
                                   os.path.join(pred_dir, "propagation"))
    got["threads_after"] = torch.get_num_threads(), faiss.omp_get_max_threads()
    return got


@pytest.fixture(scope="module")
def two_ranks(noise, tmp_path_factory):
    pytest.importorskip("faiss")
    pred_dir = tmp_path_factory.mktemp("predictions")
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:2] * 4
    points = lambda labels: (centres[labels] + rng.normal(size=(len(labels), 8))).astype(np.float32)  # noqa: E731
    np.save(pred_dir / "embeddings.npy", points(np.arange(20) % 2))
    os.makedirs(pred_dir / "labeled")
    np.save(pred_dir / "labeled" / "embeddings.npy", points(np.array([0, 0, 1, 1])))
    return run_ranks(_on_two_ranks, 2, noise, str(pred_dir)), str(pred_dir)


def test_every_rank_takes_rank_0s_data_backend(two_ranks):
    (first, second), _ = two_ranks
    # DALI imports on rank 0 only: rank 1 takes DALI too, and says in one line that it cannot
    assert first["dali_on_0"] == "dali"
    assert second["dali_on_0"].startswith("refused: data backend 'dali': nvidia.dali does not import")
    # on rank 1 only: both take torch
    assert first["dali_on_1"] == second["dali_on_1"] == "torch"


def test_embeddings_are_gathered_on_rank_0_only(two_ranks, noise):
    (first, second), _ = two_ranks
    torch.manual_seed(0)
    from trainer.runtime.models import build_backbone
    backbone = build_backbone("small", width=8).eval()
    with torch.no_grad():
        expected = backbone(pixels(read_split(noise, "val").paths, 32)).numpy()
    assert second["embedded"] is None
    np.testing.assert_allclose(first["embedded"], expected, rtol=0, atol=1e-5)


def test_the_ranks_share_the_cores_to_search_and_rank_0_solves_on_all_of_them(two_ranks):
    (first, second), pred_dir = two_ranks
    cores = len(os.sched_getaffinity(0))
    # both ranks search at once on this machine's cores: half each (one thread of a single core)
    assert first["search_threads"] == second["search_threads"] == (max(1, cores // 2),) * 2
    # rank 0 alone builds the graph and solves while rank 1 waits
    assert first["solve_threads"] == (cores, cores) and "solve_threads" not in second
    assert first["threads_after"] == second["threads_after"] == (1, 1)
    assert np.load(os.path.join(pred_dir, "propagation", "topk_class.npy")).shape == (20, 2)


# ---- D7: bf16 where the GPU has it ----

@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_auto_precision_takes_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, expected):
    gpu = Runtime(device=torch.device("cuda", 0))
    # V100 (7.0) and T4 (7.5) emulate bf16: torch's plain answer is yes
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))
    assert amp.resolve_precision("auto", None, (1,), gpu) == (expected, {})
    # a torch without the argument: the compute capability decides
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert amp.resolve_precision("auto", None, (1,), gpu) == (expected, {})


# ---- D5, D9, D10: the training loop ----

def run_of(run_dir, root, *overrides) -> engine.Run:
    """A real run dir (a finetune one) for a Loop driven by the test."""
    cfg = config.load(FinetuneConfig, None, [f"run.dir={run_dir}", f"data.root={root}", "finetune.backbone=random",
                                             *overrides])
    return engine.Run("finetune", cfg, Runtime())


def linear_loop(run, loader, total, **state):
    torch.manual_seed(0)
    model = torch.nn.Linear(3 * 32 * 32, 1)
    optimizer = torch.optim.SGD([{"params": model.parameters(), "base_lr": 1e-4}], lr=1e-4)
    loop = Loop(run, loader, optimizer, {"model": model, "optimizer": optimizer, **state}, total=total, warmup=0,
                images_per_step=2)
    return loop, model, optimizer


def train_step(model, optimizer, nan_at=None):
    scaler = amp.grad_scaler("fp32", torch.device("cpu"))

    def step(batch, index):
        x = batch["views"][0].flatten(1)
        loss = model(x).square().mean() * (float("nan") if index == nan_at else 1.0)
        amp.step_optimizer(loss, optimizer, scaler, index)
        return {"loss": loss}
    return step


def recording(monkeypatch, events):
    """Each checkpoint written as ("checkpoint", step, epoch, step in epoch), each end-of-epoch event logged
    as ("epoch", epoch), in order."""
    save, log = engine.Run.save_checkpoint, engine.Run.log

    def save_checkpoint(self, state, step, epoch, step_in_epoch, model):
        events.append(("checkpoint", step, epoch, step_in_epoch))
        return save(self, state, step, epoch, step_in_epoch, model)

    def log_event(self, **event):
        if "ended" in event:
            events.append(("epoch", event["epoch"]))
        return log(self, **event)
    monkeypatch.setattr(engine.Run, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(engine.Run, "log", log_event)


def test_checkpoints_follow_checkpoint_every_and_the_runs_end(noise, tmp_path, monkeypatch):
    events = []
    recording(monkeypatch, events)
    every, steps_per_epoch, epochs = 3, 5, 4   # 10 images, batch 2
    loader = build_loader(read_split(noise, "labeled"), "eval", image_size=32, global_batch=2, workers=0)
    assert loader.steps_per_epoch == steps_per_epoch
    run = run_of(tmp_path, noise, f"run.checkpoint_every={every}", "run.log_every=100")
    loop, model, optimizer = linear_loop(run, loader, epochs * steps_per_epoch)
    loop.run_epochs(train_step(model, optimizer), lambda epoch, step, img_s: {"ended": True})
    expected = []
    for step in range(1, epochs * steps_per_epoch + 1):
        if step % steps_per_epoch == 0:
            expected.append(("epoch", step // steps_per_epoch))
        if step % every == 0 or step == epochs * steps_per_epoch:
            # after the epoch's own work when due at its last step, which it then holds
            expected.append(("checkpoint", step, *divmod(step, steps_per_epoch)))
    assert events == expected
    assert checkpoint.load_checked(str(tmp_path / "checkpoint.pt"))["step"] == epochs * steps_per_epoch


FINETUNE = ["--config", os.path.join(ROOT, "configs", "demo", "finetune.yaml"), "finetune.backbone=random",
            "model.width=8", "train.batch_size=8", "train.precision=fp32", "data.backend=torch", "data.workers=0",
            "finetune.eval_every=1", "train.epochs=4", "run.checkpoint_every=7"]


def _epoch_results(run_dir) -> dict:
    """Each epoch's last logged val result (a resumed run logs again the epochs it redid)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        events = [json.loads(line) for line in f]
    return {e["epoch"]: e["val_top1"] for e in events if "val_top1" in e and "event" not in e}


def test_a_killed_finetune_resumes_to_the_uninterrupted_runs_results(data, tmp_path):
    """The real stage: 40 labeled images, batch 8, 5 steps per epoch; checkpoints at steps 7 and 14 (inside
    epochs 2 and 3, after epoch 1's val pass and best model) and 20 (the end). Killed once one holds step 7
    or later, it resumes to the uninterrupted run's val results per epoch, best epoch and weights."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    stage("finetune", *FINETUNE, f"data.root={data}", f"run.dir={straight}")
    killed_at = kill_after_checkpoint("finetune", [*FINETUNE, f"data.root={data}", f"run.dir={killed}"], killed, 7)
    assert killed_at in (7, 14, 20)
    stage("finetune", *FINETUNE, f"data.root={data}", f"run.dir={killed}")
    assert _epoch_results(killed) == _epoch_results(straight) and sorted(_epoch_results(straight)) == [1, 2, 3, 4]
    done = [engine.read_done(str(run)) for run in (straight, killed)]
    assert (done[1]["best_epoch"], done[1]["val_top1"]) == (done[0]["best_epoch"], done[0]["val_top1"])
    a, b = (checkpoint.load(str(run / "model.pt"))["model"] for run in (straight, killed))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


class Crash(Exception):
    pass


def test_a_run_resumed_from_an_earlier_epochs_checkpoint_ends_that_epoch_again(noise, tmp_path):
    """4 epochs of 5 steps, checkpoints at steps 7 and 14 (and 20): a crash at step 12, after epoch 2's end
    work (step 10: a score, the best model) was done and logged. The resumed run starts at step 7, inside
    epoch 2, with epoch 1's best model; it ends epoch 2 again and finishes as the uninterrupted run does."""
    def train(run_dir, crash_at=None):
        loader = build_loader(read_split(noise, "labeled"), "eval", image_size=32, global_batch=2, workers=0)
        run = run_of(run_dir, noise, "run.checkpoint_every=7", "run.log_every=100")
        best = BestModel()
        loop, model, optimizer = linear_loop(run, loader, 20, best=best)
        resumed = loop.resume() and (loop.step, loop.epoch, loop.step_in_epoch, best.epoch)
        step, ends = train_step(model, optimizer), []

        def crashing(batch, index):
            if index == crash_at:
                raise Crash()
            return step(batch, index)

        def end(epoch, at, img_s):   # a score in [0, 1) that jumps about as the weights move: any epoch may win
            score = model.weight.sum().item() * 1e6 % 1
            best.offer(score, epoch, model)
            ends.append((epoch, score, best.epoch))
            return {}
        try:
            loop.run_epochs(crashing, end)
        except Crash:
            pass
        return resumed, ends, best, model

    _, straight, best, model = train(tmp_path / "straight")
    _, before_crash, _, _ = train(tmp_path / "crashed", crash_at=11)
    resumed, after, resumed_best, resumed_model = train(tmp_path / "crashed")
    assert before_crash == straight[:2] and resumed == (7, 1, 2, straight[0][2])
    assert after == straight[1:]   # epoch 2 ended again, from the state of step 7
    assert (resumed_best.epoch, resumed_best.top1) == (best.epoch, best.top1)
    assert all(torch.equal(best.weights[k], resumed_best.weights[k]) for k in best.weights)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed_model.state_dict().values()))


HOST_SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")


def counting_host_syncs(monkeypatch) -> list:
    """The names of every tensor-to-Python read from now on (each one waits for a GPU's queue)."""
    calls = []
    for name in HOST_SYNCS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _name=name, _original=original: calls.append(_name) or _original(self, *a))
    return calls


@pytest.mark.parametrize("on_nan, per_step", [("stop", 0), ("skip", 1)])   # skip must decide before backward
def test_the_finite_loss_check_reads_nothing_back_per_step_unless_it_skips(on_nan, per_step, monkeypatch):
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = amp.grad_scaler("fp32", torch.device("cpu"))
    syncs = counting_host_syncs(monkeypatch)
    for step in range(5):
        assert amp.step_optimizer(model(torch.ones(4, 3)).square().mean(), optimizer, scaler, step, on_nan)
    monkeypatch.undo()
    assert syncs == ["item"] * per_step * 5


def test_a_step_the_grad_scaler_skips_is_not_reported_as_an_update():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    weights = [p.clone() for p in model.parameters()]
    huge = model(torch.full((1, 3), 1e36)).sum()   # finite, but its scaled gradients are not
    assert torch.isfinite(huge) and not amp.step_optimizer(huge, optimizer, scaler, 0)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert amp.step_optimizer(model(torch.ones(1, 3)).sum(), optimizer, scaler, 1)
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_a_loss_gone_bad_stops_the_loop_at_its_next_check_naming_its_step(noise, tmp_path, monkeypatch):
    """No host sync per step: the NaN of step 6 is found at the next checkpoint (step 7), before it is written."""
    events = []
    recording(monkeypatch, events)
    loader = build_loader(read_split(noise, "labeled"), "eval", image_size=32, global_batch=2, workers=0)
    run = run_of(tmp_path, noise, "run.checkpoint_every=7", "run.log_every=100")
    loop, model, optimizer = linear_loop(run, loader, 20)
    with pytest.raises(amp.NonFiniteLoss, match=r"^step 6: the loss is nan on 1 rank\(s\); stopping"):
        loop.run_epochs(train_step(model, optimizer, nan_at=5), lambda epoch, step, img_s: {"ended": True})
    assert loop.step == 7 and events == [("epoch", 1)]   # step 5's epoch end came before the bad loss
    amp.check_losses()   # raised once: the next run in this process starts clean


class Batches:
    """A loader's batches of one epoch, held in memory and given again every epoch: no image is decoded
    (decoding reads tensors back on the CPU, as a GPU run's loader workers do away from its device)."""

    def __init__(self, loader):
        self.batches = list(loader.epoch(0))
        self.steps_per_epoch = len(self.batches)

    def stream(self, step):
        return itertools.islice(itertools.cycle(self.batches), step % self.steps_per_epoch, None)


def test_no_step_of_the_loop_waits_for_the_device(noise, tmp_path, monkeypatch):
    """20 steps, logged and checkpointed only at the end: the reads back are those of that one log line,
    that checkpoint and the epochs' ends, none per step."""
    loader = Batches(build_loader(read_split(noise, "labeled"), "eval", image_size=32, global_batch=2, workers=0))
    run = run_of(tmp_path, noise, "run.checkpoint_every=100", "run.log_every=100")
    loop, model, optimizer = linear_loop(run, loader, 20)
    monkeypatch.setattr(run, "save_checkpoint", lambda *args: None)   # its torch.save reads tensors back
    syncs = counting_host_syncs(monkeypatch)
    loop.run_epochs(train_step(model, optimizer))
    monkeypatch.undo()
    # the log line's tolist, and one amp.check_losses (its item) at each of: 4 epoch ends, the log, the save
    assert sorted(syncs) == sorted(["tolist"] + ["item"] * (4 + 1 + 1))


# ---- D10: the main loader's DALI pipelines ----

def test_the_loop_reads_three_epochs_through_one_dali_pipeline(noise, tmp_path, monkeypatch):
    dali = pytest.importorskip("data.dali", exc_type=ImportError)
    monkeypatch.setenv("SEMISCALE_CACHE", str(tmp_path / "cache"))
    built, build = [], dali._build_pipeline
    monkeypatch.setattr(dali, "_build_pipeline", lambda *a, **kw: built.append(1) or build(*a, **kw))
    split = read_split(noise, "unlabeled")
    loader = build_loader(split, "eval", image_size=32, global_batch=2, workers=1, backend="dali", seed=3)
    run = run_of(tmp_path / "run", noise, "run.checkpoint_every=100", "run.log_every=100")
    loop, model, optimizer = linear_loop(run, loader, 3 * loader.steps_per_epoch)
    rows = []
    step = train_step(model, optimizer)
    loop.run_epochs(lambda batch, index: rows.append(batch["index"].tolist()) or step(batch, index))
    assert len(built) == 1
    reference = build_loader(split, "eval", image_size=32, global_batch=2, workers=0, seed=3)   # same sampler
    assert rows == [batch["index"].tolist() for epoch in range(3) for batch in reference.epoch(epoch)]


# ---- D6: the DALI scan ----

def test_the_dali_scan_decodes_each_file_once_whatever_the_list(tmp_path, monkeypatch):
    dali = pytest.importorskip("data.dali", exc_type=ImportError)
    monkeypatch.setenv("SEMISCALE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "images"
    os.makedirs(folder)
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 9)).save(folder / "alpha.png")   # converted: DALI drops alpha
    (folder / "garbage.jpg").write_bytes(b"not an image")
    paths = sorted(str(p) for p in folder.iterdir())
    decoded = []
    inspect = dali._inspect
    monkeypatch.setattr(dali, "_inspect", lambda path, *a: decoded.append(os.path.basename(path)) or inspect(path, *a))

    def scan(listed):
        monkeypatch.setattr(dali, "_scans", {})   # as a new process would
        return dali.scan_files(listed)

    first = scan(paths[:3])   # 0.png 1.png 2.png
    assert first == {} and sorted(decoded) == ["0.png", "1.png", "2.png"]
    found = scan(paths)   # another list sharing those three: only the others are decoded
    assert sorted(decoded[3:]) == ["3.png", "alpha.png", "garbage.jpg"]
    assert sorted(os.path.basename(p) for p in found) == ["alpha.png", "garbage.jpg"]
    assert "bad" in found[str(folder / "garbage.jpg")] and "converted" in found[str(folder / "alpha.png")]
    del decoded[:]
    os.utime(folder / "1.png", ns=(1, 1))   # changed
    assert scan(paths) == found and decoded == ["1.png"]
