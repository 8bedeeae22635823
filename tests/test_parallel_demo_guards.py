"""Guards for lorweb_fast.parallel (which tensor-parallel plan entries hit LoRWeB layers, what enable_parallelism
forwards) and lorweb_fast.demo (seeded tiny models, the synthetic analogies' layout and edits, the demo analogy).
CPU only, nothing downloaded; the models are the demo's tiny ones."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import lorweb_fast as lf
from lorweb_fast import demo, parallel

FLIP_CAPTION = "mirror the image from left to right"
SWAP_CAPTION = "swap the colour channels"


# ------------------------------------------------------------------------------------------------ parallel
class _ToyModel(nn.Module):
    """Two blocks of (to_q, to_q2, proj.out) with LoRWeB on every to_q and on the top-level proj_out; records the
    calls that diffusers' ``enable_parallelism`` would receive."""

    _tp_plan = {"blocks.*.to_q": "colwise"}

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"to_q": nn.Linear(4, 4), "to_q2": nn.Linear(4, 4)})
                                    for _ in range(2))
        self.proj = nn.ModuleDict({"out": nn.Linear(4, 4)})
        self.proj_out = nn.Linear(4, 4)
        lf.inject_lorweb(self, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=2, query_dim=3,
                                               target_modules=r"blocks\.\d+\.to_q|proj_out"))
        self.calls = []

    def enable_parallelism(self, **kwargs):
        self.calls.append(kwargs)


def test_plan_star_is_one_modulelist_index_not_a_path():
    """``*`` in a plan key stands for one ModuleList index: ``blocks.*`` names the blocks themselves (no LoRWeB
    layer), not every module below them."""
    model = _ToyModel()
    assert parallel.lorweb_layers_in_plan(model, {"blocks.*": "colwise"}) == []
    parallel.check_tensor_parallel(model, {"blocks.*": "colwise"})


def test_plan_keys_are_literal_module_paths():
    """A plan key is a literal path: ``proj.out`` (a plain Linear) does not hit the wrapped ``proj_out``."""
    model = _ToyModel()
    assert parallel.lorweb_layers_in_plan(model, {"proj.out": "colwise"}) == []
    assert parallel.lorweb_layers_in_plan(model, {"proj_out": "colwise"}) == ["proj_out"]


def test_plan_hits_are_full_matches_sorted_and_unique():
    """Hits are the full-match names only (not the LoRWeB layer's own submodules, not ``to_q2`` that merely starts
    with a layer's name), sorted, each once even when two keys match it."""
    model = _ToyModel()
    plan = {"blocks.1.to_q": "colwise", "blocks.*.to_q": "colwise", "blocks.*.to_q2": "rowwise"}
    assert parallel.lorweb_layers_in_plan(model, plan) == ["blocks.0.to_q", "blocks.1.to_q"]
    assert parallel.lorweb_layers_in_plan(model, {"blocks.*.to_q2": "colwise"}) == []
    parallel.check_tensor_parallel(model, {"blocks.*.to_q2": "colwise"})


def test_a_single_sharded_layer_is_refused():
    """One LoRWeB layer in the plan is enough to raise."""
    with pytest.raises(parallel.TensorParallelNotSupportedError, match=r"shards 1 layers.*blocks\.0\.to_q"):
        parallel.check_tensor_parallel(_ToyModel(), {"blocks.0.to_q": "colwise"})


def test_tensor_parallel_inside_a_parallel_config_is_refused_before_forwarding():
    """A ``ParallelConfig`` carrying a ``tensor_parallel_config`` is checked against the model's ``_tp_plan`` like a
    bare ``TensorParallelConfig``, and the model's enable_parallelism is not called."""
    from diffusers.models._modeling_parallel import ParallelConfig, TensorParallelConfig

    model = _ToyModel()
    with pytest.raises(parallel.TensorParallelNotSupportedError):
        parallel.enable_parallelism(model, ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2)))
    with pytest.raises(parallel.TensorParallelNotSupportedError):
        parallel.enable_parallelism(model, TensorParallelConfig(tp_degree=2))
    assert model.calls == []


def test_context_parallelism_is_forwarded_with_its_plan():
    """A context-parallel config is not checked against ``_tp_plan`` (which here shards LoRWeB layers) and goes to
    the model's enable_parallelism with the given cp_plan."""
    from diffusers.models._modeling_parallel import ContextParallelConfig

    model = _ToyModel()
    config, cp_plan = ContextParallelConfig(ulysses_degree=2), {"": {}}
    parallel.enable_parallelism(model, config, cp_plan=cp_plan)
    parallel.enable_parallelism(model, config)
    assert [c["config"] for c in model.calls] == [config, config]
    assert model.calls[0]["cp_plan"] is cp_plan
    assert model.calls[1].get("cp_plan") is None


# ---------------------------------------------------------------------------------------------------- demo
def test_tiny_clip_tokenizer_round_trips_the_demo_captions():
    """The tiny CLIP tokenizer knows every character of the demo's words, as a word start and a word end: the
    captions encode without unknown tokens and decode back unchanged."""
    tok = demo._clip_tokenizer()
    for caption in (FLIP_CAPTION, SWAP_CAPTION, " ".join(demo._WORDS)):
        ids = tok(caption).input_ids
        assert tok.decode(ids, skip_special_tokens=True) == caption
        assert ids.count(tok.unk_token_id) == 1  # the end-of-text token (CLIP's unk) only


def test_tiny_t5_tokenizer_gives_one_piece_per_demo_word():
    """The tiny T5 tokenizer holds a ``▁word`` piece for each demo word, so a caption of demo words is one token per
    word (then ``</s>``), no unknown token, and fits the demo's T5 sequence length uncut; it decodes back unchanged."""
    tok = demo._t5_tokenizer()
    for caption in (FLIP_CAPTION, SWAP_CAPTION):
        ids = tok(caption).input_ids
        assert tok.convert_ids_to_tokens(ids) == ["▁" + w for w in caption.split()] + ["</s>"]
        assert len(ids) <= demo.DEMO_MAX_SEQUENCE_LENGTH
        assert tok.decode(ids, skip_special_tokens=True) == caption


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_kontext_pipeline_is_seeded():
    """Every random part of the tiny pipeline comes from ``seed`` (default 0), not from the global RNG: from the
    same global RNG state, the default build and a seed=1 build differ in every part."""
    parts = ("transformer", "vae", "text_encoder", "text_encoder_2")
    torch.manual_seed(123)
    default = demo.build_tiny_kontext_pipeline()
    torch.manual_seed(123)
    other = demo.build_tiny_kontext_pipeline(seed=1)
    for p in parts:
        assert not _same(_state(getattr(default, p)), _state(getattr(other, p))), p


def test_tiny_clip_is_seeded_and_returns_its_path(tmp_path):
    """build_tiny_clip returns a Path (also for a str), writes projection_dim 8 by default (24-feature queries) and
    its weights depend on the seed alone."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig

    torch.manual_seed(123)
    got = demo.build_tiny_clip(str(tmp_path / "a"))
    assert got == tmp_path / "a" and isinstance(got, type(tmp_path))
    torch.manual_seed(456)
    demo.build_tiny_clip(tmp_path / "b")
    demo.build_tiny_clip(tmp_path / "c", seed=1)
    assert CLIPVisionConfig.from_pretrained(got).projection_dim == 8
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert _same(a, b) and not _same(a, c)


def _cells(path, cell):
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (2 * cell, 2 * cell, 3)
    return grid[:cell, :cell], grid[:cell, cell:], grid[cell:, :cell], grid[cell:, cell:]


def test_synthetic_analogies_layout_and_alternating_edits(tmp_path):
    """``count`` analogies named 0000, 0001, ... of DEMO_CELL-pixel cells: control [a a'; b b], target
    [a a'; b b'], with b' = edit(b) and a' = edit(a) (a visible change), the edit alternating between a left-right
    flip and an RGB -> BGR channel swap, and each caption naming its edit. Written into nested, new folders."""
    root = demo.make_synthetic_analogies(tmp_path / "x" / "data", 4)
    cell = demo.DEMO_CELL
    assert sorted(p.name for p in (root / "target").iterdir()) == [f"000{i}.png" for i in range(4)]
    for i in range(4):
        a, a2, b, b2 = _cells(root / "target" / f"000{i}.png", cell)
        ca, ca2, cb, cb_right = _cells(root / "control" / f"000{i}.png", cell)
        for got, want in ((ca, a), (ca2, a2), (cb, b), (cb_right, b)):
            np.testing.assert_array_equal(got, want)
        edit = (lambda x: x[:, ::-1]) if i % 2 == 0 else (lambda x: x[..., ::-1])
        np.testing.assert_array_equal(a2, edit(a))
        np.testing.assert_array_equal(b2, edit(b))
        assert not np.array_equal(a, a2) and not np.array_equal(b, b2)
        caption = (root / "captions" / f"000{i}.txt").read_text().strip()
        assert caption == (FLIP_CAPTION if i % 2 == 0 else SWAP_CAPTION)


def test_synthetic_analogies_depend_on_the_seed_and_can_be_rewritten(tmp_path):
    """Same seed, same files (also when written again into the existing folder); another seed, other pictures."""
    def pixels(root):
        return [np.asarray(Image.open(root / "target" / f"000{i}.png")) for i in range(2)]

    first = pixels(demo.make_synthetic_analogies(tmp_path / "d", 2, seed=3))
    again = pixels(demo.make_synthetic_analogies(tmp_path / "d", 2, seed=3))
    other = pixels(demo.make_synthetic_analogies(tmp_path / "e", 2, seed=4))
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not any(np.array_equal(x, y) for x, y in zip(first, other))


def test_demo_analogy_is_a_seeded_left_right_flip():
    """demo_analogy gives (a, flip(a), b, the flip caption) of DEMO_CELL-pixel pictures, drawn from ``seed``."""
    a, a2, b, prompt = demo.demo_analogy()
    assert a.size == a2.size == b.size == (demo.DEMO_CELL, demo.DEMO_CELL)
    assert prompt == FLIP_CAPTION
    np.testing.assert_array_equal(np.asarray(a2), np.asarray(a)[:, ::-1])
    assert not np.array_equal(np.asarray(a), np.asarray(a2)) and not np.array_equal(np.asarray(a), np.asarray(b))
    same = demo.demo_analogy(seed=1234)
    other = demo.demo_analogy(seed=7)
    assert np.array_equal(np.asarray(same[0]), np.asarray(a)) and np.array_equal(np.asarray(same[2]), np.asarray(b))
    assert not np.array_equal(np.asarray(other[0]), np.asarray(a))
