"""torch.compile: no graph breaks, no recompiles on new coefficients or (with dynamic=True) new batch/sequence sizes.

On CPU the ops route to the torch backend; the same checks run on CUDA (Triton ops) in test_gpu.py."""

import torch
from torch import nn

import lorweb_fast as lf


class TinyLoRWeBModel(nn.Module):
    """One block with two 3-D token layers and one 2-D (B, dim) modulation layer, like FLUX's norm*.linear."""

    def __init__(self, dim=24, hidden=40):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([nn.ModuleDict({"fc1": nn.Linear(dim, hidden),
                                                                "fc2": nn.Linear(hidden, dim),
                                                                "norm": nn.Linear(dim, dim)})])

    def forward(self, x, temb):
        blk = self.transformer_blocks[0]
        h = blk["fc2"](torch.nn.functional.gelu(blk["fc1"](x)))
        return h + x + blk["norm"](temb).unsqueeze(1)


def make_model(device="cpu"):
    torch.manual_seed(0)
    m = TinyLoRWeBModel()
    m.requires_grad_(False)
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=10))
    for layer in lf.lorweb_layers(m).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    return m.to(device)


def count_compiles(fn):
    from torch._dynamo.utils import counters

    counters.clear()
    fn()
    return counters["stats"]["unique_graphs"]


def test_no_graph_breaks():
    m = make_model()
    lf.set_query(m, torch.randn(2, 10))
    x, temb = torch.randn(2, 5, 24), torch.randn(2, 24)
    explanation = torch._dynamo.explain(m)(x, temb)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_no_recompiles_for_new_coefficients_or_shapes():
    torch._dynamo.reset()
    m = make_model()
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    lf.set_query(m, torch.randn(2, 10))
    x, temb = torch.randn(2, 5, 24), torch.randn(2, 24)
    want = m(x, temb)
    torch.testing.assert_close(compiled(x, temb), want)

    def later_calls():
        for batch, seq in ((2, 5), (3, 7), (4, 9), (3, 11)):
            lf.set_query(m, torch.randn(batch, 10))  # new coefficients (and a new batch size)
            xx, tt = torch.randn(batch, seq, 24), torch.randn(batch, 24)
            torch.testing.assert_close(compiled(xx, tt), m(xx, tt))

    assert count_compiles(later_calls) == 0


def test_jit_merge_of_a_batch_of_analogies_compiles_without_graph_breaks():
    """merged(strategy="jit") serves a batch of different analogies (one merged weight per sample): compiled with
    fullgraph=True it has no data-dependent branch, and matches eager, also for a batch of identical analogies."""
    torch._dynamo.reset()
    m = make_model()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x, temb = torch.randn(3, 5, 24), torch.randn(3, 24)
    for query in (torch.randn(3, 10), torch.randn(1, 10).expand(3, 10)):
        lf.set_query(m, query)
        with torch.no_grad(), lf.merged(m, "jit"):
            torch.testing.assert_close(compiled(x, temb), m(x, temb), rtol=1e-5, atol=1e-5)


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    m = make_model()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x, temb, q = torch.randn(2, 5, 24), torch.randn(2, 24), torch.randn(2, 10)
    grads = []
    for fn in (m, compiled):
        m.zero_grad()
        lf.set_query(m, q)
        fn(x, temb).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_no_recompiles_for_new_strengths_unmerged_and_jit_merged():
    """set_lorweb_scale values go into the coefficients as a tensor op: no recompile per strength (a product of the
    layer's two Python floats made torch 2.11's dynamo guard on its value), unmerged, with the per-forward query,
    and in merged(strategy="jit")."""
    from lorweb_fast import lora_api

    torch._dynamo.reset()
    m = make_model()
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    x, temb, q = torch.randn(2, 5, 24), torch.randn(2, 24), torch.randn(2, 10)
    for per_forward in (False, True):
        lf.set_query(m, q, per_forward=per_forward)
        lora_api.set_lorweb_scale(m, 1.0)
        compiled(x, temb)

        def new_strengths():
            for strength in (0.5, 1.5, 0.25, 2.0, 0.0, 3.5, 0.75, 1.25, 2.5, 0.1):
                lora_api.set_lorweb_scale(m, strength)
                torch.testing.assert_close(compiled(x, temb), m(x, temb))

        assert count_compiles(new_strengths) == 0
    lf.set_query(m, q)
    with torch.no_grad(), lf.merged(m, "jit"):
        lora_api.set_lorweb_scale(m, 1.0)
        compiled(x, temb)

        def new_strengths_merged():
            for strength in (0.5, 1.5, 0.25, 2.0, 0.0, 3.5, 0.75, 1.25, 2.5, 0.1):
                lora_api.set_lorweb_scale(m, strength)
                torch.testing.assert_close(compiled(x, temb), m(x, temb), rtol=1e-5, atol=1e-5)

        assert count_compiles(new_strengths_merged) == 0


def test_compiled_forward_with_autograd_inside_merged_does_not_break_the_graph():
    """The no-gradient warning of a forward with autograd inside merged() is skipped while dynamo traces
    (warnings.warn cannot be traced): fullgraph=True compiles, and the eager call still warns."""
    import warnings

    torch._dynamo.reset()
    m = make_model()
    for p in m.parameters():
        p.requires_grad_(True)
    lf.set_query(m, torch.randn(1, 10))  # one analogy: every strategy merges it
    x, temb = torch.randn(1, 5, 24), torch.randn(1, 24)
    for strategy in ("jit", "full"):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        with lf.merged(m, strategy):
            compiled(x, temb).sum().backward()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                m(x, temb).sum().backward()
        assert any("get no gradient" in str(w.message) for w in caught)


def test_default_dynamic_compiles_once_more_per_changing_size_or_strength_then_never():
    """With torch.compile's default ``dynamic=None`` (as the README says): a new analogy (coefficients) never
    recompiles; the first change of the batch size, the sequence length or the strength compiles once more
    (torch's automatic dynamic shapes), and further changes of each do not."""
    from lorweb_fast import lora_api

    torch._dynamo.reset()
    m = make_model()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    lf.set_query(m, torch.randn(2, 10))
    lora_api.set_lorweb_scale(m, 1.0)
    compiled(torch.randn(2, 5, 24), torch.randn(2, 24))

    def analogies():
        for _ in range(3):
            lf.set_query(m, torch.randn(2, 10))
            x, temb = torch.randn(2, 5, 24), torch.randn(2, 24)
            torch.testing.assert_close(compiled(x, temb), m(x, temb))

    def sizes(batch_sizes, seq_lens):
        for b, s in zip(batch_sizes, seq_lens):
            lf.set_query(m, torch.randn(b, 10))
            x, temb = torch.randn(b, s, 24), torch.randn(b, 24)
            torch.testing.assert_close(compiled(x, temb), m(x, temb))

    def strengths(values):
        x, temb = torch.randn(2, 5, 24), torch.randn(2, 24)
        lf.set_query(m, torch.randn(2, 10))
        for v in values:
            lora_api.set_lorweb_scale(m, v)
            torch.testing.assert_close(compiled(x, temb), m(x, temb))

    assert count_compiles(analogies) == 0
    assert count_compiles(lambda: sizes((3,), (5,))) == 1 and count_compiles(lambda: sizes((4, 5, 6), (5,) * 3)) == 0
    assert count_compiles(lambda: sizes((6,), (7,))) == 1 and count_compiles(lambda: sizes((6,) * 3, (8, 9, 11))) == 0
    assert count_compiles(lambda: strengths((0.5,))) == 1 and count_compiles(lambda: strengths((1.5, 0.25))) == 0
