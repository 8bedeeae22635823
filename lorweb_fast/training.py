"""Flow-matching training of LoRWeB on a stock diffusers FLUX.1-Kontext pipeline (METHOD.md, "Images and training").

Only the LoRWeB parameters (basis, keys, query projections) train; the transformer, VAE, text encoders and the
analogy encoder stay frozen. The same ``train`` runs in one process or under ``accelerate launch`` with several
processes: DDP (gloo on CPU) or accelerate's FSDP2 configuration (``fsdp_version: 2``). Under FSDP every layer
computes its coefficients inside its own forward, where the block that wraps it has gathered its sharded parameters
(``set_query(..., per_forward=True)``); checkpoints gather the LoRWeB tensors and the optimizer state to full
tensors, so a checkpoint written under FSDP resumes under DDP or in one process and the other way round.

Data (``lorweb_fast.data.AnalogyFolder``): the official layout ``control/<id>.jpg`` = a | a' | b strip,
``target/<id>.jpg`` = b', ``target/<id>.txt`` = caption (composed into [a a'; b b'] grids as the official loader
does), or finished 2x2 grids in ``control/`` and ``target/``; see ``lorweb_fast/data.py``.

Objective (official, NVlabs/LoRWeB ``LoRWeB_default_PROMPTS.yaml``, ``jobs/process/BaseSDTrainProcess.py``,
``toolkit/samplers/custom_flowmatch_sampler.py``): t from the grid linspace(1000, 1, 1000) at a uniform index in
[0, 998], x_t = (1 - t/1000) x0 + (t/1000) noise, target noise - x0, MSE over the whole target grid, times the
"weighted" bell-curve weight of t (``timestep_type="weighted"``).

Outputs in ``out``: ``lorweb.safetensors`` (official format in ``save_dtype``, fp16 by default as the official
trainer, latest) with ``config.yaml`` (the official job config that the official inference.py reads),
``checkpoints/step-XXXXXXXX/`` (the same weights and config.yaml + trainer state with the fp32 master weights, written
to a temporary folder and renamed; the newest ``keep_checkpoints`` are kept, and, as ai-toolkit does, every step that
is a multiple of ``keep_milestone_every`` = 500), ``loss.jsonl`` and ``loss.png``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import warnings
from dataclasses import MISSING, asdict, dataclass, fields, replace as dataclass_replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from ._files import FolderInUseError, FolderLock, append_text, atomic_write, loads_json, \
    naming_the_file, save_figure_atomically, temporary_folder, torch_save, unlink_file_or_link
from ._files import recorded_location  # noqa: F401 (re-exported)
from ._files import same_or_inside
from . import _locks
from ._locks import holding
from .data import (BIDIRECTIONAL, LAYOUTS, MISSING_CAPTION_MODES, OFFICIAL_BUCKET_DIVISIBILITY, RESIZE_MODES,
                   AnalogyDataError, AnalogyFolder, bidirectional_swap)
from .model import DEFAULT_ENCODER, LoRWeBConfig, checkpoint_metadata, global_rng_kept, inject_lorweb, \
    load_lorweb_weights, lorweb_layers, lorweb_state_dict, save_lorweb_weights, set_query
from .official_config import CONFIG_NAME, DTYPE_NAMES
from .reference import ACTIVATIONS, REDUCTIONS
from .validation import REPORTED_BY_MAIN_PROCESS, MissingDependencyError, check_train_config, diffusers_classes, \
    plotting_available, require, warn

logger = logging.getLogger("lorweb_fast.training")

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
#: "weighted" / "linear": the official grid of 1000 timesteps, with / without the bell-curve loss weight;
#: "diffusers": diffusers' ``compute_density_for_timestep_sampling`` + ``compute_loss_weighting_for_sd3`` with
#: ``weighting_scheme``
TIMESTEP_TYPES = ("weighted", "linear", "diffusers")
ADAPTER_PRECISIONS = ("bf16", "fp32")
#: "qfloat8": the official ``quantize: true`` (optimum-quanto fp8 weights for the transformer and T5); "int8" /
#: "nf4": bitsandbytes, loaded by stock diffusers (GPU only)
QUANTIZE_BASE = ("none", "qfloat8", "int8", "nf4")
#: the pipeline components the official ``quantize: true`` quantizes (``quantize_te`` defaults to ``quantize``)
QFLOAT8_COMPONENTS = ("transformer", "text_encoder_2")
#: "bucket": one training size per batch, as ai-toolkit batches (official); "mixed": batches drawn across buckets,
#: each resized to its first sample's size (lorweb_fast's first rule)
BATCHINGS = ("bucket", "mixed")
OPTIMIZERS = ("adamw8bit", "adamw")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
#: "sample": the control grid's VAE latents are drawn from the latent distribution with the run's generator, as the
#: official trainer (toolkit/models/base_model.py ``encode_images``: ``latent_dist.sample()``, called from
#: extensions_built_in/flux_kontext.py ``condition_noisy_latents``); "mode": its mean, as diffusers' Kontext
#: pipeline encodes the image at inference (lorweb_fast's first rule)
CONTROL_LATENTS = ("sample", "mode")
#: the analogy encoder's dtype; "auto": the training dtype (``mixed_precision``), as the official trainer loads the
#: encoder in the model's dtype (extensions_built_in/flux_kontext.py ``FluxKontextModel.load_model``)
ENCODER_DTYPES = ("auto", *DTYPE_NAMES)
#: what a NaN training loss does. "skip" (official, extensions_built_in/sd_trainer/SDTrainer.py
#: ``train_single_accumulation``: the loss is replaced by a zero leaf, so backward reaches no parameter and the
#: optimizer step changes nothing; the step still counts): no update that step, logged; decided on every rank together
#: (a NaN on any rank skips the step everywhere). "raise": stop with FloatingPointError before backward. An infinite
#: loss always stops so.
NAN_LOSS = ("skip", "raise")
CHECKPOINT_DIR = "checkpoints"
#: ai-toolkit never rotates out a step save whose step is a multiple of this (jobs/process/BaseSDTrainProcess.py
#: ``clean_up_saves``: ``is_milestone_step(filename, milestone=500)``); ``TrainConfig.keep_milestone_every``
OFFICIAL_MILESTONE_EVERY = 500
WEIGHTS_NAME = "lorweb.safetensors"
TRAINER_STATE_NAME = "trainer_state.pt"


# ------------------------------------------------------------------------------------------------------ data
class StepBatchSampler(torch.utils.data.Sampler):
    """Index batches for optimizer steps ``start_step .. total_steps - 1`` of one process.

    Without ``groups`` ("mixed" batching): each epoch is a fresh permutation of the samples seeded by (seed, epoch),
    and a global batch of ``batch_size * world_size`` consecutive indices is split between processes.

    With ``groups`` (one hashable key per sample, its training size: the official "bucket" batching of ai-toolkit,
    ``toolkit/dataloader_mixins.py`` ``BucketsMixin.setup_buckets`` / ``build_batch_indices`` and
    ``toolkit/data_loader.py`` ``get_dataloader_from_datasets``): the samples are grouped by key (buckets in order of
    first appearance), each bucket is shuffled once (seeded by ``seed``) and cut into batches of ``batch_size``
    (a bucket's last batch may be smaller), and every epoch visits all these batches in a fresh order seeded by
    (seed, epoch). A step takes ``world_size`` consecutive batches of that stream, one per process; as a bucket's
    last batch is shorter, the processes of one step may hold different batch sizes (DDP averages their mean losses
    with equal weights, as one process averages over a short batch).

    The order depends only on the position in that stream, so a resumed run sees exactly the batches the killed run
    would have seen: ``start_position`` (``stream_position`` of the killed run at ``start_step``, which its
    checkpoint records) continues the stream where it stopped also when the number of processes changed (the
    default, ``start_step`` steps of ``world_size`` processes, is right only when it did not).
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, start_step: int, total_steps: int,
                 world_size: int = 1, rank: int = 0, bidirectional: bool = False,
                 groups: Optional[Sequence] = None, start_position: Optional[int] = None):
        self.n, self.batch_size, self.seed, self.bidirectional = num_samples, batch_size, seed, bidirectional
        self.start_step, self.total_steps, self.world_size, self.rank = start_step, total_steps, world_size, rank
        # one step of one process advances the stream by one batch (bucket) or batch_size samples (mixed)
        self._unit = 1 if groups is not None else batch_size
        if start_position is not None and (isinstance(start_position, bool) or not isinstance(start_position, int)
                                           or start_position < 0):
            raise ValueError(f"start_position must be a non-negative integer, got {start_position!r}")
        self.start_position = start_step * world_size * self._unit if start_position is None else start_position
        self.buckets: Optional[dict] = None
        self.bucket_batches: Optional[list[list[int]]] = None
        if groups is not None:
            if len(groups) != num_samples:
                raise ValueError(f"groups has {len(groups)} keys for {num_samples} samples")
            self.buckets = {}
            for index, key in enumerate(groups):
                self.buckets.setdefault(key, []).append(index)
            generator = torch.Generator().manual_seed(derived_seed(seed * 7919 + 1_000_033))
            self.bucket_batches = []
            for members in self.buckets.values():
                shuffled = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
                self.bucket_batches += [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]

    def batch(self, step: int) -> list:
        """Sample indices of this process at ``step``; with ``bidirectional``, ``(index, swap)`` pairs whose swap
        is ``data.bidirectional_swap(seed, position in the sample stream)``."""
        if self.bucket_batches is not None:
            position = self.stream_position(step) + self.rank  # in the stream of batches
            epoch, offset = divmod(position, len(self.bucket_batches))
            indices = self.bucket_batches[self._permutation(epoch, len(self.bucket_batches))[offset]]
            positions = range(position * self.batch_size, position * self.batch_size + len(indices))
        else:
            start = self.stream_position(step) + self.rank * self.batch_size
            positions = range(start, start + self.batch_size)
            indices = []
            for pos in positions:
                epoch, offset = divmod(pos, self.n)
                indices.append(self._permutation(epoch, self.n)[offset])
        if self.bidirectional:
            return [(index, bidirectional_swap(self.seed, pos)) for index, pos in zip(indices, positions)]
        return list(indices)

    def epoch(self, step: int) -> int:
        """Passes over the data completed before this process's batch at ``step`` (of its first sample): in one
        process, ai-toolkit's ``epoch_num`` when it draws that batch (jobs/process/BaseSDTrainProcess.py ``run``
        counts one per exhausted dataloader). Under DDP the passes are over the stream the processes share (the
        official loader is not sharded: each of its processes counts its own passes)."""
        if self.bucket_batches is not None:
            return (self.stream_position(step) + self.rank) // len(self.bucket_batches)
        return (self.stream_position(step) + self.rank * self.batch_size) // self.n

    def stream_position(self, step: int) -> int:
        """Where in the stream (of bucket batches, or of samples for mixed batching) the first process's batch at
        ``step`` starts; after ``step`` completed steps, the first item not yet drawn."""
        return self.start_position + (step - self.start_step) * self.world_size * self._unit

    def _permutation(self, epoch: int, size: int) -> list[int]:
        """The epoch's order of ``size`` items (samples or bucket batches), computed once per epoch (kept as one
        (epoch, order) pair, read once: threads sharing the sampler never get one epoch's check with another's
        order)."""
        cached = getattr(self, "_cached_order", None)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed * 7919 + epoch))
            cached = self._cached_order = (epoch, torch.randperm(size, generator=generator).tolist())
        return cached[1]

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def batch_groups(dataset: AnalogyFolder, batching: str) -> Optional[list[tuple[int, int]]]:
    """The per-sample keys ``StepBatchSampler`` groups batches by: each sample's training size for ``"bucket"``
    (official), ``None`` for ``"mixed"``."""
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {BATCHINGS}, got {batching!r}")
    if batching == "mixed":
        return None
    return [dataset.grid_size(sample[4]) for sample in dataset.samples]


def _collate(items: list[dict]) -> dict:
    from PIL import Image

    size = items[0]["target"].size  # one grid size per batch (only "mixed" batching resizes anything here)
    fix = (lambda im: im if im.size == size else im.resize(size, Image.BICUBIC))
    return {"control": [fix(i["control"]) for i in items], "target": [fix(i["target"]) for i in items],
            "caption": [i["caption"] for i in items], "name": [i["name"] for i in items]}


# ---------------------------------------------------------------------------------------------------- config
#: The largest ``mode_scale`` for which diffusers' "mode" timestep density (SD3, Esser et al. 2024, eq. 20) maps
#: [0, 1] monotonically onto [0, 1]: 2 / (pi - 2); the smallest is -1.
MAX_MODE_SCALE = 2.0 / (math.pi - 2.0)


@dataclass
class TrainConfig:
    """Training options; the defaults are the official LoRWeB ones (README table "Official LoRWeB vs lorweb_fast
    defaults"), except ``adapter_precision`` (bf16 fused kernels; "fp32" is the official arithmetic),
    ``quantize_base`` (none; "qfloat8" is the official fp8 base, with optimum-quanto), ``mixed_precision`` (bf16
    autocast around the loss, where the official run computes in plain bf16) and ``seed`` (every draw a function of
    (seed, step); the official run resets the global generators at its samples)."""

    data: str
    out: str
    model: str = "black-forest-labs/FLUX.1-Kontext-dev"
    encoder: str = DEFAULT_ENCODER
    steps: int = 10_000
    batch_size: int = 6
    learning_rate: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-6
    weight_decay: float = 0.05
    optimizer: str = "adamw8bit"
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    long_edge: int = 512
    resize: str = "bucket"
    bucket_divisibility: int = OFFICIAL_BUCKET_DIVISIBILITY
    batching: str = "bucket"
    control_latents: str = "sample"
    timestep_type: str = "weighted"
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    caption_dropout: float = 0.05
    guidance_scale: float = 1.0
    max_sequence_length: int = 512
    num_loras: int = 32
    rank: int = 4
    key_dim: int = 128
    heads: int = 1
    activation: str = "softmax"
    reduce: str = "mean"
    query_mode: str = "cat-aa'b"
    pooling_type: str = "avg"
    query_projection_type: str = "linear"
    query_source: str = "grid"
    encoder_dtype: str = "auto"
    save_dtype: str = "fp16"
    checkpoint_every: int = 250
    keep_checkpoints: int = 4
    keep_milestone_every: int = OFFICIAL_MILESTONE_EVERY
    resume: bool = False
    overwrite: bool = False
    skip_bad: bool = False
    missing_caption: str = "empty"
    layout: str = "auto"
    bidirectional: str = "none"
    adapter_precision: str = "bf16"
    quantize_base: str = "none"
    cudnn_attention: bool = False
    nan_loss: str = "skip"
    seed: int = 0
    num_workers: int = 2
    progress: bool = True

    def _check_choices(self, choices) -> None:
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def validate(self) -> None:
        self._check_choices((("timestep_type", TIMESTEP_TYPES), ("layout", LAYOUTS), ("resize", RESIZE_MODES),
                             ("bidirectional", BIDIRECTIONAL), ("adapter_precision", ADAPTER_PRECISIONS),
                             ("quantize_base", QUANTIZE_BASE), ("batching", BATCHINGS),
                             ("control_latents", CONTROL_LATENTS), ("encoder_dtype", ENCODER_DTYPES),
                             ("nan_loss", NAN_LOSS), ("missing_caption", MISSING_CAPTION_MODES)))
        if self.weighting_scheme != "none" and self.timestep_type != "diffusers":
            raise ValueError(f"weighting_scheme={self.weighting_scheme!r} is a diffusers scheme: it needs "
                             f"timestep_type='diffusers' (--timestep-type diffusers), got {self.timestep_type!r}")
        self._check_choices((("weighting_scheme", WEIGHTING_SCHEMES), ("optimizer", OPTIMIZERS),
                             ("mixed_precision", MIXED_PRECISIONS)))
        for name in ("steps", "batch_size", "checkpoint_every", "long_edge"):
            value = getattr(self, name)  # not a number: check_train_config names the field and its type
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        from .official_config import PATCH_QUERY_MODES, QUERY_SOURCES, SAVE_DTYPES, check_query_settings

        check_query_settings(self.query_mode, self.pooling_type, self.query_projection_type)
        if self.pooling_type != "avg" and self.query_mode not in PATCH_QUERY_MODES:  # refused, not ignored (as infer)
            raise ValueError(f"pooling_type must be 'avg' (the default) outside the patch query modes "
                             f"({', '.join(PATCH_QUERY_MODES)}), which pool CLIP's patch tokens: query_mode "
                             f"{self.query_mode!r} does not pool, got {self.pooling_type!r}")
        self._check_choices((("query_source", QUERY_SOURCES), ("save_dtype", tuple(SAVE_DTYPES))))
        if self.query_source == "images" and self.query_mode != "cat-aa'b":  # as AnalogyEncoder, before any load
            raise ValueError(f"query_source='images' encodes a, a', b separately (like \"cat-aa'b\"); it cannot be "
                             f"combined with query_mode={self.query_mode!r}")
        self._check_choices((("activation", ACTIVATIONS), ("reduce", REDUCTIONS)))
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: --resume continues the run in --out, "
                             "--overwrite deletes it and starts over")
        check_train_config(self)  # every field: type, finite, range
        for sub in ("target", "control", "captions"):  # the folders the dataset reads, nested folders included
            if same_or_inside(self.out, Path(self.data) / sub):
                raise ValueError(f"out must not lie inside the training data's {Path(self.data) / sub} (got "
                                 f"{self.out}): the run's loss.png and checkpoints would be read back as samples "
                                 "(and the next resume would stop on them); choose a folder outside it")
        defaults = {f.name: f.default for f in fields(self)}  # typed and in range now (check_train_config)
        for name, scheme in (("logit_mean", "logit_normal"), ("logit_std", "logit_normal"), ("mode_scale", "mode")):
            value = getattr(self, name)  # refused, not ignored, where the run's density does not read it
            if value != defaults[name] and self.weighting_scheme != scheme:
                raise ValueError(f"{name} must stay at its default {defaults[name]} unless weighting_scheme is "
                                 f"{scheme!r} (--timestep-type diffusers --weighting-scheme {scheme}), the only "
                                 f"timestep density it shapes; got {value} with weighting_scheme="
                                 f"{self.weighting_scheme!r}")
        if self.weighting_scheme == "mode" and not -1.0 <= self.mode_scale <= MAX_MODE_SCALE:
            raise ValueError(f"mode_scale must be in [-1, {MAX_MODE_SCALE:.4g}] (SD3's range, where diffusers' "
                             f"'mode' density keeps every timestep in [0, 1]), got {self.mode_scale}")
        if self.keep_milestone_every < 0:
            raise ValueError(f"keep_milestone_every must be >= 0 (0: milestone checkpoints are rotated out like the "
                             f"others), got {self.keep_milestone_every}")


def derived_seed(value: int) -> int:
    """A seed computed from ``--seed`` (and the step, epoch, rank) taken modulo 2**64, the range
    ``torch.Generator.manual_seed`` takes: every --seed the options accept runs (a large one overflowed it after the
    models had loaded); seeds whose derived values fit are unchanged, so runs and resumes keep their draws."""
    return value % 2 ** 64


# ------------------------------------------------------------------------------------------------ checkpoints
_CHECKPOINT_NAME = re.compile(r"step-(\d+)")
#: TrainConfig fields that may differ when resuming: the step budget, options that change no computed value (how
#: often checkpoints are written and how many are kept, the dtype of the saved weights files: the trainer state
#: keeps the fp32 masters it resumes from, and gradient checkpointing: memory for time, among them), the attention
#: kernel choice (cudnn_attention: roundings only), what a NaN loss does (nan_loss: only on a NaN) and ``out``, the
#: folder the checkpoint is found in (a run folder may be moved or named another way: ``runs/x/``, ``./runs/x``).
RESUME_MAY_DIFFER = ("steps", "resume", "overwrite", "progress", "num_workers", "cudnn_attention",
                     "gradient_checkpointing", "keep_checkpoints", "keep_milestone_every", "checkpoint_every",
                     "save_dtype", "nan_loss", "out")
#: TrainConfig fields naming a local folder or a hub id: compared on resume as ``recorded_location`` writes them (a
#: local folder as its absolute path), so ``DATA``, ``DATA/`` and ``./DATA`` are the same folder
RESUME_LOCATIONS = ("data", "model", "encoder")
#: What a stored config that lacks a field did, where that differs from the field's default today: runs written
#: before ``batching`` existed batched across buckets; before ``control_latents`` / ``encoder_dtype`` they encoded the
#: control with the latent mode and ran the encoder in fp32; before ``missing_caption`` a sample without a caption
#: was an error (skipped with ``skip_bad``), so resuming with "empty" could add samples.
RESUME_LEGACY_VALUES = {"batching": "mixed", "control_latents": "mode", "encoder_dtype": "fp32",
                        "missing_caption": "raise"}
#: Files a training run writes directly in ``out`` (``--overwrite`` deletes exactly these and ``checkpoints/``).
RUN_FILES = (WEIGHTS_NAME, "config.yaml", "loss.jsonl", "loss.png", "train_config.json")
#: The lock file the main process of a training run holds in its ``out`` while it trains (``train``).
RUN_LOCK_NAME = ".lorweb-train.lock"


def checkpoint_dirs(out: Union[str, Path]) -> list[Path]:
    """``checkpoints/step-<digits>`` folders under ``out``, oldest first; other names (stray folders, temporary
    ``.tmp-step-*`` folders of a killed run, files) are ignored."""
    root = Path(out) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    """The step of a ``checkpoints/step-<digits>`` folder."""
    return int(folder.name.split("-")[1])


def latest_checkpoint(out: Union[str, Path]) -> Optional[Path]:
    """The newest complete ``checkpoints/step-*`` folder under ``out`` (temporary and stray folders are ignored)."""
    done = [p for p in checkpoint_dirs(out) if (p / TRAINER_STATE_NAME).is_file() and (p / WEIGHTS_NAME).is_file()]
    return done[-1] if done else None


def _weights_file_dtype(path: Path) -> Optional[torch.dtype]:
    """The dtype of a saved weights file's tensors (one is read), None for a file without tensors."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        return f.get_tensor(keys[0]).dtype if keys else None


def _comparable_config(cfg) -> dict:
    """The training config as JSON values, without the fields that may differ on resume."""
    values = json.loads(json.dumps(asdict(cfg), default=str))
    return _located({k: v for k, v in values.items() if k not in RESUME_MAY_DIFFER})


def _located(values: dict) -> dict:
    """``values`` with the RESUME_LOCATIONS fields as ``recorded_location`` writes them."""
    return {k: recorded_location(v) if k in RESUME_LOCATIONS and isinstance(v, str) else v for k, v in values.items()}


def _read_trainer_state(ckpt: Path) -> dict:
    """A checkpoint's trainer state, checked; raises ValueError naming the file when it is empty or corrupt, or when
    it pickles anything but tensors and plain values (loaded with ``weights_only=True``: unpickling a shared run
    folder's arbitrary objects could run code; globals the caller trusts are allowed with torch's
    ``torch.serialization.add_safe_globals`` / ``safe_globals``)."""
    path = ckpt / TRAINER_STATE_NAME
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        unsafe = _unsafe_globals(path) if isinstance(exc, pickle.UnpicklingError) else []
        if unsafe:
            raise ValueError(f"{path} pickles objects other than tensors and plain values ({', '.join(unsafe[:5])}"
                             f"{', ...' if len(unsafe) > 5 else ''}): not loaded, since unpickling them could run "
                             "code (lorweb_fast writes none); if you trust the file, allow them with "
                             "torch.serialization.add_safe_globals([...]) before resuming") from None
        raise ValueError(f"{path} is empty or corrupt ({type(exc).__name__}: {_load_error_detail(exc)})") from None
    optimizer = state.get("optimizer") if isinstance(state, dict) else None
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= optimizer.keys() \
            or not isinstance(state.get("step"), int):
        raise ValueError(f"{path} is not a trainer state (expected step and optimizer state)")
    for key, least in (("data_position", 0), ("num_processes", 1)):
        value = state.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"{path} is corrupt: its {key} is {value!r}, not an integer >= {least}")
    checkpoint_metadata(ckpt / WEIGHTS_NAME)  # the weights file must at least be readable
    return state


def _load_error_detail(exc: BaseException) -> str:
    """One line of a ``torch.load`` failure: the unpickler's own reason where torch wraps it in its multi-line
    ``weights_only`` advice (which suggests ``weights_only=False``, wrong for a corrupt file), else the first line."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return found.group(1).strip() if found else (text.splitlines() or [""])[0]


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a ``weights_only`` load of ``path`` refuses (torch's own list), or [] when that cannot be read."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return []


def find_resumable_checkpoint(out: Union[str, Path]) -> tuple[Optional[Path], Optional[dict]]:
    """(newest usable checkpoint, its trainer state). A checkpoint whose trainer state or weights are empty or
    corrupt is skipped with a warning naming the file, falling back to the previous complete one; when checkpoints
    exist but none is usable, raises ValueError naming them all."""
    complete = [p for p in checkpoint_dirs(out) if (p / TRAINER_STATE_NAME).is_file() and (p / WEIGHTS_NAME).is_file()]
    problems = []
    for ckpt in reversed(complete):
        try:
            return ckpt, _read_trainer_state(ckpt)
        except Exception as exc:  # corrupt trainer state or unreadable weights
            problems.append(str(exc))
            warn(f"cannot resume from {ckpt.name}: {exc}; falling back to the previous complete checkpoint")
    if problems:
        raise ValueError(f"no usable checkpoint in {Path(out) / CHECKPOINT_DIR}: " + "; ".join(problems))
    return None, None


def _check_resume_config(cfg, ckpt: Path, state: dict, out: Path) -> None:
    """Refuse to resume with a training config that differs from the checkpoint's in anything but the step budget
    (and RESUME_MAY_DIFFER); names the differing fields."""
    stored = state.get("config")
    source = ckpt / TRAINER_STATE_NAME
    if stored is None and (out / "train_config.json").is_file():  # checkpoints written before configs were stored
        stored = loads_json((out / "train_config.json").read_text())
        source = out / "train_config.json"
    if stored is None:
        return
    now = _comparable_config(cfg)
    stored = _located({k: v for k, v in stored.items() if k not in RESUME_MAY_DIFFER})
    # a field added after the checkpoint was written counts as its default there
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(cfg) if f.default is not MISSING},
                                     default=str))
    defaults.update(RESUME_LEGACY_VALUES)
    stored = {**{k: defaults[k] for k in now if k not in stored and k in defaults}, **stored}
    differ = sorted(k for k in set(now) | set(stored) if now.get(k) != stored.get(k))
    if differ:
        shown = ", ".join(f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in differ)
        hints = "".join(f" (pass --{k.replace('_', '-')} {stored.get(k)} to resume it)" for k in differ
                        if k in RESUME_LEGACY_VALUES and stored.get(k) == RESUME_LEGACY_VALUES[k])
        raise ValueError(f"cannot resume the run in {out}: the training config differs from {source} in {shown}"
                         f"{hints}; only the step budget and options that change no computed value may change "
                         "(or pass --overwrite to start over)")


def _foreign_run_files(out: Path) -> list[str]:
    """RUN_FILES in ``out`` that no unfinished run of this trainer leaves without checkpoints, weights or a loss log:
    config.yaml and loss.png (written with the first checkpoint), and a train_config.json that is not a training
    config (a run killed before its first step leaves its own). Training would overwrite them."""
    found = [name for name in (CONFIG_NAME, "loss.png") if (out / name).exists()]
    own = out / "train_config.json"
    if own.exists():
        try:
            values = loads_json(own.read_text())
            ours = isinstance(values, dict) and {"data", "out", "model", "steps"} <= values.keys()
        except (OSError, ValueError):
            ours = False
        if not ours:
            found.append("train_config.json")
    return found


def clear_run(out: Union[str, Path]) -> None:
    """Delete a training run's files in ``out``: RUN_FILES and ``checkpoints/``, nothing else (a symlink among them:
    the link, never what it points to; ``prepare_output`` refuses a symlinked ``checkpoints/`` before this)."""
    out = Path(out)
    if (out / CHECKPOINT_DIR).is_symlink():
        (out / CHECKPOINT_DIR).unlink()
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def prepare_output(cfg, *, main_process: bool = True, clear: bool = True) -> tuple[Optional[Path], Optional[dict]]:
    """Check ``cfg.out`` before any model loads and return (checkpoint to resume, its trainer state).

    A used ``out`` (checkpoints, weights or a loss log) needs ``resume`` or ``overwrite``; ``overwrite`` deletes the
    run's files (``clear_run``: RUN_FILES and ``checkpoints/``, nothing else) when ``clear``, else leaves that to the
    caller (``train`` deletes them once the models have loaded, so a call that fails to load keeps the old run). An
    ``out`` without a run that holds files training writes (``_foreign_run_files``: e.g. a config.yaml of your own)
    needs ``overwrite`` too. Temporary folders of a killed run are removed. Only ``main_process`` deletes anything;
    ``train`` runs it there first and on the other processes after that.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    root = out / CHECKPOINT_DIR
    if cfg.overwrite and root.is_symlink():  # --overwrite deletes inside --out only
        raise ValueError(f"--out {out}: {CHECKPOINT_DIR}/ is a symlink (to {os.path.realpath(root)}); --overwrite "
                         "deletes a run's checkpoints only inside --out: remove the link, or empty the folder it "
                         "points to yourself")
    if main_process and root.is_dir():
        for tmp in root.glob(".tmp-step-*-replaced"):  # killed between _write_checkpoint's two renames: the step
            step = re.fullmatch(r"\.tmp-step-(\d+)-.+-replaced", tmp.name)  # folder moved aside goes back if no new
            final = root / f"step-{step.group(1)}" if step else None  # one took its place (else it is removed below)
            if final is not None and not final.exists() and not final.is_symlink() and tmp.is_dir() \
                    and not tmp.is_symlink():
                os.replace(tmp, final)
                logger.warning("put back the checkpoint folder %s, moved aside by a run killed while replacing it",
                               final)
        for tmp in root.glob(".tmp-step-*"):  # a killed run's half-written checkpoint
            if tmp.is_symlink() or not tmp.is_dir():  # a link, or a file moved aside from a step folder's name
                tmp.unlink(missing_ok=True)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
            logger.warning("removed the leftover temporary checkpoint folder %s", tmp)
        for ckpt in checkpoint_dirs(out):
            if ckpt.is_symlink():  # not written by a run: nothing of ours to clean up in it
                continue
            for tmp in [*ckpt.glob(".lorweb-*.safetensors.tmp"), *ckpt.glob(f".{CONFIG_NAME}.*.tmp"),
                        *ckpt.glob(".*.kept")]:  # save_lorweb_weights' copies of replaced files
                tmp.unlink(missing_ok=True)
    if main_process:  # the top-level copies' temporaries (_write_checkpoint)
        for name in (f".{WEIGHTS_NAME}.tmp", f".{CONFIG_NAME}.tmp"):
            unlink_file_or_link(out / name)
        for name in ("loss.png", "loss.jsonl", "train_config.json"):  # atomic writes' (plot_loss's, train's)
            for tmp in out.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
    log = out / "loss.jsonl"
    used = bool(checkpoint_dirs(out)) or (out / WEIGHTS_NAME).exists() or (log.is_file() and log.stat().st_size > 0)
    foreign = [] if used or not out.is_dir() else _foreign_run_files(out)
    if (used or foreign) and cfg.overwrite:
        if main_process and clear:
            clear_run(out)
        return None, None
    if used and not cfg.resume:
        raise ValueError(f"--out {out} already holds a training run (checkpoints, {WEIGHTS_NAME} or loss.jsonl); "
                         "pass --resume to continue it or --overwrite to start over")
    if foreign:
        raise ValueError(f"--out {out} holds {', '.join(foreign)} but no training run (no checkpoints, "
                         f"{WEIGHTS_NAME} or loss log); training writes these files: pass --overwrite to replace "
                         "them, or another --out")
    if not cfg.resume:
        return None, None
    ckpt, state = find_resumable_checkpoint(out)
    if ckpt is None:
        held = [p.name for p in checkpoint_dirs(out)] + [WEIGHTS_NAME] * (out / WEIGHTS_NAME).exists()
        if held:  # trained weights that cannot be continued
            raise ValueError(f"--resume: {out} holds trained weights ({', '.join(held)}) but no checkpoint with both "
                             f"{WEIGHTS_NAME} and {TRAINER_STATE_NAME} (the optimizer state and step), so the run "
                             "cannot be continued; starting over would overwrite them: pass --overwrite to do so, or "
                             "another --out")
        # e.g. killed before its first checkpoint: start over (the loss log restarts, not mixed)
        logger.warning("--resume: no checkpoint in %s, starting from step 0", root)
        return None, None
    _check_resume_config(cfg, ckpt, state, out)
    if int(state["step"]) > cfg.steps:
        raise ValueError(f"--resume: the checkpoint {ckpt.name} is at step {state['step']}, beyond --steps "
                         f"{cfg.steps}")
    return ckpt, state


def checkpoint_settings(cfg: TrainConfig, encoder_name: str) -> dict:
    """The LoRWeB settings of a training run (lorweb_fast names, ``official_config``), for config.yaml."""
    return {"num_loras": cfg.num_loras, "rank": cfg.rank, "lora_alpha": float(cfg.rank), "key_dim": cfg.key_dim,
            "heads": cfg.heads, "activation": cfg.activation, "reduce": cfg.reduce, "query_mode": cfg.query_mode,
            "pooling_type": cfg.pooling_type, "query_projection_type": cfg.query_projection_type,
            "encoder": encoder_name}


def _check_injected_layers(transformer, cfg: TrainConfig, query_dim: Optional[int]) -> None:
    """LoRWeB layers the caller injected before ``train`` must be what ``cfg`` says (the saved config.yaml and
    train_config.json are written from ``cfg``, and the official inference.py reads only config.yaml): raise
    ValueError naming the first layer and the settings that differ."""
    want = {"num_loras": cfg.num_loras, "rank": cfg.rank, "lora_alpha": float(cfg.rank), "key_dim": cfg.key_dim,
            "query_dim": query_dim, "heads": cfg.heads, "activation": cfg.activation, "reduce": cfg.reduce,
            "query_projection_type": cfg.query_projection_type}
    if query_dim is None:  # no encoder yet: its width is checked once it is built
        del want["query_dim"]
    for name, layer in lorweb_layers(transformer).items():
        differ = {k: (getattr(layer, k), v) for k, v in want.items() if getattr(layer, k) != v}
        if differ:
            shown = ", ".join(f"{k}: layer {a!r}, config {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"the transformer's LoRWeB layers differ from the training config ({name}: {shown}); "
                             "train with a TrainConfig that matches them, or remove_lorweb() first")


def _build_encoder(cfg: TrainConfig, weight_dtype: torch.dtype):
    """The AnalogyEncoder ``cfg`` names, in ``cfg.encoder_dtype`` ("auto": the training weights' dtype)."""
    from .flux import AnalogyEncoder

    encoder_dtype = weight_dtype if cfg.encoder_dtype == "auto" else DTYPE_NAMES[cfg.encoder_dtype]
    return AnalogyEncoder(cfg.encoder, dtype=encoder_dtype, query_mode=cfg.query_mode, pooling_type=cfg.pooling_type,
                          query_source=cfg.query_source)


def _check_encoder_settings(encoder, cfg: TrainConfig) -> None:
    """The analogy encoder must compute the query ``cfg`` says (the saved config.yaml is written from ``cfg``)."""
    got = (encoder.query_mode, encoder.pooling_type, encoder.query_source)
    if got != (cfg.query_mode, cfg.pooling_type, cfg.query_source):
        raise ValueError(f"the encoder's (query_mode, pooling_type, query_source) = {got} differ from the training "
                         f"config's {(cfg.query_mode, cfg.pooling_type, cfg.query_source)}")
    if cfg.query_projection_type == "none" and cfg.key_dim != encoder.query_dim:
        raise ValueError(f"key_dim must be {encoder.query_dim} with query_projection_type 'none', got {cfg.key_dim}: "
                         f"the keys take the encoder's {encoder.query_dim}-feature queries directly (query_mode "
                         f"{cfg.query_mode!r}); pass --key-dim {encoder.query_dim} or --query-projection-type linear")


def rotate_checkpoints(out: Union[str, Path], keep: int, milestone_every: int = OFFICIAL_MILESTONE_EVERY, *,
                       newest: Optional[int] = None) -> list[Path]:
    """Delete the ``checkpoints/step-*`` folders beyond the newest ``keep`` (0: keep all), except milestones: folders
    whose step is a multiple of ``milestone_every`` (0: no milestones). The official rule (ai-toolkit
    jobs/process/BaseSDTrainProcess.py ``clean_up_saves``: the saves before the newest ``max_step_saves_to_keep``
    are removed unless ``is_milestone_step``, step % 500 == 0). ``newest``: the step just written; folders of later
    steps are left from a timeline the run abandoned (a resume skipped them as corrupt or incomplete) and count as
    the oldest, as ai-toolkit's creation-time order counts them (by step they would be kept, and the checkpoint
    just written deleted). Returns the deleted folders."""
    dirs = checkpoint_dirs(out)
    if newest is not None:  # (a stable sort: the later steps first, each part in step order)
        dirs.sort(key=lambda p: checkpoint_step(p) <= newest)
    older = dirs[:-keep] if keep > 0 else []
    doomed = [p for p in older if not (milestone_every > 0 and checkpoint_step(p) % milestone_every == 0)]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def _write_checkpoint(out: Path, step: int, transformer, weights: dict, optimizer_state: dict, metadata: dict,
                      keep: int, *, save_dtype: str = "fp32", settings: Optional[dict] = None,
                      name: str = "lorweb", config: Optional[dict] = None, model: Optional[str] = None,
                      milestone_every: int = OFFICIAL_MILESTONE_EVERY, epoch: Optional[int] = None,
                      grad_scaler: Optional[dict] = None, data_position: Optional[int] = None,
                      num_processes: Optional[int] = None) -> Path:
    """Official weights (``weights`` = ``lorweb_state_dict``, written in ``save_dtype`` with our and ai-toolkit's
    metadata, ``epoch`` in its training_info, and its model hashes) + ``config.yaml`` (official format, from
    ``settings``) + trainer state (``optimizer_state`` as made by
    ``optimizer_state_dict``, and the fp32 master weights when ``save_dtype`` rounds them, so a resume is exact)
    into a temporary folder, renamed to ``checkpoints/step-XXXXXXXX``. ``out/lorweb.safetensors`` and
    ``out/config.yaml`` are then replaced by copies. ``config`` (the comparable training config) is stored in
    the trainer state, so a resume with different settings is refused, as are ``data_position`` (the sampler's
    ``stream_position`` after ``step`` steps) and ``num_processes``, so a resume continues the data stream where it
    stopped whatever its number of processes. ``model`` is the base model named in
    config.yaml (default: the official hub id). Older checkpoints are then rotated out by ``rotate_checkpoints``
    (the newest ``keep`` and the multiples of ``milestone_every`` stay)."""
    from .official_config import SAVE_DTYPES, aitk_metadata, write_config_yaml

    dtype = SAVE_DTYPES[save_dtype]
    root = out / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    # a full or read-only folder names the checkpoint, not a temporary never created; the folder gets mkdir's mode
    tmp = Path(temporary_folder(root, f".tmp-step-{step:08d}-", named=final))
    try:
        meta = {**aitk_metadata(name, step, epoch), **metadata}
        save_lorweb_weights(transformer, tmp / WEIGHTS_NAME, metadata=meta, state_dict=weights, dtype=dtype,
                            aitk_hashes=True)
        write_config_yaml(tmp / CONFIG_NAME, settings or {}, name=name, model=model,
                          extra={"save": {"dtype": str(dtype).removeprefix("torch.")}})
        state = {"step": step, "optimizer": optimizer_state, "config": config}
        if grad_scaler is not None:  # fp16: the loss scale and its growth tracker, so a resume continues them
            state["grad_scaler"] = grad_scaler
        if data_position is not None:
            state["data_position"], state["num_processes"] = data_position, num_processes
        if any(v.dtype != dtype for v in weights.values()):
            # the tensors themselves (torch.save writes them now), a compact copy only of a view into a larger
            # storage, whose whole storage torch.save would write
            state["lorweb_master_weights"] = {k: _compact(v.detach().cpu()) for k, v in weights.items()}
        torch_save(state, tmp / TRAINER_STATE_NAME, final / TRAINER_STATE_NAME)  # a full disk names the file
        replaced = None
        if final.is_symlink():  # not a checkpoint this run wrote (e.g. a skipped corrupt one): the link goes
            final.unlink()
        elif final.exists():  # moved aside (a ``.tmp-step-*`` name, removed at the next start if killed) and
            replaced = tmp.with_name(f"{tmp.name}-replaced")  # removed only once the new one is in place
            with naming_the_file(final):
                os.replace(final, replaced)
        try:
            with naming_the_file(final):
                os.replace(tmp, final)
        except BaseException:
            if replaced is not None:  # the folder that was there goes back
                os.replace(replaced, final)
            raise
        if replaced is not None and replaced.is_dir():
            shutil.rmtree(replaced, ignore_errors=True)
        elif replaced is not None:  # a file in its place
            replaced.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    copy_to_top_level(out, final)
    rotate_checkpoints(out, keep, milestone_every, newest=step)
    return final


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` when it owns its whole storage, else a contiguous copy of it alone."""
    whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole else tensor.clone(memory_format=torch.contiguous_format)


def copy_to_top_level(out: Path, final: Path) -> None:
    """``out/lorweb.safetensors`` and ``out/config.yaml`` replaced by copies of checkpoint ``final``'s files (one
    it lacks, as checkpoints written before config.yaml was saved in each, is left as it is). A resume runs it again
    for the checkpoint it resumes from: a run killed between the checkpoint's rename and these copies left the
    previous step's (or no) top-level files, which a resume from a checkpoint at ``--steps`` (no step left to train)
    would otherwise report as the result."""
    for name in (WEIGHTS_NAME, CONFIG_NAME):  # copies (the same bytes, not serialized again), never through a link
        if not (final / name).is_file():
            continue
        tmp = out / f".{name}.tmp"
        unlink_file_or_link(tmp)
        try:
            with naming_the_file(out / name):
                shutil.copyfile(final / name, tmp)
            os.replace(tmp, out / name)
        except BaseException:  # a full disk: no half copy stays (the checkpoint itself is complete)
            tmp.unlink(missing_ok=True)
            raise


def optimizer_state_dict(model, optimizer: torch.optim.Optimizer, names: list[str], *, sharded: bool) -> dict:
    """The full optimizer state keyed by parameter name: ``{"state": {name: {...}}, "param_groups": [{...,
    "params": [name, ...]}]}``, the same layout in every launch mode.

    ``names`` are the parameter names in the optimizer's order (unsharded runs). With ``sharded`` (FSDP2) the state is
    gathered by ``torch.distributed.checkpoint``, a collective call; only rank 0 receives it (others get ``{}``).
    """
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = optimizer.state_dict()
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}


def load_optimizer_state_dict(model, optimizer: torch.optim.Optimizer, state: dict, names: list[str], *,
                              sharded: bool) -> None:
    """Load a state made by ``optimizer_state_dict`` (in any launch mode); raises ValueError naming the parameters
    when the checkpoint's optimizer covers other parameters than this run trains."""
    saved = [n for g in state["param_groups"] for n in g["params"]]
    if not all(isinstance(n, str) for n in saved):
        raise ValueError("the checkpoint's optimizer state is keyed by parameter index (written before lorweb_fast "
                         "keyed it by name); resume is not possible from it, start a new run from its weights")
    if sorted(saved) != sorted(names):
        missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        raise ValueError(f"the checkpoint's optimizer state does not match the trained parameters: missing "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                         f"{extra[:3]}{'...' if len(extra) > 3 else ''}")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    index = {n: i for i, n in enumerate(names)}
    optimizer.load_state_dict({
        "state": {index[n]: s for n, s in state["state"].items()},
        # torch pairs the saved groups' ids with this optimizer's parameters in order: list them in this order
        "param_groups": [dict(g, params=sorted(index[n] for n in g["params"])) for g in state["param_groups"]]})


def quantization_config(quantize_base: str, compute_dtype: torch.dtype = torch.bfloat16):
    """diffusers ``BitsAndBytesConfig`` for ``quantize_base`` "int8" (LLM.int8, ``Linear8bitLt``) or "nf4" (4-bit
    NormalFloat, ``Linear4bit`` computing in ``compute_dtype``)."""
    from diffusers import BitsAndBytesConfig

    if quantize_base == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize_base == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    raise ValueError(f"quantize_base must be 'int8' or 'nf4' for a quantization config, got {quantize_base!r}")


def _import_quanto():
    """optimum.quanto's ``quantize``, ``freeze``, ``qfloat8``; ImportError naming the package when it is missing."""
    try:
        from optimum.quanto import freeze, qfloat8, quantize
    except ImportError as exc:
        raise MissingDependencyError(f"--quantize-base qfloat8 needs optimum-quanto, the library the official run "
                                     f"quantizes with (pip install 'lorweb_fast[quanto]' or 'optimum-quanto>=0.2.7'): "
                                     f"{exc}") from None
    return quantize, freeze, qfloat8


def quantize_qfloat8(pipe, device: Optional[torch.device] = None) -> None:
    """Quantize ``pipe.transformer`` and ``pipe.text_encoder_2`` (T5) in place to fp8 weights with optimum-quanto,
    as the official run does with ``quantize: true`` (NVlabs/LoRWeB extensions_built_in/flux_kontext.py
    ``FluxKontextModel.load_model``: each model moved to the quantize device, ``quantize(model, weights=qfloat8)``
    over all its submodules, then ``freeze(model)``; ``quantize_te`` defaults to ``quantize``). Every linear of those
    models becomes an optimum-quanto ``QLinear`` (float8_e4m3fn weights, one scale per output row); the LoRWeB layers
    injected afterwards wrap them through the delta-only path. ``device``: where to quantize (the official quantize
    device is the training device); None quantizes where the models are.

    Checked before anything changes: optimum-quanto importable, neither model quantized already, no LoRWeB layers
    (quantize first, then inject: quanto would quantize the LoRWeB query projections and wrapped bases too). An
    error while moving or quantizing (out of memory, an interrupt) puts both models back as they were (the same
    module, parameter and buffer objects, on their devices, with their values) before it propagates: the original
    weights are kept until the call ends, freed module by module where they were moved to ``device`` (the GPU then
    holds no more than without the rollback) and kept whole where they already were on it (quantizing in place
    holds the unquantized weights and the fp8 ones at once, about 1.5x the bf16 weights).

    The models are quantized in the dtypes they have; the official run casts them to the training dtype first
    (``.to(device, dtype=dtype)``), which differs only where a model keeps modules in another dtype: T5 loaded in
    fp16 keeps its ``wo`` layers in fp32 (transformers' ``_keep_in_fp32_modules``); bf16, the official dtype, has
    none."""
    quantize, freeze, qfloat8 = _import_quanto()
    from .model import lorweb_layers

    models = {}
    for name in QFLOAT8_COMPONENTS:
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"quantize_qfloat8 needs a FluxKontextPipeline with a {name}, got {type(pipe).__name__} "
                             f"whose {name} is {type(module).__name__}")
        if quantization_kind(module) is not None:
            raise ValueError(f"the pipeline's {name} is quantized already ({quantization_kind(module)})")
        if lorweb_layers(module):
            raise ValueError(f"the pipeline's {name} has LoRWeB layers: quantize the base before injecting them "
                             "(quanto would quantize their query projections and wrapped base layers too)")
        models[name] = module
    snapshot = _ModuleTreeSnapshot(list(models.values()))
    try:
        for module in models.values():
            if device is not None:
                module.to(device)
            quantize(module, weights=qfloat8)
            for sub in list(module.modules()):  # freeze(module), one quantized module at a time
                if type(sub).__module__.startswith("optimum.quanto") and hasattr(sub, "freeze"):
                    replaced = list(sub._parameters.values())
                    freeze(sub)
                    kept = {id(p) for p in sub._parameters.values()}
                    snapshot.release(p for p in replaced if p is not None and id(p) not in kept)
    except BaseException:
        snapshot.restore()
        raise


class _ModuleTreeSnapshot:
    """What ``quantize_qfloat8`` changes, to undo it: every module's own children, parameters and buffers (the
    objects) and each parameter's data tensor (``Module.to`` swaps a parameter's ``.data`` in place)."""

    def __init__(self, roots: list):
        self.modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers))
                        for root in roots for m in root.modules()]
        self.data = {}
        for _, _, params, _ in self.modules:
            for p in params.values():
                if p is not None:
                    self.data.setdefault(id(p), (p, p.data))

    def release(self, params) -> None:
        """Parameters a quantized module no longer holds: their data goes back to the original tensor, so a copy
        moved to the quantize device is freed now rather than at the end."""
        for p in params:
            entry = self.data.get(id(p))
            if entry is not None:
                p.data = entry[1]

    def restore(self) -> None:
        for m, children, params, buffers in self.modules:
            for store, saved in ((m._modules, children), (m._parameters, params), (m._buffers, buffers)):
                store.clear()
                store.update(saved)
        for p, data in self.data.values():
            p.data = data


def quantization_kind(module: torch.nn.Module) -> Optional[str]:
    """Who quantized ``module``: "quanto" (optimum-quanto modules), "bitsandbytes" (bitsandbytes modules), "torchao"
    (torchao weight tensors, e.g. from ``quantize_``), "gguf" (diffusers' GGUF layers), else for a diffusers
    ``is_quantized`` model its quantization config's ``quant_method`` (e.g. diffusers' own FLUX fp8 loader), or None
    for a module tree without quantized layers."""
    homes = {type(m).__module__ for m in module.modules()} | {type(p).__module__ for p in module.parameters()}
    for prefix, kind in (("optimum.quanto", "quanto"), ("bitsandbytes", "bitsandbytes"), ("torchao", "torchao"),
                         ("diffusers.quantizers.gguf", "gguf")):
        if any(h.startswith(prefix) for h in homes):
            return kind
    if getattr(module, "is_quantized", False):
        config = getattr(getattr(module, "hf_quantizer", None), "quantization_config", None)
        method = getattr(config, "quant_method", None)
        return str(getattr(method, "value", method) or "an unknown diffusers quantizer")
    return None


def _check_bitsandbytes_device(quantize_base: str) -> None:
    if not torch.cuda.is_available():
        raise ValueError(f"--quantize-base {quantize_base} needs a CUDA GPU: diffusers' bitsandbytes quantizer does "
                         "not quantize on the CPU (pass --quantize-base none, or qfloat8 for the official "
                         "optimum-quanto fp8 quantization, which runs on a CPU too)")
    require("bitsandbytes", f"--quantize-base {quantize_base}", alternative="pass --quantize-base none or qfloat8")


def _check_optimizer_package(cfg: TrainConfig) -> None:
    """MissingDependencyError before anything loads (or an old run is deleted) when the optimizer's package cannot
    be imported: bitsandbytes for "adamw8bit" (the official default)."""
    if cfg.optimizer == "adamw8bit":
        require("bitsandbytes", "optimizer adamw8bit (--optimizer adamw8bit, the official default)",
                alternative="train with --optimizer adamw (torch's AdamW: about 6 more bytes of optimizer state per "
                            "trained parameter)")


@holding(_locks.LOADING)
def load_training_pipeline(model: Union[str, Path], dtype: torch.dtype, quantize_base: str = "none",
                           device: Optional[torch.device] = None):
    """The FluxKontextPipeline to train on.

    ``quantize_base``: "qfloat8" loads the pipeline in ``dtype`` and quantizes its transformer and T5 on ``device``
    with optimum-quanto as the official run (``quantize_qfloat8``; works on a CPU too); "int8" / "nf4" load the
    transformer by stock diffusers with a bitsandbytes ``quantization_config`` (needs a CUDA GPU: diffusers'
    bitsandbytes quantizer refuses to quantize without one). The LoRWeB layers then wrap the quantized linears
    (delta-only path)."""
    from .flux import base_model_loaded, load_kontext_pipeline

    if quantize_base == "none":
        return load_kontext_pipeline(model, dtype)
    if quantize_base == "qfloat8":
        _import_quanto()  # before loading anything
        pipe = load_kontext_pipeline(model, dtype)
        quantize_qfloat8(pipe, device)
        return pipe
    _check_bitsandbytes_device(quantize_base)
    FluxKontextPipeline, FluxTransformer2DModel = diffusers_classes("FluxKontextPipeline", "FluxTransformer2DModel")

    # dtype=, not the torch_dtype= every diffusers we admit (0.40 on) deprecates
    transformer = base_model_loaded(model, lambda: FluxTransformer2DModel.from_pretrained(
        model, subfolder="transformer", quantization_config=quantization_config(quantize_base, dtype), dtype=dtype))
    return base_model_loaded(model, lambda: FluxKontextPipeline.from_pretrained(model, transformer=transformer,
                                                                                dtype=dtype))


def _quanto_weight_types(module: torch.nn.Module) -> set[str]:
    """Names of the optimum-quanto weight types in ``module`` ("qfloat8_e4m3fn", "qint8", ...)."""
    return {m.weight_qtype.name for m in module.modules() if getattr(m, "weight_qtype", None) is not None}


def _check_given_quantization(pipe, quantize_base: str) -> None:
    """A pipeline passed to ``train`` must already be quantized the way ``quantize_base`` says (not checked for
    "none"): bitsandbytes layers for "int8" / "nf4"; for "qfloat8", the transformer and T5 with optimum-quanto
    qfloat8 weights only, as ``quantize_qfloat8`` leaves them (the official ``quantize: true``)."""
    if quantize_base == "none":
        return
    want = "quanto" if quantize_base == "qfloat8" else "bitsandbytes"
    how = ("quantize it with lorweb_fast.training.quantize_qfloat8(pipe) before training" if want == "quanto"
           else "load it with a diffusers BitsAndBytesConfig (lorweb_fast.training.quantization_config)")
    for name in (QFLOAT8_COMPONENTS if want == "quanto" else ("transformer",)):
        module = getattr(pipe, name)
        got = quantization_kind(module)
        if got != want:
            raise ValueError(f"quantize_base={quantize_base!r} but the given pipeline's {name} is "
                             f"{'not quantized' if got is None else 'quantized by ' + got}: {how}")
        if want == "quanto":
            kinds = _quanto_weight_types(module)
            if kinds - {_import_quanto()[2].name}:
                raise ValueError(f"quantize_base='qfloat8' but the given pipeline's {name} has optimum-quanto "
                                 f"{sorted(kinds)} weights, not qfloat8 only: {how}")


def _check_fsdp(accelerator, cfg: TrainConfig) -> None:
    """Clear errors for FSDP setups this trainer cannot checkpoint or step."""
    version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise ValueError(f"lorweb-fast train supports accelerate's FSDP2 (fsdp_version: 2), got fsdp_version={version}:"
                         " set `fsdp_version: 2` in the accelerate config or pass --fsdp_version 2")
    if cfg.optimizer == "adamw8bit":
        raise ValueError("bitsandbytes' 8-bit AdamW cannot step FSDP2's sharded (DTensor) parameters; pass "
                         "--optimizer adamw under FSDP (the LoRWeB optimizer state is small and sharded anyway)")
    if cfg.quantize_base != "none":
        raise ValueError(f"--quantize-base {cfg.quantize_base} cannot be sharded by FSDP2 (quantized weights are "
                         "not DTensors); use DDP or one process with a quantized base")
    if cfg.adapter_precision == "fp32" and cfg.mixed_precision in ("bf16", "fp16"):
        # accelerate's FSDP2 policy gathers every parameter of a block in the compute dtype (param_dtype), the
        # LoRWeB fp32 masters included: the official fp32 arithmetic would silently run on rounded weights
        raise ValueError(f"--adapter-precision fp32 cannot hold under FSDP2 with --mixed-precision "
                         f"{cfg.mixed_precision}: FSDP2 gathers each block's parameters, the LoRWeB ones included, in "
                         f"{cfg.mixed_precision}; use DDP (or one process) for the official fp32 adapter arithmetic, "
                         "or --adapter-precision bf16")


def _reduce_gradients_in_fp32(plugin) -> None:
    """accelerate's FSDP2 mixed-precision policy reduces gradients in the compute dtype (``reduce_dtype`` = bf16 /
    fp16): the LoRWeB gradients (the only ones: the transformer is frozen) would be averaged over the processes in
    bf16. Set ``reduce_dtype`` to fp32, as DDP averages them; the parameters are still gathered in the compute dtype
    (``param_dtype``). A reduce-scatter of the LoRWeB gradients only, so the fp32 traffic is small."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = getattr(plugin, "mixed_precision_policy", None)
    if not isinstance(policy, MixedPrecisionPolicy):
        return
    # reduce_dtype None reduces in param_dtype (torch's MixedPrecisionPolicy): bf16 / fp16 as well
    reduce_dtype = policy.param_dtype if policy.reduce_dtype is None else policy.reduce_dtype
    if reduce_dtype not in (None, torch.float32):
        plugin.mixed_precision_policy = dataclass_replace(policy, reduce_dtype=torch.float32)


def _fsdp_units(model) -> list:
    """The sub-modules of ``model`` (itself included) that FSDP2 shards as units; [] when it is not sharded (or
    torch is built without torch.distributed)."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _warn_if_layers_unwrapped(model) -> None:
    """Under FSDP2, warn when LoRWeB layers are not inside a wrapped sub-module (then the root unit gathers the whole
    transformer at once: correct, but it needs the memory FSDP is meant to save)."""
    from torch.distributed.fsdp import FSDPModule

    units = [name for name, m in model.named_modules() if name and isinstance(m, FSDPModule)]
    loose = [name for name in lorweb_layers(model) if not any(name.startswith(u + ".") for u in units)]
    if loose:
        warn(f"FSDP: {len(loose)} LoRWeB layers (e.g. {loose[0]}) are not inside a wrapped transformer block, "
             "so the whole transformer is gathered at once; launch with --fsdp_auto_wrap_policy "
             "TRANSFORMER_BASED_WRAP (blocks from the model's _no_split_modules)")


def _check_gradients(grad_norm, model, step: int, cfg: TrainConfig, *, scaled: bool = False) -> None:
    """Raise before the optimizer step when the gradient norm is not finite (the parameters stay as they were):
    naming the parameters whose gradients are not finite on this rank. With a loss scaler (fp16) an overflow is
    expected now and then: the scaler skips that step and lowers the scale, so nothing is raised. ``grad_norm`` is
    the global norm (every rank sees the same value, so every rank raises together)."""
    if scaled:
        return
    norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if math.isfinite(norm):
        return
    bad = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            if not torch.isfinite(g).all():
                bad.append(name)
    hint = ("; cuDNN attention is on (--cudnn-attention), whose backward returned NaN on an H200 with torch 2.11: "
            "try without it") if cfg.cudnn_attention else ""
    raise FloatingPointError(
        f"the gradient norm is {norm} at step {step}; the optimizer step was not taken. Non-finite gradients in "
        f"{len(bad)} parameters on this rank" + (f" (e.g. {', '.join(bad[:3])})" if bad else "") +
        f"; lower the learning rate or use --mixed-precision no to find the cause{hint}")


def _reshard_without_backward(model) -> None:
    """Reshard every FSDP2 unit after a forward whose backward is skipped (a NaN loss): FSDP2 keeps the root unit's
    parameters unsharded after its forward and reshards them only in the post-backward, so without this the module
    would still hold the gathered tensors instead of the DTensors the optimizer and the checkpoint gather expect."""
    for unit in _fsdp_units(model):
        unit.reshard()


def cast_block_inputs_in_recompute(model) -> int:
    """Make FSDP2's input cast hold when activation checkpointing recomputes a sharded block.

    FSDP2 casts a unit's floating-point inputs to its ``MixedPrecisionPolicy.param_dtype`` in its pre-forward hook,
    but skips that hook while the backward pass runs (the recompute of a checkpointed block happens then). A block
    whose inputs arrive in another dtype (FLUX's rotary embedding is computed in fp32 outside the blocks) then
    recomputes with fp32 inputs what it first ran with bf16 ones, and ``torch.utils.checkpoint`` refuses the
    mismatch. This adds, after FSDP's own hook, a hook that applies the same cast: a no-op in the forward (already
    cast), the missing cast in the recompute. Returns the number of units hooked."""
    from torch.distributed.utils import _apply_to_tensors  # what FSDP casts with (dataclasses, namedtuples, dicts)

    hooked = 0
    for module in _fsdp_units(model):
        if hasattr(module, "_lorweb_recompute_cast"):
            continue  # a second call (train() again on the same model) adds nothing
        policy = module._get_fsdp_state()._mp_policy
        dtype = policy.param_dtype
        if dtype is None or not policy.cast_forward_inputs:
            continue

        def cast(t, dtype=dtype):
            return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t

        def hook(_module, args, kwargs, cast=cast):
            return _apply_to_tensors(cast, args), _apply_to_tensors(cast, kwargs)

        module._lorweb_recompute_cast = module.register_forward_pre_hook(hook, with_kwargs=True)
        hooked += 1
    return hooked


def _loss_rows(log_path: Union[str, Path]) -> list[tuple[str, dict]]:
    """(line, row) of every complete line of a ``loss.jsonl`` log: a line cut short (the log is appended every step;
    a full disk or a power loss can tear the last one) is left out, with a warning."""
    rows, torn = [], 0
    for line in Path(log_path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = loads_json(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(row, dict) and "step" in row and "loss" in row:
            rows.append((line, row))
        else:
            torn += 1
    if torn:
        warn(f"{log_path}: {torn} incomplete line(s) left out (a run stopped while writing it)")
    return rows


def _refresh_loss_plot(draw: bool, log_path: Path, png_path: Path) -> None:
    """loss.png redrawn from the log as it stands (``draw``), else removed: never a plot of other steps (an earlier
    run's, or steps past the checkpoint a run resumes from) beside the log."""
    if draw:
        plot_loss(log_path, png_path)
    else:
        png_path.unlink(missing_ok=True)


@holding(_locks.DRAWING)
def plot_loss(log_path: Union[str, Path], png_path: Union[str, Path]) -> Path:
    """Plot the loss of a ``loss.jsonl`` log (raw and running mean) to a PNG; steps skipped for a NaN loss (logged
    with loss null) are marked with red vertical lines."""
    from matplotlib.figure import Figure  # not pyplot: no global figure registry, the caller's backend untouched

    rows = [row for _, row in _loss_rows(log_path)]
    skipped = [r["step"] for r in rows if r["loss"] is None]
    rows = [r for r in rows if r["loss"] is not None and r["loss"] > 0]  # a log axis
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    window = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1])
              for i in range(len(loss))]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"running mean ({window})")
    for i, s in enumerate(skipped):
        ax.axvline(s, color="red", alpha=0.4, lw=0.8, label=f"NaN loss, no update ({len(skipped)})" if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss")
    if loss:
        ax.set_yscale("log")
    ax.legend()
    ax.set_title("LoRWeB training loss")
    fig.tight_layout()
    return save_figure_atomically(fig, png_path, dpi=120)  # a kill mid-write keeps the previous plot


# ----------------------------------------------------------------------------------------------------- train
def _make_optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.adam_eps,
                                   weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


def batch_query(encoder, batch: dict, device) -> torch.Tensor:
    """(B, query_dim) analogy queries of a batch. With the encoder's ``query_source="grid"`` (official,
    SDTrainer.py ``before_unet_predict``): ``query_from_grid(..., crops="training")`` on the control grids
    ``batch["control"]`` in the encoder's query mode: the official trainer passes the control *tensor*, whose crops
    have side H // 2 (inference.py passes a PIL grid: side W // 2; the same for square cells). With ``"images"``
    (not official): the a, a' and b cells of the target grids, each encoded separately."""
    from .flux import grid_cells

    if getattr(encoder, "query_source", "grid") == "grid":
        return encoder.query_from_grid(batch["control"], crops="training").to(device)
    cells = [grid_cells(g) for g in batch["target"]]
    return encoder([c[0] for c in cells], [c[1] for c in cells], [c[2] for c in cells]).to(device)


#: the official training grid: 1000 timesteps linspace(1000, 1, 1000); indices are drawn from [0, 998]
#: (ai-toolkit ``torch.randint(0, max_denoising_steps - 1)``, so t = 1 is never drawn)
NUM_TRAIN_TIMESTEPS = 1000


def official_timesteps() -> torch.Tensor:
    """(1000,) float32 training timesteps 1000, 999, ..., 1 (``CustomFlowMatchEulerDiscreteScheduler``)."""
    return torch.linspace(NUM_TRAIN_TIMESTEPS, 1, NUM_TRAIN_TIMESTEPS, dtype=torch.float32)


def official_timestep_weights() -> torch.Tensor:
    """(1000,) float32 loss weight per grid index of ``timestep_type: weighted``: the bell exp(-2 ((i - 500) / 1000)^2)
    shifted to a minimum of 0 (at index 0, t = 1000) and scaled to mean 1."""
    i = torch.arange(NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
    bell = torch.exp(-2.0 * ((i - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)
    bell = bell - bell.min()
    return bell * (NUM_TRAIN_TIMESTEPS / bell.sum())


def sample_timesteps(cfg: TrainConfig, batch_size: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, weight), both (B,) float32 on the CPU: t in (0, 1] (= timestep / 1000) and the per-sample loss weight of
    ``cfg.timestep_type``. The official grids ("weighted", "linear") are drawn in float32 whatever torch's default
    dtype; diffusers' schemes draw as diffusers does (in the default dtype), then cast."""
    if cfg.timestep_type in ("weighted", "linear"):
        index = torch.randint(0, NUM_TRAIN_TIMESTEPS - 1, (batch_size,), generator=generator)
        t = official_timesteps()[index] / NUM_TRAIN_TIMESTEPS
        weight = (official_timestep_weights()[index] if cfg.timestep_type == "weighted"
                  else torch.ones(batch_size, dtype=torch.float32))
        return t, weight
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    t = compute_density_for_timestep_sampling(cfg.weighting_scheme, batch_size, cfg.logit_mean, cfg.logit_std,
                                              cfg.mode_scale, generator=generator)
    return t.float(), compute_loss_weighting_for_sd3(cfg.weighting_scheme, t).float()


def _encode_images(pipe, images, generator, *, sample: bool) -> torch.Tensor:
    """PIL grids -> VAE latents (B, C, h, w), shifted and scaled as the Kontext pipeline does."""
    vae = pipe.vae
    w, h = images[0].size
    pixels = pipe.image_processor.preprocess(images, h, w).to(vae.device, vae.dtype)
    dist = vae.encode(pixels).latent_dist
    latents = dist.sample(generator) if sample else dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def flow_matching_loss(transformer, pipe, batch: dict, query: torch.Tensor, cfg: TrainConfig,
                       generator: torch.Generator, *, per_forward_query: bool = False) -> torch.Tensor:
    """One rectified-flow loss on a batch: x_t = (1 - t) x0 + t noise, target noise - x0, MSE over the whole target
    grid (the noisy tokens), weighted per sample by ``sample_timesteps``, with the control grid's packed latents
    appended as Kontext context tokens (position ids first coordinate 1).

    ``batch``: B samples as ``_collate`` makes them ({"control", "target": B PIL grids of one size, "caption",
    "name": B strings}); ``query``: (B, query_dim) analogy queries on the training device (``batch_query``);
    ``transformer``: ``pipe.transformer`` or its DDP / accelerate wrapper. Sets the query on the LoRWeB layers (with
    autograd, ``per_forward_query`` under FSDP2) and returns the 0-dim fp32 loss, differentiable in the LoRWeB
    parameters."""
    (FluxKontextPipeline,) = diffusers_classes("FluxKontextPipeline")

    device = query.device
    bsz = len(batch["target"])
    with torch.no_grad():
        drop = torch.rand(bsz, generator=generator, dtype=torch.float32) < cfg.caption_dropout
        prompts = ["" if d else c for d, c in zip(drop.tolist(), batch["caption"])]
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                             max_sequence_length=cfg.max_sequence_length)
        x0 = _encode_images(pipe, batch["target"], generator, sample=True).float()
        control = _encode_images(pipe, batch["control"], generator, sample=cfg.control_latents == "sample")
    _, c, h, w = x0.shape
    # drawn on the CPU (the official generator); to a CUDA device copied without a stream synchronisation
    # (non_blocking: CUDA stages a pageable source before the call returns, so the values are the same; not on other
    # device types, where a non-blocking copy of a temporary can read it after it is freed)
    non_blocking = device.type == "cuda"
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device, non_blocking=non_blocking)
    t, weight = sample_timesteps(cfg, bsz, generator)
    t = t.to(device, non_blocking=non_blocking)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1.0 - tt) * x0 + tt * noise
    pack = FluxKontextPipeline._pack_latents
    dtype = pipe.transformer.dtype
    noisy_tokens = pack(x_t, bsz, c, h, w).to(dtype)
    context_tokens = pack(control, bsz, c, h, w).to(dtype)
    ids = FluxKontextPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, device, dtype)
    context_ids = ids.clone()
    context_ids[..., 0] = 1
    guidance = torch.full((bsz,), cfg.guidance_scale, device=device, dtype=torch.float32)
    if cfg.adapter_precision == "fp32":  # official: the query cast to the fp32 parameters, no autocast
        with torch.autocast(device.type, enabled=False):
            set_query(pipe.transformer, query.float(), per_forward=per_forward_query)
    else:
        set_query(pipe.transformer, query, per_forward=per_forward_query)
    pred = transformer(hidden_states=torch.cat([noisy_tokens, context_tokens], dim=1), timestep=t.to(dtype),
                       guidance=guidance, pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                       txt_ids=text_ids, img_ids=torch.cat([ids, context_ids], dim=0), return_dict=False)[0]
    pred = pred[:, :noisy_tokens.shape[1]].float()
    target = pack(noise - x0, bsz, c, h, w)
    weight = weight.to(device, non_blocking=non_blocking).view(-1, 1, 1)
    return (weight * (pred - target) ** 2).mean()


@holding(_locks.TRAINING)
def train(cfg: TrainConfig, *, pipe=None, encoder=None,
          step_callback: Optional[Callable[[int, float], None]] = None) -> dict:
    """Train LoRWeB on ``cfg.data``; returns ``{"step": last step, "out": out dir, "loss": last loss (NaN when
    that step was skipped), "transformer": the trained transformer, "nan_loss_steps": steps whose NaN loss made no
    update (``cfg.nan_loss="skip"``)}`` (the transformer not wrapped by DDP; under FSDP2 sharded in place, its
    parameters DTensors that ``lorweb_state_dict`` gathers).

    ``pipe`` (a FluxKontextPipeline) and ``encoder`` (an AnalogyEncoder) default to ``cfg.model`` and
    ``cfg.encoder`` loaded with ``from_pretrained``. A ``pipe`` whose transformer already holds LoRWeB layers
    trains them; they must have ``cfg``'s settings (the saved config.yaml is written from ``cfg``). The
    transformer gets its own forward back when training ends (accelerate's mixed precision replaces it in place).
    ``step_callback(step, loss)`` runs after every step (the loss is NaN for a skipped one).

    A caller's ``pipe`` is handed back with the transformer's train/eval mode and gradient checkpointing as found,
    and the VAE's and text encoders' ``requires_grad`` flags; on success its transformer is as ``inject_lorweb``
    leaves one (only the LoRWeB tensors require grad). On failure the transformer's flags are put back too and the
    LoRWeB layers this call injected are removed again (under FSDP2, whose sharding replaced the parameters, neither
    is done); layers the caller injected keep the updates made before the failure (the last checkpoint under
    ``cfg.out`` holds a known state) and, as on success, their fp32 master tensors and ``adapter_precision``. Either
    way no LoRWeB parameter keeps a ``.grad`` and no layer keeps the last step's coefficients (``set_query`` before
    generating); gradients a caller left on them are dropped before the first step. The models stay on the training
    device. In a single process, accelerate's process-wide state is as ``train`` found it when it returns (what this
    call set up is dropped). It runs with autograd on, also when called under ``torch.no_grad()`` or
    ``torch.inference_mode()``.

    The main process holds ``cfg.out/.lorweb-train.lock`` (``RUN_LOCK_NAME``) while it trains: a second run into the
    same folder (a job started twice, a requeued job while the old one still runs) is refused with a ValueError
    naming the process that holds it, before it reads or changes anything there. A killed run's lock is released by
    the kernel.
    """
    from .cli import library_progress_bars

    callers = None if pipe is None else _CallersPipeline(pipe)  # recorded before train() changes anything
    accelerate_before = _accelerate_state()
    lock = FolderLock(cfg.out, RUN_LOCK_NAME, "training run")
    try:  # progress=False: no bar at all, diffusers' and transformers' loading bars included (as --quiet)
        # with autograd on also when called under no_grad / inference_mode (the caller's mode is back afterwards)
        with _reports_from_main_only(), library_progress_bars(enabled=bool(cfg.progress)), \
                torch.inference_mode(False), torch.enable_grad():
            result = _train(cfg, pipe, encoder, step_callback, lock)
    except BaseException:
        lock.release()
        if callers is not None:
            callers.restore(failed=True)
        _restore_single_process_accelerate_state(accelerate_before)
        raise
    lock.release()
    if callers is not None:
        callers.restore(failed=False)
    _restore_single_process_accelerate_state(accelerate_before)
    return result


@contextlib.contextmanager
def _writing_step(step: int):
    """An OSError inside (a full disk while the loss log or a checkpoint is written) carries ``lorweb_step``, which
    the command line names beside the newest checkpoint to resume from."""
    try:
        yield
    except OSError as exc:
        exc.lorweb_step = step
        raise


def _accelerate_state() -> tuple:
    """Copies of accelerate's process-wide state dicts (``PartialState``, ``AcceleratorState``, ``GradientState``)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    return tuple(dict(getattr(cls, "_shared_state", None) or {})
                 for cls in (PartialState, AcceleratorState, GradientState))


def _restore_single_process_accelerate_state(before: tuple) -> None:
    """Put accelerate's process-wide state back as ``train`` found it (``_accelerate_state``), so the caller's
    session is as before (a later ``Accelerator(mixed_precision=...)`` of the caller's is set up afresh instead of
    failing with "AcceleratorState has already been initialized" or keeping this run's precision; a state of the
    caller's that ``_single_process_precision`` replaced comes back). Under a launcher (a process group) it is left
    to the launcher."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for cls, state in zip((PartialState, AcceleratorState, GradientState), before):
        shared = getattr(cls, "_shared_state", None)
        if isinstance(shared, dict):
            shared.clear()
            shared.update(state)


class _CallersPipeline:
    """What ``train`` changes on a caller's pipeline and puts back: the transformer's training mode and gradient
    checkpointing, the train / eval modes of the VAE and the text encoders (``train`` runs them in eval mode), the
    ``requires_grad`` flags of their parameters and, after a failure, of the transformer's, and the LoRWeB layers the
    call injected."""

    def __init__(self, pipe):
        self.transformer = pipe.transformer
        self.training = self.transformer.training
        self.modes = [(m, m.training) for name in _PIPELINE_MODELS if name != "transformer"
                      and getattr(pipe, name, None) is not None for m in getattr(pipe, name).modules()]
        self.checkpointing = bool(getattr(self.transformer, "is_gradient_checkpointing", False))
        self.requires_grad = {name: [(p, p.requires_grad) for p in getattr(pipe, name).parameters()]
                              for name in _PIPELINE_MODELS if getattr(pipe, name, None) is not None}
        self.layers = set(lorweb_layers(self.transformer))

    def restore(self, failed: bool) -> None:
        """Put back what was recorded; ``failed``: also the transformer's flags, and remove the injected layers
        (not under FSDP2: its sharding replaced the parameters and wraps the blocks)."""
        sharded = bool(_fsdp_units(self.transformer))
        if failed and not sharded:
            for name, layer in lorweb_layers(self.transformer).items():
                if name not in self.layers:
                    self.transformer.set_submodule(name, layer.base_layer)
        self.transformer.train(self.training)
        for module, flag in self.modes:  # module by module: a caller's mixed modes come back as they were
            module.training = flag
        if self.checkpointing != bool(getattr(self.transformer, "is_gradient_checkpointing", False)):
            if self.checkpointing:
                self.transformer.enable_gradient_checkpointing()
            else:
                self.transformer.disable_gradient_checkpointing()
        for name, flags in self.requires_grad.items():
            if name != "transformer" or (failed and not sharded):
                for p, flag in flags:
                    p.requires_grad_(flag)


_PIPELINE_MODELS = ("vae", "text_encoder", "text_encoder_2", "transformer")  # frozen by train(); moved to its device


@contextlib.contextmanager
def _reports_from_main_only():
    """Under several processes only the main one warns, logs and shows progress bars (the others would repeat the
    same lines: the data scan's warnings, model loading, the NaN summary): on the other processes, warnings, this
    module's log records and diffusers' / transformers' / huggingface_hub's progress bars are off for the block;
    errors still propagate."""
    from accelerate import PartialState

    from .cli import library_progress_bars

    if PartialState(cpu=not torch.accelerator.is_available()).is_main_process:
        yield
        return
    was_disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings(), library_progress_bars(enabled=False):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = was_disabled


def _batches(loader) -> Iterator:
    """``loader``'s batches. An ``AnalogyDataError`` raised in a DataLoader worker (a sample's file that does not
    decode) comes out with its own message again: torch re-raises it in the main process with "Caught
    AnalogyDataError in DataLoader worker process N." and the worker's whole traceback as its message (kept as the
    new error's cause), which the command line would print as one long line.

    The loader's worker processes, their queue threads and pipes are given back when the batches end, stop or
    fail (not when the iterator is collected: an error held by the caller, by ``pytest.raises`` or a notebook's
    ``sys.last_value``, would keep them alive through its traceback)."""
    iterator = iter(loader)
    try:
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except AnalogyDataError as exc:
                original = _worker_error_message(exc)
                if original is None:
                    raise
                # the cause without its traceback, whose frames hold the iterator (its message holds the worker's)
                raise AnalogyDataError(original) from exc.with_traceback(None)
            yield batch
    finally:
        if hasattr(iterator, "_shutdown_workers"):  # (a multi-process iterator's own cleanup)
            iterator._shutdown_workers()
        del iterator  # (the traceback holds this frame)


def _worker_error_message(exc: Exception) -> Optional[str]:
    """The message of the exception a DataLoader worker raised, from the text torch re-raised ``exc`` with (see
    ``torch._utils.ExceptionWrapper.reraise``); None when ``exc`` is not such a re-raise."""
    text = str(exc)
    if not (text.startswith(f"Caught {type(exc).__name__} in DataLoader worker process")
            and "\nOriginal Traceback" in text):
        return None
    last = max(text.rfind(f"\n{name}: ") for name in (type(exc).__name__,
                                                      f"{type(exc).__module__}.{type(exc).__qualname__}"))
    if last < 0:
        return None
    return text[text.index(": ", last) + 2:].rstrip("\n")


def _prepare_output_in_order(cfg: TrainConfig, accelerator,
                             lock: FolderLock) -> tuple[Optional[Path], Optional[dict]]:
    """``prepare_output`` on the main process first, once it holds ``lock`` (``_lock_run_folder``; it alone deletes
    a killed run's temporary files; ``--overwrite`` deletes the old run later, in ``_train``, once the models have
    loaded), then on the others, which only read ``cfg.out`` once it is done (reading it while the main process
    deletes it could fail); an error of the main process is raised on every rank, so none waits for it."""
    if accelerator.num_processes == 1:
        _lock_run_folder(cfg, lock)
        return prepare_output(cfg, main_process=True, clear=False)
    from accelerate.utils import broadcast_object_list

    result, error = (None, None), None
    if accelerator.is_main_process:
        try:
            _lock_run_folder(cfg, lock)
            result = prepare_output(cfg, main_process=True, clear=False)
        except Exception as exc:  # raised below on every rank
            error = exc
    error = broadcast_object_list([error], from_process=0)[0]  # the other ranks wait here for the main one
    if error is not None:
        if not accelerator.is_main_process:  # a copy: the command line prints the main process's error once
            setattr(error, REPORTED_BY_MAIN_PROCESS, True)
        raise error
    if not accelerator.is_main_process:
        result = prepare_output(cfg, main_process=False, clear=False)
    return result


def _lock_run_folder(cfg: TrainConfig, lock: FolderLock) -> None:
    """Take the run folder's lock (creating ``cfg.out`` when missing; ``FolderLock.release`` removes it again if
    the run writes nothing). An ``out`` that is a file is left to ``prepare_output``'s error; a folder that cannot
    be created or locked is a ValueError naming it."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        return
    try:
        lock.acquire()
    except FolderInUseError as exc:
        raise FolderInUseError(f"--out {exc}") from None
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the folder or its lock file {RUN_LOCK_NAME} ({exc})") from None


def _single_process_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state whose mixed precision cannot change: a second ``train()`` in one
    Python session (a notebook) with another ``mixed_precision`` failed with "AcceleratorState has already been
    initialized ... restart your runtime". In a single process (no process group) that state is dropped when its
    precision differs, so the new run's Accelerator sets it up again; under a launcher it is left alone."""
    from accelerate.state import AcceleratorState

    state = getattr(AcceleratorState, "_shared_state", None)
    if not state or state.get("_mixed_precision", mixed_precision) == mixed_precision:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    AcceleratorState._reset_state()


def _train(cfg: TrainConfig, pipe, encoder, step_callback, lock: FolderLock) -> dict:
    """``train``'s body (``pipe`` and ``encoder`` may be None)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from ._progress import progress_bar

    cfg.validate()
    dataset = AnalogyFolder(cfg.data, long_edge=cfg.long_edge, skip_bad=cfg.skip_bad, layout=cfg.layout,
                            bidirectional=cfg.bidirectional, resize=cfg.resize,
                            bucket_divisibility=cfg.bucket_divisibility,
                            missing_caption=cfg.missing_caption)  # fail before loading models
    dataset.skip_query_crop_problems(cfg.query_mode, cfg.query_source, cfg.skip_bad)
    _single_process_precision(cfg.mixed_precision)
    # no GPU: run on CPU, and under `accelerate launch` / torchrun as a gloo process group (MULTI_CPU)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.accelerator.is_available())
    if accelerator.gradient_accumulation_steps != 1:
        # accelerator.backward would divide every loss by it while the loop steps the optimizer every step
        raise ValueError(f"accelerate is set to accumulate gradients over {accelerator.gradient_accumulation_steps} "
                         "steps (the ACCELERATE_GRADIENT_ACCUMULATION_STEPS environment variable or a DeepSpeed "
                         "config); the LoRWeB trainer steps the optimizer every step, as the official run, so every "
                         "gradient would only be divided by it: unset it and raise --batch-size or the number of "
                         "processes instead")
    device = accelerator.device
    out = Path(cfg.out)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded:
        _check_fsdp(accelerator, cfg)  # before loading any model
        _reduce_gradients_in_fp32(accelerator.state.fsdp_plugin)
    if pipe is not None and lorweb_layers(pipe.transformer):  # before prepare_output may delete an old run
        _check_injected_layers(pipe.transformer, cfg, None if encoder is None else encoder.query_dim)
    weight_dtype = DTYPE_NAMES.get(cfg.mixed_precision, torch.float32)  # mixed_precision "no": fp32
    if encoder is None and cfg.query_projection_type == "none":  # key_dim must be its width: known before
        encoder = _build_encoder(cfg, weight_dtype)                 # prepare_output may delete an old run
    if encoder is not None:  # before prepare_output may delete an old run
        _check_encoder_settings(encoder, cfg)
    _check_optimizer_package(cfg)
    # without matplotlib the run trains, logs and saves as usual, without loss.png (an earlier run's is removed at
    # the first checkpoint)
    draw_loss = plotting_available("loss.png") if accelerator.is_main_process else False
    if pipe is not None:
        _check_given_quantization(pipe, cfg.quantize_base)
    elif cfg.quantize_base == "qfloat8":
        _import_quanto()
    elif cfg.quantize_base != "none":
        _check_bitsandbytes_device(cfg.quantize_base)
    global_batch = cfg.batch_size * accelerator.num_processes
    if global_batch > len(dataset):
        what = (f"batch_size (--batch-size) {cfg.batch_size}" if accelerator.num_processes == 1 else
                f"the global batch of {global_batch} (batch_size (--batch-size) {cfg.batch_size} x "
                f"{accelerator.num_processes} processes)")
        if cfg.batching == "mixed" and not cfg.resume:  # a run started before this check resumes (with a warning)
            raise ValueError(f"{what} is larger than the {len(dataset)} training samples: with batching 'mixed' every "
                             "step would repeat samples; lower it")
        warn(f"{what} is larger than the {len(dataset)} training samples: "
             + ("every step repeats samples" if cfg.batching == "mixed" else
                "every step holds at most the samples of one bucket"))
    ckpt, trainer_state = _prepare_output_in_order(cfg, accelerator, lock)  # before loading models
    accelerator.wait_for_everyone()

    if encoder is None:  # the (small) encoder before the base model: a text model, or too few layers for a "...3"
        encoder = _build_encoder(cfg, weight_dtype)  # query mode, is refused before the pipeline loads
    if pipe is None:
        pipe = load_training_pipeline(cfg.model, weight_dtype, cfg.quantize_base, device)
    if cfg.overwrite and ckpt is None:  # the models loaded: only now is the old run deleted (--overwrite)
        accelerator.wait_for_everyone()  # on every rank: a rank whose load fails stops the run before the delete
        if accelerator.is_main_process:
            clear_run(out)
        accelerator.wait_for_everyone()
    encoder.model.to(device)
    for name in _PIPELINE_MODELS:
        module = getattr(pipe, name).requires_grad_(False)
        if name != "transformer":  # frozen, run in eval mode as the official trainer does (T5's dropout off)
            module.eval()
        if not (name == "transformer" and getattr(module, "is_quantized", False)):  # diffusers placed it already
            module.to(device)
    transformer = pipe.transformer
    if lorweb_layers(transformer):  # injected by the caller: they must be what cfg (and so the saved config) says
        _check_injected_layers(transformer, cfg, encoder.query_dim)
    if not lorweb_layers(transformer):
        with global_rng_kept():  # the caller's own RNG states are given back afterwards
            torch.manual_seed(cfg.seed)  # the same initial basis, keys and projections on every rank and every run
            # created and initialised in fp32 (official: AttLoRAModule.__init__ builds its parameters in fp32), not
            # in the base's bf16 and cast afterwards: the fp32 masters do not start on the bf16 grid
            inject_lorweb(transformer, LoRWeBConfig(num_loras=cfg.num_loras, rank=cfg.rank, key_dim=cfg.key_dim,
                                                    query_dim=encoder.query_dim, heads=cfg.heads,
                                                    activation=cfg.activation, reduce=cfg.reduce,
                                                    query_projection_type=cfg.query_projection_type),
                          dtype=torch.float32)
    params, names = [], []
    for layer_name, layer in lorweb_layers(transformer).items():
        for suffix, p in layer.lorweb_tensors().items():
            p.data = p.data.float()  # trainable master weights stay fp32 (layers injected by the caller may not be)
            p.requires_grad_(True)
            params.append(p)
            names.append(f"{layer_name}.{suffix}")
        layer.adapter_precision = "fp32" if cfg.adapter_precision == "fp32" else "auto"
        # query_projection_type "none": the frozen identity projection (not a trained tensor) in fp32 as well, so
        # the query is not rounded to the base dtype before the keys (the official code uses nn.Identity)
        layer.att_lora_to_q.weight.data = layer.att_lora_to_q.weight.data.float()
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = _make_optimizer(params, cfg)
    # recorded so that the checkpoint works from any directory: a local folder as an absolute path, a hub id as is
    encoder_name = recorded_location(getattr(encoder, "name", cfg.encoder))
    model_name = recorded_location(cfg.model)
    metadata = {"encoder": encoder_name, "lorweb.query_mode": cfg.query_mode,
                "lorweb.pooling_type": cfg.pooling_type, "lorweb.query_source": cfg.query_source}
    settings = checkpoint_settings(cfg, encoder_name)

    start_step, data_position = 0, None
    if ckpt is not None:
        was = trainer_state.get("num_processes")  # warned before the load: -W error changes nothing
        if was is not None and was != accelerator.num_processes and accelerator.is_main_process:
            warn(f"resuming a run of {was} process{'' if was == 1 else 'es'} with {accelerator.num_processes}: the "
                 f"data continues where it stopped, but the global batch size changes from {was * cfg.batch_size} "
                 f"to {accelerator.num_processes * cfg.batch_size} samples per step")
        # validated, all or nothing; before sharding. The fp32 masters when the weights file was rounded.
        masters = trainer_state.get("lorweb_master_weights")
        load_lorweb_weights(transformer, masters if masters is not None else ckpt / WEIGHTS_NAME,
                            settings=None if masters is None else {"activation": cfg.activation,
                                                                   "reduce": cfg.reduce, "heads": cfg.heads})
        start_step = int(trainer_state["step"])
        if start_step >= cfg.steps and accelerator.is_main_process:  # --save-dtype may change, but nothing is saved
            from .official_config import SAVE_DTYPES

            saved_dtype = _weights_file_dtype(ckpt / WEIGHTS_NAME)
            if saved_dtype is not None and saved_dtype != SAVE_DTYPES[cfg.save_dtype]:
                warn(f"--save-dtype {cfg.save_dtype}: the run is already at its last step ({start_step}, --steps "
                     f"{cfg.steps}), so nothing is trained or saved and its weights stay in "
                     f"{str(saved_dtype).removeprefix('torch.')}; raise --steps to save new checkpoints in "
                     f"{cfg.save_dtype}")
        # where the data stream stopped (None in checkpoints written before it was recorded: then taken as
        # start_step steps of this run's process count)
        data_position = trainer_state.get("data_position")

    # under FSDP2 accelerate shards the transformer in place (blocks as units, each LoRWeB layer inside its block)
    # and swaps the optimizer's parameters for the sharded ones
    # accelerate replaces the transformer's forward in place (autocast, fp32 outputs); the caller's pipeline gets
    # its own instance attributes back at the end, on success and on failure (accelerate's unwrap_model would also
    # strip the decorators of diffusers' forward, such as apply_lora_scale)
    patched = ("forward", "_original_forward", "_is_accelerate_prepared")
    own_forward = {k: transformer.__dict__[k] for k in patched if k in transformer.__dict__}
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    bar, trainable = None, []
    try:
        model, optimizer = accelerator.prepare(transformer, optimizer)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)  # gradients left by the caller's own backward would join step 1
        if sharded:
            _warn_if_layers_unwrapped(model)
            cast_block_inputs_in_recompute(model)
        if trainer_state is not None:
            load_optimizer_state_dict(model, optimizer.optimizer, trainer_state["optimizer"], names, sharded=sharded)
            if accelerator.scaler is not None and trainer_state.get("grad_scaler") is not None:
                accelerator.scaler.load_state_dict(trainer_state["grad_scaler"])  # fp16: the scale it had reached
            logger.info("resumed from %s (step %d)", ckpt, start_step)
            trainer_state = masters = None  # loaded: the optimizer state and fp32 masters are not held for the run
        sampler = StepBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, start_step=start_step,
                                   total_steps=cfg.steps, world_size=accelerator.num_processes,
                                   rank=accelerator.process_index, bidirectional=cfg.bidirectional != "none",
                                   groups=batch_groups(dataset, cfg.batching), start_position=data_position)
        if sampler.buckets is not None and accelerator.is_main_process:
            logger.info("%d training buckets (W x H: samples): %s", len(sampler.buckets),
                        ", ".join(f"{w}x{h}: {len(m)}" for (w, h), m in sampler.buckets.items()))
        # its own generator: the base seed of its workers is not drawn from the caller's global RNG
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate,
                                             num_workers=cfg.num_workers,
                                             generator=torch.Generator().manual_seed(derived_seed(cfg.seed)))

        log_path, png_path = out / "loss.jsonl", out / "loss.png"
        if accelerator.is_main_process:
            kept = []  # read (and a torn line warned about) before anything is written: -W error changes nothing
            if log_path.is_file() and start_step > 0:
                kept = [l for l, row in _loss_rows(log_path) if row["step"] <= start_step]
            out.mkdir(parents=True, exist_ok=True)
            # replaced, not written into: a symlink at these names (a received run folder) is not followed
            atomic_write(out / "train_config.json",
                         lambda tmp: tmp.write_text(json.dumps(asdict(cfg), indent=2, default=str)))
            atomic_write(log_path, lambda tmp: tmp.write_text("".join(l + "\n" for l in kept)))
            if ckpt is not None:  # a run killed after the rename of its last checkpoint is completed first
                with _writing_step(start_step):
                    copy_to_top_level(out, ckpt)
                    # rotated only when resuming from the newest folder: past a newer corrupt one, the rotation
                    # would keep that one and could delete the checkpoint resumed from
                    if checkpoint_dirs(out)[-1:] == [ckpt]:
                        rotate_checkpoints(out, cfg.keep_checkpoints, cfg.keep_milestone_every)
                    _refresh_loss_plot(draw_loss, log_path, png_path)
        accelerator.wait_for_everyone()

        step, loss_value, nan_steps = start_step, math.nan, []
        bar = progress_bar(total=cfg.steps, initial=start_step, desc="LoRWeB training", unit="step",
                           disable=not (cfg.progress and accelerator.is_main_process))
        if device.type == "cuda" and not cfg.cudnn_attention:
            # torch 2.11's cuDNN attention backward returned NaN gradients on the H200 for the tiny FLUX model (forward
            # fine; flash / efficient / math clean); training uses the other SDPA kernels unless --cudnn-attention
            torch.backends.cuda.enable_cudnn_sdp(False)
            logger.info("training attention: cuDNN SDPA off (--cudnn-attention turns it on)")
        for batch in _batches(loader):
            generator = torch.Generator().manual_seed(derived_seed(cfg.seed * 1_000_003 + step * 1009
                                                                  + accelerator.process_index))
            query = batch_query(encoder, batch, device)
            with accelerator.autocast():
                loss = flow_matching_loss(model, pipe, batch, query, cfg, generator, per_forward_query=sharded)
            # one collective: the mean loss over the ranks, NaN when any rank's loss is NaN
            loss_value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
            skipped = cfg.nan_loss == "skip" and math.isnan(loss_value)
            if not skipped and not math.isfinite(loss_value):
                raise FloatingPointError(f"the training loss is {loss_value} at step {step + 1}; the optimizer step "
                                         "was not taken; lower the learning rate")
            if skipped:  # official: no parameter gets a gradient, the step changes nothing and still counts
                del loss
                if sharded:
                    _reshard_without_backward(model)
                nan_steps.append(step + 1)
                if accelerator.is_main_process:
                    logger.warning("step %d: the training loss is NaN; no update this step (as the official trainer; "
                                   "--nan-loss raise stops instead)", step + 1)
            else:
                accelerator.backward(loss)
                # the norm is computed without clipping when max_grad_norm is 0 (max_norm inf scales by 1)
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
                grad_norm = accelerator.clip_grad_norm_(trainable, max_norm)
                _check_gradients(grad_norm, model, step + 1, cfg, scaled=accelerator.scaler is not None)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if accelerator.is_main_process:
                row = {"step": step, "loss": None if skipped else loss_value, "lr": cfg.learning_rate}
                with _writing_step(step), naming_the_file(log_path):
                    append_text(log_path, json.dumps({**row, "nan_loss_skipped": True} if skipped else row) + "\n")
            bar.update(1)
            bar.set_postfix(loss="NaN, skipped" if skipped else f"{loss_value:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                accelerator.wait_for_everyone()
                weights = lorweb_state_dict(transformer)  # collective under FSDP: every rank gathers
                optimizer_state = optimizer_state_dict(model, optimizer.optimizer, names, sharded=sharded)
                if accelerator.is_main_process:
                    with _writing_step(step):
                        _write_checkpoint(out, step, transformer, weights, optimizer_state, metadata,
                                          cfg.keep_checkpoints, save_dtype=cfg.save_dtype, settings=settings,
                                          name=Path(cfg.out).name or "lorweb", config=_comparable_config(cfg),
                                          model=model_name,
                                          milestone_every=cfg.keep_milestone_every, epoch=sampler.epoch(step - 1),
                                          grad_scaler=None if accelerator.scaler is None
                                          else accelerator.scaler.state_dict(),
                                          data_position=sampler.stream_position(step),
                                          num_processes=accelerator.num_processes)
                        _refresh_loss_plot(draw_loss, log_path, png_path)
                del weights, optimizer_state
                accelerator.wait_for_everyone()
            if step_callback is not None:
                step_callback(step, loss_value)
    finally:
        if bar is not None:
            bar.close()
        # the caller's layers without the run's leftovers, on success and on failure: no gradients (a failed step
        # raises between backward and zero_grad; a later run would add them to its first step) and no coefficients
        # (the last batch's, with the autograd graph of its query, which holds the projections and keys)
        for p in trainable:
            p.grad = None
        for layer in lorweb_layers(transformer).values():
            layer._drop_coefficients()
            layer._query = None
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
        for key in patched:
            transformer.__dict__.pop(key, None)
        transformer.__dict__.update(own_forward)
    accelerator.wait_for_everyone()
    if nan_steps:
        shown = ", ".join(map(str, nan_steps[:10])) + (", ..." if len(nan_steps) > 10 else "")
        logger.warning("%d of the %d steps run had a NaN loss and made no update (steps %s)", len(nan_steps),
                       step - start_step, shown)
    return {"step": step, "out": str(out), "loss": loss_value, "transformer": transformer, "nan_loss_steps": nan_steps}


@torch.no_grad()
def evaluation_loss(pipe, encoder, dataset: AnalogyFolder, cfg: TrainConfig, *, batches: int = 4,
                    seed: int = 12345) -> float:
    """Mean flow-matching loss of the LoRWeB model on fixed batches, timesteps and noise (no caption dropout):
    a deterministic yardstick for comparing weights before and after training."""
    eval_cfg = dataclass_replace(cfg, caption_dropout=0.0)
    device = pipe.transformer.device
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, seed=seed, start_step=0, total_steps=batches,
                               groups=batch_groups(dataset, cfg.batching))
    losses = []
    for step, indices in enumerate(sampler):
        batch = _collate([dataset[i] for i in indices])
        query = batch_query(encoder, batch, device)
        generator = torch.Generator().manual_seed(derived_seed(seed + step))
        losses.append(flow_matching_loss(pipe.transformer, pipe, batch, query, eval_cfg, generator).item())
    return sum(losses) / len(losses)
