"""GPU suite: the fused backends on CUDA against the float64 reference, opcheck, CUDA graphs and torch.compile.

Skipped when no CUDA GPU is present (CI); run it on a lent GPU with `pytest -m gpu`."""

import pytest
import torch

import lorweb_fast as lf
from lorweb_fast import ops
from lorweb_fast.testing import (assert_within_bound, case_id, check_against_reference, load_module_from_file,
                                 odd_shape_cases, partial_gradients, random_problem, spread_cases, tolerance)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
CASES = odd_shape_cases()
FUSED = ["triton", "cuda"]


def _require(backend):
    why = ops._unavailable_reason(backend, torch.device("cuda"))
    if why is not None:
        pytest.fail(f"backend {backend!r} must be usable on a GPU machine: {why}")


def _problem(case, **kw):
    return random_problem(case["batch"], case["seq"], case["in_features"], case["out_features"], case["num_loras"],
                          case["rank"], kw.get("dtype", case["dtype"]), device="cuda", seed=case["seed"])


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 matmuls without TF32 (torch's fp32_precision API: reading the legacy allow_tf32 raises once a process
    has used the new one, as the benchmarks' tf32_off does)."""
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    yield
    torch.backends.cuda.matmul.fp32_precision = old


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lorweb_linear_on_gpu(backend, case):
    _require(backend)
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend=backend), _problem(case))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", spread_cases(), ids=case_id)  # 2-D and 3-D, fp32 and bf16
def test_mixed_lora_delta_on_gpu(backend, case):
    _require(backend)
    check_against_reference(lambda *a: lf.mixed_lora_delta(*a, backend=backend), _problem(case), with_base=False)


@pytest.mark.parametrize("backend", FUSED)
def test_fp16_and_large_shape(backend):
    _require(backend)
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend=backend),
                            random_problem(2, 301, 515, 771, 32, 4, torch.float16, device="cuda"))
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend=backend),
                            random_problem(3, 333, 1027, 1029, 32, 8, torch.bfloat16, device="cuda", seed=3))


def test_default_backend_on_gpu_is_the_extension_then_triton(monkeypatch):
    """backend=None on CUDA tensors: the CUDA extension when it runs on this GPU, else triton."""
    _require("triton")
    cuda_ok = ops._unavailable_reason("cuda", torch.device("cuda")) is None
    assert ops.resolve_backend(None, torch.device("cuda")) == ("cuda" if cuda_ok else "triton")
    monkeypatch.setattr(ops, "_CUDA_EXT", None)  # an install without the extension
    assert ops.resolve_backend(None, torch.device("cuda")) == "triton"


@pytest.mark.parametrize("backend", FUSED)
def test_cuda_graph_capture_and_replay(backend):
    _require(backend)
    p = random_problem(2, 129, 257, 191, 32, 4, torch.bfloat16, device="cuda")
    args = (p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"])
    eager = lf.lorweb_linear(*args, backend=backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            lf.lorweb_linear(*args, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = lf.lorweb_linear(*args, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    p["coeffs"].copy_(p["coeffs"].flip(0))  # new coefficients in the same buffer: the replay must follow them
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, lf.lorweb_linear(*args, backend=backend))


def test_opcheck_all_ops():
    _require("triton")
    _require("cuda")
    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32, device="cuda", seed=11)
    x = p["x"].reshape(10, 17)
    for ns in ("lorweb_fast", "lorweb_fast_cuda"):
        fwd = torch.ops.lorweb_fast.triton_fwd if ns == "lorweb_fast" else torch.ops.lorweb_fast_cuda.fwd
        bwd = torch.ops.lorweb_fast.triton_bwd if ns == "lorweb_fast" else torch.ops.lorweb_fast_cuda.bwd
        for weight, bias, base in ((p["weight"], p["bias"], None), (None, None, torch.randn(10, 19, device="cuda"))):
            args = (x, weight, bias, base, p["lora_a"], p["lora_b"], p["coeffs"].float(), 0.75, 5)
            torch.library.opcheck(fwd.default, args)
            y, u, z = fwd(*args)
            bwd_args = (torch.randn_like(y), x, weight, p["lora_a"], p["lora_b"], p["coeffs"].float(), u, z, 0.75, 5)
            torch.library.opcheck(bwd.default, bwd_args)
            torch.library.opcheck(bwd.default, bwd_args + (False, False))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("needs", [(False, True, True, True), (True, False, False, True), (False, False, False, True),
                                   (True, False, True, True), (True, True, False, True)],
                         ids=lambda n: "".join("xabc"[i] for i in range(4) if n[i]))
def test_backward_computes_only_what_autograd_needs_on_gpu(backend, needs):
    """An input that needs no gradient gets none and costs no GEMM: the op's backward returns an empty (0,) tensor
    in its place, and the gradients it does compute are bitwise those of the all-gradients backward."""
    _require(backend)
    p = random_problem(2, 300, 160, 200, 3, 4, torch.bfloat16, device="cuda", seed=12)
    dy = torch.randn(2, 300, 200, device="cuda").to(torch.bfloat16)
    full, _ = partial_gradients(p, (True,) * 4, backend, dy)
    got, outputs = partial_gradients(p, needs, backend, dy)
    for name, g, want, needed in zip(("x", "lora_a", "lora_b", "coeffs"), got, full, needs):
        assert (g is not None) == needed, name
        if needed:
            assert torch.equal(g, want), name
    basis = needs[1] or needs[2]
    assert outputs == [[(600, 160) if needs[0] else (0,), (3, 160, 4) if basis else (0,),
                        (3, 4, 200) if basis else (0,), (2, 3)]]


@pytest.mark.parametrize("backend", FUSED)
def test_compile_no_graph_breaks_no_recompiles_on_gpu(backend):
    _require(backend)
    from pathlib import Path

    helpers = load_module_from_file(Path(__file__).with_name("test_compile.py"), "compile_helpers")
    torch._dynamo.reset()
    m = helpers.make_model("cuda").to(torch.bfloat16)
    for layer in lf.lorweb_layers(m).values():
        layer.backend = backend
    lf.set_query(m, torch.randn(2, 10, device="cuda"))
    x, temb = torch.randn(2, 5, 24, device="cuda", dtype=torch.bfloat16), torch.randn(2, 24, device="cuda",
                                                                                        dtype=torch.bfloat16)
    explanation = torch._dynamo.explain(m)(x, temb)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    tol = tolerance(torch.bfloat16, 0)  # compiled and eager differ only by bf16 roundings of fused epilogues
    torch.testing.assert_close(compiled(x, temb), m(x, temb), rtol=tol, atol=tol)

    def later():
        for batch, seq in ((2, 5), (3, 7), (4, 9)):
            lf.set_query(m, torch.randn(batch, 10, device="cuda"))
            xx = torch.randn(batch, seq, 24, device="cuda", dtype=torch.bfloat16)
            tt = torch.randn(batch, 24, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(compiled(xx, tt), m(xx, tt), rtol=tol, atol=tol)

    assert helpers.count_compiles(later) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("num_loras,rank", [(32, 4), (3, 3), (5, 1)])  # R = 128 (16-byte loads), 9 and 5 (scalar)
def test_cuda_extension_many_chunks_against_reference(dtype, num_loras, rank):
    """lorweb_fast._C with rows_per_sample spanning many row chunks of the dcoeffs kernel, on the vector and the
    scalar load paths, against the float64 reference (forward and every gradient). 2500 rows per sample: 79 chunks
    of 32 rows, so the dcoeffs reduce's block (256 threads) takes more than one pass over the r * 79 terms for
    r >= 4."""
    _require("cuda")
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="cuda"),
                            random_problem(2, 2500, 96, 80, num_loras, rank, dtype, device="cuda", seed=5))
    check_against_reference(lambda *a: lf.mixed_lora_delta(*a, backend="cuda"),
                            random_problem(3, 77, 40, 24, num_loras, rank, dtype, device="cuda", seed=6),
                            with_base=False)


# sequences whose length is a multiple of every backward K1 block height (32 fp32; 64 / 128 bf16; the split-K finish
# kernel's 32): K1 writes one dcoeffs partial per program (DC_PER_BLOCK), the path real FLUX sequences (4096, 4608
# tokens) take; the odd shapes above take the per-row partials. 12288 <-> 3072 bf16 have TMA shrink_dy entries.
PER_BLOCK_CASES = [(2, 256, 12288, 3072, torch.bfloat16), (2, 256, 3072, 12288, torch.bfloat16),
                   (3, 128, 3072, 3072, torch.bfloat16), (2, 64, 520, 776, torch.float32)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("batch, seq, in_features, out_features, dtype", PER_BLOCK_CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
def test_backward_with_one_dcoeffs_partial_per_program(backend, batch, seq, in_features, out_features, dtype):
    """Forward and every gradient against float64 where K1 writes per-program dcoeffs partials (rows_per_sample a
    multiple of its block height), including the TMA K1 at 12288 <-> 3072; and for triton, directly: the partials
    have M / block_m rows (the per-block path ran) and sum per sample to the float64 coefficient gradient."""
    _require(backend)
    p = random_problem(batch, seq, in_features, out_features, 32, 4, dtype, device="cuda", seed=11)
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend=backend), p)
    if backend != "triton":
        return
    from lorweb_fast.kernels import mixed_lora as K

    x = p["x"].reshape(-1, in_features)
    a_cat, b_cat = K.pack_basis(p["lora_a"], p["lora_b"])
    u, _ = K.shrink(x, a_cat, p["coeffs"], p["scale"], seq, 4, out_features=out_features)
    dy = torch.randn(batch * seq, out_features, device="cuda").to(dtype)
    block_m = K.kernel_config("shrink_dy", in_features, out_features, 128, dtype, K._family(dy, None))["block_m"]
    for split in (1, 3):
        config = None if split == 1 else {**K.kernel_config("shrink_dy", in_features, out_features, 128, dtype,
                                                            K._family(dy, None)), "split_k": 3, "tma": 0}
        _, dzs, dc = K.shrink(dy, b_cat, p["coeffs"], p["scale"], seq, 4, u_in=u, config=config,
                              out_features=in_features)
        group = block_m if split == 1 else K.SHRINK_FINISH_BLOCK_M
        assert seq % group == 0 and dc.shape == (batch * seq // group, 32)
        # dcoeffs[b, n] = scale * sum over the sample's rows of sum_j u[m, n r + j] * (dy B_cat^T)[m, n r + j]
        dz = dy.double() @ b_cat.double().t()
        terms = (u.double() * dz).view(batch, seq, 32, 4).sum(-1) * p["scale"]
        want = terms.sum(1)
        bound = ((u.double().abs() * (dy.double().abs() @ b_cat.double().abs().t())).view(batch, seq, 32, 4)
                 .sum(-1).sum(1) * abs(p["scale"]))
        assert_within_bound(f"dcoeffs split {split}", dc.view(batch, -1, 32).sum(1), want, bound, dtype,
                            out_features + seq * 4)


@pytest.mark.parametrize("backend", FUSED)
def test_forward_and_backward_are_deterministic(backend):
    """Every reduction has a fixed order (no atomics; split-M / split-K partials added in slice order): repeated
    forwards and backwards at a shape with many programs per output are bit-identical. (Moved here from the
    interpreter suite, where programs run one after another and the check could not fail.)"""
    _require(backend)
    for seq, out_features in ((2500, 1000), (2048, 3072)):  # per-row and per-program dcoeffs partials
        _check_deterministic(backend, seq, out_features)


def _check_deterministic(backend, seq, out_features):
    p = random_problem(2, seq, 3072, out_features, 32, 4, torch.bfloat16, device="cuda", seed=8)
    dy = torch.randn(2, seq, out_features, device="cuda").to(torch.bfloat16)
    runs = []
    for _ in range(3):
        leaves = {n: p[n].clone().requires_grad_(True) for n in ("x", "weight", "bias", "lora_a", "lora_b", "coeffs")}
        y = lf.lorweb_linear(*(leaves[n] for n in ("x", "weight", "bias", "lora_a", "lora_b", "coeffs")), p["scale"],
                             backend=backend)
        y.backward(dy)
        runs.append([y.detach()] + [leaves[n].grad for n in leaves])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_cuda_extension_backward_is_deterministic():
    """The coefficient-gradient reduction has a fixed order (no atomics): repeated backwards are bit-identical."""
    _require("cuda")
    p = random_problem(4, 2048, 256, 192, 32, 4, torch.bfloat16, device="cuda", seed=7)
    x = p["x"].reshape(-1, 256)
    y, u, z = torch.ops.lorweb_fast_cuda.fwd(x, p["weight"], p["bias"], None, p["lora_a"], p["lora_b"],
                                             p["coeffs"].float(), 0.75, 2048)
    dy = torch.randn_like(y)
    runs = [torch.ops.lorweb_fast_cuda.bwd(dy, x, p["weight"], p["lora_a"], p["lora_b"], p["coeffs"].float(), u, z,
                                           0.75, 2048) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_cuda_extension_bias_and_base_together():
    """fwd with weight, bias and base all given adds each exactly once."""
    _require("cuda")
    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32, device="cuda", seed=11)
    x = p["x"].reshape(10, 17)
    base = torch.randn(10, 19, device="cuda")
    args = (x, p["weight"], p["bias"], base, p["lora_a"], p["lora_b"], p["coeffs"].float(), 0.75, 5)
    y, _, _ = torch.ops.lorweb_fast_cuda.fwd(*args)
    y_no_base, _, _ = torch.ops.lorweb_fast_cuda.fwd(x, p["weight"], p["bias"], None, *args[4:])
    torch.testing.assert_close(y, y_no_base + base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("coeffs_shape, message", [((), "coeffs must be 2-D"), ((2, 3, 1), "coeffs must be 2-D"),
                                                    ((2, 4), "coeffs must be \\(B, N=3\\)")])
def test_cuda_extension_op_names_a_bad_coeffs_shape(coeffs_shape, message):
    """The extension's ops called directly (below lorweb_fast's own checks) refuse coefficients that are not (B, N)
    with a message naming them (a 0-D tensor was indexed before its rank was checked: c10 IndexError)."""
    _require("cuda")
    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32, device="cuda", seed=11)
    coeffs = torch.rand(coeffs_shape, device="cuda")
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lorweb_fast_cuda.fwd(p["x"].reshape(10, 17), p["weight"], p["bias"], None, p["lora_a"],
                                       p["lora_b"], coeffs, 0.75, 5)


def test_public_launchers_on_gpu():
    """pack_basis / shrink / expand / grad_basis at an odd shape with R = 96 (64 + 32 chunks), bf16, vs float64."""
    _require("triton")
    from lorweb_fast.kernels import mixed_lora as K

    p = random_problem(2, 500, 520, 776, 24, 4, torch.bfloat16, device="cuda", seed=5)
    x = p["x"].reshape(1000, 520)
    a_cat, b_cat = K.pack_basis(p["lora_a"], p["lora_b"])
    u, z = K.shrink(x, a_cat, p["coeffs"], p["scale"], 500, 4)
    scaling = (p["coeffs"].double() * p["scale"]).repeat_interleave(4, 1).repeat_interleave(500, 0)
    u_ref = x.double() @ a_cat.double().t()
    u_abs = x.double().abs() @ a_cat.double().abs().t()
    assert_within_bound("u", u, u_ref, u_abs, torch.bfloat16, 520)
    # signed coefficients: the bound scales with |alpha * scale|
    assert_within_bound("z", z, u_ref * scaling, u_abs * scaling.abs(), torch.bfloat16, 520)
    y = K.expand(x, p["weight"], z, b_cat, bias=p["bias"])
    y_ref = x.double() @ p["weight"].double().t() + p["bias"].double() + z.double() @ b_cat.double()
    y_abs = (x.double().abs() @ p["weight"].double().abs().t() + p["bias"].double().abs()
             + z.double().abs() @ b_cat.double().abs())
    assert_within_bound("y", y, y_ref, y_abs, torch.bfloat16, 520 + 96)
    dy = torch.randn(1000, 776, device="cuda", dtype=torch.bfloat16)
    d_a, d_b = K.grad_basis(z, x, z, dy, 4)  # z stands in for dZ * scaling
    want_a = (z.double().t() @ x.double()).view(24, 4, 520).transpose(1, 2)
    want_b = (z.double().t() @ dy.double()).view(24, 4, 776)
    bound_a = (z.double().abs().t() @ x.double().abs()).view(24, 4, 520).transpose(1, 2)
    bound_b = (z.double().abs().t() @ dy.double().abs()).view(24, 4, 776)
    assert_within_bound("d_a", d_a, want_a, bound_a, torch.bfloat16, 1000)
    assert_within_bound("d_b", d_b, want_b, bound_b, torch.bfloat16, 1000)


@pytest.mark.parametrize("route", ["fused", "composed", "cublas"])
def test_every_route_on_gpu(route, monkeypatch):
    _require("triton")
    from lorweb_fast.kernels import mixed_lora as K

    monkeypatch.setattr(K, "choose_route", lambda *a, **k: route)
    for dtype in (torch.bfloat16, torch.float32):
        check_against_reference(lambda *a: lf.lorweb_linear(*a, backend="triton"),
                                random_problem(2, 300, 515, 771, 24, 4, dtype, device="cuda", seed=2))


def test_split_k_on_gpu():
    _require("triton")
    from lorweb_fast.kernels import mixed_lora as K

    p = random_problem(2, 777, 3072, 64, 32, 4, torch.bfloat16, device="cuda", seed=6)
    x = p["x"].reshape(-1, 3072)
    a_cat, _ = K.pack_basis(p["lora_a"], p["lora_b"])
    cfg = dict(block_m=64, block_k=64, split_k=1, num_warps=8, num_stages=3)
    u1, z1 = K.shrink(x, a_cat, p["coeffs"], p["scale"], 777, 4, config=cfg)
    u3, z3 = K.shrink(x, a_cat, p["coeffs"], p["scale"], 777, 4, config={**cfg, "split_k": 3})
    tol = tolerance(torch.bfloat16, 3072)
    torch.testing.assert_close(u3, u1, rtol=tol, atol=tol)
    torch.testing.assert_close(z3, z1, rtol=tol, atol=tol)
    assert torch.equal(K.shrink(x, a_cat, p["coeffs"], p["scale"], 777, 4, config={**cfg, "split_k": 3})[1], z3)


def test_offsets_beyond_2_pow_31_on_gpu():
    """M * ld >= 2**31: a (M, 64) view with row stride 8192 over 4.3 GB; the last rows must be right."""
    _require("triton")
    from lorweb_fast.kernels import mixed_lora as K

    rows, ld = 2 ** 31 // 8192 + 256, 8192
    storage = torch.zeros(rows, ld, device="cuda", dtype=torch.bfloat16)
    x = storage[:, :64]
    x[-300:] = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16)
    a_cat = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    b_cat = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    coeffs = torch.rand(1, 4, device="cuda")
    u, z = K.shrink(x, a_cat, coeffs, 1.0, rows, 4)
    tail, a64, b64 = x[-300:].double(), a_cat.double(), b_cat.double()
    assert_within_bound("u tail", u[-300:].cpu(), (tail @ a64.t()).cpu(), (tail.abs() @ a64.abs().t()).cpu(),
                        torch.bfloat16, 64)
    out = storage[:, 64:128]
    K.expand(None, None, z, b_cat, out=out)
    z64 = z[-300:].double()
    assert_within_bound("out tail", out[-300:].cpu(), (z64 @ b64).cpu(), (z64.abs() @ b64.abs()).cpu(),
                        torch.bfloat16, 16)
    del storage


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(2, 0), (0, 5)])
@pytest.mark.parametrize("in_features, out_features", [(3072, 3072), (12288, 3072)])
def test_empty_inputs_at_a_tma_shape(backend, shape, in_features, out_features):
    """No rows ((B, 0, in) or B = 0) at 3072 -> 3072 bf16 (sm_90 entries: TMA expands) and 12288 -> 3072 (TMA in
    all four roles, shrinks included): forward and backward give empty outputs and zero basis / coefficient
    gradients (no descriptor for an empty operand; the extension accepts rows_per_sample 0)."""
    _require(backend)
    p = random_problem(max(shape[0], 1), 1, in_features, out_features, 32, 4, torch.bfloat16, device="cuda", seed=2)
    x = torch.empty(*shape, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    coeffs = p["coeffs"][:shape[0]].clone().requires_grad_(True)
    lora_a = p["lora_a"].clone().requires_grad_(True)
    lora_b = p["lora_b"].clone().requires_grad_(True)
    y = lf.lorweb_linear(x, p["weight"], p["bias"], lora_a, lora_b, coeffs, p["scale"], backend=backend)
    assert y.shape == (*shape, out_features)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for grad in (lora_a.grad, lora_b.grad, coeffs.grad):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", FUSED)
def test_2d_input_with_more_rows_than_a_grid_dimension(backend):
    """A 2-D input has one row per sample: 70000 samples exceed CUDA's 65535 grid.y (the extension's dcoeffs kernel
    launches in slices); forward and every gradient against float64. (For triton a 2-D input takes the all-cuBLAS
    route, and its grids put rows on axis 0, which has no such limit: that case checks the route, not a slicing.)"""
    _require(backend)
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend=backend),
                            random_problem(70000, None, 64, 40, 3, 4, torch.float32, device="cuda", seed=6))


@pytest.mark.parametrize("backend", FUSED)
def test_strided_bias_and_broadcast_gradient_at_a_tma_shape(backend):
    """A bias that is a column of a bigger tensor, and an output gradient with row stride 0 (the gradient of a sum
    over rows), at 3072 -> 3072 bf16 (TMA tables): the output and every gradient against float64.

    Checked apart: with a row-stride-0 gradient the bias gradient is 300 copies of one bf16 value summed exactly in
    fp32, then rounded once, and |ref| = sqrt(300) * rss there, so that one rounding alone exceeds the statistical
    bound (seen on CPU with the torch backend: 8.4 eps x rss against 8); the strided bias with a random gradient, and
    the broadcast gradient without a bias, keep both cases (TMA epilogue reading the strided bias; the stride-0 dy
    taking the pointer kernels)."""
    _require(backend)

    def strided(bias):  # stride 2, the same values, differentiable
        return torch.stack([bias, torch.zeros_like(bias)], 1)[:, 0]

    check_against_reference(lambda x, w, b, *rest: lf.lorweb_linear(x, w, strided(b), *rest, backend=backend),
                            random_problem(1, 300, 3072, 3072, 32, 4, torch.bfloat16, device="cuda", seed=9))
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend=backend),
                            random_problem(1, 300, 3072, 3072, 32, 4, torch.bfloat16, device="cuda", seed=9,
                                           bias=False), broadcast_dy=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", FUSED)
def test_layers_on_a_second_gpu_run_there(backend):
    """Tensors on cuda:1 while cuda:0 is current (a device_map placement): the kernels run on cuda:1."""
    _require(backend)
    problem = random_problem(2, 33, 64, 40, 3, 4, torch.bfloat16, device="cuda:1", seed=8)
    assert torch.cuda.current_device() == 0
    check_against_reference(lambda *a: lf.lorweb_linear(*a, backend=backend), problem)


@pytest.mark.parametrize("backend", FUSED)
def test_add_to_gets_the_output_gradient_on_gpu(backend):
    """y = add_to + delta (bitsandbytes and hooked bases): d add_to is the output gradient exactly; the delta's
    gradients against float64."""
    _require(backend)
    p = random_problem(2, 301, 515, 771, 32, 4, torch.bfloat16, device="cuda", seed=11)
    base = torch.randn(2, 301, 771, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = lf.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"], add_to=base, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.equal(base.grad, dy)
    zeros = torch.zeros(2, 301, 771, device="cuda", dtype=torch.bfloat16)
    check_against_reference(lambda *a: lf.mixed_lora_delta(*a, add_to=zeros, backend=backend), p, with_base=False)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_eager_path_matches_the_registered_op_on_gpu(backend, dtype, monkeypatch):
    """Eager calls run the op bodies directly (the extension's op below the autograd key, the Triton launchers
    without torch.library's dispatch); the registered op path (``ops.EAGER_DIRECT = False``) gives the same output
    and the same gradients bit for bit, for several mixes of inputs needing gradients, 2-D and 3-D, and under
    no_grad; the direct path calls neither the forward nor the backward op (its backward runs the backward body)."""
    _require(backend)
    calls, bwd_calls = [], {"body": 0, "op": 0}
    op = ops._FUSED_OPS[backend]
    monkeypatch.setitem(ops._FUSED_OPS, backend, lambda *a: calls.append(1) or op(*a))
    fwd_body, bwd_body, bwd_op = ops._EAGER_BODIES[backend]

    def counted(kind, fn):
        def wrapper(*a):
            bwd_calls[kind] += 1
            return fn(*a)
        return wrapper

    monkeypatch.setitem(ops._EAGER_BODIES, backend, (fwd_body, counted("body", bwd_body), counted("op", bwd_op)))
    p = random_problem(2, 301, 515, 771, 32, 4, dtype, device="cuda", seed=12)
    dy = torch.randn(2, 301, 771, device="cuda", dtype=dtype)

    def run(direct, needs, two_d, grad=True):
        monkeypatch.setattr(ops, "EAGER_DIRECT", direct)
        calls.clear()
        bwd_calls.update(body=0, op=0)
        leaves = [p[k].clone().requires_grad_(n) for k, n in zip(("x", "lora_a", "lora_b", "coeffs"), needs)]
        x, g = (leaves[0][:, 0], dy[:, 0]) if two_d else (leaves[0], dy)
        with torch.set_grad_enabled(grad):
            y = lf.lorweb_linear(x, p["weight"], p["bias"], *leaves[1:], p["scale"], backend=backend)
        if y.requires_grad:
            y.backward(g)
        return y.detach(), [t.grad for t in leaves], len(calls), dict(bwd_calls)

    for needs in ((True,) * 4, (True, False, False, False), (False, True, True, False), (False, False, False, True)):
        for two_d in (False, True):
            direct, via_op = run(True, needs, two_d), run(False, needs, two_d)
            assert direct[2] == 0 and via_op[2] == 1
            assert direct[3] == {"body": 1, "op": 0}, direct[3]  # the registered path's backward is its own op
            assert via_op[3] == {"body": 0, "op": 0}, via_op[3]
            assert torch.equal(direct[0], via_op[0])
            assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(direct[1], via_op[1])), needs
    assert torch.equal(run(True, (True,) * 4, False, grad=False)[0], run(False, (True,) * 4, False)[0])


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_is_refused_by_name_on_gpu(backend):
    """create_graph=True through a fused backend: a NotImplementedError naming backend='torch'."""
    _require(backend)
    p = random_problem(2, 5, 17, 19, 3, 4, torch.float32, device="cuda", seed=4)
    a = p["lora_a"].clone().requires_grad_(True)
    y = lf.lorweb_linear(p["x"], p["weight"], p["bias"], a, p["lora_b"], p["coeffs"], p["scale"], backend=backend)
    g, = torch.autograd.grad(y.sum(), a, create_graph=True)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        g.sum().backward()
