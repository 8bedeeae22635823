"""Fresh audit of benchmark honesty and methodology (benchmarks/bench_mixed_lora.py, bench_flux_block.py,
host_python_cpu.py, adapter_precision_loss.py). Every test here fails on the audited commit (69c59a2) and passes
once the defect it names is fixed; see /tmp/rev/benchmarks.md for the report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorweb_fast.testing import load_module_from_file, random_problem

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench():
    return load_module_from_file(BENCH_DIR / "bench_mixed_lora.py", "bench_mixed_lora_fresh_audit")


def _flux():
    return load_module_from_file(BENCH_DIR / "bench_flux_block.py", "bench_flux_block_fresh_audit")


# --------------------------------------------------------------------------------------------------- 1 (medium)
def test_flux_block_official_as_run_check_catches_a_missing_mixture_in_bf16(monkeypatch):
    """bench_flux_block.py: check_block / _check_block. The module docstring and the README say the
    official_as_run block output is checked against float64 before it is timed. In bf16 (the GPU default) that
    check is the block-level bound only (the per-layer check runs only for names starting with "lorweb_fast"), and
    even with the basis amplified x128 it passes an official_as_run whose 20 LoRWeB layers return the base output
    alone: a check that cannot fail. Expected: the correct bf16 official_as_run passes, and one with no mixture (or
    a wrong one) raises AssertionError (e.g. by running check_layer_outputs for official_as_run too, with the
    coefficients it computes from its query)."""
    pytest.importorskip("diffusers")
    bench = _flux()
    cfg, dtype = bench.CPU, torch.bfloat16
    _, _, official, as_run = bench.build_models(cfg, torch.device("cpu"), dtype)
    inputs = bench.make_inputs(cfg, 2, 40, 8, torch.device("cpu"), dtype, seed=2)
    bench.check_block(as_run, official, inputs, dtype, name="official_as_run")  # the correct row passes
    for layer in bench.lf.lorweb_layers(as_run).values():  # no mixture at all: every layer is its base layer
        monkeypatch.setattr(layer, "forward", layer.base_layer.forward)
    with pytest.raises(AssertionError):
        bench.check_block(as_run, official, inputs, dtype, name="official_as_run")


# ------------------------------------------------------------------------------------------------------ 2 (low)
def _official_as_run_reference(x, weight, bias, lora_a32, lora_b32, coeffs32, scale):
    """NVlabs/LoRWeB toolkit/network_mixins.py ToolkitModuleMixin.forward + attlora_forward: the einsum in fp32 on
    x cast to fp32, times scale (and the network multiplier, 1.0), then ``scaled_lora_output.to(org_forwarded.dtype)``
    and ``org_forwarded + scaled_lora_output``: the delta is rounded to the base output's dtype BEFORE the add."""
    delta = torch.einsum("bsi,nir,bn,nro->bso", x.float(), lora_a32, coeffs32, lora_b32) * scale
    return F.linear(x, weight, bias) + delta.to(x.dtype)


def test_mixed_lora_official_as_run_rounds_the_delta_before_the_add_as_the_official_forward():
    """bench_mixed_lora.py: official_as_run. Official (toolkit/network_mixins.py ToolkitModuleMixin.forward):
    ``scaled_lora_output = scaled_lora_output.to(org_forwarded.dtype); x = org_forwarded + scaled_lora_output`` (a
    bf16 add of the rounded delta). The benchmark adds the fp32 delta to the bf16 base output in fp32 (an extra
    M x out fp32 tensor) and rounds the sum: other arithmetic (about a third of the bf16 entries differ by one ulp)
    and other memory traffic than the row claims to reproduce. Expected: bit-identical to the official order."""
    bench = _bench()
    p = random_problem(2, 64, 256, 192, 8, 4, torch.bfloat16, seed=1)
    a32, b32, c32 = p["lora_a"].float(), p["lora_b"].float(), p["coeffs"].float()
    got = bench.official_as_run(p["x"], p["weight"], p["bias"], a32, b32, c32, p["scale"])
    want = _official_as_run_reference(p["x"], p["weight"], p["bias"], a32, b32, c32, p["scale"])
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} entries differ"


def test_flux_block_official_as_run_layer_rounds_the_delta_before_the_add_as_the_official_forward():
    """bench_flux_block.py: OfficialAsRunLinear.forward, same official order as above
    (toolkit/network_mixins.py ToolkitModuleMixin.forward): ``(base(x) + delta).to(x.dtype)`` there adds in fp32;
    the official code casts the fp32 delta to the base output's dtype first, then adds. Expected: bit-identical."""
    import lorweb_fast as lf

    bench = _flux()
    torch.manual_seed(0)
    base = torch.nn.Linear(128, 96, dtype=torch.bfloat16)
    layer = lf.LoRWeBLinear(base, num_loras=8, rank=4, key_dim=16, query_dim=24)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    for t in layer.lorweb_tensors().values():  # the official trainer's fp32 masters
        t.data = t.data.float()
    layer.__class__ = bench.OfficialAsRunLinear
    layer.query = torch.randn(2, 24)
    x = torch.randn(2, 32, 128).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
        coeffs = layer.coefficients_from_query(layer.query.float())
        want = _official_as_run_reference(x, base.weight, base.bias, layer.lora_A, layer.lora_B, coeffs, layer.scale)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} entries differ"


# ------------------------------------------------------------------------------------------------------ 3 (low)
@pytest.mark.parametrize("row", ["cublas_concat", "expand"])
def test_prebuilt_operand_rows_build_nothing_inside_timed_calls(row, monkeypatch):
    """bench_mixed_lora.py: Impl._low_level / make_step / Timer.measure. The cublas_concat and expand rows are
    documented as timing the GEMM / kernel "on pre-built operands" (built per rotated input buffer and cached),
    but the cache is filled lazily by the first call on each input: with fewer warm-up calls than rotated inputs
    (the CPU defaults: 2 warm-up calls, 8 inputs; on a GPU any --warmup below the pool size) the timed calls
    include torch.cat and an fp32 x @ A_cat, and on CPU the median is mostly build time. Expected: every operand is
    built before the first timed call (e.g. make_step pre-builds one per input, or the warm-up covers the pool)."""
    bench = _bench()
    dev = torch.device("cpu")
    cfg = dict(M=64, in_features=64, out_features=48, N=4, r=4, two_d=False)
    problem = bench.make_problem(cfg, torch.bfloat16, dev)
    impl = bench.Impl("cublas_concat", dev, torch.bfloat16)  # the expand row shares the lazy z cache
    if row == "expand":  # no launchers on CPU: stand in for the kernel, keep the benchmark's own z cache
        impl.name = "expand"
        impl.launchers = (lambda a, b: bench.ops.concat_basis(a, b), None,
                          lambda x2d, w, z, b_cat, bias=None: F.linear(x2d, w, bias) + z @ b_cat)
    phase = ["before timing"]
    built = []
    real_cached = impl._cached

    def counting(key, build):
        if key not in impl._cache:
            built.append(phase[0])
        return real_cached(key, build)

    monkeypatch.setattr(impl, "_cached", counting)
    step, n_inputs = bench.make_step(impl, problem, "fwd")
    assert n_inputs > 2
    timer = bench.Timer(dev, warmup=2, reps=7, budget_s=1e9)  # the CPU defaults' warm-up and reps
    calls = [0]

    def fn(i):
        calls[0] += 1
        phase[0] = "warm-up" if calls[0] <= timer.warmup else "timed"
        return step(i)

    timer.measure(fn, n_inputs)
    assert "timed" not in built, f"operands built inside timed calls: {built}"


# ------------------------------------------------------------------------------------------------------ 4 (low)
def _run_adapter_precision(monkeypatch, tmp_path, argv):
    """adapter_precision_loss.main with the tiny-model builders and train() replaced by stand-ins that write a
    loss log of ``cfg.steps`` lines (the script's own record writing runs)."""
    from lorweb_fast import demo, training

    monkeypatch.setattr(demo, "build_tiny_kontext_pipeline", lambda path, seed=0: Path(path).mkdir(parents=True))
    monkeypatch.setattr(demo, "build_tiny_clip", lambda path, seed=0: Path(path).mkdir(parents=True))
    monkeypatch.setattr(demo, "make_synthetic_analogies", lambda path, n, seed=0: Path(path).mkdir(parents=True))

    def fake_train(cfg):
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "loss.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": 1.0 + 0.1 * i}) + "\n"
                                                for i in range(cfg.steps)))

    monkeypatch.setattr(training, "train", fake_train)
    module = load_module_from_file(BENCH_DIR / "adapter_precision_loss.py", "adapter_precision_fresh_audit")
    monkeypatch.setattr(sys, "argv", ["adapter_precision_loss.py", "--out", str(tmp_path)] + argv)
    module.main()
    return json.loads((tmp_path / "adapter_precision.json").read_text())


def test_adapter_precision_record_names_device_versions_date_and_commit(monkeypatch, tmp_path):
    """benchmarks/adapter_precision_loss.py: main. The README cites its committed record
    (benchmarks/results/adapter_precision_cpu_demo.json) "rerun at commit 236aa89", but the record holds only the
    losses: no commit, date, device, torch version or backend (on CPU the "bf16" run is the torch backend, not the
    fused kernels its plot legend names). Every other benchmark record carries them (bench_mixed_lora's record).
    Expected: the JSON has commit, date, device and torch keys."""
    record = _run_adapter_precision(monkeypatch, tmp_path, ["--steps", "3"])
    missing = {"commit", "date", "device", "torch"} - set(record)
    assert not missing, f"adapter_precision.json lacks {sorted(missing)}"


def test_host_python_cpu_record_names_commit_date_and_device(tmp_path):
    """benchmarks/host_python_cpu.py: main. Its --json record (the source of the README's CPU host-time numbers, of
    which no record is committed) holds only torch, python and the rows: no commit, date or CPU. Expected: commit,
    date and device in the record, as host_overhead.py's and bench_mixed_lora.py's records have."""
    out = tmp_path / "host.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "host_python_cpu.py"), "--rounds", "1", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode == 2 and "interpreter" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr[-2000:]
    missing = {"commit", "date", "device"} - set(json.loads(out.read_text()))
    assert not missing, f"host_python_cpu.py's record lacks {sorted(missing)}"


# ------------------------------------------------------------------------------------------------------ 5 (low)
def test_host_python_cpu_refuses_zero_rounds_by_name():
    """benchmarks/host_python_cpu.py: main (--rounds). The README: "The benchmark and tuning scripts refuse a count
    <= 0 ... by option and value, before anything is set up". --rounds 0 is accepted and the script dies in its first
    row with ``ValueError: min() arg is an empty sequence``. Expected: argparse exit 2 naming --rounds."""
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "host_python_cpu.py"), "--rounds", "0"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert proc.returncode == 2 and "--rounds" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-800:]


def test_adapter_precision_refuses_zero_steps_by_name(monkeypatch, tmp_path, capsys):
    """benchmarks/adapter_precision_loss.py: main (--steps). As above: --steps 0 is accepted, the tiny models are
    built and both runs start before the script fails (``max()`` of an empty list with the stand-in trainer).
    Expected: argparse exit 2 naming --steps, before anything is built."""
    with pytest.raises(SystemExit) as exc:
        _run_adapter_precision(monkeypatch, tmp_path, ["--steps", "0"])
    assert exc.value.code == 2 and "--steps" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()
