"""Fresh audit of torch.compile's promise (README: "torch.compile(fullgraph=True, dynamic=True) sees no graph break
and does not recompile when the analogy (the coefficients), the batch size, the sequence length or the strength
changes").

Checked on CPU (torch backend; ``backend="aot_eager"`` / ``"eager"``). Recompiles are counted with dynamo's
``unique_graphs`` counter, as tests/test_compile.py does. The tests that fail now name the guard torch reports.
"""

import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import lora_api
from lorweb_fast.testing import tiny_flux_with_lorweb


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graphs(fn) -> int:
    from torch._dynamo.utils import counters

    counters.clear()
    fn()
    return counters["stats"]["unique_graphs"]


def _tiny_model():
    """The model of tests/test_compile.py: fc1 / fc2 on (B, S, 24) tokens, a 2-D (B, 24) "norm" layer; 3 LoRWeB
    layers, N=3, r=2."""
    from pathlib import Path

    from lorweb_fast.testing import load_module_from_file

    helpers = load_module_from_file(Path(__file__).with_name("test_compile.py"), "compile_audit_helpers")
    return helpers.make_model()


def _two_layer_model():
    """Two LoRWeB layers (L = 2) with N = 3 basis LoRAs, so that L differs from N."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 24))
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=10, target_modules=["0", "2"]))
    for layer in lf.lorweb_layers(m).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    return m


def test_compiled_jit_merge_does_not_recompile_for_new_batch_sizes():
    """layer.py ``LoRWeBLinear.merged_weight_for`` / ``jit_merged_forward``: README "`jit` also serves a batch of
    different analogies ... it compiles with fullgraph=True" and the top-level promise (no recompile when the batch
    size changes under ``dynamic=True``). Expected: inside ``merged(model, "jit")`` a model compiled with
    ``fullgraph=True, dynamic=True`` compiles once for batches of different analogies and not again for new batch
    sizes (> 1).

    Now every new batch size recompiles: the number of rows per merge block is computed from the batch
    (``MERGE_BLOCK_BYTES // (batch * in_features * 4)``) and drives a Python ``range`` loop, so dynamo guards on it
    ("torch.sym_max(5, 131072 // (3*x.size()[0])) == 21845  # for start in range(0, out_features, rows):
    lorweb_fast/layer.py in merged_weight_for"); after 8 batch sizes a fullgraph model raises
    ``FailOnRecompileLimitHit``. (FLUX-sized layers escape it: there the ``out / MERGE_MAX_BLOCKS`` floor wins for
    every batch; the tiny FLUX under ``compile_repeated_blocks`` recompiles the same way.)"""
    m = _tiny_model()
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")

    def run(batch):
        with torch.no_grad():
            lf.set_query(m, torch.randn(batch, 10))
            x, temb = torch.randn(batch, 5, 24), torch.randn(batch, 24)
            with lf.merged(m, "jit"):
                torch.testing.assert_close(compiled(x, temb), m(x, temb), rtol=1e-5, atol=1e-5)

    run(2)
    assert _graphs(lambda: [run(b) for b in (3, 4, 5)]) == 0


def test_batch_equal_to_the_layer_count_does_not_recompile_later_batches():
    """layer.py ``LoRWeBLinear.set_coefficients`` (called by model.py ``set_query``): README promise, no recompile
    for a new batch size under ``dynamic=True``. Expected: a model whose first compiled batch size happens to equal
    its number of LoRWeB layers compiles once, and a later batch size does not recompile.

    Now it recompiles once: the first layer's coefficients are ``stacked[0]``, a view of ``set_query``'s (L, B, N)
    result with storage offset 0, which ``set_coefficients`` keeps as a view (it copies only views with an offset).
    Dynamo then guards on the hidden base's size and duck sizing ties L to the batch: "fn._modules['0'].
    _coefficients._base.size()[0] == args[0].size()[0]  # duck sizing added this equality because these variables
    had the same size 2". Storing any view as a copy (``coeffs._base is not None``) removes it."""
    m = _two_layer_model()
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")

    def run(batch, seq):
        with torch.no_grad():
            lf.set_query(m, torch.randn(batch, 10))
            x = torch.randn(batch, seq, 24)
            torch.testing.assert_close(compiled(x), m(x))

    run(2, 5)  # B = 2 = the number of LoRWeB layers
    assert _graphs(lambda: [run(b, s) for b, s in ((3, 5), (4, 7))]) == 0


def test_mark_dynamic_batch_compiles_and_does_not_recompile():
    """layer.py ``LoRWeBLinear._coefficients_for`` (``coeffs.shape[0] != x.shape[0]``) with ``set_coefficients``:
    ``torch._dynamo.mark_dynamic(x, 0)`` is torch's documented way to compile a batch dimension dynamically from
    the first call (with the default ``dynamic=None``, where the README says the first batch change compiles once
    more); it works on the same model without LoRWeB. Expected: the marked call compiles and later batch sizes do
    not recompile.

    Now the first call raises ``ConstraintViolationError``: "You marked L['x'].size()[0] as dynamic but your code
    specialized it to be a constant (2)" at ``if coeffs.shape[0] != x.shape[0]`` (the coefficients, module state,
    are static in the first compile, and the equality specialises x's batch). Marking the coefficients' batch
    dimension ``torch._dynamo.maybe_mark_dynamic(coeffs, 0)`` where they are stored fixes it."""
    m = _tiny_model()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")

    def run(batch):
        with torch.no_grad():
            lf.set_query(m, torch.randn(batch, 10))
            x, temb = torch.randn(batch, 5, 24), torch.randn(batch, 24)
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(temb, 0)
            torch.testing.assert_close(compiled(x, temb), m(x, temb))

    run(2)
    assert _graphs(lambda: [run(b) for b in (4, 5)]) == 0


def test_pin_regional_compile_no_recompile_for_sequence_lengths_and_strengths():
    """PIN (passes now; judged at risk because tests/test_compile_flux.py checks only a new analogy and batch size):
    ``compile_repeated_blocks(fullgraph=True, dynamic=True)`` on the tiny FLUX does not recompile for new image /
    text sequence lengths or a new ``set_lorweb_scale`` strength (README top-level promise), and matches eager."""
    model = tiny_flux_with_lorweb()

    def inputs(batch, img, txt, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, img, 8, generator=g),
                    encoder_hidden_states=torch.randn(batch, txt, 24, generator=g),
                    pooled_projections=torch.randn(batch, 20, generator=g), timestep=torch.rand(batch, generator=g),
                    guidance=torch.full((batch,), 3.5), img_ids=torch.randn(img, 3, generator=g),
                    txt_ids=torch.zeros(txt, 3))

    def run(batch, img, txt, seed, strength=1.0):
        with torch.no_grad():
            lf.set_query(model, torch.randn(batch, 12, generator=torch.Generator().manual_seed(seed)))
            lora_api.set_lorweb_scale(model, strength)
            return model(**inputs(batch, img, txt, seed)).sample

    cases = [(2, 6, 4, 0, 1.0), (2, 12, 4, 1, 1.0), (2, 20, 7, 2, 1.0), (2, 20, 7, 2, 0.5), (2, 9, 5, 3, 0.8)]
    eager = [run(*c) for c in cases]
    model.compile_repeated_blocks(fullgraph=True, dynamic=True, backend="eager")
    torch.testing.assert_close(run(*cases[0]), eager[0])

    def later():
        for case, want in zip(cases[1:], eager[1:]):
            torch.testing.assert_close(run(*case), want)

    assert _graphs(later) == 0
