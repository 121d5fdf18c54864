from setuptools import setup

setup(
    name="semiscale",
    version="0.1.0",
    description="Distributed semi-supervised image classification: Barlow Twins, balanced "
                "pseudo-labels, FixMatch, active learning, multi-scale TTA",
    packages=["trainer", "trainer.runtime", "trainer.algorithms", "trainer.operations", "data", "data.prepare", "launch", "launch.benches"],
    package_data={"trainer.operations": ["annotate.html"]},   # the annotation page (active.py serve)
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4", "torchvision>=0.19", "numpy", "pyyaml", "tqdm", "pillow",
        "matplotlib", "submitit", "onnx", "onnxruntime",   # onnx*: launch/export.py
        "tensorboard",   # run.log=[tensorboard], launch/report.py tb
    ],
    extras_require={
        # faiss comes as one of two builds that provide the same module: pick exactly one
        "cpu": ["faiss-cpu"],
        "gpu": ["faiss-gpu"],
        "dali": ["nvidia-dali-cuda120"],
        "dev": ["pytest", "pytest-xdist", "scikit-learn", "selenium"],   # selenium: the annotation page's browser test
        "track": ["wandb>=0.19.10", "mlflow-skinny"],   # run.log=[wandb] / [mlflow]; wandb: reinit="create_new"
    },
)
