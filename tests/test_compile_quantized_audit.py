"""Audit: torch.compile of LoRWeB over QUANTIZED base layers (no other test compiles one).

Backends (each quantizes the base before LoRWeB is injected, as the README asks): diffusers' GGUF (``GGUFLinear``,
Q8_0 data made with ``gguf.quants``), torchao weight-only int8 (``quantize_`` + ``Int8WeightOnlyConfig``, diffusers'
compile recipe), optimum-quanto qfloat8 (``lorweb_fast.training.quantize_qfloat8``, the official quantization) and
bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` (nf4) on CPU.

Checked for (a) one ``LoRWeBLinear`` over such a base and (b) the tiny FLUX transformer under its regional compile
(``compile_repeated_blocks``, as the README describes): ``fullgraph=True`` compiles (no graph break; where the stock
quantized model itself cannot be captured, LoRWeB is compared against the stock model instead), the compiled output
equals the eager output (tolerance from the dtype and the compiler), no recompile when the query / coefficients, the
strength or (``dynamic=True``) the batch size change, a compiled training step gives the eager LoRWeB gradients,
and a named backend that cannot run raises instead of falling back.

Graph capture is checked with ``backend="aot_eager"`` (AOTAutograd: forward and backward graphs, no codegen);
inductor runs once per quantizer on one layer. GGUF uses ``backend="eager"`` for the model-level capture: stock
diffusers' GGUF blocks fail under ``aot_eager`` without LoRWeB (a strict xfail:
``test_gguf_stock_blocks_compile_under_aot_eager``).
"""

import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import lora_api, ops
from lorweb_fast.layer import has_plain_weight
from lorweb_fast.testing import inject_random_lorweb, load_module_from_file, one_intra_op_thread, tiny_flux_inputs

diffusers = pytest.importorskip("diffusers")
#: the quantization audit's GGUF / torchao helpers and tiny models (loaded from its file: no sys.path change)
qa = load_module_from_file(Path(__file__).with_name("test_quantization_backends_audit.py"), "quant_audit_helpers")

KINDS = ["gguf", "torchao_int8", "quanto_qfloat8", "bnb_int8", "bnb_nf4"]
IN, OUT, QUERY_DIM = 64, 64, 6  # GGUF Q8_0: in % 32 == 0; bitsandbytes nf4 packs for CPU: out % 32 == 0


@pytest.fixture(autouse=True)
def _one_thread_fresh_dynamo():
    """Tiny models: one intra-op thread; every test starts (and leaves) dynamo's caches empty."""
    torch._dynamo.reset()
    with one_intra_op_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------- helpers
def _bnb(kind, linear):
    bnb = pytest.importorskip("bitsandbytes")
    bias = linear.bias is not None
    try:
        if kind == "bnb_int8":
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False,
                                    threshold=0.0)
        else:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias, compute_dtype=torch.float32)
        q.load_state_dict(linear.state_dict())
        q = q.to("cpu")
        q(torch.randn(1, linear.in_features))
    except Exception as exc:  # pragma: no cover - depends on the installed bitsandbytes
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot run {kind} layers on this CPU: {exc}")
    return q


def _quantize_module(kind, module):
    """``module`` (its plain nn.Linear children of width % 32 == 0, or all of them for torchao / quanto, as those
    libraries quantize) quantized in place by ``kind``; returns it."""
    if kind == "gguf":
        qa._swap_linears(module, qa._gguf_linear)
    elif kind == "torchao_int8":
        tq = pytest.importorskip("torchao.quantization")
        tq.quantize_(module, tq.Int8WeightOnlyConfig())
    elif kind == "quanto_qfloat8":
        pytest.importorskip("optimum.quanto")
        from lorweb_fast.training import quantize_qfloat8

        # the official quantization takes a pipeline: a stand-in T5 beside the module
        quantize_qfloat8(types.SimpleNamespace(transformer=module, text_encoder_2=nn.Sequential(nn.Linear(8, 8))))
    elif kind.startswith("bnb"):
        qa._swap_linears(module, lambda lin: _bnb(kind, lin))
    else:
        raise ValueError(kind)
    return module


class _One(nn.Module):
    """A model holding one linear layer (``set_query`` / ``set_lorweb_scale`` take models)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.proj(x)


def _stock_layer_model(kind):
    return _quantize_module(kind, _One()).eval()


def _layer_model(kind):
    """_One with its linear quantized by ``kind`` and wrapped by a LoRWeBLinear (non-zero basis)."""
    model = _stock_layer_model(kind)
    assert not has_plain_weight(model.proj), type(model.proj.weight)
    torch.manual_seed(1)
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=QUERY_DIM,
                                            target_modules=["proj"]))
    layer = model.proj
    assert isinstance(layer, lf.LoRWeBLinear)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        layer.lora_keys.normal_(0, 3.0)
    return model


def _q(batch=2, seed=3, dim=QUERY_DIM):
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))


def _x(batch=2, seq=5, seed=0):
    return torch.randn(batch, seq, IN, generator=torch.Generator().manual_seed(seed))


def _plain(t):
    """A tensor as torch.Tensor (a compiled GGUF call may return its GGUFParameter subclass, see the docstring)."""
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


def _assert_close(got, want, compiler, dtype=torch.float32):
    """Compiled vs eager. eager / aot_eager run the same aten ops as eager mode: torch.testing's defaults for the
    dtype. inductor fuses and reorders reductions: 64 ulps of the dtype relative to the output's magnitude."""
    got, want = _plain(got).detach(), _plain(want).detach()
    if compiler in ("eager", "aot_eager"):
        torch.testing.assert_close(got, want)
    else:
        eps = torch.finfo(dtype).eps
        tol = 64 * eps * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=64 * eps, atol=tol)


def _unique_graphs(fn):
    from torch._dynamo.utils import counters

    counters.clear()
    fn()
    return counters["stats"]["unique_graphs"]


def _graph_breaks():
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _lorweb_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None and qa._is_lorweb(n)}


# ------------------------------------------------------------------------------------------ (a) one layer
@pytest.mark.parametrize("kind", KINDS)
def test_layer_adds_no_graph_break_to_the_quantized_base(kind):
    """torch._dynamo.explain of the stock quantized linear and of the LoRWeBLinear over it: one graph each, no
    graph break (the delta-only path for quantized bases traces as one graph)."""
    stock, model = _stock_layer_model(kind), _layer_model(kind)
    lf.set_query(model, _q())
    x = _x()
    stock_explained = torch._dynamo.explain(stock)(x)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == stock_explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == stock_explained.graph_count == 1


@pytest.mark.parametrize("kind", KINDS)
def test_layer_fullgraph_matches_eager_without_recompiles(kind):
    """fullgraph=True, dynamic=True (aot_eager): compiled == eager, and new coefficients (set_query), a new strength
    (set_lorweb_scale), a new batch size and a new sequence length compile nothing new."""
    model = _layer_model(kind)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad():
        lf.set_query(model, _q())
        want = model(_x())  # eager first: bitsandbytes nf4 repacks its CPU weight at its first eval call (stock too)
        _assert_close(compiled(_x()), want, "aot_eager")

        def later_calls():
            for i, (batch, seq, strength) in enumerate(((2, 5, 0.5), (2, 5, 1.5), (3, 7, 1.0), (4, 9, 0.25))):
                lf.set_query(model, _q(batch, seed=10 + i))
                lora_api.set_lorweb_scale(model, strength)
                x = _x(batch, seq, seed=i)
                _assert_close(compiled(x), model(x), "aot_eager")

        assert _unique_graphs(later_calls) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_layer_compiled_training_step_gives_the_eager_lorweb_gradients(kind):
    """A training step (set_query with autograd, forward, backward) through the fullgraph aot_eager compile gives
    lora_A, lora_B, lora_keys, att_lora_to_q and the input the eager gradients; the quantized base gets none."""
    model = _layer_model(kind).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    grads, x_grads = [], []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        lf.set_query(model, _q())
        x = _x().requires_grad_(True)
        _plain(fn(x)).square().mean().backward()
        grads.append(_lorweb_grads(model))
        x_grads.append(x.grad)
    assert len(grads[0]) == 4 and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_grads[1], x_grads[0], rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for n, p in model.named_parameters() if not qa._is_lorweb(n))


@pytest.mark.parametrize("kind", KINDS)
def test_layer_inductor_forward_and_backward_match_eager(kind):
    """inductor, fullgraph=True (the codegen path users run; diffusers' recipe for torchao). Forward: the compiled
    LoRWeB layer minus the compiled stock layer equals the eager difference (the mixture) within the fp32 tolerance,
    and the compiled LoRWeB output is as far from eager as the compiled stock layer is (inductor computes GGUF's
    dequantization without rounding the fp16 weight: ~3e-4 on the stock layer too), a new analogy does not
    recompile; backward (a loss linear in the output, so the base output does not enter): the LoRWeB gradients equal
    eager's."""
    stock, model = _stock_layer_model(kind), _layer_model(kind)
    x = _x()
    with torch.no_grad():
        lf.set_query(model, _q())
        stock_eager, eager = stock(x), model(x)  # (eager first: bitsandbytes nf4 repacks at its first eval call)
        stock_compiled = _plain(torch.compile(stock, fullgraph=True)(x))
        compiled_model = torch.compile(model, fullgraph=True)
        compiled = _plain(compiled_model(x))
        _assert_close(compiled - stock_compiled, eager - stock_eager, "inductor")
        stock_error = (stock_compiled - stock_eager).abs().max().item()
        _assert_close(compiled, eager, "inductor") if stock_error == 0 else (
            torch.testing.assert_close(compiled, eager, rtol=0, atol=2 * stock_error + 1e-5))

        def new_analogy():
            lf.set_query(model, _q(seed=11))
            _assert_close(_plain(compiled_model(x)) - stock_compiled, model(x) - stock_eager, "inductor")

        assert _unique_graphs(new_analogy) == 0
    model.train()
    weights = torch.randn(2, 5, OUT, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (model, compiled_model):
        model.zero_grad(set_to_none=True)
        lf.set_query(model, _q())
        (_plain(fn(x)) * weights).sum().backward()
        grads.append(_lorweb_grads(model))
    assert len(grads[0]) == 4 and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        _assert_close(grads[1][name], grads[0][name], "inductor")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["gguf", "torchao_int8", "quanto_qfloat8"])
def test_named_backend_that_cannot_run_raises_under_compile(kind, backend):
    """A LoRWeB layer over a quantized base with backend='triton' / 'cuda' on CPU tensors (no interpreter, no GPU):
    the compiled call raises BackendUnavailableError as the eager one does, never falls back to the torch backend."""
    if backend == "triton" and ops.triton_interpret_mode():
        pytest.skip("TRITON_INTERPRET=1 makes the triton backend take CPU tensors")
    model = _layer_model(kind)
    model.proj.backend = backend
    message = f"backend='{backend}' is unavailable"
    with torch.no_grad():
        lf.set_query(model, _q())
        with pytest.raises(ops.BackendUnavailableError, match=message):
            model(_x())
        with pytest.raises(ops.BackendUnavailableError, match=message):
            torch.compile(model, backend="aot_eager")(_x())
        # fullgraph=True: dynamo wraps any exception raised while tracing in its Unsupported("Observed exception"),
        # whose text carries ours (torch's behaviour, not a fallback)
        with pytest.raises((ops.BackendUnavailableError, torch._dynamo.exc.Unsupported), match=message):
            torch.compile(model, fullgraph=True, backend="aot_eager")(_x())


# ------------------------------------------------------------------------------------------ (b) tiny FLUX
def _flux(kind, lorweb=True):
    model = _quantize_module(kind, qa._tiny())
    if lorweb:
        inject_random_lorweb(model)
        layers = lf.lorweb_layers(model)
        assert len(layers) == 20 and not any(has_plain_weight(layer.base_layer) for layer in layers.values())
    return model


def _flux_run(model, batch=2, seed=0, query_seed=3):
    with torch.no_grad():
        lf.set_query(model, qa._query(batch, query_seed))
        return model(**tiny_flux_inputs(batch, seed)).sample


FLUX_FAST = []  # (each kind takes 12-22 s of CPU compile)
FLUX_SLOW = [pytest.param(k, marks=pytest.mark.slow) for k in ("torchao_int8", "quanto_qfloat8", "bnb_int8", "bnb_nf4")]


@pytest.mark.parametrize("kind", FLUX_FAST + FLUX_SLOW)
def test_flux_regional_compile_fullgraph_matches_eager_without_recompiles(kind):
    """compile_repeated_blocks(fullgraph=True, dynamic=True, aot_eager) of the quantized tiny FLUX with LoRWeB: two
    graphs (one per block type, as for the stock model), compiled == eager, and a new analogy, a new strength and a
    new batch size compile nothing new. (bitsandbytes: slow, ~25 s on 2 busy cores.)"""
    model = _flux(kind)
    eager = {key: _flux_run(model, *key) for key in ((2, 0, 3), (2, 1, 4), (3, 2, 5))}
    model.compile_repeated_blocks(fullgraph=True, dynamic=True, backend="aot_eager")
    assert _unique_graphs(lambda: _assert_close(_flux_run(model, 2, 0, 3), eager[(2, 0, 3)], "aot_eager")) == 2

    def later_calls():
        _assert_close(_flux_run(model, 2, 1, 4), eager[(2, 1, 4)], "aot_eager")  # a new analogy
        lora_api.set_lorweb_scale(model, 0.5)  # a new strength
        got = _flux_run(model, 2, 1, 4)
        lora_api.set_lorweb_scale(model, 1.0)
        with torch.no_grad():
            want = model(**tiny_flux_inputs(2, 1)).sample
        assert not torch.allclose(got, want)  # the strength took effect
        _assert_close(_flux_run(model, 3, 2, 5), eager[(3, 2, 5)], "aot_eager")  # a new batch size

    assert _unique_graphs(later_calls) == 0


def test_flux_gguf_regional_compile_adds_no_graph_break():
    """GGUF blocks: compile_repeated_blocks(fullgraph=True, dynamic=True) with backend='eager' (dynamo's capture;
    stock GGUF blocks fail under aot_eager, see below), with and without LoRWeB: two graphs each, no break,
    compiled == eager, and a new analogy and batch size compile nothing new."""
    pytest.importorskip("gguf")
    stock = _flux("gguf", lorweb=False)
    with torch.no_grad():
        want = stock(**tiny_flux_inputs()).sample
    stock.compile_repeated_blocks(fullgraph=True, dynamic=True, backend="eager")

    def stock_call():
        with torch.no_grad():
            _assert_close(stock(**tiny_flux_inputs()).sample, want, "eager")

    assert _unique_graphs(stock_call) == 2 and _graph_breaks() == 0
    torch._dynamo.reset()
    model = _flux("gguf")
    eager = {key: _flux_run(model, *key) for key in ((2, 0, 3), (2, 1, 4), (3, 2, 5))}
    model.compile_repeated_blocks(fullgraph=True, dynamic=True, backend="eager")
    assert _unique_graphs(lambda: _assert_close(_flux_run(model, 2, 0, 3), eager[(2, 0, 3)], "eager")) == 2
    assert _graph_breaks() == 0

    def later_calls():
        _assert_close(_flux_run(model, 2, 1, 4), eager[(2, 1, 4)], "eager")
        _assert_close(_flux_run(model, 3, 2, 5), eager[(3, 2, 5)], "eager")

    assert _unique_graphs(later_calls) == 0


@pytest.mark.xfail(strict=True, raises=torch._dynamo.exc.Unsupported,
                   reason="not LoRWeB's: stock diffusers GGUF blocks (no LoRWeB) cannot be captured under aot_eager "
                          "(GGUFParameter's __torch_function__ re-wraps the traced outputs; diffusers 0.42.1, torch "
                          "2.14); when this passes, move the GGUF model-level checks above to aot_eager")
def test_gguf_stock_blocks_compile_under_aot_eager():
    """Stock diffusers GGUF (no LoRWeB) under compile_repeated_blocks(fullgraph=True, backend='aot_eager') gives the
    eager output; the GGUF model-level checks above use backend='eager' while it does not."""
    pytest.importorskip("gguf")
    stock = _flux("gguf", lorweb=False)
    with torch.no_grad():
        want = stock(**tiny_flux_inputs()).sample
    stock.compile_repeated_blocks(fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad():
        _assert_close(stock(**tiny_flux_inputs()).sample, want, "eager")


def test_flux_bnb_int8_compiled_training_step_gives_the_eager_lorweb_gradients():
    """A training step on the bitsandbytes int8 tiny FLUX under compile_repeated_blocks(fullgraph=True, aot_eager):
    every LoRWeB tensor gets the eager gradient, nothing else gets one. (torchao and quanto: see below.)"""
    model = _flux("bnb_int8").train()
    grads = []
    for compiled in (False, True):
        if compiled:
            model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        model.zero_grad(set_to_none=True)
        lf.set_query(model, qa._query())
        model(**tiny_flux_inputs()).sample.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 80
    assert all(qa._is_lorweb(n) for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["torchao_int8", "quanto_qfloat8"])
@pytest.mark.xfail(strict=True, raises=torch._dynamo.exc.BackendCompilerFailed,
                   reason="not LoRWeB's: AOTAutograd cannot compile a training forward of the torchao / quanto tiny "
                          "FLUX blocks WITHOUT LoRWeB either, base frozen as in training ('torch.compile is currently "
                          "being used with tensor subclass inputs'; torch 2.14, torchao 0.18, optimum-quanto 0.2.7); "
                          "the LoRWeB layer alone trains compiled. When this passes, add the model-level training "
                          "check with LoRWeB")
def test_flux_stock_compiled_training_step(kind):
    """A compiled (compile_repeated_blocks, fullgraph, aot_eager) training forward and backward of the stock
    quantized tiny FLUX blocks (no LoRWeB) gives the eager input gradients."""
    stock = _flux(kind, lorweb=False).train().requires_grad_(False)  # frozen, as a base is in training (quanto's
    grads = []  # eager backward fails on trainable quantized weights: its weight gradient .view()s a strided grad)
    for compiled in (False, True):
        if compiled:
            stock.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        inputs = tiny_flux_inputs()
        inputs["hidden_states"].requires_grad_(True)
        # (not .sum(): its expanded gradient breaks quanto's eager QLinear backward, a .view on a stride-0 tensor)
        stock(**inputs).sample.square().mean().backward()
        grads.append(inputs["hidden_states"].grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


