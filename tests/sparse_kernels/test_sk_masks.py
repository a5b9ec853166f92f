"""Mask artifacts (`sparse_kernels.masks`): decode(encode(m)) == m, canonical bytes, and
every hostile input an agent could be served rejected with a typed, named error.

Mutations these tests kill (each named at its test): encoding the pruned set instead of the
kept one, dropping the "+1 values" check, dropping the `names` coverage check, decoding
without the model's shapes (`expected=None`).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from sparse_kernels import (
    CodecError,
    DeltaMeta,
    MalformedIndices,
    MalformedPayload,
    ModelDelta,
    ShapeMismatch,
    SparseTensor,
    TruncatedPayload,
    encode,
)
from sparse_kernels._indexcodes import gaps_of, rice_encode
from sparse_kernels.masks import apply_mask_patch, decode_masks, encode_masks, mask_digest, mask_patch

RNG = np.random.default_rng(0)
SHAPES = {"conv.weight": (8, 4, 3, 3), "fc.weight": (10, 64)}


def _random_masks(density: float) -> dict[str, np.ndarray]:
    return {n: RNG.random(s) < density for n, s in SHAPES.items()}


@pytest.mark.parametrize("masks", [
    _random_masks(0.1),  # FedDIP/FedTiny's end density: Rice gaps
    _random_masks(0.7),  # AutoFLIP's: bitmap (+zlib) wins
    {n: np.zeros(s, bool) for n, s in SHAPES.items()},  # everything pruned: nnz 0
    {n: np.ones(s, bool) for n, s in SHAPES.items()},  # dense layers: no index bytes
    {"one": np.array([True]), "none": np.array([False])},  # one-entry tensors
])
def test_round_trip_is_exact_and_canonical(masks: dict[str, np.ndarray]) -> None:
    """Kills: encoding `~m` (the pruned set) or an off-by-one in the kept indices."""
    # Arrange / Act
    data = encode_masks(masks)
    out = decode_masks(data, shapes={n: m.shape for n, m in masks.items()}, names=list(masks))

    # Assert: same names, shapes, bits; the same masks give the same bytes (the digest names them)
    assert list(out) == list(masks)
    for n, m in masks.items():
        assert out[n].dtype == bool and out[n].shape == m.shape
        np.testing.assert_array_equal(out[n], m)
    assert encode_masks({n: m.copy() for n, m in masks.items()}) == data
    assert mask_digest(data) == mask_digest(bytes(data)) and len(mask_digest(data)) == 64


def test_size_is_near_the_index_bound_at_ten_percent() -> None:
    # 10% of 100k: log2 C(n, k) is ~46.9 kbit; Rice + one value bit per kept entry stays within 1.3x of it + 1 bit
    m = {"w": RNG.random(100_000) < 0.1}
    k = int(m["w"].sum())
    from math import lgamma, log

    bound_bits = (lgamma(100_001) - lgamma(k + 1) - lgamma(100_001 - k)) / log(2)
    assert len(encode_masks(m)) * 8 <= 1.3 * bound_bits + k


def _crafted(tensors: list[SparseTensor], *, values: str = "ternary", kind: str = "model") -> bytes:
    meta = DeltaMeta("f", 1, 1, 0, kind)
    return encode(ModelDelta(meta, tuple(tensors)), values=values)  # type: ignore[arg-type]


def _reframe_rice(name: str, shape: tuple[int, ...], idx: list[int]) -> bytes:
    """A mask payload whose Rice indices point past the tensor: built by hand (the encoder
    refuses it), in the layout of docs/wire-format.md."""
    ibytes = rice_encode(gaps_of(np.asarray(idx, dtype=np.int64)), 0)
    vbytes = bytes((len(idx) + 7) // 8)  # ternary signs, all +
    nb = name.encode()
    rec = (struct.pack("<H", len(nb)) + nb + struct.pack("<B", len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
           + struct.pack("<IBBBBfII", len(idx), 1, 3, 0, 0, 1.0, len(ibytes), len(vbytes)))
    z = zlib.compress(rec)
    payload = struct.pack("<BHQQQIII", 1, 1, 1, 1, 0, 1, len(rec), len(z)) + b"f" + z + ibytes + vbytes
    return struct.pack("<4sHHQI", b"FSDL", 1, 0, len(payload), zlib.crc32(payload)) + payload


GOOD = encode_masks({"fc.weight": RNG.random((10, 64)) < 0.2})


@pytest.mark.parametrize(("data", "shapes", "names", "error", "says"), [
    # truncated in transit: the header's payload length is checked before anything is read
    (GOOD[:-3], {"fc.weight": (10, 64)}, None, TruncatedPayload, "payload bytes"),
    # a mask of another model: shape differs (kills: decoding with expected=None)
    (GOOD, {"fc.weight": (64, 10)}, None, ShapeMismatch, "shape"),
    # a tensor the model does not have
    (GOOD, {"conv.weight": (8, 4, 3, 3)}, None, ShapeMismatch, "not a tensor of this model"),
    # the artifact must cover the method's masked weights exactly (kills: dropping the names check)
    (GOOD, SHAPES, list(SHAPES), ShapeMismatch, "missing ['conv.weight']"),
    # an index past the end of the tensor (kept position 70 of 64)
    (_reframe_rice("w", (64,), [3, 70]), {"w": (64,)}, None, MalformedIndices, "w:"),
    # not a mask: real-valued (kills: dropping the +1 check)
    (_crafted([SparseTensor("w", (4,), np.array([0, 2]), np.array([0.5, 2.0]))], values="fp32"),
     {"w": (4,)}, None, MalformedPayload, "+1"),
    # not a mask: a -1 sign
    (_crafted([SparseTensor("w", (4,), np.array([0, 2]), np.array([1.0, -1.0]))]),
     {"w": (4,)}, None, MalformedPayload, "+1"),
    # a delta payload served where a mask was asked for
    (_crafted([SparseTensor("w", (4,), np.array([1]), np.array([1.0]))], kind="delta"),
     {"w": (4,)}, None, MalformedPayload, "kind"),
])
def test_hostile_inputs_are_rejected_with_a_clear_error(data: bytes, shapes: dict[str, tuple[int, ...]],
                                                        names: list[str] | None, error: type[CodecError],
                                                        says: str) -> None:
    with pytest.raises(error) as exc:
        decode_masks(data, shapes=shapes, names=names)
    assert isinstance(exc.value, CodecError) and says in str(exc.value)


def test_a_mask_patch_moves_the_held_mask_to_the_new_one_only() -> None:
    """Kills: `apply_mask_patch` OR-ing instead of XOR-ing (regrown bits would stay set
    but pruned ones never clear), and a patch kept although it came from another base."""
    # Arrange: 10% masks that move a little (prune-and-grow of one layer, FedTiny-style)
    old = {**_random_masks(0.1), "fc.weight": RNG.random((100, 1000)) < 0.1}
    new = {n: m.copy() for n, m in old.items()}
    flat = new["fc.weight"].reshape(-1)
    flat[np.flatnonzero(flat)[:5]] = False  # 5 pruned
    flat[np.flatnonzero(~flat)[:5]] = True  # 5 grown
    shapes = {n: m.shape for n, m in old.items()}

    # Act
    patch = mask_patch(old, new)
    assert patch is not None
    patched = apply_mask_patch(encode_masks(old), patch, shapes=shapes)

    # Assert: exactly the new artifact (same sha256), from far fewer bytes than it
    assert patched == encode_masks(new)
    assert len(patch) < len(encode_masks(new)) / 20
    other = {n: ~m for n, m in old.items()}  # another base: the result is not the named mask
    assert mask_digest(apply_mask_patch(encode_masks(other), patch, shapes=shapes)) != mask_digest(encode_masks(new))
    # masks over other weights have no patch
    assert mask_patch(old, {"fc.weight": new["fc.weight"]}) is None
    with pytest.raises(ShapeMismatch):  # a patch over other weights is refused
        apply_mask_patch(encode_masks({"fc.weight": old["fc.weight"]}), patch, shapes=shapes)
