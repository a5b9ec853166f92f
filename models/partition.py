"""Non-IID partitioners: IID, Dirichlet(α) label skew, k classes per client (shards).

Each returns one sorted index array per client; all are seeded and deterministic, and
every sample goes to exactly one client.
"""

from __future__ import annotations

import numpy as np

__all__ = ["label_histograms", "partition", "partition_dirichlet", "partition_iid", "partition_shards"]


def partition_iid(labels: np.ndarray, num_clients: int, *, seed: int = 0) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, *, alpha: float, seed: int = 0, min_size: int = 10
) -> list[np.ndarray]:
    """Per class, split its samples over clients with proportions ~ Dir(α) (Hsu et al. 2019).
    Redraws (up to 100 times) until every client has at least `min_size` samples."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    min_size = min(min_size, len(labels) // num_clients)
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= min_size:
            return result
    raise ValueError(f"could not give every client {min_size} samples with alpha={alpha}")


def partition_shards(labels: np.ndarray, num_clients: int, *, classes_per_client: int, seed: int = 0) -> list[np.ndarray]:
    """Cut each class into shards, num_clients·k in all, and deal k shards to each client
    (McMahan et al. 2017): each client sees at most k classes (usually exactly k).

    Shards never straddle two classes (cutting the label-sorted order into equal pieces
    would, whenever the shard size does not divide the class sizes, and then a client
    could see up to 2k classes); each class gets shards in proportion to its size, at
    least one, so num_clients·k must be at least the number of classes."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    total = num_clients * classes_per_client
    if total < len(classes):
        raise ValueError(f"shards: {num_clients} clients × {classes_per_client} classes cannot cover {len(classes)} classes")
    # Largest-remainder allocation of `total` shards over classes, at least one each.
    share = counts * total / counts.sum()
    per_class = np.maximum(np.floor(share).astype(int), 1)
    by_remainder = np.argsort(-(share - np.floor(share)), kind="stable")
    i = 0
    while per_class.sum() != total:
        c = by_remainder[i % len(classes)]
        if per_class.sum() < total:
            per_class[c] += 1
        elif per_class[c] > 1:
            per_class[c] -= 1
        i += 1
    shards = [
        shard
        for c, n in zip(classes, per_class, strict=True)
        for shard in np.array_split(np.flatnonzero(labels == c), n)
    ]
    deal = rng.permutation(len(shards)).reshape(num_clients, classes_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in deal]


def partition(labels: np.ndarray, num_clients: int, spec: str, *, seed: int = 0) -> list[np.ndarray]:
    """Parse a spec string: 'iid', 'dirichlet:0.5', 'shards:2'."""
    kind, _, arg = spec.partition(":")
    if kind == "iid":
        return partition_iid(labels, num_clients, seed=seed)
    if kind == "dirichlet":
        return partition_dirichlet(labels, num_clients, alpha=float(arg or 0.5), seed=seed)
    if kind == "shards":
        return partition_shards(labels, num_clients, classes_per_client=int(arg or 2), seed=seed)
    raise ValueError(f"unknown partition {spec!r}; valid: iid, dirichlet:<alpha>, shards:<k>")


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) count matrix."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
