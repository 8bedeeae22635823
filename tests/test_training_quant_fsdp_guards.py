"""Fast CPU guards for the quantization and FSDP2 helpers of ``lorweb_fast.training``: the optimizer state by name
(sharded and not), ``quantization_config``, ``_import_quanto``, ``quantize_qfloat8`` and its ``_ModuleTreeSnapshot``,
``quantization_kind``, ``load_training_pipeline``'s branches, ``_check_given_quantization``, ``_check_fsdp``,
``_reduce_gradients_in_fp32``, ``_warn_if_layers_unwrapped``, ``_reshard_without_backward`` and
``cast_block_inputs_in_recompute``. FSDP2 runs in this process on a one-rank gloo group (``fully_shard`` on CPU)."""

import io
import sys
import types
import warnings

import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import demo, flux, training
from lorweb_fast.testing import module_from_package, one_process_gloo_group, small_train_config

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qpipe")
    demo.build_tiny_kontext_pipeline(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def gloo():
    """A one-process gloo group (FSDP2's ``fully_shard`` then runs on CPU), torn down after the module."""
    with one_process_gloo_group() as dist:
        yield dist


def _sharded(seed: int, *, root_linear: bool = False, **shard_kwargs) -> nn.Module:
    """Two blocks sharded as FSDP2 units, the root too (owning a last linear when ``root_linear``)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    layers = [nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4))]
    model = nn.Sequential(*layers, *([nn.Linear(4, 2)] if root_linear else []))
    for block in layers:
        fully_shard(block, **shard_kwargs)
    fully_shard(model, **shard_kwargs)
    return model


def _stepped(model, steps: int = 2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(torch.randn(3, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return opt


# ------------------------------------------------------------------------------------------------ optimizer state
def test_optimizer_mismatch_names_at_most_three_per_side():
    """The mismatch error lists at most three missing and three unexpected names, each cut with '...'."""
    params = [nn.Parameter(torch.zeros(1)) for _ in range(5)]
    opt = torch.optim.SGD(params, lr=0.1)
    state = training.optimizer_state_dict(None, opt, [f"old{i}" for i in range(5)], sharded=False)
    with pytest.raises(ValueError) as info:
        training.load_optimizer_state_dict(None, opt, state, [f"new{i}" for i in range(5)], sharded=False)
    assert str(info.value).endswith("missing ['new0', 'new1', 'new2']..., unexpected ['old0', 'old1', 'old2']...")


def test_sharded_optimizer_state_is_full_by_name_and_loads_back_sharded(gloo):
    """FSDP2 (``sharded=True``): the saved state holds full plain tensors keyed by parameter name, and loading it
    into a fresh sharded optimizer gives DTensor state equal to the original; the next step then matches."""
    from torch.distributed.tensor import DTensor

    model = _sharded(0)
    opt = _stepped(model)
    names = [n for n, _ in model.named_parameters()]
    state = training.optimizer_state_dict(model, opt, names, sharded=True)
    saved = io.BytesIO()
    torch.save(state, saved)  # as the checkpoint does (the state shares the live step tensors)
    assert sorted(state["state"]) == sorted(names)
    assert sorted(n for g in state["param_groups"] for n in g["params"]) == sorted(names)
    for name, s in state["state"].items():
        assert type(s["exp_avg"]) is torch.Tensor and type(s["exp_avg_sq"]) is torch.Tensor, name

    fresh_model = _sharded(0)
    with torch.no_grad():
        for p, q in zip(fresh_model.parameters(), model.parameters()):
            p.copy_(q)
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2)
    saved.seek(0)
    training.load_optimizer_state_dict(fresh_model, fresh, torch.load(saved), names, sharded=True)
    for p, q in zip(fresh_model.parameters(), model.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert isinstance(fresh.state[p][key], DTensor), key
            assert torch.equal(fresh.state[p][key].full_tensor(), opt.state[q][key].full_tensor()), key
    x = torch.randn(3, 4)
    for m, o in ((model, opt), (fresh_model, fresh)):
        m(x).square().sum().backward()
        o.step()
    for p, q in zip(fresh_model.parameters(), model.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor())


# ------------------------------------------------------------------------------------------------ quantization
def test_nf4_config_computes_in_the_given_dtype_and_defaults_to_bf16():
    """``quantization_config("nf4", dtype)`` computes in ``dtype`` (the training dtype); the default is bf16."""
    assert training.quantization_config("nf4", torch.float16).bnb_4bit_compute_dtype == torch.float16
    assert training.quantization_config("nf4").bnb_4bit_compute_dtype == torch.bfloat16


def test_broken_optimum_quanto_install_is_named(monkeypatch):
    """An optimum.quanto that is present but cannot be imported (a plain ImportError, not only a missing module)
    gives the ImportError naming optimum-quanto and how to install it."""
    monkeypatch.setitem(sys.modules, "optimum.quanto", types.ModuleType("optimum.quanto"))  # no freeze/quantize
    with pytest.raises(ImportError, match="needs optimum-quanto"):
        training._import_quanto()


def test_quanto_model_flagged_is_quantized_is_quanto():
    """A diffusers model loaded with a QuantoConfig has quanto layers and ``is_quantized``: it is "quanto", not
    bitsandbytes (quanto layers are looked for first)."""
    assert training.quantization_kind(module_from_package("optimum.quanto.nn.qlinear", is_quantized=True)) == "quanto"


def test_given_quantization_nf4_wants_bitsandbytes():
    """quantize_base "nf4", like "int8", needs a bitsandbytes transformer; a quanto one is refused by name."""
    bnb = types.SimpleNamespace(transformer=module_from_package("bitsandbytes.nn.modules"))
    training._check_given_quantization(bnb, "nf4")
    quanto = types.SimpleNamespace(transformer=module_from_package("optimum.quanto.nn.qlinear"))
    with pytest.raises(ValueError, match="quantize_base='nf4' but the given pipeline's transformer is quantized by "
                                         "quanto: load it with a diffusers BitsAndBytesConfig"):
        training._check_given_quantization(quanto, "nf4")


def test_given_qfloat8_pipeline_with_some_qint8_weights_is_refused(pipe_dir):
    """A transformer with qfloat8 weights and some qint8 ones is not "qfloat8 only": refused, naming both types."""
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import freeze, qfloat8, qint8, quantize

    pipe = flux.load_kontext_pipeline(pipe_dir, torch.float32)
    quantize(pipe.transformer, weights=qint8, include="x_embedder")
    quantize(pipe.transformer, weights=qfloat8, exclude="x_embedder")
    quantize(pipe.text_encoder_2, weights=qfloat8)
    for name in training.QFLOAT8_COMPONENTS:
        freeze(getattr(pipe, name))
    assert training._quanto_weight_types(pipe.transformer) == {"qint8", "qfloat8_e4m3fn"}
    with pytest.raises(ValueError, match=r"transformer has optimum-quanto \['qfloat8_e4m3fn', 'qint8'\] weights"):
        training._check_given_quantization(pipe, "qfloat8")


def test_quantize_qfloat8_refuses_a_pipeline_without_a_t5_before_changing_anything():
    """A pipeline whose text_encoder_2 is not a module is refused by name; its transformer stays unquantized."""
    pytest.importorskip("optimum.quanto")
    pipe = types.SimpleNamespace(transformer=nn.Sequential(nn.Linear(4, 4)), text_encoder_2=None)
    with pytest.raises(ValueError, match="needs a FluxKontextPipeline with a text_encoder_2, got SimpleNamespace "
                                         "whose text_encoder_2 is NoneType"):
        training.quantize_qfloat8(pipe)
    assert type(pipe.transformer[0]) is nn.Linear


def test_quantize_qfloat8_checks_every_model_before_quantizing_any(pipe_dir):
    """T5 quantized already: refused before the transformer (checked first) is quantized."""
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import freeze, qfloat8, quantize

    pipe = flux.load_kontext_pipeline(pipe_dir, torch.float32)
    quantize(pipe.text_encoder_2, weights=qfloat8)
    freeze(pipe.text_encoder_2)
    with pytest.raises(ValueError, match="text_encoder_2 is quantized already"):
        training.quantize_qfloat8(pipe)
    assert training.quantization_kind(pipe.transformer) is None


def test_quantize_qfloat8_quantizes_on_the_given_device(pipe_dir):
    """``device`` is where the models are quantized: on "meta" every weight ends there."""
    pytest.importorskip("optimum.quanto")
    pipe = flux.load_kontext_pipeline(pipe_dir, torch.float32)
    training.quantize_qfloat8(pipe, device=torch.device("meta"))
    for name in training.QFLOAT8_COMPONENTS:
        assert {p.device.type for p in getattr(pipe, name).parameters()} == {"meta"}, name


def test_quantize_qfloat8_frees_moved_copies_of_replaced_weights_only(pipe_dir, monkeypatch):
    """With a move that swaps the parameters' data (as a move to a GPU does): a weight that freeze replaces by its
    fp8 tensor gets its original data back at once (the moved copy is freed), while a parameter the quantized module
    keeps (the bias) keeps the moved data."""
    pytest.importorskip("optimum.quanto")
    pipe = flux.load_kontext_pipeline(pipe_dir, torch.float32)
    weight, bias = pipe.transformer.x_embedder.weight, pipe.transformer.x_embedder.bias
    original = {"weight": weight.data_ptr(), "bias": bias.data_ptr()}
    moved = {}

    def data_swapping_to(self, *args, **kw):
        for p in self.parameters():
            p.data = p.data.clone()
        moved.update(weight=weight.data_ptr(), bias=bias.data_ptr())
        return self

    monkeypatch.setattr(type(pipe.transformer), "to", data_swapping_to)
    training.quantize_qfloat8(pipe, device=torch.device("cpu"))
    assert type(pipe.transformer.x_embedder).__name__ == "QLinear"
    assert pipe.transformer.x_embedder.bias is bias
    assert weight.data_ptr() == original["weight"] != moved["weight"]
    assert bias.data_ptr() == moved["bias"] != original["bias"]


def test_module_tree_snapshot_restores_children_parameters_and_buffers():
    """``restore`` puts back each module's own children, parameters and buffers (the objects, nothing added kept)
    and each parameter's data; ``release`` gives a parameter its original data back and ignores unknown ones."""
    root = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3))
    bn, lin = root[0], root[1]
    mean, weight, weight_data = bn.running_mean, lin.weight, lin.weight.data
    snap = training._ModuleTreeSnapshot([root])
    bn.running_mean = torch.ones(3)  # a buffer replaced
    bn.register_buffer("extra", torch.zeros(1))  # a buffer added
    root.register_parameter("added", nn.Parameter(torch.zeros(1)))
    root.add_module("new", nn.Linear(1, 1))
    root[1] = nn.Linear(3, 3)  # a child replaced
    lin.weight.data = torch.zeros(3, 3)  # data swapped in place
    snap.release([lin.weight, nn.Parameter(torch.zeros(1))])
    assert lin.weight.data_ptr() == weight_data.data_ptr()
    lin.weight.data = torch.zeros(3, 3)
    snap.restore()
    assert list(root._modules) == ["0", "1"] and root[1] is lin and root[0] is bn
    assert "added" not in root._parameters and "extra" not in bn._buffers
    assert bn.running_mean is mean and set(bn._buffers) == {"running_mean", "running_var", "num_batches_tracked"}
    assert lin.weight is weight and lin.weight.data_ptr() == weight_data.data_ptr()


# ------------------------------------------------------------------------------------------ load_training_pipeline
def test_load_training_pipeline_none_loads_in_the_given_dtype(pipe_dir):
    """quantize_base "none": the plain pipeline, in the asked dtype."""
    pipe = training.load_training_pipeline(pipe_dir, torch.bfloat16, "none")
    assert pipe.transformer.dtype == torch.bfloat16 and training.quantization_kind(pipe.transformer) is None


def test_load_training_pipeline_qfloat8_plumbing(monkeypatch):
    """qfloat8: optimum-quanto is checked before any model loads; the pipeline is loaded in ``dtype`` and quantized
    on ``device``."""
    calls = []

    def fake_load(model, dtype=None):
        calls.append(("load", model, dtype))
        return "pipe"

    monkeypatch.setattr(flux, "load_kontext_pipeline", fake_load)
    monkeypatch.setattr(training, "quantize_qfloat8",
                        lambda pipe, device=None: calls.append(("quantize", pipe, device)))
    monkeypatch.setattr(training, "_import_quanto", lambda: calls.append(("import",)))
    device = torch.device("meta")
    assert training.load_training_pipeline("m", torch.float16, "qfloat8", device) == "pipe"
    assert calls == [("import",), ("load", "m", torch.float16), ("quantize", "pipe", device)]

    monkeypatch.undo()
    monkeypatch.setattr(flux, "load_kontext_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    with pytest.raises(ImportError, match="optimum-quanto"):
        training.load_training_pipeline("m", torch.float16, "qfloat8")


def test_load_training_pipeline_bitsandbytes_plumbing(monkeypatch):
    """int8 / nf4 with a GPU (stubbed): the transformer is loaded with the quantization config computing in
    ``dtype`` passed as ``dtype=`` (not the deprecated ``torch_dtype=``), and the pipeline around that transformer."""
    import diffusers

    calls = {}

    def transformer_from_pretrained(model, **kw):
        calls["transformer"] = (model, kw)
        return "transformer"

    def pipeline_from_pretrained(model, **kw):
        calls["pipeline"] = (model, kw)
        return "pipeline"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "from_pretrained", transformer_from_pretrained)
    monkeypatch.setattr(diffusers.FluxKontextPipeline, "from_pretrained", pipeline_from_pretrained)
    assert training.load_training_pipeline("m", torch.float16, "nf4") == "pipeline"
    model, kw = calls["transformer"]
    assert model == "m" and kw["subfolder"] == "transformer" and kw["dtype"] == torch.float16
    assert kw["quantization_config"].load_in_4bit and kw["quantization_config"].bnb_4bit_compute_dtype == torch.float16
    assert calls["pipeline"] == ("m", {"transformer": "transformer", "dtype": torch.float16})


# ------------------------------------------------------------------------------------------------------ FSDP checks
def _accelerator(**plugin):
    return types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace(**plugin)))


def test_fsdp_setup_refusals_beyond_the_basic_ones():
    """A plugin without ``fsdp_version`` is FSDP1 (refused); a quantized base cannot be sharded; fp32 adapters are
    refused under fp16 mixed precision too; bf16 adapters with bf16 mixed precision pass."""
    cfg = small_train_config("o", optimizer="adamw")
    with pytest.raises(ValueError, match="got fsdp_version=1"):
        training._check_fsdp(_accelerator(), cfg)
    fsdp2 = _accelerator(fsdp_version=2)
    training._check_fsdp(fsdp2, training.TrainConfig(data="d", out="o", optimizer="adamw", adapter_precision="bf16",
                                                     mixed_precision="bf16"))
    with pytest.raises(ValueError, match="--quantize-base qfloat8 cannot be sharded by FSDP2"):
        training._check_fsdp(fsdp2, training.TrainConfig(data="d", out="o", optimizer="adamw", quantize_base="qfloat8"))
    with pytest.raises(ValueError,
                       match="--adapter-precision fp32 cannot hold under FSDP2 with --mixed-precision fp16"):
        training._check_fsdp(fsdp2, training.TrainConfig(data="d", out="o", optimizer="adamw", adapter_precision="fp32",
                                                         mixed_precision="fp16"))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_gradients_reduce_in_fp32_keeping_the_rest_of_the_policy(low):
    """A low-precision reduce dtype becomes fp32; param/output dtypes and input casting stay as they were."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=low, output_dtype=low, cast_forward_inputs=False)
    plugin = types.SimpleNamespace(mixed_precision_policy=policy)
    training._reduce_gradients_in_fp32(plugin)
    assert plugin.mixed_precision_policy == MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32,
                                                                 output_dtype=low, cast_forward_inputs=False)


def test_gradient_reduction_policy_left_alone_when_not_fsdp2_or_already_fp32():
    """No policy, an FSDP1 ``MixedPrecision`` or an fp32 reduce dtype: the plugin is not touched."""
    from torch.distributed.fsdp import MixedPrecision, MixedPrecisionPolicy

    plugin = types.SimpleNamespace()
    training._reduce_gradients_in_fp32(plugin)
    assert not vars(plugin)
    for policy in (MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16),
                   MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)):
        plugin = types.SimpleNamespace(mixed_precision_policy=policy)
        training._reduce_gradients_in_fp32(plugin)
        assert plugin.mixed_precision_policy is policy


def _lorweb_blocks(n: int) -> nn.Module:
    """``n`` blocks ``Sequential(Linear)``, each linear wrapped by LoRWeB (names "<i>.0")."""
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 3)) for _ in range(n)])
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=2, query_dim=3, target_modules=r"\d+\.0"))
    return model


def test_unwrapped_lorweb_layers_warning_counts_by_unit_path(gloo):
    """Only layers inside a sharded sub-module count as wrapped (by path component: unit "1" does not cover
    "10.0"); every block sharded: no warning."""
    from torch.distributed.fsdp import fully_shard

    model = _lorweb_blocks(11)
    fully_shard(model[1])
    fully_shard(model)
    with pytest.warns(UserWarning, match=r"FSDP: 10 LoRWeB layers \(e.g. 0.0\) are not inside a wrapped"):
        training._warn_if_layers_unwrapped(model)
    model = _lorweb_blocks(2)
    for block in model:
        fully_shard(block)
    fully_shard(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training._warn_if_layers_unwrapped(model)


def test_reshard_without_backward_reshards_every_unit(gloo):
    """After a forward without backward, every FSDP2 unit -- the root (owning a linear of its own) and blocks that
    keep their parameters gathered after forward -- is resharded: every parameter is a DTensor again."""
    from torch.distributed.tensor import DTensor

    model = _sharded(0, root_linear=True, reshard_after_forward=False)
    model(torch.randn(3, 4))
    assert not any(isinstance(p, DTensor) for p in model.parameters())  # the situation the helper is for
    training._reshard_without_backward(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())


def test_recompute_cast_hooks_follow_each_units_policy(gloo):
    """One hook per unit whose policy casts forward inputs to a param dtype, each with its own unit's dtype
    (block bf16, root fp16); floating positional, nested and keyword inputs are cast, integers not; a second call
    adds none; units without a param dtype or with ``cast_forward_inputs=False`` get none."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 4))
    fully_shard(model[0], mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float16))
    assert training.cast_block_inputs_in_recompute(model) == 2
    assert training.cast_block_inputs_in_recompute(model) == 0
    for unit, dtype in ((model, torch.float16), (model[0], torch.bfloat16)):
        hook = unit._forward_pre_hooks[unit._lorweb_recompute_cast.id]
        args, kwargs = hook(unit, (torch.ones(2), (torch.ones(2), 3)), {"x": torch.ones(2), "n": torch.arange(2)})
        assert [args[0].dtype, args[1][0].dtype, args[1][1], kwargs["x"].dtype, kwargs["n"].dtype] == \
            [dtype, dtype, 3, dtype, torch.int64]

    plain = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 4))
    fully_shard(plain[0])  # no mixed precision: param_dtype None
    fully_shard(plain, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, cast_forward_inputs=False))
    assert training.cast_block_inputs_in_recompute(plain) == 0
    assert not any(hasattr(m, "_lorweb_recompute_cast") for m in plain.modules())


def test_gradients_reduce_in_fp32_when_the_policy_leaves_reduce_dtype_unset():
    """torch's ``MixedPrecisionPolicy(param_dtype=bf16)`` (reduce_dtype None) reduces gradients in the param dtype,
    bf16: that policy, too, gets reduce_dtype fp32; with no param dtype either nothing is cast and it is left alone."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = types.SimpleNamespace(mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    training._reduce_gradients_in_fp32(plugin)
    assert plugin.mixed_precision_policy == MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                 reduce_dtype=torch.float32)
    unset = MixedPrecisionPolicy()
    plugin = types.SimpleNamespace(mixed_precision_policy=unset)
    training._reduce_gradients_in_fp32(plugin)
    assert plugin.mixed_precision_policy is unset
