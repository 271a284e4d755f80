"""Packaging for distill-mixins.

`trainer/` and `checkpointer/` sit at the top level of the repository (the design
card) but install only as `distill_mixins.trainer` and `distill_mixins.checkpointer`:
PyPI already has unrelated top-level packages of those names.
"""

from setuptools import find_packages, setup

core = find_packages(include=["distill_mixins", "distill_mixins.*"])

setup(
    name="distill-mixins",
    version="0.1.0",
    description="Distill multi-step video diffusion teachers into 1-4 step students by composing mixins.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=core + ["distill_mixins.trainer", "distill_mixins.checkpointer"],
    package_data={"distill_mixins.toy": ["weights/*.safetensors", "weights/*.safetensors.xz"]},
    package_dir={
        "distill_mixins.trainer": "trainer",
        "distill_mixins.checkpointer": "checkpointer",
    },
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "einops>=0.7",
        "loguru>=0.7",
        "transformers>=4.40",
        "numpy>=1.24",
        "tqdm>=4.60",
    ],
    extras_require={
        "parallel": ["megatron-core>=0.8"],
        "flash": ["flash-attn>=2.5"],
        "diffusers": ["diffusers>=0.32"],
        "lora": ["peft>=0.13"],
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.5", "setuptools>=64", "wheel"],
    },
    entry_points={"console_scripts": ["distill-mixins=distill_mixins.cli:main"]},
)
