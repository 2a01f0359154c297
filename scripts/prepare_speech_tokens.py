"""Build the shipped speech-token asset ``trainer/data/assets/speech_digits.npz``.

    pip install espeakng-loader        # build-time only, never a moefold dependency
    python -m scripts.prepare_speech_tokens --out trainer/data/assets/speech_digits.npz

The toy three-modality dataset (text, image, speech) needs a "speech" view of the
digit names "zero" .. "nine". This script makes one without any download of audio:

1. It synthesises every word with espeak-ng (``libespeak-ng`` from the
   ``espeakng-loader`` wheel, called through ctypes) in a fixed grid of variants:
   English voices x speaking rates x pitches (36 clips per digit by default).
2. Each clip (espeak's native 22050 Hz, no resampling) becomes a 40-bin log-mel
   spectrogram (25 ms Hann window, 20 ms hop = 50 frames/s) built from plain
   ``torch.stft`` and a hand-made mel filterbank; leading/trailing silence is
   trimmed with a frame-energy threshold relative to the clip's loudest frame.
3. A k-means codebook (``--codes``, default 64; k-means++ init, fixed seed) is fit
   on all standardised frames, and every frame is replaced by its nearest code id.
   Repeated consecutive codes are NOT merged (the token rate stays 50 Hz); a clip
   longer than 48 frames is uniformly subsampled to 48 tokens.

The result is written as an ``.npz`` with the arrays ``tokens`` (int16, all clips
concatenated), ``offsets`` (int64, n_clips + 1), ``digit`` (int64), ``codebook_size``,
``frame_rate_hz`` and ``source`` (a provenance string). The file is committed to the
repository, so training needs neither a download nor espeak-ng. Repeated espeak calls
for the same word differ slightly (the library keeps internal state between calls), but
the sequence is reproducible for a fixed variant order, so rerunning rebuilds the same file.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("en", "en-us", "en-gb-x-rp", "en-029")
RATES_WPM = (130, 165, 200)
PITCHES = (35, 50, 65)  # espeak's 0..100 scale, 50 is the voice default

N_MELS = 40
WIN_S, HOP_S = 0.025, 0.020
N_FFT = 1024  # >= 25 ms at 22050 Hz (551 samples); zero padding only refines the bins
MEL_FMIN, MEL_FMAX = 50.0, 8000.0
SILENCE_DB = 35.0  # frames this far below the clip's loudest frame count as silence
MAX_TOKENS = 48
KMEANS_ITERS = 50

# Constants from speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH = 1, 3
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class Espeak:
    """Minimal ctypes binding: synthesise a word to int16 samples in memory."""

    def __init__(self) -> None:
        try:  # lazy: only this build script needs espeak-ng, never training
            import espeakng_loader
        except ImportError:
            sys.exit(
                "prepare_speech_tokens: needs espeak-ng; run `pip install espeakng-loader` (build-time only)"
            )
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        # The 1.52 library exports espeak_Synth (there is no espeak_Synthesize symbol).
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        # espeak_Initialize takes the directory that *contains* espeak-ng-data.
        data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent, 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate})")
        self.version = lib.espeak_Info(None).decode()
        self._lib = lib
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes frees the trampoline if the Python object dies.
        self._callback = _SYNTH_CALLBACK(self._collect)
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n_samples: int, _events) -> int:
        if n_samples > 0:  # the final call has n_samples == 0 (and wav may be NULL)
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        return 0  # 0 = continue synthesis

    def has_voice(self, voice: str) -> bool:
        return self._lib.espeak_SetVoiceByName(voice.encode()) == 0

    def synth(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        # An unknown voice name silently keeps the previous voice, so check it.
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        self._lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
        self._lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
        self._chunks.clear()
        data = text.encode() + b"\0"
        err = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self._lib.espeak_Synchronize()
        if err != 0 or not self._chunks:
            raise RuntimeError(f"espeak_Synth failed for {text!r} ({voice}, {rate}, {pitch})")
        return np.concatenate(self._chunks)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float
) -> torch.Tensor:
    """Triangular HTK-mel filters, shape (n_mels, n_fft // 2 + 1)."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(fmin)), hz_to_mel(np.array(fmax)), n_mels + 2))
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    # Triangles evaluated at the exact bin frequencies (no rounding to bins), so
    # narrow low-frequency filters never come out empty.
    weights = np.maximum(0.0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))
    return torch.from_numpy(weights).float()


def log_mel_frames(samples: np.ndarray, sample_rate: int, fbank: torch.Tensor) -> torch.Tensor:
    """Silence-trimmed log-mel frames of one clip, shape (n_frames, n_mels)."""
    wave = torch.from_numpy(samples.astype(np.float32) / 32768.0)
    win, hop = round(WIN_S * sample_rate), round(HOP_S * sample_rate)
    spec = torch.stft(
        wave,
        N_FFT,
        hop_length=hop,
        win_length=win,
        window=torch.hann_window(win),
        center=True,
        return_complex=True,
    )
    power = spec.abs().pow(2)  # (freq, frames)
    log_mel = torch.log10(fbank @ power + 1e-8).T * 10.0  # dB
    energy = 10.0 * torch.log10(power.sum(0) + 1e-10)
    loud = torch.nonzero(energy > energy.max() - SILENCE_DB).squeeze(1)
    return log_mel[loud[0] : loud[-1] + 1]


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """Lloyd k-means with k-means++ init; returns the (k, dim) centroids."""
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=gen)]
    for _ in range(k - 1):
        # k-means++: sample far points with probability ~ squared distance, which
        # keeps rare sounds (fricatives, stops) from being swallowed by vowels.
        d2 = torch.cdist(x, centroids).min(1).values.pow(2)
        centroids = torch.cat([centroids, x[torch.multinomial(d2, 1, generator=gen)]])
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        new = sums / counts.clamp(min=1).unsqueeze(1)
        empty = counts == 0
        if empty.any():  # re-seed dead codes at the worst-fit frames
            worst = torch.cdist(x, new).min(1).values.topk(int(empty.sum())).indices
            new[empty] = x[worst]
        if torch.equal(new, centroids):
            break
        centroids = new
    return centroids


def cap_length(codes: np.ndarray, max_len: int = MAX_TOKENS) -> np.ndarray:
    if len(codes) <= max_len:
        return codes
    return codes[np.linspace(0, len(codes) - 1, max_len).round().astype(np.int64)]


def code_histograms(tokens: np.ndarray, offsets: np.ndarray, n_codes: int) -> np.ndarray:
    """Unit-norm code histogram per clip, shape (n_clips, n_codes)."""
    hists = np.stack(
        [np.bincount(tokens[a:b], minlength=n_codes) for a, b in itertools.pairwise(offsets)]
    ).astype(np.float64)
    return hists / np.linalg.norm(hists, axis=1, keepdims=True)


def loo_nearest_centroid_accuracy(hists: np.ndarray, digit: np.ndarray) -> float:
    """Leave-one-out accuracy of classifying clips by cosine to per-digit mean histograms."""
    classes = np.unique(digit)
    sums = np.stack([hists[digit == c].sum(0) for c in classes])
    counts = np.array([(digit == c).sum() for c in classes], dtype=np.float64)
    correct = 0
    for i, (h, d) in enumerate(zip(hists, digit)):
        own = np.searchsorted(classes, d)
        cent = sums.copy()
        n = counts.copy()
        cent[own] -= hists[i]  # the held-out clip must not vote for its own class
        n[own] -= 1
        cent /= n[:, None]
        cent /= np.linalg.norm(cent, axis=1, keepdims=True)
        correct += int(classes[np.argmax(cent @ h)] == d)
    return correct / len(hists)


def build(codes: int, seed: int) -> dict[str, np.ndarray]:
    """Synthesise, featurise and quantise all clips; return the arrays of the asset."""
    tts = Espeak()
    voices = [v for v in VOICES if tts.has_voice(v)]
    if len(voices) < 2:
        raise RuntimeError(f"too few English voices in espeak-ng data: {voices}")
    fbank = mel_filterbank(tts.sample_rate, N_FFT, N_MELS, MEL_FMIN, MEL_FMAX)
    clips: list[torch.Tensor] = []
    digits: list[int] = []
    # One fixed enumeration order: espeak's jitter depends on the call sequence.
    for d, voice, rate, pitch in itertools.product(range(10), voices, RATES_WPM, PITCHES):
        samples = tts.synth(WORDS[d], voice, rate, pitch)
        clips.append(log_mel_frames(samples, tts.sample_rate, fbank))
        digits.append(d)

    frames = torch.cat(clips).double()
    # Standardise each mel bin so k-means distances are not dominated by the
    # loud low-frequency bins.
    mean, std = frames.mean(0), frames.std(0).clamp(min=1e-6)
    centroids = kmeans((frames - mean) / std, codes, seed)
    token_clips = [
        cap_length(torch.cdist((c.double() - mean) / std, centroids).argmin(1).numpy())
        for c in clips
    ]
    lengths = np.array([len(t) for t in token_clips], dtype=np.int64)
    source = (
        f"espeak-ng {tts.version} via espeakng-loader; voices {','.join(voices)}; "
        f"rates {','.join(map(str, RATES_WPM))} wpm; pitches {','.join(map(str, PITCHES))}; "
        f"{tts.sample_rate} Hz, {N_MELS} log-mel bins, 25 ms win / 20 ms hop, silence-trimmed; "
        f"k-means {codes} (seed {seed}); no repeat merging, max {MAX_TOKENS} tokens"
    )
    return {
        "tokens": np.concatenate(token_clips).astype(np.int16),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "digit": np.array(digits, dtype=np.int64),
        "codebook_size": np.array(codes, dtype=np.int64),
        "frame_rate_hz": np.array(1.0 / HOP_S, dtype=np.float64),
        "source": np.array(source),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("trainer/data/assets/speech_digits.npz"))
    parser.add_argument("--codes", type=int, default=64, help="k-means codebook size")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed")
    args = parser.parse_args(argv)
    if not 2 <= args.codes <= np.iinfo(np.int16).max:
        parser.error("--codes must be in [2, 32767] (tokens are stored as int16)")
    torch.manual_seed(args.seed)

    arrays = build(args.codes, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)

    lengths = np.diff(arrays["offsets"])
    hists = code_histograms(arrays["tokens"], arrays["offsets"], args.codes)
    acc = loo_nearest_centroid_accuracy(hists, arrays["digit"])
    used = len(np.unique(arrays["tokens"]))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")
    print(f"source: {arrays['source']}")
    print(
        f"clips: {len(lengths)} ({len(lengths) // 10} per digit), codes used: {used}/{args.codes}"
    )
    print(f"tokens per clip: mean {lengths.mean():.1f}, min {lengths.min()}, max {lengths.max()}")
    print(f"LOO nearest-centroid digit accuracy (code histograms): {acc:.3f} (chance 0.100)")


if __name__ == "__main__":
    main()
