"""CPU smoke test of the benchmark: it runs on tiny shapes, checks every implementation against the reference first,
and writes the documented JSON schema, a markdown table and a plot."""

import json
import os
import sys
from pathlib import Path

import pytest

from lorweb_fast.testing import load_module_from_file

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mixed_lora.py"
ROW_KEYS = {"impl", "mode", "M", "in", "out", "N", "r", "dtype", "median_ms", "eager_ms", "peak_mem_mb"}


def load_bench():
    return load_module_from_file(BENCH, "bench_mixed_lora")


def test_bench_mixed_lora_smoke(tmp_path):
    """The record's rows and fields; TF32 is off while it runs (``tf32`` in the record) and restored after."""
    import torch

    bench = load_bench()
    switches = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
    before = [s.fp32_precision for s in switches]
    for s in switches:
        s.fp32_precision = "tf32"
    try:
        record = bench.main(["--device", "cpu", "--m", "34", "--shapes", "40x24", "--num-loras", "3", "--rank", "4",
                             "--no-rank-sweep", "--warmup", "1", "--reps", "3", "--out-dir", str(tmp_path),
                             "--tag", "smoke", "--profile"])
        assert [s.fp32_precision for s in switches] == ["tf32"] * 3
    finally:
        for s, precision in zip(switches, before):
            s.fp32_precision = precision
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data == json.loads(json.dumps(record))
    assert {"device", "torch", "triton", "cuda", "commit", "date", "results", "clocks", "timing", "tf32"} <= set(data)
    assert data["label"] == "CPU" and data["checked_against_reference"] and data["tf32"] is False
    assert data["complete"] is True
    impls = {r["impl"] for r in data["results"]}
    assert impls == set(bench.IMPLS)
    for row in data["results"]:
        assert ROW_KEYS <= set(row)
        assert row["mode"] in ("fwd", "fwd_bwd")
        if row.get("skipped"):
            assert row["skip_reason"]
        else:
            assert row["median_ms"] > 0 and row["eager_ms"] > 0
        if row["impl"] in bench.FORWARD_ONLY and row["mode"] == "fwd_bwd":
            assert row["skipped"] and row["skip_reason"]
            if row["impl"] == "cublas_concat":
                assert "forward-only" in row["skip_reason"]
    ran = {r["impl"] for r in data["results"] if not r.get("skipped")}
    assert {"linear", "official_einsum", "official_as_run", "torch", "cublas_concat", "cublas_composed"} <= ran
    for row in data["results"]:  # the kernel rows need a GPU and H1's launchers: skipped with the reason, not omitted
        if row["impl"] in ("shrink", "expand"):
            assert row["skipped"] and row["skip_reason"]
    assert "== official_as_run (fwd_bwd)" in (tmp_path / "smoke_profile.txt").read_text()
    table = (tmp_path / "smoke.md").read_text()
    assert "× official_einsum" in table and "CPU run" in table
    assert (tmp_path / "smoke.png").stat().st_size > 1000


def test_bench_refuses_a_wrong_implementation(tmp_path, monkeypatch):
    """The correctness gate before timing is real: a broken implementation is not timed; its row is recorded as
    failed with the check's error (in the JSON and the table), the other rows run, and the script exits 1."""
    bench = load_bench()
    real_call = bench.Impl.__call__

    def broken(self, x, weight, bias, lora_a, lora_b, coeffs, scale, peft_layer=None):
        if self.name == "torch":  # forgets the per-sample mixture: uses the first sample's coefficients for all
            coeffs = coeffs[:1].expand_as(coeffs)
        return real_call(self, x, weight, bias, lora_a, lora_b, coeffs, scale, peft_layer)

    monkeypatch.setattr(bench.Impl, "__call__", broken)
    record = bench.main(["--device", "cpu", "--m", "34", "--shapes", "40x24", "--num-loras", "3", "--no-rank-sweep",
                         "--impls", "linear", "torch", "--modes", "fwd", "--reps", "1", "--out-dir", str(tmp_path),
                         "--tag", "broken"])
    rows = {r["impl"]: r for r in record["results"]}
    assert rows["torch"]["failed"] and rows["torch"]["median_ms"] is None
    assert rows["torch"]["error"].startswith("AssertionError: ") and "torch output" in rows["torch"]["error"]
    assert rows["linear"]["median_ms"] > 0 and not rows["linear"].get("failed")
    assert [line.split(":")[0] for line in bench.failed_rows(record)] == ["torch fwd M=34 40->24 N*r=12"]
    assert json.loads((tmp_path / "broken.json").read_text())["results"][1]["failed"] is True
    md = (tmp_path / "broken.md").read_text()
    assert "**Failed**" in md and "torch fwd M=34" in md
    assert "| torch |" not in md  # no timing row for it


def test_bench_flux_block_smoke(tmp_path, monkeypatch):
    """The record's rows and fields; attention runs with cuDNN SDPA off, as in training, and matmuls without TF32,
    and both settings are restored (after a failure too); --profile writes the training step's kernel tables and
    their difference."""
    import torch

    pytest.importorskip("diffusers")
    bench = load_module_from_file(BENCH.with_name("bench_flux_block.py"), "bench_flux_block")
    settings_during = []
    check_block = bench.check_block

    def settings():
        return torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.matmul.fp32_precision == "tf32"

    def recording_check_block(*args, **kwargs):
        settings_during.append(settings())
        return check_block(*args, **kwargs)

    monkeypatch.setattr(bench, "check_block", recording_check_block)
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    precision_before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        record = bench.main(["--device", "cpu", "--warmup", "0", "--reps", "2", "--out-dir", str(tmp_path),
                             "--tag", "block", "--profile"])
        assert settings_during and set(settings_during) == {(False, False)} and settings() == (True, True)
        monkeypatch.setattr(bench, "check_block", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):  # restored after a failure too
            bench.main(["--device", "cpu", "--out-dir", str(tmp_path), "--tag", "failed"])
        assert settings() == (True, True)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_before)
        torch.backends.cuda.matmul.fp32_precision = precision_before
    profile = (tmp_path / "block_profile.txt").read_text()
    assert "== train base" in profile and "== train lorweb_fast" in profile
    extra = profile.split("where lorweb_fast's training step spends its extra time")[1]
    assert "aten::" in extra and "lorweb_fast - base" in extra
    assert not (tmp_path / "failed.json").exists()
    assert record["cudnn_attention"] is False
    data = json.loads((tmp_path / "block.json").read_text())
    assert data == json.loads(json.dumps(record))
    assert {"device", "torch", "triton", "cuda", "commit", "date", "results"} <= set(data)
    assert data["layers"] == 20  # 14 in the double block + 6 in the single block, as in METHOD.md
    got = {(r["scenario"], r["impl"]) for r in data["results"]}
    assert got == {("train", "base"), ("train", "official"), ("train", "official_as_run"), ("train", "lorweb_fast"),
                   ("infer", "base"), ("infer", "official"), ("infer", "official_as_run"), ("infer", "lorweb_fast"),
                   ("infer_merged", "base"),
                   ("infer_merged", "lorweb_fast_merged"), ("coeffs", "set_query_once"),
                   ("coeffs", "per_layer_call")}
    assert all(r["median_ms"] > 0 for r in data["results"])
    table = (tmp_path / "block.md").read_text()
    assert "CPU run" in table and "× official_as_run" in table
    assert data["tf32"] is False and "timing" in data and data["complete"] is True


@pytest.mark.slow
def test_bench_flux_block_times_the_trainers_fp32_masters_in_a_16_bit_run(tmp_path):
    """In bf16 the training rows include ``lorweb_fast_fp32_masters`` (fp32 LoRWeB tensors on the bf16 block, the
    trainer's arithmetic), checked against float64 like the others; an fp32 run has no such row (it would repeat
    ``lorweb_fast``; see the test above)."""
    pytest.importorskip("diffusers")
    bench = load_module_from_file(BENCH.with_name("bench_flux_block.py"), "bench_flux_block_masters")
    record = bench.main(["--device", "cpu", "--dtype", "bf16", "--warmup", "0", "--reps", "1", "--out-dir",
                         str(tmp_path), "--tag", "block", "--no-profile"])
    rows = {(r["scenario"], r["impl"]): r for r in record["results"]}
    assert rows[("train", "lorweb_fast_fp32_masters")]["median_ms"] > 0
    assert ("infer", "lorweb_fast_fp32_masters") not in rows
    assert "| train | lorweb_fast_fp32_masters |" in (tmp_path / "block.md").read_text()


def test_flux_block_adapter_cost_counts_device_time_once():
    """On a GPU the per-kernel difference sums device-side events only: a CPU op (aten::mm) also carries its kernels'
    device time in torch.profiler's averages, and counting both would double every cost."""
    import types

    import torch
    from torch.autograd import DeviceType

    bench = load_module_from_file(BENCH.with_name("bench_flux_block.py"), "bench_flux_block3")

    def event(key, device_us, device_type, cpu_us=0.0, annotation=False, count=1):
        return types.SimpleNamespace(key=key, self_device_time_total=device_us, self_cpu_time_total=cpu_us,
                                     device_type=device_type, is_user_annotation=annotation, count=count)

    base = [event("aten::mm", 100.0, DeviceType.CPU, 30.0), event("gemm_kernel", 100.0, DeviceType.CUDA)]
    ours = base + [event("lorweb_fast::triton_fwd", 40.0, DeviceType.CPU, 50.0),
                   event("_expand_tma_kernel", 40.0, DeviceType.CUDA, count=2),
                   event("step annotation", 500.0, DeviceType.CUDA, annotation=True)]
    table = bench.adapter_cost_table(base, ours, torch.device("cuda"))
    assert "base 100, lorweb_fast 140, difference 40" in table
    assert "_expand_tma_kernel" in table and "lorweb_fast::triton_fwd" not in table and "annotation" not in table
    on_cpu = bench.adapter_cost_table(base, ours, torch.device("cpu"))
    assert "base 30, lorweb_fast 80, difference 50" in on_cpu and "lorweb_fast::triton_fwd" in on_cpu


def test_bench_flux_block_check_catches_a_wrong_block(monkeypatch):
    pytest.importorskip("diffusers")
    import torch

    bench = load_module_from_file(BENCH.with_name("bench_flux_block.py"), "bench_flux_block2")
    cfg = bench.CPU
    base, ours, official, as_run = bench.build_models(cfg, torch.device("cpu"), torch.float32)
    inputs = bench.make_inputs(cfg, 2, 40, 8, torch.device("cpu"), torch.float32, seed=2)
    bench.check_block(ours, official, inputs, torch.float32)
    bench.check_block(as_run, official, inputs, torch.float32, name="official_as_run")
    as_run_layer = next(iter(bench.lf.lorweb_layers(as_run).values()))
    assert as_run_layer.lora_A.dtype == torch.float32 and isinstance(as_run_layer, bench.OfficialAsRunLinear)
    with torch.no_grad():  # a wrong basis in one layer must be caught
        next(iter(bench.lf.lorweb_layers(ours).values())).lora_B.mul_(3)
    with pytest.raises(AssertionError, match="differs from the float64 official|layer .* output"):
        bench.check_block(ours, official, inputs, torch.float32)


@pytest.mark.parametrize("fault", ["one layer's mixture x 1.5", "no mixture"])
def test_bench_flux_block_check_catches_a_wrong_adapter_in_bf16(monkeypatch, fault):
    """In bf16 the adapter's share of the block output lies below the block's rounding noise, so the block-level
    bound passed a wrong mixture; with the basis amplified for the check, the per-layer check (each LoRWeB layer's
    output against float64 from its own input) catches one layer computing its mixture 1.5 times too large, and
    every layer returning the base output alone; the correct bf16 block (also merged, and the basis restored bit
    for bit) passes."""
    pytest.importorskip("diffusers")
    import torch

    bench = load_module_from_file(BENCH.with_name("bench_flux_block.py"), f"bench_flux_block_bf16_{fault[0]}")
    cfg = bench.CPU
    base, ours, official, as_run = bench.build_models(cfg, torch.device("cpu"), torch.bfloat16)
    inputs = bench.make_inputs(cfg, 2, 40, 8, torch.device("cpu"), torch.bfloat16, seed=2)
    snapshot = [t.clone() for t in bench.lorweb_params(ours)]
    bench.check_block(ours, official, inputs, torch.bfloat16)
    bench.check_block(ours, official, {k: v if k == "rotary" else v[:1] for k, v in inputs.items()}, torch.bfloat16,
                      name="lorweb_fast_merged")  # batch 1, as main() checks the merged row
    masters = bench.fp32_masters(ours)  # the trainer's arithmetic, as main() checks its training row
    assert {t.dtype for t in bench.lorweb_params(masters)} == {torch.float32}
    assert next(iter(bench.lf.lorweb_layers(masters).values())).base_layer.weight.dtype == torch.bfloat16
    bench.check_block(masters, official, inputs, torch.bfloat16, name="lorweb_fast_fp32_masters")
    layers = bench.lf.lorweb_layers(ours)
    assert all(torch.equal(t, before) for t, before in zip(bench.lorweb_params(ours), snapshot))
    if fault == "no mixture":
        for layer in layers.values():
            monkeypatch.setattr(layer, "forward", layer.base_layer.forward)
    else:
        layer = list(layers.values())[2]
        right = layer.forward
        monkeypatch.setattr(layer, "forward", lambda x: layer.base_layer(x) + 1.5 * (right(x) - layer.base_layer(x)))
    with pytest.raises(AssertionError, match="lorweb_fast layer .* output"):
        bench.check_block(ours, official, inputs, torch.bfloat16)


SCRIPTS = ("run_on_gpu.sh", "run_full_on_gpu.sh", "gpu_common.sh", "collect_wheels.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_scripts_parse(script):
    import subprocess

    path = BENCH.with_name(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    if script.startswith("run_"):  # every step is bounded, and the budget is capped below the device limits
        common = BENCH.with_name("gpu_common.sh").read_text()
        assert "timeout --kill-after" in common
        assert "gpu_setup" in text and "gpu_finish" in text
        # a step stopped by its timeout keeps its last lines; the extension builds for the visible GPU only
        assert "export PYTHONUNBUFFERED=1" in common and "torch.cuda.get_device_capability()" in common


def test_run_on_gpu_tuning_step_arguments_are_accepted_by_the_tuner():
    """The tuning step of run_on_gpu.sh (the backward roles of the token-wise layers) parses: its arguments, given
    to tune_kernels.py --dry-run, list the sweep (a wrong role or layer name would cost a GPU run)."""
    import re
    import shlex
    import subprocess
    import sys

    text = BENCH.with_name("run_on_gpu.sh").read_text().replace("\\\n", " ")
    (args,) = re.findall(r"benchmarks/tune_kernels\.py (.*?) --budget-s", text)
    proc = subprocess.run([sys.executable, str(BENCH.with_name("tune_kernels.py")), "--dry-run", *shlex.split(args)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "4 shapes x (shrink_dy 32, expand_dx 32)" in proc.stdout
    assert proc.stdout.splitlines()[1].split()[:2] == ["in=15360", "out=3072"]  # the layer whose backward lagged


@pytest.mark.parametrize("script", ["run_on_gpu.sh", "run_full_on_gpu.sh"])
def test_gpu_scripts_without_a_gpu_say_so(script, tmp_path):
    """On a machine without a CUDA GPU the scripts install and measure nothing and exit 2 with a clear message."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the no-GPU path is not reachable")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)}
    res = subprocess.run(["bash", str(BENCH.with_name(script)), str(tmp_path / "out")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "No CUDA GPU is visible to torch" in res.stdout + res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run.log", "steps.txt"]
    bad = subprocess.run(["bash", str(BENCH.with_name(script)), str(tmp_path / "o2"), "--budget-s", "9999"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 64 and "--budget-s must be an integer" in bad.stderr
    assert subprocess.run(["bash", str(BENCH.with_name(script))], capture_output=True, env=env).returncode == 64


def test_bench_grid_budget_and_missing_launchers(tmp_path):
    """The GPU grid has every METHOD.md shape, the extra M and the 2-D norm layers; --total-budget-s leaves the rest
    listed as not run; the shrink/expand rows name what is missing when the launcher API is absent."""
    bench = load_bench()
    args = bench.parse_args(["--full-grid"])
    configs = bench.build_configs(args, on_gpu=False)
    shapes = {(c["in_features"], c["out_features"]) for c in configs}
    assert set(bench.GPU_LAYER_SHAPES) | set(bench.GPU_NORM_SHAPES) <= shapes
    assert {8704, 15360} <= {c["M"] for c in configs}
    assert all(c["M"] in bench.GPU_NORM_BATCHES for c in configs if c["two_d"])
    record = bench.main(["--device", "cpu", "--m", "10", "12", "--shapes", "40x24", "--num-loras", "3",
                         "--no-rank-sweep", "--impls", "linear", "official_as_run", "--reps", "1", "--warmup", "0",
                         "--total-budget-s", "0", "--out-dir", str(tmp_path), "--tag", "budget"])
    assert [c["M"] for c in record["not_run"]] == [12] and {r["M"] for r in record["results"]} == {10}
    launchers, reason = bench._triton_launchers()
    import lorweb_fast.kernels.mixed_lora as kernels

    if all(hasattr(kernels, n) for n in ("pack_basis", "shrink", "expand")):
        assert launchers is not None and reason is None
    else:
        assert launchers is None and "pack_basis/shrink/expand" in reason


def test_bench_grid_budget_skips_a_configuration_that_would_not_fit(tmp_path, monkeypatch):
    """--total-budget-s judges by the longest configuration so far: with every configuration taking 10 s (a clock
    advanced in make_problem) and a 15 s budget, the second is not started at 10 s (it would end at 20 s); a
    "start none after the budget" rule would have run it and overrun."""
    import time as real_time
    import types

    bench = load_bench()
    offset = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: real_time.perf_counter() + offset[0]))
    make_problem = bench.make_problem

    def slow_make_problem(*args, **kwargs):
        offset[0] += 10.0
        return make_problem(*args, **kwargs)

    monkeypatch.setattr(bench, "make_problem", slow_make_problem)
    record = bench.main(["--device", "cpu", "--m", "10", "12", "14", "--shapes", "40x24", "--num-loras", "3",
                         "--no-rank-sweep", "--impls", "linear", "--reps", "1", "--warmup", "0",
                         "--total-budget-s", "15", "--out-dir", str(tmp_path), "--tag", "fit"])
    assert {r["M"] for r in record["results"]} == {10}
    assert [c["M"] for c in record["not_run"]] == [12, 14]


def test_bench_compiled_rows_only_at_the_target(tmp_path, monkeypatch):
    """--compiled-rows target (what run_full_on_gpu.sh passes): the torch.compile rows run at the target configuration
    and are recorded as skipped, with the reason, everywhere else (here with a small stand-in target on CPU)."""
    bench = load_bench()
    monkeypatch.setenv("LORWEB_BENCH_COMPILE_CPU", "1")
    monkeypatch.setattr(bench, "TARGET", dict(M=10, in_features=40, out_features=24))
    record = bench.main(["--device", "cpu", "--m", "10", "12", "--shapes", "40x24", "--num-loras", "3",
                         "--no-rank-sweep", "--impls", "linear", "torch_compile", "--modes", "fwd", "--reps", "1",
                         "--warmup", "0", "--compiled-rows", "target", "--out-dir", str(tmp_path), "--tag", "c"])
    compiled = {r["M"]: r for r in record["results"] if r["impl"] == "torch_compile"}
    assert not compiled[10].get("skipped") and compiled[10]["median_ms"] > 0
    assert compiled[12]["skipped"] and "--compiled-rows target" in compiled[12]["skip_reason"]
    assert record["compiled_rows"] == "target"
    assert all(not r.get("skipped") for r in record["results"] if r["impl"] == "linear")


def test_official_as_run_recomputes_coefficients_in_fp32():
    """official_as_run (METHOD.md): fp32 einsum on fp32 parameters, coefficients recomputed from the query in every
    forward; with the query's coefficients it matches the reference, and a changed query changes the output."""
    import torch

    bench = load_bench()
    problem = bench.make_problem(dict(M=10, in_features=12, out_features=8, N=3, r=2, two_d=False), torch.bfloat16,
                                 torch.device("cpu"))
    impl = bench.Impl("official_as_run", torch.device("cpu"), torch.bfloat16)
    bench.check_impl(impl, problem, "fwd_bwd")
    a32, b32 = problem["lora_a"].float(), problem["lora_b"].float()
    impl.query_args = (problem["query"], problem["to_q"], problem["keys"])
    y1 = impl(problem["x"], problem["weight"], problem["bias"], a32, b32, None, problem["scale"])
    impl.query_args = (problem["query"].flip(0), problem["to_q"], problem["keys"])
    y2 = impl(problem["x"], problem["weight"], problem["bias"], a32, b32, None, problem["scale"])
    assert y1.dtype == torch.bfloat16 and not torch.equal(y1, y2)


def test_bench_flux_block_keeps_the_rows_of_a_run_that_stops(tmp_path, monkeypatch):
    """The record is rewritten after every row: a run that stops before its end (here the profiler fails, as a
    time limit would stop it) leaves a JSON and table with the rows it measured, marked complete false."""
    pytest.importorskip("diffusers")
    bench = load_module_from_file(BENCH.with_name("bench_flux_block.py"), "bench_flux_block4")
    monkeypatch.setattr(bench, "profile_averages", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stopped")))
    with pytest.raises(RuntimeError, match="stopped"):
        bench.main(["--device", "cpu", "--warmup", "0", "--reps", "1", "--out-dir", str(tmp_path), "--tag", "cut",
                    "--profile"])
    data = json.loads((tmp_path / "cut.json").read_text())
    assert data["complete"] is False and len(data["results"]) == 10
    assert "Partial record" in (tmp_path / "cut.md").read_text()


def test_host_python_cpu_runs_and_writes_its_rows(tmp_path):
    """benchmarks/host_python_cpu.py (the CPU Python-time table in the README) runs in a subprocess (it sets
    TRITON_INTERPRET before triton is imported) and writes every row, the op and direct paths side by side; without
    an interpreter-capable Triton it exits 2 and says why."""
    import subprocess

    out = tmp_path / "host.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH.with_name("host_python_cpu.py")), "--rounds", "1",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode == 2:
        assert "interpreter" in proc.stderr
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 8 and all(r["min_us"] > 0 for r in rows.values())
    assert "fused forward+backward: direct eager path" in rows and "fused forward+backward: registered op path" in rows
