"""The decoder under hostile bytes: only CodecError may come out."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparse_kernels import fuzz
from sparse_kernels.fuzz import close_table, reframe, seeds

REPO = Path(__file__).resolve().parents[2]


def test_seeds_are_valid_payloads() -> None:
    from sparse_kernels import decode

    for s in seeds():
        body = s[1:]
        if s[0] & 4:
            body = close_table(body)
        decode(reframe(body))  # must not raise


def test_mutated_payloads_raise_only_codec_errors() -> None:
    # deterministic mutation fuzzing that runs without atheris
    rng = np.random.default_rng(0)
    corpus = seeds()
    for _ in range(3000):
        s = bytearray(corpus[rng.integers(len(corpus))])
        for _ in range(rng.integers(1, 5)):
            p = int(rng.integers(1, len(s)))
            op = rng.integers(3)
            if op == 0:
                s[p] = int(rng.integers(256))
            elif op == 1:
                del s[p:]
                s += b"\x00"
            else:
                s[p : p + 4] = bytes(rng.choice([0, 1, 127, 128, 255], 4).astype(np.uint8))
        fuzz.test_one_input(bytes(s))  # anything but CodecError fails the test


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_fuzz_for_bounded_time(tmp_path: Path) -> None:
    seconds = int(os.environ.get("FEDSLIM_FUZZ_SECONDS", "12"))
    proc = subprocess.run(
        [
            sys.executable, "-m", "sparse_kernels.fuzz",
            f"-max_total_time={seconds}", "-rss_limit_mb=2048", "-timeout=10", "-seed=1",
            str(tmp_path / "corpus"),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=seconds + 90,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    tail = proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert "Done" in tail and "runs in" in tail, tail
