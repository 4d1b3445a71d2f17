"""Build and install fastl2r.

Install against the torch that is already present, so pip never fetches another
one into an isolated build environment::

    pip install torch==2.13.0          # or any torch >= 2.11
    pip install --no-build-isolation -e ".[dev]"
"""
from setuptools import find_packages, setup

try:
    import torch  # noqa: F401  (the C++/CUDA extension is built against it)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise SystemExit(
        "fastl2r builds against the torch already installed, and none was found. "
        "Install torch first (e.g. `pip install torch==2.13.0`), then run "
        "`pip install --no-build-isolation -e .`."
    ) from exc

packages = find_packages(include=["fastl2r", "fastl2r.*"]) + ["fastl2r.kernels"]

setup(
    name="fastl2r",
    version="0.1.0",
    description="Learning to Remember from a Multi-Task Teacher, with fused GPU kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastl2r.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "nvtx>=0.2.5",
        "ninja>=1.11",
        "pybind11>=2.12",
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={"dev": ["pytest>=8", "pytest-benchmark>=4"]},
    entry_points={"console_scripts": ["fastl2r-train=fastl2r.train:main"]},
)
