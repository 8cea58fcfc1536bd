"""The streaming loader over real Fashion-MNIST shards: how ranks x DataLoader workers split an
epoch, the global batch that is the same at every world size, the infinite and resampled modes,
and restarting a stream at a ``LoaderPosition``."""
import itertools

import pytest
import torch
from webdataset.tariterators import tarfile_samples

from conftest import tiny_recipe
from ssl_foundry.data_prep.fashion_mnist import prep_fashion_mnist
from ssl_foundry.data_prep.shard_format import shard_paths
from ssl_foundry.pipeline.config import DataConfig, build
from ssl_foundry.pipeline.data.augment.torch_backend import MultiViewTransform
from ssl_foundry.pipeline.data.loader import ShardStream, make_loader
from ssl_foundry.pipeline.data.position import LoaderPosition

WORLD = 2


@pytest.fixture(scope="module")
def transform(fmnist):
    """The tiny recipe's two SimCLR views (random crop, flip, jitter, grey): real randomness."""
    data = build(DataConfig, tiny_recipe(fmnist, fmnist)["data"])
    return MultiViewTransform(data.views, data.mean, data.std)


def all_samples(folder) -> dict[str, int]:
    """key -> label of every sample in a shard folder, read straight from the tars."""
    return {s["__key__"]: int(s["cls"]) for s in tarfile_samples([{"url": p} for p in shard_paths(folder)])}


def stream(folder, transform, rank=0, world_size=WORLD, num_workers=2, batch_size=4, **kwargs) -> ShardStream:
    return ShardStream(str(folder), transform, batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
                       seed=7, shuffle_buffer=10, **kwargs)


def take(s: ShardStream, n: int) -> list[dict]:
    return list(itertools.islice(make_loader(s), n))


def keys_of(batches: list[dict]) -> list[str]:
    return [key for b in batches for key in b["key"]]


def test_finite_epoch_sees_every_sample_once_across_ranks_and_workers(fmnist, transform):
    expected = all_samples(fmnist / "train")
    assert len(expected) == 128
    seen, batches_per_rank = [], []
    for rank in range(WORLD):
        # batch 3 does not divide a reader's 32 samples: every reader ends with a short batch
        batches = list(make_loader(stream(fmnist / "train", transform, rank, batch_size=3, finite=True)))
        batches_per_rank.append(len(batches))
        for b in batches:
            assert [v.shape for v in b["views"]] == [(len(b["key"]), 3, 16, 16)] * 2
            assert b["label"].tolist() == [expected[k] for k in b["key"]]
        seen += keys_of(batches)
    assert len(seen) == len(set(seen)) == len(expected)
    assert set(seen) == set(expected)
    assert batches_per_rank == [2 * 11, 2 * 11]  # 2 workers x ceil(32 / 3)


def test_training_epoch_splits_samples_without_duplicates(fmnist, transform):
    """8 shards of 16 over 2 ranks x 2 workers (4 readers of 32 samples), local batches of 4 (2
    per reader): 16 steps an epoch cover every sample once, reshuffled in the next epoch."""
    expected = set(all_samples(fmnist / "train"))
    per_epoch = {0: [], 1: []}
    for rank in range(WORLD):
        s = stream(fmnist / "train", transform, rank)
        assert s.steps_per_epoch(0) == s.steps_per_epoch(1) == 16
        batches = take(s, 2 * 16)
        assert [(b["epoch"], b["batch"]) for b in batches] == [(e, i) for e in (0, 1) for i in range(16)]
        for epoch in (0, 1):
            per_epoch[epoch].append(keys_of(b for b in batches if b["epoch"] == epoch))
    for epoch, ranks in per_epoch.items():
        keys = ranks[0] + ranks[1]
        assert len(keys) == len(set(keys)) == len(expected), epoch
        assert set(keys) == expected
        assert not set(ranks[0]) & set(ranks[1])
    assert per_epoch[0][0] != per_epoch[1][0]  # a new shard permutation and shuffle every epoch


def test_uneven_shards_keep_ranks_in_lock_step(tmp_path, transform):
    """120 samples (7 shards of 16 and one of 8): readers hold different sample counts, yet every
    rank yields the same number of full batches per epoch (DDP steps together), none repeated."""
    prep_fashion_mnist(tmp_path, shard_size=16, limit=120, workers=1)
    counts, seen = set(), []
    for rank in range(WORLD):
        s = stream(tmp_path / "train", transform, rank, batch_size=6)
        per_rank = s.steps_per_epoch(0)
        batches = take(s, per_rank + 1)
        assert [b["epoch"] for b in batches] == [0] * per_rank + [1]
        assert all(len(b["key"]) == 6 for b in batches)
        counts.add(per_rank)
        seen += keys_of(batches[:-1])
    assert len(counts) == 1 and counts.pop() > 0
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("resampled", [False, True], ids=["epochs", "resampled"])
def test_training_streams_are_infinite(fmnist, transform, resampled):
    s = stream(fmnist / "train", transform, rank=1, resampled=resampled)
    per_epoch = s.steps_per_epoch(0)
    batches = take(s, 3 * per_epoch + 1)
    assert len(batches) == 3 * per_epoch + 1
    assert [b["epoch"] for b in batches[::per_epoch]] == [0, 1, 2, 3]
    if resampled:  # shards drawn with replacement: some epoch deals one shard twice
        assert any(len(set(p for shards in s.reader_shards(e) for p, _ in shards)) < len(s.shards)
                   for e in range(4))


def test_too_few_samples_for_a_batch_is_an_error_not_a_hang(fmnist, transform):
    s = stream(fmnist / "train", transform, num_workers=1, batch_size=80)  # each reader has 64 samples
    with pytest.raises(ValueError, match="only 64 samples, less than its part of a batch \\(80\\)"):
        next(iter(s))


@pytest.mark.parametrize("readers,world,workers,batch,match", [
    (4, 3, 1, 4, "not a multiple of 3 ranks x 1 loader workers"),
    (4, 2, 1, 3, "local batch of 3 does not split over this rank's 2 readers"),
    (16, 1, 0, 16, "8 shards but 16 readers"),
])
def test_reader_layouts_that_cannot_work_are_errors(fmnist, transform, readers, world, workers, batch, match):
    with pytest.raises(ValueError, match=match):
        stream(fmnist / "train", transform, world_size=world, num_workers=workers, batch_size=batch, readers=readers)


@pytest.mark.parametrize("world,workers", [(2, 0), (2, 2), (4, 1)])
def test_global_batch_is_the_same_at_every_world_size(fmnist, transform, world, workers):
    """With data.readers fixed, the ranks' local batches of a step, concatenated in rank order,
    are the one-rank global batch of that step: the same samples, bitwise the same views."""
    readers, global_batch, steps = 4, 8, 20  # 20 steps > an epoch (16): crosses the boundary
    whole = take(stream(fmnist / "train", transform, world_size=1, num_workers=1, batch_size=global_batch,
                        readers=readers), steps)
    per_rank = [take(stream(fmnist / "train", transform, rank, world_size=world, num_workers=workers,
                            batch_size=global_batch // world, readers=readers), steps) for rank in range(world)]
    for step, want in enumerate(whole):
        parts = [batches[step] for batches in per_rank]
        assert {(b["epoch"], b["batch"]) for b in parts} == {(want["epoch"], want["batch"])}
        assert [k for b in parts for k in b["key"]] == want["key"]
        for view, got in zip(want["views"], zip(*(b["views"] for b in parts))):
            assert torch.equal(torch.cat(got), view), step


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert [(b["epoch"], b["batch"]) for b in got] == [(b["epoch"], b["batch"]) for b in want]
    for g, w in zip(got, want, strict=True):
        assert g["key"] == w["key"]
        assert torch.equal(g["label"], w["label"])
        assert len(g["views"]) == len(w["views"]) == 2
        for gv, wv in zip(g["views"], w["views"]):
            assert torch.equal(gv, wv), (g["epoch"], g["batch"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_started_at_a_position_continues_the_uninterrupted_one(fmnist, transform, num_workers):
    """What resume relies on: starting at (epoch, batch k) yields exactly the batches (keys and
    bitwise the same augmented views) that an uninterrupted stream yields from batch k on."""
    s = stream(fmnist / "train", transform, rank=1, num_workers=num_workers)
    per_epoch = s.steps_per_epoch(0)
    reference = take(s, per_epoch + 6)
    assert [(b["epoch"], b["batch"]) for b in reference] == (
        [(0, i) for i in range(per_epoch)] + [(1, i) for i in range(6)])
    index = {(b["epoch"], b["batch"]): i for i, b in enumerate(reference)}
    starts = [(0, 1), (0, 3), (0, per_epoch - 1), (0, per_epoch), (1, 3)]
    for epoch, batch in starts:
        first = index.get((epoch, batch), per_epoch)  # (0, per_epoch): the epoch is used up
        want = reference[first:first + 4]
        got = take(stream(fmnist / "train", transform, rank=1, num_workers=num_workers,
                          start=LoaderPosition(epoch, batch)), len(want))
        assert_same_batches(got, want)
