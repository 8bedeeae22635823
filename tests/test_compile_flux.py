"""transformer.compile_repeated_blocks(fullgraph=True, dynamic=True) on a tiny FLUX with LoRWeB layers: one graph
per block type, no recompile for a new analogy (set_query) nor for a new batch size."""

import pytest
import torch

import lorweb_fast as lf
from lorweb_fast.testing import tiny_flux_config, tiny_flux_inputs

diffusers = pytest.importorskip("diffusers")
QUERY_DIM = 12


flux_inputs = tiny_flux_inputs  # (batch, seed) -> one forward's random inputs


def test_compile_repeated_blocks_no_recompile_for_new_analogy_or_batch_size():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**tiny_flux_config()).eval()
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=QUERY_DIM))
    with torch.no_grad():
        for layer in lf.lorweb_layers(model).values():
            layer.lora_B.normal_(0, 0.5)
    eager = {}

    def run(batch, seed):
        lf.set_query(model, torch.randn(batch, QUERY_DIM, generator=torch.Generator().manual_seed(seed)))
        with torch.no_grad():
            return model(**flux_inputs(batch, seed)).sample

    for batch, seed in ((2, 0), (2, 1), (3, 2), (4, 3)):
        eager[(batch, seed)] = run(batch, seed)
    model.compile_repeated_blocks(fullgraph=True, dynamic=True, backend="eager")
    counters.clear()
    torch.testing.assert_close(run(2, 0), eager[(2, 0)])
    assert counters["stats"]["unique_graphs"] == 2  # one per block type: FluxTransformerBlock, FluxSingle...
    for batch, seed in ((2, 1), (3, 2), (4, 3)):  # a new analogy, then new batch sizes
        counters.clear()
        torch.testing.assert_close(run(batch, seed), eager[(batch, seed)])
        assert counters["stats"]["unique_graphs"] == 0, (batch, seed)


def test_set_coefficients_drops_the_storage_offset_of_views():
    """The guard that recompiled at batch 2 -> 3: each layer's coefficients were a view into set_query's stacked
    (L, B, N) result, whose storage offset (layer index * B * N) dynamo guarded on."""
    layer = lf.LoRWeBLinear(torch.nn.Linear(4, 4), num_loras=3, rank=2, key_dim=8, query_dim=QUERY_DIM)
    stacked = torch.randn(5, 2, 3)
    layer.set_coefficients(stacked[3])
    assert layer.coefficients.storage_offset() == 0 and torch.equal(layer.coefficients, stacked[3])
    own = torch.randn(2, 3)
    layer.set_coefficients(own)
    assert layer.coefficients is own  # no copy when there is no offset
