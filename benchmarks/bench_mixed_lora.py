"""Side-by-side benchmark of the mixed-LoRA linear layer: forward and forward+backward time and peak memory.

Implementations (rows named by ``impl``):
  linear           nn.Linear alone: the floor
  official_einsum  the official LoRWeB formulation (METHOD.md), same dtype, coefficients given
  official_compile official_einsum under torch.compile (compiled afresh for every configuration)
  official_as_run  what the official training code executes: x cast to fp32, the einsum in fp32 on fp32 LoRA
                   parameters (no TF32), added to the bf16 base output, the coefficients recomputed from the query
                   in every forward (METHOD.md)
  peft_lora        peft's LoRA Linear with rank N*r (one adapter of the same capacity, no per-sample mixing)
  torch            lorweb_fast, torch backend
  torch_compile    the torch backend under torch.compile (compiled afresh for every configuration)
  cublas_concat    [x | z] . [W^T ; B_cat] as one cuBLAS GEMM on pre-built operands (forward only): the bound for a
                   fused base + expand GEMM
  cublas_composed  the composed path: u = x A_cat, z = u * scaling, y = addmm(bias, z, B_cat), y.addmm_(x, W^T)
  triton           lorweb_fast, Triton backend
  cuda             lorweb_fast, CUDA C++ backend
  shrink           the Triton shrink launcher alone (x -> u, z; forward only), with achieved TB/s and TFLOP/s
  expand           the Triton expand launcher alone (x, z -> y = x W^T + z B_cat + bias; forward only)
An implementation that cannot run here is recorded as skipped, with the reason. Before an implementation is timed
its output (and every gradient: on the full M=8192 problem on a GPU, else on at most 512 rows) is checked against the
float64 reference (stricter than an fp32 one).

Timing. On a GPU, ``median_ms`` is device time without host overhead: a ``torch.cuda._sleep`` enqueued first keeps
the GPU busy while the host enqueues the calls back to back, with a CUDA event between consecutive calls; the median
of those per-call times is reported. ``eager_ms`` is the median wall time of one call followed by a synchronize (what
a host-bound small-M call really costs). Warm-up calls are discarded; inputs are random (never zero) and rotated
through a pool larger than the L2 cache; every ratio in a record comes from that one run. On CPU both are wall times.

On a GPU it runs the FLUX.1-Kontext layer shapes (plus the 2-D norm layers at M = batch); without one it runs a
small CPU default (about a minute on 2 cores) whose results are labelled CPU. Results go to benchmarks/results/: a
JSON record (device, clocks, versions, date, commit), a markdown table, a PNG plot and (on a GPU, or with --profile)
a per-kernel torch.profiler table of one forward+backward at the target shape.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import lorweb_fast as lf
from lorweb_fast import ops
from lorweb_fast.testing import check_against_reference, check_forward, random_problem

IMPLS = ("linear", "official_einsum", "official_compile", "official_as_run", "peft_lora", "torch", "torch_compile",
         "cublas_concat", "cublas_composed", "triton", "cuda", "shrink", "expand")
FORWARD_ONLY = ("cublas_concat", "shrink", "expand")
#: rows that call the Triton launchers directly (power-of-two rank, N*r <= MAX_FUSED_R); the ``triton`` backend
#: itself routes other ranks and N*r to cuBLAS (ops.choose_route)
TRITON_ROWS = ("shrink", "expand")
#: the launchers' largest N*r when lorweb_fast.kernels cannot be imported (no recent Triton; see ``max_fused_r``)
FALLBACK_MAX_FUSED_R = 256
COMPILED = ("torch_compile", "official_compile")
MODES = ("fwd", "fwd_bwd")
GPU_LAYER_SHAPES = ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072))
GPU_M = (2048, 8192, 8704, 15360, 16384, 24576)
GPU_NORM_SHAPES = ((3072, 9216), (3072, 18432))  # 2-D inputs (batch, 3072): M = batch
GPU_NORM_BATCHES = (1, 6)
TARGET = dict(M=8192, in_features=3072, out_features=3072)
QUERY = {"gpu": (2304, 128), "cpu": (48, 16)}  # (query_dim, key_dim) of the coefficient projection
GPU_RANK_SWEEP = (16, 64, 128, 256)  # N*r at 3072->3072, M=8192, with r=4
CPU_LAYER_SHAPES = ((256, 256), (256, 1024), (1024, 256))
CPU_M = (128, 512)
CPU_RANK_SWEEP = (16, 64)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Extra cost of the mixture over a frozen linear layer at 3072x3072 with N*r = 128 (METHOD.md).
FLOP_FLOOR = {"fwd": 1 + 128 * 2 / 3072, "fwd_bwd": 1.125}


# ------------------------------------------------------------------------------------------------- configs
def build_configs(args, on_gpu: bool) -> list[dict]:
    grid = on_gpu or args.full_grid
    shapes = GPU_LAYER_SHAPES if grid else CPU_LAYER_SHAPES
    ms = args.m or (GPU_M if grid else CPU_M)
    sweep = GPU_RANK_SWEEP if grid else CPU_RANK_SWEEP
    if args.shapes:
        shapes = tuple(args.shapes)
    configs = [dict(M=m, in_features=i, out_features=o, N=args.num_loras, r=args.rank, two_d=False)
               for (i, o) in shapes for m in ms]
    if grid and not args.shapes and not args.m:  # the 2-D norm layers, one row per sample
        configs += [dict(M=b, in_features=i, out_features=o, N=args.num_loras, r=args.rank, two_d=True)
                    for (i, o) in GPU_NORM_SHAPES for b in GPU_NORM_BATCHES]
    if not args.no_rank_sweep:
        i, o = shapes[0]
        m = ms[min(1, len(ms) - 1)]
        for total in sweep:
            if total != args.num_loras * args.rank:
                configs.append(dict(M=m, in_features=i, out_features=o, N=total // args.rank, r=args.rank,
                                    two_d=False))
    if grid:  # most important first, so that a --total-budget-s cut keeps them: the target, then the METHOD.md M
        def priority(c):
            if is_target(c, args):
                return 0
            return 1 if c["two_d"] or c["M"] in (8192, 8704, 15360) else 2
        configs.sort(key=priority)  # stable: the listed order within each priority
    return configs


def is_target(cfg: dict, args) -> bool:
    """The target configuration of METHOD.md: M=8192, 3072->3072, 3-D input, at the run's N*r."""
    return (all(cfg[k] == v for k, v in TARGET.items()) and not cfg.get("two_d", False)
            and cfg["N"] * cfg["r"] == args.num_loras * args.rank)


def samples_for(m: int, two_d: bool = False) -> tuple[int, int | None]:
    """(batch, seq) with batch * seq == m: 2 samples with different coefficients when m is even; seq None for 2-D."""
    if two_d:
        return m, None
    return (2, m // 2) if m % 2 == 0 else (1, m)


def make_problem(cfg: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """random_problem plus an analogy query, a query projection and keys; ``coeffs`` are the coefficients they give
    (fp32), so that official_as_run (which recomputes them) and every other row compute the same layer."""
    batch, seq = samples_for(cfg["M"], cfg.get("two_d", False))
    p = random_problem(batch, seq, cfg["in_features"], cfg["out_features"], cfg["N"], cfg["r"], dtype,
                       device=device, seed=cfg["M"] + cfg["N"])
    query_dim, key_dim = QUERY["gpu" if device.type == "cuda" else "cpu"]
    for seed in range(cfg["M"] + 1, cfg["M"] + 101):  # first seed whose samples get clearly different mixtures
        g = torch.Generator().manual_seed(seed)
        p["query"] = torch.randn(batch, query_dim, generator=g).to(device)
        # logits of std ~2, like random_problem's softmax(randn * 2)
        p["to_q"] = (torch.randn(key_dim, query_dim, generator=g) * 2 * query_dim ** -0.5).to(device)
        p["keys"] = torch.randn(cfg["N"], key_dim, generator=g).to(device)
        with torch.no_grad():
            p["coeffs"] = ops.compute_coefficients(p["query"], p["to_q"], p["keys"])
        if batch == 1 or cfg["N"] == 1 or (p["coeffs"] - p["coeffs"][:1]).abs().amax() > 0.3:
            break
    return p


# --------------------------------------------------------------------------------------------- implementations
def _einsum_delta(x, lora_a, coeffs, lora_b, scale):
    eq = "bsi,nir,bn,nro->bso" if x.dim() == 3 else "bi,nir,bn,nro->bo"
    return torch.einsum(eq, x, lora_a, coeffs, lora_b) * scale


def official_einsum(x, weight, bias, lora_a, lora_b, coeffs, scale):
    return F.linear(x, weight, bias) + _einsum_delta(x, lora_a, coeffs.to(x.dtype), lora_b, scale)


def official_as_run(x, weight, bias, lora_a32, lora_b32, coeffs32, scale):
    """METHOD.md: x cast to fp32, the einsum in fp32 on the fp32 LoRA parameters, rounded to the layer dtype and added
    to the base output, in that order as the official forward (toolkit/network_mixins.py)."""
    delta = _einsum_delta(x.float(), lora_a32.float(), coeffs32.float(), lora_b32.float(), scale)
    return F.linear(x, weight, bias) + delta.to(x.dtype)


def _triton_launchers():
    """(pack_basis, shrink, expand) from lorweb_fast.kernels.mixed_lora, or a reason why they are missing."""
    try:
        import importlib

        mod = importlib.import_module("lorweb_fast.kernels.mixed_lora")
    except Exception as exc:
        return None, f"lorweb_fast.kernels.mixed_lora is not importable ({type(exc).__name__}: {exc})"
    missing = [n for n in ("pack_basis", "shrink", "expand") if not callable(getattr(mod, n, None))]
    if missing:
        return None, (f"lorweb_fast.kernels.mixed_lora has no {', '.join(missing)} (the launcher API "
                      "pack_basis/shrink/expand is not in this checkout)")
    return (mod.pack_basis, mod.shrink, mod.expand), None


class Impl:
    """fn(x, weight, bias, lora_a, lora_b, coeffs, scale) -> y, for one implementation.

    official_as_run recomputes the coefficients from ``self.query_args`` = (query, to_q, keys) when they are set
    (timing, forward check) and otherwise uses the given coeffs (gradient check). The forward-only rows cache their
    pre-built operands per input buffer, so that only the kernel itself is timed."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype):
        self.name, self.device, self.dtype = name, device, dtype
        self.skip_reason = None
        self._compiled = None
        self._cache = {}
        self.query_args = None
        self.launchers = None
        if name in ("triton", "cuda"):
            self.skip_reason = ops._unavailable_reason(name, device)
        elif name in TRITON_ROWS:
            self.skip_reason = ops._unavailable_reason("triton", device)
            if self.skip_reason is None and device.type != "cuda":
                self.skip_reason = "the Triton interpreter on CPU says nothing about kernel speed"
            if self.skip_reason is None:
                self.launchers, self.skip_reason = _triton_launchers()
        elif name == "peft_lora":
            if importlib.util.find_spec("peft") is None:
                self.skip_reason = "peft is not installed"
        elif name in COMPILED and device.type == "cpu" and not os.environ.get("LORWEB_BENCH_COMPILE_CPU"):
            self.skip_reason = ("skipped on CPU: inductor's C++ compile of every shape would exceed the one-minute "
                                "CPU budget (set LORWEB_BENCH_COMPILE_CPU=1 to include it)")

    def new_configuration(self) -> None:
        """Forget compiled graphs and cached operands: each configuration is compiled afresh (no recompiles)."""
        self._compiled = None
        self._cache.clear()

    def clear_operands(self) -> None:
        self._cache.clear()

    def _compile(self, fn):
        if self._compiled is None:
            self._compiled = torch.compile(fn, dynamic=False)
        return self._compiled

    def _cached(self, key, build):
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = build()
        return self._cache[key]

    def __call__(self, x, weight, bias, lora_a, lora_b, coeffs, scale, peft_layer=None):
        name = self.name
        if name == "linear":
            return F.linear(x, weight, bias)
        if name == "official_einsum":
            return official_einsum(x, weight, bias, lora_a, lora_b, coeffs, scale)
        if name == "official_compile":
            return self._compile(official_einsum)(x, weight, bias, lora_a, lora_b, coeffs, scale)
        if name == "official_as_run":
            if self.query_args is not None:
                coeffs = ops.compute_coefficients(*self.query_args)  # every forward, fp32
            return official_as_run(x, weight, bias, lora_a, lora_b, coeffs, scale)
        if name == "peft_lora":
            return peft_layer(x)
        if name == "torch_compile":
            return self._compile(lambda *a: lf.lorweb_linear(*a, backend="torch"))(
                x, weight, bias, lora_a, lora_b, coeffs, scale)
        if name in ("cublas_concat", "cublas_composed", "shrink", "expand"):
            return self._low_level(x, weight, bias, lora_a, lora_b, coeffs, scale)
        return lf.lorweb_linear(x, weight, bias, lora_a, lora_b, coeffs, scale, backend=self.name)

    def _low_level(self, x, weight, bias, lora_a, lora_b, coeffs, scale):
        rows_per_sample = 1 if x.dim() == 2 else x.shape[1]
        x2d = x.reshape(-1, x.shape[-1])
        r = lora_a.shape[2]
        out_shape = (*x.shape[:-1], lora_b.shape[2])

        def scaled_z():  # (M, R) in x.dtype, computed in fp32
            a_cat, _ = ops.concat_basis(lora_a, lora_b)
            scaling = ops.column_scaling(coeffs, r, scale).repeat_interleave(rows_per_sample, dim=0)
            return ((x2d.float() @ a_cat.float()) * scaling).to(x.dtype)

        key = (x.data_ptr(), weight.data_ptr(), lora_a.data_ptr(), lora_b.data_ptr(), coeffs.data_ptr())
        if self.name == "cublas_concat":
            xz, wb = self._cached(key, lambda: (torch.cat([x2d, scaled_z()], dim=1), torch.cat(
                [weight.t(), ops.concat_basis(lora_a, lora_b)[1]], dim=0).contiguous()))
            y = torch.mm(xz, wb) if bias is None else torch.addmm(bias, xz, wb)
            return y.view(out_shape)
        if self.name == "cublas_composed":
            a_cat, b_cat = ops.concat_basis(lora_a, lora_b)
            scaling = ops.column_scaling(coeffs, r, scale).to(x.dtype).repeat_interleave(rows_per_sample, dim=0)
            z = (x2d @ a_cat) * scaling
            y = torch.mm(z, b_cat) if bias is None else torch.addmm(bias, z, b_cat)
            return y.addmm_(x2d, weight.t()).view(out_shape)
        pack_basis, shrink, expand = self.launchers
        a_cat, b_cat = self._cached(("basis", lora_a.data_ptr(), lora_b.data_ptr()), lambda: pack_basis(lora_a,
                                                                                                        lora_b))
        if self.name == "shrink":
            # out_features: the tile table is keyed on the layer (in, out), as the layer's own forward looks it up
            return shrink(x2d, a_cat, coeffs.float(), float(scale), rows_per_sample, r,
                          out_features=lora_b.shape[2])[1]  # z (M, R)
        z = self._cached(key, scaled_z)
        return expand(x2d, weight, z, b_cat, bias=bias).view(out_shape)

    def work(self, problem: dict) -> tuple[float, float] | None:
        """(FLOPs, minimum bytes moved) of one forward call of the single-kernel rows, else None."""
        x, w, a = problem["x"], problem["weight"], problem["lora_a"]
        m, k, out, big_r, e = x.numel() // x.shape[-1], x.shape[-1], w.shape[0], a.shape[0] * a.shape[2], \
            x.element_size()
        if self.name == "shrink":  # x and a_cat read, z written in x's dtype, u in the dtype the forward saves it in
            from lorweb_fast.kernels import mixed_lora  # importable: the shrink row runs only then

            u_bytes = torch.empty(0, dtype=mixed_lora.saved_u_dtype(x.dtype)).element_size()
            return 2.0 * m * k * big_r, float(e * (m * k + big_r * k + m * big_r) + u_bytes * m * big_r)
        if self.name in ("expand", "cublas_concat"):
            return 2.0 * m * (k + big_r) * out, float(e * (m * (k + big_r) + (k + big_r) * out + m * out))
        if self.name == "linear":
            return 2.0 * m * k * out, float(e * (m * k + k * out + m * out))
        return None


def make_peft_layer(problem: dict, sample: int = 0):
    """peft LoRA Linear of rank N*r holding the basis with sample ``sample``'s mixture folded into lora_B."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    weight, bias, a, b = problem["weight"], problem["bias"], problem["lora_a"], problem["lora_b"]
    n, k, r = a.shape
    base = torch.nn.Linear(k, weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
        if bias is not None:
            base.bias.copy_(bias)
    base.requires_grad_(False)
    cfg = LoraConfig(r=n * r, lora_alpha=n * r, target_modules=["base"])
    layer = PeftLoraLinear(base, adapter_name="default", config=cfg, r=n * r, lora_alpha=n * r)
    layer.to(device=weight.device, dtype=weight.dtype)
    scaling = ops.column_scaling(problem["coeffs"][sample], r, problem["scale"])  # (R,)
    a_cat, b_cat = ops.concat_basis(a, b)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a_cat.T)
        layer.lora_B["default"].weight.copy_((b_cat.float() * scaling[:, None]).T.to(b.dtype))
    return layer


# --------------------------------------------------------------------------------------------------- checking
GRAD_CHECK_FULL_M = 8192  # on a GPU, gradients are checked on the whole problem at this M (fused rows)


def check_impl(impl: Impl, problem: dict, mode: str) -> None:
    """Raise AssertionError unless ``impl`` matches the float64 reference: the forward, and for fwd_bwd every
    gradient (on the whole problem when M == 8192 on a GPU for the lorweb_fast rows, else on at most 512 rows)."""
    if impl.name == "linear":
        return
    p = dict(problem)
    peft_layer = None
    if impl.name == "peft_lora":  # peft cannot mix per sample: check it with one mixture shared by all samples
        p["coeffs"] = p["coeffs"][:1].expand_as(p["coeffs"]).contiguous()
        peft_layer = make_peft_layer(p)
    if impl.name == "official_as_run":
        impl.query_args = (p["query"], p["to_q"], p["keys"])
    try:
        with torch.no_grad():
            y = impl(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"], peft_layer)
        if impl.name == "shrink":
            check_shrink(y, p)
        else:
            check_forward(f"{impl.name} output", y, p)
        impl.query_args = None  # gradient check: official_as_run takes the coeffs argument, so it gets a gradient
        if mode == "fwd_bwd" and impl.name not in ("peft_lora",) + FORWARD_ONLY:
            x = p["x"]
            full = (x.device.type == "cuda" and x.numel() // x.shape[-1] == GRAD_CHECK_FULL_M
                    and impl.name in ("torch", "triton", "cuda"))
            if x.dim() == 3 and not full:
                batch, seq = x.shape[:2]
                rows = max(1, min(seq, 512 // batch))
                p = {**p, "x": x[:, :rows].contiguous()}
            check_against_reference(lambda *a: impl(*a), p)
    finally:
        impl.query_args = None
        impl.clear_operands()  # no operand cached from the check leaks into the timing


def check_shrink(z: torch.Tensor, p: dict) -> None:
    """The shrink's z (M, R) against x A_cat * scaling in float64 (bound: dtype rounding over an in-long dot)."""
    from lorweb_fast.testing import tolerance

    x = p["x"].reshape(-1, p["x"].shape[-1]).double()
    a_cat, _ = ops.concat_basis(p["lora_a"].double(), p["lora_b"].double())
    rows_per_sample = 1 if p["x"].dim() == 2 else p["x"].shape[1]
    scaling = ops.column_scaling(p["coeffs"].double(), p["lora_a"].shape[2], p["scale"]).repeat_interleave(
        rows_per_sample, dim=0)
    ref = (x @ a_cat) * scaling
    bound = tolerance(z.dtype, x.shape[1]) * ((x.abs() @ a_cat.abs()) * scaling.abs()) + 1e-30
    err = (z.double() - ref).abs()
    if not bool((err <= bound).all()):
        raise AssertionError(f"shrink output: max error {err.max().item():.3e} exceeds the rounding bound")


# ---------------------------------------------------------------------------------------------------- timing
class Timer:
    """Per-call times after discarded warm-up calls, with inputs rotated through a pool larger than the L2 cache.

    ``measure`` returns (device ms, eager ms). On a GPU the device time excludes host overhead: a
    ``torch.cuda._sleep`` long enough to cover the host's enqueueing of the timed calls is enqueued first, then the
    calls back to back with a CUDA event between consecutive calls; the median of the per-call event intervals is
    the device time. The GPU must not catch up with the host meanwhile (the launch queue holds about a thousand
    launches: a call of many small kernels fills it, and the host then waits for the sleep to end, after which the
    intervals measure the host): when the sleep has already ended once a group of calls is enqueued, the group is
    timed again in halves behind a longer sleep; a single call that still outruns its sleep is host-bound, and
    ``host_bound`` says so (its interval then includes host time). The eager time is the median wall time of one call
    followed by a synchronize. On CPU both are the median wall time of one call. ``run`` returns the device time
    alone."""

    _cycles_per_ms = None

    def __init__(self, device: torch.device, warmup: int, reps: int, budget_s: float):
        self.device, self.warmup, self.reps, self.budget_s = device, warmup, reps, budget_s
        #: whether the last ``measure`` on a GPU had a call that outran its sleep (its device time includes host time)
        self.host_bound = False

    def run(self, fn, n_inputs: int) -> float:
        return self.measure(fn, n_inputs)[0]

    @classmethod
    def cycles_per_ms(cls) -> float:
        """GPU clock cycles per millisecond of torch.cuda._sleep, measured once."""
        if cls._cycles_per_ms is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1000)
            start.record()
            torch.cuda._sleep(20_000_000)
            end.record()
            end.synchronize()
            cls._cycles_per_ms = 20_000_000 / max(start.elapsed_time(end), 1e-3)
        return cls._cycles_per_ms

    def measure(self, fn, n_inputs: int) -> tuple[float, float]:
        cuda = self.device.type == "cuda"
        self.host_bound = False
        for i in range(self.warmup):  # discarded
            fn(i % n_inputs)
        if cuda:
            torch.cuda.synchronize()
        eager = []
        start_all = time.perf_counter()
        for i in range(self.reps):
            t0 = time.perf_counter()
            fn(i % n_inputs)
            if cuda:
                torch.cuda.synchronize()
            eager.append((time.perf_counter() - t0) * 1e3)
            if i >= 4 and time.perf_counter() - start_all > self.budget_s / 2:
                break
        eager_ms = statistics.median(eager)
        if not cuda:
            return eager_ms, eager_ms
        reps = len(eager)
        # Host time to enqueue `reps` calls, measured while the GPU is held by a sleep (so nothing blocks on it).
        torch.cuda._sleep(int(self.cycles_per_ms() * 50))
        t0 = time.perf_counter()
        for i in range(min(reps, 5)):
            fn(i % n_inputs)
        enqueue_ms = (time.perf_counter() - t0) * 1e3 / min(reps, 5)
        torch.cuda.synchronize()
        times, self.host_bound = self._device_intervals(fn, n_inputs, reps, enqueue_ms)
        return statistics.median(times), eager_ms

    def _device_intervals(self, fn, n_inputs: int, reps: int, enqueue_ms: float) -> tuple[list, bool]:
        """(per-call device ms of ``reps`` calls, whether a single call outran its sleep). Calls are enqueued in
        groups behind a sleep of 1.5x their estimated enqueue time (at least 2 ms, at most 2 s); a group whose sleep
        had ended before its last call was enqueued is discarded and timed again in halves behind twice the
        margin."""
        times, host_bound, first, group, margin = [], False, 0, reps, 1.5
        while first < reps:
            n = min(group, reps - first)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
            torch.cuda._sleep(int(self.cycles_per_ms() * min(2.0 + margin * enqueue_ms * n, 2000.0)))
            events[0].record()
            for k in range(n):
                fn((first + k) % n_inputs)
                events[k + 1].record()
            caught_up = events[0].query()  # the sleep had ended: the GPU may have waited for the host
            events[-1].synchronize()
            if caught_up and n > 1:
                group, margin = max(1, n // 2), margin * 2
                continue
            host_bound = host_bound or caught_up
            times += [events[k].elapsed_time(events[k + 1]) for k in range(n)]
            first += n
        return times, host_bound


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20))
    return 32 * 2 ** 20


def measure(impl: Impl, problem: dict, mode: str, timer: Timer) -> dict:
    """{"median_ms" (device), "eager_ms", "peak_mem_mb" (above the inputs)} for one implementation and mode."""
    step, n_inputs = make_step(impl, problem, mode)
    ms, eager_ms = timer.measure(step, n_inputs)
    host_bound = timer.host_bound
    peak = None
    device = problem["x"].device
    if device.type == "cuda":
        step.release()  # the gradients of the timed calls, which step(0) frees and allocates again
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(0)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    return dict(median_ms=ms, eager_ms=eager_ms, peak_mem_mb=peak, host_bound=host_bound)


def make_step(impl: Impl, problem: dict, mode: str):
    """(step(i), number of rotated inputs): one forward (no grad) or forward+backward of ``impl`` on input i."""
    device = problem["x"].device
    x0 = problem["x"]
    n_inputs = max(1, min(8, math.ceil(2 * l2_bytes(device) / (x0.numel() * x0.element_size()))))
    xs = [x0] + [torch.randn_like(x0) for _ in range(n_inputs - 1)]
    training = mode == "fwd_bwd"
    leaves = {}
    trainable = impl.name not in ("linear", "peft_lora")
    if impl.name == "official_as_run":  # fp32 masters of every LoRWeB parameter, coefficients from the query
        for name in ("lora_a", "lora_b"):
            leaves[name] = problem[name].detach().float().requires_grad_(training)
        query_leaves = [problem["to_q"].detach().clone().requires_grad_(training),
                        problem["keys"].detach().clone().requires_grad_(training)]
        impl.query_args = (problem["query"], *query_leaves)
        leaves["to_q"], leaves["keys"] = query_leaves
    elif training:
        for name in ("lora_a", "lora_b", "coeffs"):
            leaves[name] = problem[name].detach().clone().requires_grad_(trainable)
    if training:
        xs = [x.requires_grad_(True) for x in xs]
    args = {**problem, **leaves}
    peft_layer = make_peft_layer(problem) if impl.name == "peft_lora" else None
    if peft_layer is not None and training:
        for p in (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight):
            p.requires_grad_(True)
    out_shape = (*x0.shape[:-1], problem["weight"].shape[0])
    dy = torch.randn(out_shape, device=device, dtype=x0.dtype)
    grads = [t for t in leaves.values() if t.requires_grad]
    if peft_layer is not None and training:  # cleared every step too (else they accumulate: one more add)
        grads += [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight]

    def call(x):
        return impl(x, args["weight"], args["bias"], args["lora_a"], args["lora_b"], args["coeffs"], args["scale"],
                    peft_layer)

    def step(i):
        x = xs[i]
        if training:
            x.grad = None
            for t in grads:
                t.grad = None
            call(x).backward(dy)
        else:
            with torch.no_grad():
                call(x)

    def release():
        """Free every gradient a step allocates, so that a memory measurement around one step counts them."""
        for t in xs + grads:
            t.grad = None

    step.release = release
    if impl.name in ("cublas_concat", "expand"):  # rows timed on pre-built operands: built (and cached) for every
        with torch.no_grad():                      # rotated input now, never inside a warm-up short of the pool
            for x in xs:
                call(x)
    return step, n_inputs


def profile_averages(step, device: torch.device, warmup: int = 3):
    """torch.profiler's per-name averages (``key_averages()``) of one ``step(0)`` after ``warmup`` unprofiled calls;
    CUDA kernels too on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(warmup):
        step(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        step(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages()


def profile_sort_key(device: torch.device) -> str:
    return "device_time_total" if device.type == "cuda" else "cpu_time_total"


def cuda_context_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a sticky CUDA error (an illegal memory access, a device-side assert): every later CUDA
    call of the process fails with it, so the run cannot go on."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    text = str(exc)
    return (accelerator_error is not None and isinstance(exc, accelerator_error)) or "CUDA error" in text \
        or "illegal memory access" in text


def profile_table(impls: list[Impl], problem: dict, path: Path, failed: Optional[dict] = None) -> None:
    """Per-kernel torch.profiler table of one forward+backward (forward for the forward-only rows) per row;
    ``failed`` ({impl name: error}) names the rows that failed in this configuration: not profiled. A row that
    fails only here is noted in the table, and the others are profiled."""
    device = problem["x"].device
    x = problem["x"]
    parts = [f"torch.profiler, one call after warm-up; M={x.numel() // x.shape[-1]}, "
             f"{x.shape[-1]}->{problem['weight'].shape[0]}, N={problem['lora_a'].shape[0]}, "
             f"r={problem['lora_a'].shape[2]}, {str(x.dtype).replace('torch.', '')}, {device_name(device)}\n"]
    for impl in impls:
        if impl.skip_reason:
            parts.append(f"== {impl.name}: skipped: {impl.skip_reason}\n")
            continue
        if impl.name in (failed or ()):
            parts.append(f"== {impl.name}: not profiled: its row failed ({failed[impl.name]})\n")
            continue
        mode = "fwd" if impl.name in FORWARD_ONLY else "fwd_bwd"
        try:
            step, _ = make_step(impl, problem, mode)
            table = profile_averages(step, device).table(sort_by=profile_sort_key(device), row_limit=20)
        except Exception as exc:  # a row that only fails here: the other tables and the run go on
            if cuda_context_lost(exc):
                raise
            parts.append(f"== {impl.name} ({mode}): profiling failed: {type(exc).__name__}: {exc}\n")
            continue
        finally:
            impl.clear_operands()
            impl.query_args = None
        parts.append(f"== {impl.name} ({mode})\n" + table + "\n")
    path.write_text("\n".join(parts))


# ---------------------------------------------------------------------------------------------------- records
def git_commit() -> str:
    """HEAD's short hash, with "+modified" when tracked files differ from it (a copied working tree whose git
    metadata is older than its files: on the lent GPU machine the record once named a commit three behind).
    ``LORWEB_COMMIT`` in the environment, when set, is taken as given (pass it from the checkout that sent the run)."""
    if os.environ.get("LORWEB_COMMIT"):
        return os.environ["LORWEB_COMMIT"][:12] + " (LORWEB_COMMIT)"
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except Exception:
        return head + "+unverified"
    return head + ("+modified" if dirty else "")


def safe_file_stem(text: str) -> str:
    """``text`` with every character outside [A-Za-z0-9._-] replaced by "_" (a commit such as "abc+modified" or
    "x (LORWEB_COMMIT)"): the device tool brings back only files whose names use those characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def installed_triton_version():
    """triton's version, or None when it is not installed."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_clocks(device: torch.device) -> dict:
    """Clocks, driver and power limit from nvidia-smi (when present) plus torch's device properties."""
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    info = {"sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2 ** 30, 1),
            "l2_bytes": getattr(props, "L2_cache_size", None)}
    fields = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader",
                              f"--id={device.index or 0}"], capture_output=True, text=True, timeout=20, check=True)
        info.update(zip(fields.split(","), [v.strip() for v in out.stdout.strip().split(",")]))
    except Exception as exc:
        info["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
    return info


def timed(row: dict) -> bool:
    """Whether a result row holds a measurement (not skipped, not failed)."""
    return not row.get("skipped") and not row.get("failed")


def failed_rows(record: dict) -> list[str]:
    """``"<impl> <mode> M=.. in->out N*r=..: <error>"`` for every row whose check or timing raised."""
    return [f"{r['impl']} {r['mode']} M={r['M']} {r['in']}->{r['out']} N*r={r['N'] * r['r']}: {r['error']}"
            for r in record["results"] if r.get("failed")]


def ratio_table(results: list[dict]) -> str:
    keyed = {}
    for r in results:
        keyed[(r["mode"], r["M"], r["in"], r["out"], r["N"], r["r"], r["impl"])] = r
    lines = ["| mode | M | in→out | N·r | impl | device ms | eager ms | × linear | × official_einsum | "
             "× official_as_run | TFLOP/s | TB/s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(r, ref):
        return f"{r['median_ms'] / ref['median_ms']:.3f}" if ref and timed(ref) else "-"

    for r in results:
        if not timed(r):
            continue
        key = (r["mode"], r["M"], r["in"], r["out"], r["N"], r["r"])
        peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        tflops = f"{r['tflops']:.1f}" if r.get("tflops") else "-"
        tbps = f"{r['tbps']:.2f}" if r.get("tbps") else "-"
        device_ms = f"{r['median_ms']:.4f}" + (" (host-bound)" if r.get("host_bound") else "")
        lines.append(f"| {r['mode']} | {r['M']} | {r['in']}→{r['out']} | {r['N'] * r['r']} | {r['impl']} | "
                     f"{device_ms} | {r['eager_ms']:.4f} | {ratio(r, keyed.get((*key, 'linear')))} | "
                     f"{ratio(r, keyed.get((*key, 'official_einsum')))} | "
                     f"{ratio(r, keyed.get((*key, 'official_as_run')))} | {tflops} | {tbps} | {peak} |")
    return "\n".join(lines)


def write_markdown(path: Path, record: dict) -> None:
    skipped = list(dict.fromkeys(f"`{r['impl']}` {r['mode']}: {r['skip_reason']}" for r in record["results"]
                                 if r.get("skipped")))
    text = [f"# Mixed-LoRA layer benchmark ({record['label']})", "",
            f"- device: {record['device']}", f"- torch {record['torch']}, triton {record['triton']}, "
            f"CUDA {record['cuda']}", f"- date: {record['date']}", f"- commit: {record['commit']}",
            f"- clocks: {record.get('clocks') or '-'}",
            f"- dtype: {record['dtype']}; TF32 {'on' if record.get('tf32') else 'off'}; timing: {record['timing']}",
            ""]
    if not record.get("complete", True):
        text += ["**Partial record: written after each row; the run has not finished (or was stopped).**",
                 ""]
    if record.get("stopped"):
        text += [f"**Stopped: {record['stopped']}** (the rows after it and the configurations listed as not run "
                 "were not measured)", ""]
    budget = [c for c in record.get("not_run") or [] if "reason" not in c]
    stopped = [c for c in record.get("not_run") or [] if "reason" in c]
    if budget:
        text += [f"Not run (total budget spent): {budget}", ""]
    if stopped:
        text += [f"Not run (the run stopped): {stopped}", ""]
    text += [f"FLOP floors at 3072×3072, N·r = 128: forward {FLOP_FLOOR['fwd']:.3f}× linear, forward+backward "
             f"{FLOP_FLOOR['fwd_bwd']:.3f}× linear (METHOD.md).", ""]
    if record["label"] == "CPU":
        text += ["**CPU run: these numbers say nothing about GPU speed.**", ""]
    if skipped:
        text += ["Skipped:", ""] + [f"- {line}" for line in skipped] + [""]
    failed = failed_rows(record)
    if failed:
        text += ["**Failed** (the check or the timing raised; the other rows ran):", ""] + \
            [f"- {line}" for line in failed] + [""]
    text.append(ratio_table(record["results"]))
    path.write_text("\n".join(text) + "\n")


def write_plot(path: Path, record: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in record["results"] if timed(r)]
    base = {(r["mode"], r["M"], r["in"], r["out"], r["N"], r["r"]): r["median_ms"] for r in rows
            if r["impl"] == "linear"}
    nr = record["default_nr"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {impl: palette[i % len(palette)] for i, impl in enumerate(IMPLS)}
    shapes = sorted({(r["in"], r["out"]) for r in rows if r["N"] * r["r"] == nr})
    styles = dict(zip(shapes, ["-", "--", ":", "-."] * 4))
    for ax, mode in zip(axes[0], MODES):
        for impl in IMPLS:
            if impl == "linear":
                continue
            for shape in shapes:
                pts = sorted((r["M"], r["median_ms"] / base[(mode, r["M"], r["in"], r["out"], r["N"], r["r"])])
                             for r in rows if r["impl"] == impl and r["mode"] == mode and (r["in"], r["out"]) == shape
                             and r["N"] * r["r"] == nr and (mode, r["M"], *shape, r["N"], r["r"]) in base)
                if len(pts) >= 1:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[impl],
                            ls=styles[shape], label=f"{impl} {shape[0]}→{shape[1]}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(FLOP_FLOOR[mode], color="gray", ls="--", lw=0.8, label="FLOP floor (3072², N·r=128)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("time / nn.Linear")
        ax.set_title(f"{mode} ({record['dtype']}, N·r={nr})")
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{record['device']} — {record['date']} — {record['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------------------------------- main
def number_type(convert, ok, expected: str):
    """An argparse type: ``convert(text)`` (int or float) accepted when ``ok(value)``; else refused as "expected
    {expected}, got {text}" (argparse adds the option's name)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


#: a count of calls, rows, LoRAs, features; of discarded warm-up calls; a budget in seconds
positive_int = number_type(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = number_type(int, lambda v: v >= 0, "an integer >= 0")
seconds = number_type(float, lambda v: math.isfinite(v) and v >= 0, "a finite number of seconds >= 0")
#: rows split into two samples of half the rows (the tuner's --tokens, kernel_resources.py --m)
even_rows = number_type(int, lambda v: v >= 2 and v % 2 == 0, "an even number of rows >= 2 (two samples)")


def layer_shape(text: str) -> tuple[int, int]:
    """argparse type: a layer shape INxOUT of two integers > 0, as (in, out)."""
    parts = text.split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected INxOUT with both > 0, e.g. 3072x3072, got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations to run")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="fwd and/or fwd_bwd")
    p.add_argument("--m", nargs="+", type=positive_int, default=None,
                   help=f"token counts M (default GPU {GPU_M}, CPU {CPU_M})")
    p.add_argument("--shapes", nargs="+", type=layer_shape, default=None,
                   help="layer shapes as INxOUT, e.g. 3072x3072 (default: METHOD.md shapes on GPU, small on CPU)")
    p.add_argument("--num-loras", type=positive_int, default=32, help="N basis LoRAs (default 32)")
    p.add_argument("--rank", type=positive_int, default=4, help="rank r of each LoRA (default 4)")
    p.add_argument("--no-rank-sweep", action="store_true", help="skip the N*r sweep")
    p.add_argument("--warmup", type=nonnegative_int, default=None,
                   help="discarded warm-up calls (default GPU 10, CPU 2)")
    p.add_argument("--reps", type=positive_int, default=None, help="timed calls per row (default GPU 50, CPU 7)")
    p.add_argument("--budget-s", type=seconds, default=None,
                   help="stop timing a row after this many seconds (min 5 calls; default GPU 5, CPU 0.5)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where to write results")
    p.add_argument("--tag", default=None, help="file name stem (default: device_date_commit)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    p.add_argument("--full-grid", action="store_true",
                   help="the full GPU grid (METHOD.md shapes, extra M, 2-D norm layers, N*r sweep); default on GPU")
    p.add_argument("--compiled-rows", choices=("all", "target"), default="all",
                   help="where the torch.compile rows run: every configuration, or only the target one "
                        f"(M={TARGET['M']}, {TARGET['in_features']}->{TARGET['out_features']}, the default N*r); "
                        "they are compiled afresh per configuration")
    p.add_argument("--total-budget-s", type=seconds, default=None,
                   help="start no configuration that would end past this many seconds, judged by the longest one so "
                        "far (the first always runs; the record lists what was not run)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="write a per-kernel torch.profiler table of one forward+backward per row at the target "
                        "shape (M=8192, 3072->3072; the first configuration when the target is not in the run) "
                        "beside the record (default: on with a GPU, off on CPU)")
    args = p.parse_args(argv)
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            p.error(f"--device {args.device!r} is not a device (cuda, cuda:0 or cpu)")
        if device.type not in ("cuda", "cpu"):
            p.error(f"--device {args.device}: the benchmark runs on cuda or cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA GPU is visible")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    check_rank_options(p, args)
    return args


def max_fused_r() -> int:
    """The launchers' largest R (lorweb_fast.kernels.mixed_lora.MAX_FUSED_R)."""
    try:
        from lorweb_fast.kernels.mixed_lora import MAX_FUSED_R
    except ImportError:  # no (recent) Triton: --dry-run still lists the sweep
        return FALLBACK_MAX_FUSED_R
    return MAX_FUSED_R


def check_rank_options(parser, args) -> None:
    """Rank options that would only fail once the run is under way (on a GPU, minutes in): a rank the Triton rows
    cannot launch, an N*r above their maximum, a rank that does not divide the N*r sweep's totals (N = total // r
    would time another N*r, or N = 0)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fused = [i for i in args.impls if i in TRITON_ROWS] if device.startswith("cuda") else []  # skipped on CPU
    if fused and args.rank & (args.rank - 1):
        parser.error(f"--rank {args.rank}: the Triton rows ({', '.join(fused)}) need a power-of-two rank; pass "
                     "another --rank, or --impls without them")
    limit = max_fused_r()
    if fused and args.num_loras * args.rank > limit:
        parser.error(f"--num-loras x --rank = {args.num_loras * args.rank} is above the Triton kernels' maximum "
                     f"N*r of {limit} ({', '.join(fused)}); lower them, or pass --impls without those rows")
    totals = sorted(set(GPU_RANK_SWEEP) | set(CPU_RANK_SWEEP))
    if not args.no_rank_sweep and any(t % args.rank for t in totals):
        parser.error(f"--rank {args.rank} does not divide the N*r sweep's totals {totals}; pass --no-rank-sweep")


#: the TF32 switches of torch's fp32_precision API (torch >= 2.9) that ``tf32_off`` turns off: CUDA matmuls, cuDNN
#: convolutions and RNNs. The legacy ``allow_tf32`` flags are neither read nor written: reading them raises once a
#: process has used the new API (transformers' ``TrainingArguments(tf32=...)`` does), writing them mixes the two.
TF32_SWITCHES = tuple(switch for switch in (torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None),
                                             getattr(torch.backends.cudnn, "rnn", None))
                      if switch is not None and hasattr(switch, "fp32_precision"))


@contextlib.contextmanager
def tf32_off():
    """TF32 off for matmuls and cuDNN inside the block (official_as_run's fp32 einsum runs without TF32, METHOD.md),
    the previous settings restored on exit, also after an error."""
    before = [switch.fp32_precision for switch in TF32_SWITCHES]
    try:
        for switch in TF32_SWITCHES:
            switch.fp32_precision = "ieee"
        yield
    finally:
        for switch, precision in zip(TF32_SWITCHES, before):
            switch.fp32_precision = precision


def tf32_matmuls() -> bool:
    """Whether fp32 CUDA matmuls may run in TF32 now (``"none"`` inherits the process-wide precision)."""
    precision = torch.backends.cuda.matmul.fp32_precision
    if precision == "none":
        precision = torch.backends.fp32_precision
    return precision == "tf32"


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tf32_off():
        return run(args)


def run(args) -> dict:
    """The benchmark for parsed ``args``, with TF32 already turned off by ``main``."""
    from tqdm import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype]
    timer = Timer(device, args.warmup if args.warmup is not None else (10 if on_gpu else 2),
                  args.reps if args.reps is not None else (50 if on_gpu else 7),
                  args.budget_s if args.budget_s is not None else (5.0 if on_gpu else 0.5))
    impls = [Impl(name, device, dtype) for name in args.impls]
    configs = build_configs(args, on_gpu)
    results, not_run = [], []
    profile_cfg = next((c for c in configs if all(c[k] == v for k, v in TARGET.items()) and c["N"] * c["r"] == 128),
                       configs[0]) if (on_gpu if args.profile is None else args.profile) else None
    triton_version = installed_triton_version()
    commit = git_commit()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    timing = ("device time per call: events between back-to-back calls behind an enqueued torch.cuda._sleep "
              "(no host overhead), median; eager: wall time of call + synchronize, median" if on_gpu else
              "wall-clock per call, median")
    record = dict(label="GPU" if on_gpu else "CPU", device=device_name(device), torch=torch.__version__,
                  triton=triton_version, cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version() if on_gpu else None, clocks=device_clocks(device),
                  commit=commit, date=date, dtype=args.dtype, tf32=tf32_matmuls(),
                  timing=timing,
                  default_nr=args.num_loras * args.rank, checked_against_reference=not args.no_check,
                  compiled_rows=args.compiled_rows,
                  backend_status=lf.backend_status(), complete=False, not_run=not_run, results=results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if not on_gpu else "".join(c if c.isalnum() else "-" for c in device_name(device)).strip("-")
    stem = args.tag or safe_file_stem(f"mixed_lora_{slug.lower()}_{date[:10]}_{commit}")

    def write_record():  # after every configuration too, so that a run stopped from outside keeps what it measured
        (args.out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
        write_markdown(args.out_dir / f"{stem}.md", record)

    written = [".json", ".md"]
    # compiled rows last within a configuration: their compile time is the least predictable
    ordered = sorted(impls, key=lambda i: i.name in COMPILED)
    started = time.perf_counter()
    bar = tqdm(total=len(configs) * len(impls) * len(args.modes), desc="bench_mixed_lora", unit="row",
               disable=None)
    longest = 0.0  # seconds of the longest configuration so far: one that would not fit is not started
    lost = None  # a sticky CUDA error: the rest of the run is recorded as not run
    for cfg in configs:
        cfg_started = time.perf_counter()
        if lost is not None:
            not_run.append({**{k: cfg[k] for k in ("M", "in_features", "out_features", "N", "r")},
                            "reason": f"CUDA context lost ({lost})"})
            bar.update(len(impls) * len(args.modes))
            continue
        if results and args.total_budget_s is not None and cfg_started - started + longest > args.total_budget_s:
            not_run.append({k: cfg[k] for k in ("M", "in_features", "out_features", "N", "r")})
            bar.update(len(impls) * len(args.modes))
            continue
        compiled_here = args.compiled_rows == "all" or is_target(cfg, args)
        if compiled_here and any(i.name in COMPILED and not i.skip_reason for i in impls):
            torch._dynamo.reset()  # a fresh cache per configuration: never past the recompile limit
        for impl in impls:
            impl.new_configuration()
        problem = make_problem(cfg, dtype, device)
        failed_here = {}
        for mode in args.modes:
            for impl in ordered:
                if lost is not None:
                    bar.update(1)
                    continue
                row = dict(impl=impl.name, mode=mode, M=cfg["M"], **{"in": cfg["in_features"]},
                           out=cfg["out_features"], N=cfg["N"], r=cfg["r"], two_d=cfg["two_d"], dtype=args.dtype,
                           median_ms=None, eager_ms=None, peak_mem_mb=None)
                bar.set_postfix_str(f"{impl.name} {mode} M={cfg['M']} {cfg['in_features']}→{cfg['out_features']}")
                if impl.skip_reason:
                    row.update(skipped=True, skip_reason=impl.skip_reason)
                elif impl.name in COMPILED and not compiled_here:
                    row.update(skipped=True, skip_reason="compiled rows only at the target configuration "
                                                         "(--compiled-rows target)")
                elif mode == "fwd_bwd" and impl.name in FORWARD_ONLY:
                    row.update(skipped=True, skip_reason="forward-only row (one GEMM or kernel, no backward)")
                else:
                    try:
                        if not args.no_check:
                            check_impl(impl, problem, mode)
                        row.update(measure(impl, problem, mode, timer))
                        work = impl.work(problem) if mode == "fwd" else None
                        if work is not None:
                            row.update(tflops=work[0] / (row["median_ms"] * 1e-3) / 1e12,
                                       tbps=work[1] / (row["median_ms"] * 1e-3) / 1e12)
                    except Exception as exc:  # one row's failure (a check, a compile error) keeps the others
                        row.update(failed=True, median_ms=None, eager_ms=None,
                                   error=f"{type(exc).__name__}: {str(exc).strip()}"[:500])
                        print(f"bench_mixed_lora: {impl.name} {mode} failed: {row['error']}", file=sys.stderr)
                        failed_here[impl.name] = row["error"]
                        if cuda_context_lost(exc):  # every later CUDA call would fail with it: stop here
                            lost = f"after {impl.name} {mode} at M={cfg['M']} {cfg['in_features']}->" \
                                   f"{cfg['out_features']}"
                            record["stopped"] = f"CUDA context lost {lost}: {row['error']}"
                    finally:
                        impl.query_args = None
                results.append(row)
                write_record()  # after every row: a run stopped from outside keeps every row it finished
                bar.update(1)
        if profile_cfg is cfg and lost is None:  # while this configuration's compiled graphs are still cached
            try:
                profile_table(ordered, problem, args.out_dir / f"{stem}_profile.txt", failed_here)
                written.append("_profile.txt")
            except Exception as exc:  # the table is lost, not the run (unless the CUDA context is)
                error = f"{type(exc).__name__}: {exc}"[:600]
                if cuda_context_lost(exc):
                    lost = "while profiling"
                    record["stopped"] = f"CUDA context lost while profiling: {error}"
                else:
                    record["profile_error"] = error
                print(f"bench_mixed_lora: the profiler table failed: {error}", file=sys.stderr)
                write_record()
        del problem
        if on_gpu and lost is None:
            torch.cuda.empty_cache()
        longest = max(longest, time.perf_counter() - cfg_started)
    bar.close()
    record["complete"] = lost is None
    write_record()
    if write_plot(args.out_dir / f"{stem}.png", record):
        written.append(".png")
    print(ratio_table(results))
    print(f"\nwrote {args.out_dir / stem}: " + ", ".join(written), file=sys.stderr)
    return record


def unavailable_fused_backends(record: dict) -> list[str]:
    """``"<backend>: <reason>"`` for each fused backend (triton, cuda) whose rows a GPU run skipped because the
    backend could not run there: the record then lacks what it exists for."""
    if record.get("label") != "GPU":
        return []
    return list(dict.fromkeys(f"{r['impl']}: {r['skip_reason']}" for r in record["results"]
                              if r.get("skipped") and r["impl"] in ("triton", "cuda")
                              and "budget" not in r["skip_reason"]))


if __name__ == "__main__":
    final = main()
    missing, failed = unavailable_fused_backends(final), failed_rows(final)
    if missing:  # the record is written; the GPU scripts mark the step failed
        print("bench_mixed_lora: fused backends could not run on this GPU: " + "; ".join(missing), file=sys.stderr)
    if failed:
        print(f"bench_mixed_lora: {len(failed)} rows failed (recorded with their errors): " + "; ".join(failed),
              file=sys.stderr)
    if missing or failed:
        sys.exit(1)
