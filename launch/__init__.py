"""The command-line scripts, importable as `launch.<name>` by the pipeline, the Slurm launcher and the
tests: the stages (`python launch/<stage>.py --config ...`, declared in trainer.runtime.stages: pretrain,
finetune, pseudolabel, fixmatch, active, evaluate, predict, and pipeline, which runs them in order) and
the tools around them, each with its own options: prepare (builds a dataset), export (a classifier as
TorchScript and ONNX), bench (the benchmark suites in launch/benches/), submit (a stage as a Slurm job) and
report (a finished run's TensorBoard event files)."""
