"""Host-side logic of the benchmark and tuning scripts in benchmarks/ (the numbers committed as the GPU record): ratios,
medians, budgets, record fields, the tuner's winner and gates, with deterministic fake timings (CPU only, seconds)."""

import importlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from lorweb_fast.testing import load_module_from_file

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name, alias=None):
    return load_module_from_file(BENCH_DIR / f"{name}.py", alias or name)


@pytest.fixture
def bench():
    return _load("bench_mixed_lora", "bench_mixed_lora_guards")


def _on_path(name):
    sys.path.insert(0, str(BENCH_DIR))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH_DIR))


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        return self.t

    monotonic = perf_counter


def _table_rows(table):
    """{impl: {column: cell}} of the markdown table's data rows (the last row of an impl wins)."""
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        row = dict(zip(header, cells))
        rows[(row.get("M") or row.get("scenario"), row["impl"])] = row
    return rows


# ------------------------------------------------------------------------------------------- bench_mixed_lora
def _row(impl, ms, M=8, mode="fwd", skipped=False, **extra):
    return dict(impl=impl, mode=mode, M=M, **{"in": 40}, out=24, N=3, r=4, dtype="bf16",
                median_ms=None if skipped else ms, eager_ms=None if skipped else ms * 2, peak_mem_mb=None,
                **({"skipped": True, "skip_reason": "x"} if skipped else {}), **extra)


def test_ratio_table_columns_hold_the_right_ratio(bench):
    """Each "× ref" column is this row's time over the ref row's time of the same configuration, under the header
    that names that ref; a skipped ref gives "-" (not a crash), and in→out is in→out."""
    results = [_row("linear", 2.0), _row("official_einsum", 4.0), _row("official_as_run", 8.0),
               _row("torch", 1.0, tflops=12.34, tbps=0.5),
               _row("linear", 2.0, M=16), _row("official_einsum", 0, M=16, skipped=True), _row("torch", 3.0, M=16)]
    rows = _table_rows(bench.ratio_table(results))
    torch_row = rows[("8", "torch")]
    assert torch_row["× linear"] == "0.500"
    assert torch_row["× official_einsum"] == "0.250"
    assert torch_row["× official_as_run"] == "0.125"
    assert torch_row["device ms"] == "1.0000" and torch_row["eager ms"] == "2.0000"
    assert torch_row["in→out"] == "40→24" and torch_row["N·r"] == "12"
    assert torch_row["TFLOP/s"] == "12.3" and torch_row["TB/s"] == "0.50"
    other = rows[("16", "torch")]
    assert other["× linear"] == "1.500" and other["× official_einsum"] == "-" and other["× official_as_run"] == "-"
    assert ("16", "official_einsum") not in rows


def test_timer_discards_warmup_rotates_inputs_and_reports_the_median(bench, monkeypatch):
    """Timer.measure on CPU: warm-up calls run first and are not timed, inputs rotate i % n_inputs, and the reported
    time is the median (not the mean) of the timed calls."""
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    durations = iter([1000.0, 1000.0, 5.0, 1.0, 3.0, 100.0, 2.0])  # ms; the first two are the warm-up
    calls = []

    def fn(i):
        calls.append(i)
        clock.t += next(durations) / 1e3

    device_ms, eager_ms = bench.Timer(torch.device("cpu"), warmup=2, reps=5, budget_s=1e9).measure(fn, 3)
    assert calls == [0, 1, 0, 1, 2, 0, 1]
    assert device_ms == pytest.approx(3.0) and eager_ms == pytest.approx(3.0)


@pytest.mark.parametrize("budget_s,expected_calls", [(0.1, 5), (2.0, 5), (4.0, 9)])
def test_timer_row_budget_half_and_minimum_five_calls(bench, monkeypatch, budget_s, expected_calls):
    """A row stops once half its --budget-s is spent, never before 5 timed calls (0.25 s per call: budget 2 s -> 5
    calls, budget 4 s -> 9 calls, budget 0.1 s -> still 5)."""
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    calls = []

    def fn(i):
        calls.append(i)
        clock.t += 0.25

    bench.Timer(torch.device("cpu"), warmup=0, reps=20, budget_s=budget_s).measure(fn, 1)
    assert len(calls) == expected_calls


def test_build_configs_target_first_and_rank_sweep(bench):
    """The full grid starts with the target (M=8192, 3072->3072, 3-D, the run's N*r), then the METHOD.md M and the
    2-D norm layers, then the rest; the N*r sweep adds the other totals (not the run's own) at 3072->3072, M=8192,
    with N = total / r."""
    args = bench.parse_args(["--full-grid"])
    configs = bench.build_configs(args, on_gpu=False)
    assert configs[0] == dict(M=8192, in_features=3072, out_features=3072, N=32, r=4, two_d=False)
    assert sum(bench.is_target(c, args) for c in configs) == 1
    prio = [0 if bench.is_target(c, args) else 1 if c["two_d"] or c["M"] in (8192, 8704, 15360) else 2
            for c in configs]
    assert prio == sorted(prio) and prio.count(2) > 0
    sweep = [c for c in configs if c["N"] != 32]
    assert sorted((c["M"], c["in_features"], c["out_features"], c["N"], c["r"]) for c in sweep) == [
        (8192, 3072, 3072, n, 4) for n in (4, 16, 64)]
    assert not bench.is_target(dict(configs[0], N=64), args)  # another N*r
    assert not bench.is_target(dict(configs[0], two_d=True), args)
    args = bench.parse_args(["--shapes", "40x24", "--m", "10", "--no-rank-sweep"])
    assert bench.build_configs(args, on_gpu=False) == [
        dict(M=10, in_features=40, out_features=24, N=32, r=4, two_d=False)]


def test_samples_for_two_samples_when_even(bench):
    """M tokens are 2 samples (different mixtures) when M is even, 1 when odd; a 2-D layer has M samples."""
    assert bench.samples_for(10) == (2, 5) and bench.samples_for(9) == (1, 9)
    assert bench.samples_for(6, True) == (6, None)


SMALL = ["--device", "cpu", "--m", "10", "--shapes", "40x24", "--num-loras", "3", "--no-rank-sweep", "--modes", "fwd",
         "--reps", "1", "--warmup", "0"]


def test_record_names_commit_versions_and_work_rates(bench, monkeypatch, tmp_path):
    """The record and its table name the commit (also in the default file name), triton's version and whether the
    check ran; rows carry in/out as given; TFLOP/s and TB/s are FLOPs and bytes over the row's median time."""
    monkeypatch.setattr(bench, "git_commit", lambda: "c0ffee123456")
    record = bench.main(SMALL + ["--impls", "linear", "--out-dir", str(tmp_path), "--no-check"])
    assert record["commit"] == "c0ffee123456" and record["checked_against_reference"] is False
    assert record["triton"] == bench.installed_triton_version()
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.name == f"mixed_lora_cpu_{record['date'][:10]}_c0ffee123456.json"
    md = json_path.with_suffix(".md").read_text()
    assert "- commit: c0ffee123456" in md and f"- date: {record['date']}" in md
    (row,) = record["results"]
    assert (row["in"], row["out"], row["M"]) == (40, 24, 10)
    m, k, out, e = 10, 40, 24, 2  # bf16
    seconds = row["median_ms"] * 1e-3
    assert row["tflops"] == pytest.approx(2.0 * m * k * out / seconds / 1e12)
    assert row["tbps"] == pytest.approx(e * (m * k + k * out + m * out) / seconds / 1e12)


def test_record_is_written_after_each_configuration(bench, monkeypatch, tmp_path):
    """A run that stops in its second configuration leaves the first one's rows on disk, marked partial."""
    make_problem = bench.make_problem
    made = []

    def failing(*a, **k):
        made.append(1)
        if len(made) == 2:
            raise RuntimeError("stopped")
        return make_problem(*a, **k)

    monkeypatch.setattr(bench, "make_problem", failing)
    args = [a if a != "10" else "10" for a in SMALL]
    args[args.index("--m") + 1:args.index("--m") + 2] = ["10", "12"]
    with pytest.raises(RuntimeError, match="stopped"):
        bench.main(args + ["--impls", "linear", "--out-dir", str(tmp_path), "--tag", "cut"])
    data = json.loads((tmp_path / "cut.json").read_text())
    assert data["complete"] is False and [r["M"] for r in data["results"]] == [10]
    assert "Partial record" in (tmp_path / "cut.md").read_text()


def test_total_budget_judges_by_the_longest_configuration(bench, monkeypatch, tmp_path):
    """--total-budget-s uses the longest configuration so far, not the last one: 40 s then 10 s with an 85 s budget
    runs the second (40 + 40 <= 85) but not the third (50 + 40 > 85; the last one's 10 s would have fit); the
    table lists what was not run."""
    import time as real_time

    offset = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: real_time.perf_counter() + offset[0]))
    make_problem = bench.make_problem
    costs = iter([40.0, 10.0, 10.0])

    def slow(*a, **k):
        offset[0] += next(costs)
        return make_problem(*a, **k)

    monkeypatch.setattr(bench, "make_problem", slow)
    args = list(SMALL)
    args[args.index("--m") + 1:args.index("--m") + 2] = ["10", "12", "14"]
    record = bench.main(args + ["--impls", "linear", "--total-budget-s", "85", "--out-dir", str(tmp_path),
                                "--tag", "b"])
    assert [r["M"] for r in record["results"]] == [10, 12]
    assert [c["M"] for c in record["not_run"]] == [14]
    assert "Not run (total budget spent)" in (tmp_path / "b.md").read_text()


def test_compiled_rows_come_last_within_a_configuration(bench, tmp_path, monkeypatch):
    """Within a configuration the compiled rows run (and are recorded) after the others."""
    monkeypatch.delenv("LORWEB_BENCH_COMPILE_CPU", raising=False)
    record = bench.main(SMALL + ["--impls", "torch_compile", "linear", "--out-dir", str(tmp_path), "--tag", "o"])
    assert [r["impl"] for r in record["results"]] == ["linear", "torch_compile"]


def test_profile_goes_to_the_target_at_n_r_128(bench, tmp_path, monkeypatch):
    """--profile profiles the target shape at N*r = 128 (METHOD.md), not the first target-shaped configuration."""
    monkeypatch.setattr(bench, "TARGET", dict(M=10, in_features=40, out_features=24))
    profiled = []
    monkeypatch.setattr(bench, "profile_table",
                        lambda impls, problem, path, failed=None: profiled.append(problem["lora_a"].shape))
    args = [a for a in SMALL if a != "--no-rank-sweep"]
    bench.main(args + ["--full-grid", "--rank", "4", "--impls", "linear", "--out-dir", str(tmp_path), "--tag", "p",
                       "--profile"])
    assert [s[0] * s[2] for s in profiled] == [128]


def test_make_step_rotates_more_inputs_than_the_cache(bench):
    """The input pool holds up to 8 distinct inputs (more than twice the L2 for small inputs)."""
    problem = bench.make_problem(dict(M=10, in_features=40, out_features=24, N=3, r=4, two_d=False),
                                 torch.float32, torch.device("cpu"))
    step, n_inputs = bench.make_step(bench.Impl("linear", torch.device("cpu"), torch.float32), problem, "fwd")
    assert n_inputs == 8
    step(7)


def test_git_commit_marks_a_modified_tree_and_an_explicit_commit(bench, monkeypatch):
    """git_commit: LORWEB_COMMIT is taken as given and says so; otherwise HEAD, "+modified" when tracked files
    differ."""
    monkeypatch.setenv("LORWEB_COMMIT", "0123456789abcdef")
    assert bench.git_commit() == "0123456789ab (LORWEB_COMMIT)"
    monkeypatch.delenv("LORWEB_COMMIT")
    status = [" M lorweb_fast/ops.py\n"]

    def fake_run(cmd, **kw):
        return types.SimpleNamespace(stdout="abc123\n" if "rev-parse" in cmd else status[0])

    monkeypatch.setattr(bench, "subprocess", types.SimpleNamespace(run=fake_run))
    assert bench.git_commit() == "abc123+modified"
    status[0] = ""
    assert bench.git_commit() == "abc123"


# ------------------------------------------------------------------------------------------- bench_flux_block
def test_flux_block_table_ratios_and_budget(monkeypatch, tmp_path):
    """bench_flux_block's table: × base, × official and × official_as_run are this row over that row of the same
    scenario (the coeffs rows over per_layer_call); the header names the commit; --total-budget-s 0 runs the first
    row only and skips the profile."""
    pytest.importorskip("diffusers")
    fb = _load("bench_flux_block", "bench_flux_block_guards")
    times = iter([2.0, 8.0, 16.0, 4.0, 1.0, 3.0, 6.0, 1.5, 1.0, 1.25, 0.5, 2.0])
    seen = []

    class FakeTimer:
        host_bound = False

        def __init__(self, *a, **k):
            pass

        def run(self, fn, n):
            value = next(times)
            self.host_bound = value == 2.0 and len(seen) > 0  # the last row (per_layer_call): outran its sleep
            seen.append(value)
            return value

    monkeypatch.setattr(fb, "Timer", FakeTimer)
    monkeypatch.setattr(fb, "check_block", lambda *a, **k: None)
    monkeypatch.setattr(fb, "git_commit", lambda: "feed12345678")
    record = fb.main(["--device", "cpu", "--out-dir", str(tmp_path), "--tag", "f", "--no-profile"])
    assert record["commit"] == "feed12345678" and record["complete"] is True
    md = (tmp_path / "f.md").read_text()
    assert "commit: feed12345678" in md
    rows = _table_rows(md)
    ours = rows[("train", "lorweb_fast")]
    assert (ours["× base"], ours["× official"], ours["× official_as_run"]) == ("2.000", "0.500", "0.250")
    assert rows[("infer", "official")]["× base"] == "3.000"
    assert rows[("infer_merged", "lorweb_fast_merged")]["× base"] == "1.250"
    assert rows[("infer_merged", "lorweb_fast_merged")]["× official"] == "-"
    assert rows[("coeffs", "set_query_once")]["× base"] == "0.250"
    # a row whose calls outran the timer's sleep is marked (its time includes host time), the others are not
    assert [r["impl"] for r in record["results"] if r.get("host_bound")] == ["per_layer_call"]
    assert "| coeffs | per_layer_call | 2.000 (host-bound) |" in md and md.count("(host-bound)") == 1

    times = iter([2.0, 0.5, 0.25])
    monkeypatch.setattr(fb, "profile_averages", lambda *a, **k: (_ for _ in ()).throw(AssertionError("profiled")))
    record = fb.main(["--device", "cpu", "--out-dir", str(tmp_path), "--tag", "g", "--profile",
                      "--total-budget-s", "0"])
    ran = [(r["scenario"], r["impl"]) for r in record["results"] if not r.get("skipped")]
    assert ran == [("train", "base"), ("coeffs", "set_query_once"), ("coeffs", "per_layer_call")]
    assert all(r["skip_reason"] == "--total-budget-s spent" for r in record["results"] if r.get("skipped"))
    assert "skipped: --total-budget-s spent" in (tmp_path / "g_profile.txt").read_text()


def test_flux_adapter_cost_table_lists_the_largest_difference_first():
    """The per-kernel difference table is sorted by (ours - base), largest first."""
    from torch.autograd import DeviceType

    fb = _load("bench_flux_block", "bench_flux_block_guards2")

    def ev(key, us):
        return types.SimpleNamespace(key=key, self_device_time_total=us, self_cpu_time_total=0.0,
                                     device_type=DeviceType.CUDA, is_user_annotation=False, count=1)

    base = [ev("gemm", 100.0), ev("small", 10.0)]
    ours = [ev("gemm", 130.0), ev("small", 12.0), ev("big_new", 50.0), ev("faster", 0.0)]
    lines = fb.adapter_cost_table(base, ours, torch.device("cuda")).splitlines()[2:]
    assert [ln.split()[-1] for ln in lines] == ["big_new", "gemm", "small", "faster"]


# ------------------------------------------------------------------------------------------- tune_kernels
@pytest.mark.parametrize("script, args, refused", [
    ("bench_mixed_lora", ["--reps", "0"], "argument --reps: expected an integer >= 1, got 0"),
    ("bench_mixed_lora", ["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got -1"),
    ("bench_mixed_lora", ["--m", "8192", "0"], "argument --m: expected an integer >= 1, got 0"),
    ("bench_mixed_lora", ["--num-loras", "x"], "argument --num-loras: expected an integer >= 1, got 'x'"),
    ("bench_mixed_lora", ["--rank", "0"], "argument --rank: expected an integer >= 1, got 0"),
    ("bench_mixed_lora", ["--budget-s", "-1"], "argument --budget-s: expected a finite number of seconds >= 0"),
    ("bench_mixed_lora", ["--total-budget-s", "nan"], "argument --total-budget-s: expected a finite number"),
    ("bench_flux_block", ["--reps", "0"], "argument --reps: expected an integer >= 1, got 0"),
    ("bench_flux_block", ["--total-budget-s", "-40"], "argument --total-budget-s: expected a finite number"),
    ("bench_flux_block", ["--budget-s", "inf"], "argument --budget-s: expected a finite number"),
    ("tune_kernels", ["--budget-s", "-5"], "argument --budget-s: expected a finite number of seconds >= 0"),
    ("tune_kernels", ["--tokens", "0"],
     "argument --tokens: expected an even number of rows >= 2 (two samples), got 0"),
    ("tune_kernels", ["--tokens", "63"],
     "argument --tokens: expected an even number of rows >= 2 (two samples), got 63"),
    ("bench_mixed_lora", ["--shapes", "40x24", "0x24"], "argument --shapes: expected INxOUT with both > 0"),
    ("bench_mixed_lora", ["--shapes", "40x-24"], "argument --shapes: expected INxOUT with both > 0"),
    ("bench_mixed_lora", ["--shapes", "40:24"], "argument --shapes: expected INxOUT with both > 0"),
    ("tune_kernels", ["--ranks", "128", "-4"], "argument --ranks: expected an integer >= 1, got -4"),
    ("tune_kernels", ["--ranks", "6"], "argument --ranks: expected a multiple of r = 4 up to MAX_FUSED_R = 256"),
    ("tune_kernels", ["--ranks", "128", "516"], "argument --ranks: expected a multiple of r = 4 up to MAX_FUSED_R"),
    ("tune_kernels", ["--ranks", "1024"], "argument --ranks: expected a multiple of r = 4 up to MAX_FUSED_R"),
    ("tune_kernels", ["--confirm-rounds", "0"], "argument --confirm-rounds: expected an integer >= 1, got 0"),
    ("tune_kernels", ["--device", "cuda"], "unrecognized arguments: --device cuda"),
    ("tune_kernels", ["--min-gain", "1"], "argument --min-gain: expected a fraction in [0, 1), got 1"),
    ("tune_kernels", ["--min-gain", "nan"], "argument --min-gain: expected a fraction in [0, 1), got nan"),
    ("host_overhead", ["--calls", "0"], "argument --calls: expected an integer >= 1, got 0"),
    ("kernel_resources", ["--out", "r.json", "--m", "-8"],
     "argument --m: expected an even number of rows >= 2 (two samples), got -8"),
    ("kernel_resources", ["--out", "r.json", "--m", "1"],
     "argument --m: expected an even number of rows >= 2 (two samples), got 1"),
    ("kernel_resources", ["--out", "r.json", "--m", "8191"],
     "argument --m: expected an even number of rows >= 2 (two samples), got 8191"),
    ("kernel_resources", ["--out", "r.json", "--in-features", "0"], "argument --in-features: expected an integer"),
])
def test_scripts_refuse_bad_numbers_by_name(script, args, refused, capsys):
    """A count <= 0 (or < 0 warm-up calls), negative or non-finite seconds and a --min-gain outside [0, 1) are refused
    by argparse with the option and the value named (exit 2), before anything is set up; the smallest valid values
    (0 warm-up calls, a budget of 0 s) are accepted elsewhere in these tests."""
    module = _on_path(script)
    with pytest.raises(SystemExit) as exc:
        module.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert refused in err and "Traceback" not in err


@pytest.fixture
def tuner(monkeypatch):
    tk = _on_path("tune_kernels")
    return tk


def test_tuner_ranks_are_those_the_launchers_serve(tuner, capsys):
    """--ranks: multiples of r = 4 (a power of two, as the launchers need) up to the launchers' own MAX_FUSED_R, both
    ends accepted; anything else is an argparse error (exit 2) before a shape is set up (it used to raise inside the
    shape setup, outside any try)."""
    K = pytest.importorskip("lorweb_fast.kernels.mixed_lora")
    assert tuner.max_fused_r() == K.MAX_FUSED_R == tuner.FALLBACK_MAX_FUSED_R
    assert tuner.LORA_RANK & (tuner.LORA_RANK - 1) == 0
    args = tuner.parse_args(["--ranks", "4", str(K.MAX_FUSED_R)])
    assert args.ranks == [4, K.MAX_FUSED_R] and [item["R"] for item in tuner.sweep_plan(args)][:2] == [4, 256]
    for bad in ("6", str(K.MAX_FUSED_R + 4)):
        with pytest.raises(SystemExit) as exc:
            tuner.parse_args(["--ranks", bad])
        assert exc.value.code == 2 and "argument --ranks" in capsys.readouterr().err


@pytest.mark.parametrize("item, refused", [("0:3072", "need in and out > 0"), ("3072:-1", "need in and out > 0"),
                                           ("3072x3072", "must look like 3072:3072")])
def test_tuner_layers_refuses_bad_pairs(tuner, item, refused):
    """--layers entries are in:out pairs of integers > 0; 48:40 is read as (48, 40)."""
    with pytest.raises(SystemExit, match=refused):
        tuner.layers_from(tuner.parse_args(["--layers", "48:40", item]))
    assert tuner.layers_from(tuner.parse_args(["--layers", "48:40"])) == ((48, 40),)


def test_tuner_summary_path(tuner):
    """The summary goes beside an --out table, else under benchmarks/results/ (never into the shipped configs/)."""
    assert tuner.summary_path(Path("/x/sm90.json"), True) == Path("/x/sm90_summary.json")
    assert tuner.summary_path(Path("/x/sm90.json"), False) == BENCH_DIR / "results" / "tune_sm90_summary.json"


def test_tuner_loaded_spills_takes_the_largest_per_kernel(tuner, monkeypatch):
    """loaded_spills: per kernel name the largest spill of its loaded specializations; no spill, no entry."""
    kr = _on_path("kernel_resources")
    kern = lambda n: types.SimpleNamespace(n_spills=n)  # noqa: E731
    monkeypatch.setattr(kr, "loaded_specializations", lambda: iter([
        ("_expand", 0, "a", kern(8)), ("_expand", 0, "b", kern(4)), ("_shrink", 0, "c", kern(0))]))
    assert tuner.loaded_spills() == {"_expand": 8}


def _run_tuner(tuner, monkeypatch, tmp_path, timing, *, kernels=("shrink",), admit=None, table=None,
               extra=(), clock=None, pools=None):
    """tune() on CPU with the launchers replaced by shape-only stubs, the gate by ``admit(role, cfg)`` and the timer by
    ``timing(role, cfg, nth_call_of_this_cfg)`` (each timing calls the last input of the pool); returns (summary
    record, written table or None, benched names); ``pools`` (a list) receives each timing's pool size."""
    import lorweb_fast.kernels.mixed_lora as K

    last = []

    def shrink(x, a_cat, coeffs, scale, rps, rank, u_in=None, config=None, out_features=None):
        last.append(("shrink_dy" if u_in is not None else "shrink", config))
        m, r = x.shape[0], a_cat.shape[0]
        if u_in is None:
            return torch.zeros(m, r), torch.zeros(m, r)
        return None, torch.zeros(m, r), torch.zeros(m, coeffs.shape[1])

    def expand(x, w, z, b, bias=None, config=None, weight_layout=None):
        last.append(("expand_dx" if weight_layout == "in_out" else "expand", config))
        return torch.zeros(x.shape[0], b.shape[1])

    def grad_basis(*a, config=None, **k):
        last.append(("grad_basis", config))
        return torch.zeros(1), torch.zeros(1)

    monkeypatch.setattr(K, "shrink", shrink)
    monkeypatch.setattr(K, "expand", expand)
    monkeypatch.setattr(K, "grad_basis", grad_basis)
    monkeypatch.setattr(tuner, "role_references", lambda name, *a: [])
    monkeypatch.setattr(tuner, "admissible", lambda name, call, refs, batch, device: (
        call(), (admit(*last[-1]) if admit else None))[1])
    counts, benched = {}, []

    def fake_bench(fn, n_inputs=1):
        benched.append(fn.__name__)
        if pools is not None:
            pools.append(n_inputs)
        if clock is not None:
            clock.t += 1.0
        if fn.__name__ in ("fused", "composed"):
            fn(n_inputs - 1)
            return 1.0 if fn.__name__ == "fused" else 2.0
        last.clear()
        fn(n_inputs - 1)
        role, cfg = last[-1]
        key = json.dumps([role, cfg], sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
        return timing(role, cfg, counts[key])

    monkeypatch.setattr(tuner, "_bench", fake_bench)
    if clock is not None:
        monkeypatch.setattr(tuner, "time", clock)
    out = tmp_path / "sm_test.json"
    start = table if table is not None else json.loads(K.config_path("default").read_text())
    out.write_text(json.dumps(start))
    before = out.read_text()
    args = tuner.parse_args(["--layers", "48:40", "--tokens", "64", "--ranks", "8", "--dtypes", "float32",
                             "--out", str(out), "--kernels", *kernels, *extra])
    assert tuner.tune(args, device=torch.device("cpu")) == 0
    summary_file = tmp_path / "sm_test_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    written = None if out.read_text() == before else json.loads(out.read_text())
    return summary, written, benched


def _small(tuner, monkeypatch, n=3):
    small = {role: cands[:n] for role, cands in tuner.CANDIDATES.items()}
    monkeypatch.setattr(tuner, "CANDIDATES", small)
    return small


def test_tuner_confirms_a_gain_over_alternating_rounds(tuner, monkeypatch, tmp_path):
    """A candidate whose one sweep timing is 5 % faster than the table's tiles (noise: timed again it ties) is not
    adopted: the table's tiles and the candidate are timed again alternately, 5 rounds each (table first in even
    rounds, candidate first in odd ones), and the medians of the rounds decide; the summary records the rounds and
    both medians. A candidate that stays 5 % faster over the rounds is adopted."""
    small = _small(tuner, monkeypatch)
    order = []

    def timing(steady_gain):
        def t(role, cfg, n):
            if cfg not in small[role]:
                order.append("table")
                return 10.0
            i = small[role].index(cfg)
            if i == 1:
                order.append("best")
                return 9.5 if n == 1 else 10.0 * (1 - steady_gain)
            return 12.0
        return t

    summary, written, _ = _run_tuner(tuner, monkeypatch, tmp_path, timing(0.0))
    (role,) = summary["roles"]
    assert role["best"] == small["shrink"][1] and role["best_ms"] == 9.5 and role["table_ms"] == 10.0
    assert role["adopted"] is False and written["entries"][0]["shrink"] == role["table"] != small["shrink"][1]
    confirm = role["confirm"]
    assert confirm["rounds"] == 5 and summary["confirm_rounds"] == 5
    assert confirm["table_ms"] == [10.0] * 5 and confirm["best_ms"] == [10.0] * 5
    assert confirm["table_median_ms"] == 10.0 and confirm["best_median_ms"] == 10.0
    assert order[:2] == ["table", "best"]  # the sweep: the table's tiles, then candidate 1 (0 and 2 are not recorded)
    assert order[2:] == ["table", "best", "best", "table", "table", "best", "best", "table", "table", "best"]
    order.clear()
    summary, written, _ = _run_tuner(tuner, monkeypatch, tmp_path, timing(0.05),
                                     extra=("--confirm-rounds", "3"))
    (role,) = summary["roles"]
    assert role["adopted"] is True and role["confirm"]["best_median_ms"] == pytest.approx(9.5)
    assert len(role["confirm"]["best_ms"]) == 3 and len(order) == 2 + 6
    assert written["entries"][0]["shrink"] == small["shrink"][1]


def test_tuner_skips_the_confirmation_when_nothing_beat_the_table(tuner, monkeypatch, tmp_path):
    """No candidate faster than the table's tiles by --min-gain in the sweep: no confirmation rounds are timed
    (``confirm`` is null); table tiles that failed (infinitely slow) are replaced without rounds either."""
    small = _small(tuner, monkeypatch)
    summary, _, benched = _run_tuner(tuner, monkeypatch, tmp_path,
                                     lambda role, cfg, n: 10.0 if cfg not in small[role] else 11.0)
    (role,) = summary["roles"]
    assert role["confirm"] is None and role["adopted"] is False
    assert [b for b in benched if b not in ("fused", "composed")] == ["<lambda>"] * 4  # table, 3 candidates


def test_tuner_adopts_only_a_gain_above_min_gain(tuner, monkeypatch, tmp_path):
    """A candidate replaces the table's tiles only when faster by more than --min-gain (1 %): 0.5 % faster is not
    adopted, 5 % faster is; the winner is the fastest candidate, and the summary records the times and min_gain."""
    small = _small(tuner, monkeypatch)

    def timing(gain):
        def t(role, cfg, n):
            if cfg not in small[role]:
                return 10.0  # the table's tiles
            return {0: 12.0, 1: 10.0 * (1 - gain), 2: 11.0}[small[role].index(cfg)]
        return t

    summary, written, _ = _run_tuner(tuner, monkeypatch, tmp_path, timing(0.005))
    (role,) = summary["roles"]
    assert summary["min_gain"] == 0.01
    assert role["best"] == small["shrink"][1] and role["best_ms"] == pytest.approx(9.95)
    assert role["table_ms"] == 10.0 and role["adopted"] is False
    summary, written, _ = _run_tuner(tuner, monkeypatch, tmp_path, timing(0.05))
    (role,) = summary["roles"]
    assert role["adopted"] is True
    (entry,) = written["entries"]
    assert entry["shrink"] == small["shrink"][1] and written["tuned"] is True


def test_tuner_does_not_call_the_tables_own_tiles_adopted(tuner, monkeypatch, tmp_path):
    """When the fastest candidate is the table's own tiles (timed again, a little faster), nothing changed: adopted is
    false, so the summary's count of changed roles is right."""
    import lorweb_fast.kernels.mixed_lora as K

    small = _small(tuner, monkeypatch)
    table = json.loads(K.config_path("default").read_text())
    for rule in table["defaults"]:
        rule["shrink"] = dict(small["shrink"][1])
    summary, _, _ = _run_tuner(tuner, monkeypatch, tmp_path,
                               lambda role, cfg, n: (10.0 if n == 1 else 5.0) if cfg == small[role][1] else 20.0,
                               table=table)
    (role,) = summary["roles"]
    assert role["best"] == role["table"] and role["adopted"] is False


def test_tuner_keeps_the_route_when_a_forward_roles_table_tiles_stay_refused(tuner, monkeypatch, tmp_path):
    """A shape whose table tiles are refused and replaced by no candidate is not written, and its route is not
    re-measured with those refused tiles."""
    _small(tuner, monkeypatch)
    summary, written, benched = _run_tuner(tuner, monkeypatch, tmp_path, lambda role, cfg, n: 1.0,
                                           kernels=("shrink", "expand"),
                                           admit=lambda role, cfg: "wrong result: x" if role == "shrink" else None)
    assert written is None
    assert "fused" not in benched and "composed" not in benched
    assert [r["role"] for r in summary["roles"]] == ["shrink", "expand"]


def test_tuner_table_tiles_that_raise_are_replaced(tuner, monkeypatch, tmp_path):
    """The table's tiles failing at run time (out of resources) count as infinitely slow: the best candidate wins."""
    small = _small(tuner, monkeypatch)

    def timing(role, cfg, n):
        if cfg not in small[role]:
            raise RuntimeError("out of resources")
        return 3.0

    summary, written, _ = _run_tuner(tuner, monkeypatch, tmp_path, timing)
    (role,) = summary["roles"]
    assert role["table_ms"] is None and role["adopted"] is True and written is not None
    assert role["confirm"] is None  # nothing to time the candidate against


def test_tuner_budget_stops_the_candidates_and_the_roles(tuner, monkeypatch, tmp_path):
    """--budget-s: once spent, no further candidate or role is timed; the best so far is kept, after its
    confirmation rounds (5 each of the table's tiles and the candidate)."""
    small = _small(tuner, monkeypatch)
    clock = FakeClock()
    summary, written, benched = _run_tuner(
        tuner, monkeypatch, tmp_path, lambda role, cfg, n: 1.0 if cfg in small[role] else 10.0,
        kernels=("shrink", "shrink_dy"), extra=("--budget-s", "1.5"), clock=clock)
    (role,) = summary["roles"]  # shrink_dy never started
    assert role["role"] == "shrink" and role["best"] == small["shrink"][0] and role["adopted"]
    assert [b for b in benched if b not in ("fused", "composed")] == ["<lambda>"] * 12  # table, candidate, 2 x 5
    assert role["confirm"]["rounds"] == 5


@pytest.mark.parametrize("budget_s, compared", [("100", True), ("27.5", False)])
def test_tuner_compares_the_route_only_within_the_budget(tuner, monkeypatch, tmp_path, budget_s, compared):
    """After the forward roles of a shape, the fused route is timed against the composed one and the faster is
    written (here fused, 1.0 against 2.0, replacing the table's composed); once --budget-s is spent (each timing
    advances the clock by 1 s: the shrink and expand timings end at 28 s) the two timings are not run and the table's
    route is kept. The candidates here beat the table's tiles, so each role also times 5 confirmation rounds of both
    (4 + 10 timings per role: 28 in all)."""
    import lorweb_fast.kernels.mixed_lora as K

    small = _small(tuner, monkeypatch)
    table = json.loads(K.config_path("default").read_text())
    for rule in table["defaults"]:
        rule["route"] = "composed"
    summary, written, benched = _run_tuner(
        tuner, monkeypatch, tmp_path, lambda role, cfg, n: 1.0 if cfg in small[role] else 10.0,
        kernels=("shrink", "expand"), table=table, extra=("--budget-s", budget_s), clock=FakeClock())
    assert [r["role"] for r in summary["roles"]] == ["shrink", "expand"]
    assert len([b for b in benched if b not in ("fused", "composed")]) == 28
    assert (("fused" in benched) and ("composed" in benched)) is compared
    (entry,) = written["entries"]
    assert entry["route"] == ("fused" if compared else "composed")


def test_tuner_note_keeps_the_previous_sweep(tuner, monkeypatch, tmp_path):
    """The written table's note names what this sweep measured and keeps the previous tuned table's note."""
    import lorweb_fast.kernels.mixed_lora as K

    small = _small(tuner, monkeypatch)
    table = json.loads(K.config_path("default").read_text())
    kept = {k: v for k, v in table["defaults"][0].items() if k not in ("dtypes", "max_R")}
    table.update(tuned=True, note="OLD SWEEP NOTE",
                 entries=[{**kept, "in": 96, "out": 96, "R": 8, "dtype": "float32"}])
    _, written, _ = _run_tuner(tuner, monkeypatch, tmp_path,
                               lambda role, cfg, n: 1.0 if cfg in small[role] else 10.0, table=table)
    assert "roles shrink of 48->40 R=8 float32." in written["note"]
    assert "Before this sweep: OLD SWEEP NOTE" in written["note"]
    assert [(e["in"], e["out"]) for e in written["entries"]] == [(96, 96), (48, 40)]


def test_tuner_records_commit_triton_and_date(tuner, monkeypatch, tmp_path):
    """The summary and the table's note name the commit (LORWEB_COMMIT when set, else git HEAD, else "unknown"), the
    Triton version and the date of the sweep."""
    import re

    triton = pytest.importorskip("triton")
    small = _small(tuner, monkeypatch)
    monkeypatch.setenv("LORWEB_COMMIT", "0123456789abcdef")
    summary, written, _ = _run_tuner(tuner, monkeypatch, tmp_path,
                                     lambda role, cfg, n: 1.0 if cfg in small[role] else 10.0)
    assert summary["commit"] == "0123456789ab (LORWEB_COMMIT)" and summary["triton"] == triton.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", summary["date"])
    note = written["note"]
    assert "commit 0123456789ab (LORWEB_COMMIT)" in note and f"triton {triton.__version__}" in note
    assert summary["date"] in note


def test_provenance_falls_back_to_git_head_then_unknown(monkeypatch):
    """provenance(): without LORWEB_COMMIT the commit is git HEAD of the checkout, and "unknown" where git fails."""
    bml = _on_path("bench_mixed_lora")
    kr = _on_path("kernel_resources")
    monkeypatch.delenv("LORWEB_COMMIT", raising=False)

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(bml, "subprocess", types.SimpleNamespace(run=no_git))
    assert kr.provenance()["commit"] == "unknown"
    monkeypatch.setattr(bml, "subprocess", types.SimpleNamespace(
        run=lambda cmd, **kw: types.SimpleNamespace(stdout="abc123\n" if "rev-parse" in cmd else "")))
    assert kr.provenance()["commit"] == "abc123"


def test_tuner_pool_exceeds_twice_the_l2_for_any_tokens(tuner, monkeypatch, tmp_path):
    """The copies of x and of dy rotated through the timed calls exceed twice the L2 whatever --tokens is (a fixed
    pool of 3 small inputs fitted in the H200's L2), and are never fewer than 3."""
    mib = 2 ** 20
    assert tuner.pool_size(48 * mib, 48 * mib, 60 * mib) == 3  # the default shapes: 3 copies of 48 MiB
    assert tuner.pool_size(10 ** 9, 10 ** 9, 60 * mib) == 3
    for tokens in (2, 64, 1024, 8192):
        x_bytes, dy_bytes = tokens * 15360 * 2, tokens * 3072 * 2
        n = tuner.pool_size(x_bytes, dy_bytes, 60 * mib)
        assert n * min(x_bytes, dy_bytes) > 2 * 60 * mib and n >= 3
    assert tuner.cache_bytes(torch.device("cpu")) == 0
    _small(tuner, monkeypatch)
    monkeypatch.setattr(tuner, "cache_bytes", lambda device: mib)  # a 1 MiB L2 against 64 x 40 fp32 dy = 10 KiB
    pools = []
    summary, _, _ = _run_tuner(tuner, monkeypatch, tmp_path, lambda role, cfg, n: 1.0, pools=pools)
    want = 2 * mib // (64 * 40 * 4) + 1
    assert pools and set(pools) == {want} and want * 64 * 40 * 4 > 2 * mib  # every timing, the last copy called
    assert summary["l2_bytes"] == mib


def test_tuner_writes_nothing_for_a_shape_with_no_role_timed(tuner, monkeypatch, tmp_path):
    """A composed-route shape swept for expand_dx only (a role it never launches) times nothing and is not written."""
    import lorweb_fast.kernels.mixed_lora as K

    _small(tuner, monkeypatch)
    table = json.loads(K.config_path("default").read_text())
    for rule in table["defaults"]:
        rule["route"] = "composed"
    summary, written, benched = _run_tuner(tuner, monkeypatch, tmp_path, lambda role, cfg, n: 1.0,
                                           kernels=("expand_dx",), table=table)
    assert written is None and summary is None and benched == []


# ------------------------------------------------------------------------------------------- kernel_resources
CUOBJDUMP = """
Resource usage:
 Common:
  GLOBAL:0
 Function _Z3fooPf:
  REG:32 STACK:0 SHARED:1024 LOCAL:16 CONSTANT[0]:380 TEXTURE:0 SURFACE:0 SAMPLER:0
  REG:99 STACK:0 SHARED:0 LOCAL:0
 Function _Z3barv:
  REG:64 STACK:8 SHARED:0 LOCAL:0
"""


def test_kernel_resources_parses_cuobjdump(monkeypatch):
    """resource_table: one entry per function, integer values, a REG line outside a function ignored."""
    kr = _load("kernel_resources", "kernel_resources_guards")
    monkeypatch.setattr(kr, "subprocess", types.SimpleNamespace(
        run=lambda *a, **k: types.SimpleNamespace(stdout=CUOBJDUMP)))
    table = kr.resource_table("cuobjdump", Path("x.cubin"))
    assert table == {"_Z3fooPf": {"REG": 32, "STACK": 0, "SHARED": 1024, "LOCAL": 16, "CONSTANT[0]": 380,
                                  "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0},
                     "_Z3barv": {"REG": 64, "STACK": 8, "SHARED": 0, "LOCAL": 0}}


def test_kernel_resources_lists_each_jit_function_once_and_reads_tuple_caches(monkeypatch):
    """jit_functions unwraps wrappers and lists a function once; loaded_specializations reads the (cache, ...) tuple
    form of device_caches and the plain dict form."""
    pytest.importorskip("triton")
    kr = _load("kernel_resources", "kernel_resources_guards2")
    import lorweb_fast.kernels.mixed_lora as mod

    found = kr.jit_functions()
    assert found
    name, fn = found[0]
    monkeypatch.setattr(mod, "zz_alias", types.SimpleNamespace(fn=fn), raising=False)
    again = kr.jit_functions()
    assert len(again) == len(found) and len({id(f) for _, f in again}) == len(again)

    inited = []
    kernel = types.SimpleNamespace(_init_handles=lambda: inited.append(1))
    fake = types.SimpleNamespace(device_caches={0: ({"k0": kernel}, None), 1: {"k1": kernel}})
    monkeypatch.setattr(kr, "jit_functions", lambda: [("_k", fake)])
    assert [(a, d, k) for a, d, k, _ in kr.loaded_specializations()] == [("_k", 0, "k0"), ("_k", 1, "k1")]
    assert len(inited) == 2


def test_kernel_resources_main_counts_local_memory(monkeypatch, tmp_path, capsys):
    """main: the report holds the driver's attributes, and kernels with spills or local bytes are counted."""
    kr = _load("kernel_resources", "kernel_resources_guards3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    monkeypatch.setattr(kr, "run_backends", lambda *a: {"triton": "ran"})
    monkeypatch.setattr(kr, "triton_kernels", lambda: [{"kernel": "a", "spills": 0}, {"kernel": "b", "spills": 4}])
    monkeypatch.setattr(kr, "extension_kernels", lambda: [{"kernel": "c", "local_bytes": 8, "stack_bytes": 0},
                                                          {"kernel": "d", "local_bytes": 0, "stack_bytes": 8}])
    assert kr.main(["--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "2 Triton and 2 extension kernels; 2 with spills or local memory" in out
    assert "'kernel': 'b'" in out and "'kernel': 'c'" in out and "'kernel': 'd'" not in out
    assert json.loads((tmp_path / "r.json").read_text())["device"] == "FakeGPU"


@pytest.mark.parametrize("backends, triton_rows, ext_rows, counted", [
    ({"triton": "ran", "cuda": "failed: RuntimeError: no kernel image"}, [{"kernel": "a"}], [{"kernel": "c"}],
     "1 Triton and 1 extension kernels"),
    ({"triton": "ran", "cuda": "ran"}, [{"kernel": "a"}], [{"error": "cuobjdump not found"}],
     "1 Triton and 0 extension kernels"),
    ({"triton": "ran", "cuda": "ran"}, [{"error": "Triton kernels not importable: x"}], [{"kernel": "c"}],
     "0 Triton and 1 extension kernels"),
])
def test_kernel_resources_fails_on_a_failed_backend_or_an_error_entry(monkeypatch, tmp_path, capsys, backends,
                                                                      triton_rows, ext_rows, counted):
    """main: a backend that failed, or an error entry instead of a kernel list, exits 1 (the report is still
    written and says what failed); error entries are not counted as kernels."""
    kr = _load("kernel_resources", "kernel_resources_guards5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    monkeypatch.setattr(kr, "run_backends", lambda *a: backends)
    monkeypatch.setattr(kr, "triton_kernels", lambda: triton_rows)
    monkeypatch.setattr(kr, "extension_kernels", lambda: ext_rows)
    assert kr.main(["--out", str(tmp_path / "r.json")]) == 1
    captured = capsys.readouterr()
    assert counted in captured.out and "FAILED:" in captured.err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["backends"] == backends


def test_kernel_resources_report_names_commit_triton_and_date(monkeypatch, tmp_path):
    """resources.json names the commit (LORWEB_COMMIT), the Triton version and the date."""
    import re

    triton = pytest.importorskip("triton")
    kr = _load("kernel_resources", "kernel_resources_guards6")
    monkeypatch.setenv("LORWEB_COMMIT", "fedcba9876543210")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    monkeypatch.setattr(kr, "run_backends", lambda *a: {"triton": "ran", "cuda": "ran"})
    monkeypatch.setattr(kr, "triton_kernels", lambda: [])
    monkeypatch.setattr(kr, "extension_kernels", lambda: [])
    assert kr.main(["--out", str(tmp_path / "r.json"), "--m", "2"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["commit"] == "fedcba987654 (LORWEB_COMMIT)" and report["triton"] == triton.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", report["date"]) and report["shape"]["M"] == 2


def test_kernel_resources_extension_rows_take_the_drivers_attributes(monkeypatch, tmp_path):
    """extension_kernels: cuobjdump's resource table per kernel, overridden by the driver's attributes (and its
    source named) where cuFuncGetAttribute answered."""
    kr = _load("kernel_resources", "kernel_resources_guards4")
    import lorweb_fast

    fake_ext = types.SimpleNamespace(__file__="/x/_C.so")
    monkeypatch.setitem(sys.modules, "lorweb_fast._C", fake_ext)
    monkeypatch.setattr(lorweb_fast, "_C", fake_ext, raising=False)
    monkeypatch.setattr(kr, "find_cuobjdump", lambda: "cuobjdump")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))

    def fake_run(cmd, cwd=None, **kw):
        (Path(cwd) / "k.sm_90.cubin").write_bytes(b"")

    monkeypatch.setattr(kr, "subprocess", types.SimpleNamespace(run=fake_run))
    monkeypatch.setattr(kr, "resource_table", lambda tool, cubin: {
        "_Z1a": {"REG": 40, "LOCAL": 0, "STACK": 0, "SHARED": 0}, "_Z1b": {"REG": 50, "LOCAL": 8, "SHARED": 16}})
    monkeypatch.setattr(kr, "driver_attributes", lambda cubin, names: {
        "_Z1a": {"registers": 42, "local_bytes": 4, "shared_bytes": 0}})
    rows = {r["kernel"]: r for r in kr.extension_kernels()}
    assert rows["_Z1a"]["registers"] == 42 and rows["_Z1a"]["local_bytes"] == 4
    assert rows["_Z1a"]["source"] == "driver (cuFuncGetAttribute)"
    assert rows["_Z1b"] == {"kernel": "_Z1b", "arch": "sm_90", "registers": 50, "local_bytes": 8, "stack_bytes": None,
                            "shared_bytes": 16, "source": "cuobjdump"}


# ------------------------------------------------------------------------------------------- host_overhead
@pytest.fixture
def host(monkeypatch):
    ho = _load("host_overhead", "host_overhead_guards")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return ho


def test_host_ms_is_the_median_behind_a_sized_sleep(host, monkeypatch):
    """host_ms: the median (not mean) per-call wall time; the GPU sleep before it covers 3 x the slowest warm-up call
    per call plus 50 ms (capped at 2 s), and the warm-up rotates the inputs."""
    clock = FakeClock()
    monkeypatch.setattr(host, "time", clock)
    sleeps = []
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: sleeps.append(cycles))
    monkeypatch.setattr(host, "Timer", types.SimpleNamespace(cycles_per_ms=lambda: 1000.0))
    durations = iter([1.0, 5.0, 2.0, 1.0, 2.0, 30.0])  # ms: 3 warm-up calls, then 3 timed
    calls = []

    def step(i):
        calls.append(i)
        clock.t += next(durations) / 1e3

    assert host.host_ms(step, 3, 3) == pytest.approx(2.0)
    assert calls == [0, 1, 2, 0, 1, 2]
    assert sleeps == [int(1000.0 * (50.0 + 3.0 * 5.0 * 3))]


def test_host_overhead_main_record_and_ratios(host, monkeypatch, tmp_path):
    """main: forward-only rows have no fwd_bwd row, the record names the commit, and "x linear" is the row's host
    time over nn.Linear's in the same mode."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    class FakeImpl:
        def __init__(self, name, device, dtype):
            self.name, self.skip_reason = name, ("no ext" if name == "cuda" else None)

    times = {("linear", "fwd"): 0.01, ("linear", "fwd_bwd"): 0.04, ("torch", "fwd"): 0.03, ("torch", "fwd_bwd"): 0.02}
    monkeypatch.setattr(host, "Impl", FakeImpl)
    monkeypatch.setattr(host, "make_problem", lambda *a: {})
    monkeypatch.setattr(host, "make_step", lambda impl, p, mode: ((impl.name, mode), 1))
    monkeypatch.setattr(host, "host_ms", lambda step, n, calls: times.get(step, 0.005))
    monkeypatch.setattr(host, "op_path_rows", lambda *a: [])
    monkeypatch.setattr(host, "breakdown", lambda *a: [])
    monkeypatch.setattr(host, "device_name", lambda d: "FakeGPU")
    monkeypatch.setattr(host, "git_commit", lambda: "beef00000000")
    assert host.main(["--out", str(tmp_path / "h")]) == 0
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["commit"] == "beef00000000"
    got = {(r["impl"], r["mode"]) for r in record["rows"]}
    assert ("shrink", "fwd") in got and ("shrink", "fwd_bwd") not in got and ("cuda", "fwd") not in got
    md = (tmp_path / "h.md").read_text()
    assert "| torch | fwd | 30.0 | 3.0 |" in md and "| torch | fwd_bwd | 20.0 | 0.5 |" in md
    assert "| linear | fwd | 10.0 | 1.0 |" in md and "commit beef00000000" in md


def test_host_overhead_op_path_restores_the_direct_path(host, monkeypatch):
    """op_path_rows times the registered-op path (EAGER_DIRECT off) and turns the direct path back on after."""
    from lorweb_fast import ops

    class FakeImpl:
        def __init__(self, name, device, dtype):
            self.name, self.skip_reason = name, None

    seen = []
    monkeypatch.setattr(host, "Impl", FakeImpl)
    monkeypatch.setattr(host, "make_step", lambda impl, p, mode: (None, 1))
    monkeypatch.setattr(host, "host_ms", lambda *a: seen.append(ops.EAGER_DIRECT) or 0.001)
    assert ops.EAGER_DIRECT is True
    rows = host.op_path_rows({"x": torch.zeros(1)}, 3)
    assert ops.EAGER_DIRECT is True and seen == [False] * 4
    assert [r["impl"] for r in rows] == ["triton (registered op path)"] * 2 + ["cuda (registered op path)"] * 2


def test_every_benchmark_option_has_help():
    """Every ``add_argument`` of every benchmark script passes a help text (``--help`` explains each option, as the
    ``lorweb-fast`` command's do); read from the scripts' source, since their parsers are built inside main()."""
    import ast

    missing = []
    for script in sorted(BENCH_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                if not any(k.arg == "help" for k in node.keywords):
                    missing.append(f"{script.name}:{node.lineno}")
    calls = sum(s.read_text().count("add_argument(") for s in BENCH_DIR.glob("*.py"))
    assert calls > 30 and missing == [], missing


@pytest.mark.parametrize("queue_limit, want_groups, host_bound",
                         [(100, [10], False), (4, [10, 5, 2, 2, 2, 2, 2], False), (0, [10, 5, 2, 1] + [1] * 9, True)])
def test_the_device_timer_retimes_groups_that_outran_their_sleep(bench, monkeypatch, queue_limit, want_groups,
                                                                 host_bound):
    """Timer._device_intervals with a fake CUDA: the sleep "ends" before the last call of a group is enqueued when
    the group has more than ``queue_limit`` calls (a full launch queue, or a host slower than the GPU): that group's
    intervals are discarded and it is timed again in halves behind a longer sleep; a single call that still outruns
    its sleep is kept and flagged host-bound. Every call is timed exactly once in the kept groups."""
    groups, sleeps, calls = [], [], []

    class FakeEvent:
        recorded = []

        def __init__(self, enable_timing=True):
            pass

        def record(self):
            FakeEvent.recorded.append(self)

        def query(self):  # the first event of a group: completed when the group outran the sleep
            return len(FakeEvent.recorded) - 1 > queue_limit

        def synchronize(self):
            groups.append(len(FakeEvent.recorded) - 1)

        def elapsed_time(self, other):
            return 1.0

    def sleep(cycles):
        FakeEvent.recorded = []
        sleeps.append(cycles)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "_sleep", sleep)
    timer = bench.Timer(torch.device("cpu"), warmup=0, reps=10, budget_s=1.0)
    monkeypatch.setattr(bench.Timer, "_cycles_per_ms", 1000.0)
    times, flagged = timer._device_intervals(lambda i: calls.append(i), n_inputs=3, reps=10, enqueue_ms=0.5)
    assert groups == want_groups and flagged is host_bound
    assert len(times) == 10
    if host_bound:  # the margin doubled at every retry: longer sleeps for the same number of calls per group
        assert sleeps[3] > sleeps[2] / 2 and sleeps[4] >= sleeps[3]


def test_a_gpu_record_without_a_fused_backend_fails_the_run(bench):
    """On a GPU, triton or cuda rows skipped because the backend cannot run there (the extension not built, say)
    make the script exit 1 after writing its record (the GPU scripts then mark the step failed); budget skips and
    CPU records do not."""
    why = "the CUDA extension lorweb_fast._C was not built at install: x"
    rows = [dict(impl="cuda", skipped=True, skip_reason=why), dict(impl="cuda", skipped=True, skip_reason=why),
            dict(impl="triton", median_ms=1.0), dict(impl="official_as_run", skipped=True, skip_reason="whatever"),
            dict(impl="triton", skipped=True, skip_reason="--total-budget-s spent")]
    assert bench.unavailable_fused_backends({"label": "GPU", "results": rows}) == [
        "cuda: the CUDA extension lorweb_fast._C was not built at install: x"]
    assert bench.unavailable_fused_backends({"label": "CPU", "results": rows}) == []
    assert bench.unavailable_fused_backends({"label": "GPU", "results": rows[2:]}) == []


def test_tuner_times_at_least_one_call_per_pooled_input(tuner, monkeypatch):
    """The Timer rotates over its first ``reps`` inputs only: with a pool beyond 15 copies (small --tokens, sized
    past twice the L2) the tuner's 15 calls read part of it, from L2. Every pooled input is called."""
    bench = _on_path("bench_mixed_lora")
    made = []

    class Timer:
        def __init__(self, device, warmup, reps, budget_s):
            made.append(reps)

        def run(self, fn, n_inputs):
            return 1.0

    monkeypatch.setattr(bench, "Timer", Timer)
    monkeypatch.setitem(sys.modules, "bench_mixed_lora", bench)
    tuner._bench(lambda i: None, 67)
    tuner._bench(lambda i: None, 3)
    assert made == [67, 15]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_shrink_row_counts_u_in_the_dtype_the_forward_saves_it_in(bench, dtype):
    """The shrink row's minimum bytes: x (M, in) and a_cat (R, in) read and z (M, R) written in x's dtype, u (M, R)
    written in ``saved_u_dtype`` (fp32 for fp16 inputs, so 2 more bytes per entry there)."""
    saved_u_dtype = pytest.importorskip("lorweb_fast.kernels.mixed_lora").saved_u_dtype
    m, k, n, r = 64, 48, 8, 4
    problem = {"x": torch.empty(m, k, dtype=dtype), "weight": torch.empty(40, k, dtype=dtype),
               "lora_a": torch.empty(n, k, r, dtype=dtype)}
    flops, moved = bench.Impl("shrink", torch.device("cpu"), dtype).work(problem)
    e, u_e = dtype.itemsize, saved_u_dtype(dtype).itemsize
    assert flops == 2.0 * m * k * n * r
    assert moved == e * (m * k + n * r * k + m * n * r) + u_e * m * n * r
