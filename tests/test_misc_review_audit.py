"""Review of parallel.py, aot.py and info.py: defects found by an independent review, one failing test each.
CPU only, nothing downloaded."""

import subprocess
import sys

import pytest
import torch

import lorweb_fast as lf
from lorweb_fast import parallel
from lorweb_fast.testing import tiny_flux_config


def test_tensor_parallel_refusal_sees_through_torch_compile():
    """``parallel.enable_parallelism(torch.compile(transformer), TensorParallelConfig(...))`` on a LoRWeB FLUX
    transformer. Now: the plan check matches the ``_tp_plan`` keys against the wrapper's module names
    (``_orig_mod.transformer_blocks.0...``), finds no LoRWeB layer, and forwards the call to diffusers, which dies
    with ``AttributeError: 'LoRWeBLinear' object has no attribute 'weight'``. Should: raise
    TensorParallelNotSupportedError (as for the uncompiled transformer, README "tensor-parallel configs raise
    TensorParallelNotSupportedError before anything is sharded"), the model unchanged."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models._modeling_parallel import TensorParallelConfig

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**tiny_flux_config()).eval()
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=12))
    compiled = torch.compile(model)  # lazy: nothing is compiled until a call
    with pytest.raises(parallel.TensorParallelNotSupportedError, match="tensor parallelism is not supported"):
        parallel.enable_parallelism(compiled, TensorParallelConfig(tp_degree=2))
    assert getattr(model, "_parallel_config", None) is None


def test_aot_compile_all_closes_its_progress_bar_when_a_compile_fails(monkeypatch):
    """``aot.compile_all`` when a specialization fails to compile (ptxas error) or the user presses Ctrl-C. Now: the
    "compiling for sm_XX" bar is left open (``bar.close()`` is not in a ``finally``): it stays registered with tqdm,
    a later bar in the same process is drawn one line lower, and after Ctrl-C ``python -m lorweb_fast.aot`` prints
    "interrupted" on the bar's line and the bar is redrawn after it at exit. Should: the bar is closed on every
    exit."""
    import tqdm.auto

    from lorweb_fast import aot

    bars = []

    class RecordingBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    def failing_job(job):
        raise RuntimeError("ptxas failed on sm_80")

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    monkeypatch.setattr(aot, "_COMPILED", {})
    monkeypatch.setattr(aot, "_compile_job", failing_job)
    specs = {"k0": aot.Specialization("_shrink_kernel", {}, {}, {}, {"num_warps": 4}, "k0")}
    try:
        with pytest.raises(RuntimeError, match="ptxas failed"):
            aot.compile_all(specs, 80, jobs=1, progress=True)
        assert len(bars) == 1
        assert bars[0].disable, "the progress bar was left open after the failed compile"
    finally:
        for bar in bars:
            bar.close()


def test_info_refuses_unknown_arguments(tmp_path):
    """``python -m lorweb_fast.info --json`` (an option it does not have). Now: the argument is ignored, the text
    table is printed and the status is 0. Should: as README *Exit statuses* says for ``python -m lorweb_fast.info``
    ("2 bad input"), a one-line usage error naming the command on stderr and status 2 (argparse, as ``aot``)."""
    proc = subprocess.run([sys.executable, "-m", "lorweb_fast.info", "--json"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-500:])
    assert "python -m lorweb_fast.info" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_info_main_called_from_python_does_not_read_the_callers_argv(monkeypatch, capsys):
    """``lorweb_fast.info.main()`` from Python (a notebook, a test under pytest) parses no arguments: the caller's own
    ``sys.argv`` (pytest's, a kernel's ``-f ...``) made it exit with status 2 once it took an argument parser."""
    from lorweb_fast import info

    monkeypatch.setattr(sys, "argv", ["pytest", "-q", "--some-flag", "tests/"])
    info.main()
    assert "torch" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        info.main(["--json"])
    assert exit_info.value.code == 2
