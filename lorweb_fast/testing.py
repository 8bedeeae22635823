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

That worst-case bound is guaranteed but loose: with random signs an entry is about sqrt(K) times smaller than its
ref_abs, so in bf16 it would let a 5 % error through. Two statistical checks follow. Rounding errors are independent
with zero mean, so the error of an entry is about

    eps * rss,    rss = sqrt(sum of the squares of the terms of its full expansion),

and rss is the same multilinear function evaluated on the squared inputs (each term squared), square-rooted.

- Entry by entry: ``|fast - ref| <= (RSS_ELEMENT * eps(dtype) + RSS_SIGMAS * sqrt(K) * eps(fp32)) * rss``. One
  rounded intermediate is shared by many entries (z = u * s is rounded once and feeds a whole output row), so the
  tail of max |error| / rss over thousands of entries reaches about 4.4 eps in bf16 (Triton kernels, odd-shape
  cases); RSS_ELEMENT = 8 catches local errors of about 10 % and more.
- Over the whole tensor (at least NORM_MIN_ENTRIES entries): ``||fast - ref|| <= (RSS_NORM * eps(dtype) +
  2 * sqrt(K) * eps(fp32)) * ||rss||``. The tails average out: the odd-shape cases stay below 1.1 eps in bf16 (Triton
  interpreter; 0.62 for the torch backend), while a 5 % error anywhere in a tensor gives about 6.4 eps.

Both statistical bounds add the rounding of the stored result itself, FINAL_ROUNDING * eps * |ref| (entry by entry;
FINAL_ROUNDING * eps * ||ref|| over the tensor, by the triangle inequality). That rounding is not a sum of independent
errors: it is one rounding of the value, at most half a unit in the last place of |ref|. With random signs |ref| is
about rss and the term adds about half an eps; with correlated terms (a gradient summed over rows of one broadcast
output gradient, a bias gradient of M equal terms) |ref| reaches sqrt(K) * rss, and without the term a correctly
rounded bf16 result of 300 equal terms (0.5 * sqrt(300) = 8.7 eps x rss) would exceed RSS_ELEMENT.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from . import reference
from .ops import lorweb_linear

#: Sequential roundings to the working dtype along the longest chain of any backend (see module docstring).
ROUNDINGS = 6


#: The statistical bounds in units of eps(dtype) (see module docstring): entry by entry, and over a whole tensor of at
#: least NORM_MIN_ENTRIES entries.
RSS_ELEMENT = 8.0
RSS_NORM = 2.5
NORM_MIN_ENTRIES = 32
#: standard deviations allowed for the fp32 accumulation term (sqrt(K) * eps(fp32) / sqrt(12) per entry)
RSS_SIGMAS = 6.0
#: the stored result's own rounding in the statistical bounds, in units of eps(dtype) x |ref| (half an ulp)
FINAL_ROUNDING = 0.5


def dtype_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype`` (``torch.finfo(dtype).eps``)."""
    return float(torch.finfo(dtype).eps)


def tolerance(dtype: torch.dtype, depth: int) -> float:
    """Relative-to-ref_abs bound for a result stored in ``dtype`` whose dot products have length <= ``depth``."""
    return ROUNDINGS * dtype_eps(dtype) + depth * dtype_eps(torch.float32)


def _assert_entries_within(name: str, got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype,
                           what: str, detail=lambda err, idx: "") -> torch.Tensor:
    """|got - ref| <= bound entry by entry, else AssertionError naming the worst entry (``detail(|got - ref|
    flattened, index)`` adds to the message); returns |got - ref|."""
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite values")
    # a negative or NaN bound (a signed ref_abs or scale), or a NaN in the reference, would turn the check off for
    # every entry (the largest ratio would be NaN or never above 1), not tighten it
    if not (bound >= 0).all():
        raise ValueError(f"{name}: {what} has negative or NaN entries; build ref_abs from |inputs| and |scale|")
    if not torch.isfinite(ref).all():
        raise ValueError(f"{name}: the reference has non-finite values")
    err = (got.double() - ref).abs()
    bound = bound + 1e-30
    ratio = (err / bound).max().item()
    if not ratio <= 1.0:
        idx, flat = int((err / bound).argmax()), err.flatten()
        raise AssertionError(f"{name} ({dtype}): error {flat[idx].item():.3e} exceeds {what} "
                             f"{bound.flatten()[idx].item():.3e} ({ratio:.2f}x{detail(flat, idx)}) at flat index {idx}")
    return err


def assert_within_bound(name: str, got: torch.Tensor, ref: torch.Tensor, ref_abs: torch.Tensor, dtype: torch.dtype,
                        depth: int) -> None:
    """Raise AssertionError when |got - ref| > tolerance(dtype, depth) * ref_abs anywhere."""
    _assert_entries_within(name, got, ref, tolerance(dtype, depth) * ref_abs, dtype, "the bound")


def rss_tolerance(dtype: torch.dtype, depth: int) -> float:
    """Relative-to-rss bound of one entry (statistical check) for a result in ``dtype`` with sums of length
    ``depth``."""
    return RSS_ELEMENT * dtype_eps(dtype) + RSS_SIGMAS * depth ** 0.5 * dtype_eps(torch.float32)


def norm_tolerance(dtype: torch.dtype, depth: int) -> float:
    """Relative-to-||rss|| bound of a whole tensor's error norm (statistical check)."""
    return RSS_NORM * dtype_eps(dtype) + 2.0 * depth ** 0.5 * dtype_eps(torch.float32)


def assert_within_rss_bound(name: str, got: torch.Tensor, ref: torch.Tensor, rss: torch.Tensor, dtype: torch.dtype,
                            depth: int) -> None:
    """Raise AssertionError when |got - ref| > rss_tolerance(dtype, depth) * rss + FINAL_ROUNDING * eps * |ref|
    anywhere, or (tensors of at least NORM_MIN_ENTRIES entries) ||got - ref|| > norm_tolerance(dtype, depth) *
    ||rss|| + FINAL_ROUNDING * eps * ||ref|| (``rss``: the root-sum-of-squares of each entry's terms; the last term
    is the stored result's own rounding; see module docstring)."""
    eps = dtype_eps(dtype)

    def in_eps(err, idx):
        return f"; {err[idx].item() / max(rss.flatten()[idx].item(), 1e-300) / eps:.1f} eps x rss"

    if not (rss >= 0).all():  # checked on rss itself: the rounding term added below could mask a negative entry
        raise ValueError(f"{name}: the statistical bound has negative or NaN entries; build rss from the squared "
                         f"inputs and scale")
    # a NaN or inf in ref is refused by _assert_entries_within as the reference's (not as this bound's)
    rounding = FINAL_ROUNDING * eps * ref.abs().nan_to_num(0.0)
    err = _assert_entries_within(name, got, ref, rss_tolerance(dtype, depth) * rss + rounding, dtype,
                                 "the statistical bound", in_eps)
    if err.numel() >= NORM_MIN_ENTRIES:
        norm, rss_norm = err.norm().item(), rss.norm().item()
        bound = norm_tolerance(dtype, depth) * rss_norm + FINAL_ROUNDING * eps * ref.norm().item()
        if not norm <= bound:
            raise AssertionError(f"{name} ({dtype}): error norm {norm:.3e} exceeds the statistical bound of the "
                                 f"whole tensor {bound:.3e} ({norm / max(rss_norm, 1e-300) / eps:.2f} eps x ||rss||)")


def random_problem(batch: int, seq: Optional[int], in_features: int, out_features: int, num_loras: int, rank: int,
                   dtype: torch.dtype, device="cpu", seed: int = 0, bias: bool = True) -> dict:
    """Random (never zero) inputs for a mixed-LoRA linear; coefficients differ per sample. Returns {"x": (B, in) or
    (B, seq, in), "weight": (out, in), "bias": (out,) or None, "lora_a": (N, in, r), "lora_b": (N, r, out)}, all in
    ``dtype`` on ``device``, plus "coeffs": (B, N) fp32 (signed, not normalised) and "scale": 0.75."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, in_features) if seq is None else (batch, seq, in_features)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype=dtype, device=device)

    # signed and not normalised (tanh / sum coefficients are): a kernel that took |c| or renormalised would show
    coeffs = (torch.randn(batch, num_loras, generator=g) * 0.5).to(device)
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
    return {"output": k + num_loras * rank, "x": n_out + num_loras * rank, "bias": rows, "weight": rows,
            "lora_a": rows + n_out, "lora_b": rows + k, "coeffs": rows * rank + n_out}


def check_forward(name: str, y: torch.Tensor, problem: dict) -> None:
    """Check a ``lorweb_linear`` output ``y`` for ``problem`` against the float64 reference (no gradients)."""
    keys = ("x", "weight", "bias", "lora_a", "lora_b", "coeffs")
    with torch.no_grad():
        ref = reference.lorweb_linear(*(problem[k] for k in keys), problem["scale"])
        ref_abs = reference.lorweb_linear(*(None if problem[k] is None else problem[k].abs() for k in keys),
                                          abs(problem["scale"]))
        rss = reference.lorweb_linear(*(None if problem[k] is None else problem[k].double() ** 2 for k in keys),
                                      problem["scale"] ** 2).sqrt()
    depth = accumulation_depths(problem)["output"]
    assert_within_bound(name, y, ref, ref_abs, y.dtype, depth)
    assert_within_rss_bound(name, y.cpu(), ref.cpu(), rss.cpu(), y.dtype, depth)


def check_against_reference(fn, problem: dict, *, with_base: bool = True, grad_seed: int = 1,
                            broadcast_dy: bool = False) -> None:
    """Run ``fn(x, weight, bias, lora_a, lora_b, coeffs, scale)`` (or without weight/bias when ``with_base`` is False)
    and check the output and the gradients of x, lora_a, lora_b, coeffs (and weight, bias) against the float64
    reference, each with the worst-case and the statistical bound (module docstring). ``broadcast_dy``: the output
    gradient is one random row expanded over the rows (row stride 0, as the gradient of a sum over tokens)."""
    names: Sequence[str] = ("x", "weight", "bias", "lora_a", "lora_b", "coeffs") if with_base else (
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
    if broadcast_dy:
        dy = dy[..., :1, :].expand(out.shape)
    out.backward(dy)

    ref_fn = reference.lorweb_linear if with_base else reference.mixed_lora_delta
    # the reference on the inputs, on |inputs| (worst-case magnitudes) and on inputs**2 (squared terms: rss**2)
    transforms = {"ref": lambda t: t, "abs": torch.abs, "sq": torch.square}
    scales = {"ref": problem["scale"], "abs": abs(problem["scale"]), "sq": problem["scale"] ** 2}
    results = {}
    for kind, f in transforms.items():
        r_leaves = {n: f(problem[n].detach().double()).requires_grad_(True) for n in names}
        r_args = {k: f(v.double()) if isinstance(v, torch.Tensor) else v for k, v in problem.items()}
        r_args.update(r_leaves, scale=scales[kind])
        r_out = call(ref_fn, r_args)
        r_out.backward(f(dy.double()))
        results[kind] = (r_out.detach().cpu(), {n: r_leaves[n].grad.cpu() for n in names})
    depth = accumulation_depths(problem)
    checks = [("output", out.detach().cpu(), "output", lambda r: r[0])]
    checks += [(f"grad {n}", leaves[n].grad.detach().cpu(), n, lambda r, n=n: r[1][n]) for n in names]
    for label, got, depth_key, pick in checks:
        ref, ref_abs, rss = pick(results["ref"]), pick(results["abs"]), pick(results["sq"]).sqrt()
        assert_within_bound(label, got, ref, ref_abs, dtype, depth[depth_key])
        assert_within_rss_bound(label, got, ref, rss, dtype, depth[depth_key])


def partial_gradients(problem: dict, needs: Sequence[bool], backend: str, dy: torch.Tensor, *,
                      two_d: bool = False) -> tuple[list, list]:
    """Run ``lorweb_linear`` forward and backward with only the inputs ``needs`` marks (x, lora_a, lora_b, coeffs)
    requiring grad. Returns (their gradients, None where not required; the output shapes of every fused backward op
    call, recorded as the op returned them). ``two_d`` takes the first position of each sample, (B, in)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class BackwardOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.outputs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.name() in ("lorweb_fast::triton_bwd", "lorweb_fast_cuda::bwd"):
                self.outputs.append([tuple(t.shape) for t in out])
            return out

    leaves = [problem[k].clone().requires_grad_(need) for k, need in zip(("x", "lora_a", "lora_b", "coeffs"), needs)]
    x = leaves[0][:, 0] if two_d else leaves[0]
    y = lorweb_linear(x, problem["weight"], problem["bias"], *leaves[1:], problem["scale"], backend=backend)
    recorder = BackwardOps()
    with recorder:
        y.backward(dy[:, 0] if two_d else dy)
    return [t.grad for t in leaves], recorder.outputs


def device_recording_generator(made: list) -> type:
    """A ``torch.Generator`` subclass to monkeypatch over ``torch.Generator``: each construction appends the
    ``torch.device`` it was asked for to ``made`` and gives a CPU generator (still a ``torch.Generator``), so a test
    can check that code seeds its generator on a GPU without one."""
    real = torch.Generator

    class DeviceRecordingGenerator(real):
        def __new__(cls, device="cpu"):
            made.append(torch.device(device))
            return real.__new__(cls)

        def __init__(self, device="cpu"):
            super().__init__()

    return DeviceRecordingGenerator


def tiny_flux_config() -> dict:
    """Config of a tiny random FluxTransformer2DModel (1 double + 1 single block, hidden 2 heads x 16 = 32,
    in_channels 8 = 2 VAE latent channels packed 2x2, text dims 24 (T5) / 20 (pooled CLIP)) for tests and the demo."""
    return dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
                axes_dims_rope=(4, 4, 8))


def tiny_flux_with_lorweb(seed: int = 0, b_std: float = 0.5) -> torch.nn.Module:
    """A ``tiny_flux_config`` FluxTransformer2DModel in eval mode with LoRWeB injected (N=3, r=2, key_dim=8,
    query_dim=12) and lora_B drawn from N(0, ``b_std``) (not zero, so the mixture changes the output)."""
    import diffusers

    from .model import LoRWeBConfig, inject_lorweb, lorweb_layers

    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**tiny_flux_config()).eval()
    inject_lorweb(model, LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=12))
    with torch.no_grad():
        for layer in lorweb_layers(model).values():
            layer.lora_B.normal_(0, b_std)
    return model


def run_cli_in_process(capsys, argv) -> tuple:
    """(exit status, stdout, stderr) of ``lorweb-fast <argv>`` run in-process, with pytest's ``capsys``."""
    from . import cli

    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def tiny_flux_inputs(batch: int = 2, seed: int = 0) -> dict:
    """Random inputs of one forward of the ``tiny_flux_config`` transformer: ``batch`` samples of 6 image and 4 text
    tokens (hidden_states (B, 6, 8), encoder_hidden_states (B, 4, 24), pooled_projections (B, 20), timestep (B,),
    guidance (B,) = 3.5, img_ids (6, 3), txt_ids (4, 3))."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 6, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 4, 24, generator=g),
                pooled_projections=torch.randn(batch, 20, generator=g), timestep=torch.rand(batch, generator=g),
                guidance=torch.full((batch,), 3.5), img_ids=torch.randn(6, 3, generator=g), txt_ids=torch.zeros(4, 3))


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


def spread_cases(cases: Optional[list] = None) -> list[dict]:
    """12 of ``odd_shape_cases()`` covering every (N, dtype, 2-D/3-D input) pair once, with r rotating through
    {1, 4, 8} and 1-3 samples: the subset for the slower paths (mixed_lora_delta, fp16)."""
    cases = odd_shape_cases() if cases is None else cases
    ranks, out = (1, 4, 8), []
    for n_idx, num_loras in enumerate((1, 3, 32)):
        for d_idx, dtype in enumerate((torch.float32, torch.bfloat16)):
            for s_idx, is_2d in enumerate((False, True)):
                rank = ranks[(n_idx + d_idx + s_idx) % 3]
                out += [c for c in cases if (c["num_loras"], c["rank"], c["dtype"], c["seq"] is None)
                        == (num_loras, rank, dtype, is_2d)]
    return out


def case_id(case: dict) -> str:
    """A pytest id for an ``odd_shape_cases`` entry, e.g. "B1x7-17to19-N1r1-float32" (x7: the sequence length;
    2-D cases have none)."""
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


def tiny_kontext_with_encoder(root, *, eval_mode: bool = False):
    """(a tiny in-memory FluxKontextPipeline with ``inject_random_lorweb``'s basis, a tiny CLIP ``AnalogyEncoder``
    saved under ``root/clip``), fp32, for the pipeline tests' module fixtures. Built in memory, its modules are in
    training mode (the text encoders' dropout on); ``eval_mode`` puts every one in eval mode, as a loaded pipeline."""
    from pathlib import Path

    import torch

    from . import demo
    from .flux import AnalogyEncoder

    demo.build_tiny_clip(Path(root) / "clip")
    pipe = demo.build_tiny_kontext_pipeline()
    inject_random_lorweb(pipe.transformer)
    if eval_mode:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
    return pipe, AnalogyEncoder(Path(root) / "clip")


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


def small_lorweb_sequential(seed: int = 0, layers: int = 4) -> torch.nn.Module:
    """``layers`` 8 -> 8 linears with LoRWeB (N=3, r=2, key_dim 4, query 6), a random non-zero basis and spread keys
    (different queries give clearly different coefficients), eval mode; drawn after ``torch.manual_seed(seed)``."""
    from .model import LoRWeBConfig, inject_lorweb, lorweb_layers

    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(layers)]).eval()
    inject_lorweb(model, LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=6, target_modules=r"\d"))
    with torch.no_grad():
        for layer in lorweb_layers(model).values():
            layer.lora_B.normal_()
            layer.lora_keys.normal_(0, 3.0)
    return model


def run_threads(jobs: dict, timeout: float = 60.0) -> tuple:
    """Run every ``jobs[name]()`` in a thread of that name (daemon threads, joined for at most ``timeout`` s each;
    an AssertionError when one hangs); returns ({name: result}, {name: exception})."""
    import threading

    results, errors = {}, {}

    def work(name, job):
        try:
            results[name] = job()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors[name] = exc

    threads = [threading.Thread(target=work, args=item, name=str(item[0]), daemon=True) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return results, errors


def generate_random_analogy(lp, seed: int, *, steps: int = 2, merge: str = "none", **kwargs):
    """b' (an array) of ``random_analogy(seed)`` by the LoRWeBKontextPipeline ``lp`` ("flip", ``steps`` denoising
    steps, the demo's text length, a generator seeded with ``seed``)."""
    from .demo import DEMO_MAX_SEQUENCE_LENGTH

    a, a_prime, b = random_analogy(seed)
    return lp(a, a_prime, b, "flip", num_inference_steps=steps, merge=merge, output_type="np",
              max_sequence_length=DEMO_MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(seed),
              **kwargs)[0]


def at_first_step(action):
    """A diffusers step callback (``callback_on_step_end``) that runs ``action()`` once, after the first denoising
    step."""
    def callback(pipe, step, timestep, callback_kwargs):
        if step == 0:
            action()
        return callback_kwargs
    return callback


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's MASTER_PORT in tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------ official image-processor reference
#: CLIP's normalisation (openai/clip-vit-large-patch14 preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def reference_clip_pixels(img, size: int) -> torch.Tensor:
    """The slow CLIPImageProcessor (transformers 4.56, as pinned by the official environment.yml): shortest side to
    ``size`` (bicubic, long side int(size * long / short)), centre crop size x size, /255, CLIP mean/std: a
    (1, 3, size, size) float32 tensor."""
    import numpy as np
    from PIL import Image

    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    im = img.convert("RGB").resize((nw, nh), Image.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    arr = np.asarray(im, dtype=np.float64)[top:top + size, left:left + size] / 255.0
    arr = (arr - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return torch.tensor(arr.transpose(2, 0, 1), dtype=torch.float32)[None]


def rewrite_safetensors(path, out, *, meta: Optional[dict] = None, tensors: Optional[dict] = None):
    """Copy the safetensors file ``path`` to ``out`` with metadata entries and tensors replaced or added (for
    bad-checkpoint tests); returns ``out``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    state = load_file(str(path))
    metadata.update(meta or {})
    state.update(tensors or {})
    save_file(state, str(out), metadata=metadata)
    return out


def official_style_checkpoint(path, *, n: int = 3, r: int = 2, key_dim: int = 8, query_dim: int = 12,
                              seed: int = 1) -> dict:
    """An official-style LoRWeB file for a (6 -> 5 -> 4) ``nn.Sequential`` of two linears: fp16 tensors under
    ``transformer.0`` / ``transformer.1`` (lora_A (n, in, r), lora_B (n, r, out), lora_keys (n, key_dim),
    att_lora_to_q.weight (key_dim, query_dim)), ai-toolkit metadata (BaseSDTrainProcess.save, toolkit/metadata.py
    get_meta_for_safetensors: JSON strings, format pt) and none of lorweb_fast's keys. Returns the tensors."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (i, o) in {"0": (6, 5), "1": (5, 4)}.items():
        state[f"transformer.{name}.lora_A"] = torch.randn(n, i, r, generator=g).half()
        state[f"transformer.{name}.lora_B"] = torch.randn(n, r, o, generator=g).half()
        state[f"transformer.{name}.lora_keys"] = torch.randn(n, key_dim, generator=g).half()
        state[f"transformer.{name}.att_lora_to_q.weight"] = torch.randn(key_dim, query_dim, generator=g).half()
    meta = {"name": "LoRWeB", "version": "1.0", "training_info": json.dumps({"step": 250, "epoch": 0}),
            "software": json.dumps({"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit",
                                    "version": "0.3.4"}), "ss_output_name": "LoRWeB", "format": "pt"}
    save_file(state, str(path), metadata=meta)
    return state


def tiny_lorweb_pair(config, seed: int = 0, *, key_std: Optional[float] = None) -> torch.nn.Module:
    """``nn.Sequential(Linear(6, 5), Linear(5, 4))`` in eval mode with LoRWeB layers injected by ``config`` (a
    ``LoRWeBConfig``) and a random non-zero basis (lora_B drawn from a normal, not the zero init); ``key_std``: the
    keys drawn again from N(0, key_std) (spread-out keys: coefficients far from uniform)."""
    from .model import inject_lorweb, lorweb_layers

    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)).eval()
    inject_lorweb(m, config)
    with torch.no_grad():
        for layer in lorweb_layers(m).values():
            layer.lora_B.normal_()
        for layer in lorweb_layers(m).values() if key_std is not None else ():
            layer.lora_keys.normal_(0, key_std)
    return m


#: the query width of the two-layer test model (``pair_config``, ``tiny_pair_model``, ``pair_query``)
PAIR_QUERY_DIM = 6


def pair_config(**over):
    """The ``LoRWeBConfig`` of the two-layer test model: 3 LoRAs of rank 2, keys of 4, queries of
    ``PAIR_QUERY_DIM``, every numbered submodule of an ``nn.Sequential`` adapted; ``over`` replaces fields."""
    from .model import LoRWeBConfig

    return LoRWeBConfig(**{"num_loras": 3, "rank": 2, "key_dim": 4, "query_dim": PAIR_QUERY_DIM,
                           "target_modules": r"\d", **over})


def tiny_pair_model(seed: int = 0, config=None) -> torch.nn.Module:
    """``tiny_lorweb_pair`` of ``config`` (default ``pair_config()``) with spread-out keys: two injected linear
    layers (6 -> 5 -> 4), a random non-zero basis, eval mode."""
    return tiny_lorweb_pair(pair_config() if config is None else config, seed, key_std=2.0)


def pair_query(b: int = 1, seed: int = 0, dim: int = PAIR_QUERY_DIM, dtype: torch.dtype = torch.float32):
    """(b, dim) random analogy queries (standard normal, ``seed``)."""
    return torch.randn(b, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


#: every per-module hook table of torch.nn.Module (forward, backward, state-dict hooks)
MODULE_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                      "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_state_dict_hooks",
                      "_state_dict_pre_hooks")
#: torch's module-global hook tables
GLOBAL_HOOK_TABLES = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks", "_global_module_registration_hooks",
                      "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")


def module_hook_count(*models: torch.nn.Module) -> int:
    """Every hook registered on the modules of ``models`` (``MODULE_HOOK_TABLES``) plus torch's global module hooks
    (``GLOBAL_HOOK_TABLES``): equal before and after a loop = no hook accumulates."""
    own = sum(len(getattr(m, t, None) or {}) for model in models for m in model.modules() for t in MODULE_HOOK_TABLES)
    return own + sum(len(getattr(torch.nn.modules.module, t, None) or {}) for t in GLOBAL_HOOK_TABLES)


def load_module_from_file(path, name: str):
    """The Python file ``path`` run as a fresh module named ``name`` (not put in ``sys.modules``): how tests import
    the scripts in ``benchmarks/``, which are not a package. A new module object on every call."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def module_from_package(home: str, **attrs) -> torch.nn.Module:
    """A Sequential holding one 2x2 Linear whose class claims to live in the package ``home`` (what
    ``training.quantization_kind`` looks at), with ``attrs`` set on the Sequential (e.g. ``is_quantized=True``)."""
    cls = type("Linear", (torch.nn.Linear,), {"__module__": home})
    module = torch.nn.Sequential(cls(2, 2))
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def random_rgb_image(rng, width: int, height: int):
    """A (height, width) RGB PIL image of uniform random pixels drawn from the numpy Generator ``rng``."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def analogy_sample(root, name: str, control_size, target_size, *, seed: int = 0, caption: Optional[str] = "edit",
                   ext: str = ".png"):
    """One sample of the official training layout in ``root``: ``control/<name><ext>`` and ``target/<name>.png`` of
    the given (width, height) sizes (random pixels) and the caption ``target/<name>.txt`` (none when ``caption`` is
    None); returns ``root``."""
    from pathlib import Path

    import numpy as np

    root = Path(root)
    rng = np.random.default_rng(seed)
    for sub in ("control", "target"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    random_rgb_image(rng, *control_size).save(root / "control" / f"{name}{ext}")
    random_rgb_image(rng, *target_size).save(root / "target" / f"{name}.png")
    if caption is not None:
        (root / "target" / f"{name}.txt").write_text(caption)
    return root


def smooth_rgb(rng, width: int, height: int, *, ramp: tuple = (40, 0)):
    """(height, width, 3) uint8: a random flat colour in [40, 200) plus a ramp rising by ``ramp[0]`` from left to
    right and by ``ramp[1]`` from top to bottom; smooth, so JPEG and resampling keep it close."""
    import numpy as np

    colour = rng.integers(40, 200, 3)
    gradient = np.linspace(0, ramp[0], width)[None, :, None] + np.linspace(0, ramp[1], height)[:, None, None]
    return np.broadcast_to(colour + gradient, (height, width, 3)).astype(np.uint8)


def relation252k_folder(root, spec: dict, *, seed: int, ramp: tuple = (40, 0), skipped_entries: bool = False) -> dict:
    """A tiny Relation252K-shaped folder, as NVlabs/LoRWeB preprocess_data.py ``Relation252KDataset`` walks it:
    ``<category>/Group1/labels.json`` (a list of img_name, edit_instruction, left/right descriptions) and side-by-side
    before|after PNGs of ``smooth_rgb`` halves, ``spec`` = {category: [(half width, height), ...]}.

    ``skipped_entries`` adds what the official loader skips: a labels entry without its image in every group and a
    folder without groups. Returns {image_id: (left, right) arrays} with image_id = "<category>_<img_name>"."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    halves = {}
    for category, sizes in spec.items():
        group = Path(root) / category / "Group1"
        group.mkdir(parents=True)
        labels = []
        for k, (w, h) in enumerate(sizes):
            name = f"img{k}.png"
            left, right = smooth_rgb(rng, w, h, ramp=ramp), smooth_rgb(rng, w, h, ramp=ramp)
            Image.fromarray(np.concatenate([left, right], axis=1)).save(group / name)
            halves[f"{category}_{name}"] = (left, right)
            labels.append({"img_name": name, "edit_instruction": f"{category} edit {k}",
                           "left_image_description": f"L{k}", "right_image_description": f"R{k}"})
        if skipped_entries:
            labels.append({"img_name": "missing.png", "edit_instruction": "x", "left_image_description": "",
                           "right_image_description": ""})
        (group / "labels.json").write_text(json.dumps(labels))
    if skipped_entries:
        (Path(root) / "not-a-category").mkdir()
    return halves


#: the small training run of the tests: 8 steps of batch 2 at lr 1e-2 in fp32, long edge 64, a 4 x rank-2 basis
SMALL_TRAINING = dict(steps=8, batch_size=2, learning_rate=1e-2, mixed_precision="no", long_edge=64,
                      resize="long-edge", num_loras=4, rank=2, key_dim=8, num_workers=0, progress=False)


def small_train_config(out, **over):
    """A valid ``SMALL_TRAINING`` ``TrainConfig`` writing to ``out`` (placeholder data/model/encoder names,
    checkpoints every 2 steps), with ``over`` replacing any field; for tests that never load the pipeline."""
    from .training import TrainConfig

    return TrainConfig(**{**SMALL_TRAINING, "data": "data", "out": str(out), "model": "m", "encoder": "e",
                          "checkpoint_every": 2, **over})


def tiny_lorweb_linear_model(**config):
    """``nn.Sequential(nn.Linear(4, 3))`` with its layer wrapped by LoRWeB (2 x rank-1 basis, key_dim 2, query 3;
    ``config`` replaces any ``LoRWeBConfig`` field)."""
    from torch import nn

    from .model import LoRWeBConfig, inject_lorweb

    model = nn.Sequential(nn.Linear(4, 3))
    values = dict(num_loras=2, rank=1, key_dim=2, query_dim=3, target_modules=r"\d")
    values.update(config)
    inject_lorweb(model, LoRWeBConfig(**values))
    return model


def fake_checkpoint(out, step: int, cfg, *, state=None, weights: bool = True):
    """``out/checkpoints/step-<step>`` laid out as the trainer writes it: ``lorweb.safetensors`` of
    ``tiny_lorweb_linear_model`` (unless ``weights`` is False) and ``trainer_state.pt`` (``state``, by default the
    step, an empty optimizer state and ``cfg``'s comparable fields). Returns the folder."""
    from pathlib import Path

    from .model import save_lorweb_weights
    from .training import _comparable_config

    folder = Path(out) / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    if weights:
        save_lorweb_weights(tiny_lorweb_linear_model(), folder / "lorweb.safetensors")
    if state is None:
        state = {"step": step, "optimizer": {"state": {}, "param_groups": []}, "config": _comparable_config(cfg)}
    torch.save(state, folder / "trainer_state.pt")
    return folder


def file_tree(root) -> list:
    """Every path under ``root`` (sorted, relative) with its bytes, None for folders: equal trees = nothing changed."""
    from pathlib import Path

    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in Path(root).rglob("*"))


def cli_usage_error(capsys, argv: list) -> str:
    """Run ``lorweb-fast <argv>`` in-process and return its one error line, asserting that it is a usage error: exit
    status 2 (from ``cli.main`` or argparse), exactly one non-empty line on stderr, no traceback. ``capsys`` is
    pytest's fixture."""
    from . import cli

    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tiny_training_assets(root, samples: int):
    """``root/pipe`` (tiny Kontext pipeline), ``root/clip`` (tiny CLIP) and ``root/data`` (``samples`` synthetic
    analogies in the grid layout: 2 x 2 control and target grids, captions in captions/), as ``tiny_train_config``
    reads them; returns root."""
    from pathlib import Path

    from . import demo

    root = Path(root)
    demo.build_tiny_kontext_pipeline(root / "pipe")
    demo.build_tiny_clip(root / "clip")
    demo.make_synthetic_analogies(root / "data", samples)
    return root


def tiny_train_config(assets, out, **over):
    """A ``SMALL_TRAINING`` ``TrainConfig`` that trains on ``tiny_training_assets(assets)`` into ``out``: the demo's
    text length, checkpoints every 4 steps, weights saved in fp32 (for bit-exact comparisons); ``over`` replaces any
    field."""
    from pathlib import Path

    from . import demo
    from .training import TrainConfig

    assets = Path(assets)
    return TrainConfig(**{**SMALL_TRAINING, "data": str(assets / "data"), "out": str(out),
                          "model": str(assets / "pipe"), "encoder": str(assets / "clip"),
                          "max_sequence_length": demo.DEMO_MAX_SEQUENCE_LENGTH, "checkpoint_every": 4,
                          "save_dtype": "fp32", **over})


def infer_input_files(root, *, widths=(32, 32, 32), red_step: int = 60):
    """What ``lorweb-fast infer``'s path checks accept, without any real model: ``a.png``, ``a_prime.png`` and
    ``b.png`` (solid RGB ``(red_step * i, 80, 120)``, ``widths[i]`` x 32) and marker-only ``clip/`` (config.json) and
    ``model/`` (model_index.json) folders under ``root``; returns root."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    for i, name in enumerate(("a", "a_prime", "b")):
        Image.new("RGB", (widths[i], 32), (red_step * i, 80, 120)).save(root / f"{name}.png")
    for folder, marker in (("clip", "config.json"), ("model", "model_index.json")):
        (root / folder).mkdir()
        (root / folder / marker).write_text("{}")
    return root


def hold_folder_lock(folder, name: str, what: str):
    """A separate process holding ``_files.FolderLock(folder, name, what)`` (as a running `lorweb-fast train`,
    `eval generate` or `data prepare` holds its output folder's) until killed; returned once the lock is held. The
    caller kills and waits for it."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom lorweb_fast._files import FolderLock\n"
            "FolderLock(sys.argv[1], sys.argv[2], sys.argv[3]).acquire()\nprint('held', flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), name, what], stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "held":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the lock holder for {folder} did not start")
    return proc


def tiny_lorweb_kontext_pipeline(root):
    """``tiny_kontext_with_encoder(root)`` wrapped as a ``LoRWeBKontextPipeline``: every component in eval mode
    (built in memory, the text encoders are in training mode: dropout), native resolution, 64 px grids, no bar."""
    from torch import nn

    from .flux import LoRWeBKontextPipeline

    pipe, encoder = tiny_kontext_with_encoder(root)
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.eval()
    wrapper = LoRWeBKontextPipeline(pipe, encoder, resolution="native", long_edge=64)
    wrapper.set_progress_bar_config(disable=True)
    return wrapper


def state_dict_copy(model) -> dict:
    """A detached copy of ``model.state_dict()`` (for ``same_state_dict``)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state_dict(model, before: dict) -> bool:
    """Whether ``model``'s state dict holds exactly ``before`` (``state_dict_copy``): the same keys, bit-equal."""
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def module_level_state() -> dict:
    """``{(module, name): size}`` of every module-level dict / list / set and functools cache of lorweb_fast's modules
    (the kernels included): equal before and after a loop = nothing accumulates there."""
    import sys

    sizes = {}
    for mod_name, module in list(sys.modules.items()):
        if mod_name != "lorweb_fast" and not mod_name.startswith("lorweb_fast."):
            continue
        for name, value in list(vars(module).items()):
            if name.startswith("__"):
                continue
            if isinstance(value, (dict, list, set)):
                sizes[(mod_name, name)] = len(value)
            elif callable(getattr(value, "cache_info", None)):
                sizes[(mod_name, name)] = value.cache_info().currsize
    return sizes


@contextlib.contextmanager
def one_intra_op_thread():
    """torch on one intra-op thread inside the block (tiny models run faster without thread spinning on a shared
    CPU), the previous count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def fresh_accelerate_state():
    """accelerate's process-wide state reset on entry and on exit: none from earlier work going in, none left behind
    (skips the calling test when accelerate is missing)."""
    import pytest

    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(reset_partial_state=True)
    state.GradientState._reset_state()
    try:
        yield
    finally:
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()


def tiny_lorweb_flux(*, checkpointing: bool = False) -> torch.nn.Module:
    """The tiny ``FluxTransformer2DModel`` (seed 0) with ``inject_random_lorweb``'s basis, in train mode; with
    diffusers' gradient checkpointing when ``checkpointing``."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**tiny_flux_config())
    inject_random_lorweb(model)
    model.train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


class NanGradient(torch.autograd.Function):
    """Identity whose backward returns NaN: a finite loss with a non-finite gradient (``NanGradient.apply(loss)``)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def lorweb_model_state(model: torch.nn.Module) -> dict:
    """What a failed or interrupted call must leave as it was: every tensor (cloned), requires_grad flags, the module
    tree, hooks, and per LoRWeB layer its coefficients (their sources) or per-forward query, strength and merged
    flags; the fuse state. Compare two with
    ``assert_same_model_state``."""
    from . import lora_api
    from .model import lorweb_layers

    layers = lorweb_layers(model)
    modules = list(model.modules())
    return {"tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._load_state_dict_pre_hooks)
                         for m in modules),
            "coefficients": {n: None if l.coefficients is None else l.coefficients.detach().clone()
                             for n, l in layers.items()},
            "queries": {n: None if l._query is None else l._query.detach().clone() for n, l in layers.items()},
            "coefficient sources": [_source_ids(l._coefficient_sources) for l in layers.values()],
            "strength": [l._lorweb_scale for l in layers.values()],
            "merged": [(l._merged, l._merge_jit) for l in layers.values()],
            "fused": lora_api.fused_strategy(model)}


def _source_ids(sources):
    """A layer's ``_coefficient_sources`` as comparable values: the ids of the tensors still referenced, their
    recorded versions and whether the shared no-autograd-history warning is armed or given."""
    if not isinstance(sources, tuple):
        return sources
    keys_ref, projection_ref, *versions, warned = sources
    return (*(None if ref is None else id(ref()) for ref in (keys_ref, projection_ref)), *versions,
            None if warned is None else tuple(warned))


def assert_same_model_state(got: dict, want: dict, *, ignore=()) -> None:
    """Two ``lorweb_model_state`` results (or dicts extending them) equal, tensors bit for bit, but for ``ignore``."""
    assert got.keys() == want.keys()
    for key in set(want) - set(ignore):
        if key in ("tensors", "coefficients", "queries"):
            assert got[key].keys() == want[key].keys(), key
            for name, value in want[key].items():
                other = got[key][name]
                assert (other is None) == (value is None), f"{key} {name}"
                assert value is None or torch.equal(other, value), f"{key} {name} changed"
        else:
            assert got[key] == want[key], key


@contextlib.contextmanager
def one_process_gloo_group():
    """A one-process gloo process group (a 1-rank device mesh on CPU; FSDP2's ``fully_shard`` and DTensors run on
    it), destroyed on exit; the calling test is skipped when torch.distributed is unavailable or a process group
    exists already. Yields ``torch.distributed``."""
    import pytest
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group exists already")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()
