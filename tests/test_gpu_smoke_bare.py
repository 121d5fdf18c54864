"""The GPU smoke on a bare machine: a fresh venv that holds only torch, torchvision, numpy and pillow (and what
they need to import), plus the wheels of `make gpu-bundle`, installed offline by the smoke itself."""
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tiny import ENV, ROOT

BARE = ("torch", "torchvision", "numpy", "pillow")
BUNDLE = os.path.join(ROOT, "gpu-bundle")
SMOKE = os.path.join(ROOT, "tests", "gpu_smoke.py")


def requirement_closure(names) -> set[str]:
    """The installed distributions `names` need at run time, their extras' requirements included."""
    seen, todo = set(), [(name, "") for name in names]
    while todo:
        name, extra = todo.pop()
        if (canonicalize_name(name), extra) in seen:
            continue
        seen.add((canonicalize_name(name), extra))
        for line in metadata.distribution(name).requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                todo += [(requirement.name, e) for e in ("", *requirement.extras)]
    return {name for name, _ in seen}


def link_files(names, folder: str):
    """A tree of symbolic links to exactly the files of the distributions `names` (a shared namespace folder
    such as nvidia/ brings none of the other distributions' files)."""
    for name in names:
        dist = metadata.distribution(name)
        for file in dist.files:
            source = os.path.realpath(dist.locate_file(file))
            if str(file).startswith("..") or not os.path.isfile(source):   # scripts in bin/, files pip lists but removed
                continue
            target = os.path.join(folder, str(file))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(source, target)


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """The python of a fresh venv whose only packages are BARE's closure, through a .pth file."""
    root = tmp_path_factory.mktemp("bare")
    venv, packages = root / "venv", root / "packages"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)   # pip comes from ensurepip, offline
    link_files(requirement_closure(BARE), str(packages))
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "bare.pth"), "w") as f:
        f.write(f"{packages}\n")
    return str(venv / "bin" / "python")


def run_smoke(python: str, out, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    return subprocess.run([python, SMOKE, "--device", "cpu", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)


def test_bare_venv_holds_torch_and_not_what_the_bundle_brings(bare_python):
    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    wanted = ["torch", "torchvision", "numpy", "PIL", "yaml", "tqdm", "submitit", "faiss", "cloudpickle"]
    proc = subprocess.run([bare_python, "-c", probe, *wanted], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == str(["torch", "torchvision", "numpy", "PIL"])
    imports = subprocess.run([bare_python, "-c", "import torch, torchvision; print(torch.ones(2).sum().item())"],
                             capture_output=True, text=True, timeout=300)
    assert imports.stdout.strip() == "2.0", imports.stderr[-2000:]


@pytest.mark.skipif(not os.path.isdir(BUNDLE), reason="no gpu-bundle/: `make gpu-bundle` (run by `make test`) builds it")
def test_smoke_installs_the_bundle_offline_and_runs(bare_python, tmp_path):
    out = tmp_path / "smoke"
    proc = run_smoke(bare_python, out, "--bundle", BUNDLE, "--only", "S2", "--only", "S9")
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    summary = json.load(open(out / "smoke.json"))
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert proc.returncode == 0 and status == {"S0": "PASS", "S1": "PASS", "S2": "PASS", "S9": "PASS"}, summary["steps"]
    # everything of the bundle but typing_extensions, which torch brings, came from it; faiss and submitit import
    assert sorted(summary["bundle"]["installed"]) == ["cloudpickle", "faiss-cpu", "packaging", "pyyaml", "submitit", "tqdm"]
    assert summary["bundle"]["failed"] == {} and not os.path.exists(summary["bundle"]["site"])   # the prefix is gone
    assert summary["environment"]["optional"] == {"dali": False, "faiss": True, "submitit": True, "apex": False}
    table = (out / "smoke.md").read_text()
    assert "| S9 | Slurm script | PASS |" in table and table in proc.stdout


def test_without_the_bundle_the_table_names_the_missing_module(bare_python, tmp_path):
    out = tmp_path / "smoke"
    proc = run_smoke(bare_python, out, "--bundle", str(tmp_path / "none"), "--only", "S1")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    steps = json.load(open(out / "smoke.json"))["steps"]
    assert [(s["step"], s["status"]) for s in steps] == [("S0", "FAIL"), ("S1", "SKIP")]
    assert steps[0]["detail"].startswith("ModuleNotFoundError: No module named ")
    missing = steps[0]["detail"].split("'")[1]
    assert missing in ("yaml", "tqdm") and f"no bundle at {tmp_path / 'none'}" in steps[0]["detail"]
    assert "| S0 | environment | FAIL | 0.0 | ModuleNotFoundError" in proc.stdout
    assert (out / "S0.traceback.txt").read_text().rstrip().endswith(f"No module named '{missing}'")
