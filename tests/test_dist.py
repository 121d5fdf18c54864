import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from data.errors import InputError
from launch import pretrain
from multiproc import free_port, run_ranks
from tiny import ROOT, TINY_PRETRAIN
from trainer import dist
from trainer.dist import GlobalBatchNorm, sync_batchnorm


def _bn_shard(rank, x, weight, bias):
    torch.manual_seed(0)
    bn = sync_batchnorm(nn.Sequential(nn.BatchNorm2d(x.shape[1])))[0]
    assert isinstance(bn, GlobalBatchNorm)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    half = x.shape[0] // 2
    xs = x[rank * half:(rank + 1) * half].clone().requires_grad_()
    y = bn(xs)
    (y * torch.arange(y.numel()).reshape(y.shape).sin()[...]).sum().backward()
    return y.detach(), xs.grad, bn.weight.grad, bn.running_mean.clone(), bn.running_var.clone()


def test_global_batchnorm_equals_full_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=g) * 3 + 1
    weight, bias = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    xf = x.clone().requires_grad_()
    y = bn(xf)
    # the same per-element weights as in each shard (shards index their own halves)
    w = torch.cat([torch.arange(y[:4].numel()).reshape(y[:4].shape).sin()] * 2)
    (y * w).sum().backward()
    r0, r1 = run_ranks(_bn_shard, 2, x, weight, bias)
    torch.testing.assert_close(torch.cat([r0[0], r1[0]]), y.detach(), rtol=1e-5, atol=1e-5)
    # input gradients: the global-batch gradient (DDP does not touch activations)
    torch.testing.assert_close(torch.cat([r0[1], r1[1]]), xf.grad, rtol=1e-4, atol=1e-5)
    # weight gradient: ranks hold their own share; their sum is the full-batch gradient
    torch.testing.assert_close(r0[2] + r1[2], bn.weight.grad, rtol=1e-4, atol=1e-5)
    for r in (r0, r1):
        torch.testing.assert_close(r[3], bn.running_mean)
        torch.testing.assert_close(r[4], bn.running_var)


def test_single_process_keeps_plain_batchnorm():
    model = nn.Sequential(nn.BatchNorm2d(3))
    assert type(sync_batchnorm(model)[0]) is nn.BatchNorm2d


def launcher_env(monkeypatch, **variables):
    for name in dist.LAUNCHER_VARIABLES + ("LOCAL_RANK",):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_launcher_variables_give_a_stage_a_group_even_of_one_rank(data, tmp_path, monkeypatch, capsys):
    """`torchrun --nproc_per_node 1` (or a one-task Slurm job): the stage joins a real gloo group, so that DDP,
    GlobalBatchNorm and the loop's collectives run as on N ranks instead of a plain process's shortcuts."""
    launcher_env(monkeypatch, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()))
    calls, wrapped = [], []
    reduce, reduce_differentiable, wrap = torch.distributed.all_reduce, dist.funcol.all_reduce, dist.wrap_ddp
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **kw: (calls.append("all_reduce"), reduce(*a, **kw))[1])
    monkeypatch.setattr(dist.funcol, "all_reduce",   # GlobalBatchNorm's batch statistics
                        lambda *a, **kw: (calls.append("all_reduce_sum"), reduce_differentiable(*a, **kw))[1])
    monkeypatch.setattr(dist, "wrap_ddp", lambda model, rt: (wrapped.append(wrap(model, rt)), wrapped[-1])[1])
    try:
        pretrain.main(["--config", f"{ROOT}/configs/demo/pretrain.yaml", f"data.root={data}", f"run.dir={tmp_path}",
                       *TINY_PRETRAIN, "train.max_steps=2"])
        group = torch.distributed.get_backend(), torch.distributed.get_world_size()
    finally:
        dist.shutdown()
    assert group == ("gloo", 1)
    assert "[dist] gloo process group of 1 rank(s); rank 0 on cpu" in capsys.readouterr().out
    assert isinstance(wrapped[0], nn.parallel.DistributedDataParallel)
    # the metrics each logged step averages over the ranks (run.log_every=1), and every BatchNorm's statistics
    assert calls.count("all_reduce") >= 2 and calls.count("all_reduce_sum") > 0, calls
    assert (tmp_path / "backbone.pt").exists()


def test_a_plain_process_has_no_group_and_part_of_a_launchers_variables_is_refused(monkeypatch):
    launcher_env(monkeypatch)
    assert dist.init("cpu") == dist.Runtime(0, 0, 1, torch.device("cpu"))
    assert not torch.distributed.is_initialized()
    for present in (["RANK"], ["RANK", "WORLD_SIZE", "MASTER_ADDR"]):
        launcher_env(monkeypatch, **{name: "0" for name in present})
        missing = [name for name in dist.LAUNCHER_VARIABLES if name not in present]
        with pytest.raises(InputError, match=f"the environment sets {', '.join(present)} but not {', '.join(missing)}"):
            dist.init("cpu")
        assert not torch.distributed.is_initialized()


# ---- one place for collectives and for the device: the source tree is checked, not trusted ----

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
               "gather_object", "scatter", "scatter_object_list", "barrier", "all_to_all", "send", "recv",
               "isend", "irecv", "monitored_barrier"}
DEVICE_PROBES = {"is_available", "current_device"}   # torch.cuda.*: which device to use
PROJECT = Path(__file__).resolve().parents[1]


def offending_calls(source: str, filename: str) -> list[str]:
    """Calls of torch.distributed collectives (any import spelling) and torch.cuda device probes."""
    tree = ast.parse(source, filename)
    distributed, cuda, direct = {"torch.distributed"}, {"torch.cuda"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("torch.distributed"):
                    distributed.add(a.asname or a.name)
                if a.name == "torch.cuda" and a.asname:
                    cuda.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if node.module.startswith("torch.distributed") and a.name in COLLECTIVES:
                    direct.add(a.asname or a.name)
                if node.module == "torch" and a.name == "distributed":
                    distributed.add(a.asname or a.name)
                if node.module.startswith("torch.distributed") and a.name in ("_functional_collectives",):
                    distributed.add(a.asname or a.name)
                if node.module == "torch" and a.name == "cuda":
                    cuda.add(a.asname or a.name)
                if node.module == "torch.cuda" and a.name in DEVICE_PROBES:
                    direct.add(a.asname or a.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute):
            base = ast.unparse(f.value)
            if (base in distributed and f.attr in COLLECTIVES) or (base in cuda and f.attr in DEVICE_PROBES):
                found.append(f"{filename}:{node.lineno} {base}.{f.attr}")
        elif isinstance(f, ast.Name) and f.id in direct:
            found.append(f"{filename}:{node.lineno} {f.id}")
    return found


def test_only_trainer_dist_issues_collectives_or_picks_the_device():
    found = []
    for top in ("trainer", "data", "launch"):
        for path in sorted((PROJECT / top).rglob("*.py")):
            rel = str(path.relative_to(PROJECT))
            if rel != "trainer/dist.py":
                found += offending_calls(path.read_text(), rel)
    assert not found, "route these through trainer/dist.py:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "import torch.distributed as d\nd.all_reduce(x)",
    "import torch\ntorch.distributed.barrier()",
    "from torch import distributed\ndistributed.broadcast_object_list(b)",
    "from torch.distributed import all_gather_object as g\ng(a, b)",
    "import torch.distributed._functional_collectives as funcol\nfuncol.all_reduce(x, 'sum', g)",
    "import torch\ntorch.cuda.is_available()",
    "from torch.cuda import current_device\ncurrent_device()",
])
def test_the_source_check_catches_every_spelling(source):
    assert len(offending_calls(source, "m.py")) == 1


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "_dev_entries", lambda: ["null", "nvidia0", "nvidiactl"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert dist.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="has NVIDIA GPUs but torch .* cannot use them"):
        dist.resolve_device("auto")   # visible GPUs that torch cannot use: never a silent CPU run
    with pytest.raises(ValueError, match="run.device=cuda: torch cannot use CUDA"):
        dist.resolve_device("cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")   # hidden on purpose: the CPU it is
    assert dist.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(dist, "_dev_entries", lambda: ["null"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert dist.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="run.device='tpu': expected one of auto, cuda, cpu"):
        dist.resolve_device("tpu")
    # a task bound to one GPU sees device 0 whatever its LOCAL_RANK
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dist.resolve_device("auto", local_rank=5) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert dist.resolve_device("cuda", local_rank=5) == torch.device("cuda", 1)


def _collectives(rank):
    total = dist.all_reduce_(torch.tensor([rank + 1.0, 10.0], dtype=torch.float64))
    mean = dist.all_reduce_mean_(torch.tensor([float(rank)]))
    gathered = dist.all_gather_object({"rank": rank})
    sent = dist.broadcast_object({"from": rank} if rank == 0 else None)
    grad_in = torch.tensor([float(rank + 1)], requires_grad=True)
    dist.all_reduce_sum(grad_in * 2).sum().backward()
    dist.barrier()
    return total, mean, [g["rank"] for g in gathered], sent["from"], grad_in.grad


def test_collective_helpers_on_two_ranks():
    for total, mean, gathered, sent, grad in run_ranks(_collectives, 2):
        assert total.tolist() == [3.0, 20.0] and mean.tolist() == [0.5]
        assert gathered == [0, 1] and sent == 0
        assert grad.tolist() == [4.0]   # d(sum over ranks of 2x)/dx, summed over both ranks' losses


def _decisions(rank):
    from trainer.algorithms.balanced_selection import BadRowError
    ran = []

    def decide():
        ran.append(rank)
        return {"by": rank}

    def refuse():   # a constructor whose parameters are not its args: the class and the line still cross
        raise BadRowError("topk_prob", 3, "not finite")

    decided = dist.rank0_decides(decide)
    with pytest.raises(BadRowError) as refused:
        dist.rank0_decides(refuse)
    return ran, decided["by"], str(refused.value)


def test_rank0_decides_and_the_others_hear_its_refusal():
    ran, decided, refused = zip(*run_ranks(_decisions, 2))
    assert ran == ([0], []) and decided == (0, 0)
    assert refused == ("topk_prob row 3: not finite",) * 2
