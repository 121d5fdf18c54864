"""A real one-node Slurm cluster (munged + slurmctld + slurmd on localhost) for tests.

    cluster = SlurmCluster.start()      # raises ClusterUnavailable with the reason
    cluster.env                          # SLURM_CONF + PATH for anything that submits
    cluster.stop()

Everything lives in a fresh directory under /tmp/semiscale-slurm/ (config, state, spool, logs,
jobcomp file, munge socket) and the daemons listen on free ports, so several clusters coexist.
Every process of the cluster has `SEMISCALE_SLURM_HOME=<dir>` or `SLURM_CONF=<dir>/...` in its
environment: stop(), and the cleanup of clusters left by a crashed run, kill exactly those.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
WRAPPER_BIN = HERE / "bin"  # holds the `sacct` wrapper that reads the jobcomp file
CLUSTERS_ROOT = Path("/tmp/semiscale-slurm")
MARKER = "SEMISCALE_SLURM_HOME"
MEMORY_HEADROOM_MB = 2048
MUNGE_KEY = Path("/etc/munge/munge.key")
REQUIRED = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "srun", "sinfo", "scontrol", "scancel")


class ClusterUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why (used as the pytest skip reason)."""


def check_prerequisites() -> None:
    if os.name != "posix" or not Path("/proc").is_dir():
        raise ClusterUnavailable("the Slurm harness needs Linux")
    if os.geteuid() != 0:
        raise ClusterUnavailable("the Slurm harness runs slurmd as root; not root here")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        raise ClusterUnavailable("no munge user; run tests/slurm_harness/install.sh as root on Debian") from None
    missing = [name for name in REQUIRED if shutil.which(name) is None]
    if missing:
        raise ClusterUnavailable(
            f"Slurm binaries missing ({', '.join(missing)}); run tests/slurm_harness/install.sh as root on Debian"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def real_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(512, int(line.split()[1]) // 1024 - MEMORY_HEADROOM_MB)
    raise ClusterUnavailable("/proc/meminfo has no MemTotal line")


def slurm_conf(home: Path, ctld_port: int, slurmd_port: int, cpus: int, memory_mb: int) -> str:
    return f"""\
ClusterName=semiscale
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={home}/jobcomp.txt
StateSaveLocation={home}/state
SlurmdSpoolDir={home}/spool
SlurmctldPidFile={home}/slurmctld.pid
SlurmdPidFile={home}/slurmd.pid
SlurmctldLogFile={home}/slurmctld.log
SlurmdLogFile={home}/slurmd.log
ReturnToService=2
MailProg=/bin/true
# Its own munged: clusters started side by side never share (or stop) another's daemon.
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s).
AuthInfo=socket={home}/munge/munge.socket,cred_expire=5
# Look at pending jobs every second or two, not every 30-60 s: a requeued job restarts promptly.
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=2
MinJobAge=600
InactiveLimit=0
NodeName=localhost CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def processes_tagged(home: Path) -> list[int]:
    """PIDs whose environment points at this cluster (daemons, step daemons, job tasks)."""
    tags = (f"{MARKER}={home}\0".encode(), f"SLURM_CONF={home}/".encode())
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:  # exited meanwhile, or a kernel thread
            continue
        if any(tag in environ for tag in tags):
            found.append(int(proc.name))
    return found


def is_running(pid: int) -> bool:
    """True unless the process is gone or a zombie (nobody may reap orphans in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def kill_all(pids: list[int], grace_s: float = 1.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = [pid for pid in pids if is_running(pid)]
        if not pids:
            return


def home_prefix(owner_pid: int) -> str:
    """Cluster directories are named after the process that owns them: cluster-<pid>-<random>."""
    return f"cluster-{owner_pid}-"


def remove_stale_clusters() -> None:
    """Kill and delete clusters whose owning process died without stopping them."""
    if not CLUSTERS_ROOT.is_dir():
        return
    for home in CLUSTERS_ROOT.glob("cluster-*-*"):
        owner = home.name.split("-")[1]
        if owner.isdigit() and is_running(int(owner)):
            continue
        kill_all(processes_tagged(home))
        shutil.rmtree(home, ignore_errors=True)


def ensure_munge_key() -> None:
    """Under a lock: two test workers starting their first clusters together must not both create the key.
    CLUSTERS_ROOT, which holds the lock, exists: SlurmCluster.start made it."""
    with open(CLUSTERS_ROOT / "munge-key.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not MUNGE_KEY.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={MUNGE_KEY}"], check=True, capture_output=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")


@dataclass
class SlurmCluster:
    home: Path
    conf: Path
    env: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def start(
        cls, ctld_port: int | None = None, slurmd_port: int | None = None, timeout_s: float = 30.0
    ) -> "SlurmCluster":
        """Ports default to free ones."""
        check_prerequisites()
        remove_stale_clusters()
        CLUSTERS_ROOT.mkdir(parents=True, exist_ok=True)
        home = Path(tempfile.mkdtemp(prefix=home_prefix(os.getpid()), dir=CLUSTERS_ROOT))
        home.chmod(0o755)  # munged, running as the munge user, must reach its socket below
        for sub in ("state", "spool", "munge"):
            (home / sub).mkdir()
        shutil.chown(home / "munge", "munge", "munge")
        conf = home / "slurm.conf"
        ports = (ctld_port or free_port(), slurmd_port or free_port())
        conf.write_text(slurm_conf(home, *ports, os.cpu_count() or 1, real_memory_mb()))
        env = {"SLURM_CONF": str(conf), "PATH": f"{WRAPPER_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        cluster = cls(home=home, conf=conf, env=env)
        try:
            ensure_munge_key()
            cluster.launch_daemons()
            cluster.wait_idle(timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def launch_daemons(self) -> None:
        """munged (as the munge user, on this cluster's own socket), slurmctld, slurmd."""
        daemon_env = {**os.environ, **self.env, MARKER: str(self.home)}
        munge = self.home / "munge"
        munged = ["munged", "--foreground", f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
                  f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"]
        self.spawn("munged", munged, daemon_env, user="munge")
        self.wait_for(lambda: (munge / "munge.socket").exists(), 10, "munged did not create its socket")
        self.spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], daemon_env)
        self.spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)], daemon_env)

    def spawn(self, name: str, cmd: list[str], env: dict[str, str], user: str | None = None) -> None:
        with open(self.home / f"{name}.out", "wb") as out:
            self.daemons.append(
                subprocess.Popen(
                    cmd, env=env, user=user, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited during start-up\n{self.logs_tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} after {timeout_s:.0f} s\n{self.logs_tail()}")

    def wait_idle(self, timeout_s: float) -> None:
        self.wait_for(self.node_idle, timeout_s, "the Slurm node is not idle")

    def node_idle(self) -> bool:
        return self.run("sinfo", "-h", "-o", "%T", check=False).strip() == "idle"

    def logs_tail(self, lines: int = 15) -> str:
        parts = []
        logs = [*sorted(self.home.glob("*.log")), *sorted(self.home.glob("*.out"))]
        logs.append(self.home / "munge" / "munged.log")
        for log in filter(Path.exists, logs):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def run(self, *cmd: str, check: bool = True) -> str:
        """Run a Slurm client command against this cluster; returns stdout."""
        done = subprocess.run(cmd, env={**os.environ, **self.env}, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def job_fields(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, NodeList, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def stop(self) -> None:
        if self.daemons and all(p.poll() is None for p in self.daemons):
            self.run("scancel", "--full", "--user", "root", check=False)
        kill_all(processes_tagged(self.home))
        for daemon in self.daemons:
            daemon.wait()
        shutil.rmtree(self.home, ignore_errors=True)


def serve() -> None:
    """`python tests/slurm_harness/slurm.py`: a cluster for trying things by hand, until Ctrl-C or SIGTERM."""
    cluster = SlurmCluster.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("".join(f"export {key}={value}\n" for key, value in cluster.env.items()), end="", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    serve()
