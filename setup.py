"""Build and install fastl2r.

Install against the torch that is already present, so pip never fetches another
one into an isolated build environment::

    pip install torch==2.13.0          # or any torch >= 2.11
    pip install --no-build-isolation -e ".[dev]"
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch  # noqa: F401  (the C++/CUDA extension is built against it)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise SystemExit(
        "fastl2r builds against the torch already installed, and none was found. "
        "Install torch first (e.g. `pip install torch==2.13.0`), then run "
        "`pip install --no-build-isolation -e .`."
    ) from exc

# The Triton kernels live in kernels/ at the top level and install as fastl2r.kernels (package_dir
# below); the developer tools of tools/ (the kernels' compile and spill check) are not installed.
packages = find_packages(include=["fastl2r", "fastl2r.*"]) + ["fastl2r.kernels"]


def _cuda_wanted() -> bool:
    """Build fastl2r._C_cuda? FASTL2R_BUILD_CUDA=0/1 decides; by default, when this torch
    has CUDA and nvcc is found."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    available = torch.version.cuda is not None and bool(nvcc)
    choice = os.environ.get("FASTL2R_BUILD_CUDA")
    if choice == "1" and not available:
        raise SystemExit(f"FASTL2R_BUILD_CUDA=1, but the CUDA extension needs a CUDA build of torch (this is "
                         f"{torch.__version__}) and nvcc (found: {nvcc or 'none'}).")
    return available if choice is None else choice == "1"


def _extensions() -> tuple[list, dict]:
    """The C++ (CPU) extension fastl2r._C, and fastl2r._C_cuda where CUDA can be built
    (csrc/).  Without a C++ compiler the package installs without them and runs on the
    reference ops."""
    compiler = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(compiler) is None:
        print(f"fastl2r: no C++ compiler ({compiler}) was found, so the C++ extension is not built and "
              "fastl2r will run on the reference ops. Install one (e.g. g++) and re-run "
              "`pip install --no-build-isolation -e .`", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # csrc/README.md: every op's schema and CPU kernel, the shared CPU pieces; its CUDA kernel and
    # the torch-facing CUDA module.
    extensions = [CppExtension(
        "fastl2r._C", ["csrc/common/module.cpp", "csrc/common/gemm.cpp",
                       *sorted(glob.glob("csrc/*/schema.cpp") + glob.glob("csrc/*/cpu.cpp"))],
        extra_compile_args={"cxx": ["-O3", *openmp]}, extra_link_args=openmp)]
    if _cuda_wanted():
        extensions.append(CUDAExtension(
            "fastl2r._C_cuda", ["csrc/common/cuda_module.cpp", *sorted(glob.glob("csrc/*/cuda.cu"))],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastl2r",
    version="0.1.0",
    description="Learning to Remember from a Multi-Task Teacher, with fused GPU kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastl2r.kernels": "kernels"},
    # trained meta-learners shipped with the library (fastl2r/trained/README.md)
    package_data={"fastl2r": ["trained/*.pt", "trained/*.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.11",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "ninja>=1.11",
        "triton>=3.6; platform_system == 'Linux'",
    ],
    # nvtx names the NVTX ranges' domain; without it they come from torch.cuda.nvtx (fastl2r/profiling.py).
    # tensorboard: only for --tensorboard (fastl2r/runlog.py); dev installs it so that its test runs.
    extras_require={"dev": ["pytest>=8", "pytest-benchmark>=4", "tensorboard>=2.14"], "nvtx": ["nvtx>=0.2.5"],
                    "tensorboard": ["tensorboard>=2.14"]},
    entry_points={"console_scripts": ["fastl2r-train=fastl2r.train:main"]},
)
