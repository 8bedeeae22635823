"""Review of commit b23f02c (kernels/mixed_lora.py MAX_FUSED_R 512 -> 256, the R <= 512 default rules removed,
validate_table's new checks, the tuner's atomic write and family check) and its ripple effects.

CPU only. The cuBLAS route of kernels/mixed_lora.py:forward / backward runs plain torch ops, so its op bodies are
called directly on CPU tensors (no Triton kernel is launched there); the compile test builds a few sm_80 / sm_90
specializations with Triton's compiler and bundled ptxas (seconds each, no GPU), as tests/test_aot.py does.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from lorweb_fast import aot, ops, reference  # noqa: E402
from lorweb_fast.kernels import mixed_lora as K  # noqa: E402

FP16_MAX = torch.finfo(torch.float16).max


# ----------------------------------------------------------------------------------------------- stale docstring
def test_ops_module_docstring_names_the_current_cublas_threshold():
    """lorweb_fast/ops.py (module docstring): "picks the fused, composed or all-cuBLAS route by choose_route
    (committed per-GPU tables; 2-D inputs, R > 512 and a rank r that is not a power of two -> cuBLAS)". Since
    b23f02c the threshold is kernels/mixed_lora.py:MAX_FUSED_R = 256 (README: "R > 256 (`MAX_FUSED_R` ...) ... take
    the all-cuBLAS route"), so R in (256, 512] takes cuBLAS although the docstring says fused. Expected: the
    docstring names the current threshold (or MAX_FUSED_R)."""
    doc = ops.__doc__
    assert "R > 512" not in doc and (f"R > {K.MAX_FUSED_R}" in doc or "MAX_FUSED_R" in doc), \
        "lorweb_fast/ops.py docstring still gives R > 512 as the cuBLAS threshold"


# ------------------------------------------------------------------- fp16 on the cuBLAS route (R now in (256, 512])
def _u_overflow_problem(num_loras):
    """fp16, x = 100 and A = 16 over in = 64: every u = x A_n is 102400 (> 65504, finite in fp32); coefficients 1/N
    and a tiny B, so z = 102400 / N and y = R * z * 1e-5 = 4.096 fit fp16 (as tests/test_half_precision_range.py's
    _u_overflow_problem, with N LoRAs of rank 4)."""
    seq, k, out, r = 16, 64, 32, 4
    return dict(x=torch.full((seq, k), 100.0, dtype=torch.float16), weight=torch.zeros(out, k, dtype=torch.float16),
                lora_a=torch.full((num_loras, k, r), 16.0, dtype=torch.float16),
                lora_b=torch.full((num_loras, r, out), 1e-5, dtype=torch.float16),
                coeffs=torch.full((1, num_loras), 1.0 / num_loras), rows_per_sample=seq)


@pytest.mark.parametrize("num_loras", [65, 128])  # R = 260, 512: fused before b23f02c, cuBLAS now
def test_fp16_cublas_route_stays_finite_where_only_u_overflows(num_loras):
    """README (op contract): "Triton's saved u for fp16 inputs, fp32 (u is unscaled and passes fp16's 65504 where z,
    y and d_coeffs fit; Triton scales z from its fp32 accumulator, so its forward stays finite there ...)", pinned for
    the fused route by tests/test_half_precision_range.py:test_triton_fp16_forward_scales_u_in_fp32 /
    test_triton_fp16_coefficient_gradient_finite_when_forward_is. b23f02c moved R in (256, 512] to the cuBLAS route
    (kernels/mixed_lora.py:choose_route), whose forward computes ``u = x @ a_cat.t()`` in fp16 and z from that
    rounded u (kernels/mixed_lora.py:forward), and whose backward forms d coeffs from it
    (kernels/mixed_lora.py:backward): under TRITON_INTERPRET=1, backend='triton' gives y = 4.10 at R = 256 but inf at
    R = 260 and 512 for the same per-column values. Expected: on the cuBLAS route too, y and d coeffs are finite and
    match the float64 reference when only the unscaled u passes 65504 (e.g. u and z from an fp32 product for fp16
    inputs, as the fused route)."""
    p = _u_overflow_problem(num_loras)
    R = num_loras * 4
    assert K.choose_route(64, 32, R, torch.float16, p["rows_per_sample"], rank=4) == "cublas"
    y, u, z = K.forward(p["x"], p["weight"], None, None, p["lora_a"], p["lora_b"], p["coeffs"], 1.0,
                        p["rows_per_sample"])
    x64 = p["x"].double().requires_grad_(True)
    c64 = p["coeffs"].double().requires_grad_(True)
    ref = reference.lorweb_linear(x64[None], p["weight"].double(), None, p["lora_a"].double(),
                                  p["lora_b"].double(), c64, 1.0)[0]
    assert torch.isfinite(ref).all() and ref.abs().max() < FP16_MAX
    assert torch.isfinite(y).all(), f"R = {R}, fp16: y = {y[0, 0].item()} where the reference is {ref[0, 0].item()}"
    assert (y.double() - ref).abs().max() <= 1e-2 * ref.abs().max()
    dy = torch.ones_like(y)
    ref.backward(dy.double())
    dx, _, _, d_coeffs = K.backward(dy, p["x"], p["weight"], p["lora_a"], p["lora_b"], p["coeffs"], u, z, 1.0,
                                    p["rows_per_sample"])
    assert torch.isfinite(c64.grad).all()
    assert torch.isfinite(d_coeffs).all(), f"R = {R}, fp16: d coeffs {d_coeffs[0, :3].tolist()}"
    assert (d_coeffs.double() - c64.grad).abs().max() <= 1e-2 * c64.grad.abs().max()


# -------------------------------------------------------- spills below the new MAX_FUSED_R (chunks R0 = R1 = 128)
def _spills(arch, R, dtype):
    """Register spills of the shrink / grad_basis launches (forward and backward, eager) the dispatcher makes for
    layer 3072 -> 3072 at R in ``dtype`` with the committed table of ``arch``'s family (lorweb_fast.aot.plan)."""
    return [f"{e['kernel']} {e['pass']} {e['config']}: {res['spill_bytes']} B of spills"
            for e, res in aot.compiled_r_dependent_launches(arch, (3072, 3072), R, dtype) if res["spill_bytes"]]


@pytest.mark.parametrize("arch, R, dtype", [(90, 208, "float32"), (80, 252, "float32"), (90, 200, "bfloat16")])
def test_fused_tiles_between_192_and_256_do_not_spill(arch, R, dtype):
    """b23f02c lowered kernels/mixed_lora.py:MAX_FUSED_R to 256 because "above it the (BLOCK_M, R) fp32 accumulators
    of the committed shrink / grad_basis tiles spilled registers on sm_80 and sm_90 (found by compiling them as
    lorweb_fast.aot does)" (README: the same reason), i.e. what stays fused should compile without spills
    (lorweb_fast/aot.py:check_entry). But lorweb_fast/aot.py:RANKS = (16, 64, 96, 128, 256) never compiles the chunk
    split r_chunks gives every R in (192, 256): (R0, R1) = (128, 128) (N = 49..63 LoRAs of rank 4). Compiled with the
    aot module's own path, those launches spill on both families: fp32 _grad_basis_finish_kernel 232-304 B at every
    such R, bf16 _shrink_kernel (backward K1) 336 B on sm_90 and bf16 _grad_basis_kernel 144 B on sm_80 at R not a
    multiple of 16. Expected: no spills for any R the dispatcher keeps fused (e.g. r_chunks giving (256, 0) where the
    remainder rounds up to R0 -- the same padded width, and the R = 256 tiles compile clean -- or those R routed to
    cuBLAS), and an aot.RANKS value with such a split."""
    spills = _spills(arch, R, dtype)
    assert not spills, f"sm_{arch} R = {R} {dtype} (r_chunks {K.r_chunks(R)}):\n" + "\n".join(spills)


# ------------------------------------------------------------------------------------------ validate_table
def test_a_default_rule_reachable_only_above_MAX_FUSED_R_is_refused():
    """kernels/mixed_lora.py:validate_table now refuses an entry with R > MAX_FUSED_R ("which never runs on these
    tiles (such bases take the cuBLAS route)") and a default rule the earlier ones shadow ("is never used"); README
    Tuning: "a malformed table raises a ConfigError ... as do ... an entry above MAX_FUSED_R and a default rule that
    earlier ones shadow". A default rule whose R range starts above MAX_FUSED_R is just as dead -- choose_route sends
    every such R to cuBLAS -- yet it is accepted: e.g. the removed bf16 max_R = 512 rule (the one whose tiles
    spilled) put back after the 256 rule loads silently, and editing its tiles changes nothing. Expected: a
    ConfigError naming the unreachable rule."""
    table = copy.deepcopy(json.loads(K.config_path("sm90").read_text()))
    rule = copy.deepcopy(next(r for r in table["defaults"] if "bfloat16" in r["dtypes"]
                              and r["max_R"] == K.MAX_FUSED_R))
    rule["max_R"] = 2 * K.MAX_FUSED_R
    table["defaults"].insert(table["defaults"].index(next(r for r in table["defaults"]
                                                          if r["dtypes"] == ["float32"])), rule)
    with pytest.raises(K.ConfigError, match=r"defaults\[2\]"):
        K.validate_table(table, "dead_rule.json")


# ---------------------------------------------------- pin (passes now): cuBLAS route for R in (256, 512] under the
# interpreter, backend='triton', forward and every gradient against float64
_PIN = textwrap.dedent("""
    import torch
    import lorweb_fast as lf
    from lorweb_fast.kernels import mixed_lora as K
    from lorweb_fast.testing import check_against_reference, random_problem
    for n, r, dtype in ((65, 4, torch.float32), (128, 4, torch.float32), (32, 16, torch.bfloat16),
                        (96, 4, torch.float16)):
        assert K.choose_route(17, 19, n * r, dtype, 5, rank=r) == "cublas", (n, r)
        p = random_problem(2, 5, 17, 19, n, r, dtype, seed=14)
        check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"), p)
        check_against_reference(lambda *a: lf.mixed_lora_delta(*a, backend="triton"), p, with_base=False)
    p = random_problem(2, 5, 17, 19, 64, 4, torch.float32, seed=14)  # R = 256 itself: still fused
    assert K.choose_route(17, 19, 256, torch.float32, 5, rank=4) != "cublas"
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"), p)
    print("PIN-OK")
""")


def test_pin_cublas_route_for_R_between_256_and_512_under_the_interpreter(tmp_path):
    """PIN (passes now; at risk because b23f02c moved R in (256, 512] from the fused kernels to the cuBLAS route,
    which the interpreter suite checks only at R = 640 (tests/triton_interpret_cases.py:
    test_cublas_route_for_large_R_and_odd_rank)): backend='triton' under TRITON_INTERPRET=1 routes R = 260, 384, 512
    (fp32 / bf16 / fp16) to cuBLAS and matches the float64 reference in the output and every gradient (x, weight,
    bias, lora_a, lora_b, coeffs); R = 256 stays fused."""
    from lorweb_fast import ops as _ops
    import triton

    if _ops._version_tuple(triton.__version__) < _ops.MIN_INTERPRETER_TRITON:
        pytest.skip("this Triton's interpreter cannot run the kernels")
    script = tmp_path / "pin.py"
    script.write_text(_PIN)
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "PIN-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
