"""Coverage audit of the fast paths against the project's correctness standard (README / lorweb_fast/testing.py):
"every fast path is tested against the float64 reference, forward and every gradient, on odd shapes (M, in, out not
multiples of 16; N in {1, 3, 32}; r in {1, 4, 8}; per-sample coefficients) in fp32 and bf16, with tolerances derived
from the dtype".

Each test below fills one gap the existing suite leaves (see /tmp/rev/coverage.md for the map). Every test here is
"COVERAGE GAP, passes" unless its docstring says otherwise: it pins a path no other CPU test checks against float64.

Two kinds of tests:

* ``test_interp_*``: Triton kernels on CPU tensors under TRITON_INTERPRET=1. The variable must be set before triton
  is imported, so they are skipped in a normal run and executed by ``test_under_the_interpreter[<name>]``, which
  runs this file's case in a subprocess with the variable set (as tests/test_triton_kernels.py does).
* the rest: plain CPU tests (torch backend, LoRWeBLinear's adapter_precision="fp32" path, merged weights).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import reference
from lorweb_fast.testing import (assert_within_bound, assert_within_rss_bound, check_against_reference,
                                 check_forward, random_problem, tolerance)

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
THIS = Path(__file__)
interp_only = pytest.mark.skipif(not INTERP, reason="run by test_under_the_interpreter (TRITON_INTERPRET=1)")

#: the interpreter cases of this file, each run in its own subprocess by test_under_the_interpreter
INTERPRETER_CASES = [
    "test_interp_merged_chunk_end_to_end",
    "test_interp_merged_chunk_shrink_launcher",
    "test_interp_merged_chunk_grad_basis",
    "test_interp_composed_and_cublas_routes_bf16_odd_shapes",
    "test_interp_split_k_and_tma_end_to_end",
]


@pytest.mark.skipif(INTERP, reason="the wrapper itself does not run under the interpreter")
@pytest.mark.parametrize("case", INTERPRETER_CASES)
def test_under_the_interpreter(tmp_path, case):
    triton = pytest.importorskip("triton")
    from lorweb_fast import ops

    if ops._version_tuple(triton.__version__) < ops.MIN_INTERPRETER_TRITON:
        pytest.skip(f"the CPU interpreter of triton {triton.__version__} cannot run the kernels")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", f"{THIS}::{case}", "-q", "-x", "-p", "no:cacheprovider",
                           "-p", "no:randomly", "--import-mode=importlib", "--rootdir", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout.splitlines()[-1] and "skipped" not in proc.stdout.splitlines()[-1], tail


def _launched(K, fn):
    """fn()'s result and the names of the kernels it launched (as tests/triton_interpret_cases.py:_launched)."""
    names, original = [], K._launch

    def spy(kernel, grid, *args, **kwargs):
        names.append(kernel.__name__)
        original(kernel, grid, *args, **kwargs)

    K._launch = spy
    try:
        return fn(), names
    finally:
        K._launch = original


# ------------------------------------------------------------------------ r_chunks' merged chunk (just changed)
# R whose remainder rounds up to R0 now runs as ONE chunk of 2 * R0 with columns R .. 2 R0 masked: 20 -> (32, 0),
# 56 -> (64, 0), 112 -> (128, 0), 200 -> (256, 0). The suite reaches a merged chunk only at R = 24 -> (32, 0)
# (odd-shape N = 3, r = 8: per-row dcoeffs, unsplit, pointer kernels). Not at the wider merged chunks, not with the
# per-program dcoeffs partials, split-K's finish kernel or the TMA shrink, not in grad_basis beyond R = 24.
MERGED = [  # (batch, seq, in, out, N, r, dtype); seq 32 / 128 make the backward K1 write per-program partials
    (2, 7, 37, 29, 5, 4, torch.float32),      # R = 20 -> (32, 0), per-row partials
    (1, 9, 45, 19, 56, 1, torch.bfloat16),    # R = 56 -> (64, 0), r = 1
    (2, 128, 40, 19, 14, 8, torch.bfloat16),  # R = 112 -> (128, 0), block_m 128 divides 128: per-program
    (2, 32, 37, 29, 50, 4, torch.float32),    # R = 200 -> (256, 0), block_m 32 divides 32: per-program
    (3, 7, 17, 51, 50, 4, torch.bfloat16),    # R = 200 -> (256, 0), per-row
]


@interp_only
@pytest.mark.parametrize("batch, seq, k, out, n, r, dtype", MERGED,
                         ids=lambda v: str(v).removeprefix("torch."))
def test_interp_merged_chunk_end_to_end(batch, seq, k, out, n, r, dtype):
    """COVERAGE GAP, passes. kernels/mixed_lora.py:r_chunks (merged chunk) through forward / backward on the fused
    route (the default table): lorweb_linear's output and every gradient (x, weight, bias, lora_a, lora_b, coeffs),
    and mixed_lora_delta's, against float64 with the dtype's bounds."""
    from lorweb_fast.kernels import mixed_lora as K

    R = n * r
    r0, r1 = K.r_chunks(R)
    assert r1 == 0 and r0 > R and r0 == 2 * (1 << (R.bit_length() - 1))  # a merged chunk, columns R.. masked
    assert K.choose_route(k, out, R, dtype, seq, "default", rank=r) == "fused"
    p = random_problem(batch, seq, k, out, n, r, dtype, seed=R + seq)
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"), p)
    check_against_reference(lambda *a: lf.mixed_lora_delta(*a, backend="triton"), p, with_base=False)


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("split, tma", [(1, 0), (2, 1), (2, 0), (1, 1)])
@pytest.mark.parametrize("rows_per_sample", [32, 9])
@pytest.mark.parametrize("num_loras, rank", [(56, 1), (50, 4)])  # R = 56 -> (64, 0), 200 -> (256, 0)
def test_interp_merged_chunk_shrink_launcher(dtype, split, tma, rows_per_sample, num_loras, rank):
    """COVERAGE GAP, passes. The shrink launcher at merged-chunk R (kernels/mixed_lora.py:shrink, pointer and TMA
    kernels, unsplit and split-K with its finish kernel): forward u and z, and backward K1's z and dcoeffs partials
    (per program when the block divides rows_per_sample, else per row), against float64 with the dtype's bounds.
    The TMA descriptor of the merged chunk is a box of 2 R0 rows over an R-row a_cat (zero-filled beyond R)."""
    from lorweb_fast.kernels import mixed_lora as K

    batch, k = 3, 40
    R = num_loras * rank
    m = batch * rows_per_sample
    g = torch.Generator().manual_seed(R + rows_per_sample)
    x = torch.randn(m, k, generator=g).to(dtype)
    a_cat = (torch.randn(R, k, generator=g) * k ** -0.5).to(dtype)
    coeffs = torch.randn(batch, num_loras, generator=g) * 0.5
    scale = 0.75
    cfg = dict(block_m=16, block_k=16, split_k=split, tma=tma, num_warps=4, num_stages=2)
    (u, z), names = _launched(K, lambda: K.shrink(x, a_cat, coeffs, scale, rows_per_sample, rank, config=cfg))
    assert names[0] == ("_shrink_tma_kernel" if tma else "_shrink_kernel")
    assert ("_shrink_finish_kernel" in names) == (split > 1)
    x64, a64 = x.double(), a_cat.double()
    u_ref, u_abs, u_rss = x64 @ a64.t(), x64.abs() @ a64.abs().t(), (x64.square() @ a64.square().t()).sqrt()
    scaling = (coeffs.double() * scale).repeat_interleave(rank, 1).repeat_interleave(rows_per_sample, 0)
    for name, got, ref, ab, rss in (("u", u, u_ref, u_abs, u_rss),
                                    ("z", z, u_ref * scaling, u_abs * scaling.abs(), u_rss * scaling.abs())):
        assert_within_bound(name, got, ref, ab, dtype, k)
        assert_within_rss_bound(name, got, ref, rss, dtype, k)
    # backward K1 on dy = x (K = k) with the forward's u: z = dZ * scaling and the dcoeffs partials
    _, dz, dc = K.shrink(x, a_cat, coeffs, scale, rows_per_sample, rank, u_in=u, config=cfg)
    assert_within_bound("K1 dz scaled", dz, u_ref * scaling, u_abs * scaling.abs(), dtype, k)
    block = 16 if split == 1 else K.SHRINK_FINISH_BLOCK_M
    group = block if rows_per_sample % block == 0 else 1
    assert tuple(dc.shape) == (m // group, num_loras)
    u64 = u.double()  # the saved u is the kernel's input here: exact in float64
    per_row = (u64 * u_ref).view(m, num_loras, rank).sum(2) * scale
    per_row_abs = (u64.abs() * u_abs).view(m, num_loras, rank).sum(2) * scale
    want = per_row.view(m // group, group, num_loras).sum(1)
    want_abs = per_row_abs.view(m // group, group, num_loras).sum(1)
    # dZ is accumulated in fp32 and never stored in the input dtype before the product with u: fp32 bounds
    assert_within_bound("dcoeffs partials", dc, want, want_abs, torch.float32, k + rank * group)


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("num_loras, rank", [(56, 1), (50, 4), (14, 8)])  # R = 56, 200, 112: merged chunks
def test_interp_merged_chunk_grad_basis(dtype, num_loras, rank):
    """COVERAGE GAP, passes. kernels/mixed_lora.py:grad_basis (K3 and its finish kernel) at merged-chunk R, split
    over M (ragged last slice), in the basis layouts, against float64 (worst-case and statistical bounds)."""
    from lorweb_fast.kernels import mixed_lora as K

    g = torch.Generator().manual_seed(num_loras)
    M, k, nout, R = 37, 45, 51, num_loras * rank
    dz, z = (torch.randn(M, R, generator=g).to(dtype) for _ in range(2))
    x, dy = torch.randn(M, k, generator=g).to(dtype), torch.randn(M, nout, generator=g).to(dtype)
    cfg = dict(block_m=16, block_n=16, split_m=3, num_warps=4, num_stages=2)
    d_a, d_b = K.grad_basis(dz, x, z, dy, rank, config=cfg)
    want_a = (dz.double().t() @ x.double()).view(num_loras, rank, k).transpose(1, 2)
    want_b = (z.double().t() @ dy.double()).view(num_loras, rank, nout)
    abs_a = (dz.double().abs().t() @ x.double().abs()).view(num_loras, rank, k).transpose(1, 2)
    abs_b = (z.double().abs().t() @ dy.double().abs()).view(num_loras, rank, nout)
    rss_a = (dz.double().square().t() @ x.double().square()).sqrt().view(num_loras, rank, k).transpose(1, 2)
    rss_b = (z.double().square().t() @ dy.double().square()).sqrt().view(num_loras, rank, nout)
    for name, got, want, ab, rss in (("d_lora_a", d_a, want_a, abs_a, rss_a), ("d_lora_b", d_b, want_b, abs_b, rss_b)):
        assert_within_bound(name, got, want, ab, dtype, M)
        assert_within_rss_bound(name, got, want, rss, dtype, M)


# ------------------------------------------------------------------------------------- composed / cuBLAS routes
# tests/triton_interpret_cases.py:test_other_routes_against_float64 forces each route on ONE fp32 shape (N = 3, r = 4,
# 3-D). The composed route is a production route of the sm90 table (bf16 entries); the cuBLAS route takes every 3-D
# input with a rank that is not a power of two or R > 256. Neither is checked in bf16 on CPU, nor at N = 1 / 32,
# r = 1 / 8.
ROUTE_CASES = [  # (batch, seq, in, out, N, r, dtype)
    (1, 7, 17, 19, 1, 1, torch.bfloat16),
    (2, 9, 37, 29, 3, 8, torch.bfloat16),
    (3, 11, 45, 51, 32, 4, torch.bfloat16),
    (2, 7, 45, 19, 32, 8, torch.float32),
    (3, 9, 17, 51, 1, 8, torch.float32),
]


@interp_only
@pytest.mark.parametrize("route", ["composed", "cublas"])
@pytest.mark.parametrize("batch, seq, k, out, n, r, dtype", ROUTE_CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_interp_composed_and_cublas_routes_bf16_odd_shapes(monkeypatch, route, batch, seq, k, out, n, r, dtype):
    """COVERAGE GAP, passes. kernels/mixed_lora.py:forward / backward on the "composed" (shrink kernel + addmm) and
    "cublas" routes, 3-D input with per-sample coefficients, fp32 and bf16, N in {1, 3, 32}, r in {1, 4, 8}: output
    and every gradient of lorweb_linear and mixed_lora_delta against float64."""
    from lorweb_fast.kernels import mixed_lora as K

    monkeypatch.setattr(K, "choose_route", lambda *a, **kw: route)
    p = random_problem(batch, seq, k, out, n, r, dtype, seed=n * 10 + r)
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"), p)
    check_against_reference(lambda *a: lf.mixed_lora_delta(*a, backend="triton"), p, with_base=False)


# ------------------------------------------------------------------------------- split-K and TMA, end to end
# Split-K is checked on CPU only at the shrink launcher in fp32 (u, z, dcoeffs); in bf16 only TMA-vs-pointer bit
# equality (no float64). The TMA shrink / expand are checked bit for bit against the pointer kernels, and the TMA
# K1 partials in fp32 against float64. No CPU test runs a whole layer (forward and every gradient) with split-K or
# with every role on TMA, which the tuner (split_k candidates) and the sm90 table (tma entries) produce.
@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("split, tma", [(2, 0), (3, 1), (1, 1)])
@pytest.mark.parametrize("seq, n, r", [(9, 3, 8), (32, 32, 1), (7, 1, 8)])  # R = 24 (merged 32), 32, 8
def test_interp_split_k_and_tma_end_to_end(monkeypatch, dtype, split, tma, seq, n, r):
    """COVERAGE GAP, passes. A layer whose table rule has split-K shrinks (forward and backward K1) and TMA on every
    role it has (shrink, expand, shrink_dy, expand_dx): lorweb_linear's output and every gradient against float64,
    in fp32 and bf16, on TMA-aligned odd shapes (in = 40, out = 24), with per-row and per-program (seq = 32)
    dcoeffs partials. The launched kernels are checked so that the intended path really ran."""
    from lorweb_fast.kernels import mixed_lora as K

    real_lookup = K.lookup

    def lookup(in_features, out_features, R, dt, family="default"):
        rule = dict(real_lookup(in_features, out_features, R, dt, family), route="fused")
        for role in ("shrink", "shrink_dy"):
            rule[role] = {**rule[role], "block_m": 16, "block_k": 16, "split_k": split, "tma": tma}
        for role in ("expand", "expand_dx"):
            rule[role] = {**rule[role], "block_m": 16, "block_n": 16, "block_k": 16, "group_m": 2, "tma": tma}
        rule["grad_basis"] = {**rule["grad_basis"], "block_m": 16, "block_n": 16, "split_m": 3}
        return rule

    monkeypatch.setattr(K, "lookup", lookup)
    p = random_problem(2, seq, 40, 24, n, r, dtype, seed=seq + n + r)
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"), p)
    leaves = [p[k].clone().requires_grad_(True) for k in ("x", "lora_a", "lora_b", "coeffs")]
    _, names = _launched(K, lambda: lf.lorweb_linear(leaves[0], p["weight"], p["bias"], *leaves[1:], p["scale"],
                                                    backend="triton").sum().backward())
    want = {"_shrink_tma_kernel" if tma else "_shrink_kernel", "_expand_tma_kernel" if tma else "_expand_kernel",
            "_grad_basis_kernel", "_grad_basis_finish_kernel"} | ({"_shrink_finish_kernel"} if split > 1 else set())
    assert set(names) == want, names


# ------------------------------------------------------------------------------ adapter_precision="fp32" path
def _fp32_adapter_fn(dtype, two_d, backend):
    """fn(x, weight, bias, lora_a, lora_b, coeffs, scale) through LoRWeBLinear(adapter_precision="fp32") whose
    tensors are the given leaves (torch.func.functional_call), for check_against_reference."""
    def fn(x, weight, bias, lora_a, lora_b, coeffs, scale):
        n, k, r = lora_a.shape
        base = nn.Linear(k, weight.shape[0]).to(dtype)
        layer = lf.LoRWeBLinear(base, num_loras=n, rank=r, lora_alpha=scale * r, key_dim=4, query_dim=6,
                                backend=backend)
        layer.adapter_precision = "fp32"
        layer.set_coefficients(coeffs)
        tensors = {"lora_A": lora_a, "lora_B": lora_b, "base_layer.weight": weight, "base_layer.bias": bias}
        return torch.func.functional_call(layer, tensors, (x,))
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("batch, seq, k, out, n, r", [(2, 7, 37, 29, 3, 4), (3, None, 45, 19, 32, 1),
                                                      (1, 9, 17, 51, 1, 8), (3, 5, 45, 29, 32, 8)])
def test_fp32_adapter_precision_output_and_every_gradient(dtype, batch, seq, k, out, n, r):
    """COVERAGE GAP, passes. LoRWeBLinear._forward_fp32 (adapter_precision="fp32", the official arithmetic the
    trainer selects) is tested on CPU for its forward only (tests/test_layer_guards.py, in = 8, N = 3, r = 2;
    tests/test_half_precision_range.py, fp16 overflow). Here: output and every gradient (x, weight, bias, lora_A,
    lora_B, coeffs) against float64, bf16 and fp32 layers, 2-D and 3-D, odd shapes, N in {1, 3, 32}, r in {1, 4, 8}
    (bounds of the layer's dtype: the delta is computed in fp32 and rounded once to it)."""
    p = random_problem(batch, seq, k, out, n, r, dtype, seed=k + n + r)
    check_against_reference(_fp32_adapter_fn(dtype, seq is None, "torch"), p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_query_path_gradients_against_float64(dtype, precision):
    """COVERAGE GAP, passes. The gradients of the query path (lora_keys, att_lora_to_q.weight) through the layer's
    per-forward coefficients are checked only by float64 gradcheck (tests/test_float64.py); none in fp32 / bf16.
    Here a layer with parameters in ``dtype`` (per-forward query, per-sample, 3-D odd shapes, heads = 2, N = 3,
    r = 4), default and "fp32" adapter precision: output and the gradients of lora_keys, att_lora_to_q.weight,
    lora_A, lora_B and x against the float64 reference evaluated on the same values. Bound: the tensor's error norm
    within tolerance(dtype, depth) of the reference's norm, entry by entry within it of the largest |entry| (the
    coefficients are not multilinear in the keys, so no |input| bound exists; this is the dtype's bound on a
    relative-norm scale)."""
    torch.manual_seed(0)
    k, out, n, r, key_dim, query_dim = 37, 29, 3, 4, 8, 12
    layer = lf.LoRWeBLinear(nn.Linear(k, out), num_loras=n, rank=r, key_dim=key_dim, query_dim=query_dim, heads=2,
                            backend="torch", lora_alpha=3.0).to(dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_keys.normal_(0, 2.0)
    layer.adapter_precision = precision
    query = torch.randn(2, query_dim)
    x = torch.randn(2, 7, k).to(dtype).requires_grad_(True)
    layer.set_query_per_forward(query)
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    y.backward(dy)
    got = {"y": y.detach(), "x": x.grad, "keys": layer.lora_keys.grad, "to_q": layer.att_lora_to_q.weight.grad,
           "lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad}

    leaves = {name: t.detach().double().requires_grad_(True) for name, t in
              (("x", x), ("keys", layer.lora_keys), ("to_q", layer.att_lora_to_q.weight), ("lora_A", layer.lora_A),
               ("lora_B", layer.lora_B))}
    q64 = query.to(dtype).double() if precision == "auto" else query.double()  # "auto" casts the query to dtype
    c = reference.compute_coefficients(q64, leaves["to_q"], leaves["keys"], heads=2)
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    ref = reference.lorweb_linear(leaves["x"], w, b, leaves["lora_A"], leaves["lora_B"], c, layer.scale)
    ref.backward(dy.double())
    want = {"y": ref.detach(), **{name: t.grad for name, t in leaves.items()}}
    depth = k + n * r + query_dim + key_dim + 7 * out
    tol = tolerance(dtype, depth)
    for name, g in got.items():
        assert g is not None and g.dtype == dtype, name
        err, scale_ = (g.double() - want[name]), want[name].abs().max().item()
        assert err.norm().item() <= tol * want[name].norm().item(), (name, err.norm().item(), want[name].norm().item())
        assert err.abs().max().item() <= tol * scale_, (name, err.abs().max().item(), scale_)


# ------------------------------------------------------------------------------------------- merged weights
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n, r", [(1, 1), (3, 8), (32, 4)])
@pytest.mark.parametrize("two_d", [False, True], ids=["3d", "2d"])
def test_merge_strategies_on_odd_shapes(dtype, n, r, two_d):
    """COVERAGE GAP, passes. The merged paths (lorweb_fast/flux.py:merged "full" / "offload" / "jit";
    LoRWeBLinear.merged_weight_for, jit_merged_forward) are checked on CPU at in = out = 64 (multiples of 16) with
    N = 3, r = 2 (tests/test_merge_strategies.py) and at 8 -> 6 (tests/test_layer_guards.py). Here in = 37, out = 29,
    N in {1, 3, 32}, r in {1, 4, 8}, 2-D and 3-D input: one analogy under every strategy and a batch of different
    analogies under "jit", output and the input gradient (the only gradient a merged layer gives) against float64
    with the dtype's bounds."""
    from lorweb_fast import flux

    torch.manual_seed(n + r)
    k, out = 37, 29
    layer = lf.LoRWeBLinear(nn.Linear(k, out), num_loras=n, rank=r, key_dim=4, query_dim=6, lora_alpha=1.5 * r,
                            backend="torch").to(dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.requires_grad_(False)
    for batch, strategies in ((1, flux.MERGE_STRATEGIES), (3, ("jit",))):
        coeffs = torch.randn(batch, n) * 0.5
        layer.set_coefficients(coeffs)
        shape = (batch, k) if two_d else (batch, 5, k)
        x0 = torch.randn(shape).to(dtype)
        problem = dict(x=x0, weight=layer.base_layer.weight, bias=layer.base_layer.bias, lora_a=layer.lora_A,
                       lora_b=layer.lora_B, coeffs=coeffs, scale=layer.scale)
        for strategy in strategies:
            x = x0.clone().requires_grad_(True)
            with flux.merged(layer, strategy):
                y = layer(x)
                dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
                y.backward(dy)  # inside the block: the merged weight is the one in place
            check_forward(f"{strategy} B={batch}", y.detach(), problem)
            # dx = dy (W + delta)_b: the reference's x-gradient, bounded by |dy| (|W| + |delta|)
            x64 = x0.double().requires_grad_(True)
            ref = reference.lorweb_linear(x64, problem["weight"].double(), problem["bias"].double(),
                                          layer.lora_A.double(), layer.lora_B.double(), coeffs.double(), layer.scale)
            ref.backward(dy.double())
            x64a = x0.double().abs().requires_grad_(True)
            ref_abs = reference.lorweb_linear(x64a, problem["weight"].double().abs(), None, layer.lora_A.double().abs(),
                                              layer.lora_B.double().abs(), coeffs.double().abs(), layer.scale)
            ref_abs.backward(dy.double().abs())
            assert_within_bound(f"{strategy} B={batch} grad x", x.grad, x64.grad, x64a.grad, dtype,
                                out + n * r)


@pytest.mark.parametrize("strategy", ["full", "offload", "jit"])
def test_x_gradient_of_a_merged_forward_backpropagated_after_the_block(strategy):
    """DEFECT (fails now for "offload"). A forward run with autograd inside ``merged(model, strategy)`` and
    backpropagated after the block (e.g. a guidance gradient taken once the sampling step is done) must give the
    x-gradient of the merged layer it ran, or raise autograd's in-place-modification error; never a silently wrong
    gradient. "full" (swaps tensor objects) and "jit" (a temporary weight) give the merged weight's gradient.
    lorweb_fast/flux.py:_merged_offload writes the merged weight with ``weight.data.copy_(new)`` and its restore
    copies the original back the same way, bypassing the version counter, so the backward silently uses the
    restored ORIGINAL weight: dx = dy W instead of dy (W + delta). Expected: a version bump (``weight.copy_`` under
    no_grad) so that autograd raises, or the documented behaviour."""
    from lorweb_fast import flux

    torch.manual_seed(0)
    layer = lf.LoRWeBLinear(nn.Linear(37, 29), num_loras=3, rank=4, key_dim=4, query_dim=6, backend="torch")
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.requires_grad_(False)
    coeffs = torch.randn(1, 3) * 0.5
    layer.set_coefficients(coeffs)
    x0 = torch.randn(1, 5, 37)
    x = x0.clone().requires_grad_(True)
    with flux.merged(layer, strategy):
        y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    try:
        y.backward(dy)
    except RuntimeError as exc:  # autograd names the in-place change: acceptable
        assert "modified by an inplace operation" in str(exc)
        return
    x64 = x0.double().requires_grad_(True)
    reference.lorweb_linear(x64, layer.base_layer.weight.double(), layer.base_layer.bias.double(),
                            layer.lora_A.double(), layer.lora_B.double(), coeffs.double(), layer.scale).backward(
        dy.double())
    x64a = x0.double().abs().requires_grad_(True)
    reference.lorweb_linear(x64a, layer.base_layer.weight.double().abs(), None, layer.lora_A.double().abs(),
                            layer.lora_B.double().abs(), coeffs.double().abs(), layer.scale).backward(dy.double().abs())
    assert_within_bound(f"{strategy}: grad x after the block", x.grad, x64.grad, x64a.grad, torch.float32, 29 + 12)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERP, reason="GPU only")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("batch, seq, k, out, n, r, dtype", MERGED + [(2, 256, 3072, 3072, 50, 4, torch.bfloat16)],
                         ids=lambda v: str(v).removeprefix("torch."))
def test_merged_chunk_on_gpu(backend, batch, seq, k, out, n, r, dtype):
    """COVERAGE GAP (GPU; not run here: no GPU in this review). Compiled kernels at the merged-chunk R that
    r_chunks now gives (20 -> 32, 56 -> 64, 112 -> 128, 200 -> 256; tests/test_gpu.py reaches a merged chunk only at
    R = 24), plus a TMA-table shape (3072 -> 3072 bf16, R = 200, per-program dcoeffs): output and every gradient
    against float64."""
    from lorweb_fast import ops

    why = ops._unavailable_reason(backend, torch.device("cuda"))
    if why is not None:
        pytest.skip(why)
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # no TF32 (as tests/test_gpu.py's no_tf32 fixture)
    try:
        p = random_problem(batch, seq, k, out, n, r, dtype, device="cuda", seed=n + r)
        check_against_reference(lambda *a: lf.lorweb_linear(*a, backend=backend), p)
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
