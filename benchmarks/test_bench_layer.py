"""pytest-benchmark suite for the layer op, one row per backend and pass (no timing assertions).

    pytest benchmarks/ --benchmark-only                          # just the benchmarks
    pytest benchmarks/ --benchmark-only --benchmark-save=NAME     # keep a run (.benchmarks/)
    pytest benchmarks/ --benchmark-only --benchmark-compare       # compare with the last saved run

Without a GPU it times small CPU shapes (the torch backend and nn.Linear; the fused backends skip with the reason),
so CI runs it in seconds. With a CUDA GPU it times the target shape of METHOD.md: bf16, M=8192 (2 samples of 4096
tokens), 3072->3072, N=32 LoRAs of rank 4. Every LoRWeB row first checks its output (and, forward+backward, every
gradient) against the float64 reference with the dtype's bounds (lorweb_fast.testing), then times whole calls; on
a GPU each timed call ends with a synchronize, so rows include launch overhead (the device-only numbers are
benchmarks/bench_mixed_lora.py's).
"""

import pytest
import torch
import torch.nn.functional as F

import lorweb_fast as lf
from lorweb_fast import ops
from lorweb_fast.testing import check_against_reference, check_forward, random_problem

pytest.importorskip("pytest_benchmark")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# (batch, seq, in, out, N, r, dtype)
SHAPE = (2, 4096, 3072, 3072, 32, 4, torch.bfloat16) if ON_GPU else (2, 64, 128, 128, 8, 4, torch.float32)
# Fixed rounds (pedantic mode) so that the suite's duration is bounded whatever the machine's load.
ROUNDS, WARMUP_ROUNDS = (30, 5) if ON_GPU else (5, 1)
ROWS = ["linear", "torch", "triton", "cuda"]


@pytest.fixture(scope="module")
def problem():
    batch, seq, k, n, num_loras, rank, dtype = SHAPE
    return random_problem(batch, seq, k, n, num_loras, rank, dtype, device=DEVICE, seed=0)


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _layer(row, p):
    """fn(x, lora_a, lora_b) -> y for one row."""
    if row == "linear":
        return lambda x, a, b: F.linear(x, p["weight"], p["bias"])
    if row != "torch" and ops._unavailable_reason(row, torch.device(DEVICE)) is not None:
        pytest.skip(f"backend {row!r} unavailable here: {ops._unavailable_reason(row, torch.device(DEVICE))}")
    if row == "triton" and not ON_GPU:
        pytest.skip("backend 'triton' on CPU runs in the Triton interpreter: its time says nothing about the kernels")
    return lambda x, a, b: lf.lorweb_linear(x, p["weight"], p["bias"], a, b, p["coeffs"], p["scale"], backend=row)


@pytest.mark.benchmark(group="layer forward")
@pytest.mark.parametrize("row", ROWS)
def test_layer_forward(benchmark, problem, row):
    fn = _layer(row, problem)
    x, a, b = problem["x"], problem["lora_a"], problem["lora_b"]
    with torch.no_grad():
        if row != "linear":
            check_forward(f"{row} forward", fn(x, a, b), problem)

        def call():
            y = fn(x, a, b)
            _sync()
            return y

        benchmark.extra_info.update(shape=str(SHAPE[:6]), dtype=str(SHAPE[6]), device=DEVICE)
        benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)


@pytest.mark.benchmark(group="layer forward+backward")
@pytest.mark.parametrize("row", ROWS)
def test_layer_forward_backward(benchmark, problem, row):
    fn = _layer(row, problem)
    if row != "linear":
        check_against_reference(lambda *t: lf.lorweb_linear(*t, backend=row), problem)
    x = problem["x"].detach().clone().requires_grad_(True)
    a = problem["lora_a"].detach().clone().requires_grad_(True)
    b = problem["lora_b"].detach().clone().requires_grad_(True)
    dy = torch.randn(*x.shape[:-1], SHAPE[3], device=DEVICE, dtype=SHAPE[6])

    def call():
        x.grad = a.grad = b.grad = None
        fn(x, a, b).backward(dy)
        _sync()

    benchmark.extra_info.update(shape=str(SHAPE[:6]), dtype=str(SHAPE[6]), device=DEVICE)
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    assert x.grad is not None and torch.isfinite(x.grad).all()
