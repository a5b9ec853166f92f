"""Fashion-MNIST IDX reader on files generated here, corrupt ones included."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from models import DatasetError, load_fashion_mnist
from models import datasets as ds
from models.datasets import read_idx, write_idx

# A 2×3 uint8 array written byte by byte from the IDX spec, independent of write_idx:
# magic 0x00 0x00 0x08 (ubyte) 0x02 (two dims), dims 2 and 3 big-endian, then the data.
HAND_IDX = b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + bytes([1, 2, 3, 4, 5, 6])


def _write(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.fixture(params=["raw", "gz"])
def idx_name(request: pytest.FixtureRequest) -> str:
    return "data-idx" + (".gz" if request.param == "gz" else "")


def test_reads_a_hand_written_file(tmp_path: Path, idx_name: str) -> None:
    path = _write(tmp_path / idx_name, HAND_IDX)

    array = read_idx(path)

    np.testing.assert_array_equal(array, [[1, 2, 3], [4, 5, 6]])
    assert array.dtype == np.uint8


@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5),  # image stack, as Fashion-MNIST
        np.array([9, 0, 3], dtype=np.uint8),  # label vector
        np.array([[-7, 1 << 20], [3, -(1 << 30)]], dtype=np.int32),  # big-endian multi-byte ints
        np.array([0.5, -1.25, 3e8], dtype=np.float32),  # big-endian floats
        np.array([-3, 127], dtype=np.int8),  # signed bytes
    ],
    ids=["uint8-3d", "uint8-1d", "int32-2d", "float32", "int8"],
)
def test_round_trip(tmp_path: Path, idx_name: str, array: np.ndarray) -> None:
    path = tmp_path / idx_name

    write_idx(path, array)
    back = read_idx(path)

    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype
    assert back.shape == array.shape


def test_gz_name_is_really_gzipped(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"

    write_idx(path, np.arange(6, dtype=np.uint8).reshape(2, 3))

    assert gzip.decompress(path.read_bytes()) == HAND_IDX[:-6] + bytes(range(6))


# (bytes in the file, words the message must contain)
CORRUPT = [
    pytest.param(b"\x01\x02\x08\x02" + HAND_IDX[4:], "bad magic number", id="nonzero-magic"),
    pytest.param(b"\x00\x00\x07\x02" + HAND_IDX[4:], "bad magic number", id="unknown-dtype-code"),
    pytest.param(b"\x00\x00\x08\x00" + HAND_IDX[4:], "bad magic number", id="zero-dims"),
    pytest.param(HAND_IDX[:2], "truncated header", id="shorter-than-magic"),
    pytest.param(HAND_IDX[:9], "truncated header", id="dims-cut-short"),
    pytest.param(b"", "truncated header", id="empty-file"),
    pytest.param(HAND_IDX[:-1], "truncated data", id="one-byte-short"),
    pytest.param(HAND_IDX[:12], "truncated data", id="no-data"),
    pytest.param(HAND_IDX + b"\x00", "trailing bytes", id="one-byte-extra"),
]


@pytest.mark.parametrize(("raw", "reason"), CORRUPT)
def test_corrupt_file_names_file_and_reason(tmp_path: Path, idx_name: str, raw: bytes, reason: str) -> None:
    path = _write(tmp_path / idx_name, raw)

    with pytest.raises(DatasetError) as info:
        read_idx(path)

    assert str(path) in str(info.value)
    assert reason in str(info.value)


def _flip_body(data: bytes) -> bytes:
    body = bytearray(data)
    for i in range(20, len(body) - 8):  # past the 10-byte gzip header, before the CRC trailer
        body[i] ^= 0xFF
    return bytes(body)


# Ways a .gz file can be broken: (how to damage gzip.compress(payload))
GZ_DAMAGE: list = [
    pytest.param(lambda gz: b"definitely not gzip", id="not-gzip"),
    pytest.param(lambda gz: gz[: len(gz) // 2], id="stream-cut-short"),
    pytest.param(_flip_body, id="deflate-body-damaged"),
    pytest.param(lambda gz: gz[:-4] + b"\x00\x00\x00\x00", id="wrong-length-trailer"),
]


@pytest.mark.parametrize("damage", GZ_DAMAGE)
def test_corrupt_gzip(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    payload = HAND_IDX[:8] + bytes(range(256)) * 8  # compressible but varied
    path = tmp_path / "data-idx.gz"
    path.write_bytes(damage(gzip.compress(payload)))

    with pytest.raises(DatasetError) as info:
        read_idx(path)

    assert str(path) in str(info.value)
    assert "corrupt gzip" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nothing-here-idx"

    with pytest.raises(DatasetError) as info:
        read_idx(path)

    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


# ---------------------------------------------------------------- load_fashion_mnist


@pytest.mark.parametrize(
    ("split", "prefix"),
    [
        ("train", "train"),  # train-*-idx?-ubyte
        ("test", "t10k"),  # the test files are called t10k-*
    ],
)
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_load_fashion_mnist_from_root(tmp_path: Path, split: str, prefix: str, gz: bool, make_fashion_dir: Callable[...,
                                      dict]) -> None:
    written = make_fashion_dir(tmp_path, gz=gz)

    data = load_fashion_mnist(tmp_path, split)

    np.testing.assert_array_equal(data.images[..., 0], written[f"{prefix}-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.labels, written[f"{prefix}-labels-idx1-ubyte"])
    assert data.images.shape[1:] == (28, 28, 1)  # (N, H, W, C)
    assert data.labels.dtype == np.int64
    assert data.input_shape == (1, 28, 28)
    assert data.num_classes == 10


def test_env_var_chooses_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_fashion_dir: Callable[...,
                                       dict]) -> None:
    written = make_fashion_dir(tmp_path / "env", n_train=7)
    monkeypatch.setenv("FEDSLIM_FASHION_MNIST_DIR", str(tmp_path / "env"))

    data = load_fashion_mnist()

    np.testing.assert_array_equal(data.labels, written["train-labels-idx1-ubyte"])


def test_root_wins_over_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_fashion_dir: Callable[..., dict]) -> None:
    make_fashion_dir(tmp_path / "env", n_train=7)
    make_fashion_dir(tmp_path / "root", n_train=9)
    monkeypatch.setenv("FEDSLIM_FASHION_MNIST_DIR", str(tmp_path / "env"))

    data = load_fashion_mnist(tmp_path / "root")

    assert len(data) == 9


def test_default_directory_is_used_without_root_or_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       make_fashion_dir: Callable[..., dict]) -> None:
    make_fashion_dir(tmp_path, n_train=4)
    monkeypatch.setattr(ds, "DEFAULT_FASHION_MNIST_DIR", str(tmp_path))

    assert len(load_fashion_mnist()) == 4


def test_count_mismatch_names_the_labels_file(tmp_path: Path, make_fashion_dir: Callable[..., dict]) -> None:
    make_fashion_dir(tmp_path, n_train=12)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros(11, dtype=np.uint8))  # one label short

    with pytest.raises(DatasetError) as info:
        load_fashion_mnist(tmp_path)

    assert str(labels) in str(info.value)
    assert "wrong count" in str(info.value)
    assert "11" in str(info.value) and "12" in str(info.value)


@pytest.mark.parametrize(
    ("stem", "array", "reason"),
    [
        # labels 0..9 only
        ("train-labels-idx1-ubyte", np.full(12, 10, dtype=np.uint8), "out of range"),
        # images must be (N, 28, 28) uint8, not a flat vector
        ("train-images-idx3-ubyte", np.zeros(12, dtype=np.uint8), "rank 3"),
        # labels must be a vector
        ("train-labels-idx1-ubyte", np.zeros((12, 1), dtype=np.uint8), "rank-1"),
    ],
)
def test_wrong_content_names_the_file(tmp_path: Path, stem: str, array: np.ndarray, reason: str, make_fashion_dir: Callable[...,
                                      dict]) -> None:
    make_fashion_dir(tmp_path, n_train=12)
    write_idx(tmp_path / f"{stem}.gz", array)

    with pytest.raises(DatasetError) as info:
        load_fashion_mnist(tmp_path)

    assert stem in str(info.value)
    assert reason in str(info.value)


def test_missing_file_in_directory_names_it(tmp_path: Path, make_fashion_dir: Callable[..., dict]) -> None:
    make_fashion_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()

    with pytest.raises(DatasetError) as info:
        load_fashion_mnist(tmp_path)

    assert "train-labels-idx1-ubyte" in str(info.value)
    assert "not found" in str(info.value)


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("/nonexistent", "validation")
