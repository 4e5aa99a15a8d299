"""Installs megatron_tinyllama and its console scripts.

torch must be installed first (a CPU or CUDA build of your choice), and deepspeed with
``--no-build-isolation`` so that its build step does not pull another torch; see README.md.
"""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithResources(build_py):
    """Copies ds_configs/ and examples/ into the built package (megatron_tinyllama/resources/),
    where megatron_tinyllama.resources finds them when there is no checkout beside the code."""

    def run(self):
        super().run()
        for name in ("ds_configs", "examples"):
            target = Path(self.build_lib) / "megatron_tinyllama" / "resources" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(Path(__file__).resolve().parent / name, target,
                            ignore=shutil.ignore_patterns("__pycache__"))

# megatron-core 0.17+ requires Python 3.12; on 3.11 the newest is 0.16.x. From 0.18 on,
# `import megatron.core` imports triton (megatron/core/transformer/moe/ops/paged_stash.py, seen on
# 0.18.0 and 0.19.2), which a CPU build of torch does not bring: where triton has wheels (Linux) it
# is required, elsewhere megatron-core stays below 0.18. Markers, not sys.version_info, so the
# choice is the installing machine's (tests/unit/test_requirements.py reads this list).
MCORE_REQUIREMENTS = [
    "megatron-core>=0.16,<0.17; python_version < '3.12'",
    "megatron-core>=0.16,<0.20; python_version >= '3.12' and sys_platform == 'linux'",
    "triton; python_version >= '3.12' and sys_platform == 'linux'",
    "megatron-core>=0.16,<0.18; python_version >= '3.12' and sys_platform != 'linux'",
]
LM_EVAL = "lm-eval[hf]>=0.4.8,<0.5"

setup(
    cmdclass={"build_py": BuildPyWithResources},
    name="megatron-tinyllama",
    version="0.1.0",
    description="TinyLlama-class pretraining with megatron-core layers and DeepSpeed ZeRO-3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_tinyllama", "megatron_tinyllama.*"]),
    # The released over-training testbed results and the multi-power law paper's loss curves (both
    # MIT; see their PROVENANCE.md) ship with the package, so `tinyllama-scaling reproduce` and
    # `forecast-published` need no path after `pip install`.
    package_data={
        "megatron_tinyllama.scaling": [
            "testbed_data/LICENSE.txt",
            "testbed_data/PROVENANCE.md",
            "testbed_data/exp_data/*.csv",
            "testbed_data/exp_data/*.json",
            "testbed_data/exp_data/*.yaml",
            "testbed_data/exp_data/models/*.json",
            "testbed_data/exp_data/evals/*.json",
            "curves_data/LICENSE.txt",
            "curves_data/PROVENANCE.md",
            "curves_data/csv_*/*.csv",
        ]
    },
    install_requires=[
        "torch>=2.4",
        *MCORE_REQUIREMENTS,
        "deepspeed>=0.16,<0.20",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "transformers>=4.45",
        "pyyaml>=6",
        "numpy>=1.24",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "zstandard>=0.22",
        "pyarrow>=14",
        "tqdm>=4.62",
        "psutil>=5.9",  # the launcher watch (train/watchdog.py); deepspeed needs it too
    ],
    extras_require={
        # lm-evaluation-harness for tinyllama-eval (tested with 0.4.13); the test extra carries it
        # because the evaluation tests run in CI.
        "eval": [LM_EVAL],
        "test": ["pytest>=8", "pytest-xdist>=3.5", LM_EVAL],
        # Optional accelerator, used only when importable (the log says "attention backend: ...").
        "flash": ["flash-attn>=2.5"],
    },
    entry_points={
        "console_scripts": [
            "tinyllama-pretrain=megatron_tinyllama.train.pretrain:cli",
            "tinyllama-preprocess-data=megatron_tinyllama.data.preprocess:main",
            "tinyllama-merge-datasets=megatron_tinyllama.data.merge:main",
            "tinyllama-convert-to-hf=megatron_tinyllama.checkpoint.convert:main_to_hf",
            "tinyllama-convert-from-hf=megatron_tinyllama.checkpoint.convert:main_from_hf",
            "tinyllama-scaling=megatron_tinyllama.scaling.cli:main",
            "tinyllama-eval=megatron_tinyllama.evaluation.cli:main",
            "tinyllama-demo=megatron_tinyllama.demo:main",
            "tinyllama-pipeline=megatron_tinyllama.pipeline:main",
            "tinyllama-generate=megatron_tinyllama.generate:main",
            "tinyllama-check-hostfile=megatron_tinyllama.launch:check_hostfile_main",
            "tinyllama-layout=megatron_tinyllama.parallel.layout_plan:main",
        ]
    },
)
