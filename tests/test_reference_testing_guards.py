"""Guards on the oracle itself: lorweb_fast.reference, the tolerance / comparison / problem-building helpers of
lorweb_fast.testing, lorweb_fast.info and lorweb_fast._files.

Every fast path is checked against ``reference`` with the bounds of ``testing``; were either wrong or too loose,
every such test would pass wrongly. The tests below pin them against values derived independently (explicit float64
loops, hand-computed small cases, the error model stated in the ``testing`` module docstring), and check that the
comparison helpers reject results that are wrong by the amounts the docstring says they catch."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

import lorweb_fast as lf
from lorweb_fast import _files, reference, testing
from lorweb_fast.testing import (NORM_MIN_ENTRIES, accumulation_depths, assert_within_bound, assert_within_rss_bound,
                                 case_id, check_against_reference, check_forward, norm_tolerance, odd_shape_cases,
                                 random_problem, rss_tolerance, spread_cases, tolerance)

BF16_EPS, FP16_EPS, FP32_EPS = 2.0 ** -7, 2.0 ** -10, 2.0 ** -23  # IEEE / bfloat16 machine epsilons


# ------------------------------------------------------------------------------------------------- reference.py
def loop_lorweb_linear(x, weight, bias, lora_a, lora_b, coeffs, scale):
    """x W^T + bias + scale * sum_n c[b, n] sum_j (sum_i x_i A_n[i, j]) B_n[j, o], one scalar at a time in Python
    floats (float64), for 3-D x."""
    bsz, seq, k = x.shape
    n_loras, _, rank = lora_a.shape
    n_out = weight.shape[0]
    x, w, a, b, c = (t.double().tolist() for t in (x, weight, lora_a, lora_b, coeffs))
    bias = None if bias is None else bias.double().tolist()
    out = torch.zeros(bsz, seq, n_out, dtype=torch.float64)
    for bi in range(bsz):
        for s in range(seq):
            row = x[bi][s]
            for o in range(n_out):
                acc = sum(row[i] * w[o][i] for i in range(k)) + (0.0 if bias is None else bias[o])
                delta = 0.0
                for n in range(n_loras):
                    for j in range(rank):
                        u = sum(row[i] * a[n][i][j] for i in range(k))
                        delta += c[bi][n] * u * b[n][j][o]
                out[bi, s, o] = acc + scale * delta
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scale", [0.75, -1.5])
def test_reference_lorweb_linear_matches_a_scalar_loop(dtype, bias, scale):
    """``reference.lorweb_linear`` = x W^T + bias + the mixed delta, in float64, for low-precision inputs, with and
    without bias and for a negative scale (pins: the sign of the bias, that the bias is added, that the scale is
    used as given and not as |scale|, that the base matmul is computed in float64)."""
    p = random_problem(2, 3, 5, 4, 3, 2, dtype, seed=3, bias=bias)
    got = reference.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], scale)
    want = loop_lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], scale)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    delta = reference.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], scale)
    assert delta.dtype == torch.float64
    base = loop_lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], 0.0)
    torch.testing.assert_close(delta, want - base, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tiny", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11),
                                        (torch.float32, 2.0 ** -24)])
def test_reference_is_exact_where_the_input_dtype_would_round(dtype, tiny):
    """1 + tiny with tiny = eps(dtype) / 2 is not representable in ``dtype`` (it rounds to 1) but is exact in float64:
    the base product x W^T = 1 * 1 + tiny * 1, the LoRA path (x A) B and the coefficients' projection must all give
    it exactly, i.e. the reference computes in float64 whatever the input dtype (hand-computed case)."""
    one = lambda *s: torch.ones(*s, dtype=dtype)  # noqa: E731
    x = torch.tensor([[[1.0, tiny]]], dtype=dtype)  # (1, 1, 2)
    assert float((x.sum(-1)).item()) == 1.0  # the control: summed in its own dtype, tiny is lost
    want = 1.0 + tiny
    y = reference.lorweb_linear(x, one(1, 2), None, one(1, 2, 1), torch.zeros(1, 1, 1, dtype=dtype), one(1, 1), 1.0)
    assert y.item() == want
    delta = reference.mixed_lora_delta(x, one(1, 2, 1), one(1, 1, 1), one(1, 1), 1.0)
    assert delta.item() == want
    delta2d = reference.mixed_lora_delta(x[:, 0], one(1, 2, 1), one(1, 1, 1), one(1, 1), 1.0)
    assert delta2d.shape == (1, 1) and delta2d.item() == want
    # coefficients: key_dim 1, keys (want-projection) . (1, 0) -> logits (1 + tiny, 0), softmax over the 2 LoRAs
    c = reference.compute_coefficients(x[:, 0], one(1, 2), torch.tensor([[1.0], [0.0]], dtype=dtype))
    assert c.dtype == torch.float64
    s = 1.0 / (1.0 + math.exp(-want))
    torch.testing.assert_close(c, torch.tensor([[s, 1.0 - s]], dtype=torch.float64), rtol=1e-15, atol=1e-15)


def test_compute_coefficients_refuses_inputs_that_are_not_2d():
    """A (B, T, query_dim) query whose T happens to equal query_dim chains with to_q and would silently give (B T, N)
    coefficients; keys (N, key_dim, 1) likewise: both are refused by the 2-D check, naming it."""
    to_q, keys = torch.randn(8, 6), torch.randn(3, 8)
    with pytest.raises(ValueError, match="must be 2-D"):
        reference.compute_coefficients(torch.randn(2, 6, 6), to_q, keys)
    with pytest.raises(ValueError, match="must be 2-D"):
        reference.compute_coefficients(torch.randn(2, 6), to_q, keys[..., None])
    assert reference.compute_coefficients(torch.randn(2, 6), to_q, keys).shape == (2, 3)  # the control


def test_softmax_sum_clamp_lower_bound_is_never_reached():
    """reduce="sum" with softmax clamps to [0, 1] (official attlora_forward). A softmax is >= 0, so the lower bound
    is inactive: the result equals min(sum over heads, 1) computed by hand for strongly negative logits (documents
    why a mutant of the softmax lower bound is equivalent)."""
    q = torch.tensor([[-5.0, 3.0, -5.0, 3.0]], dtype=torch.float64)
    keys = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    got = reference.compute_coefficients(q, torch.eye(4, dtype=torch.float64), keys, heads=2, reduce="sum")
    # each head: logits (-5, 3) / sqrt(2); softmax weight of LoRA 0 = 1 / (1 + e^{8/sqrt(2)})
    w0 = 1.0 / (1.0 + math.exp(8.0 / math.sqrt(2.0)))
    torch.testing.assert_close(got, torch.tensor([[2 * w0, 1.0]], dtype=torch.float64), rtol=1e-14, atol=1e-15)


# -------------------------------------------------------------------------------------- testing.py: tolerances
@pytest.mark.parametrize("dtype,eps", [(torch.bfloat16, BF16_EPS), (torch.float16, FP16_EPS),
                                       (torch.float32, FP32_EPS)])
@pytest.mark.parametrize("depth", [1, 100, 4096])
def test_tolerances_follow_the_documented_error_model(dtype, eps, depth):
    """The module docstring's bounds, with the epsilons of the dtypes written out: worst case 6 roundings in the
    working dtype + K fp32 accumulation epsilons; entry by entry 8 eps + 6 sqrt(K) fp32 eps; the whole tensor
    2.5 eps + 2 sqrt(K) fp32 eps (pins ROUNDINGS, RSS_ELEMENT, RSS_SIGMAS, RSS_NORM, that the accumulation term is
    fp32's eps and not the working dtype's, and that it grows as K for the worst case but sqrt(K) statistically)."""
    assert testing.dtype_eps(dtype) == eps
    assert tolerance(dtype, depth) == pytest.approx(6 * eps + depth * FP32_EPS, rel=1e-12)
    assert rss_tolerance(dtype, depth) == pytest.approx(8 * eps + 6 * math.sqrt(depth) * FP32_EPS, rel=1e-12)
    assert norm_tolerance(dtype, depth) == pytest.approx(2.5 * eps + 2 * math.sqrt(depth) * FP32_EPS, rel=1e-12)
    assert NORM_MIN_ENTRIES == 32
    assert testing.FINAL_ROUNDING == 0.5  # half an ulp: the statistical bounds' term for the stored result's rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_worst_case_bound_is_relative_to_ref_abs_entry_by_entry(dtype):
    """assert_within_bound: |got - ref| <= tolerance * ref_abs per entry. An error of 0.99 x the bound passes, 1.01 x
    fails; an entry whose ref_abs is 0 (an exact zero) admits no error at all; the bound of one entry is its own
    ref_abs, not the largest one (pins the comparison, the 1e-30 guard being negligible, err not scaled down)."""
    depth = 20
    tol = tolerance(dtype, depth)
    ref = torch.linspace(-3, 3, 12, dtype=torch.float64)
    ref_abs = torch.linspace(0.5, 4, 12, dtype=torch.float64)
    assert_within_bound("t", ref + 0.99 * tol * ref_abs, ref, ref_abs, dtype, depth)
    assert_within_bound("t", ref - 0.99 * tol * ref_abs, ref, ref_abs, dtype, depth)
    bad = ref.clone()
    bad[5] += 1.01 * tol * ref_abs[5]
    with pytest.raises(AssertionError, match="exceeds the bound"):
        assert_within_bound("t", bad, ref, ref_abs, dtype, depth)
    # the error allowed at the largest ref_abs is too much at the smallest one
    bad = ref.clone()
    bad[0] += 0.99 * tol * ref_abs[-1]
    with pytest.raises(AssertionError, match="at flat index 0"):
        assert_within_bound("t", bad, ref, ref_abs, dtype, depth)
    ref, zero_abs = ref.clone(), ref_abs.clone()
    ref[3], zero_abs[3] = 0.0, 0.0
    assert_within_bound("t", ref.clone(), ref, zero_abs, dtype, depth)
    bad = ref.clone()
    bad[3] = 1e-20
    with pytest.raises(AssertionError, match="exceeds the bound"):
        assert_within_bound("t", bad, ref, zero_abs, dtype, depth)


@pytest.mark.parametrize("check", ["bound", "rss"])
def test_comparisons_refuse_other_shapes_and_non_finite_values(check):
    """Both comparisons refuse a result of another shape even when it would broadcast (one row for three), and NaN /
    inf anywhere (a NaN error compares False with any bound, so it would otherwise pass)."""
    ref = torch.randn(3, 40, dtype=torch.float64)
    big = ref.abs() + 1.0

    def run(got):
        if check == "bound":
            assert_within_bound("t", got, ref, big, torch.bfloat16, 10)
        else:
            assert_within_rss_bound("t", got, ref, big, torch.bfloat16, 10)

    run(ref.clone())  # the control
    with pytest.raises(AssertionError, match="shape"):
        run(ref[:1].clone())
    for value in (float("nan"), float("inf")):
        got = ref.clone()
        got[1, 7] = value
        with pytest.raises(AssertionError, match="non-finite"):
            run(got)


@pytest.mark.parametrize("dtype,depth", [(torch.float32, 100), (torch.bfloat16, 16)])
def test_rss_bound_entry_by_entry(dtype, depth):
    """assert_within_rss_bound, one entry off (the norm check then far from its bound): 0.99 x rss_tolerance x rss
    passes, 1.01 x fails, relative to that entry's own rss."""
    tol = rss_tolerance(dtype, depth)
    ref = torch.zeros(64, dtype=torch.float64)
    rss = torch.linspace(0.25, 8, 64, dtype=torch.float64)
    for i in (0, 63):
        got = ref.clone()
        got[i] = 0.99 * tol * rss[i]
        assert_within_rss_bound("t", got, ref, rss, dtype, depth)
        got[i] = 1.01 * tol * rss[i]
        with pytest.raises(AssertionError, match="the statistical bound"):
            assert_within_rss_bound("t", got, ref, rss, dtype, depth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rss_norm_check_applies_from_norm_min_entries(dtype):
    """Every entry off by half its entry bound: within the entry-by-entry bound, but the error norm is 0.5 x
    rss_tolerance x ||rss|| > norm_tolerance x ||rss||, so a tensor of NORM_MIN_ENTRIES entries fails on the norm and
    one entry fewer passes (pins the >= threshold and that the norm is compared with norm_tolerance x ||rss||)."""
    depth = 16
    assert 0.5 * rss_tolerance(dtype, depth) > 1.1 * norm_tolerance(dtype, depth)
    for n, fails in ((NORM_MIN_ENTRIES, True), (NORM_MIN_ENTRIES - 1, False)):
        rss = torch.linspace(1, 2, n, dtype=torch.float64)
        ref = torch.zeros(n, dtype=torch.float64)
        got = ref + 0.5 * rss_tolerance(dtype, depth) * rss
        if fails:
            with pytest.raises(AssertionError, match="error norm"):
                assert_within_rss_bound("t", got, ref, rss, dtype, depth)
        else:
            assert_within_rss_bound("t", got, ref, rss, dtype, depth)
    # the norm bound itself: 0.95 x passes, 1.05 x fails
    rss = torch.ones(NORM_MIN_ENTRIES, dtype=torch.float64)
    ref = torch.zeros_like(rss)
    assert_within_rss_bound("t", ref + 0.95 * norm_tolerance(dtype, depth), ref, rss, dtype, depth)
    with pytest.raises(AssertionError, match="error norm"):
        assert_within_rss_bound("t", ref + 1.05 * norm_tolerance(dtype, depth), ref, rss, dtype, depth)


@pytest.mark.parametrize("dtype,depth", [(torch.float32, 100), (torch.bfloat16, 300)])
def test_rss_bounds_add_the_stored_results_rounding_relative_to_ref(dtype, depth):
    """The statistical bounds add FINAL_ROUNDING * eps * |ref| entry by entry (and * ||ref|| to the norm bound): with
    ref 40 x rss (correlated terms), one entry off by 0.99 x (rss_tolerance * rss + 0.5 eps |ref|) passes and 1.01 x
    fails, at the smallest and the largest |ref|; every entry off by 0.99 x the norm bound's share passes and 1.05 x
    fails on the norm (pins the term, its factor, |ref| and not ref, and ||ref|| in the norm)."""
    eps, n = testing.dtype_eps(dtype), NORM_MIN_ENTRIES * 2
    rss = torch.ones(n, dtype=torch.float64)
    ref = -torch.linspace(40.0, 44.0, n, dtype=torch.float64)  # negative: the term must use |ref|
    entry = rss_tolerance(dtype, depth) * rss + 0.5 * eps * ref.abs()
    for i in (0, n - 1):
        got = ref.clone()
        got[i] += 0.99 * entry[i]
        assert_within_rss_bound("t", got, ref, rss, dtype, depth)
        got[i] = ref[i] + 1.01 * entry[i]
        with pytest.raises(AssertionError, match="the statistical bound"):
            assert_within_rss_bound("t", got, ref, rss, dtype, depth)
    norm_bound = norm_tolerance(dtype, depth) * rss.norm() + 0.5 * eps * ref.norm()
    share = norm_bound / math.sqrt(n)  # the same error in every entry: its norm is share * sqrt(n)
    assert (share < entry).all()  # so only the norm check can fail below
    assert_within_rss_bound("t", ref + 0.99 * share, ref, rss, dtype, depth)
    with pytest.raises(AssertionError, match="error norm"):
        assert_within_rss_bound("t", ref + 1.05 * share, ref, rss, dtype, depth)


def test_a_correctly_rounded_sum_of_equal_bf16_terms_passes_the_rss_bound():
    """The case that motivated the rounding term: a bias gradient of one broadcast output gradient, 300 equal terms
    summed exactly and rounded once to bf16, the value placed just below a rounding midpoint (about half an ulp of
    error, 0.5 * sqrt(300) = 8.7 eps x rss > RSS_ELEMENT). The correct result passes; the next bf16 value below it
    (twice as far off, beyond the 16.7 eps x rss the bound then allows) fails."""
    terms = 300
    value = torch.tensor([1 + 2.0 ** -8 * (1 - 1e-3), -(2 + 2.0 ** -7 * (1 - 1e-3)), 1.5], dtype=torch.float64)
    term = value / terms
    ref = term * terms
    rss = term.abs() * math.sqrt(terms)
    got = ref.to(torch.bfloat16)
    in_rss = ((got.double() - ref).abs() / rss / BF16_EPS)[:2]
    assert (in_rss > testing.RSS_ELEMENT).all()  # beyond what the rss term alone allows
    assert_within_rss_bound("grad bias", got, ref, rss, torch.bfloat16, terms)
    off = got.clone()
    off[0] = got[0] - 2.0 ** -8  # the bf16 value below 1.0 (255/256): about 17.3 eps x rss off
    assert off[0].item() == 255 / 256
    with pytest.raises(AssertionError, match="grad bias.*the statistical bound"):
        assert_within_rss_bound("grad bias", off, ref, rss, torch.bfloat16, terms)


def test_statistical_bounds_catch_the_errors_the_docstring_names():
    """In bf16 (eps = 2^-7): a 10 % error of one entry (12.8 eps x rss) fails entry by entry, a 5 % error of every
    entry (6.4 eps) fails on the norm, 1 eps everywhere (the size of real rounding errors) passes."""
    rss = torch.linspace(0.5, 3, 256, dtype=torch.float64)
    ref = torch.zeros_like(rss)
    depth = 64
    assert_within_rss_bound("t", ref + BF16_EPS * rss, ref, rss, torch.bfloat16, depth)
    with pytest.raises(AssertionError, match="error norm"):
        assert_within_rss_bound("t", ref + 0.05 * rss, ref, rss, torch.bfloat16, depth)
    one = ref.clone()
    one[17] = 0.10 * rss[17]
    with pytest.raises(AssertionError, match="the statistical bound"):
        assert_within_rss_bound("t", one, ref, rss, torch.bfloat16, depth)


def test_accumulation_depths_count_the_chains():
    """The K of each bound, counted by hand for B=2, S=5, in=7, out=3, N=4, r=2 (10 token rows, N r = 8): output
    x W^T (7) then the mixed z B (8): 15; grad x dy W (3) + dz A^T (8): 11; grad bias and weight sum over the 10 rows;
    grad A: the rows of x^T du (10) after du = dy B^T scaled (3): 13; grad B: the rows (10) after u = x A (7): 17;
    grad coeffs: rows x r terms of u * (dy B^T) (20) after dy B^T (3): 23. A 2-D input counts its B rows."""
    p = random_problem(2, 5, 7, 3, 4, 2, torch.float32)
    assert accumulation_depths(p) == {"output": 15, "x": 11, "bias": 10, "weight": 10, "lora_a": 13, "lora_b": 17,
                                      "coeffs": 23}
    p2 = random_problem(6, None, 7, 3, 4, 2, torch.float32)
    assert accumulation_depths(p2)["bias"] == 6 and accumulation_depths(p2)["coeffs"] == 6 * 2 + 3


# ------------------------------------------------------------------------------ testing.py: problems and checks
def test_random_problem_inputs():
    """random_problem: the requested shapes and dtype (fp32 coefficients), a bias only when asked, every tensor
    (coefficients included) with entries of both signs, coefficients that differ between samples, and a scale other
    than 1 (a kernel that drops the scale, takes |c| or |B|, shares one sample's coefficients or drops a term must
    show)."""
    p = random_problem(3, 4, 6, 5, 2, 3, torch.bfloat16, seed=2)
    shapes = {"x": (3, 4, 6), "weight": (5, 6), "bias": (5,), "lora_a": (2, 6, 3), "lora_b": (2, 3, 5)}
    for k, shape in shapes.items():
        assert tuple(p[k].shape) == shape and p[k].dtype == torch.bfloat16, k
        assert bool((p[k] < 0).any()) and bool((p[k] > 0).any()), k  # signed: ref_abs differs from |ref|
    c = p["coeffs"]
    assert c.shape == (3, 2) and c.dtype == torch.float32
    assert bool((c < 0).any()) and bool((c > 0).any())
    assert not torch.equal(c[0], c[1]) and not torch.equal(c[1], c[2])
    assert p["scale"] != 1.0 and p["scale"] > 0
    assert random_problem(3, 4, 6, 5, 2, 3, torch.bfloat16, seed=2, bias=False)["bias"] is None
    assert random_problem(3, None, 6, 5, 2, 3, torch.float32)["x"].shape == (3, 6)


def _torch_linear(*a):
    return lf.lorweb_linear(*a, backend="torch")


WRONG_KERNELS = {
    "drops the scale": lambda x, w, b, la, lb, c, s: _torch_linear(x, w, b, la, lb, c, 1.0),
    "takes |c|": lambda x, w, b, la, lb, c, s: _torch_linear(x, w, b, la, lb, c.abs(), s),
    "sample 0's coefficients for all": lambda x, w, b, la, lb, c, s: _torch_linear(x, w, b, la, lb,
                                                                                   c[:1].expand_as(c), s),
    "drops the bias": lambda x, w, b, la, lb, c, s: _torch_linear(x, w, None, la, lb, c, s),
    "drops the delta": lambda x, w, b, la, lb, c, s: _torch_linear(x, w, b, la, lb, torch.zeros_like(c), s),
    "5 % off": lambda *a: _torch_linear(*a) * 1.05,
}


@pytest.mark.parametrize("wrong", sorted(WRONG_KERNELS))
def test_check_forward_rejects_wrong_kernels_on_random_problems(wrong):
    """check_forward on a bf16 random_problem accepts the torch backend and rejects a kernel that ignores the scale,
    takes |c|, uses one sample's coefficients for all, drops the bias or the delta, or is 5 % off (the last only the
    statistical bound sees; pins that check_forward applies it)."""
    p = random_problem(3, 7, 17, 19, 3, 4, torch.bfloat16, seed=4)
    args = [p[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "coeffs")] + [p["scale"]]
    check_forward("control", _torch_linear(*args), p)
    with pytest.raises(AssertionError, match="exceeds the"):
        check_forward(wrong, WRONG_KERNELS[wrong](*args), p)


@pytest.mark.parametrize("x_factor,scale", [(2.0 ** -6, 0.75), (2.0 ** 6, 0.75), (1.0, -16.0), (1.0, 16.0)])
def test_check_forward_bounds_scale_with_the_inputs(x_factor, scale):
    """The bounds are homogeneous: with x multiplied by a power of 2 (exact in bf16) or a LoRA scale of 16 of either
    sign, the torch backend still passes and a 5 % error still fails (pins rss = sqrt of the reference on the squared
    inputs with scale^2, not its square, and the worst-case magnitudes taken with |scale|)."""
    p = random_problem(3, 7, 17, 19, 3, 4, torch.bfloat16, seed=5)
    p["x"], p["scale"] = p["x"] * x_factor, scale
    args = [p[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "coeffs")] + [p["scale"]]
    y = _torch_linear(*args)
    check_forward("control", y, p)
    with pytest.raises(AssertionError, match="exceeds the"):
        check_forward("5 %", y * 1.05, p)


@pytest.mark.parametrize("scale", [2.0 ** -4, -(2.0 ** -4), 2.0 ** 4])
def test_check_against_reference_any_scale(scale):
    """check_against_reference with a scale of either sign and far from 1 (delta only, bf16): the torch backend
    passes, a delta 5 % off fails (pins |scale| for the worst-case magnitudes and scale^2 for the squared terms)."""
    p = random_problem(2, 9, 17, 19, 3, 4, torch.bfloat16, seed=6)
    p["scale"] = scale
    delta = lambda *a: lf.mixed_lora_delta(*a, backend="torch")  # noqa: E731
    check_against_reference(delta, p, with_base=False)
    with pytest.raises(AssertionError, match="exceeds the"):
        check_against_reference(lambda *a: delta(*a) * 1.05, p, with_base=False)


@pytest.mark.parametrize("dtype,off", [(torch.float32, 12), (torch.bfloat16, 7)])
def test_check_against_reference_applies_the_worst_case_bound_with_the_outputs_depth(dtype, off):
    """Entries dominated by one term (bias 1, every other term below 2^-20) have rss = ref_abs, so the worst-case
    bound (6 eps + K fp32 eps, K = in + N r = 2) is the tighter one there: an output ``off`` eps too large (exact in
    the dtype: 1 + off eps) passes the statistical bound (8 eps + 6 sqrt(2) fp32 eps; 31 entries, below
    NORM_MIN_ENTRIES) and must fail the worst-case one. In fp32 12 eps is also below the bound of the depth of another
    tensor (grad lora_a: 31 rows + 1 = 32, 38 eps): pins that the output is checked with its own depth."""
    p = random_problem(1, 31, 1, 1, 1, 1, dtype, seed=9)
    p["bias"] = torch.ones(1, dtype=dtype)
    p["weight"], p["lora_b"] = p["weight"] * 2.0 ** -24, p["lora_b"] * 2.0 ** -24
    assert accumulation_depths(p)["output"] == 2 and p["x"].shape[:2].numel() < NORM_MIN_ENTRIES
    eps = testing.dtype_eps(dtype)
    assert off * eps > tolerance(dtype, 2) and off * eps * 1.01 < rss_tolerance(dtype, 2)
    check_against_reference(_torch_linear, p)  # the control
    with pytest.raises(AssertionError, match="output .* exceeds the bound"):
        check_against_reference(lambda *a: _torch_linear(*a) + off * eps, p)
    y = _torch_linear(*(p[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "coeffs")), p["scale"])
    check_forward("control", y, p)
    with pytest.raises(AssertionError, match="exceeds the bound"):
        check_forward("off", y + off * eps, p)


@pytest.mark.parametrize("dtype,off", [(torch.float32, 12), (torch.bfloat16, 7)])
def test_worst_case_bound_with_a_negative_scale(dtype, off):
    """One-term entries with a negative LoRA scale: x = A = B = 1, c = 0.5, scale = -0.5, no base (zero weight, no
    bias), so every output is -0.25 = its one term, ref_abs = rss = 0.25 and K = in + N r = 2. An output ``off`` eps
    too large in magnitude (exact in the dtype) is within the statistical bound and must fail the worst-case one, in
    check_against_reference (delta only) and in check_forward (pins |scale| for the worst-case magnitudes: with the
    signed scale ref_abs would be negative and the worst-case check vacuous)."""
    one = lambda *s: torch.ones(*s, dtype=dtype)  # noqa: E731
    p = dict(x=one(1, 31, 1), weight=torch.zeros(1, 1, dtype=dtype), bias=None, lora_a=one(1, 1, 1),
             lora_b=one(1, 1, 1), coeffs=torch.full((1, 1), 0.5), scale=-0.5)
    eps = testing.dtype_eps(dtype)
    assert off * eps > tolerance(dtype, 2) and off * eps * 1.01 < rss_tolerance(dtype, 2)
    delta = lambda *a: lf.mixed_lora_delta(*a, backend="torch")  # noqa: E731
    check_against_reference(delta, p, with_base=False)  # the control
    with pytest.raises(AssertionError, match="output .* exceeds the bound"):
        check_against_reference(lambda *a: delta(*a) * (1 + off * eps), p, with_base=False)
    y = _torch_linear(*(p[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "coeffs")), p["scale"])
    assert bool((y == -0.25).all())
    check_forward("control", y, p)
    with pytest.raises(AssertionError, match="exceeds the bound"):
        check_forward("off", y * (1 + off * eps), p)


def test_check_against_reference_refuses_another_output_dtype():
    """A bf16 problem answered in fp32 (even with the right values) is a failure: fast paths keep the dtype."""
    p = random_problem(2, 3, 5, 4, 2, 2, torch.bfloat16)
    with pytest.raises(AssertionError, match="output dtype"):
        check_against_reference(lambda *a: _torch_linear(*a).float(), p)


class _RecordGrad(torch.autograd.Function):
    """Identity; records the gradient it receives."""
    seen = []

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        _RecordGrad.seen.append(grad.detach().clone())
        return grad


@pytest.mark.parametrize("broadcast", [True, False])
def test_broadcast_dy_gives_every_row_the_same_output_gradient(broadcast):
    """broadcast_dy=True: the output gradient is one row repeated over the tokens of each sample; False: rows
    differ (pins that the option changes dy)."""
    p = random_problem(2, 6, 5, 4, 2, 2, torch.float32, seed=7)
    _RecordGrad.seen.clear()
    check_against_reference(lambda *a: _RecordGrad.apply(_torch_linear(*a)), p, broadcast_dy=broadcast)
    (dy,) = _RecordGrad.seen
    same = all(torch.equal(dy[b, s], dy[b, 0]) for b in range(2) for s in range(6))
    assert same == broadcast


def test_partial_gradients_returns_only_what_is_asked_in_order():
    """partial_gradients: gradients of (x, lora_a, lora_b, coeffs) in that order, None where not required, each
    equal to the full backward's (the torch backend; float64 reference within the worst-case bound)."""
    p = random_problem(2, 3, 5, 4, 3, 2, torch.float32, seed=8)
    dy = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    got, _ = testing.partial_gradients(p, (True, False, True, False), "torch", dy)
    assert got[1] is None and got[3] is None
    assert got[0].shape == p["x"].shape and got[2].shape == p["lora_b"].shape
    leaves = {k: p[k].double().requires_grad_(True) for k in ("x", "lora_b")}
    ref = reference.lorweb_linear(leaves["x"], p["weight"], p["bias"], p["lora_a"], leaves["lora_b"], p["coeffs"],
                                  p["scale"])
    ref.backward(dy.double())
    depths = accumulation_depths(p)
    for i, k in ((0, "x"), (2, "lora_b")):
        big = leaves[k].grad.abs() + 1.0  # magnitudes are O(1) here; a swapped gradient has another shape anyway
        assert_within_bound(k, got[i], leaves[k].grad, big, torch.float32, depths[k])


def test_odd_shape_and_spread_cases_cover_what_they_claim():
    """odd_shape_cases: 36 cases, N x r x dtype x 2-D/3-D each once, M (= B S), in and out never multiples of 16,
    1-3 samples, distinct seeds; spread_cases: 12 of them, each (N, dtype, 2-D/3-D) once, every r for every N;
    case_id tells all 36 apart, and names the sequence length."""
    cases = odd_shape_cases()
    assert len(cases) == 36
    combos = {(c["num_loras"], c["rank"], c["dtype"], c["seq"] is None) for c in cases}
    assert combos == {(n, r, d, two) for n in (1, 3, 32) for r in (1, 4, 8)
                      for d in (torch.float32, torch.bfloat16) for two in (False, True)}
    for c in cases:
        rows = c["batch"] * (1 if c["seq"] is None else c["seq"])
        assert rows % 16 and c["in_features"] % 16 and c["out_features"] % 16, c
    assert {c["batch"] for c in cases} == {1, 2, 3}
    assert len({c["seed"] for c in cases}) == 36
    assert len({case_id(c) for c in cases}) == 36
    three_d = next(c for c in cases if c["seq"] is not None)
    assert case_id(three_d) != case_id(dict(three_d, seq=None)) != case_id(dict(three_d, seq=three_d["seq"] + 2))
    spread = spread_cases()
    assert len(spread) == 12 and all(c in cases for c in spread)
    assert len({(c["num_loras"], c["dtype"], c["seq"] is None) for c in spread}) == 12
    for n in (1, 3, 32):
        assert {c["rank"] for c in spread if c["num_loras"] == n} == {1, 4, 8}


# --------------------------------------------------------------------------------------------------- info.py
def test_info_collect_reports_this_process(monkeypatch):
    """collect(): the torch CUDA build as torch.version.cuda, "none visible" without a GPU, "not installed" when
    triton cannot be imported, one "backend <name>" entry per backend_status() entry with its text."""
    from lorweb_fast import info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    got = info.collect()
    assert got["lorweb_fast"] == lf.__version__ and got["torch"] == torch.__version__
    assert got["torch CUDA build"] == str(torch.version.cuda)
    assert got["CUDA GPU"] == "none visible"
    assert got["triton"] == "not installed"
    status = lf.backend_status()
    assert {k: v for k, v in got.items() if k.startswith("backend ")} == {f"backend {k}": v for k, v in status.items()}


def test_info_main_prints_one_aligned_line_per_entry(monkeypatch, capsys):
    """main(): every entry on its own line as "key : value" with the keys padded to the longest one."""
    from lorweb_fast import info

    fake = {"a": "1", "longer key": "two", "mid key": "3"}
    monkeypatch.setattr(info, "collect", lambda: fake)
    info.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{k.ljust(len('longer key'))} : {v}" for k, v in fake.items()]


# ------------------------------------------------------------------------------------------------- _files.py
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


@pytest.mark.parametrize("proc", [True, False])
def test_current_umask_reads_the_umask_and_leaves_it(umask_027, monkeypatch, proc):
    """current_umask(): the process umask (octal 027 here), from /proc/self/status or, where that cannot be read,
    by setting and restoring it; either way the umask is unchanged afterwards."""
    if not proc:
        import builtins

        real_open = builtins.open

        def no_proc(path, *a, **k):
            if str(path) == "/proc/self/status":
                raise OSError("no /proc")
            return real_open(path, *a, **k)

        monkeypatch.setattr(builtins, "open", no_proc)
    elif not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc")
    assert _files.current_umask() == umask_027
    assert os.umask(umask_027) == umask_027


def test_temporaries_get_the_modes_of_open_and_mkdir(umask_027, tmp_path):
    """_files.temporary_file / temporary_folder: created with 0o666 / 0o777 for the kernel to apply the umask (or a
    folder's default ACL) as it does for open / mkdir, measured here with the same umask; mkstemp's 0600 and
    mkdtemp's 0700 would survive the rename onto the final name. Their names carry the prefix and suffix and are new
    each call."""
    plain_file, plain_dir = tmp_path / "plain", tmp_path / "plain_dir"
    plain_file.write_text("x")
    plain_dir.mkdir()
    f = Path(_files.temporary_file(tmp_path, ".f.", ".tmp"))
    d = Path(_files.temporary_folder(tmp_path, ".d."))
    assert f.stat().st_mode & 0o777 == plain_file.stat().st_mode & 0o777 == 0o640
    assert d.stat().st_mode & 0o777 == plain_dir.stat().st_mode & 0o777 == 0o750
    assert f.name.startswith(".f.") and f.name.endswith(".tmp") and len(f.name) == len(".f.") + 8 + len(".tmp")
    assert d.is_dir() and d.name.startswith(".d.") and f.stat().st_size == 0
    assert _files.temporary_file(tmp_path, ".f.", ".tmp") != str(f)


def test_a_negative_bound_is_refused_not_ignored():
    """A bound with a negative entry (ref_abs built from signed inputs or a signed scale) would make every error pass
    (|err| / bound is never above 1): both comparison helpers refuse it with a ValueError naming it."""
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    got = torch.tensor([1.5, 2.0])  # far off: would fail under any non-negative bound of this size
    with pytest.raises(ValueError, match="y: the bound has negative or NaN entries"):
        assert_within_bound("y", got, ref, torch.tensor([-1.0, 1.0], dtype=torch.float64), torch.float32, 4)
    with pytest.raises(ValueError, match="y: the statistical bound has negative or NaN entries"):
        assert_within_rss_bound("y", got, ref, torch.tensor([-1.0, 1.0], dtype=torch.float64), torch.float32, 4)
    with pytest.raises(AssertionError, match="exceeds the bound"):
        assert_within_bound("y", got, ref, torch.tensor([1.0, 1.0], dtype=torch.float64), torch.float32, 4)


def test_a_nan_bound_or_reference_is_refused_not_ignored():
    """One NaN in the bound (ref_abs, rss) or in the reference made the largest ratio NaN, which is not above 1: every
    other entry passed however wrong. Both helpers refuse it; a NaN in the rss of a tensor with a wrong entry
    elsewhere does not let the norm check pass either."""
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    got = torch.tensor([100.0, 2.0])
    nan_bound = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    with pytest.raises(ValueError, match="y: the bound has negative or NaN entries"):
        assert_within_bound("y", got, ref, nan_bound, torch.float32, 4)
    with pytest.raises(ValueError, match="y: the statistical bound has negative or NaN entries"):
        assert_within_rss_bound("y", got, ref, nan_bound, torch.float32, 4)
    with pytest.raises(ValueError, match="y: the reference has non-finite values"):
        assert_within_bound("y", got, torch.tensor([float("nan"), 2.0], dtype=torch.float64),
                            torch.ones(2, dtype=torch.float64), torch.float32, 4)
    # the norm check: 40 entries, one 50 off, every bound finite: caught entry by entry and by the norm
    ref40 = torch.linspace(1, 2, 40, dtype=torch.float64)
    got40 = ref40.float().clone()
    got40[0] += 50
    with pytest.raises(AssertionError):
        assert_within_rss_bound("y", got40, ref40, torch.ones(40, dtype=torch.float64), torch.float32, 4)
