"""Triton kernels for the coefficient-weighted LoRA basis (pure launchers; no autograd, no dispatch).

Notation (see ../shared/METHOD.md): the N basis LoRAs of rank r are one rank-R LoRA, R = N*r. Column c of the
concatenated basis belongs to LoRA n = c // r, rank slot j = c % r. Rows of the flattened input (M = B*S rows) map to
samples by index: row m belongs to sample m // rows_per_sample, whose mixing coefficient for column c is
``scale * coeffs[m // rows_per_sample, c // r]``.

Two kernels serve the whole forward and backward pass:

* ``row_panel``: ``U = X @ P`` where P (Kred x R) is a view of ``lora_a`` (N, in, r) or of ``lora_b`` (N, r, out)
  given by strides, plus ``S = U * scaling`` in the epilogue. One program owns BLOCK_M rows and *all* R columns, so X
  is streamed exactly once. Forward shrink: X = x, P = A_cat, giving (u, z). Backward: X = dy, P = B_cat^T, giving
  (dZ, dZ * scaling).
* ``k_extended_gemm``: ``OUT = X1 @ W1 + X2 @ W2 (+ bias) (+ base)`` as one GEMM over the extended reduction dimension
  [Q | R], so the output is written once. Forward: X1 = x, W1 = W^T, X2 = z, W2 = B_cat. Backward dx: X1 = dy, W1 = W,
  X2 = dZ * scaling, W2 = A_cat^T. Without X1 it is the delta-only expand, optionally added to a given ``base``.

All accumulation is in fp32 and there are no atomics, so results are deterministic. fp32 inputs use IEEE fp32 dot
products (no TF32) so that fp32 results are fp32-accurate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _mma(acc, a, b, DOT_MODE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. DOT_MODE 0: native tensor-core dot (bf16/fp16); 1: IEEE fp32 (no TF32);
    2: upcast to fp32 first (exact for bf16 products) -- Triton's CPU interpreter mis-evaluates bf16 tl.dot."""
    if DOT_MODE == 0:
        return acc + tl.dot(a, b)
    elif DOT_MODE == 1:
        return acc + tl.dot(a, b, input_precision="ieee")
    else:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _row_panel_kernel(
    X, P, COEFFS, U, S,
    M, KRED, R, RANK, ROWS_PER_SAMPLE, scale,
    stride_xm, stride_xk,
    stride_pn, stride_pj, stride_pk,
    stride_cb, stride_cn,
    stride_um, stride_uc,
    stride_sm, stride_sc,
    WRITE_U: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_R)
    lora = cols // RANK
    slot = cols % RANK
    row_ok = rows < M
    col_ok = cols < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, KRED, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < KRED
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        p = tl.load(P + lora[None, :] * stride_pn + slot[None, :] * stride_pj + ks[:, None] * stride_pk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(acc, x, p, DOT_MODE)
    out_mask = row_ok[:, None] & col_ok[None, :]
    if WRITE_U:
        tl.store(U + rows[:, None] * stride_um + cols[None, :] * stride_uc,
                 acc.to(U.dtype.element_ty), mask=out_mask)
    sample = rows // ROWS_PER_SAMPLE
    coef = tl.load(COEFFS + sample[:, None] * stride_cb + lora[None, :] * stride_cn, mask=out_mask, other=0.0)
    scaled = acc * (coef.to(tl.float32) * scale)
    tl.store(S + rows[:, None] * stride_sm + cols[None, :] * stride_sc, scaled.to(S.dtype.element_ty), mask=out_mask)


@triton.jit
def _k_extended_gemm_kernel(
    X1, W1, X2, W2, BIAS, BASE, OUT,
    M, NOUT, Q, R, RANK,
    stride_x1m, stride_x1q,
    stride_w1q, stride_w1p,
    stride_x2m, stride_x2c,
    stride_w2n, stride_w2j, stride_w2p,
    stride_basem, stride_basep,
    stride_om, stride_op,
    HAS_X1: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped program order so that neighbouring programs share X row panels in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(NOUT, BLOCK_N)
    group_size = GROUP_M * num_n
    group = pid // group_size
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    out_ok = outs < NOUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_X1:
        for q0 in range(0, Q, BLOCK_Q):
            qs = q0 + tl.arange(0, BLOCK_Q)
            q_ok = qs < Q
            a = tl.load(X1 + rows[:, None] * stride_x1m + qs[None, :] * stride_x1q,
                        mask=row_ok[:, None] & q_ok[None, :], other=0.0)
            w = tl.load(W1 + qs[:, None] * stride_w1q + outs[None, :] * stride_w1p,
                        mask=q_ok[:, None] & out_ok[None, :], other=0.0)
            acc = _mma(acc, a, w, DOT_MODE)
    # The low-rank tail of the reduction: columns c = (lora n, slot j) of the basis.
    for c0 in range(0, R, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < R
        lora = cs // RANK
        slot = cs % RANK
        z = tl.load(X2 + rows[:, None] * stride_x2m + cs[None, :] * stride_x2c,
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        w2 = tl.load(W2 + lora[:, None] * stride_w2n + slot[:, None] * stride_w2j + outs[None, :] * stride_w2p,
                     mask=c_ok[:, None] & out_ok[None, :], other=0.0)
        acc = _mma(acc, z, w2, DOT_MODE)
    if HAS_BIAS:
        acc += tl.load(BIAS + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & out_ok[None, :]
    if HAS_BASE:
        acc += tl.load(BASE + rows[:, None] * stride_basem + outs[None, :] * stride_basep,
                       mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_om + outs[None, :] * stride_op, acc.to(OUT.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Launch through ``wrap_triton`` (traceable by torch.compile). Under TRITON_INTERPRET=1, wrap_triton hands back
    the interpreted kernel, which cannot run on fake tensors: there the launch is skipped while shapes are being
    propagated (the outputs are already allocated with their final shapes)."""
    if interpreting() and any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


def dot_mode(dtype: torch.dtype) -> int:
    """The ``_mma`` mode for inputs of ``dtype`` (see ``_mma``)."""
    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and interpreting():
        return 2
    return 0


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def row_panel_config(R: int, dtype: torch.dtype) -> TileConfig:
    """Static tiles for ``row_panel``, chosen from R and the dtype only (never from M, so no re-specialisation when
    the token count changes). Defaults for sm_80/sm_90; not yet tuned on a GPU."""
    block_r = _pow2_at_least_16(R)
    wide = dtype == torch.float32 or block_r > 128
    return TileConfig(block_m=32 if wide else 64, block_n=block_r, block_k=64 if not wide else 32,
                      num_warps=8 if block_r >= 128 else 4, num_stages=3)


def k_extended_config(Q: int, nout: int, dtype: torch.dtype) -> TileConfig:
    """Static tiles for ``k_extended_gemm`` by shape class and dtype (never from M). Not yet tuned on a GPU."""
    if dtype == torch.float32:
        return TileConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3)
    if nout >= 8192 or Q >= 8192:
        return TileConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)
    return TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


def _check(t: torch.Tensor, name: str, dims: int) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels support {SUPPORTED_DTYPES}")


def row_panel(x: torch.Tensor, panel: torch.Tensor, panel_layout: str, coeffs: torch.Tensor, scale: float,
              rows_per_sample: int, *, write_unscaled: bool = True):
    """``u = x @ P`` and ``s = u * scale * coeffs[row // rows_per_sample, col // r]``.

    Args:
        x: (M, Kred) rows; any strides.
        panel: ``lora_a`` (N, Kred, r) when ``panel_layout == "a"`` (P = A_cat, Kred = in), or ``lora_b``
            (N, r, Kred) when ``panel_layout == "b"`` (P = B_cat^T, Kred = out).
        coeffs: (B, N) mixing coefficients, M == B * rows_per_sample.
        scale: lora_alpha / r.

    Returns:
        (u, s), both (M, R) in x.dtype; u is None when ``write_unscaled`` is False.
    """
    _check(x, "x", 2)
    _check(panel, "panel", 3)
    M, kred = x.shape
    if panel_layout == "a":
        n, pk, r = panel.shape
        stride_pn, stride_pk, stride_pj = panel.stride()
    elif panel_layout == "b":
        n, r, pk = panel.shape
        stride_pn, stride_pj, stride_pk = panel.stride()
    else:
        raise ValueError(f"panel_layout must be 'a' or 'b', got {panel_layout!r}")
    if pk != kred:
        raise ValueError(f"x has {kred} columns but the panel expects {pk}")
    R = n * r
    s = torch.empty((M, R), device=x.device, dtype=x.dtype)
    u = torch.empty((M, R), device=x.device, dtype=x.dtype) if write_unscaled else s
    cfg = row_panel_config(R, x.dtype)
    grid = (triton.cdiv(M, cfg.block_m),)
    _launch(_row_panel_kernel, grid,
        x, panel, coeffs, u, s,
        M, kred, R, r, rows_per_sample, float(scale),
        x.stride(0), x.stride(1),
        stride_pn, stride_pj, stride_pk,
        coeffs.stride(0), coeffs.stride(1),
        u.stride(0), u.stride(1),
        s.stride(0), s.stride(1),
        WRITE_U=write_unscaled, DOT_MODE=dot_mode(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (u if write_unscaled else None), s


def k_extended_gemm(x1: torch.Tensor | None, w1: torch.Tensor | None, w1_layout: str,
                    x2: torch.Tensor, w2: torch.Tensor, w2_layout: str,
                    bias: torch.Tensor | None = None, base: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``out = x1 @ W1 + x2 @ W2 (+ bias) (+ base)`` in one pass.

    Args:
        x1: (M, Q) or None (delta-only).
        w1: the frozen weight (nout, Q) when ``w1_layout == "weight_t"`` (W1 = weight^T, forward) or (Q, nout) when
            ``w1_layout == "weight"`` (W1 = weight, backward dx).
        x2: (M, R) low-rank activations (z in forward, dZ * scaling in backward).
        w2: ``lora_b`` (N, r, nout) for ``w2_layout == "b"`` (W2 = B_cat) or ``lora_a`` (N, nout, r) for
            ``w2_layout == "a_t"`` (W2 = A_cat^T).
        bias: (nout,) or None.
        base: (M, nout) or None: a base output to add (the delta-only variant accumulating into a given output).
        out: (M, nout) destination; may alias ``base`` for an in-place accumulation. Allocated when None.

    Returns:
        (M, nout) in x2.dtype.
    """
    _check(x2, "x2", 2)
    _check(w2, "w2", 3)
    M, R = x2.shape
    if w2_layout == "b":
        n, r, nout = w2.shape
        stride_w2n, stride_w2j, stride_w2p = w2.stride()
    elif w2_layout == "a_t":
        n, nout, r = w2.shape
        stride_w2n, stride_w2p, stride_w2j = w2.stride()
    else:
        raise ValueError(f"w2_layout must be 'b' or 'a_t', got {w2_layout!r}")
    if n * r != R:
        raise ValueError(f"x2 has {R} columns but the basis has N*r = {n * r}")
    has_x1 = x1 is not None
    if has_x1:
        _check(x1, "x1", 2)
        if w1 is None:
            raise ValueError("x1 was given without w1")
        Q = x1.shape[1]
        if w1_layout == "weight_t":
            stride_w1p, stride_w1q = w1.stride()
            w1_shape = (nout, Q)
        elif w1_layout == "weight":
            stride_w1q, stride_w1p = w1.stride()
            w1_shape = (Q, nout)
        else:
            raise ValueError(f"w1_layout must be 'weight_t' or 'weight', got {w1_layout!r}")
        if tuple(w1.shape) != w1_shape:
            raise ValueError(f"w1 has shape {tuple(w1.shape)}, expected {w1_shape}")
        stride_x1m, stride_x1q = x1.stride()
    else:
        Q, stride_x1m, stride_x1q, stride_w1q, stride_w1p = 0, 0, 0, 0, 0
        x1 = w1 = x2  # unused pointers
    if out is None:
        out = torch.empty((M, nout), device=x2.device, dtype=x2.dtype)
    has_base = base is not None
    base_t = base if has_base else out
    cfg = k_extended_config(Q, nout, x2.dtype)
    block_c = min(_pow2_at_least_16(R), 64)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(nout, cfg.block_n),)
    _launch(_k_extended_gemm_kernel, grid,
        x1, w1, x2, w2, bias if bias is not None else out, base_t, out,
        M, nout, Q, R, r,
        stride_x1m, stride_x1q,
        stride_w1q, stride_w1p,
        x2.stride(0), x2.stride(1),
        stride_w2n, stride_w2j, stride_w2p,
        base_t.stride(0), base_t.stride(1),
        out.stride(0), out.stride(1),
        HAS_X1=has_x1, HAS_BIAS=bias is not None, HAS_BASE=has_base, DOT_MODE=dot_mode(x2.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_Q=cfg.block_k, BLOCK_C=block_c, GROUP_M=8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
