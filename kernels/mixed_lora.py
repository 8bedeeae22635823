"""Triton kernels for the coefficient-weighted LoRA basis (pure launchers; no autograd, no dispatch).

Notation (see ../shared/METHOD.md): the N basis LoRAs of rank r are one rank-R LoRA, R = N*r. The basis is packed
on every forward and backward call (``pack_basis``) into contiguous row-major ``a_cat`` (R, in) and ``b_cat``
(R, out): row c belongs to LoRA n = c // r, rank slot j = c % r. Rows of the flattened input (M = B*S rows) map to
samples by index: row m belongs to sample m // rows_per_sample, whose scaling of column c is
``scale * coeffs[m // rows_per_sample, c // r]``.

Kernels (R and r are compile-time constants of the shrink and grad_basis kernels; every reduction is in fp32 in a
fixed order, no atomics, so results are bit-for-bit deterministic):

* ``_shrink_kernel`` / ``_shrink_tma_kernel`` (tiles fetched by TMA through host tensor descriptors on Hopper, when
  the table's ``tma`` flag is set and the operands are aligned) -- ``u = X P^T`` for X (M, K) and a packed basis
  P (R, K), plus ``z = u * scaling`` in the epilogue. One program owns BLOCK_M rows and all R columns, so X is
  streamed once. R is covered by at most two power-of-two column chunks (96 = 64 + 32: no padding to 128).
  Optional split-K over a fixed number of K slices writes fp32 partials that ``_shrink_finish_kernel`` adds in
  slice order. Forward: X = x, P = a_cat -> (u, z); z is scaled from the fp32 accumulator, and for fp16 inputs the
  saved u is fp32 (``saved_u_dtype``): u = x A_cat may pass fp16's 65504 where z, y and the gradients fit.
  Backward K1: X = dy, P = b_cat -> dZ * scaling (dZ itself is not stored) plus dcoeffs partials
  ``scale * sum_j u * dZ`` per LoRA, summed over each program's rows when they lie in one sample (else one partial
  per row).
* ``_expand_kernel`` / ``_expand_tma_kernel`` (persistent, TMA loads; table flag ``tma``, aligned operands, Hopper)
  -- ``Y = X1 W1 + X2 W2 (+ bias) (+ base)``: one GEMM over the extended reduction [K | R] (the
  low-rank chunk runs *before* the main loop, bias and base are added in the epilogue, Y is written once).
  Forward: X1 = x, W1 = weight^T, X2 = z, W2 = b_cat. Backward K2: X1 = dy, W1 = weight, X2 = dZ * scaling,
  W2 = a_cat. Without X1 it is the delta-only expand, optionally added to ``base``. R is a run-time argument here
  (one compiled kernel per dtype and tile serves every basis size).
* ``_grad_basis_kernel`` -- backward K3: ``d a_cat = (dZ*scaling)^T x`` and ``d b_cat = z^T dy`` in one launch, split
  over M into a fixed number of slices of fp32 partials; ``_grad_basis_finish_kernel`` adds them in slice order and
  writes the gradients straight into the basis layouts (N, in, r) and (N, r, out).

Not done yet: warp specialization and epilogue/main-loop overlap in the persistent expand (Triton 3.8's
``flatten=True`` does not fuse its two inner loops and ``warp_specialize=True`` does not specialize for sm_90; a
statically unrolled low-rank chunk needs more shared memory than the SM has at the tuned tiles).

Index arithmetic: row offsets are formed as ``int64(first_row) * row_stride`` once per program, so M * ld may exceed
2**31; in-tile offsets stay 32-bit.

Tile configurations are static: they come from the committed per-GPU-family tables in ``configs/*.json`` and depend
on the layer's (in, out, R, dtype) only, never on M, and nothing is autotuned at run time. Each rule holds one tile
dict per launch role (KERNEL_CONFIG_KEYS): ``shrink`` and ``expand`` for the forward, ``shrink_dy`` (K1) and
``expand_dx`` (K2, the weight read in its (out, in) storage as the K x N operand) for the backward, ``grad_basis``
(K3). The backward roles are looked up under the layer's own (in, out), not under the swapped GEMM shape. A layer
without a frozen weight (delta only) has no ``dy W`` term: its K2 is the delta-only expand, role ``expand`` keyed
(in, in). Every launcher takes ``config=None`` (a dict overriding the table entry) for ``benchmarks/tune_kernels.py``.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.library import wrap_triton

#: Oldest Triton with host-side TMA descriptors (``triton.tools.tensor_descriptor``, triton-lang/triton#6455), which
#: the sm_90 tables' ``tma`` entries launch with; older versions are refused at import, by name.
MIN_TRITON = (3, 4)
if tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:2]) < MIN_TRITON:
    raise ImportError(f"lorweb_fast's Triton kernels need triton >= {'.'.join(map(str, MIN_TRITON))} (host-side TMA "
                      f"descriptors), found triton {triton.__version__}; upgrade torch/triton or use "
                      "backend='cuda' / 'torch'")
# FP fusion (a * b + c as one fma) pinned on at every launch: the kernels were written, checked and tuned with it, and
# Triton 3.10 turns its default off (Triton 3.9 warns at every compile that leaves it unset). Triton >= 3.10's
# TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off (older Triton has no such switch, and the pin overrides its
# TRITON_DEFAULT_FP_FUSION=0). lorweb_fast.aot compiles with the same option.
FP_FUSION = True
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Largest R served by the Triton kernels; larger bases go through the all-cuBLAS route (see ``choose_route``). 256:
#: above it the (BLOCK_M, R) fp32 accumulators of the committed shrink / grad_basis tiles spilled registers on sm_80
#: and sm_90 (up to 14 KB; found by compiling them as ``lorweb_fast.aot`` does), and no tile for larger R is checked.
MAX_FUSED_R = 256
#: fp32 elements (rows x columns) per program of the grad_basis finish kernel; a power of two.
FINISH_ELEMENTS = 8192
#: Rows per program of the split-K shrink's finish kernel.
SHRINK_FINISH_BLOCK_M = 32
#: Backward K1's dcoeffs partials (the shrink kernels' DCOEFFS): none (forward), one row per input row, or one row
#: per program of BLOCK_M rows (when BLOCK_M divides rows_per_sample, so that no program spans two samples).
DC_NONE: tl.constexpr = tl.constexpr(0)
DC_PER_ROW: tl.constexpr = tl.constexpr(1)
DC_PER_BLOCK: tl.constexpr = tl.constexpr(2)
ROUTES = ("fused", "composed", "cublas")
_SHRINK_KEYS = ("block_m", "block_k", "split_k", "tma", "num_warps", "num_stages")
_EXPAND_KEYS = ("block_m", "block_n", "block_k", "group_m", "tma", "num_warps", "num_stages")
#: Launch roles of one layer and the keys of their tile dicts: the forward's shrink (x a_cat^T) and expand
#: (x W^T + z b_cat), the backward's shrink_dy (K1: dy b_cat^T with the dcoeffs partials), expand_dx (K2:
#: dy W + dZ a_cat, weight read as stored) and grad_basis (K3).
KERNEL_CONFIG_KEYS = {
    "shrink": _SHRINK_KEYS,
    "expand": _EXPAND_KEYS,
    "shrink_dy": _SHRINK_KEYS,
    "expand_dx": _EXPAND_KEYS,
    "grad_basis": ("block_m", "block_n", "split_m", "num_warps", "num_stages"),
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def saved_u_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the u = x A_cat the fused forward saves for backward K1's d coeffs, for inputs of ``dtype``: fp32 for
    fp16 (u is unscaled, so it overflows fp16 where the scaled z, the output and d coeffs are finite: a finite
    forward would be followed by an inf d coeffs, and a GradScaler skip every step), else ``dtype`` (bf16 has fp32's
    range). 2 extra bytes per (row, basis column) for fp16: 0.5 MiB at M = 8192, R = 32."""
    return torch.float32 if dtype == torch.float16 else dtype


# ------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _mma(acc, a, b, DOT_MODE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. DOT_MODE 0: native tensor-core dot (bf16/fp16); 1: IEEE fp32 (no TF32);
    2: upcast to fp32 first (exact for bf16 products) -- Triton's CPU interpreter (3.8 included) mis-evaluates bf16
    tl.dot, so mode 2 is used only under TRITON_INTERPRET=1; compiled bf16 code always uses mode 0."""
    if DOT_MODE == 0:
        return acc + tl.dot(a, b)
    elif DOT_MODE == 1:
        return acc + tl.dot(a, b, input_precision="ieee")
    else:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _shrink_epilogue(acc, first_row, rows, row_ok, cols, U, Z, DC, COEFFS, ROWS_PER_SAMPLE, scale,
                     stride_um, stride_zm, stride_cb, stride_dcm,
                     R: tl.constexpr, RANK: tl.constexpr, CHUNK: tl.constexpr, WRITE_U: tl.constexpr,
                     DCOEFFS: tl.constexpr):
    """Store one (BLOCK_M, CHUNK) column chunk of u (unscaled), z = u * scaling and, for K1 (DCOEFFS > 0; U then
    holds the forward's u and is read instead of written), the dcoeffs partials scale * sum_j u[m, n*r+j] *
    acc[m, n*r+j]: one DC row per row m (DCOEFFS == DC_PER_ROW), or their sum over the BLOCK_M rows in DC row
    first_row // BLOCK_M (DCOEFFS == DC_PER_BLOCK; the launcher picks it when the block lies in one sample)."""
    col_ok = cols < R
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    lora = cols // RANK
    sample = rows // ROWS_PER_SAMPLE
    coef = tl.load(COEFFS + sample[:, None] * stride_cb + lora[None, :], mask=mask, other=0.0)
    tl.store(Z + rows64[:, None] * stride_zm + cols[None, :], (acc * (coef * scale)).to(Z.dtype.element_ty),
             mask=mask)
    if WRITE_U:
        tl.store(U + rows64[:, None] * stride_um + cols[None, :], acc.to(U.dtype.element_ty), mask=mask)
    if DCOEFFS:
        u = tl.load(U + rows64[:, None] * stride_um + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        per_lora = tl.sum(tl.reshape(u * acc, (acc.shape[0], CHUNK // RANK, RANK)), axis=2) * scale
        loras = cols // RANK
        first = tl.reshape(loras, (CHUNK // RANK, RANK))
        lora_ids = tl.max(first, axis=1)
        lora_ok = lora_ids < R // RANK
        if DCOEFFS == DC_PER_BLOCK:  # rows outside M read u as 0, so they add nothing
            dc_row = (first_row // acc.shape[0]).to(tl.int64)
            tl.store(DC + dc_row * stride_dcm + lora_ids, tl.sum(per_lora, axis=0), mask=lora_ok)
        else:
            tl.store(DC + rows64[:, None] * stride_dcm + lora_ids[None, :], per_lora,
                     mask=row_ok[:, None] & lora_ok[None, :])


@triton.jit
def _shrink_store(acc, rm, rows, row_ok, cols, pid_k, first_row, M, PART, U, Z, DC, COEFFS, ROWS_PER_SAMPLE, scale,
                  stride_um, stride_zm, stride_cb, stride_dcm,
                  R: tl.constexpr, RANK: tl.constexpr, CHUNK: tl.constexpr, R_CHUNKS: tl.constexpr,
                  WRITE_U: tl.constexpr, DCOEFFS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Shrink output of one (BLOCK_M, CHUNK) accumulator chunk (columns ``cols``): without split-K the epilogue
    (``_shrink_epilogue``); with split-K its fp32 partials in PART (SPLIT_K, M, R_CHUNKS = R0 + R1), summed in slice
    order by ``_shrink_finish_kernel``."""
    if SPLIT_K == 1:
        _shrink_epilogue(acc, first_row, rows, row_ok, cols, U, Z, DC, COEFFS, ROWS_PER_SAMPLE, scale,
                         stride_um, stride_zm, stride_cb, stride_dcm, R, RANK, CHUNK, WRITE_U, DCOEFFS)
    else:
        part = PART + (pid_k.to(tl.int64) * M + first_row) * R_CHUNKS
        tl.store(part + rm[:, None] * R_CHUNKS + cols[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _shrink_store_chunks(acc0, acc1, rm, rows, row_ok, c0, c1, pid_k, first_row, M, PART, U, Z, DC, COEFFS,
                         ROWS_PER_SAMPLE, scale, stride_um, stride_zm, stride_cb, stride_dcm,
                         R: tl.constexpr, RANK: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr,
                         WRITE_U: tl.constexpr, DCOEFFS: tl.constexpr, SPLIT_K: tl.constexpr):
    """``_shrink_store`` of both column chunks of a shrink program: columns c0 (R0 wide) and, when R1 > 0, c1."""
    _shrink_store(acc0, rm, rows, row_ok, c0, pid_k, first_row, M, PART, U, Z, DC, COEFFS, ROWS_PER_SAMPLE, scale,
                  stride_um, stride_zm, stride_cb, stride_dcm, R, RANK, R0, R0 + R1, WRITE_U, DCOEFFS, SPLIT_K)
    if R1 > 0:
        _shrink_store(acc1, rm, rows, row_ok, c1, pid_k, first_row, M, PART, U, Z, DC, COEFFS, ROWS_PER_SAMPLE,
                      scale, stride_um, stride_zm, stride_cb, stride_dcm, R, RANK, R1, R0 + R1, WRITE_U, DCOEFFS,
                      SPLIT_K)


@triton.jit
def _shrink_kernel(
    X, P, COEFFS, U, Z, DC, PART,
    M, K, ROWS_PER_SAMPLE, scale,
    stride_xm, stride_pr, stride_cb, stride_um, stride_zm, stride_dcm,
    R: tl.constexpr, RANK: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr,
    WRITE_U: tl.constexpr, DCOEFFS: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """X (M, K) with unit column stride, P (R, K) with unit column stride. Columns [0, R0) and [R0, R0 + R1) are two
    power-of-two chunks covering R (R1 = 0: one chunk)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    first_row = pid_m * BLOCK_M
    rm = tl.arange(0, BLOCK_M)
    rows = first_row + rm
    row_ok = rows < M
    x_base = X + first_row.to(tl.int64) * stride_xm
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    c0 = tl.arange(0, R0)
    acc0 = tl.zeros((BLOCK_M, R0), dtype=tl.float32)
    if R1 > 0:
        c1 = R0 + tl.arange(0, R1)
        acc1 = tl.zeros((BLOCK_M, R1), dtype=tl.float32)
    else:  # placeholders, never stored (_shrink_store_chunks skips the second chunk)
        c1 = c0
        acc1 = acc0
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_hi
        x = tl.load(x_base + rm[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        p0 = tl.load(P + c0[None, :] * stride_pr + ks[:, None], mask=k_ok[:, None] & (c0 < R)[None, :], other=0.0)
        acc0 = _mma(acc0, x, p0, DOT_MODE)
        if R1 > 0:
            p1 = tl.load(P + c1[None, :] * stride_pr + ks[:, None], mask=k_ok[:, None] & (c1 < R)[None, :],
                         other=0.0)
            acc1 = _mma(acc1, x, p1, DOT_MODE)
    _shrink_store_chunks(acc0, acc1, rm, rows, row_ok, c0, c1, pid_k, first_row, M, PART, U, Z, DC, COEFFS,
                         ROWS_PER_SAMPLE, scale, stride_um, stride_zm, stride_cb, stride_dcm, R, RANK, R0, R1, WRITE_U,
                         DCOEFFS, SPLIT_K)


@triton.jit
def _shrink_tma_kernel(
    X_DESC, P0_DESC, P1_DESC, COEFFS, U, Z, DC, PART,
    M, K, ROWS_PER_SAMPLE, scale,
    stride_cb, stride_um, stride_zm, stride_dcm,
    R: tl.constexpr, RANK: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr,
    WRITE_U: tl.constexpr, DCOEFFS: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """``_shrink_kernel`` with its main-loop tiles fetched by TMA through host-side tensor descriptors: X_DESC over
    X (M, K) with block (BLOCK_M, BLOCK_K), P0_DESC / P1_DESC over rows [0, R0) / [R0, R) of P (R, K) with blocks
    (R0, BLOCK_K) / (R1, BLOCK_K). Out-of-bounds rows and columns read as zero, so no masks are needed; split-K
    slices are whole multiples of BLOCK_K, so no tile straddles two slices."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    first_row = pid_m * BLOCK_M
    rm = tl.arange(0, BLOCK_M)
    rows = first_row + rm
    row_ok = rows < M
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    c0 = tl.arange(0, R0)
    acc0 = tl.zeros((BLOCK_M, R0), dtype=tl.float32)
    if R1 > 0:
        c1 = R0 + tl.arange(0, R1)
        acc1 = tl.zeros((BLOCK_M, R1), dtype=tl.float32)
    else:  # placeholders, never stored (_shrink_store_chunks skips the second chunk)
        c1 = c0
        acc1 = acc0
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x = X_DESC.load([first_row, k0])
        p0 = P0_DESC.load([0, k0])
        acc0 = _mma(acc0, x, tl.trans(p0), DOT_MODE)
        if R1 > 0:
            p1 = P1_DESC.load([0, k0])
            acc1 = _mma(acc1, x, tl.trans(p1), DOT_MODE)
    _shrink_store_chunks(acc0, acc1, rm, rows, row_ok, c0, c1, pid_k, first_row, M, PART, U, Z, DC, COEFFS,
                         ROWS_PER_SAMPLE, scale, stride_um, stride_zm, stride_cb, stride_dcm, R, RANK, R0, R1, WRITE_U,
                         DCOEFFS, SPLIT_K)


@triton.jit
def _shrink_finish_kernel(
    PART, COEFFS, U, Z, DC,
    M, ROWS_PER_SAMPLE, scale,
    stride_cb, stride_um, stride_zm, stride_dcm,
    R: tl.constexpr, RANK: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr,
    WRITE_U: tl.constexpr, DCOEFFS: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    first_row = pid_m * BLOCK_M
    rm = tl.arange(0, BLOCK_M)
    rows = first_row + rm
    row_ok = rows < M
    c0 = tl.arange(0, R0)
    acc0 = tl.zeros((BLOCK_M, R0), dtype=tl.float32)
    if R1 > 0:
        c1 = R0 + tl.arange(0, R1)
        acc1 = tl.zeros((BLOCK_M, R1), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        part = PART + (tl.full((), s, tl.int64) * M + first_row) * (R0 + R1)
        acc0 += tl.load(part + rm[:, None] * (R0 + R1) + c0[None, :], mask=row_ok[:, None], other=0.0)
        if R1 > 0:
            acc1 += tl.load(part + rm[:, None] * (R0 + R1) + c1[None, :], mask=row_ok[:, None], other=0.0)
    _shrink_epilogue(acc0, first_row, rows, row_ok, c0, U, Z, DC, COEFFS, ROWS_PER_SAMPLE, scale,
                     stride_um, stride_zm, stride_cb, stride_dcm, R, RANK, R0, WRITE_U, DCOEFFS)
    if R1 > 0:
        _shrink_epilogue(acc1, first_row, rows, row_ok, c1, U, Z, DC, COEFFS, ROWS_PER_SAMPLE, scale,
                         stride_um, stride_zm, stride_cb, stride_dcm, R, RANK, R1, WRITE_U, DCOEFFS)


@triton.jit
def _expand_kernel(
    X1, W1, X2, W2, BIAS, BASE, OUT,
    M, NOUT, K, R,
    stride_x1m, stride_w1k, stride_w1n, stride_x2m, stride_w2r, stride_basem, stride_om,
    HAS_X1: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT (M, NOUT) = X1 (M, K) W1 (K, NOUT) + X2 (M, R) W2 (R, NOUT) [+ bias] [+ base]. X1, X2, W2, BASE and OUT
    have unit column stride; W1 is addressed by (stride_w1k, stride_w1n) so that weight^T (forward) and weight
    (backward dx) are both read in place; one of the two strides is 1 (the JIT specialises it)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(NOUT, BLOCK_N)
    group_size = GROUP_M * num_n
    group = pid // group_size
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    first_row = pid_m * BLOCK_M
    rm = tl.arange(0, BLOCK_M)
    rows = first_row + rm
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    out_ok = outs < NOUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Low-rank chunk first, then the main loop; both are pipelined K loops. R is a runtime value here: the expand's
    # tiles do not depend on it, so one compiled kernel serves every basis size (a masked tail of < BLOCK_K columns
    # costs at most BLOCK_K / (in + R) of the work).
    x2_ptr = X2 + first_row.to(tl.int64) * stride_x2m
    w2_ptr = W2
    for c0 in range(0, R, BLOCK_K):
        cs = c0 + tl.arange(0, BLOCK_K)
        c_ok = cs < R
        z = tl.load(x2_ptr + rm[:, None] * stride_x2m + cs[None, :], mask=row_ok[:, None] & c_ok[None, :],
                    other=0.0)
        w2 = tl.load(w2_ptr + cs[:, None] * stride_w2r + outs[None, :], mask=c_ok[:, None] & out_ok[None, :],
                     other=0.0)
        acc = _mma(acc, z, w2, DOT_MODE)
    if HAS_X1:
        x1_base = X1 + first_row.to(tl.int64) * stride_x1m
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(x1_base + rm[:, None] * stride_x1m + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(W1 + ks[:, None] * stride_w1k + outs[None, :] * stride_w1n,
                        mask=k_ok[:, None] & out_ok[None, :], other=0.0)
            acc = _mma(acc, a, w, DOT_MODE)
    if HAS_BIAS:
        acc += tl.load(BIAS + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & out_ok[None, :]
    if HAS_BASE:
        base_base = BASE + first_row.to(tl.int64) * stride_basem
        acc += tl.load(base_base + rm[:, None] * stride_basem + outs[None, :], mask=mask, other=0.0).to(tl.float32)
    out_base = OUT + first_row.to(tl.int64) * stride_om
    tl.store(out_base + rm[:, None] * stride_om + outs[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _expand_tma_kernel(
    X1_DESC, W1_DESC, X2_DESC, W2_DESC, BIAS, BASE, OUT,
    M, NOUT, K, R, NUM_PROGS,
    stride_basem, stride_om,
    W1_KN: tl.constexpr, HAS_X1: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr,
    DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Persistent ``_expand_kernel`` with TMA loads (after Triton's persistent matmul design): NUM_PROGS programs
    walk the output tiles in grouped order; per tile the low-rank chunk (X2_DESC over z (M, R), W2_DESC over
    b_cat (R, NOUT), blocks (BLOCK_M, BLOCK_K) / (BLOCK_K, BLOCK_N)) runs before the main loop (X1_DESC over x (M, K);
    W1_DESC over a (K, NOUT) matrix with block (BLOCK_K, BLOCK_N) when W1_KN, else over weight (NOUT, K) with block
    (BLOCK_N, BLOCK_K), transposed in shared memory); bias and base are added in the epilogue. Out-of-bounds tiles
    read as zero, so K and R tails need no masks."""
    start = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(NOUT, BLOCK_N)
    num_tiles = num_m * num_n
    group_size = GROUP_M * num_n
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    for tile in range(start, num_tiles, NUM_PROGS):
        group = tile // group_size
        first_m = group * GROUP_M
        rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % group_size) % rows_in_group
        pid_n = (tile % group_size) // rows_in_group
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, R, BLOCK_K):
            acc = _mma(acc, X2_DESC.load([off_m, c0]), W2_DESC.load([c0, off_n]), DOT_MODE)
        if HAS_X1:
            for k0 in range(0, K, BLOCK_K):
                a = X1_DESC.load([off_m, k0])
                if W1_KN:
                    w = W1_DESC.load([k0, off_n])
                else:
                    w = tl.trans(W1_DESC.load([off_n, k0]))
                acc = _mma(acc, a, w, DOT_MODE)
        rows = off_m + rm
        outs = off_n + rn
        row_ok = rows < M
        out_ok = outs < NOUT
        if HAS_BIAS:
            acc += tl.load(BIAS + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        mask = row_ok[:, None] & out_ok[None, :]
        if HAS_BASE:
            base_base = BASE + off_m.to(tl.int64) * stride_basem
            acc += tl.load(base_base + rm[:, None] * stride_basem + outs[None, :], mask=mask,
                           other=0.0).to(tl.float32)
        out_base = OUT + off_m.to(tl.int64) * stride_om
        tl.store(out_base + rm[:, None] * stride_om + outs[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _grad_basis_kernel(
    L1, X1, L2, X2, PART,
    M, N1, N2, rows_per_split,
    stride_l1m, stride_x1m, stride_l2m, stride_x2m,
    R: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """fp32 partials of L1^T X1 (columns n < N1) and L2^T X2 (columns N1 <= n < N1 + N2) over the rows of slice
    s = program_id(1), with L* (M, R) and X* (M, N*) at unit column strides. Each program accumulates a transposed
    (BLOCK_N, R chunk) tile, X^T L, so that the MMA's M dimension is BLOCK_N (wgmma needs 64) even for R = 16, and
    stores it to PART (SPLIT_M, N1 + N2, R0 + R1); ``_grad_basis_finish_kernel`` adds the slices in order.
    Backward K3: L1 = dZ * scaling, X1 = x (-> d a_cat); L2 = z, X2 = dy (-> d b_cat)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    tiles1 = tl.cdiv(N1, BLOCK_N)
    second = pid_n >= tiles1
    if second:
        L = L2
        X = X2
        stride_lm = stride_l2m
        stride_xm = stride_x2m
        ncols = N2
        col0 = (pid_n - tiles1) * BLOCK_N
        out_col0 = N1 + col0
    else:
        L = L1
        X = X1
        stride_lm = stride_l1m
        stride_xm = stride_x1m
        ncols = N1
        col0 = pid_n * BLOCK_N
        out_col0 = col0
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < ncols
    c0 = tl.arange(0, R0)
    acc0 = tl.zeros((BLOCK_N, R0), dtype=tl.float32)
    if R1 > 0:
        c1 = R0 + tl.arange(0, R1)
        acc1 = tl.zeros((BLOCK_N, R1), dtype=tl.float32)
    m_lo = pid_s * rows_per_split
    m_hi = tl.minimum(M, m_lo + rows_per_split)
    rm = tl.arange(0, BLOCK_M)
    # 64-bit base pointers for this slice's first row, advanced by BLOCK_M rows per step.
    l_ptr = L + m_lo.to(tl.int64) * stride_lm
    x_ptr = X + m_lo.to(tl.int64) * stride_xm
    for m0 in range(m_lo, m_hi, BLOCK_M):
        m_ok = (m0 + rm) < m_hi
        x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :], mask=m_ok[:, None] & col_ok[None, :],
                    other=0.0)
        xt = tl.trans(x)
        l0 = tl.load(l_ptr + rm[:, None] * stride_lm + c0[None, :], mask=m_ok[:, None] & (c0 < R)[None, :],
                     other=0.0)
        acc0 = _mma(acc0, xt, l0, DOT_MODE)
        if R1 > 0:
            l1 = tl.load(l_ptr + rm[:, None] * stride_lm + c1[None, :], mask=m_ok[:, None] & (c1 < R)[None, :],
                         other=0.0)
            acc1 = _mma(acc1, xt, l1, DOT_MODE)
        l_ptr += BLOCK_M * stride_lm
        x_ptr += BLOCK_M * stride_xm
    # PART is (SPLIT_M, N1 + N2, R0 + R1): row n of slice s holds column n of the (R, N1 + N2) partial product.
    part = PART + (pid_s * (N1 + N2) + out_col0).to(tl.int64) * (R0 + R1)
    nn = tl.arange(0, BLOCK_N)
    tl.store(part + nn[:, None] * (R0 + R1) + c0[None, :], acc0, mask=col_ok[:, None])
    if R1 > 0:
        tl.store(part + nn[:, None] * (R0 + R1) + c1[None, :], acc1, mask=col_ok[:, None])


@triton.jit
def _grad_basis_finish_chunk(PART, DA, DB, rows, cols, N1, N2, ROW_LEN: tl.constexpr, SPLIT: tl.constexpr,
                             RANK: tl.constexpr, R: tl.constexpr):
    """One (rows, cols) chunk of ``_grad_basis_finish_kernel``: the SPLIT fp32 partials added in slice order, cast,
    and stored in the basis layouts (rows < N1 -> DA, the others -> DB)."""
    total_rows = N1 + N2
    row_ok = rows < total_rows
    col_ok = cols < R
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(PART + (s * total_rows + rows[:, None]) * ROW_LEN + cols[None, :], mask=row_ok[:, None],
                       other=0.0)
    val = acc.to(DA.dtype.element_ty)
    in_a = rows < N1
    # DA (R // RANK, N1, RANK): column c = n * RANK + j of row k goes to [n, k, j]
    a_off = (cols // RANK)[None, :] * (N1 * RANK) + rows[:, None] * RANK + (cols % RANK)[None, :]
    tl.store(DA + a_off, val, mask=(row_ok & in_a)[:, None] & col_ok[None, :])
    # DB (R, N2): column c of row N1 + o goes to [c, o]
    b_off = cols[None, :] * N2 + (rows - N1)[:, None]
    tl.store(DB + b_off, val, mask=(row_ok & (rows >= N1))[:, None] & col_ok[None, :])


@triton.jit
def _grad_basis_finish_kernel(
    PART, DA, DB, N1, N2,
    SPLIT: tl.constexpr, RANK: tl.constexpr, R: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Backward K3's finish: PART (SPLIT, N1 + N2, R0 + R1) fp32 partials of ``_grad_basis_kernel`` -> the gradients
    of the basis in its own layouts, DA (N, N1, RANK) (lora_a: (N, in, r)) and DB (R, N2) (lora_b: (N, r, out)),
    in DA's dtype. Row n < N1 of the summed partial is column n of d a_cat, row N1 + o column o of d b_cat. The
    slices are added in slice order (deterministic); one launch replaces the slice adds, the cast, the transposes and
    the copies the gradients needed before."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    _grad_basis_finish_chunk(PART, DA, DB, rows, tl.arange(0, R0), N1, N2, R0 + R1, SPLIT, RANK, R)
    if R1 > 0:
        _grad_basis_finish_chunk(PART, DA, DB, rows, R0 + tl.arange(0, R1), N1, N2, R0 + R1, SPLIT, RANK, R)


# ------------------------------------------------------------------------------------------------ configurations
class ConfigError(ValueError):
    """A kernel configuration table (kernels/configs/*.json) or a ``config`` override is malformed."""


#: the values of TRITON_INTERPRET that Triton reads as on (its getenv_bool: any case)
INTERPRET_ON_VALUES = ("1", "true", "on", "yes", "y")


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1, or another value Triton reads as on)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in INTERPRET_ON_VALUES


def kernels_interpreted() -> bool:
    """Whether this module's kernels are the interpreter's (TRITON_INTERPRET was on when triton.jit built them)
    rather than compiled ones; the environment variable set later does not change them."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_shrink_kernel, InterpretedFunction)


def gpu_family(device: Optional[torch.device] = None) -> str:
    """The configuration table for ``device``: "sm<major><minor>" when ``configs/`` has one (sm90: H100/H200, sm80:
    A100; benchmarks/tune_kernels.py writes one for any other GPU it runs on), else "default" (conservative tiles
    that fit 99 KiB of shared memory; also the CPU interpreter's table)."""
    if device is None or device.type != "cuda" or interpreting():
        return "default"
    return _cuda_family(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)
def _cuda_family(index: int) -> str:
    """``gpu_family`` of CUDA device ``index``, looked up once per process (a file-system check per launch cost
    host time on every call)."""
    major, minor = torch.cuda.get_device_capability(index)
    family = f"sm{major}{minor}"
    return family if config_path(family).is_file() else "default"


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be a positive integer, got {value!r}")
    return value


def _pow2(value, where: str) -> int:
    _positive_int(value, where)
    if value & (value - 1):
        raise ConfigError(f"{where} must be a power of two, got {value}")
    return value


def validate_kernel_config(kernel: str, cfg, where: str) -> dict:
    """Check one kernel's tile dict (all keys of KERNEL_CONFIG_KEYS[kernel], powers of two where Triton needs them)
    and return it; raise ConfigError naming ``where`` otherwise."""
    if kernel not in KERNEL_CONFIG_KEYS:
        raise ConfigError(f"{where}: unknown kernel {kernel!r}; expected one of {sorted(KERNEL_CONFIG_KEYS)}")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} must be an object, got {type(cfg).__name__}")
    want = KERNEL_CONFIG_KEYS[kernel]
    missing = [k for k in want if k not in cfg]
    extra = [k for k in cfg if k not in want]
    if missing or extra:
        raise ConfigError(f"{where}: missing keys {missing}, unknown keys {extra} (expected exactly {list(want)})")
    for key in want:
        if key.startswith("block_") or key == "num_warps":
            _pow2(cfg[key], f"{where}.{key}")
        elif key == "tma":
            if cfg[key] not in (0, 1) or isinstance(cfg[key], bool):
                raise ConfigError(f"{where}.tma must be 0 or 1, got {cfg[key]!r}")
        else:
            _positive_int(cfg[key], f"{where}.{key}")
    if cfg.get("block_m", 16) < 16 or cfg.get("block_n", 16) < 16 or cfg.get("block_k", 16) < 16:
        raise ConfigError(f"{where}: block sizes must be >= 16 (tensor-core dot), got {cfg}")
    return dict(cfg)


def _validate_rule(rule, where: str, exact: bool) -> dict:
    if not isinstance(rule, dict):
        raise ConfigError(f"{where} must be an object, got {type(rule).__name__}")
    keys = {"route", *KERNEL_CONFIG_KEYS}
    keys |= {"in", "out", "R", "dtype"} if exact else {"dtypes", "max_R"}
    missing = sorted(keys - set(rule))
    extra = sorted(set(rule) - keys)
    if missing or extra:
        hint = ""
        if {"shrink_dy", "expand_dx"} & set(missing) and "shrink" in rule:
            hint = (" (a table written before the backward roles existed: give each rule shrink_dy and expand_dx, "
                    "e.g. the shrink and expand tiles of the transposed shape, which its backward used, or re-run "
                    "benchmarks/tune_kernels.py)")
        raise ConfigError(f"{where}: missing keys {missing}, unknown keys {extra}{hint}")
    if rule["route"] not in ("fused", "composed"):
        raise ConfigError(f"{where}.route must be 'fused' or 'composed', got {rule['route']!r}")
    names = [rule["dtype"]] if exact else rule["dtypes"]
    if not isinstance(names, list) or not names or any(n not in DTYPE_NAMES.values() for n in names):
        raise ConfigError(f"{where}: dtype(s) must be among {sorted(DTYPE_NAMES.values())}, got {names!r}")
    for k in ("in", "out", "R") if exact else ("max_R",):
        _positive_int(rule[k], f"{where}.{k}")
    out = dict(rule)
    for kernel in KERNEL_CONFIG_KEYS:
        out[kernel] = validate_kernel_config(kernel, rule[kernel], f"{where}.{kernel}")
    return out


def validate_table(table, where: str) -> dict:
    """Validate a parsed configuration table (see configs/README in the module docstring of ``load_table``)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: the table must be a JSON object, got {type(table).__name__}")
    for key in ("family", "tuned", "note", "defaults", "entries"):
        if key not in table:
            raise ConfigError(f"{where}: missing top-level key {key!r}")
    if not isinstance(table["tuned"], bool):
        raise ConfigError(f"{where}: 'tuned' must be true or false")
    if not isinstance(table["defaults"], list) or not table["defaults"]:
        raise ConfigError(f"{where}: 'defaults' must be a non-empty list of rules")
    if not isinstance(table["entries"], list):
        raise ConfigError(f"{where}: 'entries' must be a list")
    defaults = [_validate_rule(r, f"{where}: defaults[{i}]", exact=False) for i, r in enumerate(table["defaults"])]
    covered: dict[str, int] = {}  # dtype -> the largest R the earlier rules cover (the first match applies)
    for i, rule in enumerate(defaults):  # R above MAX_FUSED_R never reaches a table (the cuBLAS route)
        if all(covered.get(name, 0) >= min(rule["max_R"], MAX_FUSED_R) for name in rule["dtypes"]):
            reach = min(rule["max_R"], MAX_FUSED_R)
            raise ConfigError(f"{where}: defaults[{i}] is never used: earlier rules already cover its dtypes "
                              f"{rule['dtypes']} up to R = {reach} (the first matching rule applies"
                              + (f"; R above MAX_FUSED_R = {MAX_FUSED_R} takes the cuBLAS route)"
                                 if rule["max_R"] > MAX_FUSED_R else ")"))
        for name in rule["dtypes"]:
            covered[name] = max(covered.get(name, 0), rule["max_R"])
    for name in DTYPE_NAMES.values():
        if covered.get(name, 0) < MAX_FUSED_R:
            raise ConfigError(f"{where}: no default rule covers dtype {name} up to R = {MAX_FUSED_R}")
    entries = [_validate_rule(r, f"{where}: entries[{i}]", exact=True) for i, r in enumerate(table["entries"])]
    seen: dict[tuple, int] = {}
    for i, rule in enumerate(entries):
        key = (rule["in"], rule["out"], rule["R"], rule["dtype"])
        if rule["R"] > MAX_FUSED_R:
            raise ConfigError(f"{where}: entries[{i}] has R = {rule['R']} > MAX_FUSED_R = {MAX_FUSED_R}, which never "
                              "runs on these tiles (such bases take the cuBLAS route)")
        if key in seen:
            raise ConfigError(f"{where}: entries[{i}] repeats the key (in, out, R, dtype) = {key} of "
                              f"entries[{seen[key]}] (the first would be used, this one never)")
        seen[key] = i
    return {**table, "defaults": defaults, "entries": entries}


def config_path(family: str):
    """The packaged file ``kernels/configs/<family>.json`` (it may not exist)."""
    return resources.files("lorweb_fast.kernels").joinpath("configs", f"{family}.json")


@lru_cache(maxsize=None)
def load_table(family: str) -> dict:
    """The committed table ``kernels/configs/<family>.json`` (package data), validated.

    Format: ``{"family", "tuned": bool, "note", "defaults": [rule...], "entries": [rule...]}``. A rule holds
    ``"route"`` ("fused" | "composed") and one tile dict per launch role (``shrink``, ``expand``, ``shrink_dy``,
    ``expand_dx``, ``grad_basis``; keys in KERNEL_CONFIG_KEYS). Entries match exactly on the layer's ``in``, ``out``,
    ``R``, ``dtype`` (the backward roles too); otherwise the first default with the dtype in ``dtypes`` and
    ``R <= max_R`` applies."""
    path = config_path(family)
    if not path.is_file():
        raise ConfigError(f"no kernel configuration table for GPU family {family!r} ({path})")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return validate_table(table, str(path))


def lookup(in_features: int, out_features: int, R: int, dtype: torch.dtype, family: str = "default") -> dict:
    """The table rule for one layer (never depends on M)."""
    return lookup_in(load_table(family), in_features, out_features, R, dtype, family)


def lookup_in(table: dict, in_features: int, out_features: int, R: int, dtype: torch.dtype,
              family: str = "given") -> dict:
    """The rule for one layer in a validated ``table`` (``validate_table``'s result); ``family`` names it in errors."""
    name = DTYPE_NAMES[dtype]
    for rule in table["entries"]:
        if (rule["in"], rule["out"], rule["R"], rule["dtype"]) == (in_features, out_features, R, name):
            return rule
    for rule in table["defaults"]:
        if name in rule["dtypes"] and R <= rule["max_R"]:
            return rule
    raise ConfigError(f"kernel table {family!r} has no rule for dtype {name}, R = {R}")


def choose_route(in_features: int, out_features: int, R: int, dtype: torch.dtype, rows_per_sample: int,
                 family: str = "default", rank: int = 1) -> str:
    """How one layer runs.

    * "cublas": every product through torch/cuBLAS (with the per-sample scaling as an elementwise op) -- for 2-D
      inputs (rows_per_sample == 1: the norm layers, M = batch, where tiles would be mostly empty) and for
      R > MAX_FUSED_R (a (BLOCK_M, R) fp32 accumulator would not fit in registers), and for LoRA ranks r that are
      not powers of two (the in-kernel dcoeffs reduction groups columns by r).
    * "fused": the shrink kernel, then the expand kernel fused with the base GEMM.
    * "composed": the shrink kernel, then ``y = addmm(bias, z, b_cat)`` and ``y.addmm_(x, weight^T)`` (beta = 1, so
      cuBLAS reads y in its epilogue).
    "fused" vs "composed" comes from the committed table for (in, out, R, dtype, GPU family)."""
    if rows_per_sample == 1 or R > MAX_FUSED_R or rank & (rank - 1):
        return "cublas"
    return lookup(in_features, out_features, R, dtype, family)["route"]


def kernel_config(kernel: str, in_features: int, out_features: int, R: int, dtype: torch.dtype, family: str,
                  override: Optional[dict] = None) -> dict:
    """The tile dict of ``kernel`` for one layer (read-only: the table's own dict, validated when the table was
    loaded); ``override`` (a full or partial dict) replaces table values and is validated here."""
    cfg = lookup(in_features, out_features, R, dtype, family)[kernel]
    if not override:
        return cfg
    return validate_kernel_config(kernel, {**cfg, **override}, f"{kernel} config")


# ---------------------------------------------------------------------------------------------------- launchers
def _fake_args(args) -> bool:
    """Whether a fake tensor is among the launch arguments (or under a TMA descriptor). Plain tensors that are not
    functional wrappers are answered without ``is_fake`` (it walks subclasses; this runs on every launch)."""
    for a in args:
        if a is None or isinstance(a, (int, float)):  # most launch arguments: skipped before the getattr, which
            continue  # raises and catches inside for them
        t = a if isinstance(a, torch.Tensor) else getattr(a, "base", None)
        if (isinstance(t, torch.Tensor) and (type(t) is not torch.Tensor or torch._is_functional_tensor(t))
                and is_fake(t)):
            return True
    return False


def traced(*args) -> bool:
    """True while torch.compile (or export) traces the launcher: a torch dispatch mode is active (proxy tracing,
    functionalization, fake mode) or a launch argument is fake. Traced launches go through ``wrap_triton`` and take
    the pointer kernels: host-side TMA descriptors hold the tensor itself, which a traced graph cannot keep
    (inductor then failed to hash the graph on the H200); both compute the same result."""
    return _get_current_dispatch_mode() is not None or _fake_args(args)


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Launch a kernel. Eager launches call the JIT kernel directly: ``wrap_triton`` there goes through the
    higher-order-op machinery (pytree flattening, signature binding), which cost ~0.3 ms of host time per launch on
    the H200 (torch 2.11), 10x the kernel at M=8192. While torch.compile traces (``traced``) the launch goes through
    ``wrap_triton`` so that it is recorded in the graph. Under TRITON_INTERPRET=1 the interpreted kernel always runs
    directly (torch 2.11's wrap_triton refuses it), except on fake tensors while shapes are propagated (the outputs
    are already allocated with their final shapes). ``lorweb_fast.aot`` replaces this function to record launches
    instead of running them. Eager launches pin ``enable_fp_fusion=FP_FUSION``; traced launches do not pass it (the
    compiler's options apply; whether torch 2.11's ``wrap_triton`` forwards it is unchecked). Eager launches go to
    the GPU of the tensors (Triton itself launches on the current
    device: a model placed on ``cuda:1`` while ``cuda:0`` is current, as with a ``device_map``)."""
    if interpreting():
        if not _fake_args(args):
            kernel[grid](*args, **kwargs)
    elif traced(*args):
        wrap_triton(kernel)[grid](*args, **kwargs)
    else:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is not None and device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                kernel[grid](*args, enable_fp_fusion=FP_FUSION, **kwargs)
        else:
            kernel[grid](*args, enable_fp_fusion=FP_FUSION, **kwargs)


def _cdiv(a, b):
    """``ceil(a / b)`` for the launch grids: ``triton.cdiv`` without its per-call host cost (a ConstexprFunction in
    Triton 3.6): the same expression, so symbolic sizes under torch.compile give the same grid."""
    return (a + b - 1) // b


def dot_mode(dtype: torch.dtype) -> int:
    """The ``_mma`` mode for inputs of ``dtype`` (see ``_mma``)."""
    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and interpreting():
        return 2
    return 0


def r_chunks(R: int) -> tuple[int, int]:
    """Power-of-two column chunks (R0, R1) covering R, each >= 16 (the dot minimum): the largest power of two not
    above R, and the remainder rounded up to a power of two (96 -> (64, 32), 128 -> (128, 0), 160 -> (128, 32));
    a remainder that rounds up to R0 makes one chunk of twice R0 (200 -> (256, 0), not (128, 128)): two equal
    chunks hold the same columns as one, and at 128 + 128 the shrink and grad_basis kernels spilled registers."""
    if R < 1:
        raise ValueError(f"R must be >= 1, got {R}")
    r0 = max(16, 1 << (R.bit_length() - 1))
    rem = R - r0
    r1 = 0 if rem <= 0 else max(16, triton.next_power_of_2(rem))
    return (2 * r0, 0) if r1 == r0 else (r0, r1)


def _tma_device(t: torch.Tensor, family: str) -> bool:
    """TMA exists on Hopper and newer; "default" tables decide from the device (the interpreter emulates TMA)."""
    if family == "sm80":
        return False
    if family == "sm90":
        return True
    if t.device.type == "cuda":
        return torch.cuda.get_device_capability(t.device)[0] >= 9
    return interpreting()


def _tma_aligned(t: torch.Tensor) -> bool:
    """A non-empty (rows, cols) operand a TMA descriptor can describe: unit column stride, rows that do not overlap
    (a broadcast row stride 0 is no tensor map), 16-byte aligned row stride and base. Storage offsets stand for base
    addresses: allocations themselves are 256-byte aligned (and data_ptr is unavailable on torch.compile's fake
    tensors). An empty operand has no descriptor (its shape must be positive)."""
    size = t.element_size()
    return (t.shape[0] > 0 and t.shape[1] > 0 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]
            and (t.stride(0) * size) % 16 == 0 and (t.storage_offset() * size) % 16 == 0)


def tma_usable(x: torch.Tensor, a_cat: torch.Tensor, r0: int, r1: int, family: str) -> bool:
    """Whether the shrink can fetch x (M, K) and a_cat (R, K) by TMA: a Hopper-or-newer GPU (or the interpreter),
    aligned operands (``_tma_aligned``), chunk heights <= 256 (the TMA box limit) and not traced (``traced``).
    Otherwise the table's ``tma`` flag falls back to the pointer kernel (cp.async), which computes the same result."""
    return (_tma_device(x, family) and max(r0, r1) <= 256 and not traced(x, a_cat) and _tma_aligned(x)
            and _tma_aligned(a_cat))


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Programs of the persistent expand: one per SM on a GPU (132 stands in for H100/H200 off-GPU, e.g. in the AOT
    compilation; 4 under the interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4 if interpreting() else 132


def _check(t: torch.Tensor, name: str, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels support {SUPPORTED_DTYPES}")


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit column stride (a copy only when needed)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _family(t: torch.Tensor, family: Optional[str]) -> str:
    return family if family is not None else gpu_family(t.device)


def pack_basis(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official basis layout as one packed rank-R LoRA.

    Args:
        lora_a: (N, in, r); lora_b: (N, r, out).

    Returns:
        a_cat (R, in) and b_cat (R, out), contiguous, row c = n * r + j holding LoRA n, slot j (differentiable: the
        gradients flow back to lora_a / lora_b in their own layout)."""
    _check(lora_a, "lora_a", 3)
    _check(lora_b, "lora_b", 3)
    n, k, r = lora_a.shape
    if tuple(lora_b.shape[:2]) != (n, r):
        raise ValueError(f"lora_b must be (N, r, out) = ({n}, {r}, out), got {tuple(lora_b.shape)}")
    return lora_a.transpose(1, 2).reshape(n * r, k).contiguous(), lora_b.reshape(n * r, lora_b.shape[2]).contiguous()


def unpack_basis_grads(d_a_cat: torch.Tensor, d_b_cat: torch.Tensor, num_loras: int):
    """(R, in), (R, out) gradients of the packed basis -> (N, in, r), (N, r, out) gradients of lora_a, lora_b."""
    R, k = d_a_cat.shape
    r = R // num_loras
    return d_a_cat.view(num_loras, r, k).transpose(1, 2).contiguous(), d_b_cat.view(num_loras, r, d_b_cat.shape[1])


def shrink(x: torch.Tensor, a_cat: torch.Tensor, coeffs: torch.Tensor, scale: float, rows_per_sample: int,
           rank: int, *, write_unscaled: bool = True, u_in: Optional[torch.Tensor] = None,
           config: Optional[dict] = None, out_features: Optional[int] = None, family: Optional[str] = None):
    """``u = x a_cat^T`` and ``z = u * scale * coeffs[row // rows_per_sample, col // rank]``.

    Args:
        x: (M, K) rows (forward: x with K = in; backward K1: dy with K = out); float32 / bfloat16 / float16.
        a_cat: (R, K) packed basis in x's dtype (forward: a_cat; backward K1: b_cat); R <= MAX_FUSED_R.
        coeffs: (B, N) fp32 mixing coefficients, M == B * rows_per_sample, R == N * rank (rank a power of two).
        scale: lora_alpha / r.
        write_unscaled: store u (else only z is written and u is returned as None).
        u_in: backward K1 only: the forward's u (M, R); then the dcoeffs partials
            ``scale * sum_j u[m, n*r+j] * (x a_cat^T)[m, n*r+j]`` (x a_cat^T: dZ, unscaled) are returned as a third
            output, (M / G, N) fp32, and u is not written: row i sums rows [i G, (i + 1) G), with G the rows per
            program of the launch that writes them (BLOCK_M, or with split-K the finish kernel's
            SHRINK_FINISH_BLOCK_M) when G divides a concrete rows_per_sample, else G = 1. The G rows of a partial
            lie in one sample, so ``dc.view(B, -1, N).sum(1)`` is per sample.
        config: tile dict overriding the table's entry for this call's role (``shrink``, or ``shrink_dy`` with
            ``u_in``; see out_features).
        out_features: the layer's other dimension, for the table lookup (defaults to K). The table role is
            ``shrink`` keyed (in = K, out = out_features), or with ``u_in`` (backward K1, x = dy) ``shrink_dy``
            keyed by the layer's own (in = out_features, out = K).

    Returns:
        (u, z), both (M, R): z in x.dtype, u in ``saved_u_dtype(x.dtype)`` (fp32 for fp16 x), or
        (None, z, dcoeff_partials) when ``u_in`` is given.
    """
    _check(x, "x", 2)
    _check(a_cat, "a_cat", 2)
    M, K = x.shape
    R = a_cat.shape[0]
    if a_cat.shape[1] != K:
        raise ValueError(f"x has {K} columns but a_cat {tuple(a_cat.shape)} expects {a_cat.shape[1]}")
    if a_cat.dtype != x.dtype:
        raise TypeError(f"a_cat has dtype {a_cat.dtype} but x has {x.dtype}")
    if coeffs.dim() != 2 or coeffs.dtype != torch.float32:
        raise TypeError(f"coeffs must be (B, N) float32, got {tuple(coeffs.shape)} {coeffs.dtype}")
    if rank < 1 or R % rank or coeffs.shape[1] != R // rank:
        raise ValueError(f"a_cat has R = {R} rows, which is not N * rank = {coeffs.shape[1]} * {rank}")
    if rank & (rank - 1):
        raise ValueError(f"the Triton kernels need a power-of-two LoRA rank, got r = {rank}")
    if R > MAX_FUSED_R:
        raise ValueError(f"R = {R} > {MAX_FUSED_R}: use the cuBLAS route (see choose_route)")
    if M != coeffs.shape[0] * rows_per_sample:
        raise ValueError(f"x has {M} rows but coeffs {tuple(coeffs.shape)} x rows_per_sample {rows_per_sample} "
                         f"= {coeffs.shape[0] * rows_per_sample}")
    x = _unit_cols(x)
    a_cat = _unit_cols(a_cat)
    coeffs = coeffs.contiguous()
    family = _family(x, family)
    if u_in is None:
        cfg = kernel_config("shrink", K, out_features or K, R, x.dtype, family, config)
    else:  # backward K1: K is the layer's out
        cfg = kernel_config("shrink_dy", out_features or K, K, R, x.dtype, family, config)
    r0, r1 = r_chunks(R)
    z = torch.empty((M, R), device=x.device, dtype=x.dtype)
    dcoeffs = u_in is not None
    if dcoeffs:
        if tuple(u_in.shape) != (M, R):
            raise ValueError(f"u_in must be ({M}, {R}), got {tuple(u_in.shape)}")
        u = _unit_cols(u_in)
        write_unscaled = False
    else:
        u = torch.empty((M, R), device=x.device, dtype=saved_u_dtype(x.dtype)) if write_unscaled else z
    split = cfg["split_k"]
    dc_mode, dc = DC_NONE.value, z
    if dcoeffs:  # one partial per program when no program spans two samples
        group = cfg["block_m"] if split == 1 else SHRINK_FINISH_BLOCK_M
        # a symbolic rows_per_sample (torch.compile, dynamic shapes) takes the per-row partials instead of a guard
        # (one compiled graph for every sequence length)
        whole = statically_known_true(rows_per_sample % group == 0)
        dc_mode, group = (DC_PER_BLOCK.value, group) if whole else (DC_PER_ROW.value, 1)
        dc = torch.empty((M // group, R // rank), device=x.device, dtype=torch.float32)
    part = torch.empty((split, M, r0 + r1), device=x.device, dtype=torch.float32) if split > 1 else z
    grid = (_cdiv(M, cfg["block_m"]), split)
    common = dict(R=R, RANK=rank, R0=r0, R1=r1, WRITE_U=write_unscaled, DCOEFFS=dc_mode)
    tiles = dict(DOT_MODE=dot_mode(x.dtype), BLOCK_M=cfg["block_m"], BLOCK_K=cfg["block_k"], SPLIT_K=split,
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg["tma"] and tma_usable(x, a_cat, r0, r1, family):
        from triton.tools.tensor_descriptor import TensorDescriptor

        bk = cfg["block_k"]
        x_desc = TensorDescriptor.from_tensor(x, [cfg["block_m"], bk])
        p0_desc = TensorDescriptor.from_tensor(a_cat, [r0, bk])
        p1_desc = TensorDescriptor.from_tensor(a_cat[r0:], [r1, bk]) if r1 else p0_desc
        _launch(_shrink_tma_kernel, grid,
                x_desc, p0_desc, p1_desc, coeffs, u, z, dc, part,
                M, K, rows_per_sample, float(scale),
                coeffs.stride(0), u.stride(0), z.stride(0), dc.stride(0), **common, **tiles)
    else:
        _launch(_shrink_kernel, grid,
                x, a_cat, coeffs, u, z, dc, part,
                M, K, rows_per_sample, float(scale),
                x.stride(0), a_cat.stride(0), coeffs.stride(0), u.stride(0), z.stride(0), dc.stride(0),
                **common, **tiles)
    if split > 1:
        _launch(_shrink_finish_kernel, (_cdiv(M, SHRINK_FINISH_BLOCK_M),),
                part, coeffs, u, z, dc,
                M, rows_per_sample, float(scale),
                coeffs.stride(0), u.stride(0), z.stride(0), dc.stride(0),
                **common, BLOCK_M=SHRINK_FINISH_BLOCK_M, SPLIT_K=split, num_warps=4)
    if dcoeffs:
        return None, z, dc
    return (u if write_unscaled else None), z


def expand(x: Optional[torch.Tensor], weight: Optional[torch.Tensor], z: torch.Tensor, b_cat: torch.Tensor,
           bias: Optional[torch.Tensor] = None, base: Optional[torch.Tensor] = None, *, weight_layout: str = "out_in",
           out: Optional[torch.Tensor] = None, config: Optional[dict] = None, family: Optional[str] = None):
    """``y = x weight^T + z b_cat (+ bias) (+ base)`` as one GEMM over the extended reduction [in | R].

    Args:
        x: (M, in) or None (delta-only: y = z b_cat [+ bias] [+ base]). All tensors in one dtype (float32 /
            bfloat16 / float16; not checked against each other).
        weight: (out, in) frozen weight (``weight_layout="out_in"``, forward) or (in, out) read as is
            (``weight_layout="in_out"``: backward K2 passes weight (out_layer, in_layer) to compute dy weight).
        z: (M, R) low-rank activations; b_cat: (R, out) packed basis.
        bias: (out,) or None; base: (M, out) or None, added in the epilogue.
        out: (M, out) destination (may alias ``base``); allocated when None.
        config: tile dict overriding the table's entry: ``expand`` keyed (in = K, out), or for
            ``weight_layout="in_out"`` with x (backward K2, x = dy) ``expand_dx`` keyed by the layer's own
            (in = out, out = K); delta-only (x None) ``expand`` keyed (out, out).

    Returns:
        y (M, out) in z.dtype (``out`` itself when given).
    """
    _check(z, "z", 2)
    _check(b_cat, "b_cat", 2)
    M, R = z.shape
    nout = b_cat.shape[1]
    if b_cat.shape[0] != R:
        raise ValueError(f"z has {R} columns but b_cat has {b_cat.shape[0]} rows")
    if R > MAX_FUSED_R:
        raise ValueError(f"R = {R} > {MAX_FUSED_R}: use the cuBLAS route (see choose_route)")
    has_x = x is not None
    if has_x:
        _check(x, "x", 2)
        if weight is None:
            raise ValueError("x was given without weight")
        K = x.shape[1]
        if weight_layout == "out_in":
            want, stride_k, stride_n = (nout, K), weight.stride(1), weight.stride(0)
        elif weight_layout == "in_out":
            want, stride_k, stride_n = (K, nout), weight.stride(0), weight.stride(1)
        else:
            raise ValueError(f"weight_layout must be 'out_in' or 'in_out', got {weight_layout!r}")
        if tuple(weight.shape) != want:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {want}")
        if weight.numel() >= 2 ** 31:
            raise ValueError(f"weight has {weight.numel()} >= 2**31 elements; its in-tile offsets are 32-bit")
        if x.shape[0] != M:
            raise ValueError(f"x has {x.shape[0]} rows but z has {M}")
        x = _unit_cols(x)
    else:
        K, stride_k, stride_n = 0, 0, 0
        x = weight = z  # unused pointers
    z = _unit_cols(z)
    b_cat = _unit_cols(b_cat)
    if out is None:
        out = torch.empty((M, nout), device=z.device, dtype=z.dtype)
    elif out.stride(-1) != 1 or tuple(out.shape) != (M, nout):
        raise ValueError(f"out must be ({M}, {nout}) with unit column stride")
    has_base = base is not None
    if has_base:
        if tuple(base.shape) != (M, nout):
            raise ValueError(f"base must be ({M}, {nout}), got {tuple(base.shape)}")
        base = _unit_cols(base)
    base_t = base if has_base else out
    if bias is not None:  # the epilogue reads it as a dense vector
        if tuple(bias.shape) != (nout,):
            raise ValueError(f"bias must be ({nout},), got {tuple(bias.shape)}")
        bias = bias.contiguous()
    family = _family(z, family)
    if has_x and weight_layout == "in_out":  # backward K2: this call's out is the layer's in
        cfg = kernel_config("expand_dx", nout, K, R, z.dtype, family, config)
    else:
        cfg = kernel_config("expand", K if has_x else nout, nout, R, z.dtype, family, config)
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    operands = [z, b_cat] + ([x, weight] if has_x else [])
    if (cfg["tma"] and max(bm, bn, bk) <= 256 and _tma_device(z, family) and not traced(*operands)
            and all(map(_tma_aligned, operands))):
        from triton.tools.tensor_descriptor import TensorDescriptor

        z_desc = TensorDescriptor.from_tensor(z, [bm, bk])
        b_desc = TensorDescriptor.from_tensor(b_cat, [bk, bn])
        if has_x:
            x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
            w_desc = TensorDescriptor.from_tensor(weight, [bk, bn] if weight_layout == "in_out" else [bn, bk])
        else:
            x_desc, w_desc = z_desc, b_desc  # unused
        num_progs = num_sms(z.device)
        _launch(_expand_tma_kernel, (num_progs,),
                x_desc, w_desc, z_desc, b_desc, bias if bias is not None else out, base_t, out,
                M, nout, K, R, num_progs,
                base_t.stride(0), out.stride(0),
                W1_KN=weight_layout == "in_out", HAS_X1=has_x, HAS_BIAS=bias is not None, HAS_BASE=has_base,
                DOT_MODE=dot_mode(z.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["group_m"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return out
    grid = (_cdiv(M, cfg["block_m"]) * _cdiv(nout, cfg["block_n"]),)
    _launch(_expand_kernel, grid,
            x, weight, z, b_cat, bias if bias is not None else out, base_t, out,
            M, nout, K, R,
            x.stride(0), stride_k, stride_n, z.stride(0), b_cat.stride(0), base_t.stride(0), out.stride(0),
            HAS_X1=has_x, HAS_BIAS=bias is not None, HAS_BASE=has_base, DOT_MODE=dot_mode(z.dtype),
            BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], GROUP_M=cfg["group_m"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def grad_basis(dz_scaled: torch.Tensor, x: torch.Tensor, z: torch.Tensor, dy: torch.Tensor, rank: int, *,
               config: Optional[dict] = None, family: Optional[str] = None):
    """Backward K3: the gradients of the basis, ``d a_cat = dz_scaled^T x`` and ``d b_cat = z^T dy``, returned in
    the basis' own layouts. One launch computes both products split over M into ``split_m`` slices of fp32
    partials; a second (``_grad_basis_finish_kernel``) adds the slices in slice order (deterministic), casts, and
    writes the two gradients in place.

    Args:
        dz_scaled, z: (M, R); x: (M, in); dy: (M, out); rank: r, the rank of one basis LoRA (R = N * r).

    Returns:
        (d_lora_a (N, in, r), d_lora_b (N, r, out)) in x.dtype, separate contiguous storages.
    """
    for t, name in ((dz_scaled, "dz_scaled"), (x, "x"), (z, "z"), (dy, "dy")):
        _check(t, name, 2)
    M, R = z.shape
    K, nout = x.shape[1], dy.shape[1]
    if tuple(dz_scaled.shape) != (M, R) or x.shape[0] != M or dy.shape[0] != M:
        raise ValueError("grad_basis: dz_scaled, z (M, R), x (M, in) and dy (M, out) must share M")
    if rank < 1 or R % rank:
        raise ValueError(f"grad_basis: R = {R} columns are not a whole number of rank-{rank} LoRAs")
    tensors = [_unit_cols(t) for t in (dz_scaled, x, z, dy)]
    dz_scaled, x, z, dy = tensors
    cfg = kernel_config("grad_basis", K, nout, R, x.dtype, _family(x, family), config)
    r0, r1 = r_chunks(R)
    split = cfg["split_m"]
    bm, bn = cfg["block_m"], cfg["block_n"]
    if split * (K + nout) * (r0 + r1) >= 2 ** 31:
        raise ValueError(f"grad_basis: {split} slices x ({K} + {nout}) x {r0 + r1} partials overflow 32-bit offsets")
    rows_per_split = _cdiv(_cdiv(M, split), bm) * bm
    part = torch.empty((split, K + nout, r0 + r1), device=x.device, dtype=torch.float32)
    grid = (_cdiv(K, bn) + _cdiv(nout, bn), split)
    _launch(_grad_basis_kernel, grid,
            dz_scaled, x, z, dy, part,
            M, K, nout, rows_per_split,
            dz_scaled.stride(0), x.stride(0), z.stride(0), dy.stride(0),
            R=R, R0=r0, R1=r1, DOT_MODE=dot_mode(x.dtype), BLOCK_M=bm, BLOCK_N=bn,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    d_lora_a = torch.empty((R // rank, K, rank), device=x.device, dtype=x.dtype)
    d_lora_b = torch.empty((R // rank, rank, nout), device=x.device, dtype=x.dtype)
    block_rows = max(1, triton.next_power_of_2(FINISH_ELEMENTS // (r0 + r1) + 1) // 2)  # power of two
    _launch(_grad_basis_finish_kernel, (_cdiv(K + nout, block_rows),),
            part, d_lora_a, d_lora_b, K, nout,
            SPLIT=split, RANK=rank, R=R, R0=r0, R1=r1, BLOCK_ROWS=block_rows, num_warps=4)
    return d_lora_a, d_lora_b


# --------------------------------------------------------------------------------------- forward and backward
def _scaling(coeffs: torch.Tensor, rows_per_sample: int, rank: int, scale: float) -> torch.Tensor:
    """(M, R) fp32 per-row column scaling for the cuBLAS route."""
    s = (coeffs.float() * scale).repeat_interleave(rank, dim=1)
    return s.repeat_interleave(rows_per_sample, dim=0)


def _unscaled_product(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a @ b_t`` for the cuBLAS route's unscaled products (u = x A_cat^T, dZ = dy B_cat^T): in fp32 for fp16 inputs,
    as the fused kernels accumulate and keep them (an unscaled product may pass fp16's 65504 where the scaled z, y
    and d coeffs fit), else in the inputs' dtype (bf16 has fp32's range)."""
    if a.dtype == torch.float16:
        return a.float() @ b_t.float()
    return a @ b_t


def forward(x, weight, bias, base, lora_a, lora_b, coeffs, scale, rows_per_sample, *, family=None):
    """The triton_fwd op body: (y (M, out), u (M, R), z (M, R)) in x's dtype (u in fp32 for fp16 x:
    ``saved_u_dtype``, on every route); see lorweb_fast.ops for the contract.

    x (M, in), weight (out, in) or None, bias (out,) or None, base (M, out) or None, lora_a (N, in, r),
    lora_b (N, r, out), all in x's dtype; coeffs (B, N) fp32 with M = B * rows_per_sample."""
    n, k, r = lora_a.shape
    nout, R = lora_b.shape[2], n * r
    family = _family(x, family)
    route = choose_route(k, nout, R, x.dtype, rows_per_sample, family, rank=r)
    a_cat, b_cat = pack_basis(lora_a, lora_b)
    if route == "cublas":
        u = _unscaled_product(x, a_cat.t())  # (M, R), saved_u_dtype
        z = (u.float() * _scaling(coeffs, rows_per_sample, r, scale)).to(x.dtype)
    else:
        u, z = shrink(x, a_cat, coeffs, scale, rows_per_sample, r, out_features=nout, family=family)
    if route == "fused":
        y = expand(x if weight is not None else None, weight, z, b_cat, bias=bias, base=base, family=family)
        return y, u, z
    y = torch.addmm(bias, z, b_cat) if bias is not None else z @ b_cat
    if base is not None:
        y = y.add_(base)
    if weight is not None:
        y = y.addmm_(x, weight.t())
    return y, u, z


def backward(dy, x, weight, lora_a, lora_b, coeffs, u, z, scale, rows_per_sample, need_dx=True, need_dbasis=True, *,
             family=None):
    """The triton_bwd op body: (dx (M, in), d_lora_a (N, in, r), d_lora_b (N, r, out), d_coeffs (B, N) fp32).

    K1 (shrink kernel on dy): dZ * scaling and dcoeffs partials from the saved u; K2 (expand kernel):
    dx = dy weight + (dZ*scaling) a_cat; K3 (grad_basis): d a_cat, d b_cat. The cuBLAS route does the same products
    with torch. All reductions run in a fixed order. K2 runs only if ``need_dx`` and K3 only if ``need_dbasis``; what
    is skipped comes back as an empty (0,) tensor. dy (M, out); u, z (M, R) from ``forward``; the rest as there."""
    n, k, r = lora_a.shape
    nout, R = lora_b.shape[2], n * r
    family = _family(x, family)
    route = choose_route(k, nout, R, x.dtype, rows_per_sample, family, rank=r)
    a_cat, b_cat = pack_basis(lora_a, lora_b)
    batch = coeffs.shape[0]
    if route == "cublas":
        dz = _unscaled_product(dy, b_cat.t()).float()
        dz_scaled = (dz * _scaling(coeffs, rows_per_sample, r, scale)).to(x.dtype)
        dc_parts = (u.float() * dz).view(-1, n, r).sum(2) * scale
    else:
        _, dz_scaled, dc_parts = shrink(dy, b_cat, coeffs, scale, rows_per_sample, r, u_in=u, out_features=k,
                                        family=family)
    # the partials of one sample are consecutive rows, as many for every sample
    d_coeffs = dc_parts.view(batch, dc_parts.shape[0] // max(batch, 1), n).sum(1)
    dx, d_lora_a, d_lora_b = x.new_empty(0), lora_a.new_empty(0), lora_b.new_empty(0)
    if route == "fused":
        if need_dx:
            dx = expand(dy if weight is not None else None, weight, dz_scaled, a_cat, weight_layout="in_out",
                        family=family)
        if need_dbasis:
            d_lora_a, d_lora_b = grad_basis(dz_scaled, x, z, dy, r, family=family)
    else:
        if need_dx:
            dx = dz_scaled @ a_cat
            if weight is not None:
                dx = dx.addmm_(dy, weight)
        if need_dbasis:
            d_lora_a, d_lora_b = unpack_basis_grads(dz_scaled.t() @ x, z.t() @ dy, n)
    return dx, d_lora_a, d_lora_b, d_coeffs
