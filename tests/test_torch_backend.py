"""The torch backend and the public functional API against the float64 reference (CPU)."""

import pytest
import torch

import lorweb_fast as lf
from lorweb_fast import ops, reference
from lorweb_fast.testing import NORM_MIN_ENTRIES, case_id, check_against_reference, odd_shape_cases, random_problem, \
    spread_cases

CASES = odd_shape_cases()


def _problem(case):
    return random_problem(case["batch"], case["seq"], case["in_features"], case["out_features"], case["num_loras"],
                          case["rank"], case["dtype"], seed=case["seed"])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lorweb_linear_torch(case):
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="torch"), _problem(case))


@pytest.mark.parametrize("case", spread_cases(), ids=case_id)  # 2-D and 3-D, fp32 and bf16, B = 1..3
def test_mixed_lora_delta_torch(case):
    check_against_reference(lambda *a: lf.mixed_lora_delta(*a, backend="torch"), _problem(case), with_base=False)


def test_add_to_matches_sum():
    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32)
    base = torch.randn(2, 5, 19)
    got = lf.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"], add_to=base)
    want = base.double() + reference.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_checker_rejects_a_wrong_result():
    """The bound is tight enough to catch a real mistake: swapping two samples' coefficients."""
    p = random_problem(2, 5, 17, 19, 3, 4, torch.bfloat16)

    def swapped(x, w, b, la, lb, c, s):
        return lf.lorweb_linear(x, w, b, la, lb, c.flip(0), s, backend="torch")

    with pytest.raises(AssertionError, match="exceeds the"):
        check_against_reference(swapped, p)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient scaled by ``factor`` (an injected bug in one gradient)."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


@pytest.mark.parametrize("target", ["output", "x", "weight", "bias", "lora_a", "lora_b", "coeffs"])
@pytest.mark.parametrize("factor", [1.05, 0.95])
def test_checker_catches_a_five_percent_error_in_bf16(target, factor):
    """A 5 % error in the output or in any one gradient (6.4 bf16 eps) fails ``check_against_reference`` on every
    3-D bf16 odd-shape case (the statistical bounds; the worst-case bound alone let all of them through). Excluded:
    coefficient gradients of fewer than NORM_MIN_ENTRIES entries (B x N = 1..3 for N = 1), which only the
    entry-by-entry bounds check."""
    cases = [c for c in CASES if c["dtype"] == torch.bfloat16 and c["seq"] is not None
             and not (target == "coeffs" and c["batch"] * c["num_loras"] < NORM_MIN_ENTRIES)]
    assert len(cases) >= 3

    def wrong(x, w, b, la, lb, c, s):
        args = dict(x=x, weight=w, bias=b, lora_a=la, lora_b=lb, coeffs=c)
        if target in args:
            args[target] = _ScaleGrad.apply(args[target], factor)
        y = lf.lorweb_linear(*(args[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "coeffs")), s,
                             backend="torch")
        return y * factor if target == "output" else y

    for case in cases:
        with pytest.raises(AssertionError, match="exceeds the"):
            check_against_reference(wrong, _problem(case))
        check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="torch"), _problem(case))  # the control


def test_compute_coefficients_matches_reference_and_batches_layers():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(3, 24, generator=g)
    to_q, keys = torch.randn(5, 16, 24, generator=g) * 0.2, torch.randn(5, 7, 16, generator=g)
    for activation in ("softmax", "tanh"):
        for reduce in ("mean", "sum"):
            stacked = lf.compute_coefficients(query, to_q, keys, heads=2, activation=activation, reduce=reduce)
            assert stacked.shape == (5, 3, 7) and stacked.dtype == torch.float32
            for layer in range(5):
                want = reference.compute_coefficients(query, to_q[layer], keys[layer], heads=2,
                                                      activation=activation, reduce=reduce)
                single = lf.compute_coefficients(query, to_q[layer], keys[layer], heads=2, activation=activation,
                                                 reduce=reduce)
                torch.testing.assert_close(stacked[layer].double(), want, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(single, stacked[layer])


# ---------------------------------------------------------------------------------------------------- bad input
def _good():
    return random_problem(2, 5, 17, 19, 3, 4, torch.float32)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda p: p.update(x=p["x"][..., :-1]), ValueError, "x has 16 input features"),
    (lambda p: p.update(x=p["x"][None]), ValueError, r"x must be \(B, S, in\) or \(B, in\)"),
    (lambda p: p.update(lora_a=p["lora_a"][0]), ValueError, r"lora_a must be \(N, in, r\)"),
    (lambda p: p.update(lora_b=p["lora_b"][:, :2]), ValueError, "lora_b must be"),
    (lambda p: p.update(coeffs=p["coeffs"][:1]), ValueError, r"coeffs must be \(B, N\)"),
    (lambda p: p.update(coeffs=p["coeffs"].long()), TypeError, "coeffs must be floating point"),
    (lambda p: p.update(lora_a=p["lora_a"].double()), TypeError, "lora_a has dtype torch.float64"),
    (lambda p: p.update(weight=p["weight"].bfloat16()), TypeError, "weight has dtype"),
    (lambda p: p.update(weight=p["weight"][:-1]), ValueError, r"weight must be \(out, in\)"),
    (lambda p: p.update(bias=p["bias"][:-1]), ValueError, r"bias must be \(out,\)"),
    (lambda p: p.update(x=p["x"].int()), TypeError, "x has dtype torch.int32"),
    (lambda p: p.update(lora_b=p["lora_b"].to("meta")), ValueError, "lora_b is on meta"),
])
def test_bad_input_names_the_problem(mutate, error, match):
    p = _good()
    mutate(p)
    with pytest.raises(error, match=match):
        lf.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"])


def test_unknown_or_unavailable_backend_raises():
    p = _good()
    args = (p["x"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"])
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        lf.mixed_lora_delta(*args, backend="jax")
    status = lf.backend_status()
    assert set(status) == {"torch", "triton", "cuda"} and status["torch"].startswith("available")
    if not torch.cuda.is_available():
        with pytest.raises(lf.BackendUnavailableError, match="backend='cuda' is unavailable"):
            lf.mixed_lora_delta(*args, backend="cuda")
        assert status["cuda"].startswith("unavailable")
        if not ops.triton_interpret_mode():
            with pytest.raises(lf.BackendUnavailableError, match="TRITON_INTERPRET=1"):
                lf.mixed_lora_delta(*args, backend="triton")


def test_default_backend_on_cpu_is_torch():
    assert ops.resolve_backend(None, torch.device("cpu")) == "torch"


@pytest.mark.parametrize("usable, want", [({"cuda", "triton"}, "cuda"), ({"triton"}, "triton"), ({"cuda"}, "cuda"),
                                          (set(), "torch")])
def test_default_backend_order_on_cuda_tensors(monkeypatch, usable, want):
    """backend=None on CUDA tensors: the CUDA extension, then triton, then torch (ops.DEFAULT_ORDER: same device time
    on the H200 record, far less host time per eager call for the extension). Availability is simulated."""
    asked = []

    def reason(name, device=None):
        asked.append(name)
        return None if name in usable else f"{name} is not usable in this test"

    monkeypatch.setattr(ops, "_unavailable_reason", reason)
    assert ops.resolve_backend(None, torch.device("cuda", 0)) == want
    assert asked == ["cuda", "triton"][:["cuda", "triton", "torch"].index(want) + 1]


def test_torch_backend_supports_double_backward():
    """The way out the fused backends name for create_graph=True: the torch backend's second derivatives pass
    torch.autograd.gradgradcheck in float64 (x, basis and coefficients)."""
    p = random_problem(2, 3, 5, 4, 3, 2, torch.float64, seed=1)
    leaves = [p[k].double().requires_grad_(True) for k in ("x", "lora_a", "lora_b", "coeffs")]

    def fn(x, a, b, c):
        return lf.lorweb_linear(x, p["weight"], p["bias"], a, b, c, p["scale"], backend="torch")

    assert torch.autograd.gradgradcheck(fn, leaves)
