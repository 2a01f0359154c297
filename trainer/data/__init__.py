"""The data of a run: what the trainer reads (``TrainData``) and its implementations.

- ``protocol``: ``TrainData`` (the interface the trainer uses) and ``microbatch_ranges``
  (the sample layout of a global batch over data-parallel ranks).
- ``build``: ``build_data``, the one entry point; picks the implementation by
  ``data.source`` (``BUILDERS``).
- ``indexed``: ``data.source`` builtin / indexed: Megatron-Core GPT datasets (blends,
  splits) -> ``PretrainData``.
- ``corpus``: Megatron indexed datasets on disk (write/check), the embedded pydoc corpus.
- ``tokenizer``: the sentencepiece ``Tokenizer`` and ``train_tokenizer``.
- ``multimodal``: ``data.source`` multimodal: the embedded captioned digits (and spoken
  digit names, ``assets/``) -> ``MultimodalData``.
- ``mcore``: megatron.core.datasets, imported on first use.
"""

from trainer.data.build import BUILDERS, build_data
from trainer.data.corpus import (
    FORMAT_VERSION,
    builtin_documents,
    check_indexed_dataset,
    document_lines,
    prepare_builtin_corpus,
    resolve_cache_dir,
    write_indexed_dataset,
)
from trainer.data.indexed import PretrainData, build_indexed, parse_blend
from trainer.data.multimodal import DigitDocuments, MultimodalData, build_multimodal
from trainer.data.protocol import TrainData, microbatch_ranges
from trainer.data.tokenizer import SPECIAL_IDS, Tokenizer, train_tokenizer

__all__ = [
    "BUILDERS",
    "FORMAT_VERSION",
    "SPECIAL_IDS",
    "DigitDocuments",
    "MultimodalData",
    "PretrainData",
    "Tokenizer",
    "TrainData",
    "build_data",
    "build_indexed",
    "build_multimodal",
    "builtin_documents",
    "check_indexed_dataset",
    "document_lines",
    "microbatch_ranges",
    "parse_blend",
    "prepare_builtin_corpus",
    "resolve_cache_dir",
    "train_tokenizer",
    "write_indexed_dataset",
]
