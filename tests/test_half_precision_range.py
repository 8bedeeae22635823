"""Numerical range audit in half precision (fp16 / bf16) of the CPU-runnable paths.

Every case compares against the float64 reference (``lorweb_fast.reference``) evaluated on the same low-precision
values, with tolerances derived from the dtype (``lorweb_fast.testing``). What is acceptable: behaving as an fp16
``nn.Linear`` / peft LoRA would in the same dtype (an intermediate ``x A_n`` that exceeds 65504 overflows there too).
What is a finding (``xfail(strict=True)``): inf / NaN where the float64 reference is finite and peft in the same dtype
would not produce it, or a gradient computed in half precision where the reference and the fused backends use fp32.

The Triton cases at the end run only under ``TRITON_INTERPRET=1`` (set before triton is imported), e.g.
``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_half_precision_range.py -q -p no:randomly``; without it
they are skipped.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorweb_fast as lf
from lorweb_fast import reference
from lorweb_fast.lora_api import fuse_lora, unfuse_lora
from lorweb_fast.testing import (assert_within_bound, check_against_reference, dtype_eps, random_problem,
                                 tolerance)

HALF = (torch.float16, torch.bfloat16)
FP16_MAX = torch.finfo(torch.float16).max  # 65504


def _const(shape, value, dtype):
    return torch.full(shape, float(value), dtype=dtype)


def _u_overflow_problem(dtype=torch.float16, b_value=1e-5):
    """x = 100, A = 16 over in = 64: every u = x A_n is 102400 (> 65504, finite in fp32); B tiny, so z = u / 4 and
    the output y (about 2.05) fit fp16 comfortably."""
    batch, seq, k, out, n, r = 1, 16, 64, 32, 4, 2
    return dict(x=_const((batch, seq, k), 100.0, dtype), weight=torch.zeros(out, k, dtype=dtype),
                lora_a=_const((n, k, r), 16.0, dtype), lora_b=_const((n, r, out), b_value, dtype),
                coeffs=torch.full((batch, n), 0.25), scale=1.0)


def _dcoeffs_overflow_problem(dtype=torch.float16):
    """u = 1000 and dZ = 1 (for dy = 1) everywhere, 128 tokens, r = 2: d coeffs = 128 * 2 * 1000 = 256000 (finite in
    fp32, the coefficients' dtype; beyond fp16) while x, u, z, y (62.5) and dx all fit fp16."""
    batch, seq, k, out, n, r = 1, 128, 8, 32, 4, 2
    return dict(x=_const((batch, seq, k), 1.0, dtype), weight=torch.zeros(out, k, dtype=dtype),
                lora_a=_const((n, k, r), 125.0, dtype), lora_b=_const((n, r, out), 1 / 32, dtype),
                coeffs=torch.full((batch, n), 0.25), scale=1.0)


def _run(problem, backend, *, with_weight=True):
    """Forward (sum of the fp32 output as the loss) and backward; returns (y, d_coeffs, dx)."""
    x = problem["x"].clone().requires_grad_(True)
    coeffs = problem["coeffs"].clone().requires_grad_(True)
    if with_weight:
        y = lf.lorweb_linear(x, problem["weight"], None, problem["lora_a"], problem["lora_b"], coeffs,
                             problem["scale"], backend=backend)
    else:
        y = lf.mixed_lora_delta(x, problem["lora_a"], problem["lora_b"], coeffs, problem["scale"], backend=backend)
    y.float().sum().backward()
    return y.detach(), coeffs.grad, x.grad


def _reference_grads(problem):
    """float64 reference output and d coeffs for the loss sum(y)."""
    coeffs = problem["coeffs"].double().requires_grad_(True)
    y = reference.lorweb_linear(problem["x"], problem["weight"], None, problem["lora_a"], problem["lora_b"], coeffs,
                                problem["scale"])
    y.sum().backward()
    return y.detach(), coeffs.grad


def _scaled_problem(dtype, x_scale, seed=0):
    p = random_problem(2, 5, 24, 16, 4, 2, dtype, seed=seed)
    p["x"] = (p["x"].float() * x_scale).to(dtype)
    return p


# ----------------------------------------------------------------------------- 1. intermediates u = x A, z = u s
@pytest.mark.parametrize("dtype,x_scale", [(torch.float16, 300.0), (torch.bfloat16, 300.0), (torch.bfloat16, 1e30)],
                         ids=["fp16-x300", "bf16-x300", "bf16-x1e30"])
def test_torch_backend_large_activations_within_dtype_tolerance(dtype, x_scale):
    """Large but representable activations (|x| in the hundreds for fp16, 1e30 for bf16): output and every gradient
    of the torch backend stay finite and within the dtype-derived bounds of the float64 reference."""
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="torch"), _scaled_problem(dtype, x_scale))


@pytest.mark.parametrize("dtype", HALF)
def test_reference_is_float64_for_half_inputs_beyond_fp16_range(dtype):
    """The oracle upcasts before computing: half inputs whose u = x A exceeds 65504 give the exact finite result."""
    p = _u_overflow_problem(dtype)
    y = reference.lorweb_linear(p["x"], p["weight"], None, p["lora_a"], p["lora_b"], p["coeffs"], 1.0)
    x, a, b = (p[k].double() for k in ("x", "lora_a", "lora_b"))
    expected = (x @ a.permute(1, 0, 2).reshape(64, -1) * 0.25) @ b.reshape(-1, 32)
    assert y.dtype == torch.float64 and torch.equal(y, expected) and torch.isfinite(y).all()


def _peft_lora_output(peft, problem, *, fp16_adapter):
    """y of a peft LoRA over a zero fp16 nn.Linear(64, 32) holding basis LoRA 0 (scale 1)."""
    base = nn.Linear(64, 32, bias=False).half()
    with torch.no_grad():
        base.weight.zero_()
    model = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]),
                                autocast_adapter_dtype=not fp16_adapter)
    lora = model.base_model.model[0]
    assert lora.lora_A["default"].weight.dtype == (torch.float16 if fp16_adapter else torch.float32)
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(problem["lora_a"][0].t())
        lora.lora_B["default"].weight.copy_(problem["lora_b"][0].t())
        return model(problem["x"])


def test_torch_backend_fp16_u_overflow_matches_an_fp16_peft_lora():
    """fp16, u = x A_n = 102400 > 65504 while the exact output (~2.05) fits: the torch backend stores u unscaled in
    fp16 and returns inf, exactly where a peft LoRA with fp16 adapter weights (autocast_adapter_dtype=False)
    overflows (its lora_A(x) is the same fp16 intermediate): acceptable by the audit's rule. peft's default
    (autocast_adapter_dtype=True) keeps the adapter in fp32 and stays finite; LoRWeB's counterpart is
    adapter_precision='fp32' (next test), or running in bf16."""
    peft = pytest.importorskip("peft")
    p = _u_overflow_problem()
    y = lf.lorweb_linear(p["x"], p["weight"], None, p["lora_a"], p["lora_b"], p["coeffs"], 1.0, backend="torch")
    ref, _ = _reference_grads(p)
    assert torch.isfinite(ref).all() and ref.abs().max() < FP16_MAX
    assert torch.isinf(y).all()
    assert torch.isinf(_peft_lora_output(peft, p, fp16_adapter=True)).all()
    assert torch.isfinite(_peft_lora_output(peft, p, fp16_adapter=False)).all()


def test_layer_adapter_precision_fp32_keeps_large_intermediates_finite():
    """LoRWeBLinear with adapter_precision='fp32' (the official arithmetic) computes u and z in fp32: the case whose
    fp16 intermediate overflows gives the finite reference output, rounded once to fp16."""
    p = _u_overflow_problem()
    layer = lf.LoRWeBLinear(nn.Linear(64, 32, bias=False).half(), num_loras=4, rank=2, key_dim=4, query_dim=6,
                            backend="torch")
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A.copy_(p["lora_a"])
        layer.lora_B.copy_(p["lora_b"])
    layer.set_coefficients(p["coeffs"])
    layer.adapter_precision = "fp32"
    with torch.no_grad():
        y = layer(p["x"])
    ref, _ = _reference_grads(p)
    assert y.dtype == torch.float16
    assert_within_bound("fp32 adapter", y, ref, ref.abs(), torch.float16, 64 + 8)


def test_fp16_output_beyond_range_is_inf_like_nn_linear():
    """An output that does not fit fp16 is inf on the torch backend, as an fp16 nn.Linear gives for the same product
    (correct: the result is not representable in the layer's dtype)."""
    x = _const((1, 2, 64), 100.0, torch.float16)
    w = _const((8, 64), 16.0, torch.float16)  # x W^T = 102400
    a, b = torch.zeros(2, 64, 1, dtype=torch.float16), torch.zeros(2, 1, 8, dtype=torch.float16)
    y = lf.lorweb_linear(x, w, None, a, b, torch.full((1, 2), 0.5), 1.0, backend="torch")
    assert torch.isinf(y).all() and torch.isinf(F.linear(x, w)).all()


# ------------------------------------------------------------------------------------------------ 2. coefficients
def _coefficient_case(dtype, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_dim, key_dim, n = 48, 16, 8
    w = (torch.randn(key_dim, q_dim, generator=g) * q_dim ** -0.5).to(dtype)
    keys = torch.randn(n, key_dim, generator=g).to(dtype)
    query = torch.randn(3, q_dim, generator=g)
    query = {"tiny": query * 1e-6, "unit": query, "large": query * 1e3, "negative-large": -query.abs() * 1e3}[kind]
    return query.to(dtype), w, keys


@pytest.mark.parametrize("activation,reduce", [("softmax", "mean"), ("softmax", "sum"), ("tanh", "mean"),
                                               ("tanh", "sum")])
@pytest.mark.parametrize("kind", ["tiny", "unit", "large", "negative-large"])
@pytest.mark.parametrize("dtype", HALF + (torch.float32,))
def test_coefficients_stable_for_tiny_and_large_queries(dtype, kind, activation, reduce):
    """Queries from 1e-6 to 1e3 (saturated softmax, logits in the hundreds): the coefficients are finite, in their
    range, and within the dtype's rounding of the projection (relative eps on p, so absolute eps * |logit| on the
    softmax) of the float64 reference on the same values."""
    query, w, keys = _coefficient_case(dtype, kind)
    kw = dict(heads=2, activation=activation, reduce=reduce)
    got = lf.compute_coefficients(query, w, keys, **kw)
    ref = reference.compute_coefficients(query, w, keys, **kw)
    logits = (query.double() @ w.double().T).abs() @ keys.double().abs().T / math.sqrt(8)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    lo = 0.0 if activation == "softmax" else -1.0
    assert (got >= lo).all() and (got <= 1.0).all()
    bound = 8 * dtype_eps(dtype) * (1.0 + logits.max().item()) + 1e-6
    assert (got.double() - ref).abs().max().item() <= bound


@pytest.mark.parametrize("dtype", HALF)
def test_all_equal_logits_give_exactly_uniform_coefficients(dtype):
    """Identical keys give all-equal logits (also when large): softmax is exactly 1/N, in fp16 and bf16 weights."""
    query, w, _ = _coefficient_case(dtype, "large")
    keys = torch.full((8, 16), 3.0, dtype=dtype)
    got = lf.compute_coefficients(query, w, keys)
    assert torch.equal(got, torch.full_like(got, 1 / 8))


def test_bf16_projection_of_a_huge_query_is_finite():
    """bf16 has fp32's range: a query of 1e30 (far beyond fp16) gives finite one-hot-like coefficients matching the
    float64 reference (saturated softmax)."""
    query, w, keys = _coefficient_case(torch.bfloat16, "unit")
    query = (query.float() * 1e30).to(torch.bfloat16)
    got = lf.compute_coefficients(query, w, keys)
    ref = reference.compute_coefficients(query, w, keys)
    assert torch.isfinite(got).all() and (got.double() - ref).abs().max() < 1e-6


def _fp16_projection_overflow_case():
    """fp16 to_q weight and a query that fits fp16 (|q| = 30000) aligned with row 0 of the weight: the exact
    projection p[0] = 30000 * sum |w0| is about 1.2e5 (> 65504); the float64 reference is a finite one-hot."""
    torch.manual_seed(0)
    layer = lf.LoRWeBLinear(nn.Linear(8, 8).half(), num_loras=4, rank=2, key_dim=4, query_dim=64, backend="torch")
    w = layer.att_lora_to_q.weight
    query = (torch.sign(w[0].float()) * 30000).unsqueeze(0).half()
    return layer, query


def test_fp16_query_projection_overflows_as_officially():
    """fp16 LoRWeB weights (an fp16 pipeline): the query is projected in the weights' dtype, as the official code
    casts the query to the LoRA parameters' dtype (NVlabs/LoRWeB toolkit/network_mixins.py); a projection beyond
    65504 is then inf and the coefficients NaN, where the float64 reference is a finite one-hot. Kept (CLIP queries
    project to values of order 1); set_query refuses it by name (next test)."""
    layer, query = _fp16_projection_overflow_case()
    w, keys = layer.att_lora_to_q.weight, layer.lora_keys
    ref = reference.compute_coefficients(query, w, keys)
    assert torch.isfinite(ref).all()
    got = lf.compute_coefficients(query, w, keys)
    assert not torch.isfinite(got).all()
    assert torch.isfinite(lf.compute_coefficients(query.float(), w.float(), keys.float())).all()


def test_set_query_refuses_a_projection_overflow_by_name():
    """The same overflow through set_query is refused (ValueError naming the projection's dtype and the query's
    magnitude; nothing set) rather than leaving NaN coefficients: the non-per-forward path is safe."""
    layer, query = _fp16_projection_overflow_case()
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"NaN or Inf: .*the query projected by att_lora_to_q \(in float16, as "
                                         r"officially\) .*largest magnitude is 3e\+04"):
        lf.set_query(model, query)
    assert layer.coefficients is None


@pytest.mark.xfail(strict=True, reason="set_query(per_forward=True) checks only the query; each forward then "
                   "computes the coefficients with the fp16 projection overflow and returns NaN outputs silently")
def test_per_forward_query_overflow_does_not_give_nan_outputs():
    """set_query(..., per_forward=True) with the projection-overflow query: the layer output should be finite (or the
    call refused by name), not NaN without a word."""
    layer, query = _fp16_projection_overflow_case()
    model = nn.Sequential(layer)
    lf.set_query(model, query, per_forward=True)
    with torch.no_grad():
        y = model(torch.randn(1, 3, 8).half())
    assert torch.isfinite(y).all()


def test_set_query_refuses_logits_beyond_fp32_range():
    """Logits beyond fp32's range (keys of 1e30, query of 1e10, fp32 weights) are not representable in the fp32
    coefficient computation (the official code computes in fp32 as well): set_query refuses them by name instead of
    setting NaN coefficients."""
    layer = lf.LoRWeBLinear(nn.Linear(8, 8), num_loras=4, rank=2, key_dim=4, query_dim=6, backend="torch")
    with torch.no_grad():
        layer.lora_keys.mul_(1e30)
    with pytest.raises(ValueError, match="NaN or Inf"):
        lf.set_query(nn.Sequential(layer), torch.randn(1, 6) * 1e10)


# ---------------------------------------------------------------------------------------------- 3. merged weights
def _merge_layer(dtype, seed=0, lora_scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(32, 24).to(dtype)
    layer = lf.LoRWeBLinear(base, num_loras=4, rank=2, key_dim=4, query_dim=6, backend="torch")
    with torch.no_grad():
        base.weight.copy_(torch.randn(24, 32, generator=g) * 0.05)
        base.bias.copy_(torch.randn(24, generator=g) * 0.1)
        layer.lora_A.copy_(torch.randn(4, 32, 2, generator=g) * 32 ** -0.5)
        layer.lora_B.copy_(torch.randn(4, 2, 24, generator=g) * lora_scale)
    return layer


def _exact_merged(layer, coeffs):
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    delta = torch.einsum("nir,n,nro->oi", a, coeffs.double(), b) * layer.scale
    return layer.base_layer.weight.detach().double() + delta


@pytest.mark.parametrize("dtype", HALF)
def test_merged_weight_is_rounded_once(dtype):
    """merged_weight_for computes W + s sum alpha_n (A_n B_n)^T in fp32 and rounds once: every entry is the correctly
    rounded float64 value or its neighbour (double rounding through fp32), and almost all are exact."""
    layer = _merge_layer(dtype)
    coeffs = torch.softmax(torch.randn(4, generator=torch.Generator().manual_seed(1)), 0)
    got = layer.merged_weight_for(coeffs)
    exact = _exact_merged(layer, coeffs)
    rounded = exact.to(dtype)
    up, down = torch.nextafter(rounded, rounded.new_tensor(math.inf)), torch.nextafter(rounded,
                                                                                       rounded.new_tensor(-math.inf))
    assert got.dtype == dtype
    assert ((got == rounded) | (got == up) | (got == down)).all()
    assert (got == rounded).float().mean() >= 0.99


def test_merged_weight_cancellation_beyond_fp16_range_stays_finite():
    """Two basis LoRAs whose contributions are each +-1e5 (beyond fp16) and cancel: the fp32 merge gives the finite
    W + small difference, where accumulating in fp16 would give inf - inf = NaN."""
    layer = _merge_layer(torch.float16)
    with torch.no_grad():
        layer.lora_A.zero_()
        layer.lora_B.zero_()
        layer.lora_A[0, :, 0] = 100.0
        layer.lora_B[0, 0, :] = 2000.0  # 0.5 * 2e5 = 1e5
        layer.lora_A[1, :, 0] = -100.0
        layer.lora_B[1, 0, :] = 1999.0  # -0.5 * 199900 = -99950
    coeffs = torch.tensor([0.5, 0.5, 0.0, 0.0])
    got = layer.merged_weight_for(coeffs)
    exact = _exact_merged(layer, coeffs)
    assert torch.isfinite(got).all() and torch.equal(got, exact.to(torch.float16))


def test_merged_weight_overflow_is_the_rounded_value_like_peft():
    """A merged entry beyond 65504 is inf, the correctly rounded fp16 value (peft's default, unsafe merge in fp16
    gives the same); entries that fit are unaffected."""
    layer = _merge_layer(torch.float16)
    with torch.no_grad():
        layer.base_layer.weight[0, 0] = 65000.0
        layer.lora_A.zero_()
        layer.lora_B.zero_()
        layer.lora_A[0, 0, 0] = 10.0
        layer.lora_B[0, 0, 0] = 100.0  # + 1000 on W[0, 0]
    coeffs = torch.tensor([1.0, 0.0, 0.0, 0.0])
    got = layer.merged_weight_for(coeffs)
    assert torch.isinf(got[0, 0]) and torch.isfinite(got.flatten()[1:]).all()
    assert torch.equal(got, _exact_merged(layer, coeffs).to(torch.float16))


def _merged_output_bound(layer, x, coeffs):
    """float64 reference output of the layer and its |.| magnitude (ref_abs) for the dtype bound."""
    w, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    ref = reference.lorweb_linear(x, w, bias, a, b, coeffs, layer.scale)
    ref_abs = reference.lorweb_linear(x.abs(), w.abs(), bias.abs(), a.abs(), b.abs(), coeffs.abs(), layer.scale)
    return ref, ref_abs


@pytest.mark.parametrize("strategy", ["full", "offload", "jit"])
@pytest.mark.parametrize("dtype", HALF)
def test_merged_and_fused_forward_within_dtype_tolerance(dtype, strategy):
    """merged() and fuse_lora() in fp16 / bf16 with activations in the hundreds: the merged forward matches the
    float64 reference within the dtype bound (one rounding of the merged weight, then one GEMM), and unfuse_lora
    restores the base weight bit for bit."""
    layer = _merge_layer(dtype)
    model = nn.Sequential(layer)
    query = torch.randn(1, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lf.set_query(model, query)
    coeffs = layer.coefficients.detach()
    x = (torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(3)) * 300).to(dtype)
    ref, ref_abs = _merged_output_bound(layer, x, coeffs)
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad(), lf.merged(model, strategy):
        y = model(x)
    assert_within_bound(f"merged {strategy}", y, ref, ref_abs, dtype, 32 + 8)
    fuse_lora(model, strategy)
    try:
        with torch.no_grad():
            y_fused = model(x)
    finally:
        unfuse_lora(model)
    assert_within_bound(f"fuse_lora {strategy}", y_fused, ref, ref_abs, dtype, 32 + 8)
    assert torch.equal(layer.base_layer.weight, original)


@pytest.mark.parametrize("dtype", HALF)
def test_jit_merge_of_a_batch_of_analogies_within_dtype_tolerance(dtype):
    """merged(strategy='jit') with two different analogies (one merged weight per sample, batched matmul) in half
    precision: finite and within the dtype bound of the float64 reference."""
    layer = _merge_layer(dtype)
    model = nn.Sequential(layer)
    with torch.no_grad():
        lf.set_query(model, torch.randn(2, 6, generator=torch.Generator().manual_seed(4)))
    coeffs = layer.coefficients.detach()
    x = (torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5)) * 300).to(dtype)
    ref, ref_abs = _merged_output_bound(layer, x, coeffs)
    with torch.no_grad(), lf.merged(model, "jit"):
        y = model(x)
    assert_within_bound("jit batch", y, ref, ref_abs, dtype, 32 + 8)


# ------------------------------------------------------------------------------------ 4. gradients in half precision
def test_torch_backend_fp16_coefficient_gradient_is_computed_in_fp32():
    """fp16, torch backend: x, u, z, y and dx all fit fp16, the exact d coeffs (256000) fits the coefficients' fp32:
    the gradient is formed in fp32 (ops._torch_delta takes the product u * scaling in fp32; in fp16 the sum over the
    tokens was inf) and matches the reference."""
    p = _dcoeffs_overflow_problem()
    y, d_coeffs, dx = _run(p, "torch")
    ref_y, ref_dc = _reference_grads(p)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert torch.equal(ref_dc, torch.full_like(ref_dc, 256000.0))
    assert d_coeffs.dtype == torch.float32 and torch.isfinite(d_coeffs).all()
    torch.testing.assert_close(d_coeffs.double(), ref_dc.double(), rtol=1e-3, atol=0)


def test_layer_fp16_autocast_coefficient_gradient_is_finite():
    """The training path (fp32 masters, fp16 autocast, as accelerate's mixed_precision='fp16'): the coefficients'
    gradient should be finite where the float64 reference is (256000), with every activation within fp16."""
    p = _dcoeffs_overflow_problem()
    layer = lf.LoRWeBLinear(nn.Linear(8, 32, bias=False), num_loras=4, rank=2, key_dim=4, query_dim=6,
                            dtype=torch.float32, backend="torch")
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A.copy_(p["lora_a"].float())
        layer.lora_B.copy_(p["lora_b"].float())
    coeffs = p["coeffs"].clone().requires_grad_(True)
    layer.set_coefficients(coeffs * 1.0)  # a non-leaf, as set_query's (differentiable) coefficients
    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(p["x"].float())
    y.float().sum().backward()
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()
    assert torch.isfinite(coeffs.grad).all()


def test_layer_fp16_autocast_basis_gradients_within_tolerance():
    """Same training path at ordinary magnitudes: the basis gradients reach the fp32 masters in fp32, finite and
    within the fp16 bound of the float64 reference (computed in fp16 like a peft LoRA under autocast)."""
    p = random_problem(2, 6, 24, 16, 4, 2, torch.float32, seed=3, bias=False)
    layer = lf.LoRWeBLinear(nn.Linear(24, 16, bias=False), num_loras=4, rank=2, key_dim=4, query_dim=6,
                            dtype=torch.float32, backend="torch")
    with torch.no_grad():
        layer.base_layer.weight.copy_(p["weight"])
        layer.lora_A.copy_(p["lora_a"])
        layer.lora_B.copy_(p["lora_b"])
    layer.set_coefficients(p["coeffs"])
    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(p["x"])
    y.float().sum().backward()
    half = {k: p[k].half() for k in ("x", "weight", "lora_a", "lora_b")}
    a64 = half["lora_a"].double().requires_grad_(True)
    ref = reference.lorweb_linear(half["x"], half["weight"], None, a64, half["lora_b"], p["coeffs"], layer.scale)
    ref.sum().backward()
    a_abs = half["lora_a"].double().abs().requires_grad_(True)
    reference.lorweb_linear(half["x"].abs(), half["weight"].abs(), None, a_abs, half["lora_b"].abs(),
                            p["coeffs"].abs(), layer.scale).sum().backward()
    grad = layer.lora_A.grad
    assert grad.dtype == torch.float32
    assert_within_bound("grad lora_A", grad, a64.grad, a_abs.grad, torch.float16, 12 + 16)


def test_torch_backend_bf16_coefficient_gradient_large_magnitude():
    """bf16 has fp32's range: the coefficient gradient of the fp16-overflow case (256000) is finite and within bf16
    rounding of the reference on the torch backend."""
    p = _dcoeffs_overflow_problem(torch.bfloat16)
    _, d_coeffs, _ = _run(p, "torch")
    _, ref_dc = _reference_grads(p)
    assert torch.isfinite(d_coeffs).all()
    assert (d_coeffs.double() - ref_dc).abs().max() <= tolerance(torch.bfloat16, 256 + 32) * ref_dc.abs().max()


# ------------------------------------------------------------------------- Triton interpreter (TRITON_INTERPRET=1)
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="Triton CPU cases: run with TRITON_INTERPRET=1 set before import")


def _triton_or_skip():
    pytest.importorskip("triton")
    from lorweb_fast import ops

    why = ops._unavailable_reason("triton", torch.device("cpu"))
    if why is not None:
        pytest.skip(f"triton backend unavailable on CPU: {why}")


@needs_interpreter
def test_triton_fp16_forward_scales_u_in_fp32():
    """Triton, 3-D input (fused/composed route): z = u * scaling is taken from the fp32 accumulator before rounding,
    so the case whose fp16 u overflows gives the finite reference output (better than peft / the torch backend)."""
    _triton_or_skip()
    p = _u_overflow_problem()
    with torch.no_grad():
        y = lf.lorweb_linear(p["x"], p["weight"], None, p["lora_a"], p["lora_b"], p["coeffs"], 1.0,
                             backend="triton")
    ref, _ = _reference_grads(p)
    assert_within_bound("triton forward", y, ref, ref.abs(), torch.float16, 64 + 8)


@needs_interpreter
def test_triton_fp16_coefficient_gradient_is_fp32():
    """Triton computes the d coeffs partials in fp32: the case that overflows the torch backend's fp16 gradient gives
    the exact 256000."""
    _triton_or_skip()
    p = _dcoeffs_overflow_problem()
    y, d_coeffs, dx = _run(p, "triton")
    _, ref_dc = _reference_grads(p)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert (d_coeffs.double() - ref_dc).abs().max() <= tolerance(torch.float16, 256 + 32) * ref_dc.abs().max()


@needs_interpreter
def test_triton_fp16_coefficient_gradient_finite_when_forward_is():
    """Triton, fp16, u = 102400 (> 65504) but z, y, dx and the exact d coeffs (1050) fit: a finite forward is not
    followed by an inf coefficient gradient (under a GradScaler every step would be skipped whatever the loss scale,
    since the overflow is in a forward activation): the forward saves u in fp32 for fp16 inputs, and d coeffs is the
    reference's within fp16's tolerance."""
    _triton_or_skip()
    from lorweb_fast.kernels import mixed_lora

    assert mixed_lora.saved_u_dtype(torch.float16) == torch.float32
    assert mixed_lora.saved_u_dtype(torch.bfloat16) == torch.bfloat16
    p = _u_overflow_problem()
    y, d_coeffs, dx = _run(p, "triton")
    _, ref_dc = _reference_grads(p)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert torch.isfinite(ref_dc).all() and ref_dc.abs().max() < FP16_MAX
    assert torch.isfinite(d_coeffs).all()
    assert (d_coeffs.double() - ref_dc).abs().max() <= tolerance(torch.float16, 64 + 32) * ref_dc.abs().max()
