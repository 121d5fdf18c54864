"""torchrun beyond one process group on one node: a 2-node c10d rendezvous on loopback, and an
elastic restart (--max-restarts) that resumes pretraining from run.dir/checkpoint.pt."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import torch

from multiproc import free_port
from test_pretrain import CONFIG, pretrain, weights
from tiny import ENV, ROOT, TINY_PRETRAIN, assert_trained_alike, fashion, initial_backbone
from trainer.runtime import checkpoint

TIMEOUT_S = 600
SCRIPT = os.path.join(ROOT, "launch", "pretrain.py")


def pretrain_argv(data, run_dir, *extra):
    return [SCRIPT, "--config", CONFIG, f"data.root={data}", f"run.dir={run_dir}", *TINY_PRETRAIN, *extra]


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


@contextlib.contextmanager
def stopped_at_exit(*agents: subprocess.Popen):
    """Whatever happens, no torchrun is left running: SIGTERM makes an agent stop its workers first."""
    try:
        yield
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.terminate()
                try:
                    agent.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()


def test_two_nodes_equal_one_process(tmp_path_factory, tmp_path):
    """Two torchrun agents meet through a c10d rendezvous on 127.0.0.1 (one worker each) and
    train the same weights as one process with the same global batch."""
    data = fashion(tmp_path_factory)
    steps = "train.max_steps=4"
    port = free_port()
    nodes = [subprocess.Popen(
        torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--rdzv_backend", "c10d",
                 "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"semiscale-{port}",
                 "--local-addr", "127.0.0.1",   # the address workers reach the agent's store at
                 *pretrain_argv(data, tmp_path / "two", steps)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for node in (0, 1)]
    with stopped_at_exit(*nodes):
        pretrain(data, tmp_path / "one", steps, env=ENV)
        outputs = [node.communicate(timeout=TIMEOUT_S) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    # the rendezvous assigns the ranks: exactly one node's worker is rank 0 and reports the world
    assert sum("2 rank(s), global batch 16" in out for out, _ in outputs) == 1

    assert_trained_alike(weights(tmp_path / "one"), weights(tmp_path / "two"), initial_backbone(CONFIG, *TINY_PRETRAIN))


def pid_state(pid: int) -> str | None:
    """The process's state letter (R, S, Z, ...), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]   # the name in parentheses may contain spaces


def worker_ranks(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the live worker processes a torchrun agent has started (its children with a RANK)."""
    workers = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"RANK" in env and pid_state(int(entry)) not in (None, "Z"):
            workers[int(env[b"RANK"])] = int(entry)
    return workers


def test_elastic_restart_resumes_from_checkpoint(tmp_path_factory, tmp_path):
    """SIGKILL rank 0's worker mid-run: torchrun restarts the group once, the new workers resume
    from the last checkpoint and finish with the weights of an uninterrupted 2-process run."""
    data = fashion(tmp_path_factory)
    total, args = 16, ["train.max_steps=16", "run.checkpoint_every=2"]
    run_dir = tmp_path / "restarted"
    ckpt = run_dir / "checkpoint.pt"
    log = tmp_path / "torchrun.log"
    straight_log = tmp_path / "straight.log"
    with open(straight_log, "w") as out:   # the uninterrupted reference runs alongside
        straight = subprocess.Popen(torchrun("--standalone", "--nproc_per_node", "2",
                                             *pretrain_argv(data, tmp_path / "straight", *args)),
                                    stdout=out, stderr=subprocess.STDOUT, env=ENV)
    with open(log, "w") as out:
        # LOGLEVEL=INFO: the agent logs each restart of the worker group. TORCH_DISABLE_SHARE_RDZV_TCP_STORE:
        # each group gets a fresh store; in the agent's shared one a restarted group can read the keys
        # the killed group left (its gloo addresses) and fail to connect or hang (docs/cluster.md).
        agent = subprocess.Popen(torchrun("--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
                                          *pretrain_argv(data, run_dir, *args)),
                                 stdout=out, stderr=subprocess.STDOUT,
                                 env={**ENV, "LOGLEVEL": "INFO", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    with stopped_at_exit(agent, straight):
        deadline = time.time() + TIMEOUT_S
        while not (ckpt.exists() and checkpoint.load(str(ckpt))["step"] >= 4):
            assert agent.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        writer = worker_ranks(agent.pid)[0]
        os.kill(writer, signal.SIGKILL)
        while pid_state(writer) not in (None, "Z"):   # rank 0 alone writes: once dead, the checkpoint is final
            time.sleep(0.01)
        killed_at = checkpoint.load(str(ckpt))["step"]
        assert 4 <= killed_at < total, f"killed at step {killed_at}: the run was not interrupted mid-way"
        agent.wait(timeout=TIMEOUT_S)
        straight.wait(timeout=TIMEOUT_S)
    output = log.read_text()
    assert agent.returncode == 0, output[-3000:]
    assert straight.returncode == 0, straight_log.read_text()[-3000:]
    assert output.count("Worker group FAILED. 1/1 attempts left; will restart worker group") == 1
    assert output.count(f"resumed from {ckpt} at step {killed_at}") == 1
    # metrics.jsonl: the first group's steps up to the checkpoint (and maybe a few more, lost),
    # then the restarted group's steps from the checkpoint to the end
    with open(run_dir / "metrics.jsonl") as f:
        logged = [event["step"] for event in map(json.loads, f) if "step" in event]
    assert logged[:killed_at] == list(range(1, killed_at + 1))
    assert logged[-(total - killed_at):] == list(range(killed_at + 1, total + 1))

    reference, restarted = weights(tmp_path / "straight"), weights(run_dir)
    assert reference.keys() == restarted.keys()
    for k in reference:   # 2 gloo ranks sum in a fixed order: resuming changes no bit
        torch.testing.assert_close(restarted[k], reference[k], rtol=0, atol=1e-6, msg=k)
