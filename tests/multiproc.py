"""Run a function on N gloo ranks in fresh processes and collect each rank's return value."""
import os
import socket
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        # numpy, not tensors: a tensor crosses the queue as shared memory that dies with this process
        queue.put((rank, _to_numpy(fn(rank, *args)), None))
    except Exception:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _to_numpy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().numpy()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(v) for v in value)
    return value


def _to_tensor(value):
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_tensor(v) for v in value)
    return value


def run_ranks(fn, world: int, *args):
    """fn(rank, *args) on `world` ranks; returns the list of results ordered by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict()
    for _ in procs:
        rank, value, error = queue.get(timeout=300)
        if error:
            raise AssertionError(f"rank {rank} failed:\n{error}")
        results[rank] = _to_tensor(value)
    for p in procs:
        p.join(timeout=60)
    return [results[r] for r in range(world)]
