"""The stage scripts (`python launch/<stage>.py --config ...`), importable as `launch.<stage>` by the
pipeline, the Slurm launcher and the tests."""
