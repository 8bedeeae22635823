"""Layout guarantees: kernels/ only as lorweb_fast.kernels, no repo-root shadowing, info entry point."""

import os
import subprocess
import sys
from pathlib import Path


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


def test_importing_kernels_as_top_level_fails_loudly():
    # Running from the source root puts it on sys.path: the guard must refuse the top-level name.
    bad = run_python("import kernels", REPO)
    assert bad.returncode != 0 and "must only be imported as 'lorweb_fast.kernels'" in bad.stderr


def test_info_prints_versions_and_backends(tmp_path):
    out = run_python("import runpy; runpy.run_module('lorweb_fast.info', run_name='__main__')", tmp_path)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "backend torch", "backend triton", "backend cuda", "torch CUDA build"):
        assert word in out.stdout
