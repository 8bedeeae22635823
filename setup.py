"""Build script for lorweb_fast.

The pure-Python package (``lorweb_fast`` plus the Triton sources in ``kernels/``, installed as
``lorweb_fast.kernels``) always installs. The CUDA C++ fallback ``lorweb_fast._C`` is compiled from ``csrc/`` with
ninja when a CUDA-enabled torch and nvcc are present.

Environment flags:
  LORWEB_FAST_SKIP_CUDA_BUILD=1   never build the extension (pure-Python install)
  LORWEB_FAST_FORCE_CUDA_BUILD=1  fail the install if the extension cannot be built
  TORCH_CUDA_ARCH_LIST            architectures to compile for (default "8.0;9.0", i.e. sm_80 and sm_90)
  MAX_JOBS                        parallel compile jobs (honoured by torch's ninja build)
  CUDA_HOME                       toolkit location (e.g. /usr/local/cuda)
"""

import os
import sys

from setuptools import setup

PACKAGES = ["lorweb_fast", "lorweb_fast.kernels"]
# kernels/ is only ever importable as lorweb_fast.kernels: a top-level ``kernels`` is a PyPI package that
# bitsandbytes and diffusers import.
PACKAGE_DIR = {"lorweb_fast": "lorweb_fast", "lorweb_fast.kernels": "kernels"}
CSRC = ["csrc/lorweb_ops.cpp", "csrc/lorweb_kernels.cu"]
DEFAULT_ARCH_LIST = "8.0;9.0"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _log(msg):
    print(f"[lorweb_fast setup] {msg}", file=sys.stderr)


def cuda_extension():
    """Return (ext_modules, cmdclass) for lorweb_fast._C, or ([], {}) when it is not built."""
    skip, force = _flag("LORWEB_FAST_SKIP_CUDA_BUILD"), _flag("LORWEB_FAST_FORCE_CUDA_BUILD")
    if skip and force:
        raise RuntimeError("LORWEB_FAST_SKIP_CUDA_BUILD and LORWEB_FAST_FORCE_CUDA_BUILD are both set")
    if skip:
        _log("LORWEB_FAST_SKIP_CUDA_BUILD=1: installing without the CUDA extension")
        return [], {}
    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:  # torch missing from the build environment
        reason = f"torch is not importable at build time ({exc}); use --no-build-isolation"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
        elif CUDA_HOME is None:
            reason = "no CUDA toolkit found (set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda)"
    if reason is not None:
        if force:
            raise RuntimeError(f"LORWEB_FAST_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {reason}")
        _log(f"skipping the CUDA extension: {reason}")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    _log(f"building lorweb_fast._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
         f"with CUDA_HOME={CUDA_HOME}, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}")
    ext = CUDAExtension(
        name="lorweb_fast._C",
        sources=CSRC,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
