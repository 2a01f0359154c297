"""Embedded multimodal data: captioned handwritten digits (and spoken digit names).

Sources, shipped in ``trainer/data/assets`` (no download):
- ``digits.csv.gz``: the 1,797 8x8 handwritten digits (pixels 0..16) of the UCI "Optical
  Recognition of Handwritten Digits" test set, as bundled by scikit-learn (BSD-3);
- ``speech_digits.npz``: the words "zero".."nine" spoken by espeak-ng in 36 voice/rate/
  pitch variants, quantised to 64 log-mel k-means codes (scripts/prepare_speech_tokens.py).

One document per digit image: a caption (word tokens), the image between BOI/EOI, and in
the three-modality setting the spoken digit name between BOS/EOS speech markers. The
caption comes first 80% of the time (Transfusion's mix), after the image otherwise.

Settings (``data.setting``):
- ``chameleon``: one vocabulary with disjoint id ranges per modality (text words and
  markers | 17 pixel-intensity codes, 64 tokens per image in raster order | 64 speech
  codes); everything is next-token prediction.
- ``transfusion``: each image is 16 positions of 2x2 patches (``patch_dim`` 4, pixels
  scaled to [-1, 1]), noised by DDPM (cosine schedule; one t per image, noise on the
  whole image), attended bidirectionally inside the image (``block_ids``), predicted by
  the diffusion head; no LM loss on image positions.

Packing (this module's equivalent of Megatron's GPT dataset, kept simple because the
documents are tiny): per epoch the documents are shuffled with the seed and packed whole,
greedily, into samples of ``seq_len + 1`` tokens; the tail is padding (loss mask 0).
Every sample carries document ids and per-document positions (packed documents never
attend to each other). Sample order and every random draw are functions of (seed, epoch,
document), so any data-parallel layout sees the same global batches and resuming needs
only ``consumed_samples``.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.diffusion import add_noise, cosine_alphas_cumprod
from trainer.data.protocol import microbatch_ranges
from trainer.errors import ConfigError

ASSETS = Path(__file__).parent / "assets"
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS_BEFORE = (
    "a handwritten digit {}",
    "the number {} written by hand",
    "an image of the digit {}",
    "a scanned {}",
    "here is a {}",
    "a small picture of a {}",
    "someone wrote a {}",
    "digit {} in low resolution",
)
CAPTIONS_AFTER = (
    "this is a {}",
    "the image shows a {}",
    "that was the number {}",
    "above is a handwritten {}",
)
SPECIALS = ("<pad>", "<eod>", "<boi>", "<eoi>", "<bos_speech>", "<eos_speech>")
PIXEL_LEVELS = 17
PATCH = 2  # transfusion: 2x2 patches of the 8x8 image
SETTINGS = ("chameleon", "transfusion")
MODALITIES = ("text", "image", "speech")


@dataclass
class Vocab:
    """Disjoint id ranges: specials and caption words (text) | pixel codes (image) |
    speech codes (speech). The transfusion placeholder under image patches is the first
    image code (its embedding is replaced by the patch embedding)."""

    words: list[str]
    speech_codes: int
    ids: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.ids = {t: i for i, t in enumerate([*SPECIALS, *self.words])}
        self.image_start = len(self.ids)
        self.speech_start = self.image_start + PIXEL_LEVELS
        self.size = self.speech_start + self.speech_codes

    def modality_of(self, tokens: np.ndarray) -> np.ndarray:
        return (tokens >= self.image_start).astype(np.int64) + (tokens >= self.speech_start)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 8, 8] uint8 in 0..16, labels [N])."""
    path = ASSETS / "digits.csv.gz"
    try:
        with gzip.open(path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except OSError as e:
        raise ConfigError(f"cannot read the embedded digits data {path}: {e}") from None
    return rows[:, :64].reshape(-1, 8, 8).astype(np.uint8), rows[:, 64]


def load_speech() -> tuple[list[np.ndarray], np.ndarray, int]:
    """(code sequences, digit of each clip, codebook size)."""
    path = ASSETS / "speech_digits.npz"
    try:
        z = np.load(path)
    except OSError as e:
        raise ConfigError(f"cannot read the embedded speech tokens {path}: {e}") from None
    off = z["offsets"]
    clips = [z["tokens"][off[i] : off[i + 1]].astype(np.int64) for i in range(len(off) - 1)]
    return clips, z["digit"], int(z["codebook_size"])


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in key])


class DigitDocuments:
    """Builds document ``i`` of the embedded set for one setting (deterministic in
    (seed, epoch, i): caption template, order, speech clip, diffusion t and noise)."""

    def __init__(
        self,
        setting: str,
        modalities: list[str],
        seed: int,
        num_timesteps: int,
        caption_first: float,
    ):
        self.setting, self.modalities, self.seed = setting, list(modalities), seed
        self.caption_first = caption_first
        self.images, self.labels = load_digits()
        words = sorted(
            {w for t in CAPTIONS_BEFORE + CAPTIONS_AFTER for w in t.split() if w != "{}"}
            | set(NUMBER_WORDS)
        )
        self.speech = None
        codes = 0
        if "speech" in self.modalities:
            clips, digit, codes = load_speech()
            self.speech = (clips, [np.flatnonzero(digit == d) for d in range(10)])
        self.vocab = Vocab(words, codes)
        self.alphas_cumprod = cosine_alphas_cumprod(num_timesteps).numpy()
        self.num_timesteps = num_timesteps

    @property
    def patch_dim(self) -> int:
        return PATCH * PATCH

    def max_length(self) -> int:
        """An upper bound on any document's length (tokens, EOD included)."""
        words = max(
            len(t.format(w).split()) for t in CAPTIONS_BEFORE + CAPTIONS_AFTER for w in NUMBER_WORDS
        )
        image = 64 if self.setting == "chameleon" else (8 // PATCH) ** 2
        speech = max(len(c) for c in self.speech[0]) + 2 if self.speech is not None else 0
        return words + image + 2 + speech + 1

    def _caption(self, rng: np.random.Generator, before: bool, digit: int) -> list[int]:
        templates = CAPTIONS_BEFORE if before else CAPTIONS_AFTER
        text = templates[rng.integers(len(templates))].format(NUMBER_WORDS[digit])
        return [self.vocab.ids[w] for w in text.split()]

    def document(self, i: int, epoch: int) -> dict[str, np.ndarray]:
        """Token-level arrays of document ``i``: tokens, modality, image (block) index
        (0 = not an image), and for transfusion the patch values x0 [n, P]."""
        v, rng = self.vocab, _rng(self.seed, epoch, i, 7)
        digit = int(self.labels[i])
        caption_first = rng.random() < self.caption_first
        img = self.images[i]
        if self.setting == "chameleon":
            img_tokens = v.image_start + img.reshape(-1).astype(np.int64)
        else:
            img_tokens = np.full((8 // PATCH) ** 2, v.image_start, dtype=np.int64)
        image = [v.ids["<boi>"], *img_tokens.tolist(), v.ids["<eoi>"]]
        parts = [("image", image)]
        if self.speech is not None:
            clips, by_digit = self.speech
            clip = clips[by_digit[digit][rng.integers(len(by_digit[digit]))]]
            parts.append(
                (
                    "speech",
                    [
                        v.ids["<bos_speech>"],
                        *(v.speech_start + clip).tolist(),
                        v.ids["<eos_speech>"],
                    ],
                )
            )
            if rng.random() < 0.5:
                parts.reverse()
        caption = ("text", self._caption(rng, caption_first, digit))
        parts = [caption, *parts] if caption_first else [*parts, caption]
        tokens = np.array([t for _, p in parts for t in p] + [v.ids["<eod>"]], dtype=np.int64)
        modality = v.modality_of(tokens)
        # markers belong to the text modality (Chameleon's BOI/EOI are text-vocab specials)
        is_patch = np.zeros(len(tokens), dtype=bool)
        start = sum(len(p) for name, p in parts[: [n for n, _ in parts].index("image")])
        is_patch[start + 1 : start + 1 + len(img_tokens)] = True
        doc = {"tokens": tokens, "modality": modality, "is_image": is_patch}
        if self.setting == "transfusion":
            x0 = (img.astype(np.float32) / 16.0) * 2 - 1  # [-1, 1]
            x0 = x0.reshape(8 // PATCH, PATCH, 8 // PATCH, PATCH).transpose(0, 2, 1, 3)
            x0 = x0.reshape(-1, PATCH * PATCH)  # patches left-to-right, top-to-bottom
            t = int(rng.integers(self.num_timesteps))
            noise = rng.standard_normal(x0.shape).astype(np.float32)
            xt = add_noise(
                torch.from_numpy(x0),
                torch.from_numpy(noise),
                torch.tensor(t),
                torch.from_numpy(self.alphas_cumprod),
            ).numpy()
            doc.update(x0=x0, xt=xt, noise=noise, t=t)
        return doc


class MultimodalData:
    """Packed samples of :class:`DigitDocuments`, served as the trainer's micro-batches
    (a ``trainer.data.TrainData``: ``train_microbatches`` / ``valid_microbatches``)."""

    def __init__(
        self,
        docs: DigitDocuments,
        *,
        seq_len: int,
        global_batch_size: int,
        valid_fraction: float,
        seed: int,
    ):
        self.docs, self.seq_len, self.global_batch_size = docs, seq_len, global_batch_size
        n = len(docs.labels)
        perm = _rng(seed, 11).permutation(n)
        n_valid = max(1, int(round(n * valid_fraction)))
        self.valid_ids, self.train_ids = perm[:n_valid], perm[n_valid:]
        self.seed = seed
        self._epochs: dict[tuple[str, int], list[list[int]]] = {}
        longest = docs.max_length()
        if longest > seq_len + 1:
            raise ConfigError(
                f"trainer.seq_len={seq_len} is shorter than a {docs.setting} document "
                f"({longest - 1} tokens + 1); use seq_len >= {longest}"
            )

    @property
    def vocab_size(self) -> int:
        return self.docs.vocab.size

    def _packing(self, split: str, epoch: int) -> list[list[int]]:
        key = (split, epoch)
        if key not in self._epochs:
            ids = self.train_ids if split == "train" else self.valid_ids
            order = (
                ids[_rng(self.seed, epoch, 13).permutation(len(ids))] if split == "train" else ids
            )
            samples, cur, used = [], [], 0
            for i in order.tolist():
                n = len(self.docs.document(i, epoch)["tokens"])
                if used + n > self.seq_len + 1 and cur:
                    samples.append(cur)
                    cur, used = [], 0
                cur.append(i)
                used += n
            samples.append(cur)
            self._epochs[key] = samples
        return self._epochs[key]

    def _sample(self, split: str, index: int) -> dict[str, np.ndarray]:
        """Train: sample ``index`` of the epochs laid end to end; valid: the fixed packing
        of the held-out documents, wrapping."""
        epoch = 0
        if split == "valid":
            index %= len(self._packing("valid", 0))
        else:
            while index >= len(packs := self._packing("train", epoch)):
                index -= len(packs)
                epoch += 1
        return self._assemble(
            [self.docs.document(i, epoch) for i in self._packing(split, epoch)[index]]
        )

    def _assemble(self, docs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        L, v = self.seq_len + 1, self.docs.vocab
        out = {
            "tokens": np.full(L, v.ids["<pad>"], dtype=np.int64),
            "modality": np.zeros(L, dtype=np.int64),
            "doc": np.full(L, len(docs), dtype=np.int64),  # padding: its own document
            "pos": np.zeros(L, dtype=np.int64),
            "valid": np.zeros(L, dtype=bool),
            "block": np.zeros(L, dtype=np.int64),
            "is_image": np.zeros(L, dtype=bool),
        }
        P = self.docs.patch_dim
        transfusion = self.docs.setting == "transfusion"
        if transfusion:
            for k in ("xt", "noise"):
                out[k] = np.zeros((L, P), dtype=np.float32)
            out["t"] = np.full(L, -1, dtype=np.int64)
        at = 0
        for d, doc in enumerate(docs):
            n = len(doc["tokens"])
            sl = slice(at, at + n)
            out["tokens"][sl], out["modality"][sl] = doc["tokens"], doc["modality"]
            out["doc"][sl], out["pos"][sl], out["valid"][sl] = d, np.arange(n), True
            out["is_image"][sl] = doc["is_image"]
            if transfusion:
                img = np.flatnonzero(doc["is_image"]) + at
                out["block"][img] = d + 1
                out["xt"][img], out["noise"][img], out["t"][img] = doc["xt"], doc["noise"], doc["t"]
            at += n
        out["pos"][at:] = np.arange(L - at)
        return out

    def _collate(self, samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        s = {k: torch.from_numpy(np.stack([x[k] for x in samples])) for k in samples[0]}
        label_valid = s["valid"][:, 1:]
        loss_mask = label_valid.clone()
        if self.docs.setting == "transfusion":  # image patches are not LM targets
            loss_mask &= ~s["is_image"][:, 1:] & ~s["is_image"][:, :-1]
        batch = {
            "tokens": s["tokens"][:, :-1],
            "labels": s["tokens"][:, 1:],
            "loss_mask": loss_mask.float(),
            "position_ids": s["pos"][:, :-1],
            "doc_ids": s["doc"][:, :-1],
            "modality_ids": s["modality"][:, :-1],
            "loss_modality": s["modality"][:, 1:],
        }
        if self.docs.setting == "transfusion":
            batch.update(
                block_ids=s["block"][:, :-1],
                patches=s["xt"][:, :-1],
                noise=s["noise"][:, :-1],
                timesteps=s["t"][:, :-1],
            )
        return batch

    def _micro(self, split: str, start: int, mbs: int, dp_rank: int, dp_size: int):
        return [
            self._collate([self._sample(split, i) for i in r])
            for r in microbatch_ranges(start, self.global_batch_size, mbs, dp_rank, dp_size)
        ]

    def train_microbatches(
        self, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[dict[str, torch.Tensor]]:
        return self._micro("train", consumed_samples, micro_batch_size, dp_rank, dp_size)

    def valid_microbatches(
        self, iteration: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[dict[str, torch.Tensor]]:
        return self._micro(
            "valid", iteration * self.global_batch_size, micro_batch_size, dp_rank, dp_size
        )


def build_multimodal(
    cfg_data: Any,
    *,
    seq_len: int,
    seed: int,
    global_batch_size: int,
    model_cfg: Any,
    train_samples: int = 0,
    valid_samples: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> MultimodalData:
    """``data.source=multimodal``. Epochs repeat without end and the validation packing
    wraps, so ``train_samples``/``valid_samples`` are not needed; every rank builds the
    same (cheap, in-memory) documents, so neither are ``rank``/``world_size``."""
    del train_samples, valid_samples, rank, world_size
    setting = str(cfg_data.setting)
    if setting not in SETTINGS:
        raise ConfigError(f"data.setting={setting!r} is not one of {SETTINGS}")
    docs = DigitDocuments(
        setting,
        list(cfg_data.modalities),
        seed,
        int(model_cfg.diffusion.num_timesteps),
        float(cfg_data.caption_first),
    )
    if docs.vocab.size > model_cfg.vocab_size:
        raise ConfigError(
            f"data {cfg_data.name} has {docs.vocab.size} tokens but "
            f"model.vocab_size={model_cfg.vocab_size}"
        )
    if setting == "transfusion" and model_cfg.diffusion.patch_dim != docs.patch_dim:
        raise ConfigError(
            f"data.setting=transfusion has {docs.patch_dim}-value patches but "
            f"model.diffusion.patch_dim={model_cfg.diffusion.patch_dim}"
        )
    return MultimodalData(
        docs,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        valid_fraction=float(cfg_data.valid_fraction),
        seed=seed,
    )
