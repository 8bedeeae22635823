"""Triton kernels on CPU tensors under TRITON_INTERPRET=1 (run by test_triton_kernels.py in a subprocess, because the
variable must be set before triton is imported)."""

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_triton_kernels.py"

import lorweb_fast as lf  # noqa: E402
from lorweb_fast.kernels import mixed_lora as K  # noqa: E402
from lorweb_fast.testing import case_id, check_against_reference, odd_shape_cases, random_problem  # noqa: E402

CASES = odd_shape_cases()


def _problem(case, dtype=None):
    return random_problem(case["batch"], case["seq"], case["in_features"], case["out_features"], case["num_loras"],
                          case["rank"], dtype or case["dtype"], seed=case["seed"])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lorweb_linear_triton(case):
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"), _problem(case))


@pytest.mark.parametrize("case", CASES[1::4], ids=case_id)
def test_mixed_lora_delta_triton(case):
    check_against_reference(lambda *a: lf.mixed_lora_delta(*a, backend="triton"), _problem(case), with_base=False)


@pytest.mark.parametrize("case", CASES[::9], ids=case_id)
def test_fp16(case):
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"), _problem(case, torch.float16))


def test_add_to_and_non_contiguous_inputs():
    p = random_problem(3, 7, 37, 29, 3, 4, torch.float32, seed=5)
    x_t = p["x"].transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous strides
    assert not x_t.is_contiguous()
    base = torch.randn(3, 7, 29)
    want = lf.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"], add_to=base,
                               backend="torch")
    got = lf.mixed_lora_delta(x_t, p["lora_a"], p["lora_b"], p["coeffs"], p["scale"], add_to=base,
                              backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w_t = p["weight"].t().contiguous().t()
    got = lf.lorweb_linear(x_t, w_t, p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"], backend="triton")
    want = lf.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"],
                            backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_in_place_accumulation_launcher():
    p = random_problem(2, 5, 17, 19, 3, 2, torch.float32, seed=3)
    x = p["x"].reshape(10, 17)
    u, z = K.row_panel(x, p["lora_a"], "a", p["coeffs"].float(), p["scale"], 5)
    out = torch.randn(10, 19)
    expected = out + K.k_extended_gemm(None, None, "weight_t", z, p["lora_b"], "b")
    ret = K.k_extended_gemm(None, None, "weight_t", z, p["lora_b"], "b", base=out, out=out)
    assert ret.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_results_are_deterministic():
    p = random_problem(2, 9, 37, 29, 32, 4, torch.bfloat16, seed=7)
    runs = []
    for _ in range(2):
        leaves = [p[n].clone().requires_grad_(True) for n in ("x", "lora_a", "lora_b", "coeffs")]
        y = lf.lorweb_linear(leaves[0], p["weight"], p["bias"], *leaves[1:], p["scale"], backend="triton")
        y.backward(torch.ones_like(y))
        runs.append([y.detach()] + [t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# On CPU the interpreter cannot be traced by make_fx, so the AOT-dispatch checks run in the GPU suite only.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("with_weight", [True, False])
def test_opcheck_registered_ops(with_weight):
    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32, seed=11)
    x = p["x"].reshape(10, 17)
    weight = p["weight"] if with_weight else None
    bias = p["bias"] if with_weight else None
    base = None if with_weight else torch.randn(10, 19)
    fwd_args = (x, weight, bias, base, p["lora_a"], p["lora_b"], p["coeffs"].float(), 0.75, 5)
    torch.library.opcheck(torch.ops.lorweb_fast.triton_fwd.default, fwd_args,
                          test_utils=OPCHECK_UTILS)
    y, u, z = torch.ops.lorweb_fast.triton_fwd(*fwd_args)
    bwd_args = (torch.randn_like(y), x, weight, p["lora_a"], p["lora_b"], p["coeffs"].float(), u, z, 0.75, 5)
    torch.library.opcheck(torch.ops.lorweb_fast.triton_bwd.default, bwd_args,
                          test_utils=OPCHECK_UTILS)
