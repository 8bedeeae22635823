"""README.md's Python examples run as a user would copy-paste them, and the claims their comments and prose make.

``tests/test_readme.py`` checks that the README's calls bind and that its flags and paths exist, and
``tests/test_api_docs_audit.py`` runs the *API* block against a stand-in module; here the examples are read from
README.md at test time and executed on tiny local models built in temporary folders: a stock diffusers
``FluxTransformer2DModel`` / ``FluxKontextPipeline`` (``lorweb_fast.demo``'s configs) and a tiny CLIP. Hub ids are
replaced by those folders, ``device="cuda"`` by ``"cpu"``, and the pipeline gets ``resolution="native",
long_edge=64`` (the official resolution generates about 1 MP, minutes per step on a CPU); the Hub download is served
by a fake ``huggingface_hub``. Everything else is the README's own text, and every substitution asserts that its
original is still there. Names the examples leave undefined (x, weight, query, a, ...) are random tensors or images of
the stated shapes. With the tiny CLIP the query width is not 2304; the stated relationship (3 x the embedding width in
"cat-aa'b") is checked instead.

Checked: the *API* block (the functional calls against the README's math, ``backend_status()``'s keys and values, one
layer and its "no coefficients" error, the whole transformer: 494 layers at FLUX.1 depth, the freezing, one batched
coefficient computation reused by every forward, the strength, the checkpoint's keys and metadata, loading into a
fresh transformer, ``merged()`` restoring bit for bit, the heat map, the analogy encoder, grid and query), the
bullets under it (``target_modules`` semantics, checkpoint metadata and partial files, the warning category and the
caller's line), the *Inference* block (config.yaml settings, encoder dtype, paths or images, seed 50, a batch with
per-sample coefficients, the Hub statement), and the *diffusers-style inference* table rows that are cheap to run.
A README claim the code does not keep is a strict xfail naming both sides.
"""

import copy
import inspect
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import demo, flux, ops
from lorweb_fast.testing import random_analogy, tiny_flux_config, tiny_lorweb_kontext_pipeline

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LORWEB_SUFFIXES = ("lora_A", "lora_B", "lora_keys", "att_lora_to_q.weight")


# --------------------------------------------------------------------------------------------------- helpers
def python_block(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    start = README.index(heading)
    match = re.search(r"```python\n(.*?)```", README[start:], re.S)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


def substituted(source: str, replacements: dict) -> str:
    """``source`` with each README text replaced, asserting that it is still there (the README may have moved on)."""
    for old, new in replacements.items():
        assert old in source, f"the README example no longer contains {old!r}"
        source = source.replace(old, new)
    return source


def lorweb_tensor_names(model: nn.Module) -> set:
    """The parameter names of every LoRWeB tensor of ``model``."""
    return {f"{name}.{suffix}" for name in lf.lorweb_layers(model) for suffix in LORWEB_SUFFIXES}


def trainable(model: nn.Module) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def block_linears(model: nn.Module) -> list:
    """Names of every nn.Linear inside transformer_blocks.* / single_transformer_blocks.*."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and re.match(r"(transformer_blocks|single_transformer_blocks)\.\d+\.", n)]


def transformer_inputs(batch: int, seed: int = 1) -> dict:
    """Inputs of one tiny FluxTransformer2DModel call (tiny_flux_config: 8 latent channels, text dims 24 / 20)."""
    g = torch.Generator().manual_seed(seed)
    tokens, text = 16, 4
    return dict(hidden_states=torch.randn(batch, tokens, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
                pooled_projections=torch.randn(batch, 20, generator=g), timestep=torch.full((batch,), 0.5),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), guidance=torch.full((batch,), 2.5),
                return_dict=False)


def readme_coefficients(query, to_q, keys, heads, activation, reduce):
    """The README's math in float64: p = to_q(q) split into H heads of size d = key_dim / H;
    logits[h, n] = <p_h, keys[n]_h> / sqrt(d); c = softmax over n (or tanh); alpha = mean over heads, or their sum
    clamped to [0, 1] (softmax) / [-1, 1] (tanh)."""
    q, w, k = (t.double() for t in (query, to_q, keys))
    p = q @ w.T
    d = w.shape[0] // heads
    per_head = []
    for h in range(heads):
        logits = p[:, h * d:(h + 1) * d] @ k[:, h * d:(h + 1) * d].T / math.sqrt(d)
        per_head.append(logits.softmax(-1) if activation == "softmax" else logits.tanh())
    c = torch.stack(per_head, 1)
    if reduce == "mean":
        return c.mean(1)
    return c.sum(1).clamp(0.0 if activation == "softmax" else -1.0, 1.0)


def readme_mixture(x, lora_a, lora_b, coeffs, scale):
    """s * sum_n alpha_b[n] B_n^T (A_n^T x) for every token x of sample b, float64."""
    x3 = x.double() if x.dim() == 3 else x.double().unsqueeze(1)
    out = scale * torch.einsum("bsi,nir,nro,bn->bso", x3, lora_a.double(), lora_b.double(), coeffs.double())
    return out if x.dim() == 3 else out.squeeze(1)


def random_basis(model: nn.Module, seed: int = 0) -> None:
    """A non-zero lora_B and spread-out keys, so that the mixture and the analogy visibly matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lf.lorweb_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            layer.lora_keys.copy_(torch.randn(layer.lora_keys.shape, generator=g) * 2.0)


# -------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """``pipe/`` (a tiny FluxKontextPipeline saved with save_pretrained) and ``clip/`` (a tiny CLIP)."""
    root = tmp_path_factory.mktemp("readme_assets")
    demo.build_tiny_kontext_pipeline(root / "pipe")
    demo.build_tiny_clip(root / "clip")
    return root


def load_transformer(assets):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(str(assets / "pipe"), subfolder="transformer")


@pytest.fixture(scope="module")
def api(assets, tmp_path_factory):
    """The README's *API* block executed once as written (in a folder of its own: it writes lorweb.safetensors and
    coefficients.png), the hub id of the encoder replaced by the tiny CLIP's folder. Returns its namespace, plus
    ``_inputs`` (copies of the tensors given to it), ``_calls`` (every coefficient computation set_query made:
    (to_q_weight shape, query shape)) and ``_work`` (its folder)."""
    work = tmp_path_factory.mktemp("api_block")
    source = substituted(python_block("## API"), {
        'flux.AnalogyEncoder("openai/clip-vit-large-patch14")': f"flux.AnalogyEncoder({str(assets / 'clip')!r})"})
    g = torch.Generator().manual_seed(0)
    batch, seq, in_f, out_f, n, r = 2, 3, 3072, 24, 32, 4  # in = 3072: `layer(x)` takes the same x
    a, a_prime, b = random_analogy(0)  # a 32 px, b 40 px
    inputs = dict(x=torch.randn(batch, seq, in_f, generator=g), weight=torch.randn(out_f, in_f, generator=g) * 0.02,
                  bias=torch.randn(out_f, generator=g), lora_a=torch.randn(n, in_f, r, generator=g) * 0.02,
                  lora_b=torch.randn(n, r, out_f, generator=g), coeffs=torch.rand(batch, n, generator=g),
                  base_out=torch.randn(batch, seq, out_f, generator=g), query=torch.randn(batch, 2304, generator=g),
                  to_q_weight=torch.randn(128, 2304, generator=g) * 0.05, keys=torch.randn(n, 128, generator=g))
    ns = {k: v.clone() for k, v in inputs.items()}
    ns.update(model_dir=str(assets / "pipe"), fresh_transformer=load_transformer(assets),
              a=a, a_prime=a_prime.resize((24, 28)), b=b)  # a' and b of other sizes than a
    calls = []
    real = ops.compute_coefficients

    def counting(query, to_q_weight, keys, **kwargs):
        calls.append((tuple(to_q_weight.shape), tuple(query.shape)))
        return real(query, to_q_weight, keys, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setattr(ops, "compute_coefficients", counting)
        exec(compile(source, "README.md (API block)", "exec"), ns)
    ns.update(_inputs=inputs, _calls=calls, _work=work)
    return ns


# ------------------------------------------------------------------------------------------- the API block
def test_api_functional_calls_compute_the_readme_math(api):
    """``y = lorweb_linear(...)  # x W^T + b + mixture``, ``d = mixed_lora_delta(..., add_to=base_out)  # base_out +
    mixture`` and ``c = compute_coefficients(...)  # (B, N)``, each against the README's formulas in float64."""
    t = api["_inputs"]
    mixture = readme_mixture(t["x"], t["lora_a"], t["lora_b"], t["coeffs"], 1.0)
    want_y = t["x"].double() @ t["weight"].double().T + t["bias"].double() + mixture
    assert api["y"].shape == want_y.shape == (2, 3, 24)
    torch.testing.assert_close(api["y"].double(), want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(api["d"].double(), t["base_out"].double() + mixture, rtol=1e-4, atol=1e-4)
    c = api["c"]
    assert c.shape == (2, 32) and c.dtype == torch.float32
    torch.testing.assert_close(c.double(), readme_coefficients(t["query"], t["to_q_weight"], t["keys"], 1,
                                                               "softmax", "mean"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("activation", ["softmax", "tanh"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_coefficients_follow_the_readme_math_for_heads_activations_and_reductions(heads, activation, reduce):
    """The math paragraph: heads of size key_dim / H, logits / sqrt(d), softmax over n (or tanh), the mean over the
    heads or their sum clamped to [0, 1] (softmax) / [-1, 1] (tanh). Sample 0 points at key 0 in every head and
    sample 1 away from it, so that the sums over two heads leave the range and the clamps are exercised."""
    g = torch.Generator().manual_seed(3)
    n, key_dim = 5, 8
    keys = torch.randn(n, key_dim, generator=g)
    to_q = torch.eye(key_dim)  # p = q
    query = torch.cat([10 * keys[:1], -10 * keys[:1], torch.randn(2, key_dim, generator=g)])
    got = lf.compute_coefficients(query, to_q, keys, heads=heads, activation=activation, reduce=reduce)
    want = readme_coefficients(query, to_q, keys, heads, activation, reduce)
    assert got.shape == (4, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if reduce == "sum" and heads == 2:  # the clamp is what made these rows equal
        assert float(got.max()) == 1.0
        if activation == "tanh":
            assert float(got.min()) == -1.0


def test_backend_status_keys_and_values_as_shown():
    """``lf.backend_status()  # {"torch": "available: ...", "triton": "...", "cuda": "unavailable: <why>"}``: the three
    backends, each "available: ..." or "unavailable: <why>"; a named backend that cannot run raises
    BackendUnavailableError with a reason (never a silent fallback), and None picks torch for CPU tensors."""
    status = lf.backend_status()
    assert list(status) == ["torch", "triton", "cuda"]
    for name, text in status.items():
        assert re.fullmatch(r"(available|unavailable): \S.*", text), (name, text)
    assert status["torch"].startswith("available: ")
    if not torch.cuda.is_available():
        assert status["cuda"].startswith("unavailable: ") and len(status["cuda"]) > len("unavailable: ") + 5
    x, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    a, b, c = torch.randn(2, 4, 1), torch.randn(2, 1, 5), torch.rand(2, 2)
    for name, text in status.items():
        if text.startswith("unavailable: "):
            with pytest.raises(lf.BackendUnavailableError, match=f"backend='{name}' is unavailable: .+"):
                lf.lorweb_linear(x, w, None, a, b, c, scale=1.0, backend=name)
    assert ops.resolve_backend(None, torch.device("cpu")) == "torch"


def test_api_one_layer(api):
    """``LoRWeBLinear(nn.Linear(3072, 3072), num_loras=32, rank=4)  # lora_alpha=None means alpha = rank``, the
    official layout (att_lora_to_q without bias), the base wrapped (not copied) and frozen; ``layer(x)`` after
    ``set_coefficients(c)``; a fresh layer ``raises a clear error if no coefficients were set``."""
    layer = api["layer"]
    assert layer.lora_alpha == 4.0 and layer.scale == 1.0  # s = lora_alpha / r = 1
    shapes = {k: tuple(v.shape) for k, v in layer.lorweb_tensors().items()}
    assert shapes == {"lora_A": (32, 3072, 4), "lora_B": (32, 4, 3072), "lora_keys": (32, 128),
                      "att_lora_to_q.weight": (128, 2304)}
    assert layer.att_lora_to_q.bias is None and not layer.base_layer.weight.requires_grad
    assert torch.equal(layer.coefficients, api["c"])
    base = layer.base_layer
    x = api["_inputs"]["x"]
    want = base(x).double() + readme_mixture(x, layer.lora_A.detach(), layer.lora_B.detach(), api["c"], 1.0)
    torch.testing.assert_close(api["out"].double(), want, rtol=1e-4, atol=1e-4)
    fresh = lf.LoRWeBLinear(nn.Linear(3072, 3072), num_loras=32, rank=4)
    with pytest.raises(RuntimeError, match=r"no coefficients: call lorweb_fast\.set_query\(model, query\)"):
        fresh(x)
    assert lf.LoRWeBLinear(nn.Linear(8, 8), num_loras=2, rank=4, lora_alpha=8).scale == 2.0


def test_one_layer_takes_b_any_in_inputs_with_one_coefficient_row_per_sample():
    """``out = layer(x)  # x (B, ..., in) as for nn.Linear, one coefficient row per sample b``: a (B, H, W, in) input
    gives (B, H, W, out), every token of sample b mixed with row b; another batch size is refused by name."""
    torch.manual_seed(0)
    layer = lf.LoRWeBLinear(nn.Linear(6, 5), num_loras=3, rank=2, key_dim=4, query_dim=4)
    nn.init.normal_(layer.lora_B)
    coeffs = torch.rand(2, 3)
    layer.set_coefficients(coeffs)
    x = torch.randn(2, 3, 4, 6)
    out = layer(x)
    assert out.shape == (2, 3, 4, 5)
    want = layer.base_layer(x).double() + readme_mixture(x.reshape(2, 12, 6), layer.lora_A.detach(),
                                                         layer.lora_B.detach(), coeffs, 1.0).reshape(2, 3, 4, 5)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch size 2 but the input has batch size 3"):
        layer(torch.randn(3, 4, 6))


def test_api_whole_transformer(api, assets):
    """``names = lf.inject_lorweb(transformer, lf.LoRWeBConfig())``: every linear of the blocks (14 per double block,
    6 per single block: 494 at FLUX.1's depth, see below); "every other parameter stops requiring grad"; ``set_query``
    computes every layer's coefficients "once, in batched computations" (stacked ``QUERY_STACK_BYTES`` of query
    projections at a time, 14 of these fp32 layers);
    ``get_coefficients`` gives ``{name: (B, N)}``; ``get_lorweb_scale`` reads the 0.8 that was set."""
    transformer, names = api["transformer"], api["names"]
    cfg = tiny_flux_config()
    assert names == block_linears(load_transformer(assets))
    assert len(names) == 14 * cfg["num_layers"] + 6 * cfg["num_single_layers"]
    assert list(lf.lorweb_layers(transformer)) == names
    assert trainable(transformer) == lorweb_tensor_names(transformer)
    # two set_query calls (query, then query[:1]): the 20 layers stacked in chunks of 16 MiB of projections
    per_chunk = lf.model.QUERY_STACK_BYTES // (128 * 2304 * 4)
    chunks = [min(per_chunk, len(names) - i) for i in range(0, len(names), per_chunk)]
    assert chunks == [14, 6]
    assert api["_calls"] == [((n, 128, 2304), (b, 2304)) for b in (2, 1) for n in chunks]
    coeffs = lf.get_coefficients(transformer)
    assert list(coeffs) == names
    assert {(tuple(c.shape), c.dtype, c.requires_grad) for c in coeffs.values()} == {((1, 32), torch.float32, False)}
    assert lf.get_lorweb_scale(transformer) == 0.8


def test_every_forward_reuses_the_coefficients_set_once(assets, monkeypatch):
    """``set_query``: "every layer's coefficients, once, in batched computations"; "all denoising steps reuse
    them; no per-step or per-layer recomputation": forwards compute no coefficients, and they do use the analogy."""
    transformer = load_transformer(assets)
    lf.inject_lorweb(transformer, lf.LoRWeBConfig())
    random_basis(transformer)
    calls = []
    real = ops.compute_coefficients
    monkeypatch.setattr(ops, "compute_coefficients", lambda *a, **k: calls.append(1) or real(*a, **k))
    queries = torch.randn(2, 2, 2304, generator=torch.Generator().manual_seed(0))
    outs = []
    with torch.no_grad():
        for query in queries:
            lf.set_query(transformer, query)
            assert len(calls) == 2  # the 20 layers in two stacked chunks (14 + 6, test_api_whole_transformer)
            calls.clear()
            steps = [transformer(**transformer_inputs(2))[0] for _ in range(3)]
            assert not calls and all(torch.equal(s, steps[0]) for s in steps)
            outs.append(steps[0])
    assert not torch.allclose(outs[0], outs[1])  # the coefficients the forwards reuse are the analogy's


def test_inject_reaches_494_layers_at_flux1_depth():
    """``# 494 layers in transformer_blocks / single_transformer_blocks``: FLUX.1's 19 double and 38 single blocks
    (built on the meta device at a tiny width: the count depends on the block structure only)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**{**tiny_flux_config(), "num_layers": 19, "num_single_layers": 38})
    names = lf.inject_lorweb(model, lf.LoRWeBConfig())
    assert len(names) == 494
    assert sum(n.startswith("transformer_blocks.") for n in names) == 19 * 14
    assert sum(n.startswith("single_transformer_blocks.") for n in names) == 38 * 6


def test_freeze_base_model_false_freezes_the_wrapped_layers_only(assets):
    """"(as peft's injection, it leaves only the LoRWeB parameters trainable; ``freeze_base_model=False`` freezes the
    wrapped layers only)"."""
    transformer = load_transformer(assets)
    before = trainable(transformer)
    assert "x_embedder.weight" in before
    names = lf.inject_lorweb(transformer, lf.LoRWeBConfig(), freeze_base_model=False)
    wrapped = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    assert trainable(transformer) == (before - wrapped) | lorweb_tensor_names(transformer)
    assert not any(p.requires_grad for layer in lf.lorweb_layers(transformer).values()
                   for p in layer.base_layer.parameters())


def test_strength_multiplies_the_mixture(assets):
    """``lf.set_lorweb_scale(transformer, 0.8)  # the strength: multiplies the mixture (lf.get_lorweb_scale reads
    it)``: a layer's output is base + 0.8 x the mixture; 0 gives the base layer."""
    transformer = load_transformer(assets)
    names = lf.inject_lorweb(transformer, lf.LoRWeBConfig())
    random_basis(transformer)
    with torch.no_grad():
        lf.set_query(transformer, torch.randn(2, 2304))
        layer = lf.lorweb_layers(transformer)[names[5]]
        x = torch.randn(2, 7, layer.in_features)
        out = {}
        for s in (1.0, 0.8, 0.0):
            lf.set_lorweb_scale(transformer, s)
            assert lf.get_lorweb_scale(transformer) == s
            out[s] = layer(x)
    assert torch.equal(out[0.0], layer.base_layer(x))
    assert not torch.allclose(out[1.0], out[0.0])
    torch.testing.assert_close(out[0.8] - out[0.0], 0.8 * (out[1.0] - out[0.0]), rtol=1e-4, atol=1e-5)


def test_api_checkpoint_keys_metadata_and_fresh_load(api, assets):
    """``save_lorweb_weights(transformer, "lorweb.safetensors", metadata={"encoder": ...})``: the official keys
    ``transformer.<module>.lora_A (N, in, r)``, ``.lora_B (N, r, out)``, ``.lora_keys (N, key_dim)``,
    ``.att_lora_to_q.weight (key_dim, query_dim)``; heads, activation, reduce, scale and encoder in the metadata with
    the layer count (``lorweb.layers``); the strength is not saved. ``load_lorweb_weights(fresh_transformer, ...)
    # injects missing layers``: the same layers, tensors and freezing as ``inject_lorweb`` leaves."""
    from safetensors import safe_open

    transformer, names = api["transformer"], api["names"]
    with safe_open(str(api["_work"] / "lorweb.safetensors"), framework="pt") as f:
        meta = f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    want = {}
    for name, layer in lf.lorweb_layers(transformer).items():
        i, o = layer.in_features, layer.out_features
        key = f"transformer.{name}"
        want.update({f"{key}.lora_A": (32, i, 4), f"{key}.lora_B": (32, 4, o), f"{key}.lora_keys": (32, 128),
                     f"{key}.att_lora_to_q.weight": (128, 2304)})
    assert shapes == want
    assert meta["encoder"] == "openai/clip-vit-large-patch14"
    assert (meta["lorweb.heads"], meta["lorweb.activation"], meta["lorweb.reduce"]) == ("1", "softmax", "mean")
    assert float(meta["lorweb.lora_alpha_over_rank"]) == 1.0  # set_lorweb_scale(0.8) is not saved
    assert meta["lorweb.layers"] == str(len(names))
    fresh = api["fresh_transformer"]
    assert list(lf.lorweb_layers(fresh)) == names
    assert trainable(fresh) == lorweb_tensor_names(fresh)
    assert lf.get_lorweb_scale(fresh) == 1.0
    assert all(torch.equal(v, lf.lorweb_state_dict(fresh)[k]) for k, v in lf.lorweb_state_dict(transformer).items())


def test_api_merged_block_is_left_and_the_heat_map_drawn(api, assets, monkeypatch):
    """After ``with lf.merged(transformer): ...`` the layers run unmerged again on the model's own base weights (the
    file's, bit for bit: the mixture runs as an op of its own), and ``lf.plot_coefficients(transformer,
    "coefficients.png")  # heat map`` wrote a PNG."""
    original = dict(load_transformer(assets).named_parameters())
    layers = lf.lorweb_layers(api["transformer"])
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight, original[f"{name}.weight"])
    calls = []
    real = ops.lorweb_linear
    monkeypatch.setattr(ops, "lorweb_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = next(iter(layers.values()))
    with torch.no_grad():
        layer(torch.randn(1, 3, layer.in_features))
    assert calls == [1]
    assert (api["_work"] / "coefficients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("strategy", [None, "full", "offload", "jit"])
def test_merged_folds_the_mixture_and_restores_the_weights_bit_for_bit(assets, monkeypatch, strategy):
    """"Batch-1 inference: fold the current analogy's mixture into the base weights (fp32 math, one rounding); the
    original weight tensors are kept and restored bit for bit on exit" (also on error), and the strategies' "how":
    full swaps merged tensors in and keeps the originals untouched, offload merges in place, jit changes no weight;
    with full / offload "every denoising step now costs what the base model costs" (no mixture op runs)."""
    transformer = load_transformer(assets)
    lf.inject_lorweb(transformer, lf.LoRWeBConfig())
    random_basis(transformer)
    query = torch.randn(2, 2304)
    with torch.no_grad():
        lf.set_query(transformer, query[:1])
        unmerged = transformer(**transformer_inputs(1))[0]
    layers = lf.lorweb_layers(transformer)
    weights = {n: layer.base_layer.weight for n, layer in layers.items()}
    originals = {n: (w.data, w.data_ptr(), w.detach().clone()) for n, w in weights.items()}
    mixture_calls = []
    for fn in ("lorweb_linear", "mixed_lora_delta"):
        real = getattr(ops, fn)
        monkeypatch.setattr(ops, fn, lambda *a, _real=real, **k: mixture_calls.append(1) or _real(*a, **k))
    def merged():  # as the README writes it (no strategy: "full"), or naming one
        return lf.merged(transformer) if strategy is None else lf.merged(transformer, strategy)

    with torch.no_grad(), merged():
        inside = transformer(**transformer_inputs(1))[0]
        for n, w in weights.items():
            changed = not torch.equal(w, originals[n][2])
            same_storage = w.data_ptr() == originals[n][1]
            if strategy in (None, "full"):
                assert changed and not same_storage and torch.equal(originals[n][0], originals[n][2]), n
            elif strategy == "offload":
                assert changed and same_storage, n
            else:
                assert not changed and same_storage, n
    torch.testing.assert_close(inside, unmerged, rtol=1e-4, atol=1e-5)
    assert mixture_calls == []  # the base layers' matmuls only (jit: merged weights built in the forward)
    for n, w in weights.items():
        assert w.data_ptr() == originals[n][1] and torch.equal(w, originals[n][2]), n
    with torch.no_grad():
        transformer(**transformer_inputs(1))
    assert mixture_calls  # unmerged again: the mixture runs (the spy sees it)
    with pytest.raises(KeyError), merged():
        raise KeyError("an error inside the block")
    for n, w in weights.items():
        assert w.data_ptr() == originals[n][1] and torch.equal(w, originals[n][2]), n


def test_jit_serves_a_batch_of_analogies_and_auto_picks_full_within_75_percent_of_free_memory(assets):
    """Merge strategies: ""jit" also serves a batch of *different* analogies: one merged weight per sample and
    layer" (full and offload merge one analogy and refuse a batch, naming jit); ""auto" runs a single analogy with
    ``choose_merge_strategy`` (full if a copy fits in 75% of the free memory of the weights' device, else, for
    weights on a GPU, offload ..., else jit)": on the CPU, jit past the 75%."""
    transformer = load_transformer(assets)
    lf.inject_lorweb(transformer, lf.LoRWeBConfig())
    random_basis(transformer)
    with torch.no_grad():
        lf.set_query(transformer, torch.randn(2, 2304))
        unmerged = transformer(**transformer_inputs(2))[0]
        with lf.merged(transformer, "jit"):
            torch.testing.assert_close(transformer(**transformer_inputs(2))[0], unmerged, rtol=1e-4, atol=1e-5)
    for strategy in ("full", "offload"):
        with pytest.raises(ValueError, match="strategy='jit' merges per sample"), lf.merged(transformer, strategy):
            pass
    need = flux.adapted_weight_bytes(transformer)
    assert need == sum(l.base_layer.weight.numel() * 4 for l in lf.lorweb_layers(transformer).values())
    assert flux.choose_merge_strategy(transformer, free_bytes=math.ceil(need / 0.75)) == "full"
    assert flux.choose_merge_strategy(transformer, free_bytes=math.floor(need / 0.75) - 1) == "jit"


def test_api_encoder_grid_and_query(api):
    """``flux.AnalogyEncoder(...)  # or a local directory; frozen; query_mode="cat-aa'b"``;
    ``flux.official_control_grid(a, a_prime, b)  # [a a'; b b], every cell at a's size``;
    ``encoder.query_from_grid(grid)  # (B, 2304): the official query, from crops of the grid`` (2304 = 3 x 768, the
    "cat-aa'b" concatenation of three CLIP embeddings: here 3 x the tiny CLIP's width)."""
    from PIL import Image

    encoder, grid, query = api["encoder"], api["grid"], api["query"]
    a, a_prime, b = api["a"], api["a_prime"], api["b"]
    assert encoder.query_mode == "cat-aa'b"
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())
    w, h = a.size
    assert grid.size == (2 * w, 2 * h)
    cells = [grid.crop(box) for box in ((0, 0, w, h), (w, 0, 2 * w, h), (0, h, w, 2 * h), (w, h, 2 * w, 2 * h))]
    want = [a, a_prime.resize((w, h), Image.BICUBIC), b.resize((w, h), Image.BICUBIC)]
    for got, expected in zip(cells, want + want[2:]):
        assert np.array_equal(np.asarray(got), np.asarray(expected.convert("RGB")))
    assert query.shape == (1, encoder.query_dim) == (1, 3 * encoder.embed_dim)
    assert encoder.query_dim_for("cat-aa'b") == 3 * encoder.query_dim_for("aa'bb'")
    s = grid.size[0] // 2
    crops = [grid.crop(box) for box in ((0, 0, s, s), (s, 0, 2 * s, s), (0, s, s, grid.size[1]))]
    torch.testing.assert_close(query, torch.cat([encoder.embed([c]) for c in crops], dim=1))


# ------------------------------------------------------------------------------------ bullets under the API
def test_target_modules_regex_full_match_or_names_exact_or_dotted_suffix(assets):
    """"``LoRWeBConfig.target_modules`` is a regex (full match) or a list of names (exact or dotted suffix), as in
    peft", and a target whose parent reads its weight (an ``nn.MultiheadAttention``'s out_proj) "is refused by name
    before anything is injected"."""
    small = dict(num_loras=2, rank=1, key_dim=2, query_dim=3)

    def inject(targets):
        return lf.inject_lorweb(load_transformer(assets), lf.LoRWeBConfig(**small, target_modules=targets))

    both = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_q"]
    with pytest.raises(ValueError, match="matches no linear layer"):
        inject("attn.to_q")  # a regex must match the whole name
    assert inject(r".*attn\.to_q") == both
    assert inject(["transformer_blocks.0.attn.to_q"]) == both[:1]  # exact: "single_..." is no dotted suffix
    assert inject(["attn.to_q"]) == both and inject(["to_q"]) == both  # dotted suffixes; add_q_proj not
    with pytest.raises(ValueError, match="matches no linear layer"):
        inject(["o_q"])  # a suffix that is not after a dot

    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.Module()])
    model.transformer_blocks[0].attn = nn.MultiheadAttention(4, 1)
    model.transformer_blocks[0].proj = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.out_proj is the out_proj of an "
                                         r"nn\.MultiheadAttention"):
        lf.inject_lorweb(model, lf.LoRWeBConfig(**small))
    assert lf.lorweb_layers(model) == {} and isinstance(model.transformer_blocks[0].proj, nn.Linear)


def test_checkpoint_shapes_defaults_partial_files_and_the_fewer_layers_warning(assets, tmp_path):
    """"N, r, key_dim, query_dim come from the shapes; heads, activation, reduce, scale and encoder are stored in the
    safetensors metadata of the files we write (official defaults when absent), with the layer count
    (``lorweb.layers``: a file holding fewer layers is refused as partial)"; "An official-format file (no layer
    count) that adapts fewer of a stock model's transformer-block linears than the official LoRWeB does loads with a
    warning naming how many run without an adapter" -- a LoRWeBWarning at the caller's line. The refused load leaves
    the model as it was: no injected layer."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = load_transformer(assets)
    lf.inject_lorweb(source, lf.LoRWeBConfig(num_loras=5, rank=3, key_dim=6, query_dim=10, heads=2,
                                             activation="tanh", reduce="sum", lora_alpha=6, target_modules=["to_q"]))
    lf.save_lorweb_weights(source, tmp_path / "ours.safetensors")
    state = load_file(tmp_path / "ours.safetensors")
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["lorweb.layers"] == "2"
    # ours: every setting back from the shapes and the metadata, no warning (the file records its layer count)
    fresh = load_transformer(assets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lf.load_lorweb_weights(fresh, tmp_path / "ours.safetensors")
    assert not [w for w in caught if issubclass(w.category, lf.LoRWeBWarning)]
    got = {(l.num_loras, l.rank, l.key_dim, l.query_dim, l.heads, l.activation, l.reduce, l.scale)
           for l in lf.lorweb_layers(fresh).values()}
    assert got == {(5, 3, 6, 10, 2, "tanh", "sum", 2.0)}
    # partial: one layer's tensors removed, the metadata kept
    partial = {k: v for k, v in state.items() if ".single_transformer_blocks." not in k}
    save_file(partial, tmp_path / "partial.safetensors", metadata=meta)
    fresh = load_transformer(assets)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(lf.LoRWeBCheckpointError, match=r"lorweb\.layers='2' but the file holds 1"):
        lf.load_lorweb_weights(fresh, tmp_path / "partial.safetensors")
    assert lf.lorweb_layers(fresh) == {} and all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    # official format: no metadata at all -> official defaults for what the shapes do not give, and the warning
    save_file(state, tmp_path / "official.safetensors")
    fresh = load_transformer(assets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        lf.load_lorweb_weights(fresh, tmp_path / "official.safetensors")
    got = {(l.num_loras, l.rank, l.key_dim, l.query_dim, l.heads, l.activation, l.reduce, l.scale)
           for l in lf.lorweb_layers(fresh).values()}
    assert got == {(5, 3, 6, 10, 1, "softmax", "mean", 1.0)}
    ours = [w for w in caught if issubclass(w.category, lf.LoRWeBWarning)]
    assert len(ours) == 1 and "2 of the 20 linear layers" in str(ours[0].message), [str(w.message) for w in caught]
    assert (ours[0].filename, ours[0].lineno) == (__file__, line)


def test_warnings_are_lorweb_warnings_at_the_callers_line_through_diffusers(assets):
    """"Warnings have the category ``lf.LoRWeBWarning`` (a UserWarning) and point at the caller's line, not at
    lorweb_fast's: ``filterwarnings("ignore", category=lf.LoRWeBWarning)`` silences them (a ``module="lorweb_fast"``
    filter does not match)" -- here for a warning raised inside a LoRWeB layer called by diffusers'
    FluxTransformer2DModel (a forward with autograd inside ``merged()``)."""
    transformer = load_transformer(assets)
    lf.inject_lorweb(transformer, lf.LoRWeBConfig())
    with torch.no_grad():
        lf.set_query(transformer, torch.randn(1, 2304))
    inputs = transformer_inputs(1)
    for filters in ([], [dict(module="lorweb_fast")], [dict(category=lf.LoRWeBWarning)]):
        with warnings.catch_warnings(record=True) as caught, lf.merged(transformer):
            warnings.simplefilter("always")
            for kwargs in filters:
                warnings.filterwarnings("ignore", **kwargs)
            line = inspect.currentframe().f_lineno + 1
            transformer(**inputs)
        ours = [w for w in caught if issubclass(w.category, UserWarning) and "merged()" in str(w.message)]
        if filters and "category" in filters[0]:
            assert ours == []
        else:
            assert [(w.category, w.filename, w.lineno) for w in ours] == [(lf.LoRWeBWarning, __file__, line)]
    assert issubclass(lf.LoRWeBWarning, UserWarning)


# ------------------------------------------------------------------------- README prose written as signatures
def readme_line(text: str) -> int:
    """The README.md line number where ``text`` first appears (0 when it does not)."""
    return next((i for i, line in enumerate(README.splitlines(), 1) if text in line), 0)


#: signatures the README writes in its prose, and the callables they describe (methods without ``self``)
SIGNATURES = [
    ("load_lorweb_weights(model, path, config=None, *, settings=None)", lf.load_lorweb_weights),
    ("pipe.load_lora_weights(path_or_dir, weight_name=None, config=None, *, adapter_name=None, **hub_options)",
     flux.LoRWeBKontextPipeline.load_lora_weights),
    ("pipe.save_lora_weights(dir, *, weight_name=None, is_main_process=True, safe_serialization=True)",
     flux.LoRWeBKontextPipeline.save_lora_weights),
    ("pipe.push_to_hub(repo_id, *, private=None, token=None)", flux.LoRWeBKontextPipeline.push_to_hub),
]


@pytest.mark.parametrize("text, function", SIGNATURES, ids=[f.__name__ for _, f in SIGNATURES])
def test_signatures_written_in_the_readme_take_their_arguments_as_the_code_does(text, function):
    """A signature written in the README's prose reads as Python: each parameter it shows positionally, the code
    takes positionally, in that order; each it shows after ``*``, the code takes by keyword (by name, or through its
    ``**kwargs``); a default it writes is the code's. (The README once wrote keyword-only parameters as positional
    ones, a reading that raised TypeError.)"""
    assert readme_line(text), f"README.md no longer writes {text}"
    params = text.split("(", 1)[1].rsplit(")", 1)[0]
    written = inspect.signature(eval(f"lambda {params}: None"))  # noqa: S307 (a README line, parsed as a signature)
    code = list(inspect.signature(function).parameters.values())
    code = code[1:] if code and code[0].name == "self" else code
    positional = [p for p in code if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    by_name = {p.name: p for p in code}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in code)
    for i, p in enumerate(written.parameters.values()):
        if p.kind is p.POSITIONAL_OR_KEYWORD:
            assert i < len(positional), f"{text}: {p.name} is written positionally, the code takes fewer"
            assert positional[i].default == p.default or p.default is p.empty, (text, p.name)
        elif p.kind is p.KEYWORD_ONLY:
            known = by_name.get(p.name)
            assert known is not None and known.kind is known.KEYWORD_ONLY or known is None and takes_kwargs, \
                f"{text}: {p.name} is written keyword-only, the code takes it otherwise"
            assert known is None or known.default == p.default, (text, p.name)
        else:
            assert p.kind is p.VAR_KEYWORD and takes_kwargs, (text, p.name)


# -------------------------------------------------------------------------------------- the Inference block
@pytest.fixture(scope="module")
def run_folder(assets, tmp_path_factory):
    """``output/LoRWeB``: a checkpoint and its config.yaml whose query mode ("caa'b", 8 features with the tiny CLIP)
    and encoder are recorded in config.yaml only (our metadata keys for them stripped from the file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("inference_block")
    transformer = load_transformer(assets)
    lf.inject_lorweb(transformer, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=8))
    random_basis(transformer, seed=1)
    folder = root / "output" / "LoRWeB"
    weights = folder / "lorweb.safetensors"
    lf.save_lorweb_weights(transformer, weights, config={"query_mode": "caa'b", "encoder": str(assets / "clip")})
    with safe_open(str(weights), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("lorweb.query_mode", "encoder")}
    save_file(load_file(weights), str(weights), metadata=meta)
    assert "query_mode: caa'b" in (folder / "config.yaml").read_text()
    return folder


@pytest.fixture(scope="module")
def inference(assets, run_folder):
    """The *Inference* block executed as written up to the Hub statement (local folders for the hub ids, the CPU,
    the native resolution at 64 px); its namespace."""
    block = python_block("### Inference")
    local = block[:block.index("# the released checkpoint")]
    source = substituted(local, {
        '"black-forest-labs/FLUX.1-Kontext-dev"': repr(str(assets / "pipe")),
        '"output/LoRWeB"': repr(str(run_folder)),
        'device="cuda")': 'device="cpu", resolution="native", long_edge=64)'})
    ns = {"torch": torch}
    for i, names in enumerate((("a", "a_prime", "b"), ("a1", "a1e", "b1"), ("a2", "a2e", "b2"))):
        ns.update(zip(names, random_analogy(10 + i)))
    exec(compile(source, "README.md (Inference block)", "exec"), ns)
    ns["_batch_coefficients"] = lf.get_coefficients(ns["pipe"].transformer)  # right after the batch call
    return ns


def test_inference_block_settings_come_from_config_yaml_and_the_encoder_runs_in_the_pipeline_dtype(inference,
                                                                                                     assets):
    """``from_pretrained(model, "output/LoRWeB", dtype=torch.bfloat16, ...)  # file or folder ... settings from its
    config.yaml``: the query mode and encoder recorded only in config.yaml are used; "the encoder runs in the
    pipeline's dtype (bf16, as inference.py) unless encoder_dtype= says otherwise"."""
    pipe = inference["pipe"]
    assert pipe.encoder.query_mode == "caa'b" and pipe.encoder.query_dim == 8
    assert Path(pipe.encoder.name) == assets / "clip"
    assert pipe.transformer.dtype == torch.bfloat16
    assert {p.dtype for p in pipe.encoder.model.parameters()} == {torch.bfloat16}


def test_inference_block_outputs_and_per_sample_coefficients(inference):
    """``b_prime = pipe(a, a_prime, b, "...")[0]`` is b' (a PIL image, the grid's bottom-right cell: 32 px for a
    40 px b at long_edge=64); ``b_primes = pipe([a1, a2], ..., generator=[...])  # a batch of different analogies,
    one call, per-sample coefficients``: two b', and two different coefficient rows in every layer."""
    from PIL import Image

    assert isinstance(inference["b_prime"], Image.Image) and inference["b_prime"].size == (32, 32)
    b_primes = inference["b_primes"]
    assert len(b_primes) == 2 and all(isinstance(im, Image.Image) for im in b_primes)
    coeffs = inference["_batch_coefficients"]
    assert coeffs and all(c.shape == (2, 3) and not torch.allclose(c[0], c[1]) for c in coeffs.values())


def test_inference_inputs_are_images_or_paths_and_the_seed_is_50_by_default(inference, tmp_path):
    """``# PIL images or paths; seed 50 by default``: paths give the same b' as the images; the default equals an
    explicit generator seeded with 50 and differs from seed 51."""
    pipe, images = inference["pipe"], [inference[k] for k in ("a", "a_prime", "b")]
    paths = []
    for name, image in zip(("a", "a_prime", "b"), images):
        image.save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    prompt = "make it a pencil sketch"
    default = np.asarray(inference["b_prime"])
    assert np.array_equal(np.asarray(pipe(*paths, prompt)[0]), default)
    assert np.array_equal(np.asarray(pipe(*images, prompt, generator=torch.Generator().manual_seed(50))[0]), default)
    assert not np.array_equal(np.asarray(pipe(*images, prompt, generator=torch.Generator().manual_seed(51))[0]),
                              default)


def test_from_pretrained_options_as_commented(assets, run_folder, monkeypatch):
    """``# torch_dtype= is accepted for dtype=; unknown options are refused before anything loads``; encoder_dtype=
    overrides the encoder's dtype; without dtype the pipeline loads in fp32 "as diffusers' from_pretrained does"."""
    load = flux.LoRWeBKontextPipeline.from_pretrained
    model, native = str(assets / "pipe"), dict(resolution="native", long_edge=64)
    pipe = load(model, str(run_folder), torch_dtype=torch.bfloat16, encoder_dtype=torch.float32, **native)
    assert pipe.transformer.dtype == torch.bfloat16
    assert {p.dtype for p in pipe.encoder.model.parameters()} == {torch.float32}
    pipe = load(model, str(run_folder), **native)
    assert pipe.transformer.dtype == torch.float32 and pipe.encoder.model.dtype == torch.float32

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the unknown option was refused")

    monkeypatch.setattr(flux, "AnalogyEncoder", must_not_load)
    monkeypatch.setattr(flux, "load_kontext_pipeline", must_not_load)
    with pytest.raises(TypeError, match=r"unexpected options \['num_inference_steps'\]"):
        load(model, str(run_folder), dtype=torch.bfloat16, num_inference_steps=4, **native)
    # Resolution: "An option of the other mode (--long-edge with the official resolution, --max-area / --max-size
    # with the native one) is an error rather than silently ignored, ... in Python (..., its from_pretrained before
    # any model loads, ...)"
    with pytest.raises(ValueError, match="long_edge"):
        load(model, str(run_folder), long_edge=64)
    with pytest.raises(ValueError, match="max_area"):
        load(model, str(run_folder), resolution="native", max_area=64 * 64)


def test_inference_block_hub_statement_downloads_the_weights_only(assets, run_folder, tmp_path, monkeypatch):
    """``from_pretrained(model, "hilamanor/lorweb", ..., weights_hub_options={"revision": "main"})  # the weights'
    download only``, against a fake huggingface_hub serving the repo: only that repo is fetched, at that revision;
    the pipeline loads with its config.yaml's settings."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    block = python_block("### Inference")
    hub_part = block[block.index("# the released checkpoint"):]
    source = substituted(hub_part, {'"black-forest-labs/FLUX.1-Kontext-dev"': repr(str(assets / "pipe")),
                                    'device="cuda",': 'device="cpu", resolution="native", long_edge=64,'})
    assert '"hilamanor/lorweb"' in source and 'weights_hub_options={"revision": "main"}' in source
    repo = tmp_path / "hub" / "hilamanor" / "lorweb"
    shutil.copytree(run_folder, repo)
    calls = []

    def list_repo_files(repo_id, *, revision=None, token=None):
        calls.append(("list", repo_id, revision))
        return sorted(p.relative_to(tmp_path / "hub" / repo_id).as_posix()
                      for p in (tmp_path / "hub" / repo_id).rglob("*") if p.is_file())

    def snapshot_download(repo_id, *, allow_patterns=None, **kwargs):
        calls.append(("download", repo_id, kwargs.get("revision")))
        src, dst = tmp_path / "hub" / repo_id, tmp_path / "cache" / repo_id
        files = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / rel, dst / rel)
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    ns = {"torch": torch, "LoRWeBKontextPipeline": flux.LoRWeBKontextPipeline}
    exec(compile(source, "README.md (Inference block, Hub)", "exec"), ns)
    assert calls and {c[1:] for c in calls} == {("hilamanor/lorweb", "main")}
    assert any(c[0] == "download" for c in calls)
    assert ns["pipe"].encoder.query_mode == "caa'b" and ns["pipe"].transformer.dtype == torch.bfloat16


# ----------------------------------------------------------------------- the diffusers-style inference table
def test_diffusers_style_table_rows_on_the_tiny_pipeline(tmp_path):
    """The LoRA API table, row by row, as written: ``set_adapters(name, adapter_weights=s)`` (a number or
    ``{"transformer": s}``; other components and other names refused), ``disable_lora`` / ``enable_lora`` (strength
    0 until enable_lora, which restores the strength set meanwhile), ``get_active_adapters`` / ``get_list_adapters``,
    ``num_fused_loras`` / ``fused_loras`` (1 / {name} while fused, else 0 / set()), fusing before any analogy names
    set_analogy, ``set_analogy(...); fuse_lora(strategy="full", lora_scale=...)`` (another analogy raises, copies
    refused, disable_lora refused naming itself), ``unfuse_lora(["transformer"])`` giving the strength back,
    ``pipe.to`` returning the wrapper, ``save_pretrained`` / ``save_lora_weights`` files, ``load_lora_weights(dir,
    weight_name)`` at strength 1.0 enabled, and ``delete_adapters(name)`` = ``unload_lora_weights()``."""
    pipe = tiny_lorweb_kontext_pipeline(tmp_path / "models")
    a, a_prime, b = random_analogy(0)
    other = random_analogy(1)
    strength = lambda: lf.get_lorweb_scale(pipe.transformer)  # noqa: E731
    assert pipe.get_active_adapters() == ["lorweb"] and pipe.get_list_adapters() == {"transformer": ["lorweb"]}
    pipe.set_adapters("lorweb", adapter_weights=0.5)
    assert strength() == 0.5
    pipe.set_adapters("lorweb", adapter_weights={"transformer": 0.7})
    assert strength() == 0.7
    with pytest.raises(ValueError, match="text_encoder"):
        pipe.set_adapters("lorweb", adapter_weights={"text_encoder": 0.7})
    with pytest.raises(ValueError, match="unknown adapter names 'other'"):
        pipe.set_adapters("other", adapter_weights=0.7)
    pipe.disable_lora()
    assert strength() == 0.0 and pipe.get_active_adapters() == []
    pipe.set_adapters("lorweb", adapter_weights=0.3)
    assert strength() == 0.0  # still disabled
    pipe.enable_lora()
    assert strength() == 0.3 and pipe.get_active_adapters() == ["lorweb"]
    assert (pipe.num_fused_loras, pipe.fused_loras) == (0, set())
    with pytest.raises(RuntimeError, match="set_analogy"):
        pipe.fuse_lora()
    pipe.set_analogy(a, a_prime, b)
    pipe.fuse_lora(strategy="full", lora_scale=0.5)
    assert (pipe.num_fused_loras, pipe.fused_loras) == (1, {"lorweb"})
    with pytest.raises(RuntimeError, match="disable_lora"):
        pipe.disable_lora()
    with pytest.raises(TypeError, match="unfuse"):
        copy.deepcopy(pipe.transformer)
    pipe(a, a_prime, b, "edit", num_inference_steps=1)  # the fused analogy runs
    with pytest.raises(RuntimeError, match="fused for another analogy"):
        pipe(*other, "edit", num_inference_steps=1)
    pipe.unfuse_lora(["transformer"])
    assert (pipe.num_fused_loras, pipe.fused_loras, strength()) == (0, set(), 0.3)
    assert pipe.to("cpu") is pipe
    pipe.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["README.md", "config.yaml", "lorweb.safetensors"]
    pipe.save_lora_weights(tmp_path / "saved2", weight_name="w.safetensors")
    assert sorted(p.name for p in (tmp_path / "saved2").iterdir()) == ["README.md", "config.yaml", "w.safetensors"]
    with pytest.raises(ValueError, match="safetensors"):
        pipe.save_lora_weights(tmp_path / "saved3", safe_serialization=False)
    pipe.save_lora_weights(tmp_path / "saved4", is_main_process=False)
    assert not (tmp_path / "saved3").exists() and not (tmp_path / "saved4").exists()
    pipe.disable_lora()
    pipe.load_lora_weights(tmp_path / "saved2", "w.safetensors")
    assert strength() == 1.0 and pipe.get_active_adapters() == ["lorweb"]
    pipe.delete_adapters("lorweb")
    assert lf.lorweb_layers(pipe.transformer) == {} and pipe.get_active_adapters() == []
    with pytest.raises(ValueError, match="load_lora_weights"):
        pipe(a, a_prime, b, "edit", num_inference_steps=1)
