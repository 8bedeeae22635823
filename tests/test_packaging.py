"""Layout guarantees: kernels/ only as lorweb_fast.kernels, no repo-root shadowing, info entry point."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def run_python(code, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_kernels_imports_only_under_lorweb_fast(tmp_path):
    ok = run_python("import lorweb_fast.kernels as k, importlib.util as u; print(k.__name__); "
                    "s = u.find_spec('kernels'); print('top-level kernels:', None if s is None else s.origin)",
                    tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "lorweb_fast.kernels" in ok.stdout
    assert str(REPO / "kernels") not in ok.stdout  # a top-level 'kernels', if any, is not ours


def test_kernels_folder_is_not_a_top_level_package():
    # Running from the source root puts it on sys.path: imported as 'kernels', the folder looks like a stray
    # folder (no __file__, no version) and exposes no submodules.
    out = run_python("import kernels; print('file', getattr(kernels, '__file__', None), list(kernels.__path__))\n"
                     "import kernels.mixed_lora", REPO)
    assert "file None []" in out.stdout, out.stderr
    assert out.returncode != 0 and "No module named 'kernels.mixed_lora'" in out.stderr


def test_info_prints_versions_and_backends(tmp_path):
    out = run_python("import runpy; runpy.run_module('lorweb_fast.info', run_name='__main__')", tmp_path)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "backend torch", "backend triton", "backend cuda", "torch CUDA build"):
        assert word in out.stdout


def test_python_m_lorweb_fast_is_the_command(tmp_path):
    """``python -m lorweb_fast`` runs the ``lorweb-fast`` command (for launchers that take a module:
    ``torchrun -m lorweb_fast train ...``), with its exit statuses: 0 for --help, 2 for a usage error."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    ok = subprocess.run([sys.executable, "-m", "lorweb_fast", "train", "--help"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("usage: lorweb-fast train") and "--data" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lorweb_fast", "nonsense"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "invalid choice: 'nonsense'" in bad.stderr


# ------------------------------------------------------------------ repository root (issue 15, section 4)
def test_repo_root_imports_diffusers_flux_and_transformers():
    """Python started in a clone has the repo root on sys.path, so transformers' probe for the PyPI package
    'kernels' finds our kernels/ folder; it must conclude 'not installed' and import normally."""
    out = run_python("import lorweb_fast, diffusers.models.transformers.transformer_flux, transformers\n"
                     "from transformers import CLIPVisionModelWithProjection\n"
                     "from transformers.utils.import_utils import is_kernels_available\n"
                     "from diffusers.utils.import_utils import is_kernels_available as diffusers_kernels\n"
                     "import lorweb_fast.kernels.mixed_lora as m\n"
                     "print('kernels available:', is_kernels_available(), diffusers_kernels(), m.__name__)", REPO)
    assert out.returncode == 0, out.stderr
    assert "kernels available: False False lorweb_fast.kernels.mixed_lora" in out.stdout


def _tracked_copy(dest):
    """The tracked (and not ignored untracked) files of the checkout, copied to ``dest`` (no build/ or egg-info)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _build_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["LORWEB_FAST_SKIP_CUDA_BUILD"] = "1"
    return env


@pytest.mark.slow
def test_wheel_and_sdist_install_lorweb_fast_kernels(tmp_path):
    """The wheel maps kernels/ to lorweb_fast/kernels/ (and has no top-level kernels); the sdist carries kernels/
    and csrc/ (so it can build the CUDA extension); both install an importable lorweb_fast.kernels.mixed_lora."""
    src = _tracked_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    env = _build_env()
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(dist), str(src)], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert wheel.returncode == 0, wheel.stderr
    sdist = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=src, env=env,
                           capture_output=True, text=True, timeout=600)
    assert sdist.returncode == 0, sdist.stderr
    (whl,) = dist.glob("*.whl")
    (tgz,) = dist.glob("*.tar.gz")
    names = set(zipfile.ZipFile(whl).namelist())
    assert {"lorweb_fast/kernels/__init__.py", "lorweb_fast/kernels/mixed_lora.py"} <= names
    # the license as an SPDX expression (setuptools >= 77 here), not the deprecated pyproject table
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(whl).read(metadata).decode().splitlines()
    assert not any(n.startswith("kernels/") for n in names)
    with tarfile.open(tgz) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {"kernels/__init__.py", "kernels/mixed_lora.py", "csrc/lorweb_ops.cpp", "csrc/lorweb_kernels.cu",
            "csrc/lorweb_ops.h", "setup.py"} <= members
    check = ("import lorweb_fast.kernels.mixed_lora as m, importlib.util as u; print(m.__file__); "
             "print('top-level', u.find_spec('kernels'))")
    for label, target in (("wheel", whl), ("sdist", tgz)):
        site = tmp_path / f"site_{label}"
        inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                               "--target", str(site), str(target)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert inst.returncode == 0, (label, inst.stderr)
        run_env = dict(env, PYTHONPATH=str(site))
        out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=run_env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, (label, out.stderr)
        assert str(site / "lorweb_fast" / "kernels" / "mixed_lora.py") in out.stdout
        assert "top-level None" in out.stdout


def test_the_license_suits_old_and_new_setuptools():
    """setup.py gives the license as an SPDX expression to setuptools >= 77 (pyproject's table form is deprecated
    there, an error from 2027-02-18) and as the license text to older ones, which refuse a string in pyproject (a
    GPU machine's preinstalled setuptools builds the package with --no-build-isolation); pyproject declares it
    dynamic and sets no license itself. The wheel test above builds with this environment's setuptools (>= 77);
    the old branch's metadata ("License: Apache-2.0") was checked by hand with setuptools 70.3 (no download in
    tests), here only the choice between the two."""
    import importlib.util

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("lorweb_fast_setup_script", root / "setup.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # not __main__: defines, builds nothing
    assert script.license_metadata("84.2.1") == script.license_metadata("77.0.0") == {"license_expression":
                                                                                        "Apache-2.0"}
    assert script.license_metadata("70.3.0") == script.license_metadata("76.1.0") == {"license": "Apache-2.0"}
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert "license" not in project and "license" in project["dynamic"]
