"""The shipped speech-digit token asset (built by scripts/prepare_speech_tokens.py)."""

from pathlib import Path

import numpy as np
import pytest

ASSET = Path(__file__).resolve().parents[1] / "trainer" / "data" / "assets" / "speech_digits.npz"


@pytest.fixture(scope="module")
def asset() -> dict[str, np.ndarray]:
    with np.load(ASSET) as npz:  # no allow_pickle: every array, source too, is plain
        return {k: npz[k] for k in npz.files}


def test_layout(asset: dict[str, np.ndarray]) -> None:
    assert set(asset) == {"tokens", "offsets", "digit", "codebook_size", "frame_rate_hz", "source"}
    tokens, offsets, digit = asset["tokens"], asset["offsets"], asset["digit"]
    assert tokens.dtype == np.int16 and offsets.dtype == np.int64 and digit.dtype == np.int64
    assert offsets.shape == (len(digit) + 1,)
    assert offsets[0] == 0 and offsets[-1] == len(tokens)
    assert np.all(np.diff(offsets) > 0), "offsets must increase (no empty clips)"
    assert float(asset["frame_rate_hz"]) > 0
    assert "espeak-ng" in str(asset["source"])


def test_codes_and_digits(asset: dict[str, np.ndarray]) -> None:
    k = int(asset["codebook_size"])
    tokens = asset["tokens"]
    assert tokens.min() >= 0 and tokens.max() < k
    counts = np.bincount(asset["digit"], minlength=10)
    assert counts.shape == (10,) and counts.min() >= 10, counts


def test_tokens_carry_word_identity(asset: dict[str, np.ndarray]) -> None:
    # Clips of the same word (other voice/rate/pitch) should share more codes
    # than clips of different words; random or constant tokens would fail this.
    k = int(asset["codebook_size"])
    offsets, digit = asset["offsets"], asset["digit"]
    hists = np.stack(
        [np.bincount(asset["tokens"][a:b], minlength=k) for a, b in zip(offsets[:-1], offsets[1:])]
    ).astype(np.float64)
    hists /= np.linalg.norm(hists, axis=1, keepdims=True)
    sim = hists @ hists.T
    same = digit[:, None] == digit[None, :]
    off_diag = ~np.eye(len(digit), dtype=bool)
    within = sim[same & off_diag].mean()
    across = sim[~same].mean()
    assert within > across, (within, across)
