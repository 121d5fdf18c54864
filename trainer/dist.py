"""Distributed runtime: a launcher's process group (of any size, one rank included) or a plain single
process; nccl on CUDA, gloo on CPU.

Launchers that are not torchrun (launch/submit.py under Slurm) export the same variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) before a stage starts.

Two decisions live here and nowhere else: which device a process computes on (`resolve_device`) and
how tensors cross ranks. Every collective of the project goes through this module, which hands the
process group tensors on the group's device (NCCL has no CPU collectives) and gives results back on
the device they came from; tests/test_dist.py walks the source tree and fails on a direct call elsewhere.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from data.errors import InputError

DEVICES = ("auto", "cuda", "cpu")
T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, module: nn.Module) -> nn.Module:
        """The module on this runtime's device with channels-last weights: oneDNN and cuDNN convolutions
        run faster in NHWC."""
        return module.to(self.device, memory_format=torch.channels_last)


def gpus_visible() -> bool:
    """NVIDIA devices on this machine that this process is allowed to see (CUDA_VISIBLE_DEVICES), whether
    or not torch can use them."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(name.startswith("nvidia") and name[len("nvidia"):].isdigit() for name in _dev_entries())


def _dev_entries() -> list[str]:
    try:
        return os.listdir("/dev")
    except OSError:
        return []


def resolve_device(request: str, local_rank: int = 0) -> torch.device:
    """The device this process computes on: run.device auto|cuda|cpu.

    auto takes the GPU when torch can use one. GPUs that are visible but unusable by torch (a wheel built
    for a newer driver, a CPU-only wheel) are an error, not a silent fall back to hours on the CPU.
    A rank's GPU is LOCAL_RANK modulo the GPUs it sees: sites that bind one GPU per task show each task
    a single device 0.
    """
    if request not in DEVICES:
        raise InputError(f"run.device={request!r}: expected one of {', '.join(DEVICES)}")
    if request == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if request == "cuda":
            raise InputError("run.device=cuda: torch cannot use CUDA here (torch.cuda.is_available() is False)")
        if gpus_visible():
            raise InputError(f"run.device=auto: this machine has NVIDIA GPUs but torch {torch.__version__} cannot "
                             "use them (check the driver against the wheel's CUDA); run.device=cpu runs on the CPU")
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


# what torchrun, and launch/submit.py under Slurm, set for every process they start (with LOCAL_RANK)
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether a launcher started this process, as one rank or one of many. A plain `python launch/<stage>.py`
    sets neither RANK nor WORLD_SIZE; part of a launcher's set is refused, naming what is missing."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return False
    missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
    if missing:
        present = [name for name in LAUNCHER_VARIABLES if name in os.environ]
        raise InputError(f"the environment sets {', '.join(present)} but not {', '.join(missing)}: a launcher "
                         f"(torchrun, launch/submit.py) sets all of {', '.join(LAUNCHER_VARIABLES)}; unset RANK "
                         "and WORLD_SIZE to run a single process")
    return True


def init(device: str = "auto") -> Runtime:
    """Join the process group a launcher describes on `device`, whatever its size: one rank under
    `torchrun --nproc_per_node 1` gets a real group too, so that its collectives, DDP and synchronised
    BatchNorm run on the backend eight ranks would use (the GPU smoke run's stage step). A plain process
    is rank 0 of 1, without a group."""
    group = launched()
    world = int(os.environ["WORLD_SIZE"]) if group else 1
    rank = int(os.environ["RANK"]) if group else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
        torch.backends.cudnn.benchmark = True   # fixed-size convolutions: pick the fastest kernels once
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")):
        # the agent's store outlives a failed group and its stale addresses make the restarted one
        # hang or fail to connect; a store per attempt avoids it
        raise InputError("torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in every torchrun's "
                         "environment (docs/cluster.md)")
    if group and not dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU instead of a guess from the rank number
        # (wrong under Slurm's cyclic task distribution)
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30),
                                device_id=chosen if chosen.type == "cuda" else None)
        if rank == 0:   # the stage's log says which backend its collectives take
            print(f"[dist] {dist.get_backend()} process group of {world} rank(s); rank 0 on {chosen}", flush=True)
    return Runtime(rank, local_rank, world, chosen)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def grouped() -> bool:
    """A process group exists. The helpers below use it whenever it does, even with one rank, so that a
    one-GPU smoke run (tests/gpu_smoke.py) sends every collective through NCCL as eight GPUs would."""
    return dist.is_initialized()


def group_device() -> torch.device:
    """Where the process group's collectives take their tensors: the current GPU for NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier():
    if grouped():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable: the gradient of each rank's share is the summed gradient."""
    if not grouped():
        return tensor
    return funcol.wait_tensor(funcol.all_reduce(tensor.to(group_device()), "sum", dist.group.WORLD)).to(tensor.device)


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place, no autograd: the sum (or mean) over ranks, wherever `tensor` lives."""
    if not grouped():
        return tensor
    on_group = tensor.to(group_device())
    dist.all_reduce(on_group)
    if op == "mean":
        on_group /= world_size()
    elif op != "sum":
        raise InputError(f"all_reduce_ op {op!r}: expected sum or mean")
    if on_group is not tensor:
        tensor.copy_(on_group)
    return tensor


def refuses_cpu_tensors() -> bool:
    """Whether the process group rejects a CPU tensor, as NCCL does: the GPU smoke run shows that the
    helpers above are needed before it checks that they work."""
    try:
        dist.all_reduce(torch.zeros(1))
    except (RuntimeError, ValueError):
        return True
    return False


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks for metrics (no autograd)."""
    return all_reduce_(tensor, "mean")


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not grouped():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def own_cores() -> int:
    """The CPU cores this process may run on (its affinity), whatever OMP_NUM_THREADS says: torchrun sets it
    to 1 for each of several ranks, which is right while they all compute and wrong for one that works
    while the others wait."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cores_per_rank() -> int:
    """The CPU cores this rank may use while every rank computes at once: its own cores (own_cores) divided
    among the ranks on its machine whose cores overlap them (torchrun's ranks all see the node's cores; a
    launcher that binds each rank to cores of its own leaves them whole). Every rank calls it."""
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(own_cores()))
    host = socket.gethostname()
    sharing = sum(1 for other_host, cores in all_gather_object((host, mine)) if other_host == host and cores & mine)
    return max(1, len(mine) // sharing)


def gather_object(obj) -> list | None:
    """Every rank's `obj` (picklable), in rank order, on rank 0; None on the others (what only rank 0
    uses need not cross the network W times nor sit in every rank's memory)."""
    if not grouped():
        return [obj]
    gathered = [None] * world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (the others pass anything, e.g. None)."""
    if not grouped():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=group_device())
    return box[0]


@dataclass(frozen=True)
class _Refusal:
    """An InputError on its way from rank 0: its class and state, rebuilt on the other ranks without its
    constructor, whose parameters need not match its args (BadRowError builds its message from three)."""
    kind: type
    args: tuple
    state: dict

    def rebuild(self) -> InputError:
        refusal = self.kind.__new__(self.kind)
        refusal.args = self.args
        refusal.__dict__.update(self.state)
        return refusal


def rank0_decides(decide: Callable[[], T]) -> T:
    """Rank 0 alone runs `decide` (a check of the run dir, a scan of the files); every rank gets its result.
    An InputError it raises is raised on every rank, the same class with the same message, so that the
    other ranks stop with rank 0's one line instead of waiting in the next collective. Any other exception
    is a bug: rank 0 keeps its traceback and torchrun stops the others."""
    if not grouped():
        return decide()
    if dist.get_rank() != 0:
        decision = broadcast_object(None)
        if isinstance(decision, _Refusal):
            raise decision.rebuild()
        return decision
    try:
        decision = decide()
    except InputError as e:
        broadcast_object(_Refusal(type(e), e.args, vars(e)))
        raise
    return broadcast_object(decision)


def gathered_on_rank0(work: Callable[[], T]) -> list[T] | None:
    """Every rank runs `work` on its own share; rank 0 gets every rank's result, in rank order, the others
    None. An InputError on any rank (a bad row in its share) is raised on every rank, the lowest such
    rank's, the same class with the same message, so that no rank waits in a collective for one that
    stopped. Any other exception is a bug: that rank keeps its traceback and torchrun stops the others."""
    if not grouped():
        return [work()]
    result, refusal = None, None
    try:
        result = work()
    except InputError as e:
        refusal = _Refusal(type(e), e.args, vars(e))
    refusals = [r for r in all_gather_object(refusal) if r is not None]
    if refusals:
        raise refusals[0].rebuild()
    return gather_object(result)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are those of the global batch, on any backend.

    torch.nn.SyncBatchNorm only accepts CUDA tensors; this one all-reduces the per-channel
    sums with a differentiable collective, so N gloo ranks train exactly like 1 rank. In a group of
    one rank it still takes the collective path (torch's falls back to plain BatchNorm there), so that
    `torchrun --nproc_per_node 1` runs what N ranks run.
    """

    def _check_input_dim(self, x: torch.Tensor):
        if x.dim() < 2:
            raise InputError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not grouped():
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([x.numel() / x.size(1)], dtype=torch.float32, device=x.device)
        total = all_reduce_sum(torch.cat([xf.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = xf - mean.view(shape)
        var = all_reduce_sum(centred.pow(2).sum(dims)) / n   # two-pass: as exact as local BN
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                # momentum None: a cumulative average, as torch's BatchNorm
                m = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm see the global batch: torch's SyncBatchNorm on CUDA, ours elsewhere."""
    if not grouped():
        return module
    if group_device().type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _replace_batchnorm(module)


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        setattr(module, name, _replace_batchnorm(child))
    return module


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    """DistributedDataParallel in a process group (gradients averaged), the model itself otherwise."""
    if not grouped():
        return model
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
