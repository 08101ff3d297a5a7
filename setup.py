from setuptools import find_packages, setup

setup(
    name="hmora",
    version="0.1.0",
    description="Triton-kernel accelerated hierarchical mixture of LoRA experts (HMoRA) for transformers models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["hmora", "hmora.*", "hmora_kernels", "hmora_kernels.*", "benchmarks", "benchmarks.*"]),
    install_requires=[
        # torch is pinned by the installer, not here: an unpinned torch pulls a multi-GB CUDA build on CPU machines
        "torch>=2.4",
        "triton>=3.1; platform_system == 'Linux'",
        "transformers>=4.44",
        "safetensors>=0.4",
        "pyarrow>=14",
        "tqdm>=4.60",
        "numpy>=1.24",  # benchmarks: the interpreter's address sets
    ],
    extras_require={
        # accelerate: transformers.Trainer needs it (tests/test_hmora_trainer.py); matplotlib and tensorboard: the
        # tests read back hmora-train's plot and event files
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "accelerate>=1.1", "matplotlib>=3.7",
                 "tensorboard>=2.14"],
        "plot": ["matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],
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
