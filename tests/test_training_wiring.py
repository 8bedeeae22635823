"""How train() wires its configuration into the run (from a mutation audit of lorweb_fast/training.py: each test
failed a hand-made change that the rest of the suite let pass): the constant learning rate, guidance, gradient
checkpointing, the query settings in the metadata, the seeds of the basis, of every step, rank, epoch and bucket
shuffle, the training dtype of the pipeline and the encoder, adapter precision, train mode, and the checkpoints and
output files it recognises. The comment above each test names the mutant it kills.
"""

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lorweb_fast as lf
from lorweb_fast import demo, flux, training
from lorweb_fast.testing import tiny_train_config, tiny_training_assets
from lorweb_fast.training import TrainConfig

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_training_assets(tmp_path_factory.mktemp("train"), 12)


def _cfg(assets, out, **over):
    return tiny_train_config(assets, out, **{**dict(steps=4, num_loras=2, key_dim=4, checkpoint_every=100,
                                                    optimizer="adamw"), **over})


# ---------------------------------------------------------------- constant learning rate (warmup_lr, cosine_lr)
def test_the_learning_rate_is_constant_at_every_optimizer_step(assets, tmp_path, monkeypatch):
    """Official ``lr_scheduler: constant`` (toolkit/config_modules.py): every optimizer step uses exactly
    cfg.learning_rate, and the lr the log reports is the one the optimizer used (today the log writes
    cfg.learning_rate whatever the optimizer holds, so only a spy on the step can see a schedule)."""
    seen = []
    real_make = training._make_optimizer

    def make(params, cfg):
        opt = real_make(params, cfg)
        real_step = opt.step

        def step(*args, **kwargs):
            seen.append([g["lr"] for g in opt.param_groups])
            return real_step(*args, **kwargs)

        opt.step = step
        return opt

    monkeypatch.setattr(training, "_make_optimizer", make)
    cfg = _cfg(assets, tmp_path / "run", steps=4)
    training.train(cfg)
    assert seen == [[cfg.learning_rate]] * 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [lrs[0] for lrs in seen]


# ------------------------------------------------------------------------ guidance forwarded (guidance_const)
class _Spy:
    def __init__(self):
        self.inputs = None

    def __call__(self, **inputs):
        self.inputs = inputs
        return (torch.zeros_like(inputs["hidden_states"]),)


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_flow_matching_loss_passes_the_configured_guidance(guidance):
    """``--guidance-scale`` (official ``cfg_scale``, 1 by default) reaches the transformer as its guidance input."""
    pipe = demo.build_tiny_kontext_pipeline(seed=0)
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        getattr(pipe, name).eval().requires_grad_(False)
    lf.inject_lorweb(pipe.transformer, lf.LoRWeBConfig(num_loras=2, rank=2, key_dim=4, query_dim=6))
    rng = random.Random(5)
    batch = {"target": [demo._random_picture(rng, 32) for _ in range(2)],
             "control": [demo._random_picture(rng, 32) for _ in range(2)], "caption": ["a", "b"]}
    cfg = TrainConfig(data="d", out="o", guidance_scale=guidance, max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH)
    spy = _Spy()
    with torch.no_grad():
        training.flow_matching_loss(spy, pipe, batch, torch.randn(2, 6), cfg, torch.Generator().manual_seed(0))
    assert torch.equal(spy.inputs["guidance"], torch.full((2,), guidance))


# ------------------------------------------------------------------------------ gradient checkpointing (no_gc)
@pytest.mark.parametrize("on", [True, False])
def test_gradient_checkpointing_is_on_while_training_as_configured(assets, tmp_path, on):
    """Official ``gradient_checkpointing: true``: the transformer checkpoints its blocks during the steps (and the
    caller's setting is put back afterwards)."""
    pipe = flux.load_kontext_pipeline(str(assets / "pipe"))
    during = []
    training.train(_cfg(assets, tmp_path / "run", steps=1, gradient_checkpointing=on), pipe=pipe,
                   step_callback=lambda step, loss: during.append(pipe.transformer.is_gradient_checkpointing))
    assert during == [on]
    assert not pipe.transformer.is_gradient_checkpointing


# -------------------------------------------------------------- query metadata (meta_qmode_key, meta_no_qsource)
@pytest.mark.parametrize("query_source", ["grid", "images"])
def test_trained_weights_record_the_query_settings_in_their_metadata(assets, tmp_path, query_source):
    """The query settings config.yaml cannot hold (query_source) are read back from the metadata
    (flux.py / lora_api.py read ``lorweb.query_source``): every file the trainer writes records them."""
    cfg = _cfg(assets, tmp_path / "run", steps=2, checkpoint_every=2, query_source=query_source)
    training.train(cfg)
    for path in (Path(cfg.out) / "lorweb.safetensors",
                 Path(cfg.out) / "checkpoints" / "step-00000002" / "lorweb.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        assert (meta["lorweb.query_mode"], meta["lorweb.pooling_type"], meta["lorweb.query_source"]) == \
            (cfg.query_mode, cfg.pooling_type, query_source), path


# ------------------------------------------------------------------- foreign loss.png is refused (foreign_no_png)
def test_an_out_holding_only_a_loss_png_is_refused_without_overwrite(tmp_path):
    """training writes loss.png: one of the user's own in an --out without a run is not overwritten silently."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "loss.png").write_bytes(b"mine")
    cfg = TrainConfig(data="d", out=str(out))
    with pytest.raises(ValueError, match="loss.png"):
        training.prepare_output(cfg)
    assert (out / "loss.png").read_bytes() == b"mine"


# ------------------------------------------------------------ initial basis from --seed only (no_manual_seed)
def test_the_initial_basis_depends_on_the_seed_not_on_the_global_generator(assets, tmp_path):
    """``train`` seeds the LoRWeB initialisation with cfg.seed: two runs of the same config give bit-identical
    weights whatever the global torch generator held before."""
    got = []
    for i, global_seed in enumerate((123, 456)):
        torch.manual_seed(global_seed)
        result = training.train(_cfg(assets, tmp_path / f"run{i}", steps=1))
        got.append({k: v.clone() for k, v in lf.lorweb_state_dict(result["transformer"]).items()})
    assert got[0].keys() == got[1].keys()
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0])


# ---------------------------------------------- frozen identity projection in fp32 (toq_nofloat)
def test_a_caller_injected_bf16_identity_projection_is_made_fp32(assets, tmp_path):
    """query_projection_type "none" in layers a caller injected in bf16: the frozen identity projection is cast to
    fp32 as the trained tensors, so the query is not rounded to bf16 before the keys."""
    encoder = flux.AnalogyEncoder(str(assets / "clip"))
    pipe = flux.load_kontext_pipeline(str(assets / "pipe"))
    qd = encoder.query_dim
    lf.inject_lorweb(pipe.transformer, lf.LoRWeBConfig(num_loras=2, rank=2, key_dim=qd, query_dim=qd,
                                                       query_projection_type="none"), dtype=torch.bfloat16)
    cfg = _cfg(assets, tmp_path / "run", steps=1, key_dim=qd, query_projection_type="none")
    training.train(cfg, pipe=pipe, encoder=encoder)
    layers = lf.lorweb_layers(pipe.transformer)
    assert layers and all(layer.att_lora_to_q.weight.dtype == torch.float32 for layer in layers.values())


# --------------------------------------------------- the transformer trains in train mode (no_train_mode)
def test_training_puts_the_transformer_in_train_mode_without_eval_mode_warnings(assets, tmp_path):
    """The transformer trains in train mode (set_query in eval mode with autograd warns at every step) and is given
    back in the caller's mode."""
    pipe = flux.load_kontext_pipeline(str(assets / "pipe"))
    pipe.transformer.eval()
    modes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        training.train(_cfg(assets, tmp_path / "run", steps=1), pipe=pipe,
                       step_callback=lambda step, loss: modes.append(pipe.transformer.training))
    assert modes == [True]
    assert not [w for w in caught if "eval mode" in str(w.message)]
    assert not pipe.transformer.training  # the caller's mode back


# ---------------------------------------------------------- adapter_precision reaches the layers (adapter_prec_auto)
@pytest.mark.parametrize("precision, want", [("fp32", "fp32"), ("bf16", "auto")])
def test_adapter_precision_is_set_on_every_layer_while_training(assets, tmp_path, precision, want):
    """--adapter-precision fp32 (the official fp32 arithmetic) must reach the LoRWeB layers train() runs."""
    pipe = flux.load_kontext_pipeline(str(assets / "pipe"))
    during = []
    training.train(_cfg(assets, tmp_path / "run", steps=1, adapter_precision=precision), pipe=pipe,
                   step_callback=lambda step, loss: during.append(
                       {layer.adapter_precision for layer in lf.lorweb_layers(pipe.transformer).values()}))
    assert during == [{want}]


# --------------------------------------------------------- fresh random draws every step (gen_no_step)
def test_every_step_draws_its_own_timesteps_noise_and_dropout(assets, tmp_path, monkeypatch):
    """Each step's generator is a function of (seed, step): the timestep draws of consecutive steps differ
    (a generator seeded without the step would repeat the same timesteps, noise and dropout every step)."""
    drawn = []
    real = training.sample_timesteps

    def spy(cfg, batch_size, generator):
        t, w = real(cfg, batch_size, generator)
        drawn.append(t.clone())
        return t, w

    monkeypatch.setattr(training, "sample_timesteps", spy)
    training.train(_cfg(assets, tmp_path / "run", steps=4))
    assert len(drawn) == 4
    assert len({tuple(t.tolist()) for t in drawn}) == 4


# ------------------------------------------------------- a fresh batch order every epoch (perm_same_epoch)
@pytest.mark.parametrize("groups", [None, [(32, 32)] * 12])
def test_each_epoch_visits_the_batches_in_a_new_order(groups):
    """Official: the batch order is shuffled every epoch (and every epoch still covers every sample once)."""
    per_epoch = 6  # 12 samples / batch 2 (one bucket)
    sampler = training.StepBatchSampler(12, 2, seed=0, start_step=0, total_steps=3 * per_epoch, groups=groups)
    batches = list(sampler)
    epochs = [batches[i * per_epoch:(i + 1) * per_epoch] for i in range(3)]
    for e in epochs:
        assert sorted(i for b in e for i in b) == list(range(12))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


# ------------------------------------------------------ encoder dtype follows the training dtype (enc_dtype_fp32)
@pytest.mark.parametrize("encoder_dtype, weight_dtype, want", [("auto", torch.bfloat16, torch.bfloat16),
                                                               ("auto", torch.float32, torch.float32),
                                                               ("fp32", torch.bfloat16, torch.float32)])
def test_the_analogy_encoder_is_built_in_the_training_dtype(assets, encoder_dtype, weight_dtype, want):
    """Official FluxKontextModel.load_model: the CLIP encoder in the training dtype ("auto")."""
    cfg = TrainConfig(data="d", out="o", encoder=str(assets / "clip"), encoder_dtype=encoder_dtype)
    encoder = training._build_encoder(cfg, weight_dtype)
    assert {p.dtype for p in encoder.model.parameters()} == {want}


# ------------------------------------------------- each rank draws its own noise and timesteps (gen_no_rank)
def test_each_rank_draws_its_own_timesteps(assets, tmp_path, monkeypatch):
    """The step generator is seeded with (seed, step, rank): two DDP ranks must not draw the same timesteps, noise
    and caption dropout (emulated in one process by giving the accelerator process index 1)."""
    import accelerate

    drawn = {}
    real = training.sample_timesteps
    for rank in (0, 1):
        monkeypatch.setattr(accelerate.Accelerator, "process_index", property(lambda self, r=rank: r))
        monkeypatch.setattr(training, "sample_timesteps",
                            lambda cfg, n, g, r=rank: drawn.setdefault(r, real(cfg, n, g)))
        training.train(_cfg(assets, tmp_path / f"rank{rank}", steps=1))
    assert not torch.equal(drawn[0][0], drawn[1][0])


# ------------------------------------------------------ the bucket shuffle depends on --seed (bucket_seed_ignored)
def test_the_bucket_shuffle_follows_the_seed():
    groups = [(32, 32)] * 12
    a = training.StepBatchSampler(12, 2, seed=0, start_step=0, total_steps=1, groups=groups).bucket_batches
    b = training.StepBatchSampler(12, 2, seed=1, start_step=0, total_steps=1, groups=groups).bucket_batches
    assert sorted(map(sorted, a)) != sorted(map(sorted, b))  # other batch compositions, not only another order


# ------------------------------------------------- the pipeline is loaded in the training dtype (weight_dtype_fp32)
class _Stop(Exception):
    pass


@pytest.mark.parametrize("mixed_precision, want", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                                   ("no", torch.float32)])
def test_the_pipeline_loads_in_the_training_dtype(assets, tmp_path, monkeypatch, mixed_precision, want):
    """Official: the model in ``train.dtype`` (bf16); ``mixed_precision`` selects it (no: fp32)."""
    seen = {}

    def load(model, dtype, quantize_base="none", device=None):
        seen["pipe"] = dtype
        raise _Stop

    import accelerate

    real_accelerator = accelerate.Accelerator  # one AcceleratorState per process: keep its precision "no"
    monkeypatch.setattr(accelerate, "Accelerator",
                        lambda *a, mixed_precision=None, **kw: real_accelerator(*a, mixed_precision="no", **kw))
    monkeypatch.setattr(training, "load_training_pipeline", load)
    with pytest.raises(_Stop):
        training.train(_cfg(assets, tmp_path / "run", mixed_precision=mixed_precision))
    assert seen["pipe"] == want


# ---------------------------------------------- latest_checkpoint needs both files (latest_only_state)
def test_latest_checkpoint_skips_a_folder_without_weights(tmp_path):
    for step, files in ((2, ("trainer_state.pt", "lorweb.safetensors")), (4, ("trainer_state.pt",))):
        d = tmp_path / "checkpoints" / f"step-{step:08d}"
        d.mkdir(parents=True)
        for name in files:
            (d / name).write_bytes(b"x")
    assert training.latest_checkpoint(tmp_path).name == "step-00000002"
