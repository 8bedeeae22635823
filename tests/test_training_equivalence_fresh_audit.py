"""Fresh audit of training-loop equivalences (lorweb_fast/training.py ``train`` / ``StepBatchSampler``, the
``lorweb-fast train`` loop): resume = uninterrupted run, logged loss = optimized loss, options that may change on
resume change no computed value, seeds, progress-bar counts.

No defect was found in this area. Every test here is a PIN that passes
now, kept because it holds an equivalence no other test holds:

- the resume tests elsewhere use one bucket (``--resize long-edge``), fp32 arithmetic and LoRWeB tensors below
  bitsandbytes' ``min_8bit_size`` (4096 entries), so the AdamW8bit state they round-trip is 32-bit only. Here: the
  official multi-bucket batching with short bucket batches, official bidirectional draws, heavy caption dropout, bf16
  autocast, fp16 weight files (fp32 masters) and tensors big enough for uint8 blockwise optimizer state (bitsandbytes
  0.50 wraps it in ``__bnb_optimizer_quant_state__``), stopped by a step budget (``--steps k`` then ``--resume
  --steps S``) mid-epoch, at an epoch boundary and one step before the end, and by an exception between checkpoints;
- the loss logged in loss.jsonl is replayed from the checkpoint before the step (same batch, generator, weights);
- ``num_workers`` (in ``RESUME_MAY_DIFFER``: "changes no computed value") changed half-way;
- the progress bar of a resumed run starts at the checkpoint's step and ends at ``--steps``.
"""

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lorweb_fast as lf
from lorweb_fast import flux, training
from lorweb_fast.data import AnalogyFolder
from lorweb_fast.testing import analogy_sample, tiny_train_config

pytest.importorskip("diffusers")
pytest.importorskip("bitsandbytes")

S = 6  # steps of the uninterrupted runs


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny pipeline and CLIP, and 7 official strip samples in two buckets (4 square b', 3 of 48x32): with batch 2
    the bucket batches are [2, 2] + [2, 1], four a pass, so step 4 ends an epoch and one batch is short."""
    from lorweb_fast import demo

    root = tmp_path_factory.mktemp("equiv")
    demo.build_tiny_kontext_pipeline(root / "pipe")
    demo.build_tiny_clip(root / "clip")
    for i, (w, h) in enumerate([(32, 32)] * 4 + [(48, 32)] * 3):
        analogy_sample(root / "data", f"s{i}", (3 * w, h), (w, h), seed=i, caption=f"edit number {i}, more words")
    return root


#: the official code paths, with what the other resume tests leave out
OFFICIAL_LIKE = dict(resize="bucket", batching="bucket", bidirectional="official", caption_dropout=0.5,
                     mixed_precision="bf16", optimizer="adamw8bit", save_dtype="fp16", num_loras=8, rank=4,
                     checkpoint_every=2, keep_checkpoints=0, steps=S)


def _cfg(assets, out, **over):
    return tiny_train_config(assets, out, **{**OFFICIAL_LIKE, **over})


def _train(cfg, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return training.train(cfg, **kwargs)


def _state(out, step):
    return torch.load(Path(out) / "checkpoints" / f"step-{step:08d}" / "trainer_state.pt", weights_only=True)


def _differences(a, b, path=""):
    """Paths where two nested optimizer states (dicts, tensors, plain values) differ, bit for bit and by dtype."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [path + " (keys)"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    return [] if a == b and type(a) is type(b) else [path]


def _training_info(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["training_info"])


def _assert_like_straight(out, ref):
    """``out`` ended as the uninterrupted run ``ref``: fp32 masters, the whole optimizer state (8-bit blocks,
    quantization maps and absmax included), the data position, the loss log and the final weights file's bytes
    (name metadata aside, as the run folders are named differently)."""
    got, want = _state(out, S), _state(ref, S)
    assert got["step"] == want["step"] == S
    assert got["data_position"] == want["data_position"] and got["num_processes"] == want["num_processes"] == 1
    masters = want["lorweb_master_weights"]
    assert all(torch.equal(got["lorweb_master_weights"][k], v) for k, v in masters.items())
    assert _differences(got["optimizer"], want["optimizer"]) == []
    assert (Path(out) / "loss.jsonl").read_text() == (Path(ref) / "loss.jsonl").read_text()
    with safe_open(str(Path(out) / "lorweb.safetensors"), "pt") as f, \
            safe_open(str(Path(ref) / "lorweb.safetensors"), "pt") as g:
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in g.keys())
    assert _training_info(Path(out) / "lorweb.safetensors") == _training_info(Path(ref) / "lorweb.safetensors")


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    _train(_cfg(assets, out))
    return out


def test_pin_the_official_like_run_uses_8bit_optimizer_state_and_two_buckets(straight):
    """PIN (the premise of the resume pins below): the run's AdamW8bit holds uint8 blockwise state for some tensors
    (bitsandbytes wraps it in ``__bnb_optimizer_quant_state__``) and its data pass is 4 bucket batches (epoch 1
    from step 5 on: training_info's epoch of step 4 is 0, of step 6 is 1)."""
    state = _state(straight, S)["optimizer"]["state"]
    quant = [s["__bnb_optimizer_quant_state__"] for s in state.values() if "__bnb_optimizer_quant_state__" in s]
    assert any(q["state1"].dtype == torch.uint8 and "absmax1" in q and "qmap1" in q for q in quant)
    assert _training_info(Path(straight) / "checkpoints" / "step-00000004" / "lorweb.safetensors")["epoch"] == 0
    assert _training_info(Path(straight) / "lorweb.safetensors") == {"step": S, "epoch": 1}


@pytest.mark.parametrize("k", [1, 3, 4, 5])
def test_pin_a_run_stopped_by_its_step_budget_and_resumed_equals_the_straight_run(assets, straight, tmp_path, k):
    """PIN. training.py ``train``: ``--steps k`` (a checkpoint at k, mid-epoch for 1 and 3, the epoch boundary for
    4, one step before the end for 5), then ``--resume --steps 6``, ends bit-identical to the uninterrupted 6-step
    run: masters, 8-bit optimizer state, data position, loss log, fp16 weights, training_info."""
    out = tmp_path / "run"
    _train(_cfg(assets, out, steps=k))
    assert _state(out, k)["step"] == k
    _train(_cfg(assets, out, resume=True))
    _assert_like_straight(out, straight)


def test_pin_a_run_stopped_between_checkpoints_resumes_to_the_straight_run(assets, straight, tmp_path):
    """PIN. Stopped by an exception after step 3 (checkpoints every 2: resumes from step 2, step 3 is trained
    again), then resumed: the straight run's end, and its loss log without a duplicate step 3."""

    class Stop(Exception):
        pass

    def stop_at_3(step, loss):
        if step == 3:
            raise Stop

    out = tmp_path / "run"
    with pytest.raises(Stop):
        _train(_cfg(assets, out), step_callback=stop_at_3)
    assert training.latest_checkpoint(out).name == "step-00000002"
    _train(_cfg(assets, out, resume=True))
    _assert_like_straight(out, straight)


def test_pin_num_workers_changed_on_resume_changes_nothing(assets, straight, tmp_path):
    """PIN. ``num_workers`` is in training.RESUME_MAY_DIFFER ("changes no computed value"): two steps in the main
    process, then a resume with 2 DataLoader worker processes, ends as the straight run."""
    out = tmp_path / "run"
    _train(_cfg(assets, out, steps=2))
    _train(_cfg(assets, out, resume=True, num_workers=2))
    _assert_like_straight(out, straight)


def test_pin_the_logged_loss_is_the_loss_of_the_step_replayed_from_the_checkpoint(assets, tmp_path):
    """PIN (item "loss logged = loss optimized"). fp32, one bucket-batch stream: the loss.jsonl row of step k + 1 is
    exactly ``flow_matching_loss`` on the checkpoint of step k (fp32 weights), the sampler's batch at step k and the
    step's generator (seed * 1_000_003 + k * 1009): the value the optimizer stepped on is the value logged."""
    cfg = tiny_train_config(assets, tmp_path / "run", steps=3, checkpoint_every=1, keep_checkpoints=0,
                            resize="bucket", bidirectional="official", caption_dropout=0.5, optimizer="adamw",
                            gradient_checkpointing=False)
    _train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    dataset = AnalogyFolder(cfg.data, long_edge=cfg.long_edge, resize=cfg.resize, bidirectional=cfg.bidirectional)
    encoder = flux.AnalogyEncoder(cfg.encoder, dtype=torch.float32, query_mode=cfg.query_mode)
    sampler = training.StepBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, start_step=0,
                                        total_steps=cfg.steps, bidirectional=True,
                                        groups=training.batch_groups(dataset, cfg.batching))
    for k in (1, 2):
        pipe = flux.load_kontext_pipeline(cfg.model)
        lf.inject_lorweb(pipe.transformer, lf.LoRWeBConfig(num_loras=cfg.num_loras, rank=cfg.rank,
                                                           key_dim=cfg.key_dim, query_dim=encoder.query_dim))
        lf.load_lorweb_weights(pipe.transformer, tmp_path / "run" / "checkpoints" / f"step-{k:08d}" /
                               "lorweb.safetensors")
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.eval()
        batch = training._collate([dataset[i] for i in sampler.batch(k)])
        generator = torch.Generator().manual_seed(training.derived_seed(cfg.seed * 1_000_003 + k * 1009))
        with torch.no_grad():
            query = training.batch_query(encoder, batch, torch.device("cpu"))
            loss = training.flow_matching_loss(pipe.transformer, pipe, batch, query, cfg, generator).item()
        assert rows[k] == {"step": k + 1, "loss": loss, "lr": cfg.learning_rate}


def test_pin_the_progress_bar_of_a_resumed_run_counts_from_the_checkpoint(assets, tmp_path, monkeypatch):
    """PIN. training.py ``_train``: the bar's total is ``--steps``, a resume starts it at the checkpoint's step and
    every step advances it by one, so it ends at ``--steps`` (as ai-toolkit's ``initial=self.step_num``); a shown bar
    (progress=True: a disabled tqdm bar does not count)."""
    from tqdm.auto import tqdm

    import lorweb_fast._progress as progress

    bars = []
    original = progress.progress_bar

    def recording(*args, **kwargs):
        bar = original(*args, **kwargs)
        bars.append((kwargs.get("total"), kwargs.get("initial"), bar))
        return bar

    # _train imports progress_bar from lorweb_fast._progress when it runs, so the patch reaches it
    monkeypatch.setattr(progress, "progress_bar", recording)
    cfg = tiny_train_config(assets, tmp_path / "run", steps=2, checkpoint_every=2, optimizer="adamw", progress=True)
    _train(cfg)
    _train(dataclasses.replace(cfg, steps=5, resume=True))
    assert [(total, initial) for total, initial, _ in bars] == [(2, 0), (5, 2)]
    assert [bar.n for _, _, bar in bars] == [2, 5]
    assert all(isinstance(bar, tqdm) for _, _, bar in bars)


@pytest.mark.parametrize("groups", [None, [(32, 32)] * 6 + [(32, 16)] * 5])
def test_pin_one_seed_one_data_order_another_seed_another(groups):
    """PIN. ``StepBatchSampler``: the same seed gives the same batches (a fresh sampler, and a sampler started at a
    later step gives the later batches), another seed another order within the first epoch."""
    def batches(seed, start=0):
        sampler = training.StepBatchSampler(11, 2, seed=seed, start_step=start, total_steps=12, groups=groups)
        return list(sampler)

    assert batches(0) == batches(0)
    assert batches(0, start=5) == batches(0)[5:]
    assert batches(0)[:5] != batches(1)[:5]
