"""The sentencepiece tokenizer of the pretraining data.

- ``Tokenizer``: a sentencepiece model with the attributes Megatron's GPTDataset reads
  (``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``).
- ``train_tokenizer``: trains a lossless BPE or unigram model with fixed special ids
  (``SPECIAL_IDS``) and returns its serialized proto.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

from trainer.errors import ConfigError, DataError

# Fixed special ids for tokenizers we train: unk, bos, eos (= document separator), pad.
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


# -- tokenizer ----------------------------------------------------------------------------
class Tokenizer:
    """A sentencepiece model with the attributes Megatron's GPTDataset expects.

    ``eod`` (= sentencepiece's eos id) separates documents in the indexed datasets;
    ``pad`` is -1 when the model has no pad piece (Megatron's own "no pad" value).
    """

    def __init__(self, model_path: str | os.PathLike) -> None:
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise DataError(
                f"tokenizer model {path} not found (expected a sentencepiece .model file)"
            )
        with open(path, "rb") as f:
            self._load(f.read(), path)

    @classmethod
    def from_proto(cls, proto: bytes, name: str = "<in-memory tokenizer>") -> Tokenizer:
        tok = cls.__new__(cls)
        tok._load(proto, name)
        return tok

    def _load(self, proto: bytes, name: str) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise DataError(f"{name}: not a valid sentencepiece model ({err})") from None
        if sp.eos_id() < 0:
            raise DataError(
                f"{name}: sentencepiece model has no eos piece (eos_id=-1); it is needed as the "
                "end-of-document token (train it with eos_id >= 0)"
            )
        self.model_path = name
        self._proto = proto
        self._sp = sp
        self.sha256 = hashlib.sha256(proto).hexdigest()
        self.vocab_size: int = sp.get_piece_size()
        self.eod: int = sp.eos_id()
        self.eos: int = self.eod
        self.bos: int = sp.bos_id()
        self.unk: int = sp.unk_id()
        self.pad: int = sp.pad_id() if sp.pad_id() >= 0 else -1
        # Megatron hashes this into its index-cache keys: the model content, not its path.
        self.unique_identifiers = OrderedDict(
            [
                ("class", "moefold.Tokenizer"),
                ("sha256", self.sha256),
                ("vocab_size", self.vocab_size),
            ]
        )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._sp.decode([int(i) for i in ids])

    # Megatron-style names.
    tokenize = encode
    detokenize = decode

    def __getstate__(self) -> dict[str, Any]:  # picklable for datasets.map(num_proc=N)
        return {"proto": self._proto, "name": self.model_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._load(state["proto"], state["name"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def train_tokenizer(
    sentences: Iterable[str],
    vocab_size: int,
    model_type: str = "bpe",
    *,
    num_threads: int = 1,
    max_sentences: int = 0,
    seed: int = 0,
    source: str = "the corpus",
) -> bytes:
    """Train a lossless sentencepiece model and return its serialized proto.

    Identity normalisation, kept whitespace, ``\\n`` as its own piece and byte fallback make
    ``decode(encode(text)) == text`` for any text (code and docs included). With
    ``num_threads=1`` training is deterministic (``seed`` fixes the sentence sample that
    ``max_sentences`` > 0 draws from larger inputs).
    """
    import io

    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ConfigError(f"tokenizer type {model_type!r} is not one of 'bpe', 'unigram'")
    out = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=out,
            model_type=model_type,
            vocab_size=vocab_size,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            character_coverage=0.9999,
            user_defined_symbols=["\n"],
            max_sentence_length=1 << 16,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=max_sentences > 0,
            num_threads=num_threads,
            minloglevel=2,
            **SPECIAL_IDS,
        )
    except RuntimeError as err:
        raise DataError(
            f"training a {model_type} tokenizer with vocab_size={vocab_size} on {source} failed: "
            f"{str(err).strip()}"
        ) from None
    return out.getvalue()


__all__ = ["SPECIAL_IDS", "Tokenizer", "train_tokenizer"]
