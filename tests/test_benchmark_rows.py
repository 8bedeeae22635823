"""bench_mixed_lora's rows and options as a lent GPU session needs them: one failing row keeps the others and the
record (the run then exits 1), options that would fail only minutes into a GPU run are refused up front, the
default file names survive the device tool, and the shrink row launches the tiles the layer launches. CPU only."""

import subprocess
import sys
from pathlib import Path

import pytest

from lorweb_fast.testing import load_module_from_file

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
SMALL = ["--device", "cpu", "--m", "10", "--shapes", "40x24", "--num-loras", "3", "--no-rank-sweep", "--modes", "fwd",
         "--reps", "1", "--warmup", "0", "--no-profile"]


def fail_measure(bench, monkeypatch, name: str, error: Exception) -> list:
    """``bench.measure`` raising ``error`` for implementation ``name``; returns the list of measured names."""
    real_measure, calls = bench.measure, []

    def measure(impl, problem, mode, timer):
        calls.append(impl.name)
        if impl.name == name:
            raise error
        return real_measure(impl, problem, mode, timer)

    monkeypatch.setattr(bench, "measure", measure)
    return calls


@pytest.fixture
def bench():
    return load_module_from_file(BENCH_DIR / "bench_mixed_lora.py", "bench_mixed_lora_rows")


def test_a_row_that_raises_is_recorded_and_the_run_goes_on(bench, monkeypatch, tmp_path):
    """A row whose timing raises (a compile error, an API change of a compared library) was the end of the whole
    run, leaving no record at all: it is recorded as failed with its error, every other row is measured, and the
    record is written after each row."""
    fail_measure(bench, monkeypatch, "torch", RuntimeError("inductor exploded\nsecond line"))
    record = bench.main(SMALL + ["--impls", "linear", "torch", "cublas_composed", "--out-dir", str(tmp_path),
                                 "--tag", "rows"])
    rows = {r["impl"]: r for r in record["results"]}
    assert rows["torch"]["failed"] and rows["torch"]["error"] == "RuntimeError: inductor exploded\nsecond line"
    assert rows["linear"]["median_ms"] > 0 and rows["cublas_composed"]["median_ms"] > 0
    assert record["complete"] and (tmp_path / "rows.json").exists() and (tmp_path / "rows.md").exists()


def test_the_script_exits_1_when_a_row_failed(tmp_path):
    """Run as a script (as the GPU scripts do: its ``__main__`` block, executed as written), a failed row makes
    the exit status 1 after the record is written."""
    code = ("import sys, textwrap\n"
            f"sys.path.insert(0, {str(BENCH_DIR)!r})\n"
            "import bench_mixed_lora as b\n"
            "def fail(*a, **k):\n    raise RuntimeError('no')\n"
            "b.Impl._low_level = fail\n"
            "block = open(b.__file__).read().split('if __name__ == \"__main__\":')[1]\n"
            "sys.argv = ['bench_mixed_lora.py'] + sys.argv[1:]\n"
            "exec(textwrap.dedent(block), vars(b))\n")
    res = subprocess.run([sys.executable, "-c", code, *SMALL, "--impls", "linear", "cublas_composed", "--out-dir",
                          str(tmp_path), "--tag", "t"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "cublas_composed fwd failed: RuntimeError: no" in res.stderr
    assert "bench_mixed_lora: 1 rows failed (recorded with their errors)" in res.stderr
    assert (tmp_path / "t.json").exists()


@pytest.fixture
def one_gpu(monkeypatch):
    """torch answering as a machine with one CUDA GPU (only parse_args runs)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("extra,fragment", [
    (["--rank", "3", "--no-rank-sweep"], "--rank 3: the Triton rows (shrink, expand) need a power-of-two"),
    (["--num-loras", "64", "--rank", "16"], "above the Triton kernels' maximum N*r of 256"),
    (["--num-loras", "2", "--rank", "32"], "--rank 32 does not divide the N*r sweep's totals"),
    (["--device", "banana"], "--device 'banana' is not a device"),
    (["--device", "cuda:3"], "--device cuda:3: this machine has 1 CUDA GPU(s)"),
])
def test_options_that_would_fail_minutes_into_a_gpu_run_are_refused(bench, capsys, one_gpu, extra, fragment):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--out-dir", "unused", *extra])
    assert exc.value.code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--impls", "linear", "torch"],
                                   ["--impls", "linear", "triton"]])  # the triton backend routes rank 3 to cuBLAS
def test_rank_3_is_fine_without_the_rows_that_launch_the_kernels_directly(bench, one_gpu, extra):
    args = bench.parse_args(["--rank", "3", "--no-rank-sweep", *extra])
    assert args.rank == 3


def test_the_triton_rows_rank_check_does_not_apply_on_cpu(bench, monkeypatch):
    """On a CPU the shrink and expand rows are skipped anyway: their rank limits refuse nothing there."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.parse_args(["--rank", "3", "--no-rank-sweep", "--device", "cpu"]).rank == 3


def test_a_failed_row_is_not_profiled_and_the_run_goes_on(bench, monkeypatch, tmp_path):
    """The profiler pass ran every row of the profiled configuration again, outside the per-row error handling: a
    failed row raised there and ended the run (the grid's other configurations lost). It is noted as not profiled;
    every configuration runs and the record completes."""
    fail_measure(bench, monkeypatch, "torch", RuntimeError("simulated API change"))
    args = [a for a in SMALL if a != "--no-profile"]
    args[args.index("--shapes") + 1:args.index("--shapes") + 2] = ["40x24", "24x40"]
    record = bench.main(args + ["--impls", "linear", "torch", "--profile", "--out-dir", str(tmp_path), "--tag", "p"])
    assert record["complete"] and sorted({(r["in"], r["out"]) for r in record["results"]}) == [(24, 40), (40, 24)]
    profile = (tmp_path / "p_profile.txt").read_text()
    assert "== torch: not profiled: its row failed (RuntimeError: simulated API change)" in profile
    assert "== linear (fwd_bwd)" in profile


def test_a_sticky_cuda_error_stops_the_run_and_says_where(bench, monkeypatch, tmp_path):
    """After an illegal memory access every CUDA call of the process fails: the failing row is recorded, the run
    stops there (no cascade of rows failing with the same error), the record says where, lists the configurations
    not run, and is not complete."""
    calls = fail_measure(bench, monkeypatch, "torch",
                         RuntimeError("CUDA error: an illegal memory access was encountered"))
    args = list(SMALL)
    args[args.index("--shapes") + 1:args.index("--shapes") + 2] = ["40x24", "24x40"]
    record = bench.main(args + ["--impls", "linear", "torch", "cublas_composed", "--out-dir", str(tmp_path),
                                "--tag", "s"])
    assert calls == ["linear", "torch"]  # nothing after the lost context
    assert [r["impl"] for r in record["results"]] == ["linear", "torch"] and record["results"][1]["failed"]
    assert record["complete"] is False and record["stopped"].startswith("CUDA context lost after torch fwd at M=10")
    assert [(c["in_features"], c["out_features"]) for c in record["not_run"]] == [(24, 40)]
    assert "**Stopped: CUDA context lost" in (tmp_path / "s.md").read_text()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])
    assert "--device cuda: no CUDA GPU is visible" in capsys.readouterr().err


def test_default_file_names_keep_to_the_characters_the_device_tool_returns(bench):
    """The default stem holds the commit, which may read "abc (LORWEB_COMMIT)" or "abc+modified": names with other
    characters than [A-Za-z0-9._-] do not come back from the device machine."""
    assert bench.safe_file_stem("mixed_lora_cpu_2026-11-25_0123456789ab (LORWEB_COMMIT)") == \
        "mixed_lora_cpu_2026-11-25_0123456789ab_LORWEB_COMMIT"
    assert bench.safe_file_stem("flux_block_x_2026_1077cec1b0e7+modified") == "flux_block_x_2026_1077cec1b0e7_modified"


def test_default_record_name_of_a_modified_tree(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "git_commit", lambda: "1077cec1b0e7+modified")
    record = bench.main(SMALL + ["--impls", "linear", "--out-dir", str(tmp_path), "--no-check"])
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.name == f"mixed_lora_cpu_{record['date'][:10]}_1077cec1b0e7_modified.json"


def test_the_shrink_row_looks_its_tiles_up_under_the_layers_shape(bench, monkeypatch):
    """The layer's forward launches shrink with out_features (the tile table is keyed on (in, out)); the shrink row
    did not, so for 12288->3072 it timed untuned default tiles the layer never runs."""
    import torch

    seen = {}

    def shrink(x2d, a_cat, coeffs, scale, rows_per_sample, r, **kwargs):
        seen.update(kwargs)
        return None, torch.zeros(x2d.shape[0], a_cat.shape[0])

    impl = bench.Impl.__new__(bench.Impl)
    impl.name, impl.launchers, impl._cache = "shrink", (lambda a, b: (a, b), shrink, None), {}
    monkeypatch.setattr(impl, "_cached", lambda key, make: make(), raising=False)
    x = torch.randn(2, 5, 8)
    impl._low_level(x, torch.randn(3, 8), None, torch.randn(2, 8, 4), torch.randn(2, 4, 3), torch.rand(2, 2), 1.0)
    assert seen.get("out_features") == 3


def test_a_profiler_table_that_fails_is_recorded_and_the_run_completes(bench, monkeypatch, tmp_path):
    """A failure of the profiler pass itself (not a lost CUDA context) costs the table, not the run."""
    def broken(impls, problem, path, failed=None):
        raise OSError("disk full")

    monkeypatch.setattr(bench, "profile_table", broken)
    args = [a for a in SMALL if a != "--no-profile"]
    record = bench.main(args + ["--impls", "linear", "--profile", "--out-dir", str(tmp_path), "--tag", "pe"])
    assert record["complete"] and record["profile_error"] == "OSError: disk full" and "stopped" not in record
