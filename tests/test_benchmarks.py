"""CPU smoke test of the benchmark: it runs on tiny shapes, checks every implementation against the reference first,
and writes the documented JSON schema, a markdown table and a plot."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mixed_lora.py"
ROW_KEYS = {"impl", "mode", "M", "in", "out", "N", "r", "dtype", "median_ms", "peak_mem_mb"}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_mixed_lora", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_mixed_lora_smoke(tmp_path):
    bench = load_bench()
    record = bench.main(["--device", "cpu", "--m", "34", "--shapes", "40x24", "--num-loras", "3", "--rank", "4",
                         "--no-rank-sweep", "--warmup", "1", "--reps", "3", "--out-dir", str(tmp_path),
                         "--tag", "smoke"])
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data == json.loads(json.dumps(record))
    assert {"device", "torch", "triton", "cuda", "commit", "date", "results"} <= set(data)
    assert data["label"] == "CPU" and data["checked_against_reference"]
    impls = {r["impl"] for r in data["results"]}
    assert impls == set(bench.IMPLS)
    for row in data["results"]:
        assert ROW_KEYS <= set(row)
        assert row["mode"] in ("fwd", "fwd_bwd")
        if row.get("skipped"):
            assert row["skip_reason"]
        else:
            assert row["median_ms"] > 0
    ran = {r["impl"] for r in data["results"] if not r.get("skipped")}
    assert {"linear", "official_einsum", "torch"} <= ran
    table = (tmp_path / "smoke.md").read_text()
    assert "× official_einsum" in table and "CPU run" in table
    assert (tmp_path / "smoke.png").stat().st_size > 1000


def test_bench_refuses_a_wrong_implementation(tmp_path, monkeypatch):
    """The correctness gate before timing is real: a broken implementation stops the benchmark."""
    bench = load_bench()
    real_call = bench.Impl.__call__

    def broken(self, x, weight, bias, lora_a, lora_b, coeffs, scale, peft_layer=None):
        if self.name == "torch":  # forgets the per-sample mixture: uses the first sample's coefficients for all
            coeffs = coeffs[:1].expand_as(coeffs)
        return real_call(self, x, weight, bias, lora_a, lora_b, coeffs, scale, peft_layer)

    monkeypatch.setattr(bench.Impl, "__call__", broken)
    with pytest.raises(AssertionError, match="torch output"):
        bench.main(["--device", "cpu", "--m", "34", "--shapes", "40x24", "--num-loras", "3", "--no-rank-sweep",
                    "--impls", "linear", "torch", "--modes", "fwd", "--reps", "1", "--out-dir", str(tmp_path)])
