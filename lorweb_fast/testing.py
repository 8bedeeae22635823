"""Helpers for checking fast paths against the float64 reference, with tolerances derived from the dtype.

Error model. The reference evaluates the same inputs (the low-precision values, upcast exactly) in float64. A fast
path differs from it only by roundings: each time an intermediate is stored in the working dtype it gains a relative
error of at most the unit roundoff eps/2 (we count eps per store, a factor 2 of margin for the comparison itself), and
fp32 accumulation of a length-K sum adds at most K * eps(fp32). Every intermediate of this computation is a
multilinear function of the inputs, so its magnitude is bounded by the same function evaluated on the absolute values
of the inputs ("ref_abs"). Hence, to first order,

    |fast - ref| <= (ROUNDINGS * eps(dtype) + K * eps(fp32)) * ref_abs

where ROUNDINGS counts the sequential stores in the working dtype along the longest chain of the op (for the torch
backend: the column scaling, u = x A, z = u * s, z B, x W^T and the final sum: 6; the fused kernels store fewer) and
K is the longest chain of accumulated terms. Gradients use the same bound with ref_abs taken from the reference
backward on |inputs| and |grad_output|.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import reference

#: Sequential roundings to the working dtype along the longest chain of any backend (see module docstring).
ROUNDINGS = 6


def dtype_eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def tolerance(dtype: torch.dtype, depth: int) -> float:
    """Relative-to-ref_abs bound for a result stored in ``dtype`` whose dot products have length <= ``depth``."""
    return ROUNDINGS * dtype_eps(dtype) + depth * dtype_eps(torch.float32)


def assert_within_bound(name: str, got: torch.Tensor, ref: torch.Tensor, ref_abs: torch.Tensor, dtype: torch.dtype,
                        depth: int) -> None:
    """Raise AssertionError when |got - ref| > tolerance(dtype, depth) * ref_abs anywhere."""
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite values")
    err = (got.double() - ref).abs()
    bound = tolerance(dtype, depth) * ref_abs + 1e-30
    ratio = (err / bound).max().item()
    if ratio > 1.0:
        idx = int((err / bound).argmax())
        raise AssertionError(f"{name} ({dtype}): error {err.flatten()[idx].item():.3e} exceeds the bound "
                             f"{bound.flatten()[idx].item():.3e} ({ratio:.2f}x) at flat index {idx}")


def random_problem(batch: int, seq: Optional[int], in_features: int, out_features: int, num_loras: int, rank: int,
                   dtype: torch.dtype, device="cpu", seed: int = 0, bias: bool = True) -> dict:
    """Random (never zero) inputs for a mixed-LoRA linear; coefficients differ per sample."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, in_features) if seq is None else (batch, seq, in_features)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype=dtype, device=device)

    coeffs = torch.softmax(torch.randn(batch, num_loras, generator=g) * 2, dim=-1).to(device)
    return {
        "x": rnd(*shape),
        "weight": rnd(out_features, in_features, scale=in_features ** -0.5),
        "bias": rnd(out_features) if bias else None,
        "lora_a": rnd(num_loras, in_features, rank, scale=in_features ** -0.5),
        "lora_b": rnd(num_loras, rank, out_features),
        "coeffs": coeffs,
        "scale": 0.75,
    }


def accumulation_depths(problem: dict) -> dict[str, int]:
    """Longest fp32 accumulation chain of the output and of each gradient (the K of the bound)."""
    k, n_out = problem["lora_a"].shape[1], problem["lora_b"].shape[2]
    num_loras, rank = problem["lora_a"].shape[0], problem["lora_a"].shape[2]
    rows = problem["x"].numel() // k
    return {"output": k + num_loras * rank, "x": n_out + num_loras * rank, "bias": rows, "lora_a": rows + n_out,
            "lora_b": rows + k, "coeffs": rows * rank + n_out}


def check_forward(name: str, y: torch.Tensor, problem: dict) -> None:
    """Check a ``lorweb_linear`` output ``y`` for ``problem`` against the float64 reference (no gradients)."""
    keys = ("x", "weight", "bias", "lora_a", "lora_b", "coeffs")
    with torch.no_grad():
        ref = reference.lorweb_linear(*(problem[k] for k in keys), problem["scale"])
        ref_abs = reference.lorweb_linear(*(None if problem[k] is None else problem[k].abs() for k in keys),
                                          abs(problem["scale"]))
    assert_within_bound(name, y, ref, ref_abs, y.dtype, accumulation_depths(problem)["output"])


def check_against_reference(fn, problem: dict, *, with_base: bool = True, grad_seed: int = 1) -> None:
    """Run ``fn(x, weight, bias, lora_a, lora_b, coeffs, scale)`` (or without weight/bias when ``with_base`` is False)
    and check the output and the gradients of x, lora_a, lora_b, coeffs (and bias) against the float64 reference."""
    names: Sequence[str] = ("x", "bias", "lora_a", "lora_b", "coeffs") if with_base else (
        "x", "lora_a", "lora_b", "coeffs")
    names = [n for n in names if problem.get(n) is not None]
    dtype = problem["x"].dtype
    leaves = {n: problem[n].detach().clone().requires_grad_(True) for n in names}
    args = {**problem, **leaves}

    def call(impl, a):
        if with_base:
            return impl(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["coeffs"], a["scale"])
        return impl(a["x"], a["lora_a"], a["lora_b"], a["coeffs"], a["scale"])

    out = call(fn, args)
    if out.dtype != dtype:
        raise AssertionError(f"output dtype {out.dtype} != input dtype {dtype}")
    g = torch.Generator().manual_seed(grad_seed)
    dy = torch.randn(out.shape, generator=g).to(dtype=dtype, device=out.device)
    out.backward(dy)

    ref_fn = reference.lorweb_linear if with_base else reference.mixed_lora_delta
    results = {}
    for use_abs in (False, True):
        r_leaves = {n: (problem[n].detach().double().abs() if use_abs else problem[n].detach().double())
                    .requires_grad_(True) for n in names}
        r_args = {k: (v.double().abs() if use_abs else v.double()) if isinstance(v, torch.Tensor) else v
                  for k, v in problem.items()}
        r_args.update(r_leaves)
        r_out = call(ref_fn, r_args)
        r_out.backward(dy.double().abs() if use_abs else dy.double())
        results[use_abs] = (r_out.detach(), {n: r_leaves[n].grad for n in names})
    (ref_out, ref_grads), (abs_out, abs_grads) = results[False], results[True]
    depth = accumulation_depths(problem)
    assert_within_bound("output", out.detach().cpu(), ref_out.cpu(), abs_out.cpu(), dtype, depth["output"])
    for n in names:
        assert_within_bound(f"grad {n}", leaves[n].grad.detach().cpu(), ref_grads[n].cpu(), abs_grads[n].cpu(),
                            dtype, depth[n])


def tiny_flux_config() -> dict:
    """Config of a tiny random FluxTransformer2DModel (1 double + 1 single block) for tests and the demo."""
    return dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
                axes_dims_rope=(4, 4, 8))


def odd_shape_cases() -> list[dict]:
    """36 shape combinations: N in {1, 3, 32} x r in {1, 4, 8} x {fp32, bf16} x {3-D, 2-D input}, with M, in and
    out never multiples of 16 and 1-3 samples carrying different coefficients."""
    cases = []
    i = 0
    for num_loras in (1, 3, 32):
        for rank in (1, 4, 8):
            for dtype in (torch.float32, torch.bfloat16):
                for seq in (7, None):
                    batch = 1 + i % 3
                    cases.append(dict(batch=batch, seq=seq if seq is None else seq + 2 * (i % 3),
                                      in_features=(17, 37, 45)[i % 3], out_features=(19, 29, 51)[(i // 3) % 3],
                                      num_loras=num_loras, rank=rank, dtype=dtype, seed=i))
                    i += 1
    return cases


def case_id(case: dict) -> str:
    seq = "" if case["seq"] is None else f"x{case['seq']}"
    return (f"B{case['batch']}{seq}-{case['in_features']}to{case['out_features']}-N{case['num_loras']}"
            f"r{case['rank']}-{str(case['dtype']).replace('torch.', '')}")


# ------------------------------------------------------------------------------------ tiny FLUX.1-Kontext assets
def inject_random_lorweb(transformer: torch.nn.Module, *, seed: int = 1) -> None:
    """Inject a small LoRWeB basis (N=3, r=2, key_dim=8, query_dim=24: the tiny CLIP's cat-aa'b query) into a tiny
    transformer, with a non-zero B and spread-out keys so that different analogies give visibly different outputs."""
    from .model import LoRWeBConfig, inject_lorweb, lorweb_layers

    torch.manual_seed(seed)
    inject_lorweb(transformer, LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=24))
    with torch.no_grad():
        for layer in lorweb_layers(transformer).values():
            layer.lora_B.normal_(0, 0.5)
            layer.lora_keys.normal_(0, 3.0)


def random_analogy(seed: int):
    """(a, a', b) PIL images for tests: a random 32 px picture, its mirror image, and a random 40 px picture."""
    import random

    from . import demo

    rng = random.Random(seed)
    a, b = demo._random_picture(rng, 32), demo._random_picture(rng, 40)
    return a, demo._flip(a), b


def build_tiny_lorweb_assets(root):
    """``root/pipe`` (tiny Kontext pipeline), ``root/clip`` (tiny CLIP) and ``root/lorweb.safetensors`` (an
    official-format checkpoint of ``inject_random_lorweb``, its encoder recorded as ``root/clip``); returns root."""
    from pathlib import Path

    from . import demo
    from .flux import load_kontext_pipeline
    from .model import save_lorweb_weights

    root = Path(root)
    demo.build_tiny_kontext_pipeline(root / "pipe")
    demo.build_tiny_clip(root / "clip")
    pipe = load_kontext_pipeline(root / "pipe")
    inject_random_lorweb(pipe.transformer)
    save_lorweb_weights(pipe.transformer, root / "lorweb.safetensors", metadata={"encoder": str(root / "clip")})
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's MASTER_PORT in tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
