"""Training batches: the official bucket batching (every batch from one training size) against a reference written
from ai-toolkit, its determinism under resume and multi-process splits, and the older "mixed" rule kept as an
option."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lorweb_fast.data import AnalogyFolder
from lorweb_fast.testing import random_rgb_image
from lorweb_fast.training import BATCHINGS, StepBatchSampler, _collate, batch_groups


def official_bucket_batches(keys, batch_size, shuffle):
    """Reference written from NVlabs/LoRWeB (ai-toolkit) ``toolkit/dataloader_mixins.py``
    ``BucketsMixin.setup_buckets`` and ``build_batch_indices``: samples are appended to a dict of buckets keyed by
    their training size in file order, each bucket's index list is shuffled once (``shuffle_buckets``), and the
    batches are consecutive slices of ``batch_size`` of each bucket in dict order, the last one shorter.
    ``toolkit/data_loader.py`` ``get_dataloader_from_datasets`` then loads these batches with ``batch_size=None,
    shuffle=True``: every epoch visits each batch once, in a fresh order. ``shuffle`` stands in for
    ``random.shuffle`` (the bucket's members -> a permutation of them)."""
    buckets = {}
    for index, key in enumerate(keys):
        buckets.setdefault(key, []).append(index)
    batches = []
    for members in buckets.values():
        members = shuffle(members)
        for start in range(0, len(members), batch_size):
            batches.append(members[start:start + batch_size])
    return buckets, batches


KEYS = [(64, 64)] * 7 + [(96, 48)] * 4 + [(48, 96)] * 1 + [(64, 64)] * 3   # 3 buckets of 10, 4 and 1 samples


def _epoch(sampler, epoch, num_batches, world_size=1):
    steps = range(epoch * num_batches // world_size, (epoch + 1) * num_batches // world_size)
    return [sampler.batch(s) for s in steps]


@pytest.mark.parametrize("batch_size", [1, 3, 4, 6])
def test_bucket_batches_match_the_official_grouping(batch_size):
    sampler = StepBatchSampler(len(KEYS), batch_size, seed=5, start_step=0, total_steps=0, groups=KEYS)
    # the same buckets (order of first appearance) and the same batch structure once the shuffle is fixed
    shuffled = {}
    for batch in sampler.bucket_batches:
        shuffled.setdefault(KEYS[batch[0]], []).extend(batch)
    buckets, want = official_bucket_batches(KEYS, batch_size, lambda members: shuffled[KEYS[members[0]]])
    assert sampler.buckets == buckets and list(buckets) == [(64, 64), (96, 48), (48, 96)]
    assert sampler.bucket_batches == want
    for key, members in buckets.items():  # each bucket's shuffle is a permutation of its members
        assert sorted(shuffled[key]) == members
    # every epoch visits each batch exactly once, in a new order; one size per batch
    num_batches = len(want)
    epochs = [_epoch(sampler, e, num_batches) for e in range(3)]
    for batches in epochs:
        assert sorted(map(sorted, batches)) == sorted(map(sorted, want))
        assert all(len({KEYS[i] for i in batch}) == 1 for batch in batches)
        assert Counter(i for batch in batches for i in batch) == Counter(range(len(KEYS)))
    if num_batches > 3:
        assert epochs[0] != epochs[1] != epochs[2]


def test_bucket_shuffle_depends_on_the_seed_and_not_on_anything_else():
    a = StepBatchSampler(len(KEYS), 3, seed=5, start_step=0, total_steps=0, groups=KEYS)
    b = StepBatchSampler(len(KEYS), 3, seed=5, start_step=7, total_steps=9, world_size=2, rank=1, groups=KEYS)
    c = StepBatchSampler(len(KEYS), 3, seed=6, start_step=0, total_steps=0, groups=KEYS)
    assert a.bucket_batches == b.bucket_batches != c.bucket_batches


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_bucket_batches_resume_exactly_and_split_between_processes(world_size):
    total = 11
    per_rank = [list(StepBatchSampler(len(KEYS), 3, seed=2, start_step=0, total_steps=total, world_size=world_size,
                                      rank=r, groups=KEYS, bidirectional=True)) for r in range(world_size)]
    for r in range(world_size):
        resumed = StepBatchSampler(len(KEYS), 3, seed=2, start_step=6, total_steps=total, world_size=world_size,
                                   rank=r, groups=KEYS, bidirectional=True)
        assert list(resumed) == per_rank[r][6:]
    single = StepBatchSampler(len(KEYS), 3, seed=2, start_step=0, total_steps=total * world_size, groups=KEYS,
                              bidirectional=True)
    # the processes of one step take consecutive batches of the single-process stream, swaps included
    for step in range(total):
        for r in range(world_size):
            assert per_rank[r][step] == single.batch(step * world_size + r)
    swaps = [swap for batch in single for _, swap in batch]
    assert 0 < sum(swaps) < len(swaps)


@pytest.mark.parametrize("batching", ["bucket", "mixed"])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3)])
def test_a_resume_with_another_process_count_continues_the_stream(batching, before, after):
    """A run of ``before`` processes killed after 3 steps and resumed with ``after`` from the position its
    checkpoint records (``stream_position``) draws exactly the single-process stream: nothing seen twice, nothing
    skipped (from ``start_step`` alone it restarted at 3 steps of ``after`` processes, replaying or skipping data).
    The epochs follow the stream too."""
    groups = KEYS if batching == "bucket" else None
    n, bs, done, total = len(KEYS), 3, 3, 7

    def make(**kw):
        return StepBatchSampler(n, bs, seed=2, groups=groups, bidirectional=True, **kw)

    first = [make(start_step=0, total_steps=done, world_size=before, rank=r) for r in range(before)]
    position = first[0].stream_position(done)
    resumed = [make(start_step=done, total_steps=total, world_size=after, rank=r, start_position=position)
               for r in range(after)]
    drawn = [s.batch(step) for step in range(done) for s in first]
    drawn += [s.batch(step) for step in range(done, total) for s in resumed]
    single = make(start_step=0, total_steps=len(drawn))
    # one batch (bucket) or bs samples (mixed) per process and step: the single stream's batches, in order
    assert drawn == list(single)
    epochs = [s.epoch(step) for step in range(done, total) for s in resumed]
    single_epochs = [single.epoch(i) for i in range(done * before, len(drawn))]
    assert epochs == single_epochs
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="start_position"):
            make(start_step=done, total_steps=total, start_position=bad)


def test_mixed_batching_keeps_the_first_rule():
    """``batching="mixed"`` is lorweb_fast's first sampler: a permutation of all samples per epoch, cut into global
    batches of ``batch_size * world_size`` whatever their sizes."""
    plain = StepBatchSampler(15, 4, seed=3, start_step=0, total_steps=4, world_size=2, rank=1)
    import torch

    perm = torch.randperm(15, generator=torch.Generator().manual_seed(3 * 7919 + 0)).tolist()
    assert plain.batch(0) == perm[4:8] and plain.batch(1) == perm[12:15] + [
        torch.randperm(15, generator=torch.Generator().manual_seed(3 * 7919 + 1)).tolist()[0]]
    assert plain.buckets is None


def test_groups_must_match_the_samples():
    with pytest.raises(ValueError, match="groups has 2 keys for 3 samples"):
        StepBatchSampler(3, 2, seed=0, start_step=0, total_steps=1, groups=[(1, 1), (1, 1)])
    with pytest.raises(ValueError, match="batching must be one of"):
        batch_groups(None, "sorted")
    assert BATCHINGS == ("bucket", "mixed")


def _mixed_aspect_folder(root: Path) -> Path:
    """Strip-layout samples whose b' is square or 2:1 (two buckets at resolution 64, divisibility 16)."""
    rng = np.random.default_rng(0)
    (root / "control").mkdir(parents=True)
    (root / "target").mkdir(parents=True)
    for i, (w, h) in enumerate([(64, 64), (128, 64), (64, 64), (128, 64), (64, 64), (128, 64), (64, 64)]):
        random_rgb_image(rng, 3 * w, h).save(root / "control" / f"s{i}.png")
        random_rgb_image(rng, w, h).save(root / "target" / f"s{i}.png")
        (root / "target" / f"s{i}.txt").write_text("edit")
    return root


def test_bucket_batches_of_a_real_folder_need_no_resizing(tmp_path):
    ds = AnalogyFolder(_mixed_aspect_folder(tmp_path / "d"), long_edge=64, bucket_divisibility=16)
    groups = batch_groups(ds, "bucket")
    assert len(set(groups)) == 2 and batch_groups(ds, "mixed") is None
    sampler = StepBatchSampler(len(ds), 3, seed=0, start_step=0, total_steps=6, groups=groups)
    for indices in sampler:
        items = [ds[i] for i in indices]
        sizes = {item["target"].size for item in items}
        assert len(sizes) == 1  # one bucket: nothing is resized by the collate
        batch = _collate(items)
        for item, target in zip(items, batch["target"]):
            assert target is item["target"]
    # "mixed" batches do cross the buckets (and the collate resizes them to the first sample's size)
    mixed = StepBatchSampler(len(ds), 3, seed=0, start_step=0, total_steps=6)
    assert any(len({groups[i] for i in b}) > 1 for b in mixed)


@pytest.mark.parametrize("groups", [KEYS, None])
def test_epoch_counts_completed_passes_as_ai_toolkit(groups):
    """``StepBatchSampler.epoch`` (training_info's epoch) is ai-toolkit's ``epoch_num`` (jobs/process/
    BaseSDTrainProcess.py ``run``: one more each time the dataloader is exhausted before the next batch): it goes up
    by one exactly where a pass over the data ends, i.e. where the batches drawn since the last increase have
    visited every sample (bucket batching: every batch) once."""
    sampler = StepBatchSampler(len(KEYS), 3, seed=4, start_step=0, total_steps=0, groups=groups)
    epochs = [sampler.epoch(s) for s in range(40)]
    assert epochs[0] == 0 and all(b - a in (0, 1) for a, b in zip(epochs, epochs[1:])) and epochs[-1] >= 3
    for e in range(epochs[-1]):
        drawn = [i for s in range(40) if epochs[s] == e for i in sampler.batch(s)]
        if groups is not None:  # whole batches: each sample exactly once
            assert Counter(drawn) == Counter(range(len(KEYS)))
        else:  # fixed-size batches run across the end of a pass: the pass is complete, the overlap belongs to it
            assert set(drawn) == set(range(len(KEYS))) and len(drawn) < 2 * len(KEYS)
