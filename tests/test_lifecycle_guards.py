"""Memory and lifecycle guards found by an audit (CPU only, tiny models, no timing): nothing that a call, a merge, a
fuse, a load / unload cycle or a training run does may leave references or state behind that outlive their use or
grow with repeated use.

Checked with weakrefs (layers, parameters, weight storages, input images, whole models), counts of modules,
parameters, buffers and every kind of module hook (the model's and torch's global ones), the tensors a
``LoRWeBLinear`` holds as attributes, gradients and autograd history left on parameters and coefficients, the
module-level containers and functools caches of lorweb_fast, DataLoader worker processes and pyplot's open figures.
The models are ``lorweb_fast.testing``'s tiny two-layer ``nn.Sequential``, a tiny FLUX.1-Kontext pipeline with a
tiny CLIP (``tiny_kontext_with_encoder``) and the tiny training set of ``tiny_training_assets``.
"""

import copy
import gc
import json
import math
import multiprocessing
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import demo, flux, lora_api, training
from lorweb_fast.testing import (module_hook_count, module_level_state, NanGradient, one_intra_op_thread, pair_config,
                                 pair_query, PAIR_QUERY_DIM, random_analogy, same_state_dict, state_dict_copy,
                                 tiny_kontext_with_encoder, tiny_pair_model, tiny_train_config, tiny_training_assets)

pytest.importorskip("diffusers")

QUERY_DIM = PAIR_QUERY_DIM
CONFIG = pair_config()
STRATEGIES = ("full", "offload", "jit")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_intra_op_thread():
        yield


tiny_model, query = tiny_pair_model, pair_query


def structure(model: nn.Module) -> dict:
    """What repeated use must not grow: module / parameter / buffer counts, the hooks of every module and torch's
    global ones, the model's own attributes and the attribute names of its LoRWeB layers."""
    modules = list(model.modules())
    return {"modules": len(modules), "parameters": len(list(model.parameters())),
            "buffers": len(list(model.buffers())),
            "hooks": module_hook_count(model),
            "model attributes": sorted(model.__dict__),
            "layer attributes": sorted({k for layer in lf.lorweb_layers(model).values() for k in vars(layer)})}


def held_tensors(layer) -> dict:
    """The tensors a LoRWeB layer holds as plain attributes (not parameters or buffers)."""
    return {k: v for k, v in vars(layer).items() if isinstance(v, torch.Tensor)}


def merge_flags(model) -> list:
    return [(layer._merged, layer._merge_jit) for layer in lf.lorweb_layers(model).values()]


def alive(refs) -> int:
    gc.collect()
    return sum(r() is not None for r in refs)


def with_graph(model) -> list:
    """Names of the layers whose coefficients or per-forward query carry autograd history."""
    return [name for name, layer in lf.lorweb_layers(model).items()
            if any(isinstance(t, torch.Tensor) and t.grad_fn is not None for t in (layer._coefficients, layer._query))]


# ------------------------------------------------------------------------------------- coefficients and forwards
def test_inference_coefficients_hold_no_graph_and_forwards_keep_no_inputs():
    """set_query under no_grad: coefficients without autograd history (a deep copy works); a forward with autograd
    (input requiring grad, backward run) keeps neither the input nor new tensors on the layers; per-forward
    coefficients are computed in the forward and not stored; clear_query drops every tensor."""
    m = tiny_model()
    q = query(2)
    with torch.no_grad():
        lf.set_query(m, q)
    layers = lf.lorweb_layers(m)
    held = {name: held_tensors(layer) for name, layer in layers.items()}
    for layer_held in held.values():
        assert list(layer_held) == ["_coefficients"]
        assert layer_held["_coefficients"].grad_fn is None and not layer_held["_coefficients"].requires_grad
    copy.deepcopy(m)
    x = torch.randn(2, 6, requires_grad=True)
    x_ref = weakref.ref(x)
    m(x).square().sum().backward()
    for name, layer in layers.items():
        now = held_tensors(layer)
        assert now.keys() == held[name].keys() and all(now[k] is held[name][k] for k in now)
    del x
    assert alive([x_ref]) == 0
    m.train()
    lf.set_query(m, q, per_forward=True)
    m(torch.randn(2, 6)).sum().backward()
    for layer in layers.values():
        assert layer.coefficients is None and list(held_tensors(layer)) == ["_query"] and layer._query is q
    lf.clear_query(m)
    assert all(held_tensors(layer) == {} for layer in layers.values())


def test_training_coefficients_are_replaced_not_chained():
    """In training mode set_query's coefficients carry autograd history (by design); every new set_query (one per
    step) releases the previous coefficients and their graph instead of keeping them alive."""
    m = tiny_model().train()
    refs = []
    for step in range(4):
        lf.set_query(m, query(2, seed=step))
        refs += [weakref.ref(layer.coefficients) for layer in lf.lorweb_layers(m).values()]
        assert len(with_graph(m)) == 2
        m(torch.randn(2, 6)).sum().backward()
    assert alive(refs) == 2  # the last step's coefficients only
    with torch.no_grad():
        lf.set_query(m, query(2))
    assert with_graph(m) == [] and alive(refs) == 0


# --------------------------------------------------------------------------------------- inject / remove cycles
def test_inject_remove_cycles_free_the_layers_and_keep_the_model_size():
    """inject_lorweb / set_query / forward / remove_lorweb, three times: the model's structure comes back as it was
    after the first removal and every removed layer and its parameters are freed."""
    m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    refs, shapes = [], []
    for cycle in range(3):
        lf.inject_lorweb(m, CONFIG)
        with torch.no_grad():
            lf.set_query(m, query(2, seed=cycle))
            m(torch.randn(2, 6))
        refs += [weakref.ref(obj) for layer in lf.lorweb_layers(m).values()
                 for obj in (layer, layer.lora_A, layer.lora_B, layer.lora_keys, layer.att_lora_to_q)]
        lf.remove_lorweb(m)
        shapes.append(structure(m))
    assert shapes[0] == shapes[1] == shapes[2]
    assert shapes[0]["modules"] == 3 and shapes[0]["parameters"] == 4 and shapes[0]["hooks"] == 0
    assert alive(refs) == 0


# --------------------------------------------------------------------------------------------------- merged()
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merged_entered_many_times_leaves_nothing_behind(strategy):
    """Five merged() blocks with a forward inside: no hook, attribute, merge flag or weight change left behind."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    before, shape = state_dict_copy(m), structure(m)
    for _ in range(5):
        with lf.merged(m, strategy), torch.no_grad():
            m(torch.randn(1, 6))
    assert structure(m) == shape and same_state_dict(m, before)
    assert merge_flags(m) == [(False, False)] * 2


@pytest.mark.parametrize("where", ["entry", "body"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merged_that_raises_restores_weights_and_removes_its_hooks(strategy, where, monkeypatch):
    """An error inside the block, or while the block merges its second layer: the weights come back bit for bit,
    the load_state_dict pre-hooks on the model and the modules above the layers are removed, no layer stays
    marked merged, and the model then merges again as usual."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    before, shape = state_dict_copy(m), structure(m)

    class Interrupted(Exception):
        pass

    real, calls = flux.merged_weight, []

    def second_fails(layer):
        calls.append(layer)
        if len(calls) == 2:
            raise Interrupted()
        return real(layer)

    def merge_fails(layer, coeffs):
        raise Interrupted()

    if where == "entry" and strategy == "jit":  # "jit" merges nothing on entry: the first forward inside does
        monkeypatch.setattr(lf.LoRWeBLinear, "merged_weight_for", merge_fails)
    elif where == "entry":
        monkeypatch.setattr(flux, "merged_weight", second_fails)
    with pytest.raises(Interrupted):
        with lf.merged(m, strategy), torch.no_grad():
            m(torch.randn(1, 6))
            raise Interrupted()
    monkeypatch.undo()
    assert structure(m) == shape and same_state_dict(m, before) and merge_flags(m) == [(False, False)] * 2
    with lf.merged(m, strategy):
        assert structure(m)["hooks"] == (0 if strategy == "jit" else shape["hooks"] + 3)
    assert structure(m) == shape


# ----------------------------------------------------------------------------------------------- fuse_lora()
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fuse_unfuse_cycles_and_a_refused_fuse_leave_nothing_behind(strategy):
    """fuse_lora / forward / unfuse_lora three times, and a fuse refused on entry (a batch of two analogies for
    "full"/"offload", a nested fuse for "jit"): no fuse state, hook, flag or weight change left behind."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    before, shape = state_dict_copy(m), structure(m)
    for _ in range(3):
        lora_api.fuse_lora(m, strategy)
        with torch.no_grad():
            m(torch.randn(1, 6))
        lora_api.unfuse_lora(m)
        assert structure(m) == shape and same_state_dict(m, before)
    if strategy == "jit":
        lora_api.fuse_lora(m, "jit")
        with pytest.raises(RuntimeError, match="already fused"):
            lora_api.fuse_lora(m, "jit")
        lora_api.unfuse_lora(m)
    else:
        with torch.no_grad():
            lf.set_query(m, torch.cat([query(seed=1), query(seed=2)]))
        with pytest.raises(ValueError, match="merges one analogy"):
            lora_api.fuse_lora(m, strategy)
    assert structure(m) == shape and same_state_dict(m, before) and merge_flags(m) == [(False, False)] * 2
    assert lora_api.fused_strategy(m) is None


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_fuse_interrupted_after_its_merge_leaves_nothing_fused(strategy, monkeypatch):
    """An error after fuse_lora's merge and before it records the fuse (out of memory copying the coefficients, or
    Ctrl-C) puts the weights back and leaves no merge behind: before, the model stayed merged with no fuse state,
    so unfuse_lora could not restore it."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    before, shape = state_dict_copy(m), structure(m)

    class Interrupted(BaseException):
        pass

    def interrupted(*args):
        raise Interrupted()

    monkeypatch.setattr(lora_api, "_FuseState", interrupted)
    kept = None
    try:
        lora_api.fuse_lora(m, strategy)
    except Interrupted as exc:
        kept = exc  # held, as a notebook or a logger holds it: its traceback keeps fuse_lora's frame alive (else
        # dropping the merge's generator would undo the merge by chance)
    assert kept is not None
    assert lora_api.fused_strategy(m) is None
    assert structure(m) == shape and same_state_dict(m, before) and merge_flags(m) == [(False, False)] * 2


@pytest.mark.parametrize("strategy", ["full", "jit"])
def test_baking_a_fuse_frees_the_original_weights_and_unfusing_frees_the_merged_ones(strategy):
    """fuse_lora + unload_lora_weights bakes the mixture: the original weight storages are freed, not kept with
    the dropped fuse state; fuse_lora + unfuse_lora ("full") frees the merged weight storages."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    originals = [weakref.ref(layer.base_layer.weight.untyped_storage()) for layer in lf.lorweb_layers(m).values()]
    layers = [weakref.ref(layer) for layer in lf.lorweb_layers(m).values()]
    lora_api.fuse_lora(m, strategy)
    lora_api.unload_lora_weights(m)
    assert lf.lorweb_layers(m) == {} and not hasattr(m, lora_api._FUSED)
    assert alive(originals) == 0 and alive(layers) == 0
    assert structure(m)["hooks"] == 0
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    lora_api.fuse_lora(m, "full")
    merged = [weakref.ref(layer.base_layer.weight.untyped_storage()) for layer in lf.lorweb_layers(m).values()]
    lora_api.unfuse_lora(m)
    assert alive(merged) == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_fused_model_that_is_dropped_is_freed(strategy):
    """A model left fused (its fuse state holds the open merged() block, which refers back to the model) is freed
    by the garbage collector once the caller drops it."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    lora_api.fuse_lora(m, strategy)
    refs = [weakref.ref(m)] + [weakref.ref(layer.lora_A) for layer in lf.lorweb_layers(m).values()]
    del m
    assert alive(refs) == 0


# ------------------------------------------------------------------------------------ module-level state, caches


def workload(tmp_path, sizes, seed) -> list:
    """The functional API, single layers and whole tiny models (set_query, forwards with and without autograd,
    every merge and fuse strategy, save / load, remove) on new shapes; returns weakrefs to the models used."""
    refs = []
    for b, s, fin, fout in sizes:
        x, w = torch.randn(b, s, fin), torch.randn(fout, fin)
        a, bb, c = torch.randn(3, fin, 2), torch.randn(3, 2, fout), torch.rand(b, 3)
        lf.lorweb_linear(x, w, None, a, bb, c, 1.0)
        lf.mixed_lora_delta(x, a, bb, c, 1.0, add_to=torch.randn(b, s, fout))
        lf.compute_coefficients(torch.randn(b, 7), torch.randn(4, 7), torch.randn(3, 4))
        layer = lf.LoRWeBLinear(nn.Linear(fin, fout), num_loras=3, rank=2, key_dim=4, query_dim=7)
        layer.set_coefficients(c)
        layer(x.requires_grad_()).sum().backward()
        refs.append(weakref.ref(layer))
    m = tiny_model(seed)
    with torch.no_grad():
        lf.set_query(m, query(seed=seed))
    for strategy in STRATEGIES:
        with lf.merged(m, strategy), torch.no_grad():
            m(torch.randn(1, 6))
        lora_api.fuse_lora(m, strategy)
        lora_api.unfuse_lora(m)
    path = tmp_path / f"w{seed}.safetensors"
    lf.save_lorweb_weights(m, path)
    fresh = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    lf.load_lorweb_weights(fresh, path)
    lf.remove_lorweb(fresh)
    refs += [weakref.ref(m), weakref.ref(fresh)]
    return refs


def test_no_module_level_state_grows_with_shapes_or_models(tmp_path):
    """After a warm-up, running everything again on new shapes and new models adds nothing to lorweb_fast's
    module-level containers and caches, and none of them keeps a layer or a model alive."""
    refs = workload(tmp_path, [(1, 3, 8, 5), (2, 4, 6, 9)], seed=0)
    before = module_level_state()
    refs += workload(tmp_path, [(3, 5, 10, 7), (1, 2, 12, 3), (4, 1, 5, 11)], seed=1)
    after = module_level_state()
    assert after == before, {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    assert alive(refs) == 0


# ------------------------------------------------------------------------------------------------- plotting
def loss_log(tmp_path):
    path = tmp_path / "loss.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) + "\n" for s in range(1, 5)))
    return path


@pytest.mark.parametrize("plot", ["coefficients", "loss"])
def test_plots_close_their_figure_when_drawing_fails(plot, tmp_path, monkeypatch):
    """A plot that fails while it lays out its figure (any error, or a KeyboardInterrupt in a notebook) leaves no
    figure open in pyplot, which keeps every open figure (its artists and canvas) for the rest of the process, and
    no plot switches the caller's matplotlib backend. Found by the lifecycle audit: the figure was closed only
    around the file write, and every plot called ``matplotlib.use("Agg")``; the plots now draw on a
    ``matplotlib.figure.Figure`` outside pyplot."""
    import matplotlib.figure
    import matplotlib.pyplot as plt

    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    draw = (lambda: lf.plot_coefficients(m, tmp_path / "c.png")) if plot == "coefficients" else \
        (lambda: training.plot_loss(loss_log(tmp_path), tmp_path / "loss.png"))
    import matplotlib

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend of the caller's that is not Agg
    try:
        draw()  # the premise: a plot that succeeds leaves no figure open
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    open_before = plt.get_fignums()

    def fails(self, *args, **kwargs):
        raise RuntimeError("layout failed")

    monkeypatch.setattr(matplotlib.figure.Figure, "tight_layout", fails)
    try:
        with pytest.raises(RuntimeError, match="layout failed"):
            draw()
        assert plt.get_fignums() == open_before, "a figure stayed open after a failed plot"
    finally:
        for num in set(plt.get_fignums()) - set(open_before):
            plt.close(num)


# ------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def lorweb_pipe(tmp_path_factory):
    """A tiny LoRWeBKontextPipeline (native resolution, 64 px grids) and its adapter saved as a folder."""
    root = tmp_path_factory.mktemp("lifecycle-pipe")
    pipe, encoder = tiny_kontext_with_encoder(root)
    lp = flux.LoRWeBKontextPipeline(pipe, encoder, resolution="native", long_edge=64)
    lp.save_lora_weights(root / "adapter")
    return SimpleNamespace(pipe=lp, adapter=root / "adapter")


def generate(lp, merge, analogy=None, **kwargs):
    a, a2, b = analogy or random_analogy(0)
    return lp(a, a2, b, "flip", num_inference_steps=1, merge=merge, progress=False, output_type="np",
              max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH, **kwargs)


def test_pipeline_calls_keep_no_graph_inputs_or_hooks(lorweb_pipe):
    """Repeated calls under every merge setting: the layers hold only their (B, N) coefficients, without autograd
    history; the input images are not kept; the structure (hooks, modules, attributes) and the weights do not
    change; a deep copy of the transformer works afterwards."""
    lp = lorweb_pipe.pipe
    transformer = lp.transformer
    generate(lp, "none")
    before, shape = state_dict_copy(transformer), structure(transformer)
    refs = []
    for merge in ("none", "auto", *STRATEGIES, "jit"):
        images = random_analogy(1)
        refs += [weakref.ref(image) for image in images]
        generate(lp, merge, images)
        del images
        assert structure(transformer) == shape and same_state_dict(transformer, before), merge
        assert lf.get_lorweb_scale(transformer) == 1.0, merge
        for layer in lf.lorweb_layers(transformer).values():
            held = held_tensors(layer)
            assert list(held) == ["_coefficients"] and held["_coefficients"].shape == (1, 3), merge
            assert held["_coefficients"].grad_fn is None and not held["_coefficients"].requires_grad, merge
    assert alive(refs) == 0
    copy.deepcopy(transformer)


@pytest.mark.parametrize("merge", ["none", *STRATEGIES])
def test_pipeline_call_that_raises_midway_leaves_the_model_as_before(lorweb_pipe, merge):
    """A call interrupted inside the denoising loop (a step callback raising) under each merge setting: weights bit
    for bit, no hook or merge flag left, the previous analogy's coefficients (the very tensors) back in place; the
    next call works."""
    lp = lorweb_pipe.pipe
    transformer = lp.transformer
    generate(lp, "none", random_analogy(2))
    coefficients = {name: layer.coefficients for name, layer in lf.lorweb_layers(transformer).items()}
    before, shape = state_dict_copy(transformer), structure(transformer)

    class Interrupted(Exception):
        pass

    def interrupt(pipe, step, timestep, callback_kwargs):
        raise Interrupted()

    with pytest.raises(Interrupted):
        generate(lp, merge, random_analogy(3), callback_on_step_end=interrupt)
    assert structure(transformer) == shape and same_state_dict(transformer, before)
    assert merge_flags(transformer) == [(False, False)] * len(coefficients)
    assert lf.get_lorweb_scale(transformer) == 1.0 and lora_api.fused_strategy(transformer) is None
    assert all(layer.coefficients is coefficients[name] for name, layer in lf.lorweb_layers(transformer).items())
    generate(lp, merge, random_analogy(3))
    assert structure(transformer) == shape and same_state_dict(transformer, before)


def test_lora_api_cycles_do_not_grow_and_free_the_unloaded_adapter(lorweb_pipe):
    """unload / load, delete_adapters / load, set_adapters / disable / enable and fuse / unfuse under every
    strategy, twice: the transformer's structure and weights come back as they were, and every unloaded LoRWeB
    layer (and its parameters) is freed."""
    lp = lorweb_pipe.pipe
    transformer = lp.transformer
    analogy = random_analogy(4)
    generate(lp, "none", analogy)
    before, shape = state_dict_copy(transformer), structure(transformer)
    refs = []
    for _ in range(2):
        refs += [weakref.ref(obj) for layer in lf.lorweb_layers(transformer).values()
                 for obj in (layer, layer.lora_A, layer.att_lora_to_q)]
        lp.unload_lora_weights()
        lp.load_lora_weights(lorweb_pipe.adapter)
        refs += [weakref.ref(layer) for layer in lf.lorweb_layers(transformer).values()]
        lp.delete_adapters("lorweb")
        lp.load_lora_weights(lorweb_pipe.adapter)
        lp.set_adapters("lorweb", 0.5)
        lp.disable_lora()
        lp.enable_lora()
        lp.set_adapters("lorweb", 1.0)
        for strategy in STRATEGIES:
            lp.set_analogy(*analogy)
            lp.fuse_lora(strategy)
            generate(lp, "auto", analogy)
            lp.unfuse_lora()
        generate(lp, "none", analogy)
        assert structure(transformer) == shape and same_state_dict(transformer, before)
    assert alive(refs) == 0


# ----------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    return tiny_training_assets(tmp_path_factory.mktemp("lifecycle-train"), 4)


def train_config(assets, out, **over):
    return tiny_train_config(assets, out, **{"steps": 2, "checkpoint_every": 2, **over})


@pytest.fixture(scope="module")
def trained(train_assets, tmp_path_factory):
    """A successful two-step run on a caller's pipeline and encoder: the pipeline, weakrefs to the optimizers the
    run made, and the transformer's instance attributes before it."""
    cfg = train_config(train_assets, tmp_path_factory.mktemp("lifecycle-run") / "run")
    pipe = flux.load_kontext_pipeline(cfg.model)
    encoder = flux.AnalogyEncoder(cfg.encoder)
    attributes = set(pipe.transformer.__dict__)
    optimizers = []
    real = training._make_optimizer

    def recording(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        optimizers.append(weakref.ref(optimizer))
        return optimizer

    patch = pytest.MonkeyPatch()
    patch.setattr(training, "_make_optimizer", recording)
    try:
        result = training.train(cfg, pipe=pipe, encoder=encoder)
    finally:
        patch.undo()
    return SimpleNamespace(pipe=pipe, encoder=encoder, result=result, optimizers=optimizers, attributes=attributes)


@pytest.fixture(scope="module")
def failed(train_assets, tmp_path_factory):
    """A run on a caller's pipeline whose LoRWeB layers the caller injected, stopped at step 1 by a non-finite
    gradient norm (FloatingPointError, raised after the backward and before the optimizer step); what it left."""
    out = tmp_path_factory.mktemp("lifecycle-failed") / "run"
    cfg = train_config(train_assets, out)
    pipe = flux.load_kontext_pipeline(cfg.model)
    encoder = flux.AnalogyEncoder(cfg.encoder)
    lf.inject_lorweb(pipe.transformer, lf.LoRWeBConfig(num_loras=cfg.num_loras, rank=cfg.rank, key_dim=cfg.key_dim,
                                                       query_dim=encoder.query_dim), dtype=torch.float32)
    real = training.flow_matching_loss
    patch = pytest.MonkeyPatch()
    patch.setattr(training, "flow_matching_loss", lambda *a, **k: NanGradient.apply(real(*a, **k)))
    try:
        with pytest.raises(FloatingPointError, match="gradient norm is nan at step 1"):
            training.train(cfg, pipe=pipe, encoder=encoder)
    finally:
        patch.undo()
    return SimpleNamespace(pipe=pipe, encoder=encoder, assets=train_assets, out=out,
                           grads=[n for n, p in pipe.transformer.named_parameters() if p.grad is not None],
                           graph=with_graph(pipe.transformer))


def test_train_hands_back_the_callers_pipeline_without_optimizer_gradients_or_hooks(trained):
    """After train() returns: no optimizer (or its state) alive, no .grad on any parameter of the transformer, the
    VAE, the text encoders or the analogy encoder, no module hook, and the transformer's instance attributes as
    before (accelerate's forward patches removed) but for the layerwise-casting skip pattern and the guards of
    ``save_pretrained`` / ``fuse_qkv_projections`` / ``dequantize`` inject_lorweb adds
    (``model.GUARDED_WHILE_INJECTED``)."""
    pipe = trained.pipe
    assert len(trained.optimizers) == 1 and alive(trained.optimizers) == 0
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, trained.encoder.model):
        assert [n for n, p in module.named_parameters() if p.grad is not None] == []
        assert structure(module)["hooks"] == 0
    assert set(pipe.transformer.__dict__) - trained.attributes <= {"_skip_layerwise_casting_patterns",
                                                                    *lf.model.GUARDED_WHILE_INJECTED}
    assert trained.attributes <= set(pipe.transformer.__dict__)
    assert len(lf.lorweb_layers(pipe.transformer)) > 0


@pytest.mark.parametrize("run", ["trained", "failed"])
def test_train_leaves_no_autograd_history_in_the_coefficients(run, request):
    """train() hands the caller's transformer back "as inject_lorweb leaves one": without the last step's
    coefficients, which set_query computed with autograd on (their graph refers to every att_lora_to_q / lora_keys;
    after a failed or NaN-skipped step it also holds saved tensors), so copy.deepcopy of the trained transformer
    works. Found by the lifecycle audit: they were kept (``training._train`` now clears them in its ``finally``)."""
    state = request.getfixturevalue(run)
    graph = state.graph if run == "failed" else with_graph(state.pipe.transformer)
    assert graph == [], f"{len(graph)} layers keep coefficients with autograd history, e.g. {graph[:2]}"
    copy.deepcopy(state.pipe.transformer)


def test_failed_train_leaves_no_gradients_on_the_callers_layers(failed):
    """A run stopped by a non-finite gradient (or any error between backward and the optimizer's zero_grad) leaves
    no .grad on the caller's LoRWeB parameters, and a retry on the same pipeline starts from no gradient. Found by
    the lifecycle audit: the gradients stayed (memory as large as the adapter) and, as train() did not zero them
    before its first backward, the failed run's NaN gradients stopped the retry at its first step."""
    assert failed.grads == [], f"{len(failed.grads)} parameters keep .grad, e.g. {failed.grads[:2]}"
    retry = train_config(failed.assets, failed.out.parent / "retry")
    result = training.train(retry, pipe=failed.pipe, encoder=failed.encoder)
    assert result["step"] == 2 and math.isfinite(result["loss"])


def test_failed_train_frees_the_layers_it_injected_and_its_data_workers(train_assets, tmp_path):
    """A run that fails (here its step callback raises) on a caller's stock pipeline, with a DataLoader worker:
    the LoRWeB layers it injected are taken out again and freed with their parameters once the error is dropped,
    no worker process stays alive, and no parameter keeps a gradient."""
    cfg = train_config(train_assets, tmp_path / "run", num_workers=1, steps=3)
    pipe = flux.load_kontext_pipeline(cfg.model)
    encoder = flux.AnalogyEncoder(cfg.encoder)
    children = set(multiprocessing.active_children())
    refs = []

    class Stop(Exception):
        pass

    workers = []

    def stop(step, loss):
        refs.extend(weakref.ref(obj) for layer in lf.lorweb_layers(pipe.transformer).values()
                    for obj in (layer, layer.lora_A, layer.lora_keys))
        workers.extend(set(multiprocessing.active_children()) - children)
        raise Stop()

    with pytest.raises(Stop):
        training.train(cfg, pipe=pipe, encoder=encoder, step_callback=stop)
    assert workers, "the premise: a DataLoader worker was running when the run failed"
    assert len(refs) > 0 and alive(refs) == 0
    assert lf.lorweb_layers(pipe.transformer) == {}
    assert [n for n, p in pipe.transformer.named_parameters() if p.grad is not None] == []
    assert set(multiprocessing.active_children()) <= children


def test_train_without_a_pipeline_frees_the_one_it_loaded(train_assets, tmp_path, monkeypatch):
    """train(cfg) loads its own pipeline and returns only the transformer: the VAE and the text encoders it loaded
    are freed once it returns (nothing global keeps the pipeline)."""
    cfg = train_config(train_assets, tmp_path / "run")
    loaded = []
    real = training.load_training_pipeline

    def recording(*args, **kwargs):
        pipe = real(*args, **kwargs)
        loaded.extend(weakref.ref(m) for m in (pipe, pipe.vae, pipe.text_encoder, pipe.text_encoder_2))
        return pipe

    monkeypatch.setattr(training, "load_training_pipeline", recording)
    result = training.train(cfg)
    assert len(loaded) == 4 and alive(loaded) == 0
    assert len(lf.lorweb_layers(result["transformer"])) > 0
