"""GPU readiness audit (fresh): defects that would cost device minutes on the lent H200, shown on CPU.

Each test failed on the audited commit (608abfe) and passes since the fix of the fortieth session.

1. A stale ``lorweb_fast._C`` from an earlier build stays importable after an install that records it did not build
   the extension (``LORWEB_FAST_SKIP_CUDA_BUILD=1``, the fallback ``benchmarks/gpu_common.sh`` takes when the forced
   build fails), and ``backend='cuda'`` then runs that old binary instead of raising the recorded build error.
   On the device machine "ignored build outputs already there are kept between calls", so a second
   ``run_on_gpu.sh`` on a warm machine whose csrc/ no longer compiles tests and times the previous call's binary.
2. A carried wheel (``shared/wheels``, what ``run_on_gpu.sh`` installs with ``--no-deps`` and puts first on
   PYTHONPATH) that needs a package neither carried nor on the H200 image: importlib_metadata 10.2.0 imports
   ``lazy_importer`` at import time, so the carried copy shadows nothing usefully and cannot be imported there.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import types
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch

from lorweb_fast import ops

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- 1. stale extension after a skipped build
def _minimal_tree(dst: Path) -> Path:
    """The files setup.py needs (as tests/test_cuda_extension.py copies them), in ``dst``."""
    src = dst / "src"
    shutil.copytree(REPO / "csrc", src / "csrc")
    shutil.copytree(REPO / "kernels", src / "kernels")
    (src / "lorweb_fast" / "evaluation").mkdir(parents=True)
    shutil.copy(REPO / "setup.py", src / "setup.py")
    shutil.copy(REPO / "pyproject.toml", src / "pyproject.toml")
    shutil.copy(REPO / "lorweb_fast" / "__init__.py", src / "lorweb_fast" / "__init__.py")
    shutil.copy(REPO / "lorweb_fast" / "evaluation" / "__init__.py", src / "lorweb_fast" / "evaluation")
    return src


def test_skipped_cuda_build_removes_a_stale_in_place_extension(tmp_path):
    """setup.py (``cuda_extension``, skip path) with LORWEB_FAST_SKIP_CUDA_BUILD=1 must not leave the in-place
    ``lorweb_fast/_C<EXT_SUFFIX>`` of an earlier build behind: the install records "not built"
    (``_cuda_build_info.BUILD_ERROR``), yet ``ops._load_cuda_extension`` would import the old binary.

    benchmarks/gpu_common.sh ``gpu_setup`` reinstalls with SKIP=1 when the forced build fails; the forced path
    (``BuildExtensionOrReport.build_extensions`` with force) re-raises before its stale-binary removal, and the skip
    path returns before any removal. Expected: the skip (and every not-built) path removes the stale binary, as the
    failed non-forced build already does (tests/test_cuda_extension.py::
    test_setup_installs_without_the_extension_when_its_compile_fails)."""
    src = _minimal_tree(tmp_path)
    stale = src / "lorweb_fast" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    stale.write_bytes(b"a binary from an earlier device call")
    env = {k: v for k, v in os.environ.items() if k not in ("LORWEB_FAST_FORCE_CUDA_BUILD", "PYTHONPATH")}
    env["LORWEB_FAST_SKIP_CUDA_BUILD"] = "1"
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = {}
    exec((src / "lorweb_fast" / "_cuda_build_info.py").read_text(), info)
    assert info["BUILD_ERROR"] == "LORWEB_FAST_SKIP_CUDA_BUILD=1 was set"
    assert not stale.exists(), "the install says the extension was not built, but the old binary is still importable"


def test_cuda_backend_refuses_an_extension_the_install_records_as_not_built(monkeypatch):
    """ops._unavailable_reason("cuda"): when ``_cuda_build_info.BUILD_ERROR`` records that the last install did not
    build lorweb_fast._C (skipped, or its compile failed), an importable ``_C`` can only be a stale binary of an
    earlier build. Expected: backend 'cuda' is unavailable, naming the recorded reason (as README and setup.py
    promise: "backend='cuda' will raise naming this error"), not silently available. (The GPU is faked: torch sees
    one device and the extension reports code for it.)"""
    why = "its compile failed (RuntimeError: Error compiling objects for extension)"
    info = types.ModuleType("lorweb_fast._cuda_build_info")
    info.BUILD_ERROR, info.TORCH_CUDA_ARCH_LIST, info.CUDA_VERSION = why, "9.0", "13.0"
    monkeypatch.setitem(sys.modules, "lorweb_fast._cuda_build_info", info)
    monkeypatch.setattr(ops, "_CUDA_EXT", types.ModuleType("lorweb_fast._C"))  # the stale binary, imported
    monkeypatch.setattr(ops, "_cuda_ext_supports", lambda index: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = ops._unavailable_reason("cuda", torch.device("cuda", 0))
    assert reason is not None and why in reason, reason


# ------------------------------------------------------------------------- 2. carried wheels the image cannot import
#: Distribution names (PEP 503 normalised) on the lent H200's image, from /work/.library/device/KINDS.md (the image
#: "cuda" as read on 2026-11-17); only what a carried wheel may need is listed.
H200_IMAGE_PACKAGES = {
    "accelerate", "filelock", "fsspec", "huggingface-hub", "jinja2", "networkx", "ninja", "numpy", "packaging",
    "pillow", "psutil", "pyyaml", "regex", "requests", "safetensors", "setuptools", "sympy", "tokenizers", "torch",
    "tqdm", "transformers", "triton", "typing-extensions", "zipp", "peft", "matplotlib", "scipy",
}


def _normalise(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _unmet_requirements(wheel: Path, available: set) -> list:
    """The Requires-Dist of ``wheel`` that apply on the H200 (CPython 3.12, Linux x86_64, no extras) and are not in
    ``available``."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    unmet = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        if _normalise(req.name) not in available:
            unmet.append(str(req))
    return unmet


def test_carried_wheels_need_nothing_the_h200_image_lacks():
    """Every wheel in shared/wheels (benchmarks/collect_wheels.sh fills it; gpu_common.sh installs it with
    ``--no-deps --target`` and puts it first on PYTHONPATH) must have its install requirements either carried too or
    on the H200 image. importlib_metadata 10.2.0 (collect_wheels.sh pins the version installed here) requires
    ``lazy-importer`` (imported at module import: importlib_metadata/compat/py314.py), which is neither: the carried
    copy cannot be imported on the device. (diffusers on Python 3.12 uses the standard library's importlib.metadata,
    so the wheel is not needed at all, or a version importable with the standard library, such as 8.7.x.) Skipped
    when no wheels were collected in this checkout."""
    wheels = sorted((REPO / "shared" / "wheels").glob("*.whl"))
    if not wheels:
        pytest.skip("no carried wheels in shared/wheels")
    carried = {_normalise(w.name.split("-")[0]) for w in wheels}
    available = carried | H200_IMAGE_PACKAGES
    problems = {w.name: unmet for w in wheels if (unmet := _unmet_requirements(w, available))}
    assert not problems, f"carried wheels whose requirements are neither carried nor on the H200 image: {problems}"
