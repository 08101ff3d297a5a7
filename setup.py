from setuptools import find_packages, setup

setup(
    name="hmora",
    version="0.1.0",
    description="Triton-kernel accelerated hierarchical mixture of LoRA experts (HMoRA) for transformers models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # Version policy: every lower bound is the version CI tests in constraints/oldest.txt (Python: the one CI runs);
    # an upper bound only where a major version is untested. constraints/tested.txt holds the exact versions the
    # whole suite passed with.
    python_requires=">=3.11",
    packages=find_packages(include=["hmora", "hmora.*", "hmora_kernels", "hmora_kernels.*", "benchmarks", "benchmarks.*"]),
    install_requires=[
        # torch: install it before or with hmora (README): an unpinned torch pulls a multi-GB CUDA build on CPU machines
        "torch>=2.13",
        "triton>=3.9; platform_system == 'Linux'",
        "transformers>=4.44.2,<6",
        "safetensors>=0.4.5",
        "pyarrow>=14.0.2",
        "tqdm>=4.66.5",
        "numpy>=1.26.4",  # benchmarks: the interpreter's address sets
        "packaging>=23.2",
    ],
    extras_require={
        # accelerate: transformers.Trainer needs it (tests/test_hmora_trainer.py); matplotlib and tensorboard: the
        # tests read back hmora-train's plot and event files; trl: tests/test_hmora_trl.py
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3.5", "hypothesis>=6", "accelerate>=1.1", "matplotlib>=3.8.4",
                 "tensorboard>=2.16.2", "trl>=0.11.4"],
        "plot": ["matplotlib>=3.8.4"],
        "tensorboard": ["tensorboard>=2.16.2"],
    },
    entry_points={
        "console_scripts": [
            "hmora-train=hmora.cli:train_main",
            "hmora-generate=hmora.cli:generate_main",
            "hmora-plot=hmora.plot:plot_main",
            "hmora-bench=benchmarks.cli:main",
        ]
    },
)
