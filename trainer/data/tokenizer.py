"""The tokenizer of the pretraining data: sentencepiece (default) or Hugging Face.

- ``Tokenizer``: a sentencepiece ``.model``, or a Hugging Face ``tokenizer.json`` (or a
  directory holding one, as ``save_pretrained`` writes it), with the attributes Megatron's
  GPTDataset reads (``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``).
- ``train_tokenizer``: trains a lossless sentencepiece BPE or unigram model with fixed
  special ids (``SPECIAL_IDS``) and returns its serialized proto.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

from trainer.errors import ConfigError, DataError

# Fixed special ids for tokenizers we train: unk, bos, eos (= document separator), pad.
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}

# End-of-document candidates of a Hugging Face tokenizer without a tokenizer_config.json
# naming its eos_token, first present wins.
HF_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
HF_PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]")


def _hf_files(path: str) -> tuple[str, str | None] | None:
    """(tokenizer.json, tokenizer_config.json or None) if ``path`` is a Hugging Face
    tokenizer (a tokenizer.json file or a directory holding one), else None."""
    if os.path.isdir(path):
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise DataError(
                f"tokenizer directory {path} has no tokenizer.json (expected a Hugging Face "
                "tokenizer directory, a tokenizer.json, or a sentencepiece .model)"
            )
        cfg = os.path.join(path, "tokenizer_config.json")
        return tj, cfg if os.path.isfile(cfg) else None
    if path.endswith(".json"):
        cfg = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        return path, cfg if os.path.isfile(cfg) else None
    return None


# -- tokenizer ----------------------------------------------------------------------------
class Tokenizer:
    """A sentencepiece model or a Hugging Face tokenizer, with the attributes Megatron's
    GPTDataset expects.

    ``eod`` (sentencepiece's eos id; for a Hugging Face tokenizer the ``eos_token`` of its
    tokenizer_config.json, else the first of ``HF_EOS_TOKENS`` it has) separates documents
    in the indexed datasets; ``pad`` is -1 when there is no pad token (Megatron's own "no
    pad" value). ``kind`` is ``"sentencepiece"`` or ``"hf"``.
    """

    def __init__(self, model_path: str | os.PathLike) -> None:
        path = os.fspath(model_path)
        if not os.path.exists(path):
            raise DataError(
                f"tokenizer model {path} not found (expected a sentencepiece .model file, a "
                "Hugging Face tokenizer.json or a directory holding one)"
            )
        hf = _hf_files(path)
        if hf is not None:
            with open(hf[0], "rb") as f:
                data = f.read()
            config = None
            if hf[1] is not None:
                with open(hf[1], "rb") as f:
                    config = f.read()
            self._load_hf(data, config, path)
            return
        with open(path, "rb") as f:
            self._load(f.read(), path)

    def _load_hf(self, data: bytes, config: bytes | None, name: str) -> None:
        try:
            import tokenizers
        except ImportError:
            raise DataError(
                f"{name}: a Hugging Face tokenizer needs the 'tokenizers' package "
                "(pip install tokenizers)"
            ) from None
        try:
            tk = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # tokenizers raises its own Exception subclass
            raise DataError(f"{name}: not a valid Hugging Face tokenizer.json ({err})") from None
        eos = None
        if config is not None:
            try:
                tok_cfg = json.loads(config)
            except ValueError:
                raise DataError(f"{name}: its tokenizer_config.json is not JSON") from None
            eos = tok_cfg.get("eos_token")
            if isinstance(eos, dict):  # AddedToken serialised as a dict
                eos = eos.get("content")
        candidates = [eos] if eos else list(HF_EOS_TOKENS)
        ids = [tk.token_to_id(t) for t in candidates]
        eod = next((i for i in ids if i is not None), None)
        if eod is None:
            raise DataError(
                f"{name}: Hugging Face tokenizer has no end-of-document token (looked for "
                f"{', '.join(candidates)}); add one, or set eos_token in tokenizer_config.json"
            )
        pad = next((i for i in map(tk.token_to_id, HF_PAD_TOKENS) if i is not None), -1)
        self.kind = "hf"
        self.model_path = name
        self._state = {"kind": "hf", "data": data, "config": config, "name": name}
        self._hf = tk
        self._sp = None
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size: int = tk.get_vocab_size(with_added_tokens=True)
        self.eod: int = eod
        self.eos: int = eod
        self.bos: int = -1
        self.unk: int = -1
        self.pad: int = pad
        self.unique_identifiers = OrderedDict(
            [("class", "moefold.Tokenizer"), ("sha256", self.sha256),
             ("vocab_size", self.vocab_size)]
        )

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
        self.kind = "sentencepiece"
        self.model_path = name
        self._state = {"kind": "sentencepiece", "proto": proto, "name": name}
        self._sp = sp
        self._hf = None
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
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._hf is not None:
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if self._hf is not None:
            return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)
        return self._sp.decode([int(i) for i in ids])

    # Megatron-style names.
    tokenize = encode
    detokenize = decode

    def __getstate__(self) -> dict[str, Any]:  # picklable for datasets.map(num_proc=N)
        return self._state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("kind") == "hf":
            self._load_hf(state["data"], state["config"], state["name"])
        else:
            self._load(state["proto"], state["name"])

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model_path!r}, {self.kind}, vocab_size={self.vocab_size}, "
                f"eod={self.eod})")


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
