"""Partitioners: seeded, exhaustive, sized, and skewed when asked to be."""

from __future__ import annotations

import numpy as np
import pytest

from models import label_histograms, partition
from models.partition import partition_dirichlet, partition_iid, partition_shards

NUM_CLASSES = 10
# 2,000 balanced labels (200 per class), shuffled.
LABELS = np.random.default_rng(42).permutation(np.repeat(np.arange(NUM_CLASSES), 200))

SPECS = [
    pytest.param("iid", id="iid"),  # uniform random split
    pytest.param("dirichlet:0.5", id="dirichlet-0.5"),  # moderate label skew
    pytest.param("dirichlet:0.1", id="dirichlet-0.1"),  # strong label skew
    pytest.param("shards:2", id="shards-2"),  # two classes per client
]


@pytest.mark.parametrize("spec", SPECS)
def test_same_seed_same_split(spec: str) -> None:
    first = partition(LABELS, 10, spec, seed=3)
    again = partition(LABELS, 10, spec, seed=3)

    assert len(first) == len(again) == 10
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spec", SPECS)
def test_other_seed_other_split(spec: str) -> None:
    first = partition(LABELS, 10, spec, seed=3)
    other = partition(LABELS, 10, spec, seed=4)

    assert any(len(a) != len(b) or not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("num_clients", [5, 7, 10])
def test_every_index_exactly_once_and_sorted(spec: str, num_clients: int) -> None:
    parts = partition(LABELS, num_clients, spec, seed=0)

    assert len(parts) == num_clients
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
    for part in parts:
        assert np.all(np.diff(part) > 0)


@pytest.mark.parametrize(
    ("n", "clients"),
    [
        (2000, 10),  # divides evenly: 200 each
        (2003, 10),  # remainder of 3: sizes 201 ×3 and 200 ×7
        (5, 5),  # one sample per client
    ],
)
def test_iid_sizes_differ_by_at_most_one(n: int, clients: int) -> None:
    parts = partition_iid(np.zeros(n, dtype=np.int64), clients, seed=0)

    sizes = [len(p) for p in parts]
    assert sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1


def _mean_max_class_share(parts: list[np.ndarray]) -> float:
    hist = label_histograms(LABELS, parts, NUM_CLASSES)
    return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))


def test_dirichlet_small_alpha_is_clearly_skewed_and_large_alpha_is_not() -> None:
    # IID clients see ~10% of each class: their largest class is only a bit above 0.1.
    iid = _mean_max_class_share(partition_iid(LABELS, 10, seed=0))

    skewed = _mean_max_class_share(partition_dirichlet(LABELS, 10, alpha=0.1, seed=0))
    near_iid = _mean_max_class_share(partition_dirichlet(LABELS, 10, alpha=100.0, seed=0))

    assert iid < 0.2
    assert skewed > iid + 0.3
    assert near_iid == pytest.approx(iid, abs=0.05)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 1.0])
def test_dirichlet_respects_min_size(alpha: float) -> None:
    parts = partition_dirichlet(LABELS, 20, alpha=alpha, seed=1, min_size=10)

    assert min(len(p) for p in parts) >= 10


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_refuses_non_positive_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(LABELS, 10, alpha=alpha)


@pytest.mark.parametrize(
    ("labels", "clients", "k"),
    [
        (LABELS, 10, 1),  # one class each
        (LABELS, 10, 2),  # the FedAvg paper's pathological split
        (LABELS, 20, 3),  # 60 shards of ~33 do not divide 200: equal cuts would straddle classes
        (LABELS, 7, 2),  # 14 shards over 10 classes: some classes get two shards
        (LABELS[:1013], 10, 2),  # unbalanced class counts
    ],
)
def test_shards_give_at_most_k_classes(labels: np.ndarray, clients: int, k: int) -> None:
    parts = partition_shards(labels, clients, classes_per_client=k, seed=0)

    hist = label_histograms(labels, parts, NUM_CLASSES)
    assert (hist > 0).sum(axis=1).max() <= k
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize(
    ("clients", "k"),
    [
        (10, 2),  # 20 shards of 100, ten per class pair
        (100, 2),  # Fashion-MNIST-style: 200 shards of 10
        (4, 5),  # 20 shards, 5 per client
    ],
)
def test_shards_are_equal_when_shard_size_divides_classes(clients: int, k: int) -> None:
    parts = partition_shards(LABELS, clients, classes_per_client=k, seed=0)

    assert {len(p) for p in parts} == {len(LABELS) // clients}


def test_shards_refuse_too_few_shards_for_the_classes() -> None:
    # 2 clients × 2 classes cannot hold 10 classes without breaking "at most k".
    with pytest.raises(ValueError, match="cannot cover"):
        partition_shards(LABELS, 2, classes_per_client=2)


def test_label_histograms_by_hand() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4]), np.array([5])]

    hist = label_histograms(labels, parts, num_classes=4)

    np.testing.assert_array_equal(hist, [[1, 1, 0, 0], [0, 1, 2, 0], [0, 0, 1, 0]])


@pytest.mark.parametrize("spec", SPECS)
def test_label_histograms_sum_to_part_sizes_and_class_counts(spec: str) -> None:
    parts = partition(LABELS, 10, spec, seed=0)

    hist = label_histograms(LABELS, parts, NUM_CLASSES)

    assert hist.shape == (10, NUM_CLASSES)
    np.testing.assert_array_equal(hist.sum(axis=1), [len(p) for p in parts])
    np.testing.assert_array_equal(hist.sum(axis=0), np.bincount(LABELS, minlength=NUM_CLASSES))


@pytest.mark.parametrize(
    "spec",
    [
        "random",  # not a partitioner
        "Dirichlet:0.5",  # case matters
    ],
)
def test_unknown_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown partition"):
        partition(LABELS, 10, spec)
