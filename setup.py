"""Packaging for the few-step video distillation engine.

Install torch first (``pip install torch==2.13.0`` picks the local CPU build here); a bare ``torch`` requirement on a
machine without torch would pull a multi-GB CUDA build. ``make test`` and ``make demo`` do this in the right order.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.4",
    "triton==3.7.1",  # the Triton that torch 2.13 is built against (docs/architecture.md#versions)
    "deepspeed==0.19.8",  # build with DS_BUILD_OPS=0: no CUDA ops are compiled at install time
    "diffusers==0.42.1",  # AutoencoderKLWan (VAE) and the WanTransformer3DModel parity reference
    # <5.25: transformers 5.25 requires the `kernels` distribution, whose top-level name is our `kernels` package
    "transformers>=4.45,<5.25",
    "safetensors>=0.4",
    "omegaconf>=2.3",
    "pyyaml>=6",
    "numpy>=1.26",
    "av>=12",
    "opencv-python-headless>=4.9",
    "tqdm>=4.66",
    "tensorboard>=2.15",
    "sentencepiece>=0.2",
    "ftfy>=6",
]

EXTRAS = {
    "dali": ["nvidia-dali-cuda120==2.4.0"],
    "gpu": ["flash-attn>=2.6", "xformers>=0.0.28"],
    "dev": [
        "pytest>=8",
        "pytest-benchmark>=4",
        "pytest-timeout>=2.3",
        "hypothesis>=6",
        "ruff>=0.6",
        "accelerate>=1.0",  # diffusers' from_pretrained of WanTransformer3DModel (fp32-kept modules) requires it
        "matplotlib>=3.8",  # the ablation's plots (launcher/ablate.py)
        "wandb>=0.31",  # logging.wandb (tests/train/test_wandb.py runs it offline)
        "peft>=0.14",  # diffusers' LoRA loading (tests/models/test_lora.py loads our LoRA exports with it)
    ],
}

setup(
    name="vidistill",
    version="0.1.0",
    description="Few-step video diffusion distillation (DMD, adaptive regression, temporal regularization) for Wan2.1",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "launcher", "launcher.*"]),
    package_data={"engine": ["assets/*", "assets/*/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
