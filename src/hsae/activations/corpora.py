"""Text sources (built-in WordNet corpus, local text/JSONL/Parquet files, Hugging Face datasets),
the WordNet noun taxonomy loader, and the tokenising builder that packs documents into contexts."""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import itertools
import json
import lzma
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import IO, Any

import numpy as np

from hsae.activations.models import HarvestError

BUILTIN_NAMES = frozenset({"builtin", "wordnet", "default"})
BUILTIN_CORPUS = "wordnet_corpus.txt.xz"
NOUN_TAXONOMY = "wordnet_nouns.tsv.gz"
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)  # JSON lines, or one array of records (or strings)
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet",)
DEFAULT_TEXT_FIELD = "text"
# A folder written by `datasets`' save_to_disk: a Dataset has these two files, a DatasetDict
# has dataset_dict.json and one such folder per split.
_SAVED_DATASET = ("state.json", "dataset_info.json")
_SAVED_DATASET_DICT = "dataset_dict.json"
_COMPRESSIONS = (".gz", ".xz")


_SNIFF_BYTES = 1 << 16  # checked for UTF-8 before a harvest starts; the rest while reading
MAX_PIECE_CHARS = 1 << 16  # longer documents are tokenised in pieces of at most this size
MAX_CALL_CHARS = 1 << 18  # characters per tokenizer call


class CorpusError(HarvestError):
    """A text source is missing, unreadable, empty or of an unsupported kind."""


def _data_file(name: str) -> Path:
    return Path(str(files("hsae").joinpath("data", name)))


# --------------------------------------------------------------------------- text sources


@dataclass(frozen=True)
class TextSource:
    """A named, re-iterable stream of documents (strings)."""

    spec: str
    kind: str
    field: str = DEFAULT_TEXT_FIELD

    def __iter__(self) -> Iterator[str]:
        if self.kind == "builtin":
            return _iter_lines(_data_file(BUILTIN_CORPUS))
        if self.kind == "hf":
            return _iter_hf_dataset(self.spec, self.field)
        if self.kind == "hf_disk":
            return _iter_saved_dataset(Path(self.spec), self.field)
        return _iter_local(Path(self.spec), self.field)

    def describe(self) -> dict[str, str]:
        described = {"spec": self.spec, "kind": self.kind}
        if self.kind != "builtin":
            described["text_field"] = self.field
        return described


def open_corpus(dataset: str | None = None, text_field: str = DEFAULT_TEXT_FIELD) -> TextSource:
    """Resolve a dataset spec: None/"builtin"/"wordnet" (shipped WordNet glosses), a local file or
    folder (.txt, .jsonl, .json lines or array, .csv/.tsv, .parquet, optionally .gz/.xz), a folder
    written by ``datasets``' ``save_to_disk`` (its "train" split if it holds several), or a
    Hugging Face dataset as "hf:NAME[:CONFIG][@SPLIT]" (or a bare "owner/name" that is not a local
    path). ``text_field`` names the column/field holding the text (not used for plain text).

    Local sources are checked now (type, readability, the text field in the first record), not
    mid-harvest."""
    if not isinstance(text_field, str) or not text_field:
        raise CorpusError(f"text_field must be a non-empty column name, got {text_field!r}")
    if dataset is None or dataset in BUILTIN_NAMES:
        return TextSource("builtin", "builtin")
    if dataset.startswith("hf:"):
        return TextSource(dataset[3:], "hf", text_field)
    path = Path(dataset).expanduser()
    if path.exists():
        if _is_saved_dataset(path):
            source = TextSource(str(path), "hf_disk", text_field)
        else:
            _local_files(path)  # validates kind and readability now, not mid-harvest
            source = TextSource(str(path), "local", text_field)
        documents = iter(source)
        try:
            next(documents, None)  # a missing text field or a broken first record, named now
        finally:
            documents.close()  # type: ignore[attr-defined]  # a generator: closes its file
        return source
    if _looks_like_hub_id(dataset):
        return TextSource(dataset, "hf", text_field)
    raise CorpusError(f"dataset {dataset!r}: no such file or folder (use hf:NAME for hub datasets)")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("@")[0].split(":")[0].split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in _COMPRESSIONS:
        name = name.removesuffix(suffix)
    for kind, suffixes in (
        ("text", TEXT_SUFFIXES),
        ("jsonl", JSONL_SUFFIXES),
        ("json", JSON_SUFFIXES),
        ("csv", CSV_SUFFIXES),
        ("parquet", PARQUET_SUFFIXES),
    ):
        if name.endswith(suffixes):
            return kind
    return None


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _kind_of(p) is not None)
        if not found:
            raise CorpusError(
                f"dataset folder {str(path)!r} holds no .txt/.jsonl/.json/.csv/.parquet files "
                "and is no datasets save_to_disk folder"
            )
        return found
    if _kind_of(path) is None:
        raise CorpusError(
            f"dataset file {str(path)!r}: unsupported type (expected .txt, .jsonl, .json, .csv, "
            ".tsv or .parquet, optionally .gz/.xz)"
        )
    try:
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError as exc:
        raise CorpusError(f"dataset file {str(path)!r} is not readable: {exc.strerror}") from exc
    if _kind_of(path) != "parquet" and not path.name.endswith(_COMPRESSIONS):
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            raise CorpusError(f"dataset file {str(path)!r} is not UTF-8 text") from None
    return [path]


def _open_text(path: Path) -> IO[str]:
    # Strict decoding: bytes that are not UTF-8 are refused (see _iter_local), never harvested
    # as replacement characters.
    try:
        if path.name.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
        if path.name.endswith(".xz"):
            return io.TextIOWrapper(lzma.open(path, "rb"), encoding="utf-8")
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise CorpusError(f"dataset file {str(path)!r} is not readable: {exc.strerror}") from exc


def _iter_local(path: Path, field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    for file in _local_files(path):
        kind = _kind_of(file)
        try:
            if kind == "text":
                yield from _iter_paragraphs(file)
            else:
                readers = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv}
                yield from readers.get(kind or "", _iter_parquet)(file, field)
        except UnicodeDecodeError:
            raise CorpusError(f"dataset file {str(file)!r} is not UTF-8 text") from None
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise CorpusError(f"dataset file {str(file)!r} is not readable: {exc}") from exc


def _iter_lines(path: Path) -> Iterator[str]:
    with _open_text(path) as handle:
        for line in handle:
            text = line.strip()
            if text:
                yield text


def _iter_paragraphs(path: Path) -> Iterator[str]:
    """Plain text: documents are separated by blank lines."""
    lines: list[str] = []
    with _open_text(path) as handle:
        for line in handle:
            if line.strip():
                lines.append(line.rstrip("\n"))
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def _iter_jsonl(path: Path, field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{number}: {_no_field(record, field)}")
            if text.strip():
                yield text


def _no_field(record: Any, field: str) -> str:
    """Why a record gives no text: a missing field (naming the ones there) or a wrong type."""
    if not isinstance(record, dict):
        return f"record is a JSON {type(record).__name__}, not an object with a {field!r} field"
    if field in record:
        return f"field {field!r} is not a string ({type(record[field]).__name__})"
    return f"record has no field {field!r} ({_choices(record)})"


def _choices(names: Iterable[Any]) -> str:
    shown = [str(name) for name in names]
    listed = ", ".join(shown[:20]) + (", ..." if len(shown) > 20 else "")
    return f"fields: {listed or 'none'}; choose one with --text-field"


def _iter_json(path: Path, field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """A .json file: JSON lines, or a single array of records (or of strings)."""
    with _open_text(path) as handle:
        head = handle.read(4096).lstrip()
    if not head.startswith("["):
        yield from _iter_jsonl(path, field)
        return
    with _open_text(path) as handle:
        try:
            records = json.load(handle)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    for number, record in enumerate(records):
        text = record if isinstance(record, str) else None
        if isinstance(record, dict):
            text = record.get(field)
        if not isinstance(text, str):
            raise CorpusError(f"{path}: array item {number}: {_no_field(record, field)}")
        if text.strip():
            yield text


def _iter_csv(path: Path, field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """CSV (.csv) or tab-separated (.tsv) with a header row; ``field`` names the column."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # documents can be long
    name = path.name.lower()
    for suffix in _COMPRESSIONS:
        name = name.removesuffix(suffix)
    delimiter = "\t" if name.endswith(".tsv") else ","
    with _open_text(path) as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            columns = reader.fieldnames or []
            if field not in columns:
                raise CorpusError(
                    f"CSV file {str(path)!r} has no column {field!r} ({_choices(columns)})"
                )
            for row in reader:
                text = row.get(field)
                if isinstance(text, str) and text.strip():
                    yield text
        except csv.Error as exc:
            raise CorpusError(f"{path}:{reader.line_num}: invalid CSV ({exc})") from exc


def _iter_parquet(path: Path, column: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise CorpusError(
            f"reading {path.name} needs pyarrow, which is not installed (pip install pyarrow)"
        ) from exc
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise CorpusError(f"dataset file {str(path)!r} is not a readable Parquet file") from exc
    if column not in table.schema_arrow.names:
        raise CorpusError(
            f"Parquet file {str(path)!r} has no column {column!r} "
            f"({_choices(table.schema_arrow.names)})"
        )
    for batch in table.iter_batches(columns=[column]):
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str) and t.strip())


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """(name, config or None, split) of a dataset spec "NAME[:CONFIG][@SPLIT]" (split: train)."""
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    return name, config or None, split or "train"


def _iter_hf_dataset(spec: str, field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError(
            f"dataset {spec!r} needs the `datasets` package, which is not installed "
            "(pip install datasets)"
        ) from exc
    name, config, split = parse_hf_spec(spec)
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorpusError(f"cannot open Hugging Face dataset {spec!r}: {first}") from exc
    for number, record in enumerate(stream):
        if number == 0 and field not in record:
            raise CorpusError(
                f"Hugging Face dataset {spec!r} has no column {field!r} ({_choices(record)})"
            )
        text = record.get(field)
        if isinstance(text, str) and text.strip():
            yield text


def _is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or
    ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (
        (path / _SAVED_DATASET_DICT).is_file() or all((path / f).is_file() for f in _SAVED_DATASET)
    )


def _iter_saved_dataset(path: Path, field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """Texts of a ``save_to_disk`` folder (memory-mapped Arrow, read in batches); of a
    DatasetDict its "train" split, or its only split."""
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError(
            f"dataset folder {str(path)!r} was written by `datasets`, which is not installed "
            "(pip install datasets)"
        ) from exc
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorpusError(f"cannot read the saved dataset {str(path)!r}: {first}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" not in splits and len(splits) != 1:
            raise CorpusError(
                f"saved dataset {str(path)!r} holds the splits {', '.join(splits)} and none is "
                f"'train': give the split's own folder, e.g. {str(path / splits[0])!r}"
            )
        loaded = loaded["train" if "train" in splits else splits[0]]
    if field not in loaded.column_names:
        raise CorpusError(
            f"saved dataset {str(path)!r} has no column {field!r} ({_choices(loaded.column_names)})"
        )
    for batch in loaded.select_columns([field]).iter(batch_size=1024):
        yield from (t for t in batch[field] if isinstance(t, str) and t.strip())


# --------------------------------------------------------------------------- taxonomy


@dataclass(frozen=True)
class NounSynset:
    """One WordNet 3.0 noun synset. Ids look like "n02084071" (pos letter + data-file offset)."""

    synset_id: str
    lexname: str
    lemmas: tuple[str, ...]
    hypernyms: tuple[str, ...]
    instance_hypernyms: tuple[str, ...]

    @property
    def parents(self) -> tuple[str, ...]:
        return self.hypernyms + self.instance_hypernyms


def load_noun_taxonomy() -> dict[str, NounSynset]:
    """The WordNet 3.0 noun taxonomy shipped with hsae (82,115 synsets), keyed by synset id."""
    with _open_text(_data_file(NOUN_TAXONOMY)) as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if header[:3] != ["synset_id", "lexname", "lemmas"]:
            raise CorpusError("the shipped noun taxonomy has an unexpected header")
        taxonomy = {}
        for line in handle:
            synset_id, lexname, lemmas, hypernyms, instances = line.rstrip("\n").split("\t")
            taxonomy[synset_id] = NounSynset(
                synset_id=synset_id,
                lexname=lexname,
                lemmas=tuple(lemmas.split("|")),
                hypernyms=tuple(hypernyms.split()),
                instance_hypernyms=tuple(instances.split()),
            )
    return taxonomy


# --------------------------------------------------------------------------- context builder


@dataclass(frozen=True)
class ContextBatch:
    """`input_ids` [n, context_length] (BOS first when the tokenizer has one, right padding),
    `attention_mask`, `doc_ids` (document index per position, -1 for BOS/padding) and the global
    index of the first context."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    doc_ids: np.ndarray
    first_context: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class ContextBuilder:
    """Tokenises documents in chunks and packs them (separated by a newline) into contexts of
    `context_length` tokens: BOS + `context_length - 1` text tokens. Only the final context of a
    finite corpus is padded. Deterministic: the same corpus gives the same contexts."""

    def __init__(
        self,
        tokenizer: Any,
        context_length: int,
        bos_token_id: int | None,
        pad_token_id: int,
        tokenize_chunk: int = 512,
    ) -> None:
        if context_length < 2:
            raise HarvestError(f"context_length must be at least 2, got {context_length}")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id
        self.tokenize_chunk = tokenize_chunk
        self.text_length = context_length - (1 if bos_token_id is not None else 0)

    def batches(self, documents: Iterable[str], batch_size: int) -> Iterator[ContextBatch]:
        """Batches of `batch_size` contexts (the last one may be smaller)."""
        tokens, docs = _EMPTY_INT, _EMPTY_INT
        next_context, need = 0, batch_size * self.text_length
        for chunk_tokens, chunk_docs in self._token_chunks(documents):
            tokens = np.concatenate([tokens, chunk_tokens])
            docs = np.concatenate([docs, chunk_docs])
            while tokens.size >= need:
                yield self._assemble(tokens[:need], docs[:need], next_context)
                tokens, docs = tokens[need:], docs[need:]
                next_context += batch_size
        if tokens.size:
            yield self._assemble(tokens, docs, next_context)

    def _token_chunks(self, documents: Iterable[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Tokenised pieces, in bounded memory: at most ``tokenize_chunk`` texts and
        MAX_CALL_CHARS characters per tokenizer call; a document longer than MAX_PIECE_CHARS is
        cut into pieces (before a whitespace where there is one), tokenised as they are needed."""
        texts: list[str] = []
        docs: list[int] = []
        chars = 0
        for doc_index, text in enumerate(documents):
            for piece in _pieces(text + "\n", MAX_PIECE_CHARS):
                if texts and chars + len(piece) > MAX_CALL_CHARS:
                    yield self._tokenize(texts, docs)
                    texts, docs, chars = [], [], 0
                texts.append(piece)
                docs.append(doc_index)
                chars += len(piece)
                if len(texts) == self.tokenize_chunk:
                    yield self._tokenize(texts, docs)
                    texts, docs, chars = [], [], 0
        if texts:
            yield self._tokenize(texts, docs)

    def _tokenize(self, texts: list[str], docs: list[int]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum())
        )
        doc_ids = np.repeat(np.asarray(docs, dtype=np.int64), lengths)
        return flat, doc_ids

    def _assemble(self, tokens: np.ndarray, docs: np.ndarray, first_context: int) -> ContextBatch:
        n = -(-tokens.size // self.text_length)
        padded = n * self.text_length
        text = np.full(padded, self.pad_token_id, dtype=np.int64)
        text[: tokens.size] = tokens
        doc_ids = np.full(padded, -1, dtype=np.int64)
        doc_ids[: docs.size] = docs
        mask = np.zeros(padded, dtype=np.int64)
        mask[: tokens.size] = 1
        text, doc_ids, mask = (a.reshape(n, self.text_length) for a in (text, doc_ids, mask))
        if self.bos_token_id is not None:
            text = np.concatenate([np.full((n, 1), self.bos_token_id), text], axis=1)
            doc_ids = np.concatenate([np.full((n, 1), -1), doc_ids], axis=1)
            mask = np.concatenate([np.ones((n, 1), dtype=np.int64), mask], axis=1)
        return ContextBatch(text, mask, doc_ids, first_context)


_EMPTY_INT = np.zeros(0, dtype=np.int64)


def _pieces(text: str, limit: int) -> Iterator[str]:
    """``text`` in pieces of at most ``limit`` characters, each cut just before a whitespace
    in its second half when there is one (so a word is not split across two tokenizer calls)."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        half = start + limit // 2
        cut = max(text.rfind(" ", half, end), text.rfind("\n", half, end))
        if cut <= start:
            cut = end
        yield text[start:cut]
        start = cut
    yield text[start:]
