"""CIFAR-10 python-batch reader on generated batches, corrupt and malicious ones included."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from models import DatasetError, load_cifar10, load_dataset
from models.datasets import write_cifar_batch

Batches = dict[str, tuple[np.ndarray, np.ndarray]]


@pytest.mark.parametrize(
    ("split", "names"),
    [
        ("train", [f"data_batch_{i}" for i in range(1, 6)]),  # five batches, concatenated in order
        ("test", ["test_batch"]),  # a single batch
    ],
)
def test_round_trip_keeps_pixels_labels_and_order(cifar_dir: tuple[Path, Batches], split: str, names: list[str]) -> None:
    root, batches = cifar_dir

    data = load_cifar10(root, split)

    np.testing.assert_array_equal(data.images, np.concatenate([batches[n][0] for n in names]))
    np.testing.assert_array_equal(data.labels, np.concatenate([batches[n][1] for n in names]))
    assert data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64
    assert data.input_shape == (3, 32, 32)
    assert data.num_classes == 10


def test_file_layout_is_channel_planes_read_as_hwc(cifar_dir: tuple[Path, Batches]) -> None:
    # Arrange: one row written by hand in the CIFAR layout, 1024 R then 1024 G then 1024 B,
    # each plane row-major; mark R at (row 0, col 1), G at (row 2, col 0), B at (31, 31).
    root, _ = cifar_dir
    row = np.zeros(3072, dtype=np.uint8)
    row[0 * 1024 + 0 * 32 + 1] = 11
    row[1 * 1024 + 2 * 32 + 0] = 22
    row[2 * 1024 + 31 * 32 + 31] = 33
    (root / "test_batch").write_bytes(pickle.dumps({b"data": row[None], b"labels": [4]}, protocol=2))

    image = load_cifar10(root, "test").images[0]  # (H, W, C)

    assert image[0, 1, 0] == 11
    assert image[2, 0, 1] == 22
    assert image[31, 31, 2] == 33
    assert int(image.sum()) == 11 + 22 + 33


def test_load_dataset_dispatches_to_cifar(cifar_dir: tuple[Path, Batches]) -> None:
    root, batches = cifar_dir

    data = load_dataset("cifar10", root, "test")

    np.testing.assert_array_equal(data.images, batches["test_batch"][0])


def test_missing_batch_names_it(cifar_dir: tuple[Path, Batches]) -> None:
    root, _ = cifar_dir
    (root / "data_batch_3").unlink()

    with pytest.raises(DatasetError) as info:
        load_cifar10(root, "train")

    assert str(root / "data_batch_3") in str(info.value)
    assert "not found" in str(info.value)


def _pickled(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=2)


_GOOD = np.zeros((2, 3072), dtype=np.uint8)

# (content of data_batch_2, words the message must contain)
CORRUPT = [
    pytest.param(b"hello, not a pickle", "not a CIFAR python batch", id="not-a-pickle"),
    pytest.param(_pickled({b"data": _GOOD, b"labels": [0, 1]})[:-20], "not a CIFAR python batch", id="truncated-pickle"),
    pytest.param(_pickled([1, 2, 3]), "expected a dict", id="list-not-dict"),
    pytest.param(_pickled({b"labels": [0, 1]}), "missing", id="no-data-key"),
    pytest.param(_pickled({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}), "(N, 3072)", id="wrong-row-length"),
    pytest.param(_pickled({b"data": np.zeros((2, 32, 32, 3), np.uint8), b"labels": [0, 1]}), "(N, 3072)", id="wrong-rank"),
    pytest.param(_pickled({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8", id="wrong-dtype"),
    pytest.param(_pickled({b"data": _GOOD, b"labels": [0]}), "wrong count", id="one-label-short"),
    pytest.param(_pickled({b"data": _GOOD, b"labels": [0, 10]}), "out of range", id="label-10"),
]


@pytest.mark.parametrize(("raw", "reason"), CORRUPT)
def test_corrupt_batch_names_file_and_reason(cifar_dir: tuple[Path, Batches], raw: bytes, reason: str) -> None:
    root, _ = cifar_dir
    (root / "data_batch_2").write_bytes(raw)

    with pytest.raises(DatasetError) as info:
        load_cifar10(root, "train")

    assert str(root / "data_batch_2") in str(info.value)
    assert reason in str(info.value)


def _calls(module: str, name: str, arg: str) -> bytes:
    """A protocol-0 pickle whose load calls module.name(arg): what an attacker would ship."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


@pytest.mark.parametrize(
    ("module", "name", "code"),
    [
        ("os", "system", "touch {marker}"),  # shell command
        ("posix", "system", "touch {marker}"),  # the same, by its real module
        ("builtins", "exec", "open({marker!r}, 'w').close()"),  # arbitrary Python
        ("subprocess", "getoutput", "touch {marker}"),  # another way to a shell
    ],
)
def test_forbidden_global_is_refused_and_not_run(
    cifar_dir: tuple[Path, Batches], tmp_path: Path, module: str, name: str, code: str
) -> None:
    # Arrange: a batch that, if unpickled naively, creates `marker`.
    root, _ = cifar_dir
    marker = str(tmp_path / "pwned")
    payload = _calls(module, name, code.format(marker=marker))
    (root / "data_batch_4").write_bytes(payload)

    # Act
    with pytest.raises(DatasetError) as info:
        load_cifar10(root, "train")

    # Assert
    assert f"{module}.{name}" in str(info.value)
    assert "not allowed" in str(info.value)
    assert not Path(marker).exists()


def test_the_malicious_payload_is_live_under_plain_pickle(tmp_path: Path) -> None:
    # Oracle for the test above: the same bytes do run code when unpickled naively.
    marker = tmp_path / "pwned"

    pickle.loads(_calls("builtins", "exec", f"open({str(marker)!r}, 'w').close()"))

    assert marker.exists()


def test_write_cifar_batch_writes_protocol_2_like_the_real_files(tmp_path: Path) -> None:
    # The published batches are Python-2 pickles (protocol 2), read with encoding="bytes".
    path = tmp_path / "b"

    write_cifar_batch(path, np.zeros((1, 32, 32, 3), np.uint8), np.array([3]))

    assert path.read_bytes()[:2] == b"\x80\x02"
