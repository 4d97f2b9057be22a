"""Two-stream sampler: 1:1 alternation, every labeled case once per epoch, exact resume, DDP split."""

from __future__ import annotations

import pytest

from AbdomenKDSegLib.training.sampler import TwoStreamSampler


def test_alternates_and_visits_every_labeled_case_once():
    s = TwoStreamSampler(n_labeled=5, n_unlabeled=3, use_unlabeled=True, seed=7)
    assert s.steps_per_epoch == 10
    for epoch in range(3):
        batches = s.epoch_batches(epoch)
        assert [b.kind for b in batches] == ["labeled", "unlabeled"] * 5
        labeled = [b.indices[0] for b in batches if b.kind == "labeled"]
        assert sorted(labeled) == [0, 1, 2, 3, 4]
    orders = {tuple(b.indices[0] for b in s.epoch_batches(e) if b.kind == "labeled") for e in range(6)}
    assert len(orders) > 1  # reshuffled between epochs


def test_unlabeled_stream_is_endless_and_reshuffled():
    s = TwoStreamSampler(n_labeled=4, n_unlabeled=3, use_unlabeled=True, seed=1)
    draws = [b.indices[0] for e in range(3) for b in s.epoch_batches(e) if b.kind == "unlabeled"]
    assert len(draws) == 12
    for k in range(0, 12, 3):  # each consecutive pass of 3 draws is a permutation of the 3 cases
        assert sorted(draws[k:k + 3]) == [0, 1, 2]
    assert len({tuple(draws[k:k + 3]) for k in range(0, 12, 3)}) > 1


def test_labeled_only_variant():
    s = TwoStreamSampler(n_labeled=4, n_unlabeled=0, use_unlabeled=False, seed=0)
    batches = s.epoch_batches(0)
    assert s.steps_per_epoch == 4 and all(b.kind == "labeled" for b in batches)
    with pytest.raises(ValueError, match="unlabeled"):
        TwoStreamSampler(n_labeled=4, n_unlabeled=0, use_unlabeled=True)


def test_iteration_state_resumes_exactly():
    a = TwoStreamSampler(5, 3, True, seed=3)
    a.set_epoch(2)
    full = list(a)
    b = TwoStreamSampler(5, 3, True, seed=3)
    b.set_epoch(2)
    first = [next(iter(b)) for _ in range(3)]
    state = b.state_dict()
    c = TwoStreamSampler(5, 3, True, seed=3)
    c.load_state_dict(state)
    assert first + list(c) == full
    with pytest.raises(ValueError, match="n_labeled"):
        TwoStreamSampler(6, 3, True, seed=3).load_state_dict(state)


def test_distributed_split_covers_all_cases():
    ranks = [TwoStreamSampler(5, 4, True, seed=2, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == 6  # 5 padded to 6 -> 3 per rank
    labeled = [b.indices[0] for s in ranks for b in s.epoch_batches(0) if b.kind == "labeled"]
    assert set(labeled) == {0, 1, 2, 3, 4} and len(labeled) == 6
    unl = [[b.indices[0] for b in s.epoch_batches(0) if b.kind == "unlabeled"][:2] for s in ranks]
    assert sorted(unl[0] + unl[1]) == [0, 1, 2, 3]  # first pass of the unlabeled stream, split by rank


def test_batch_size_two():
    s = TwoStreamSampler(5, 3, True, batch_size=2, seed=0)
    batches = s.epoch_batches(0)
    assert [len(b.indices) for b in batches] == [2, 2, 2, 2, 1, 2]
    assert sorted(i for b in batches if b.kind == "labeled" for i in b.indices) == [0, 1, 2, 3, 4]
