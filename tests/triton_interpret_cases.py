"""Triton kernels on CPU tensors under TRITON_INTERPRET=1 (run by test_triton_kernels.py in a subprocess, because the
variable must be set before triton is imported)."""

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_triton_kernels.py"

import lorweb_fast as lf  # noqa: E402
from lorweb_fast.kernels import mixed_lora as K  # noqa: E402
from lorweb_fast import reference  # noqa: E402
from lorweb_fast.testing import (assert_within_bound, assert_within_rss_bound, case_id,  # noqa: E402
                                 check_against_reference, check_forward, odd_shape_cases, partial_gradients,
                                 random_problem, spread_cases, tolerance)

CASES = odd_shape_cases()


def _problem(case, dtype=None):
    return random_problem(case["batch"], case["seq"], case["in_features"], case["out_features"], case["num_loras"],
                          case["rank"], dtype or case["dtype"], seed=case["seed"])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lorweb_linear_triton(case):
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"), _problem(case))


@pytest.mark.parametrize("case", spread_cases(), ids=case_id)  # 2-D and 3-D, fp32 and bf16
def test_mixed_lora_delta_triton(case):
    check_against_reference(lambda *a: lf.mixed_lora_delta(*a, backend="triton"), _problem(case), with_base=False)


@pytest.mark.parametrize("case", [dict(c, dtype=torch.float16) for c in spread_cases()[::3]], ids=case_id)
def test_fp16(case):
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"), _problem(case))


def test_add_to_and_non_contiguous_inputs():
    p = random_problem(3, 7, 37, 29, 3, 4, torch.float32, seed=5)
    x_t = p["x"].transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous strides
    assert not x_t.is_contiguous()
    base = torch.randn(3, 7, 29)
    args = (p["lora_a"], p["lora_b"], p["coeffs"], p["scale"])
    got = lf.mixed_lora_delta(x_t, *args, add_to=base, backend="triton")
    want = base.double() + reference.mixed_lora_delta(p["x"], *args)
    want_abs = base.double().abs() + reference.mixed_lora_delta(p["x"].abs(), p["lora_a"].abs(), p["lora_b"].abs(),
                                                                p["coeffs"].abs(), p["scale"])
    assert_within_bound("add_to", got, want, want_abs, torch.float32, 37 + 12)
    w_t = p["weight"].t().contiguous().t()
    check_forward("non-contiguous", lf.lorweb_linear(x_t, w_t, p["bias"], *args, backend="triton"), p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_to_gets_the_output_gradient(dtype):
    """y = add_to + delta: the gradient of add_to is the output gradient itself (exactly), and the other gradients
    against float64 (with_base=False: the delta alone), for the add_to path of bitsandbytes and hooked bases."""
    p = random_problem(2, 7, 37, 29, 3, 4, dtype, seed=6)
    base = torch.randn(2, 7, 29).to(dtype).requires_grad_(True)
    x = p["x"].clone().requires_grad_(True)
    y = lf.mixed_lora_delta(x, p["lora_a"], p["lora_b"], p["coeffs"], p["scale"], add_to=base, backend="triton")
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    assert torch.equal(base.grad, dy) and x.grad is not None
    check_against_reference(lambda *a: lf.mixed_lora_delta(*a, add_to=torch.zeros(2, 7, 29, dtype=dtype),
                                                           backend="triton"), p, with_base=False)


def test_in_place_accumulation_launcher():
    p = random_problem(2, 5, 17, 19, 3, 2, torch.float32, seed=3)
    x = p["x"].reshape(10, 17)
    a_cat, b_cat = K.pack_basis(p["lora_a"], p["lora_b"])
    u, z = K.shrink(x, a_cat, p["coeffs"].float(), p["scale"], 5, 2)
    out = torch.randn(10, 19)
    expected = out.double() + z.double() @ b_cat.double()
    expected_abs = out.double().abs() + z.double().abs() @ b_cat.double().abs()
    ret = K.expand(None, None, z, b_cat, base=out, out=out)
    assert ret.data_ptr() == out.data_ptr()
    assert_within_bound("out += z b_cat", out, expected, expected_abs, torch.float32, 6)


def test_public_launchers_against_float64():
    """pack_basis / shrink / expand (the API the benchmarks call) on a packed rank-96 basis (64 + 32 chunks)."""
    p = random_problem(3, 7, 45, 51, 24, 4, torch.float32, seed=4)
    x = p["x"].reshape(21, 45)
    a_cat, b_cat = K.pack_basis(p["lora_a"], p["lora_b"])
    assert a_cat.shape == (96, 45) and b_cat.shape == (96, 51) and a_cat.is_contiguous()
    assert K.r_chunks(96) == (64, 32)
    torch.testing.assert_close(a_cat[4 * 5 + 2], p["lora_a"][5, :, 2])  # row n*r + j = LoRA n, slot j
    u, z = K.shrink(x, a_cat, p["coeffs"].float(), p["scale"], 7, 4)
    x64, a64, b64, w64 = x.double(), a_cat.double(), b_cat.double(), p["weight"].double()
    u_ref, u_abs = x64 @ a64.t(), x64.abs() @ a64.abs().t()
    scaling = (p["coeffs"].double() * p["scale"]).repeat_interleave(4, 1).repeat_interleave(7, 0)
    assert_within_bound("u", u, u_ref, u_abs, torch.float32, 45)
    assert_within_bound("z", z, u_ref * scaling, u_abs * scaling.abs(), torch.float32, 45)
    y = K.expand(x, p["weight"], z, b_cat, bias=p["bias"])
    z64 = z.double()
    y_ref = x64 @ w64.t() + p["bias"].double() + z64 @ b64
    y_abs = x64.abs() @ w64.abs().t() + p["bias"].double().abs() + z64.abs() @ b64.abs()
    assert_within_bound("y", y, y_ref, y_abs, torch.float32, 45 + 96)


@pytest.mark.parametrize("split", [2, 3])
def test_split_k_shrink_matches_unsplit(split):
    """Split-K (fixed-order fp32 partial sums) gives the same u, z and dcoeffs partials as one K slice."""
    p = random_problem(2, 9, 77, 19, 3, 4, torch.float32, seed=8)
    x = p["x"].reshape(18, 77)
    a_cat, _ = K.pack_basis(p["lora_a"], p["lora_b"])
    cfg = dict(block_m=16, block_k=16, split_k=1, num_warps=4, num_stages=2)
    u1, z1 = K.shrink(x, a_cat, p["coeffs"], p["scale"], 9, 4, config=cfg)
    us, zs = K.shrink(x, a_cat, p["coeffs"], p["scale"], 9, 4, config={**cfg, "split_k": split})
    x64, a64 = x.double(), a_cat.double()
    u_ref, u_abs = x64 @ a64.t(), x64.abs() @ a64.abs().t()
    scaling = (p["coeffs"].double() * p["scale"]).repeat_interleave(4, 1).repeat_interleave(9, 0)
    for name, u in (("u unsplit", u1), ("u split", us)):
        assert_within_bound(name, u, u_ref, u_abs, torch.float32, 77)
    for name, z in (("z unsplit", z1), ("z split", zs)):
        assert_within_bound(name, z, u_ref * scaling, u_abs * scaling.abs(), torch.float32, 77)
    _, _, dc1 = K.shrink(x, a_cat, p["coeffs"], p["scale"], 9, 4, u_in=u1, config=cfg)
    _, _, dcs = K.shrink(x, a_cat, p["coeffs"], p["scale"], 9, 4, u_in=u1, config={**cfg, "split_k": split})
    u64 = u1.double()
    dc_ref = (u64 * u_ref).view(18, 3, 4).sum(2) * p["scale"]
    dc_abs = (u64.abs() * u_abs).view(18, 3, 4).sum(2) * abs(p["scale"])
    for name, dc in (("dcoeffs unsplit", dc1), ("dcoeffs split", dcs)):
        assert_within_bound(name, dc, dc_ref, dc_abs, torch.float32, 77 + 4)


@pytest.mark.parametrize("split,tma", [(1, 0), (2, 0), (1, 1), (2, 1)])
@pytest.mark.parametrize("rows_per_sample", [32, 9])
@pytest.mark.parametrize("num_loras,rank", [(3, 4), (24, 4), (5, 1)])  # R = 12, 96 (two chunks: 64 + 32), 5
def test_dcoeffs_partials_per_program_or_per_row(split, tma, rows_per_sample, num_loras, rank):
    """Backward K1's dcoeffs partials: one row per program of BLOCK_M rows (16 unsplit, the finish kernel's 32 with
    split-K) when that divides rows_per_sample, else one per row, scaled by ``scale``; either way their per-sample
    sums match float64 (pointer and TMA kernels)."""
    batch = 3
    p = random_problem(batch, rows_per_sample, 40, 19, num_loras, rank, torch.float32, seed=21)
    m, R = batch * rows_per_sample, num_loras * rank
    dy = p["x"].reshape(m, 40)
    panel = torch.randn(R, 40)  # the packed basis the kernel reads (b_cat in the backward)
    u = torch.randn(m, R)
    cfg = dict(block_m=16, block_k=16, split_k=split, tma=tma, num_warps=4, num_stages=2)
    launch = lambda: K.shrink(dy, panel, p["coeffs"], p["scale"], rows_per_sample, rank, u_in=u, config=cfg)
    (_, _, dc), names = _launched(launch)
    assert names[0] == ("_shrink_tma_kernel" if tma else "_shrink_kernel")  # 160-byte rows: TMA takes them
    block = 16 if split == 1 else K.SHRINK_FINISH_BLOCK_M
    group = block if rows_per_sample % block == 0 else 1
    assert tuple(dc.shape) == (m // group, num_loras)
    dz_ref, dz_abs = dy.double() @ panel.double().t(), dy.double().abs() @ panel.double().abs().t()
    per_row = (u.double() * dz_ref).view(m, num_loras, rank).sum(2) * p["scale"]
    per_row_abs = (u.double().abs() * dz_abs).view(m, num_loras, rank).sum(2) * abs(p["scale"])
    want = per_row.view(m // group, group, num_loras).sum(1)
    want_abs = per_row_abs.view(m // group, group, num_loras).sum(1)
    assert_within_bound("dcoeffs partials", dc, want, want_abs, torch.float32, 40 + rank * group)
    per_sample = dc.view(batch, -1, num_loras).sum(1)
    assert_within_bound("dcoeffs per sample", per_sample, per_row.view(batch, -1, num_loras).sum(1),
                        per_row_abs.view(batch, -1, num_loras).sum(1), torch.float32, 40 + rank * rows_per_sample)


def test_empty_sequence_backward():
    """x of shape (B, 0, in): the forward and the backward run and give empty / zero gradients."""
    p = random_problem(2, 1, 17, 19, 3, 4, torch.float32, seed=4)
    x = torch.empty(2, 0, 17, requires_grad=True)
    coeffs = p["coeffs"].float().requires_grad_(True)
    lora_a = p["lora_a"].requires_grad_(True)
    y = lf.lorweb_linear(x, p["weight"], p["bias"], lora_a, p["lora_b"], coeffs, p["scale"], backend="triton")
    assert y.shape == (2, 0, 19)
    y.sum().backward()
    assert x.grad.shape == (2, 0, 17)
    assert torch.equal(coeffs.grad, torch.zeros_like(coeffs)) and torch.equal(lora_a.grad, torch.zeros_like(lora_a))


@pytest.mark.parametrize("shape", [(2, 0), (0, 5)])
def test_empty_input_with_the_tma_tables(shape):
    """No rows ((B, 0, in) or B = 0) at a layer whose sm_90 entries launch by TMA: no descriptor is built for an
    empty operand (its shape must be positive); forward and backward give empty / zero results."""
    entry = K.lookup(3072, 3072, 128, torch.bfloat16, "sm90")
    assert entry["route"] == "fused" and any(entry[role]["tma"] for role in ("shrink", "expand", "shrink_dy",
                                                                              "expand_dx"))
    g = torch.Generator().manual_seed(5)
    x = torch.empty(*shape, 3072, dtype=torch.bfloat16)
    w = torch.randn(3072, 3072, generator=g).to(torch.bfloat16)
    lora_a = (torch.randn(32, 3072, 4, generator=g) * 0.02).to(torch.bfloat16)
    lora_b = (torch.randn(32, 4, 3072, generator=g) * 0.02).to(torch.bfloat16)
    coeffs = torch.rand(shape[0], 32, generator=g)
    x2d = x.reshape(-1, 3072)
    y, u, z = K.forward(x2d, w, None, None, lora_a, lora_b, coeffs, 1.0, shape[1], family="sm90")
    assert y.shape == (0, 3072) and u.shape == z.shape == (0, 128)
    dx, d_a, d_b, d_c = K.backward(torch.empty(0, 3072, dtype=torch.bfloat16), x2d, w, lora_a, lora_b, coeffs, u, z,
                                   1.0, shape[1], family="sm90")
    assert dx.shape == (0, 3072) and d_c.shape == (shape[0], 32)
    for grad in (d_a, d_b, d_c):
        assert torch.equal(grad, torch.zeros_like(grad))
    assert not K.tma_usable(x2d, lora_a.new_empty(128, 3072), 128, 0, "sm90") and not K._tma_aligned(x2d)


def test_tma_needs_rows_that_do_not_overlap():
    """A row stride 0 (a broadcast x, or the gradient of a sum over rows) is no TMA tensor map: the pointer kernels
    take it, with the same result as the dense copy."""
    dense = torch.randn(1, 64).expand(9, 64)
    a_cat = torch.randn(16, 64)
    assert dense.stride() == (0, 1) and not K._tma_aligned(dense) and K._tma_aligned(dense.contiguous())
    assert not K.tma_usable(dense, a_cat, 16, 0, "sm90") and K.tma_usable(dense.contiguous(), a_cat, 16, 0, "sm90")
    coeffs = torch.rand(3, 4)
    cfg = dict(block_m=16, block_k=16, split_k=1, tma=1, num_warps=4, num_stages=2)
    got, names = _launched(lambda: K.shrink(dense, a_cat, coeffs, 0.5, 3, 4, config=cfg, family="sm90"))
    assert names == ["_shrink_kernel"]
    for g, w in zip(got, K.shrink(dense.contiguous(), a_cat, coeffs, 0.5, 3, 4, config=cfg, family="sm90")):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_strided_bias_is_read_by_its_strides(dtype):
    """The fused route's epilogue adds the bias as a dense vector: a strided bias (a column of a bigger tensor) is
    made dense first; y against float64."""
    p = random_problem(2, 5, 40, 19, 3, 4, dtype, seed=31)
    p["bias"] = torch.randn(19, 2).to(dtype)[:, 0]
    assert p["bias"].stride() == (2,)
    assert K.choose_route(40, 19, 12, dtype, 5, "default", rank=4) == "fused"
    y = lf.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"],
                         backend="triton")
    check_forward("strided bias", y, p)
    with pytest.raises(ValueError, match=r"bias must be \(19,\)"):
        K.expand(p["x"].reshape(10, 40), p["weight"], torch.randn(10, 12).to(dtype), torch.randn(12, 19).to(dtype),
                 bias=torch.randn(20).to(dtype))


def test_dynamic_compile_does_not_recompile_for_sequence_lengths(monkeypatch):
    """Under torch.compile(dynamic=True), rows_per_sample is symbolic: the dcoeffs partials then stay per row
    instead of guarding on its divisibility by BLOCK_M, so lengths that are and are not multiples of it share one
    graph (forward and backward)."""
    from torch._dynamo.utils import counters

    from lorweb_fast import ops

    monkeypatch.setattr(ops, "INTERPRETER_GRAPH_CAPTURE", True)  # the graphs' structure only, never their values
    torch._dynamo.reset()
    fn = torch.compile(lambda *t: lf.lorweb_linear(*t, backend="triton"), fullgraph=True, backend="aot_eager",
                       dynamic=True)

    def step(batch, seq):
        p = random_problem(batch, seq, 40, 19, 3, 4, torch.float32, seed=3)
        x = p["x"].requires_grad_(True)
        fn(x, p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"].float(), p["scale"]).sum().backward()
        assert x.grad is not None

    step(2, 5)
    counters.clear()
    for batch, seq in ((3, 7), (2, 64), (3, 9), (2, 128), (2, 48)):
        step(batch, seq)
    assert counters["stats"]["unique_graphs"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_calls_skip_the_op_dispatch_with_identical_results(dtype, monkeypatch):
    """Eager calls of plain tensors run the op bodies directly (``ops._EagerFusedFunction``, without torch.library's
    Python autograd wrapper of the op); torch.compile, dispatch modes and tensor subclasses keep the registered op.
    Both give the same output and the same gradients bit for bit, for all 16 mixes of x / lora_a / lora_b / coeffs
    needing a gradient, plus weight and bias needing theirs, 2-D and 3-D, with weight and bias and with add_to (a
    base output needing its gradient), and without autograd; the direct path never calls the op, the switched-off
    one always does."""
    from lorweb_fast import ops

    calls = []
    op = ops._FUSED_OPS["triton"]
    monkeypatch.setitem(ops._FUSED_OPS, "triton", lambda *a: calls.append(1) or op(*a))
    p = random_problem(2, 7, 37, 29, 3, 4, dtype, seed=9)
    base = torch.randn(2, 7, 29).to(dtype)
    dy = torch.randn(2, 7, 29).to(dtype)

    def run(direct, needs, kind, two_d, grad_mode=True, frozen_weight=True):
        monkeypatch.setattr(ops, "EAGER_DIRECT", direct)
        calls.clear()
        names = ("x", "lora_a", "lora_b", "coeffs")
        leaves = [p[k].clone().requires_grad_(n) for k, n in zip(names, needs)]
        weight, bias = (p[k].clone().requires_grad_(not frozen_weight) for k in ("weight", "bias"))
        add_to = base.clone().requires_grad_(needs[0])
        x, a_to, g = ((leaves[0][:, 0], add_to[:, 0], dy[:, 0]) if two_d else (leaves[0], add_to, dy))
        with torch.set_grad_enabled(grad_mode):
            if kind == "linear":
                y = lf.lorweb_linear(x, weight, bias, *leaves[1:], p["scale"], backend="triton")
            else:
                y = lf.mixed_lora_delta(x, *leaves[1:], p["scale"], add_to=a_to, backend="triton")
        if y.requires_grad:
            y.backward(g)
        return y.detach(), [t.grad for t in leaves] + [add_to.grad, weight.grad, bias.grad], len(calls)

    mixes = [tuple(bool(i >> j & 1) for j in range(4)) for i in range(16)]
    for kind in ("linear", "delta"):
        for two_d in (False, True):
            for needs in mixes:
                direct, via_op = run(True, needs, kind, two_d), run(False, needs, kind, two_d)
                assert direct[2] == 0 and via_op[2] == 1
                assert torch.equal(direct[0], via_op[0]), (kind, two_d, needs)
                for got, want in zip(direct[1], via_op[1]):
                    assert (got is None) == (want is None) and (got is None or torch.equal(got, want)), \
                        (kind, two_d, needs)
                if any(needs):
                    assert any(g is not None for g in direct[1])
            no_grad = run(True, (True,) * 4, kind, two_d, grad_mode=False)
            assert no_grad[2] == 0 and torch.equal(no_grad[0], run(False, (True,) * 4, kind, two_d)[0])
        direct, via_op = (run(d, (False, True, False, False), "linear", False, frozen_weight=False)
                          for d in (True, False))
        assert direct[1][-2] is not None and direct[1][-1] is not None
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(direct[1], via_op[1]))


def test_tracing_profiling_forward_ad_and_compiled_autograd_use_the_registered_ops(monkeypatch):
    """What records or transforms the ops keeps the registered ones: torch.jit.trace (the trace holds the op and
    replays on new inputs; the op bodies would be traced into their Python-int arguments), the autograd profiler
    (its op table names lorweb_fast::triton_fwd / triton_bwd), forward-mode AD (dual tensors: the op path, whatever
    it gives, not the bodies, which would drop the Triton part of the tangent), and compiled autograd over an eager
    forward (dynamo traces the backward through the backward op, fullgraph)."""
    import torch.autograd.forward_ad as fwAD
    from torch._dynamo import compiled_autograd
    from torch._dynamo.testing import CompileCounter

    from lorweb_fast import ops

    p = random_problem(2, 5, 16, 16, 2, 2, torch.float32, seed=1)
    fn = (lambda x, a=p["lora_a"]: lf.lorweb_linear(x, p["weight"], p["bias"], a, p["lora_b"], p["coeffs"],
                                                     p["scale"], backend="triton"))
    with torch.no_grad():
        traced = torch.jit.trace(fn, (p["x"],), check_trace=False)
        x2 = torch.randn_like(p["x"])
        assert "lorweb_fast::triton_fwd" in [n.kind() for n in traced.graph.nodes()]
        assert torch.equal(traced(x2), fn(x2))

    a = p["lora_a"].clone().requires_grad_(True)
    with torch.profiler.profile() as prof:
        fn(p["x"], a).sum().backward()
    names = {e.name for e in prof.events()}
    assert {"lorweb_fast::triton_fwd", "lorweb_fast::triton_bwd"} <= names, sorted(names)[:20]

    bodies = []
    body = ops._EAGER_BODIES["triton"]
    monkeypatch.setitem(ops._EAGER_BODIES, "triton",
                        (lambda *t: bodies.append(1) or body[0](*t), body[1], body[2]))
    with fwAD.dual_level():  # refused by name (test_forward_mode_ad_is_refused_by_name), before any body runs
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            fn(fwAD.make_dual(p["x"].clone(), torch.ones_like(p["x"])))
    assert not bodies

    a = p["lora_a"].clone().requires_grad_(True)
    y = fn(p["x"], a)
    assert bodies  # the eager forward took the direct path
    counter = CompileCounter()
    with compiled_autograd._enable(torch.compile(backend=counter, fullgraph=True)):
        y.sum().backward()
    want = p["lora_a"].clone().requires_grad_(True)
    fn(p["x"], want).sum().backward()
    assert counter.frame_count == 1 and torch.equal(a.grad, want.grad)


def test_dispatch_modes_and_subclasses_see_the_registered_op():
    """A TorchDispatchMode sees the fused forward and backward ops as before (profilers, FlopCounterMode,
    partial_gradients' recorder): with a mode active the op is called, and a backward run under a mode after a
    direct forward goes through the backward op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.name())
            return func(*args, **(kwargs or {}))

    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32, seed=4)
    a = p["lora_a"].clone().requires_grad_(True)
    seen = Seen()
    with seen:
        y = lf.lorweb_linear(p["x"], p["weight"], p["bias"], a, p["lora_b"], p["coeffs"], p["scale"],
                             backend="triton")
    assert "lorweb_fast::triton_fwd" in seen.names
    y = lf.lorweb_linear(p["x"], p["weight"], p["bias"], a, p["lora_b"], p["coeffs"], p["scale"], backend="triton")
    seen = Seen()
    with seen:
        y.sum().backward()
    assert "lorweb_fast::triton_bwd" in seen.names and a.grad is not None


@pytest.mark.parametrize("how", ["dual", "jvp", "jacfwd", "vmap_of_jvp"])
def test_forward_mode_ad_is_refused_by_name(how):
    """Forward-mode AD through the fused backend raises a NotImplementedError naming backend='torch' (torch gave no
    tangent for dual tensors and a zero tangent under torch.func.jvp, without an error); the torch backend computes
    the tangent (checked against the float64 reference)."""
    import torch.autograd.forward_ad as fwAD

    p = random_problem(2, 5, 16, 16, 2, 2, torch.float32, seed=1)
    tangent = torch.randn_like(p["x"])

    def layer(x, backend):
        return lf.lorweb_linear(x, p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"],
                                backend=backend)

    def forward_ad(backend):
        if how == "dual":
            with fwAD.dual_level():
                return fwAD.unpack_dual(layer(fwAD.make_dual(p["x"].clone(), tangent), backend)).tangent
        if how == "jvp":
            return torch.func.jvp(lambda x: layer(x, backend), (p["x"],), (tangent,))[1]
        if how == "jacfwd":
            return torch.func.jacfwd(lambda x: layer(x, backend).sum(), argnums=0)(p["x"])
        return torch.func.vmap(lambda t: torch.func.jvp(lambda x: layer(x, backend), (p["x"],), (t,))[1])(
            tangent.unsqueeze(0))[0]

    with pytest.raises(NotImplementedError, match="forward-mode AD.*backend='torch'"):
        forward_ad("triton")
    got = forward_ad("torch")
    if how != "jacfwd":  # the layer is linear in x: its tangent is the layer without bias applied to the tangent
        want = reference.lorweb_linear(tangent, p["weight"], None, p["lora_a"], p["lora_b"], p["coeffs"], p["scale"])
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_double_backward_is_refused_by_name():
    """Differentiating a gradient (create_graph=True) through the fused op raises a NotImplementedError naming the
    way out (it was torch's "no autograd formula was registered" for lorweb_fast.triton_bwd); a plain backward with
    create_graph=False is unaffected."""
    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32, seed=4)
    a = p["lora_a"].clone().requires_grad_(True)
    y = lf.lorweb_linear(p["x"], p["weight"], p["bias"], a, p["lora_b"], p["coeffs"], p["scale"], backend="triton")
    g, = torch.autograd.grad(y.sum(), a, create_graph=True)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        g.sum().backward()


def test_compiled_backward_skips_dx_for_an_input_without_grad(monkeypatch):
    """Under torch.compile, AOTAutograd traces the backward with the inputs' requires_grad, so the traced
    triton_bwd gets need_dx=False for an x without grad (and True with it); the traced op body then launches no dx
    expand. (The values are not compared here: under the interpreter the traced graphs launch no kernels; the eager
    tests above compare them.)"""
    from lorweb_fast import ops

    monkeypatch.setattr(ops, "INTERPRETER_GRAPH_CAPTURE", True)
    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32, seed=4)
    traced = []
    body = K.backward
    monkeypatch.setattr(K, "backward", lambda *a, **kw: traced.append(a[10:12]) or body(*a, **kw))
    for x_grad in (True, False):
        torch._dynamo.reset()
        traced.clear()
        fn = torch.compile(lambda *t: lf.lorweb_linear(*t, backend="triton"), fullgraph=True, backend="aot_eager")
        leaves = [p["lora_a"].clone().requires_grad_(True), p["lora_b"].clone().requires_grad_(True),
                  p["coeffs"].clone().requires_grad_(True)]
        fn(p["x"].clone().requires_grad_(x_grad), p["weight"], p["bias"], *leaves, p["scale"]).sum().backward()
        assert traced and set(traced) == {(x_grad, True)}, traced


def test_compiled_layers_do_not_recompile_for_a_new_lorweb_scale():
    """set_lorweb_scale (diffusers' set_adapters weight, disable_lora / enable_lora) changes a float on every layer:
    the fused op takes it inside the coefficient tensor, so a compiled model keeps its graph (a float argument of
    the op would be specialised and recompiled for every value), and matches the eager result."""
    from torch import nn
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 19), nn.Linear(19, 16))
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=5, target_modules=["0", "1"]))
    for layer in lf.lorweb_layers(m).values():
        nn.init.normal_(layer.lora_B)
        layer.backend = "triton"
    with torch.no_grad():
        lf.set_query(m, torch.randn(2, 5))
        # backend "eager": dynamo's guards decide the recompiles; the graph runs the ops as they are (under the
        # interpreter a traced launch is not recorded, so an AOT-traced graph would not compute the result)
        compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="eager")
        x = torch.randn(2, 7, 16)
        compiled(x)
        counters.clear()
        for scale in (0.5, 0.25, 0.0, 1.5):
            lf.lora_api.set_lorweb_scale(m, scale)
            torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lorweb_linear_triton_with_whole_programs_per_sample(dtype):
    """128 rows per sample: every table's backward K1 block divides it, so the dcoeffs partials are per program
    (the odd-shape cases take the per-row partials); output and every gradient against float64."""
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"),
                            random_problem(2, 128, 40, 19, 3, 4, dtype, seed=22))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [1, 2])
def test_tma_shrink_matches_pointer_shrink(dtype, split):
    """The TMA shrink (host tensor descriptors, zero-filled out-of-bounds tiles) on aligned operands with M, K not
    multiples of the tiles and R = 96 (two descriptors, 64 + 32 rows), forward and backward K1, vs the pointer
    kernel."""
    p = random_problem(3, 7, 40, 19, 24, 4, dtype, seed=12)
    x = p["x"].reshape(21, 40)
    a_cat, _ = K.pack_basis(p["lora_a"], p["lora_b"])
    assert K.tma_usable(x, a_cat, 64, 32, "default")
    cfg = dict(block_m=16, block_k=16, split_k=split, tma=0, num_warps=4, num_stages=2)
    want = K.shrink(x, a_cat, p["coeffs"], p["scale"], 7, 4, config=cfg)
    got, names = _launched(lambda: K.shrink(x, a_cat, p["coeffs"], p["scale"], 7, 4, config={**cfg, "tma": 1}))
    assert names[0] == "_shrink_tma_kernel"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    want_k1 = K.shrink(x, a_cat, p["coeffs"], p["scale"], 7, 4, u_in=want[0], config=cfg)
    got_k1 = K.shrink(x, a_cat, p["coeffs"], p["scale"], 7, 4, u_in=want[0], config={**cfg, "tma": 1})
    for g, w in zip(got_k1[1:], want_k1[1:]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert not K.tma_usable(x[:, 1:], a_cat[:, 1:], 64, 32, "default")  # 78-byte rows: pointer kernel
    assert not K.tma_usable(x, a_cat, 64, 32, "sm80")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_tma_expand_matches_pointer_expand(dtype):
    """The persistent TMA expand (4 programs walking 2 x 2 tiles; zero-filled K and R tails) on aligned operands:
    forward (weight (out, in) read transposed), backward dx (weight read as (K, N)), delta-only with a base."""
    p = random_problem(3, 7, 40, 24, 24, 4, dtype, seed=13)
    x = p["x"].reshape(21, 40)
    a_cat, b_cat = K.pack_basis(p["lora_a"], p["lora_b"])
    _, z = K.shrink(x, a_cat, p["coeffs"], p["scale"], 7, 4)
    cfg = dict(block_m=16, block_n=16, block_k=16, group_m=2, tma=0, num_warps=4, num_stages=2)
    tma = {**cfg, "tma": 1}
    for args, kw in (((x, p["weight"], z, b_cat), dict(bias=p["bias"])),
                     ((None, None, z, b_cat), dict(base=torch.randn(21, 24).to(dtype))),
                     ((torch.randn(21, 24).to(dtype), p["weight"], torch.randn(21, 96).to(dtype), a_cat),
                      dict(weight_layout="in_out"))):
        want = K.expand(*args, **kw, config=cfg)
        got, names = _launched(lambda: K.expand(*args, **kw, config=tma))
        assert names == ["_expand_tma_kernel"]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("num_loras, rank", [(24, 4), (3, 8), (32, 1)])
def test_grad_basis_writes_the_basis_layouts(dtype, split, num_loras, rank):
    """grad_basis (K3 and its finish kernel) against float64 in the (N, in, r) / (N, r, out) layouts of lora_a /
    lora_b: R = 96 (two column chunks, 64 + 32), 24 and 32; in = 45 and out = 51 put the d a_cat / d b_cat boundary
    inside a finish program's rows; split-M slices of 16 rows over M = 37 leave a ragged last slice."""
    g = torch.Generator().manual_seed(21)
    M, k, nout, R = 37, 45, 51, num_loras * rank
    dz, z = (torch.randn(M, R, generator=g).to(dtype) for _ in range(2))
    x, dy = torch.randn(M, k, generator=g).to(dtype), torch.randn(M, nout, generator=g).to(dtype)
    cfg = dict(block_m=16, block_n=16, split_m=split, num_warps=4, num_stages=2)
    (d_a, d_b), names = _launched(lambda: K.grad_basis(dz, x, z, dy, rank, config=cfg))
    assert names == ["_grad_basis_kernel", "_grad_basis_finish_kernel"]
    assert d_a.shape == (num_loras, k, rank) and d_b.shape == (num_loras, rank, nout)
    assert d_a.dtype == d_b.dtype == dtype and d_a.is_contiguous() and d_b.is_contiguous()
    want_a = (dz.double().t() @ x.double()).view(num_loras, rank, k).transpose(1, 2)  # d a_cat[n*r+j, i] -> [n, i, j]
    want_b = (z.double().t() @ dy.double()).view(num_loras, rank, nout)
    bound_a = (dz.double().abs().t() @ x.double().abs()).view(num_loras, rank, k).transpose(1, 2)
    bound_b = (z.double().abs().t() @ dy.double().abs()).view(num_loras, rank, nout)
    assert_within_bound("d_lora_a", d_a, want_a, bound_a, dtype, M)
    assert_within_bound("d_lora_b", d_b, want_b, bound_b, dtype, M)
    # and the statistical bound (root-sum-of-squares of the terms), which the worst-case one alone would not give
    rss_a = (dz.double().square().t() @ x.double().square()).sqrt().view(num_loras, rank, k).transpose(1, 2)
    rss_b = (z.double().square().t() @ dy.double().square()).sqrt().view(num_loras, rank, nout)
    assert_within_rss_bound("d_lora_a", d_a, want_a, rss_a, dtype, M)
    assert_within_rss_bound("d_lora_b", d_b, want_b, rss_b, dtype, M)
    with pytest.raises(ValueError, match="rank-5"):
        K.grad_basis(dz, x, z, dy, 5, config=cfg)


def _launched(fn):
    """fn()'s result and the names of the kernels it launched."""
    names = []
    original = K._launch

    def spy(kernel, grid, *args, **kwargs):
        names.append(kernel.__name__)
        original(kernel, grid, *args, **kwargs)

    K._launch = spy
    try:
        return fn(), names
    finally:
        K._launch = original


@pytest.mark.parametrize("route", ["composed", "cublas"])
def test_other_routes_against_float64(route, monkeypatch):
    """The composed (shrink kernel + two addmm) and all-cuBLAS routes, forward and every gradient."""
    monkeypatch.setattr(K, "choose_route", lambda *a, **k: route)
    p = random_problem(2, 7, 37, 29, 3, 4, torch.float32, seed=9)
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"), p)
    check_against_reference(lambda *a: lf.mixed_lora_delta(*a, backend="triton"), p, with_base=False)


@pytest.mark.parametrize("num_loras, rank", [(160, 4), (3, 3)])
def test_cublas_route_for_large_R_and_odd_rank(num_loras, rank):
    """R = 640 > MAX_FUSED_R and r = 3 (not a power of two) run through the cuBLAS route, forward and gradients."""
    assert K.choose_route(17, 19, num_loras * rank, torch.float32, 5, rank=rank) == "cublas"
    p = random_problem(2, 5, 17, 19, num_loras, rank, torch.float32, seed=14)
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"), p)


def test_routes():
    assert K.choose_route(3072, 3072, 128, torch.bfloat16, 1) == "cublas"  # 2-D input (M = batch)
    assert K.choose_route(3072, 3072, 1024, torch.bfloat16, 4096) == "cublas"  # R > MAX_FUSED_R
    assert K.choose_route(3072, 3072, 128, torch.bfloat16, 4096) in ("fused", "composed")
    with pytest.raises(ValueError, match="R = 1024"):
        K.shrink(torch.randn(4, 8), torch.randn(1024, 8), torch.rand(1, 256), 1.0, 4, 4)


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
    torch.library.opcheck(torch.ops.lorweb_fast.triton_bwd.default, bwd_args + (False, with_weight),
                          test_utils=OPCHECK_UTILS)


def test_backward_gets_no_zero_gradients_for_u_and_z():
    """u and z are outputs of triton_fwd for its backward only: they do not require grad, and the backward runs no
    zero fill for their gradients (with autograd's default materialize_grads it ran two (M, R) fills per call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FillCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fills = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("zeros", "zeros_like", "zero_", "fill_", "new_zeros", "full"):
                self.fills.append(name)
            return func(*args, **(kwargs or {}))

    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32, seed=5)
    x = p["x"].reshape(10, 17).requires_grad_(True)
    lora_a, lora_b = p["lora_a"].requires_grad_(True), p["lora_b"].requires_grad_(True)
    coeffs = p["coeffs"].float().requires_grad_(True)
    y, u, z = torch.ops.lorweb_fast.triton_fwd(x, p["weight"], p["bias"], None, lora_a, lora_b, coeffs, 0.75, 5)
    assert y.requires_grad and not u.requires_grad and not z.requires_grad
    counter = FillCounter()
    with counter:
        y.backward(torch.randn_like(y))
    assert counter.fills == [], counter.fills
    for t in (x, lora_a, lora_b, coeffs):
        assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("needs", [(False, True, True, True), (True, False, False, True), (False, False, False, True),
                                   (True, True, True, False), (True, False, True, True), (True, True, False, True)],
                         ids=lambda n: "".join("xabc"[i] for i in range(4) if n[i]))
@pytest.mark.parametrize("seq", [5, 1], ids=["fused", "cublas"])
def test_backward_computes_only_what_autograd_needs(monkeypatch, needs, seq):
    """An input that needs no gradient (the first layer's x, a frozen basis) costs no kernel: the op's backward
    returns an empty (0,) tensor in its place (route "fused", 3-D x, and route "cublas", 2-D x), launches no dx
    expand / grad_basis (fused route), and every gradient that is asked for (lora_a alone, lora_b alone too) is
    bitwise the all-gradients backward's, which check_against_reference holds to float64."""
    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32, seed=9)
    route = K.choose_route(17, 19, 12, torch.float32, seq, K.gpu_family(torch.device("cpu")), rank=4)
    assert route == ("fused" if seq == 5 else "cublas")
    dy = torch.randn(2, 5, 19)
    full, _ = partial_gradients(p, (True,) * 4, "triton", dy, two_d=seq == 1)
    calls = []
    for name in ("expand", "grad_basis"):
        monkeypatch.setattr(K, name, lambda *a, _f=getattr(K, name), _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    got, outputs = partial_gradients(p, needs, "triton", dy, two_d=seq == 1)
    for name, g, want, needed in zip(("x", "lora_a", "lora_b", "coeffs"), got, full, needs):
        assert (g is not None) == needed, name
        if needed:
            assert torch.equal(g, want), name
    rows, basis = 2 * seq, needs[1] or needs[2]
    assert outputs == [[(rows, 17) if needs[0] else (0,), (3, 17, 4) if basis else (0,),
                        (3, 4, 19) if basis else (0,), (2, 3)]]
    if route == "fused":  # forward: one expand; backward: the dx expand and grad_basis only when needed
        assert calls == ["expand"] + ["expand"] * needs[0] + ["grad_basis"] * basis, calls
    # the op's defaults compute everything
    x2d = p["x"].reshape(10, 17)
    _, u, z = torch.ops.lorweb_fast.triton_fwd(x2d, p["weight"], p["bias"], None, p["lora_a"], p["lora_b"],
                                               p["coeffs"].float(), 0.75, 5)
    out = torch.ops.lorweb_fast.triton_bwd(torch.randn(10, 19), x2d, p["weight"], p["lora_a"], p["lora_b"],
                                           p["coeffs"].float(), u, z, 0.75, 5)
    assert [tuple(t.shape) for t in out] == [(10, 17), (3, 17, 4), (3, 4, 19), (2, 3)]


@pytest.mark.parametrize("faster", ["first", "last", "table"])
def test_tuner_times_every_role_in_the_mode_it_runs_in(tmp_path, monkeypatch, faster):
    """benchmarks/tune_kernels.py's ``tune`` end to end on CPU: the kernels run interpreted, the timer is replaced by
    one that reads the tiles of the last launch: the table's own tiles are slow, and the candidates get faster or
    slower in order ("first": the first candidate of each role wins, the fused route beats the composed one;
    "last": the last wins, the route becomes composed, and expand_dx, which a composed layer never launches, is not
    swept and keeps the starting table's tiles; "table": the table's own tiles are fastest, so nothing is adopted).
    Each role's candidates run in its own mode (shrink_dy on dy with the saved u, expand_dx with the weight as
    stored), the written table validates and holds the winners, and an entry the sweep did not touch is kept."""
    import json
    import sys
    from pathlib import Path

    bench_dir = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench_dir)
    try:
        import tune_kernels
    finally:
        sys.path.remove(bench_dir)
    small = {role: cands[:2] for role, cands in tune_kernels.CANDIDATES.items()}
    monkeypatch.setattr(tune_kernels, "CANDIDATES", small)
    modes = []

    def fake_bench(fn, n_inputs=1):
        for i in range(n_inputs):
            fn(i)
        if fn.__name__ in ("fused", "composed"):  # the route comparison
            return 1.0 if (fn.__name__ == "fused") == (faster != "last") else 2.0
        role, cfg = modes[-1]
        if cfg not in small[role]:
            return 5.0 if faster == "table" else 100.0  # the table's own tiles
        index = small[role].index(cfg)
        return 10.0 + (index if faster == "first" else -index)

    monkeypatch.setattr(tune_kernels, "_bench", fake_bench)
    real_shrink, real_expand = K.shrink, K.expand
    monkeypatch.setattr(K, "shrink", lambda *a, **kw: (
        modes.append(("shrink_dy" if kw.get("u_in") is not None else "shrink", kw.get("config"))),
        real_shrink(*a, **kw))[1])
    monkeypatch.setattr(K, "expand", lambda *a, **kw: (
        modes.append(("expand_dx" if kw.get("weight_layout") == "in_out" else "expand", kw.get("config"))),
        real_expand(*a, **kw))[1])
    real_grad_basis = K.grad_basis
    monkeypatch.setattr(K, "grad_basis", lambda *a, **kw: (
        modes.append(("grad_basis", kw.get("config"))), real_grad_basis(*a, **kw))[1])

    out = tmp_path / "sm_test.json"
    table = json.loads(K.config_path("default").read_text())
    for rule in table["defaults"]:  # starting tiles that are no candidate (the fake timer makes them slow)
        rule["grad_basis"]["split_m"] = 32
    kept = {k: v for k, v in table["defaults"][0].items() if k not in ("dtypes", "max_R")}
    kept = {**kept, "in": 96, "out": 96, "R": 8, "dtype": "float32", "route": "composed"}
    table["entries"] = [kept]
    out.write_text(json.dumps(table))
    args = tune_kernels.parse_args(["--layers", "48:40", "--tokens", "64", "--ranks", "8", "--dtypes", "float32",
                                    "--out", str(out)])
    assert tune_kernels.tune(args, device=torch.device("cpu")) == 0
    written = K.validate_table(json.loads(out.read_text()), str(out))
    assert written["entries"][0] == K.validate_table(table, "t")["entries"][0]  # untouched entry kept
    (entry,) = [e for e in written["entries"] if (e["in"], e["out"], e["R"], e["dtype"]) == (48, 40, 8, "float32")]
    assert entry["route"] == ("composed" if faster == "last" else "fused")
    start = K.lookup_in(K.validate_table(table, "t"), 48, 40, 8, torch.float32)
    skipped = ("expand_dx", "grad_basis") if faster == "last" else ()  # a composed layer never launches them
    for role, cands in small.items():
        timed = [cfg for mode, cfg in modes if mode == role and cfg is not None]
        if role in skipped:
            assert entry[role] == start[role] and not timed, role
            continue
        assert entry[role] == {"first": cands[0], "last": cands[-1], "table": start[role]}[faster], role
        assert all(c in timed for c in cands), f"{role} was not timed in its own mode"
    swept = [r for r in small if r not in skipped]
    assert f"roles {', '.join(swept)} of 48->40 R=8 float32." in written["note"]
    summary = json.loads((tmp_path / "sm_test_summary.json").read_text())["roles"]
    assert [r["role"] for r in summary] == swept
    if faster == "table":
        assert not any(r["adopted"] for r in summary) and all(r["table_ms"] == 5.0 for r in summary)
    else:
        assert all(r["adopted"] and r["table_ms"] == 100.0 and r["best_ms"] in (9.0, 10.0, 11.0) for r in summary)
    before = out.read_text()  # a sweep with no time left changes nothing
    args = tune_kernels.parse_args(["--layers", "48:40", "--tokens", "64", "--ranks", "8", "--dtypes", "float32",
                                    "--out", str(out), "--budget-s", "0"])
    assert tune_kernels.tune(args, device=torch.device("cpu")) == 0 and out.read_text() == before


def test_broadcast_output_gradient():
    """An output gradient with row stride 0 (the gradient of a sum over tokens): every gradient against float64."""
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"),
                            random_problem(2, 9, 40, 24, 3, 4, torch.float32, seed=32), broadcast_dy=True)


def _import_tuner():
    import sys
    from pathlib import Path

    bench_dir = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench_dir)
    try:
        import tune_kernels
    finally:
        sys.path.remove(bench_dir)
    return tune_kernels


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tuner_refuses_a_configuration_with_a_wrong_result(tmp_path, monkeypatch, dtype):
    """Every configuration the tuner times first runs once against its float64 reference (``role_references``): the
    starting table's tiles of every role pass (so the references, the per-sample sum of the dcoeffs partials and the
    gradient layouts of grad_basis are right), while a candidate whose kernel is wrong by 10 % in one output of its
    role (z, the dcoeffs partials, y, dx, d_lora_b) is refused and never timed, even though it would have been the
    fastest; a table entry that computes a wrong result is named and replaced. (10 %: an error the statistical
    bound is documented to catch in one entry; 3 % in a quarter of d_lora_b, 1.3 eps x ||rss||, was caught by
    one entry at 9.2 eps x rss only, and no longer once the bound took the result's own rounding into account.)"""
    import json

    tune_kernels = _import_tuner()
    small = {role: cands[:2] for role, cands in tune_kernels.CANDIDATES.items()}
    monkeypatch.setattr(tune_kernels, "CANDIDATES", small)
    bad = {role: cands[0] for role, cands in small.items()}  # the fastest candidate of each role computes wrongly
    everything_wrong = False
    current = []

    def corrupt(t):  # a 10 % error in the rows of one sample
        t = t.clone()
        t[: max(1, t.shape[0] // 4)] *= 1.10
        return t

    real = {name: getattr(K, name) for name in ("shrink", "expand", "grad_basis")}

    def wrapped(name):
        def call(*a, **kw):
            role = {"shrink": "shrink_dy" if kw.get("u_in") is not None else "shrink",
                    "expand": "expand_dx" if kw.get("weight_layout") == "in_out" else "expand",
                    "grad_basis": "grad_basis"}[name]
            out = real[name](*a, **kw)
            current.append((role, kw.get("config")))
            if kw.get("config") != bad[role] and not everything_wrong:
                return out
            if role == "shrink":
                return out[0], corrupt(out[1])
            if role == "shrink_dy":
                return out[0], out[1], corrupt(out[2])
            if role == "grad_basis":
                return out[0], corrupt(out[1])
            return corrupt(out)
        return call

    for name in real:
        monkeypatch.setattr(K, name, wrapped(name))
    timed = []

    def fake_bench(fn, n_inputs=1):
        current.clear()
        fn(0)
        if fn.__name__ in ("fused", "composed"):
            return 1.0 if fn.__name__ == "fused" else 2.0
        role, cfg = current[-1]
        timed.append((role, cfg))
        return 1.0 if cfg == bad[role] else 2.0 if cfg in small[role] else 3.0

    monkeypatch.setattr(tune_kernels, "_bench", fake_bench)
    out = tmp_path / "sm_test.json"
    table = json.loads(K.config_path("default").read_text())
    for rule in table["defaults"]:  # starting tiles that are no candidate
        rule["grad_basis"]["split_m"] = 32
    out.write_text(json.dumps(table))
    args = tune_kernels.parse_args(["--layers", "48:40", "--tokens", "64", "--ranks", "8", "--dtypes", dtype,
                                    "--out", str(out)])
    assert tune_kernels.tune(args, device=torch.device("cpu")) == 0
    summary = json.loads((tmp_path / "sm_test_summary.json").read_text())["roles"]
    assert [r["role"] for r in summary] == list(small)
    for r in summary:
        assert r["table_refused"] is None, r  # the committed tiles compute the float64 result
        assert r["adopted"] and r["best"] == small[r["role"]][1], r
        assert (r["role"], bad[r["role"]]) not in timed, f"{r['role']}: the wrong configuration was timed"
        assert [c for c, _ in r["refused"]] == [bad[r["role"]]] and r["refused"][0][1].startswith("wrong result")
    (entry,) = K.validate_table(json.loads(out.read_text()), str(out))["entries"]
    assert all(entry[role] == small[role][1] for role in small)

    # the table's own tiles are the wrong ones now: named, and replaced by a right candidate
    bad.update({role: entry[role] for role in small})
    assert tune_kernels.tune(args, device=torch.device("cpu")) == 0
    summary = json.loads((tmp_path / "sm_test_summary.json").read_text())["roles"]
    for r in summary:
        assert r["table_refused"] and r["table_refused"].startswith("wrong result"), r
        assert r["table_ms"] is None and r["adopted"] and r["best"] == small[r["role"]][0], r

    # every tile wrong (the table's and every candidate's): nothing replaces the table's tiles, so the shape is not
    # written and the table file stays as it was; the summary records the refusals
    everything_wrong = True
    before = out.read_text()
    assert tune_kernels.tune(args, device=torch.device("cpu")) == 0
    assert out.read_text() == before
    summary = json.loads((tmp_path / "sm_test_summary.json").read_text())["roles"]
    assert summary and all(r["table_refused"] and not r["adopted"] for r in summary)


def test_tuner_refuses_a_configuration_that_spills(monkeypatch):
    """On a GPU the tuner reloads the kernels before a configuration's first call and refuses it when a
    specialization it loaded spills registers (the driver's ``n_spills``; the AOT checks fail a table that spills)."""
    tune_kernels = _import_tuner()
    p = random_problem(2, 8, 40, 24, 2, 4, torch.float32, seed=3)
    x = p["x"].reshape(16, 40)
    a_cat = p["lora_a"].permute(0, 2, 1).reshape(8, 40).contiguous()
    b_cat = p["lora_b"].reshape(8, 24).contiguous()
    w, bias, coeffs = p["weight"], p["bias"], p["coeffs"]
    dy = torch.randn(16, 24)
    u, z = K.shrink(x, a_cat, coeffs, 0.5, 8, 4)
    dz = K.shrink(dy, b_cat, coeffs, 0.5, 8, 4, u_in=u, out_features=40)[1]
    refs = tune_kernels.role_references("expand", x, dy, w, bias, a_cat, b_cat, coeffs, 0.5, 8, 4, u, z, dz)
    call = lambda: K.expand(x, w, z, b_cat, bias=bias)  # noqa: E731
    assert tune_kernels.admissible("expand", call, refs, 2, torch.device("cpu")) is None
    forgotten = []
    monkeypatch.setattr(tune_kernels, "forget_loaded_kernels", lambda: forgotten.append(True))
    monkeypatch.setattr(tune_kernels, "loaded_spills", lambda: {"_expand_kernel": 8})
    refused = tune_kernels.admissible("expand", call, refs, 2, torch.device("cuda"))
    assert forgotten and refused == "spills registers: _expand_kernel 8 B"
    assert tune_kernels.admissible("expand", call, refs, 2, torch.device("cpu")) is None  # no spill data on CPU
    monkeypatch.setattr(tune_kernels, "loaded_spills", dict)
    wrong = lambda: K.expand(x, w, z, b_cat, bias=bias) * 1.05  # noqa: E731
    assert tune_kernels.admissible("expand", wrong, refs, 2, torch.device("cuda")).startswith("wrong result: expand y")


# ------------------------------------------------------------------------------------------------------------------
# Mutation-audit additions: cases the kernels' interpreter tests above did not reach.


@pytest.mark.parametrize("tma", [0, 1])
def test_expand_grouped_order_with_a_short_last_group(tma):
    """The expand kernels' grouped tile order (GROUP_M rows of tiles per group) when the last group is short: 3 row
    tiles (M = 37, BLOCK_M = 16) in groups of 2, over 3 column tiles (out = 40, BLOCK_N = 16), so the last group
    holds one row of tiles. Every other test has one row of tiles or a whole number of groups; there a mapping that
    ignored the short group (rows_in_group = GROUP_M) left output tiles unwritten and still passed. ``out`` starts as
    NaN so an unwritten tile shows; y = x W^T + z b_cat + bias against float64, pointer and TMA kernels."""
    g = torch.Generator().manual_seed(41)
    M, k, nout, R = 37, 40, 40, 24
    x, z = torch.randn(M, k, generator=g), torch.randn(M, R, generator=g)
    w, b_cat = torch.randn(nout, k, generator=g), torch.randn(R, nout, generator=g)
    bias = torch.randn(nout, generator=g)
    cfg = dict(block_m=16, block_n=16, block_k=16, group_m=2, tma=tma, num_warps=4, num_stages=2)
    out = torch.full((M, nout), float("nan"))
    y, names = _launched(lambda: K.expand(x, w, z, b_cat, bias=bias, out=out, config=cfg))
    assert names == ["_expand_tma_kernel" if tma else "_expand_kernel"]
    x64, z64 = x.double(), z.double()
    want = x64 @ w.double().t() + z64 @ b_cat.double() + bias.double()
    want_abs = x64.abs() @ w.double().abs().t() + z64.abs() @ b_cat.double().abs() + bias.double().abs()
    assert_within_bound("y", y, want, want_abs, torch.float32, k + R)


@pytest.mark.parametrize("tma", [0, 1])
def test_expand_reads_a_base_by_its_own_row_stride(tma):
    """The expand epilogue reads ``base`` by its own row stride: a base (add_to) that is a column slice of a wider
    tensor (row stride 40 for 29 or 24 columns) reaches the kernel as a view, while every other test's base has the
    output's row stride, where reading it with the output's stride passed. Through mixed_lora_delta(add_to=...)
    (the pointer kernel of the fused route) and through the expand launcher (pointer and persistent TMA kernels)."""
    g = torch.Generator().manual_seed(43)
    if not tma:
        p = random_problem(2, 7, 37, 29, 3, 4, torch.float32, seed=5)
        assert K.choose_route(37, 29, 12, torch.float32, 7, "default", rank=4) == "fused"
        wide = torch.randn(2, 7, 40, generator=g)
        add_to = wide[..., 5:34]
        assert add_to.stride() == (280, 40, 1)
        args = (p["lora_a"], p["lora_b"], p["coeffs"], p["scale"])
        got = lf.mixed_lora_delta(p["x"], *args, add_to=add_to, backend="triton")
        want = add_to.double() + reference.mixed_lora_delta(p["x"], *args)
        want_abs = add_to.double().abs() + reference.mixed_lora_delta(p["x"].abs(), p["lora_a"].abs(),
                                                                      p["lora_b"].abs(), p["coeffs"].abs(), p["scale"])
        assert_within_bound("add_to (strided)", got, want, want_abs, torch.float32, 37 + 12)
    M, nout, R = 21, 24, 24
    z, b_cat = torch.randn(M, R, generator=g), torch.randn(R, nout, generator=g)
    base = torch.randn(M, 40, generator=g)[:, 8:8 + nout]
    assert base.stride() == (40, 1)
    cfg = dict(block_m=16, block_n=16, block_k=16, group_m=2, tma=tma, num_warps=4, num_stages=2)
    y, names = _launched(lambda: K.expand(None, None, z, b_cat, base=base, config=cfg))
    assert names == ["_expand_tma_kernel" if tma else "_expand_kernel"]
    want = base.double() + z.double() @ b_cat.double()
    want_abs = base.double().abs() + z.double().abs() @ b_cat.double().abs()
    assert_within_bound("base + z b_cat", y, want, want_abs, torch.float32, R)


def test_row_strided_input_and_output_gradient():
    """x a column slice of a wider tensor (row stride 45 for in = 37) and an output gradient that is a column slice
    too (y concatenated with another tensor: row stride 29 + 6): both reach the kernels as 2-D views whose row
    stride is not their width, which no other test gives the expand (x, then dy as its X1) or grad_basis (x and dy);
    reading them with the width as the row stride passed everywhere else. The output against float64, and the output
    and every gradient bit for bit against the same layer on contiguous copies (same tiles, same order)."""
    p = random_problem(2, 7, 37, 29, 3, 4, torch.float32, seed=44)
    assert K.choose_route(37, 29, 12, torch.float32, 7, "default", rank=4) == "fused"
    g = torch.Generator().manual_seed(44)
    wide = torch.randn(2, 7, 45, generator=g)
    wide[..., 4:41] = p["x"]
    dy_wide = torch.randn(2, 7, 35, generator=g)

    def run(strided):
        leaves = [(wide if strided else p["x"]).clone().requires_grad_(True)] + [
            p[k].clone().requires_grad_(True) for k in ("lora_a", "lora_b", "coeffs")]
        x = leaves[0][..., 4:41] if strided else leaves[0]
        assert (x.stride(1) == 45) == strided
        y = lf.lorweb_linear(x, p["weight"], p["bias"], *leaves[1:], p["scale"], backend="triton")
        if strided:
            torch.cat([y, torch.zeros(2, 7, 6)], -1).backward(dy_wide)
        else:
            y.backward(dy_wide[..., :29].contiguous())
        dx = leaves[0].grad[..., 4:41] if strided else leaves[0].grad
        return [y.detach(), dx] + [t.grad for t in leaves[1:]]

    got, want = run(True), run(False)
    check_forward("y of a row-strided x", got[0], p)
    for name, a, b in zip(("y", "x", "lora_a", "lora_b", "coeffs"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("tma", [0, 1])
def test_expand_accumulates_in_fp32_for_bf16_outputs(tma):
    """The expand's accumulator stays fp32 across its K loop for a bf16 output: x = [1, 2^-13, ..., 2^-13] (K = 1024)
    against all-ones weights, so every BLOCK_K = 16 step adds 2^-9, under half a bf16 ulp of 1 (2^-8). Rounded to
    bf16 after each step the sum would stay at 1.0 instead of 1 + 1023 * 2^-13 ~ 1.125, an error of 2.4x the bf16
    bound; other tests caught this only by comparing the pointer and TMA kernels bit for bit. Pointer and TMA."""
    M, k, nout, R = 16, 1024, 16, 16
    x = torch.full((M, k), 2.0 ** -13, dtype=torch.bfloat16)
    x[:, 0] = 1.0
    w = torch.ones(nout, k, dtype=torch.bfloat16)
    z, b_cat = torch.zeros(M, R, dtype=torch.bfloat16), torch.zeros(R, nout, dtype=torch.bfloat16)
    cfg = dict(block_m=16, block_n=16, block_k=16, group_m=1, tma=tma, num_warps=4, num_stages=2)
    y, names = _launched(lambda: K.expand(x, w, z, b_cat, config=cfg))
    assert names == ["_expand_tma_kernel" if tma else "_expand_kernel"]
    want = (x.double() @ w.double().t())
    assert want[0, 0].item() == 1 + 1023 * 2.0 ** -13
    assert_within_bound("y", y, want, want.abs(), torch.bfloat16, k + R)


def test_compile_and_functorch_reverse_mode_are_refused_by_name():
    """The real interpreter path of two refusals (tests/test_ops_guards.py checks their logic on a stand-in):
    torch.compile's AOT graph capture (aot_eager here; inductor too) of backend='triton' on CPU names the interpreter
    instead of returning uninitialised memory (dynamo alone, backend="eager", runs it), and torch.func.grad names the
    fused backends instead of torch's setup_context error; eager calls and torch.autograd.grad work and match."""
    p = _problem(CASES[0], torch.float32)
    args = (p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"])
    want_y = lf.lorweb_linear(p["x"], *args, backend="triton")
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        compiled = torch.compile(lambda x: lf.lorweb_linear(x, *args, backend="triton"), backend=backend,
                                 fullgraph=True)
        if backend == "eager":  # dynamo alone calls the op itself: the interpreter runs
            assert torch.equal(compiled(p["x"]), want_y)
            continue
        with pytest.raises(Exception, match="cannot record Triton's CPU interpreter"):
            compiled(p["x"])
    with pytest.raises(NotImplementedError, match="torch.func.grad / vjp / jacrev through lorweb_fast's fused"):
        torch.func.grad(lambda x: lf.lorweb_linear(x, *args, backend="triton").sum())(p["x"])
    x = p["x"].clone().requires_grad_(True)
    got, = torch.autograd.grad(lf.lorweb_linear(x, *args, backend="triton").sum(), x)
    want = torch.func.grad(lambda x: lf.lorweb_linear(x, *args, backend="torch").sum())(p["x"])
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_the_raw_op_backward_applies_its_scale():
    """torch.ops.lorweb_fast.triton_fwd called directly with scale 0.75 (the public functions fold the scale into the
    coefficients and pass 1): dx, the basis gradients and dcoeffs carry the scale, as the torch backend's do."""
    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32, seed=5)
    dy = torch.randn(10, 19, generator=torch.Generator().manual_seed(6))

    def grads(call):
        leaves = [p["x"].reshape(10, 17).clone(), p["lora_a"].clone(), p["lora_b"].clone(), p["coeffs"].float().clone()]
        for t in leaves:
            t.requires_grad_(True)
        call(*leaves).backward(dy)
        return [t.grad for t in leaves]

    got = grads(lambda x, a, b, c: torch.ops.lorweb_fast.triton_fwd(x, p["weight"], p["bias"], None, a, b, c, 0.75,
                                                                      5)[0])
    want = grads(lambda x, a, b, c: lf.lorweb_linear(x.view(2, 5, 17), p["weight"], p["bias"], a, b, c, 0.75,
                                                     backend="torch").reshape(10, 19))
    tol = tolerance(torch.float32, 17 + 19 + 12)
    for name, g, w in zip(("dx", "d_lora_a", "d_lora_b", "dcoeffs"), got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=name)


def test_each_kernel_role_looks_up_its_own_tiles():
    """forward and backward ask the configuration table for each role's tiles under the role's own (in, out) key:
    shrink, expand, shrink_dy, expand_dx and grad_basis of a 17 -> 19 layer all use (17, 19). The default table has
    the same tiles for every role, so only the lookups show a swapped role or key (sm90.json's differ)."""
    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32, seed=5)
    calls, real = [], K.kernel_config

    def spy(kernel, in_features, out_features, *args, **kwargs):
        calls.append((kernel, in_features, out_features))
        return real(kernel, in_features, out_features, *args, **kwargs)

    x, c = p["x"].reshape(10, 17), p["coeffs"].float()
    try:
        K.kernel_config = spy
        y, u, z = K.forward(x, p["weight"], p["bias"], None, p["lora_a"], p["lora_b"], c, 0.75, 5)
        K.backward(torch.randn_like(y), x, p["weight"], p["lora_a"], p["lora_b"], c, u, z, 0.75, 5)
    finally:
        K.kernel_config = real
    assert calls == [(role, 17, 19) for role in ("shrink", "expand", "shrink_dy", "expand_dx", "grad_basis")]


def test_a_feature_major_input_gets_exact_gradients():
    """A 3-D x laid out feature-major (``randn(in, B, S).permute(1, 2, 0)``: its (M, in) view has a column stride of
    M, not 1) reaches the basis-gradient kernel through a unit-column copy: forward and every gradient match the
    float64 reference."""
    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32, seed=5)
    p["x"] = p["x"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert p["x"].reshape(-1, 17).stride() == (1, 10)
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"), p)
