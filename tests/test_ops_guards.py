"""Guards for lorweb_fast/ops.py found by a mutation audit (CPU only, no GPU, no interpreter).

The fused-path plumbing (``_fused_linear``, ``_eager_fused`` / ``_EagerFusedFunction``, ``_fused_autograd``,
``_fused_input_grads``, ``_eager_direct``, ``_watched``, ``_refuse_unsupported_transforms``) is driven here through a
stand-in fused backend: two torch.library custom ops written in plain torch that follow the documented fwd / bwd op
contract (need flags honoured with empty (0,) tensors), registered with ops' own autograd formula and installed in place
of the Triton ones. The backend choice and availability messages, input validation, the torch backend's dtype handling
and ``compute_coefficients``' checks are tested directly. Expected values come from lorweb_fast.reference (float64).
"""

import itertools
import types

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import lorweb_fast as lf
from lorweb_fast import ops, reference
from lorweb_fast.testing import random_problem

F32_EPS = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------- a stand-in fused backend
def _row_scaling(coeffs, r, scale, rows_per_sample):
    """(M, R) per-row scaling: the torch backend's per-sample column scaling repeated over each sample's rows."""
    return ops.column_scaling(coeffs, r, scale).repeat_interleave(rows_per_sample, dim=0)


def _contract_fwd(x, weight, bias, base, lora_a, lora_b, coeffs, scale, rows_per_sample):
    with torch.autocast(x.device.type, enabled=False):  # as the kernels: in the inputs' dtype, whatever autocast says
        return _contract_fwd_body(x, weight, bias, base, lora_a, lora_b, coeffs, scale, rows_per_sample)


def _contract_fwd_body(x, weight, bias, base, lora_a, lora_b, coeffs, scale, rows_per_sample):
    a_cat, b_cat = ops.concat_basis(lora_a, lora_b)
    u = x @ a_cat
    z = u * _row_scaling(coeffs, lora_a.shape[2], scale, rows_per_sample).to(x.dtype)
    y = z @ b_cat
    if weight is not None:
        y = y + x @ weight.t()
    if bias is not None:
        y = y + bias
    if base is not None:
        y = y + base
    return y, u, z


def _contract_bwd(dy, x, weight, lora_a, lora_b, coeffs, u, z, scale, rows_per_sample, need_dx=True,
                  need_dbasis=True):
    n, k, r = lora_a.shape
    a_cat, b_cat = ops.concat_basis(lora_a, lora_b)
    scaling = _row_scaling(coeffs, r, scale, rows_per_sample).to(x.dtype)
    dz = dy @ b_cat.t()
    du = dz * scaling
    dx = du @ a_cat.t() + (dy @ weight if weight is not None else 0) if need_dx else x.new_empty(0)
    if need_dbasis:
        d_a = (x.t() @ du).reshape(k, n, r).permute(1, 0, 2).contiguous()
        d_b = (z.t() @ dy).reshape(n, r, -1).contiguous()
    else:
        d_a, d_b = x.new_empty(0), x.new_empty(0)
    d_scaling = (dz * u).float().reshape(coeffs.shape[0], rows_per_sample, n, r).sum(dim=(1, 3))
    return dx, d_a, d_b, d_scaling * scale


@torch.library.custom_op("lorweb_ops_guards::fwd", mutates_args=())
def _fake_fwd_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, base: torch.Tensor | None,
                 lora_a: torch.Tensor, lora_b: torch.Tensor, coeffs: torch.Tensor, scale: float,
                 rows_per_sample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _contract_fwd(x, weight, bias, base, lora_a, lora_b, coeffs, scale, rows_per_sample)


@torch.library.custom_op("lorweb_ops_guards::bwd", mutates_args=())
def _fake_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, coeffs: torch.Tensor, u: torch.Tensor, z: torch.Tensor, scale: float,
                 rows_per_sample: int, need_dx: bool = True,
                 need_dbasis: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _contract_bwd(dy, x, weight, lora_a, lora_b, coeffs, u, z, scale, rows_per_sample, need_dx, need_dbasis)


#: what ran, for the ``fused`` fixture: ("op",), ("body",), ("bwd_body", need_dx, need_dbasis), ("bwd_op", ...)
LOG = []


def _logged_bwd_op(*a):
    LOG.append(("bwd_op", *a[10:]))
    return _fake_bwd_op(*a)


_setup, _backward = ops._fused_autograd(_logged_bwd_op)
torch.library.register_autograd("lorweb_ops_guards::fwd", _backward, setup_context=_setup)
ops._register_no_double_backward("lorweb_ops_guards::bwd")


@pytest.fixture
def fused(monkeypatch):
    """backend='triton' on CPU runs the stand-in ops; returns the log of what ran: 'op' (registered forward), 'body'
    (forward body), 'bwd_body', 'bwd_op' with the need flags."""
    log = LOG
    log.clear()
    real_reason = ops._unavailable_reason
    monkeypatch.setattr(ops, "_unavailable_reason",
                        lambda name, device=None: None if name == "triton" else real_reason(name, device))
    monkeypatch.setitem(ops._FUSED_OPS, "triton", lambda *a: log.append(("op",)) or _fake_fwd_op(*a))

    monkeypatch.setitem(ops._EAGER_BODIES, "triton", (
        lambda *a: log.append(("body",)) or _contract_fwd(*a),
        lambda *a: log.append(("bwd_body", *a[10:])) or _contract_bwd(*a),
        _logged_bwd_op))
    return log


def _tol(depth):
    return 8 * F32_EPS + 4 * depth * F32_EPS


def _leaves(p, needs, keys=("x", "weight", "bias", "lora_a", "lora_b", "coeffs")):
    return {k: p[k].clone().requires_grad_(n) for k, n in zip(keys, needs)}


def _want(p, kind, two_d, base, dy):
    """float64 reference output and gradients (None where not needed)."""
    keys = ("x", "weight", "bias", "lora_a", "lora_b", "coeffs")
    d = {k: p[k].detach().double().requires_grad_(True) for k in keys}
    bd = base.detach().double().requires_grad_(True)
    x = d["x"][:, 0] if two_d else d["x"]
    if kind == "linear":
        y = reference.lorweb_linear(x, d["weight"], d["bias"], d["lora_a"], d["lora_b"], d["coeffs"], p["scale"])
    else:
        y = (bd[:, 0] if two_d else bd) + reference.mixed_lora_delta(x, d["lora_a"], d["lora_b"], d["coeffs"],
                                                                     p["scale"])
    y.backward(dy.double())
    grads = {k: d[k].grad for k in keys}
    grads["add_to"] = bd.grad
    return y.detach(), grads


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via_op"])
@pytest.mark.parametrize("two_d", [False, True], ids=["3d", "2d"])
@pytest.mark.parametrize("kind", ["linear", "delta"])
def test_fused_path_output_and_gradients_against_float64(fused, monkeypatch, direct, two_d, kind):
    """The fused-path plumbing around a contract-exact op gives the float64 reference's output and every gradient
    asked for (None for the rest), for every mix of x / lora_a / lora_b / coeffs (and weight, bias, add_to) needing
    a gradient, 3-D (rows_per_sample = S) and 2-D x, scale != 1, on the eager direct path and through the op."""
    monkeypatch.setattr(ops, "EAGER_DIRECT", direct)
    p = random_problem(3, 4, 11, 7, 3, 2, torch.float32, seed=3)
    base_full = torch.randn(3, 4, 7)
    dy_full = torch.randn(3, 4, 7)
    tol = _tol(11 + 6)
    for needs in itertools.product((False, True), repeat=4):
        for wb in ((False, False), (True, True)) if kind == "linear" else ((False, False),):
            fused.clear()
            mask = (needs[0], *wb, *needs[1:])
            leaves = _leaves(p, mask)
            base = base_full.clone().requires_grad_(needs[0])
            x = leaves["x"][:, 0] if two_d else leaves["x"]
            dy = dy_full[:, 0] if two_d else dy_full
            if kind == "linear":
                y = lf.lorweb_linear(x, leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"],
                                     leaves["coeffs"], p["scale"], backend="triton")
            else:
                y = lf.mixed_lora_delta(x, leaves["lora_a"], leaves["lora_b"], leaves["coeffs"], p["scale"],
                                        add_to=base[:, 0] if two_d else base, backend="triton")
            want_y, want_g = _want(p, kind, two_d, base_full, dy)
            torch.testing.assert_close(y.double(), want_y, rtol=tol, atol=tol)
            assert [e[0] for e in fused][:1] == (["body"] if direct else ["op"]), (fused, needs)
            assert y.requires_grad == (any(mask) or (kind == "delta" and needs[0]))
            if y.requires_grad:
                y.backward(dy)
            got = {k: t.grad for k, t in leaves.items()}
            got["add_to"] = base.grad
            for name, g in got.items():
                asked = leaves[name].requires_grad if name in leaves else (kind == "delta" and needs[0])
                assert (g is not None) == asked, (name, needs, wb)
                if asked:
                    torch.testing.assert_close(g.double(), want_g[name], rtol=tol, atol=tol,
                                               msg=lambda m: f"{name} {needs} {wb}: {m}")


def test_backward_asks_the_op_only_for_what_is_needed(fused, monkeypatch):
    """need_dx is x's requires_grad and need_dbasis is (lora_a or lora_b requires grad), on the direct path (backward
    body) and through the registered op (backward op)."""
    p = random_problem(2, 3, 5, 4, 2, 2, torch.float32, seed=1)
    for direct in (True, False):
        monkeypatch.setattr(ops, "EAGER_DIRECT", direct)
        for needs in itertools.product((False, True), repeat=4):
            if not any(needs):
                continue
            fused.clear()
            leaves = _leaves(p, needs, ("x", "lora_a", "lora_b", "coeffs"))
            y = lf.lorweb_linear(leaves["x"], p["weight"], p["bias"], leaves["lora_a"], leaves["lora_b"],
                                 leaves["coeffs"], p["scale"], backend="triton")
            y.sum().backward()
            bwd = [e for e in fused if e[0].startswith("bwd")]
            assert bwd == [("bwd_body" if direct else "bwd_op", needs[0], needs[1] or needs[2])], (needs, bwd)


def test_eager_backward_goes_through_the_op_under_create_graph_and_modes(fused):
    """After a direct forward the backward runs the backward op (not the body) when the gradient is differentiated
    (create_graph=True, refused by name) or a dispatch mode watches, and the body otherwise."""
    p = random_problem(2, 3, 5, 4, 2, 2, torch.float32, seed=2)
    a = p["lora_a"].clone().requires_grad_(True)

    def forward():
        fused.clear()
        return lf.lorweb_linear(p["x"], p["weight"], p["bias"], a, p["lora_b"], p["coeffs"], p["scale"],
                                backend="triton")

    y = forward()
    torch.autograd.grad(y.sum(), a)
    assert [e[0] for e in fused] == ["body", "bwd_body"]
    y = forward()
    g, = torch.autograd.grad(y.sum(), a, create_graph=True)
    assert [e[0] for e in fused] == ["body", "bwd_op"]
    with pytest.raises(NotImplementedError, match="double backward.*backend='torch'"):
        g.sum().backward()

    class Quiet(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    y = forward()
    with Quiet():
        torch.autograd.grad(y.sum(), a)
    assert [e[0] for e in fused] == ["body", "bwd_op"]


def test_no_grad_and_frozen_inputs_skip_autograd(fused):
    """Without autograd (no_grad, or nothing requiring grad) the forward body runs alone and y has no history; one
    input requiring grad among frozen ones is enough for the output to require grad."""
    p = random_problem(2, 3, 5, 4, 2, 2, torch.float32, seed=2)
    with torch.no_grad():
        y = lf.lorweb_linear(p["x"].requires_grad_(True), p["weight"], p["bias"], p["lora_a"], p["lora_b"],
                             p["coeffs"], p["scale"], backend="triton")
    assert not y.requires_grad and y.grad_fn is None
    c = p["coeffs"].clone().requires_grad_(True)
    y = lf.lorweb_linear(p["x"].detach(), p["weight"], p["bias"], p["lora_a"], p["lora_b"], c, p["scale"],
                         backend="triton")
    assert y.requires_grad


# ----------------------------------------------------------------------- what the direct path must stay away from
def test_watched_names_each_mechanism():
    """``_watched`` is False in plain eager code and True under each mechanism it names: a dispatch mode, a torch
    function mode, a functorch transform, a forward-AD level, the autograd profiler, torch.jit tracing."""
    assert not ops._watched()

    class DM(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class FM(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with DM():
        assert ops._watched()
    with FM():
        assert ops._watched()
    seen = []
    torch.func.vmap(lambda t: seen.append(ops._watched()) or t)(torch.ones(2, 3))
    with fwAD.dual_level():
        seen.append(ops._watched())
    with torch.autograd.profiler.profile():
        seen.append(ops._watched())
    torch.jit.trace(lambda t: seen.append(ops._watched()) or t * 2, (torch.ones(2),), check_trace=False)
    assert seen == [True, True, True, True], seen
    assert not ops._watched()


def test_eager_direct_only_for_plain_tensors_and_when_switched_on(monkeypatch):
    """Plain tensors and Parameters take the direct path; a tensor subclass, or EAGER_DIRECT off, does not."""

    class Sub(torch.Tensor):
        pass

    t = torch.ones(2, 3)
    assert ops._eager_direct((t, None, torch.nn.Parameter(torch.ones(3))))
    assert not ops._eager_direct((t, t.as_subclass(Sub)))
    monkeypatch.setattr(ops, "EAGER_DIRECT", False)
    assert not ops._eager_direct((t, None))


def test_forward_mode_ad_is_refused_only_when_a_tangent_is_there():
    """``_eager_direct`` raises for a dual tensor and under torch.func.jvp (also inside vmap); a dual level without a
    dual input, or vmap alone, only sends the call to the registered op."""
    t = torch.ones(3)
    with fwAD.dual_level():
        assert not ops._eager_direct((t, None))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            ops._eager_direct((t, fwAD.make_dual(torch.ones(3), torch.ones(3))))
    out = []
    torch.func.vmap(lambda v: out.append(ops._eager_direct((v,))) or v)(torch.ones(2, 3))
    assert out == [False]
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda v: (ops._eager_direct((v,)), v)[1], (t,), (t,))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.vmap(lambda w: torch.func.jvp(lambda v: (ops._eager_direct((v,)), v)[1], (t,), (w,))[1])(
            torch.ones(2, 3))


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev"])
def test_functorch_reverse_mode_through_a_fused_backend_is_refused_by_name(fused, transform):
    """torch.func.grad / vjp / jacrev cannot run torch.library's autograd registration of the fused ops (torch
    raised an error about autograd.Function.setup_context naming neither the op nor the way out): differentiating
    through them is refused by name; calls that are not differentiated (no_grad, untracked inputs: a frozen teacher)
    still run; the torch backend runs them all, and torch.autograd.grad through the fused backend still works."""
    p = random_problem(2, 3, 9, 6, 3, 2, torch.float32, seed=2)
    args = (p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], 0.5)

    def run(backend, transform):
        f = lambda x: lf.lorweb_linear(x, *args, backend=backend).sum()  # noqa: E731
        if transform == "grad":
            return torch.func.grad(f)(p["x"])
        if transform == "vjp":
            out, pull = torch.func.vjp(f, p["x"])
            return pull(torch.ones_like(out))[0]
        return torch.func.jacrev(f)(p["x"])

    with pytest.raises(NotImplementedError, match=r"torch.func.grad / vjp / jacrev through lorweb_fast's fused "
                                                  r"backends is not supported.*backend='torch'"):
        run("triton", transform)
    want = run("torch", transform)
    # a call that is not differentiated runs: under no_grad, or on inputs the transform does not track
    frozen = torch.func.grad(lambda x: x.sum() + lf.lorweb_linear(p["x"], *args, backend="triton").sum())(p["x"])
    assert torch.equal(frozen, torch.ones_like(p["x"]))

    def under_no_grad(x):
        with torch.no_grad():
            y = lf.lorweb_linear(x, *args, backend="triton").sum()
        return x.sum() + y

    assert torch.equal(torch.func.grad(under_no_grad)(p["x"]), torch.ones_like(p["x"]))
    x = p["x"].clone().requires_grad_(True)
    got, = torch.autograd.grad(lf.lorweb_linear(x, *args, backend="triton").sum(), x)
    assert torch.allclose(got, want, atol=_tol(9 + 6), rtol=0)


def test_a_scale_that_requires_grad_is_refused_on_every_backend(fused):
    """The eager check read a tensor scale's value (its gradient silently dropped) while a compiled call
    differentiated it: refused in both modes; a tensor that does not require grad is still a scale."""
    p = random_problem(2, 3, 9, 6, 3, 2, torch.float32, seed=3)
    for backend in ("torch", "triton"):
        for call in (lambda s: lf.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], s, backend=backend),
                     lambda s: lf.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"],
                                                s, backend=backend)):
            with pytest.raises(TypeError, match="scale must be a number or a tensor that does not require grad"):
                call(torch.tensor(0.5, requires_grad=True))
            assert torch.equal(call(torch.tensor(0.5)), call(0.5))
    compiled = torch.compile(lambda s: lf.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], s,
                                                           backend="torch"), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="scale must be a number or a tensor that does not require grad"):
        compiled(torch.tensor(0.5, requires_grad=True))


@pytest.mark.parametrize("kind", ["linear", "delta", "delta fp32 add_to"])
def test_fused_backends_follow_autocast_as_the_torch_backend(fused, kind):
    """Under torch.autocast the torch backend's matmuls run in autocast's dtype while the fused ops (not autocast
    ops) kept fp32: the public functions cast for them, so every backend returns the same dtype (add_to, in x's
    dtype, is added to the mixture as the torch backend adds it: fp32), within bf16 rounding of each other."""
    p = random_problem(2, 3, 9, 6, 3, 2, torch.float32, seed=4)
    add_to = torch.randn(2, 3, 6) if kind == "delta fp32 add_to" else None  # x's dtype, as validate_inputs asks

    def run(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if kind == "linear":
                return lf.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], 0.5,
                                        backend=backend)
            return lf.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], 0.5, add_to=add_to,
                                       backend=backend)

    want, got = run("torch"), run("triton")
    assert got.dtype == want.dtype == (torch.float32 if kind == "delta fp32 add_to" else torch.bfloat16)
    scale = reference.lorweb_linear(p["x"].abs(), p["weight"].abs(), p["bias"].abs(), p["lora_a"].abs(),
                                    p["lora_b"].abs(), p["coeffs"].abs(), 0.5) + 1
    assert ((got.double() - want.double()).abs() <= 8 * torch.finfo(torch.bfloat16).eps * scale).all()


def test_a_graph_capture_of_the_interpreter_is_refused(monkeypatch):
    """AOT autograd's graph capture (functionalization, proxy tracing) does not record the interpreter's kernel
    launches (the compiled call returned uninitialised memory): the Triton op bodies refuse it by name; fake-tensor
    shape propagation alone (dynamo's backend="eager"), eager calls, and compiled GPU kernels are not affected."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ops._refuse_graph_capture_of_the_interpreter()  # eager
    with FakeTensorMode():
        ops._refuse_graph_capture_of_the_interpreter()
        with FunctionalTensorMode():
            with pytest.raises(ops.BackendUnavailableError, match="cannot record Triton's CPU interpreter"):
                ops._refuse_graph_capture_of_the_interpreter()
    monkeypatch.delenv("TRITON_INTERPRET")
    with FunctionalTensorMode():  # compiled kernels are captured by wrap_triton
        ops._refuse_graph_capture_of_the_interpreter()


def test_fused_input_grads_returns_none_for_what_is_not_needed():
    """``_fused_input_grads`` passes need_dx / need_dbasis on and returns None for every input whose gradient is not
    needed (no weight GEMM, no bias sum for a frozen layer), exact dy / dy.sum(0) / dy^T x for base, bias, weight."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(6, 4, generator=g)
    a, b, c = torch.randn(2, 5, 3, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(2, 2, generator=g)
    u = z = torch.randn(6, 6, generator=g)
    asked = []

    def bwd(*args):
        asked.append(args[10:])
        return _contract_bwd(*args)

    for needs in itertools.product((False, True), repeat=7):
        ctx = types.SimpleNamespace(saved_tensors=(x, w, a, b, c, u, z), scale=0.5, rows_per_sample=3,
                                    has_bias=True, has_base=True)
        asked.clear()
        got = ops._fused_input_grads(bwd, ctx, needs, dy)
        assert asked == [(needs[0], needs[4] or needs[5])]
        assert [t is not None for t in got] == list(needs), needs
        if needs[1]:
            torch.testing.assert_close(got[1], dy.t() @ x)
        if needs[2]:
            assert torch.equal(got[2], dy.sum(0))
        if needs[3]:
            assert got[3] is dy
    ctx = types.SimpleNamespace(saved_tensors=(x, None, a, b, c, u, z), scale=0.5, rows_per_sample=3,
                                has_bias=False, has_base=False)
    assert ops._fused_input_grads(bwd, ctx, (True,) * 7, dy)[1:4] == (None, None, None)


# ------------------------------------------------------------------------------------ backend choice, availability
def test_backend_none_on_cpu_is_torch_even_if_fused_ones_say_usable(monkeypatch):
    """backend=None tries the fused backends on CUDA tensors only: on CPU it is the torch backend whatever they say
    (under TRITON_INTERPRET=1 triton is usable on CPU and must still not be picked by default)."""
    monkeypatch.setattr(ops, "_unavailable_reason", lambda name, device=None: None)
    assert ops.resolve_backend(None, torch.device("cpu")) == "torch"
    assert ops.resolve_backend_for(None, torch.ones(1, 2)) == "torch"


def test_named_backend_is_never_swapped_silently(monkeypatch):
    """A named backend that cannot run raises BackendUnavailableError with its reason; a usable one is returned."""
    monkeypatch.setattr(ops, "_unavailable_reason",
                        lambda name, device=None: None if name == "cuda" else f"{name} broken here")
    with pytest.raises(lf.BackendUnavailableError, match="backend='triton' is unavailable: triton broken here"):
        ops.resolve_backend("triton", torch.device("cuda", 0))
    assert ops.resolve_backend("cuda", torch.device("cuda", 0)) == "cuda"
    assert ops.resolve_backend(None, torch.device("cuda", 0)) == "cuda"
    with pytest.raises(lf.BackendUnavailableError, match="does not support float64"):
        ops.resolve_backend_for("cuda", torch.ones(2, 2, dtype=torch.float64))
    assert ops.resolve_backend_for("torch", torch.ones(2, 2, dtype=torch.float64)) == "torch"
    assert ops.resolve_backend_for("cuda", torch.ones(2, 2, dtype=torch.float16)) == "cuda"


def test_triton_availability_reasons(monkeypatch):
    """Each triton refusal names its own cause: CPU tensors without the interpreter, a non-CUDA device, no GPU."""
    if ops._TRITON_KERNELS is None:
        pytest.skip("the Triton kernels do not import here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in ops._unavailable_reason("triton", torch.device("cpu"))
    assert ops._unavailable_reason("triton", torch.device("meta")) == "no Triton support for meta tensors"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ops._unavailable_reason("triton", torch.device("cuda", 0)) == "no CUDA GPU is visible to torch"
    assert ops._unavailable_reason("triton") == "no CUDA GPU is visible to torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ops._unavailable_reason("triton", torch.device("cuda", 0)) is None


def test_interpreter_version_boundary(monkeypatch):
    """The interpreter check refuses triton < 3.7 and unparsable versions, accepts 3.7 itself."""
    triton = pytest.importorskip("triton")
    for version, ok in (("3.7.0", True), ("3.6.9", False), ("not-a-version", False), ("4.0", True)):
        monkeypatch.setattr(triton, "__version__", version)
        assert (ops._interpreter_unsupported() is None) == ok, version


def test_cuda_extension_availability_reasons(monkeypatch):
    """With an extension present (simulated): CPU tensors, no GPU and a build for another architecture each give their
    own reason, naming the GPU's sm and the arch list to rebuild with; a supported device is usable."""
    monkeypatch.setattr(ops, "_CUDA_EXT", types.SimpleNamespace())
    assert ops._unavailable_reason("cuda", torch.device("cpu")) == (
        "the CUDA extension only takes CUDA tensors, got cpu tensors")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ops._unavailable_reason("cuda", torch.device("cuda", 0)) == (
        "lorweb_fast._C is built but no CUDA GPU is visible to torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 6))
    monkeypatch.setattr(ops, "cuda_build_arch_list", lambda: "9.0")
    supported = {0: False, 1: True}
    monkeypatch.setattr(ops, "_cuda_ext_supports", lambda index: supported[index])
    why = ops._unavailable_reason("cuda", torch.device("cuda", 0))
    assert why == ("lorweb_fast._C was built for TORCH_CUDA_ARCH_LIST=9.0, which cannot run on this GPU (sm_86); "
                   "rebuild with TORCH_CUDA_ARCH_LIST=8.6")
    assert ops._unavailable_reason("cuda", torch.device("cuda")) == why  # no index: the current device
    assert ops._unavailable_reason("cuda", torch.device("cuda", 1)) is None


def test_backend_status_under_the_interpreter(monkeypatch):
    """Under TRITON_INTERPRET=1 without a GPU the triton status says the interpreter takes CPU tensors."""
    if ops._TRITON_KERNELS is None:
        pytest.skip("the Triton kernels do not import here")
    triton = pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    monkeypatch.setattr(ops._TRITON_KERNELS, "kernels_interpreted", lambda: True)  # as if set before the import
    assert ops.backend_status()["triton"].startswith("available: Triton interpreter on CPU tensors")
    monkeypatch.setattr(ops._TRITON_KERNELS, "kernels_interpreted", lambda: False)  # set after: compiled kernels
    assert "set it before importing lorweb_fast" in ops.backend_status()["triton"]


# ------------------------------------------------------------------------------------------------------ validation
def _args(**over):
    p = random_problem(2, 3, 5, 4, 2, 2, torch.float32, seed=0)
    p["add_to"] = torch.randn(2, 3, 4)
    p.update(over)
    return p


@pytest.mark.parametrize("name,bad,error,match", [
    ("coeffs", lambda t: t.to("meta"), ValueError, "coeffs is on meta"),
    ("weight", lambda t: t.to("meta"), ValueError, "weight is on meta"),
    ("bias", lambda t: t.to("meta"), ValueError, "bias is on meta"),
    ("add_to", lambda t: t.to("meta"), ValueError, "add_to is on meta"),
    ("bias", lambda t: t.double(), TypeError, "bias has dtype torch.float64"),
    ("add_to", lambda t: t.double(), TypeError, "add_to has dtype torch.float64"),
    ("lora_b", lambda t: t.double(), TypeError, "lora_b has dtype torch.float64"),
    ("add_to", lambda t: t[:, :1], ValueError, r"add_to must have shape \(2, 3, 4\)"),
    ("lora_b", lambda t: t[:, :1], ValueError, r"lora_b must be \(N, r, out\)"),
    ("coeffs", lambda t: torch.cat([t, t]), ValueError, r"coeffs must be \(B, N\) = \(2, 2\)"),
])
def test_each_argument_is_checked(name, bad, error, match):
    """Every argument's device, dtype and shape is checked by name (the torch backend would otherwise broadcast or
    type-promote silently)."""
    p = _args()
    p[name] = bad(p[name])
    with pytest.raises(error, match=match):
        if name in ("weight", "bias"):
            lf.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], 0.5)
        else:
            lf.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], 0.5, add_to=p["add_to"])


def test_peft_hint_only_for_the_peft_layout():
    """A lora_a of the wrong width that is not the transposed layout gets the plain mismatch message."""
    p = _args()
    with pytest.raises(ValueError, match="x has 5 input features but lora_a") as info:
        lf.mixed_lora_delta(p["x"], p["lora_a"][:, :3], p["lora_b"], p["coeffs"], 0.5)
    assert "peft" not in str(info.value)


# --------------------------------------------------------------------------------------------------- torch backend
@pytest.mark.parametrize("two_d", [False, True], ids=["3d", "2d"])
def test_torch_backend_keeps_low_precision_dtype(two_d):
    """bf16 inputs give a bf16 output (fp32 coefficients must not promote it), within bf16 rounding of float64."""
    p = random_problem(2, None if two_d else 3, 9, 6, 3, 2, torch.bfloat16, seed=5)
    y = lf.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], 0.5,
                         backend="torch")
    d = lf.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], 0.5, backend="torch")
    assert y.dtype == d.dtype == torch.bfloat16
    want = reference.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], 0.5)
    scale = reference.mixed_lora_delta(p["x"].abs(), p["lora_a"].abs(), p["lora_b"].abs(), p["coeffs"].abs(), 0.5)
    assert ((d.double() - want).abs() <= 4 * torch.finfo(torch.bfloat16).eps * scale + 1e-6).all()


# ----------------------------------------------------------------------------------------- compute_coefficients
def _coeffs_args(layers=None):
    g = torch.Generator().manual_seed(1)
    lead = () if layers is None else (layers,)
    return (torch.randn(3, 8, generator=g), torch.randn(*lead, 6, 8, generator=g) * 0.3,
            torch.randn(*lead, 4, 6, generator=g))


def test_compute_coefficients_checks():
    """Unknown backend, heads not dividing key_dim, keys of another layer count and keys on another device are named."""
    q, w, k = _coeffs_args()
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        lf.compute_coefficients(q, w, k, backend="jax")
    with pytest.raises(ValueError, match="key_dim=6 is not divisible by heads=4"):
        lf.compute_coefficients(q, w, k, heads=4)
    qs, ws, ks = _coeffs_args(layers=2)
    with pytest.raises(ValueError, match="keys must be"):
        lf.compute_coefficients(qs, ws, ks[:1])
    with pytest.raises(ValueError, match="keys is on meta"):
        lf.compute_coefficients(q, w, k.to("meta"))


def test_compute_coefficients_ignores_an_enclosing_autocast():
    """Under torch.autocast(cpu, bf16) fp32 weights still give fp32 coefficients computed in fp32 (float64 reference
    within fp32 rounding; a bf16 logit matmul misses it by ~1e-2)."""
    q, w, k = _coeffs_args()
    want = reference.compute_coefficients(q, w, k, heads=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lf.compute_coefficients(q, w, k, heads=2)
    assert got.dtype == torch.float32
    tol = 64 * 8 * F32_EPS
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
