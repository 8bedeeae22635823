"""Fresh audit of the CUDA C++ fallback (csrc/, setup.py's build of it, lorweb_fast/_cuda_build_info.py and the
registration of ``torch.ops.lorweb_fast_cuda`` in lorweb_fast/ops.py).

The CPU tests below fail now and pass once fixed. The GPU test at the end is a PIN (marked so): it passes on reading
of csrc/lorweb_kernels.cu but guards a README claim that no test exercises for this backend.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from lorweb_fast import ops
from lorweb_fast.testing import assert_within_bound


def _require_extension():
    if ops._CUDA_EXT is None:
        pytest.skip(f"lorweb_fast._C not importable here: {ops._CUDA_IMPORT_ERROR}")


def _meta_problem():
    """A consistent problem on the meta device: x (10, 17), 2 samples of 5 rows, N=3, r=4, out=19."""
    m = dict(device="meta")
    return dict(x=torch.empty(10, 17, **m), weight=torch.empty(19, 17, **m), bias=torch.empty(19, **m),
                lora_a=torch.empty(3, 17, 4, **m), lora_b=torch.empty(3, 4, 19, **m),
                coeffs=torch.empty(2, 3, **m))


# (what is wrong, keyword of the real kernel's TORCH_CHECK message, override of the consistent problem)
BAD_FWD = [
    ("coeffs rows do not cover x", "coeffs|rows", dict(coeffs=torch.empty(3, 3, device="meta"))),
    ("lora_b rank differs from lora_a", "lora_b", dict(lora_b=torch.empty(3, 5, 19, device="meta"))),
    ("coeffs not float32", "coeffs", dict(coeffs=torch.empty(2, 3, device="meta", dtype=torch.float16))),
    ("weight not (out, in)", "weight", dict(weight=torch.empty(19, 16, device="meta"))),
    ("lora_a dtype differs from x", "lora_a", dict(lora_a=torch.empty(3, 17, 4, device="meta",
                                                                      dtype=torch.bfloat16))),
]


@pytest.mark.parametrize("what, message, override", BAD_FWD, ids=[c[0] for c in BAD_FWD])
def test_cuda_fwd_fake_kernel_refuses_what_the_real_kernel_refuses(what, message, override):
    """lorweb_fast/ops.py:_cuda_fwd_fake (the op's fake / Meta kernel) should refuse the inputs that
    csrc/lorweb_ops.cpp:check_common / check_weight refuse (TORCH_CHECK naming the argument), as the Triton op's
    shape propagation does (lorweb_fast.triton_fwd under FakeTensorMode raises "x has 10 rows but coeffs (3, 3) x
    rows_per_sample 5 = 15", "lora_b must be (N, r, out) = ...", "coeffs must be (B, N) float32 ..."). Now it returns
    the contract shapes for any input, so meta-device shape inference, torch.compile and torch.export of a direct op
    call accept a program that the CUDA kernel refuses only when it runs on the GPU."""
    _require_extension()
    p = {**_meta_problem(), **override}
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        torch.ops.lorweb_fast_cuda.fwd(p["x"], p["weight"], p["bias"], None, p["lora_a"], p["lora_b"], p["coeffs"],
                                       0.75, 5)


def test_cuda_bwd_fake_kernel_refuses_saved_tensors_of_the_wrong_width():
    """lorweb_fast/ops.py:_cuda_bwd_fake should refuse u / z that are not (M, N*r), as csrc/lorweb_ops.cpp:bwd does
    ("lorweb_fast_cuda: u and z must be (M, N*r)"); now it returns gradients of the contract shapes."""
    _require_extension()
    p = _meta_problem()
    u = z = torch.empty(10, 7, device="meta")  # N*r = 12
    dy = torch.empty(10, 19, device="meta")
    with pytest.raises((RuntimeError, ValueError, TypeError), match="u and z|\\bu\\b"):
        torch.ops.lorweb_fast_cuda.bwd(dy, p["x"], p["weight"], p["lora_a"], p["lora_b"], p["coeffs"], u, z, 0.75, 5)


def _load_setup_copy(tmp_path):
    """setup.py copied into ``tmp_path`` and imported (not run): its generated _cuda_build_info.py then goes to
    tmp_path/lorweb_fast, never into this checkout."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "lorweb_fast").mkdir()
    (tmp_path / "setup.py").write_text((repo / "setup.py").read_text())
    spec = importlib.util.spec_from_file_location("lorweb_setup_copy", tmp_path / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_empty_torch_cuda_arch_list_builds_the_documented_default(tmp_path, monkeypatch, capsys):
    """setup.py's docstring (and README "Building the CUDA extension"): TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0".
    setup.py:cuda_extension uses ``os.environ.setdefault``, so an exported but empty variable (``TORCH_CUDA_ARCH_LIST=``
    in a CI script with an unset ARCH) is kept: torch then detects the visible GPUs, and without one its
    ``_get_cuda_arch_flags`` fails with ``arch_list[-1] += '+PTX'`` on an empty list, recorded as BUILD_ERROR "its
    compile failed (IndexError: list index out of range)" (reproduced in a copy of the repo with setup.py
    build_ext); with a GPU it builds for that GPU only and records TORCH_CUDA_ARCH_LIST='' for backend_status().
    Expected: an empty (or blank) value is read as unset, i.e. the default "8.0;9.0" is built and recorded."""
    setup = _load_setup_copy(tmp_path)
    for name in ("LORWEB_FAST_SKIP_CUDA_BUILD", "LORWEB_FAST_FORCE_CUDA_BUILD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")
    ext_modules, _ = setup.cuda_extension()
    if not ext_modules:
        pytest.skip("setup.py would not build the extension here (CPU-only torch or no CUDA toolkit)")
    info = {}
    exec((tmp_path / "lorweb_fast" / "_cuda_build_info.py").read_text(), info)
    assert (os.environ["TORCH_CUDA_ARCH_LIST"], info["TORCH_CUDA_ARCH_LIST"]) == (setup.DEFAULT_ARCH_LIST,) * 2


# ------------------------------------------------------------------------------------------------- GPU (a PIN)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_extension_offsets_beyond_2_pow_31_elements():
    """PIN, passes on reading (not run here: no GPU). README "Backends", cuda row: "int64 row offsets"; the only
    offsets test (tests/test_gpu.py::test_offsets_beyond_2_pow_31_on_gpu) runs the Triton launchers. Here M * R
    exceeds 2**31 in the extension's own kernels (csrc/lorweb_kernels.cu: scale_columns_kernel's grid-stride loop and
    ``m * cols + c0``, scale_dz_column_partials_kernel's ``(row0 + rr) * cols + c0``, the per-sample slice pointers):
    2 samples of 2**23 + 64 rows, R = 128 (bf16, 16-byte loads). x and dy are zero except the last 300 rows (sample
    1), so every output and gradient is zero outside them and known in float64 inside; a wrapped 32-bit offset would
    write the tail's values into the head or leave the tail wrong. About 18 GB of GPU memory."""
    why = ops._unavailable_reason("cuda", torch.device("cuda"))
    if why is not None:
        pytest.fail(f"backend 'cuda' must be usable on a GPU machine: {why}")
    dt, n, r, k, out, tail, scale = torch.bfloat16, 32, 4, 8, 8, 300, 0.75
    big = n * r
    rows_per_sample = 2 ** 31 // (2 * big) + 64
    m = 2 * rows_per_sample
    assert m * big > 2 ** 31
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(m, k, device="cuda", dtype=dt)
    x[-tail:] = torch.randn(tail, k, generator=g).to(dt).cuda()
    a = (torch.randn(n, k, r, generator=g) * k ** -0.5).to(dt).cuda()
    b = torch.randn(n, r, out, generator=g).to(dt).cuda()
    coeffs = (torch.rand(2, n, generator=g) + 0.1).cuda()
    y, u, z = torch.ops.lorweb_fast_cuda.fwd(x, None, None, None, a, b, coeffs, scale, rows_per_sample)
    assert not y[:-tail].any() and not z[:-tail].any()

    a_cat = a.double().transpose(1, 2).reshape(big, k)  # row n*r + j = lora_a[n, :, j]
    b_cat = b.double().reshape(big, out)
    s = (coeffs[1].double() * scale).repeat_interleave(r)
    xt = x[-tail:].double()
    u_ref, u_abs = xt @ a_cat.t(), xt.abs() @ a_cat.abs().t()
    assert_within_bound("z tail", z[-tail:].double(), u_ref * s, u_abs * s, dt, k)
    assert_within_bound("y tail", y[-tail:].double(), (u_ref * s) @ b_cat, (u_abs * s) @ b_cat.abs(), dt, k + big)

    dy = torch.zeros(m, out, device="cuda", dtype=dt)
    dy[-tail:] = torch.randn(tail, out, generator=g).to(dt).cuda()
    dx, d_a, d_b, d_c = torch.ops.lorweb_fast_cuda.bwd(dy, x, None, a, b, coeffs, u, z, scale, rows_per_sample)
    assert not dx[:-tail].any()
    assert torch.equal(d_c[0], torch.zeros_like(d_c[0]))  # sample 0: all-zero rows
    dyt = dy[-tail:].double()
    dz, dz_abs = dyt @ b_cat.t(), dyt.abs() @ b_cat.abs().t()
    assert_within_bound("dx tail", dx[-tail:].double(), (dz * s) @ a_cat, (dz_abs * s) @ a_cat.abs(), dt, out + big)
    want_c = scale * (u_ref * dz).view(tail, n, r).sum((0, 2))
    abs_c = scale * (u_abs * dz_abs).view(tail, n, r).sum((0, 2))
    assert_within_bound("d_coeffs[1]", d_c[1].double(), want_c, abs_c, dt, tail * r + out)
    want_a = ((dz * s).t() @ xt).view(n, r, k).transpose(1, 2)
    abs_a = ((dz_abs * s).t() @ xt.abs()).view(n, r, k).transpose(1, 2)
    assert_within_bound("d_lora_a", d_a.double(), want_a, abs_a, dt, tail + out)
    want_b = ((u_ref * s).t() @ dyt).view(n, r, out)
    abs_b = ((u_abs * s).t() @ dyt.abs()).view(n, r, out)
    assert_within_bound("d_lora_b", d_b.double(), want_b, abs_b, dt, tail + k)
    del x, y, u, z, dy, dx
    torch.cuda.empty_cache()
