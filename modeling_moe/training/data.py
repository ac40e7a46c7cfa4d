"""Data for the training and evaluation CLIs: the embedded default corpus, local / Hub datasets, a byte-level BPE
tokenizer trained on the training text, and packing of tokenized text into fixed-size blocks (as in run_clm.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import chain
from typing import TYPE_CHECKING, Any

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

DEFAULT_CORPUS_NAME = "python-stdlib-pydoc-topics"
# Fixed split of the embedded corpus: every VALIDATION_EVERY-th document (in a fixed order) goes to validation.
VALIDATION_EVERY = 20
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
MIN_BPE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens
_EXTENSIONS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def default_corpus_documents() -> list[str]:
    """The embedded corpus: the Python documentation topics shipped with every CPython (`pydoc_data.topics`).

    Each topic is split into paragraph-sized documents (blank-line separated, merged up to ~1,000 characters) so the
    fixed train/validation split interleaves topics. Order is the sorted topic names, so the split never changes.
    """
    from pydoc_data.topics import topics

    documents: list[str] = []
    for name in sorted(topics):
        current = ""
        for paragraph in topics[name].split("\n\n"):
            if not paragraph.strip():
                continue
            current = f"{current}\n\n{paragraph}" if current else paragraph
            if len(current) >= 1000:
                documents.append(current)
                current = ""
        if current:
            documents.append(current)
    return documents


def default_corpus() -> DatasetDict:
    """`DatasetDict` with a `text` column and a fixed `train` / `validation` split of the embedded corpus."""
    documents = default_corpus_documents()
    train = [d for i, d in enumerate(documents) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    validation = [d for i, d in enumerate(documents) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    return DatasetDict(
        {"train": Dataset.from_dict({"text": train}), "validation": Dataset.from_dict({"text": validation})}
    )


def check_data_file(path: str, argument: str) -> str:
    """The `datasets` builder of data file `path` (an error naming `argument` for a missing, empty or unknown file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`{argument}` {path!r} does not exist or is not a file.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"`{argument}` {path!r} is empty.")
    extension = os.path.splitext(path)[1].lower()
    if extension not in _EXTENSIONS:
        raise ValueError(
            f"`{argument}` {path!r} has extension {extension!r}; expected one of {sorted(_EXTENSIONS)} (txt/json/jsonl/csv)."
        )
    return _EXTENSIONS[extension]


def check_validation_split_percentage(percentage: int) -> None:
    """The share of `train` split off as validation when a dataset has none must leave both splits non-empty."""
    if not 0 < percentage < 100:
        raise ValueError(f"`validation_split_percentage` must be in (0, 100), got {percentage}.")


def load_raw_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    validation_split_percentage: int = 5,
    streaming: bool = False,
    cache_dir: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> DatasetDict | IterableDatasetDict:
    """`train` and `validation` splits from a Hub dataset, local files, or (neither given) the embedded corpus.

    Without a validation split, the first `validation_split_percentage`% of train becomes validation (run_clm.py).
    """
    if dataset_name is not None and (train_file is not None or validation_file is not None):
        raise ValueError("Pass either `dataset_name` or `train_file`/`validation_file`, not both.")
    if dataset_name is None and train_file is None:
        if validation_file is not None:
            raise ValueError("`validation_file` was given without `train_file`.")
        raw = default_corpus()
        if streaming:
            return IterableDatasetDict({split: dataset.to_iterable_dataset() for split, dataset in raw.items()})
        return raw

    load_kwargs: dict[str, Any] = {"cache_dir": cache_dir, "token": token, "streaming": streaming}
    if dataset_name is not None:
        if trust_remote_code:
            load_kwargs["trust_remote_code"] = True
        raw = load_dataset(dataset_name, dataset_config_name, **load_kwargs)
        split_source: dict[str, Any] = {"path": dataset_name, "name": dataset_config_name}
    else:
        data_files = {"train": train_file}
        builder = check_data_file(train_file, "train_file")
        if validation_file is not None:
            if check_data_file(validation_file, "validation_file") != builder:
                raise ValueError(
                    f"`train_file` {train_file!r} and `validation_file` {validation_file!r} must have the same format."
                )
            data_files["validation"] = validation_file
        extra = {"keep_linebreaks": True} if builder == "text" else {}
        raw = load_dataset(builder, data_files=data_files, **extra, **load_kwargs)
        split_source = {"path": builder, "data_files": data_files, **extra}

    if "train" not in raw:
        raise ValueError(f"The dataset has no 'train' split (splits: {list(raw.keys())}).")
    if "validation" not in raw:
        if streaming:
            raise ValueError(
                "A streamed dataset needs its own validation split: pass `validation_file` or a dataset with one."
            )
        check_validation_split_percentage(validation_split_percentage)
        rows = raw["train"].num_rows
        held_out = round(validation_split_percentage * rows / 100)  # the rows of `train[:p%]` (datasets rounds so)
        if not 0 < held_out < rows:
            source = f"`train_file` {train_file!r}" if train_file is not None else f"`dataset_name` {dataset_name!r}"
            raise ValueError(
                f"`validation_split_percentage` {validation_split_percentage}% of the {rows} examples of {source} "
                f"holds out {held_out}, which leaves the validation or the training split empty: pass a validation "
                "split (`validation_file`) or change the percentage."
            )
        raw["validation"] = load_dataset(split=f"train[:{validation_split_percentage}%]", **split_source, **load_kwargs)
        raw["train"] = load_dataset(split=f"train[{validation_split_percentage}%:]", **split_source, **load_kwargs)
    return raw


_STRING_DTYPES = ("string", "large_string")


def resolve_text_column(dataset: Dataset | IterableDataset, text_column_name: str | None) -> str:
    """The column holding the text: `text_column_name` if given, else `text`, else the only string column. A column
    that does not hold strings is an error naming it and its type."""
    features = dataset.features
    first = None if features is not None else next(iter(dataset))
    columns = list(features) if features is not None else list(first.keys())

    def type_of(column: str) -> str:
        if features is not None:
            return str(getattr(features[column], "dtype", type(features[column]).__name__))
        return "string" if isinstance(first[column], str) else type(first[column]).__name__

    if text_column_name is not None:
        if text_column_name not in columns:
            raise ValueError(
                f"`text_column_name` {text_column_name!r} is not a column of the dataset (columns: {columns})."
            )
        column = text_column_name
    elif "text" in columns:
        column = "text"
    else:
        string_columns = [c for c in columns if type_of(c) in _STRING_DTYPES]
        if len(string_columns) != 1:
            raise ValueError(
                f"The dataset has no 'text' column (columns: {columns}); pass `--text_column_name` to name the text "
                "column."
            )
        column = string_columns[0]
    if type_of(column) not in _STRING_DTYPES:
        raise TypeError(f"The text column {column!r} holds {type_of(column)} values, not strings.")
    return column


def iter_texts(dataset: Dataset | IterableDataset, column: str, max_chars: int | None = None) -> Iterator[list[str]]:
    """Batches of non-empty texts of `column`, stopping after `max_chars` characters (for tokenizer training)."""
    seen = 0
    batch: list[str] = []
    for example in dataset:
        text = example[column]
        if not text:
            continue
        batch.append(text)
        seen += len(text)
        if len(batch) == 256:
            yield batch
            batch = []
        if max_chars is not None and seen >= max_chars:
            break
    if batch:
        yield batch


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(name_or_path: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(name_or_path)`; a local folder without any tokenizer file is an error naming the
    folder (rather than a backend message about sentencepiece or tiktoken)."""
    from transformers import AutoTokenizer

    if os.path.isdir(name_or_path) and not any(
        os.path.isfile(os.path.join(name_or_path, name)) for name in _TOKENIZER_FILES
    ):
        raise FileNotFoundError(
            f"{name_or_path!r} holds no tokenizer (none of {list(_TOKENIZER_FILES)}): save the tokenizer with the "
            "model, or name one with `--tokenizer_name`."
        )
    return AutoTokenizer.from_pretrained(name_or_path, **kwargs)


def train_bpe_tokenizer(texts: Iterator[list[str]], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained on `texts`, wrapped as a `PreTrainedTokenizerFast`.

    `<|endoftext|>` is BOS/EOS/UNK (separates packed documents); `<|pad|>` pads. Training is deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ValueError(
            f"The BPE vocabulary must be at least {MIN_BPE_VOCAB_SIZE} (bytes + specials), got {vocab_size}."
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[0],
        unk_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[1],
        model_max_length=model_max_length,
    )


def first_samples(dataset: Dataset | IterableDataset, count: int | None) -> Dataset | IterableDataset:
    """The first `count` examples of `dataset` (all of them for None), streamed or not."""
    if count is None:
        return dataset
    if isinstance(dataset, IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(len(dataset), count)))


def tokenize_and_pack(
    raw: DatasetDict | IterableDatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    block_size: int,
    num_proc: int | None = None,
) -> DatasetDict | IterableDatasetDict:
    """Tokenize every split, append EOS after each document, and pack into `block_size` blocks (run_clm.py).

    The tail that does not fill a block is dropped; `labels` equal `input_ids` (the model shifts them).
    """
    if block_size < 2:
        raise ValueError(f"`block_size` must be at least 2, got {block_size}.")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer([t for t in batch[text_column] if t], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] if eos is not None else x for x in ids]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        concatenated = list(chain(*batch["input_ids"]))
        total = (len(concatenated) // block_size) * block_size
        blocks = [concatenated[i : i + block_size] for i in range(0, total, block_size)]
        return {
            "input_ids": blocks,
            "attention_mask": [[1] * block_size for _ in blocks],
            "labels": [b[:] for b in blocks],
        }

    packed = {}
    for split, dataset in raw.items():
        columns = list(dataset.features) if dataset.features is not None else [text_column]
        map_kwargs: dict[str, Any] = {"batched": True, "remove_columns": columns}
        if isinstance(dataset, Dataset):
            map_kwargs.update(num_proc=num_proc, desc=f"Tokenizing {split}")
        tokenized = dataset.map(tokenize, **map_kwargs)
        group_kwargs: dict[str, Any] = {"batched": True, "batch_size": 1000}
        if isinstance(dataset, Dataset):
            group_kwargs.update(num_proc=num_proc, desc=f"Packing {split} into blocks of {block_size}")
        packed[split] = tokenized.map(group, **group_kwargs)
        if isinstance(packed[split], Dataset) and len(packed[split]) == 0:
            raise ValueError(
                f"The {split!r} split has fewer tokens than one block of {block_size}; lower `block_size` or add text."
            )
    return IterableDatasetDict(packed) if isinstance(raw, IterableDatasetDict) else DatasetDict(packed)
