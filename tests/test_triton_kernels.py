"""Runs tests/triton_interpret_cases.py in a subprocess with TRITON_INTERPRET=1 set before triton is imported."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("triton_interpret_cases.py")
#: other test files with interpreter-only cases (skipped unless TRITON_INTERPRET=1): the file and its -k selection
INTERPRETER_CASES_ELSEWHERE = {"test_half_precision_range.py": "triton"}


@pytest.mark.parametrize("cases", [CASES.name, *INTERPRETER_CASES_ELSEWHERE])
def test_triton_kernels_under_the_interpreter(tmp_path, cases):
    triton = pytest.importorskip("triton")
    from lorweb_fast import ops

    if ops._version_tuple(triton.__version__) < ops.MIN_INTERPRETER_TRITON:
        pytest.skip(f"the CPU interpreter of triton {triton.__version__} cannot run the kernels (see "
                    "test_old_triton_interpreter_is_refused_by_name)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("PYTHONPATH", None)
    select = ["-k", INTERPRETER_CASES_ELSEWHERE[cases]] if cases in INTERPRETER_CASES_ELSEWHERE else []
    proc = subprocess.run([sys.executable, "-m", "pytest", str(CASES.with_name(cases)), *select, "-q", "-p",
                           "no:cacheprovider", "--import-mode=importlib", "--rootdir", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    last = proc.stdout.splitlines()[-1]
    assert re.search(r"\b[1-9]\d* passed", last) and not re.search(r"\d+ (failed|errors?)\b", last), tail
    print(proc.stdout.splitlines()[-1])


def test_old_triton_interpreter_is_refused_by_name(monkeypatch):
    """Triton 3.6's interpreter fails inside the kernels with an unrelated-looking TypeError: a backend named on CPU
    tensors under TRITON_INTERPRET=1 with such a Triton raises BackendUnavailableError naming the version."""
    triton = pytest.importorskip("triton")
    import torch

    from lorweb_fast import ops

    if ops._TRITON_KERNELS is None:
        pytest.skip("the Triton kernels do not import here")
    assert ops._version_tuple("3.6.0") == (3, 6) and ops._version_tuple("3.8.0+git1a2b") == (3, 8)
    assert ops._version_tuple("3.7.0rc1") == (3, 7)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU status line, also on a GPU machine
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    with pytest.raises(ops.BackendUnavailableError, match=r"interpreter of triton 3\.6\.0 .*triton >= 3\.7"):
        ops.resolve_backend("triton", torch.device("cpu"))
    assert ops.backend_status()["triton"].startswith("unavailable: ")
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    monkeypatch.setattr(ops._TRITON_KERNELS, "kernels_interpreted", lambda: True)  # as if set before the import
    assert ops.resolve_backend("triton", torch.device("cpu")) == "triton"
    assert ops.backend_status()["triton"].startswith("available: Triton interpreter")


def test_triton_older_than_host_tma_descriptors_is_refused_by_name(tmp_path):
    """The sm_90 tables launch with host-side TMA descriptors (Triton >= 3.4): an older Triton makes the kernels
    refuse to import by name, so backend='triton' is unavailable with that reason instead of failing on the first
    TMA launch with an ImportError from inside a layer."""
    pytest.importorskip("triton")
    code = ("import triton; triton.__version__ = '3.3.1'\n"
            "from lorweb_fast import ops\n"
            "print(ops.backend_status()['triton'])\n")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert ("unavailable: the Triton kernels cannot be imported (ImportError: lorweb_fast's Triton kernels need "
            "triton >= 3.4 (host-side TMA descriptors), found triton 3.3.1") in proc.stdout, proc.stdout
