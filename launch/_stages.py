"""The stage scripts of this folder as modules, for the scripts that run another stage's own code in
their process (pipeline.py inline, pseudolabel.py's fine-tunes) and for tests. launch/ is a folder of
scripts, not a package: each is loaded by its path."""
import importlib.util
import os

LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))


def script_path(name: str) -> str:
    return os.path.join(LAUNCH_DIR, f"{name}.py")


def stage_module(name: str):
    """launch/<name>.py as a fresh module (its main() and check())."""
    spec = importlib.util.spec_from_file_location(f"semiscale_stage_{name}", script_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
