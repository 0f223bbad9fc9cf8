"""Data: SFT, preference, unpaired and prompt datasets -> fixed-shape NumPy batches for the jitted steps.

    load_dataset(source, kind=..., tokenizer=..., config=TokenizeConfig(...))   # read, validate, tokenize
    BatchIterator(dataset, BatchConfig(...))                                     # shuffle, shard, pack, resume

Batch layouts are documented in `rlhf_jax.data.batches`; the synthetic tasks in
`rlhf_jax.data.synthetic`.
"""

from rlhf_jax.data.batches import batch_spec, collate, segment_last_index, segment_sums
from rlhf_jax.data.dataset import Ragged, TokenizedDataset, load_dataset
from rlhf_jax.data.formats import DataError, RowRef, parse_row
from rlhf_jax.data.iterators import BatchConfig, BatchIterator
from rlhf_jax.data.offline_tokenizer import OFFLINE_VOCAB_SIZE, offline_tokenizer, save_offline_tokenizer
from rlhf_jax.data.packing import RowPacker, pack_rows
from rlhf_jax.data.sources import TFDSSource, read_rows
from rlhf_jax.data.synthetic import ArithmeticTask, VowelTask
from rlhf_jax.data.tfds_preferences import write_tfds_preferences
from rlhf_jax.data.tokenize import TokenizeConfig, TokenizedSequence, load_tokenizer, tokenize_sequences

__all__ = [
    "ArithmeticTask",
    "BatchConfig",
    "BatchIterator",
    "DataError",
    "OFFLINE_VOCAB_SIZE",
    "Ragged",
    "RowPacker",
    "RowRef",
    "TFDSSource",
    "TokenizeConfig",
    "TokenizedDataset",
    "TokenizedSequence",
    "VowelTask",
    "batch_spec",
    "collate",
    "load_dataset",
    "load_tokenizer",
    "offline_tokenizer",
    "pack_rows",
    "parse_row",
    "read_rows",
    "save_offline_tokenizer",
    "segment_last_index",
    "segment_sums",
    "tokenize_sequences",
    "write_tfds_preferences",
]
