"""Text sources, the WordNet corpus and taxonomy, and the context builder (no model needed)."""

from __future__ import annotations

import gzip
import json
from itertools import islice

import numpy as np
import pytest

from hsae.activations import ContextBuilder, CorpusError, load_noun_taxonomy, open_corpus


class CharTokenizer:
    """Stand-in tokenizer: one token per character (code point)."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_builtin_corpus_is_wordnet_glosses():
    docs = list(islice(open_corpus(None), 2000))
    assert len(docs) == 2000 and all(": " in d for d in docs)
    assert open_corpus("wordnet").kind == "builtin"


def test_noun_taxonomy():
    taxonomy = load_noun_taxonomy()
    assert len(taxonomy) == 82115
    dog = taxonomy["n02084071"]
    assert "dog" in dog.lemmas and dog.lexname == "noun.animal"
    assert "n02083346" in dog.hypernyms  # canine
    assert taxonomy["n00001740"].hypernyms == ()  # entity is the root
    einstein = next(s for s in taxonomy.values() if "Albert_Einstein" in s.lemmas)
    assert einstein.instance_hypernyms and einstein.parents == einstein.instance_hypernyms
    assert all(p in taxonomy for s in islice(taxonomy.values(), 5000) for p in s.parents)


def test_local_text_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"text": "third"}) + "\n" + json.dumps({"text": "fourth"}) + "\n")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["fifth", "sixth"]}), tmp_path / "c.parquet")
    assert list(open_corpus(str(tmp_path / "a.txt"))) == ["first doc\nstill first", "second doc"]
    assert list(open_corpus(str(tmp_path / "b.jsonl.gz"))) == ["third", "fourth"]
    assert list(open_corpus(str(tmp_path / "c.parquet"))) == ["fifth", "sixth"]
    assert len(list(open_corpus(str(tmp_path)))) == 6


def test_bad_local_sources_have_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="no such file or folder"):
        open_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "data.xlsx").write_text("x")  # (.csv is a supported type since issue 15)
    with pytest.raises(CorpusError, match="unsupported type"):
        open_corpus(str(tmp_path / "data.xlsx"))
    (tmp_path / "broken.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(CorpusError, match="not readable"):
        list(open_corpus(str(tmp_path / "broken.txt.gz")))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: invalid JSON"):
        list(open_corpus(str(tmp_path / "bad.jsonl")))


def test_hub_dataset_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pytest.importorskip("datasets")
    source = open_corpus("hf:no-such-owner/no-such-dataset")
    with pytest.raises(CorpusError, match="cannot open Hugging Face dataset") as info:
        next(iter(source))
    assert "\n" not in str(info.value)


def test_context_builder_packs_documents():
    builder = ContextBuilder(CharTokenizer(), context_length=5, bos_token_id=1, pad_token_id=0)
    batches = list(builder.batches(["abc", "defgh", "ij"], batch_size=2))
    ids = np.concatenate([b.input_ids for b in batches])
    docs = np.concatenate([b.doc_ids for b in batches])
    mask = np.concatenate([b.attention_mask for b in batches])
    assert [b.first_context for b in batches] == [0, 2]
    assert (ids[:, 0] == 1).all() and (docs[:, 0] == -1).all()
    text = "".join(chr(t) for t in ids[:, 1:][mask[:, 1:] == 1])
    assert text == "abc\ndefgh\nij\n"
    assert docs[:, 1:][mask[:, 1:] == 1].tolist() == [0] * 4 + [1] * 6 + [2] * 3
    assert ids.shape == (4, 5) and mask[-1].tolist() == [1, 1, 0, 0, 0]


class RecordingTokenizer(CharTokenizer):
    """CharTokenizer that remembers how many characters each call was given."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, texts, add_special_tokens=False):
        self.calls.append(sum(len(t) for t in texts))
        return super().__call__(texts, add_special_tokens)


def test_a_huge_single_line_is_tokenised_in_bounded_pieces(tmp_path):
    from hsae.activations.corpora import MAX_CALL_CHARS

    words = np.random.default_rng(0).choice(["alpha", "beta", "gamma"], 2_000_000)
    (tmp_path / "line.txt").write_text(" ".join(words))  # about 11 MB, one line, one document
    tokenizer = RecordingTokenizer()
    builder = ContextBuilder(tokenizer, context_length=32, bos_token_id=1, pad_token_id=0)
    batches = list(islice(builder.batches(open_corpus(str(tmp_path / "line.txt")), 8), 8))
    assert sum(b.attention_mask.sum() for b in batches) == 8 * 8 * 32  # 2,048 tokens
    assert max(tokenizer.calls) <= MAX_CALL_CHARS  # never the whole 11 MB at once
    assert sum(tokenizer.calls) <= 2 * MAX_CALL_CHARS  # only what the 2,048 tokens needed
    assert all(set(np.unique(b.doc_ids).tolist()) == {-1, 0} for b in batches)  # one document


def test_pieces_of_a_long_document_give_the_same_tokens(tmp_path):
    text = "word " * 100_000
    builder = ContextBuilder(CharTokenizer(), context_length=64, bos_token_id=None, pad_token_id=0)
    ids = np.concatenate([b.input_ids[b.attention_mask == 1] for b in builder.batches([text], 4)])
    assert "".join(map(chr, ids)) == text + "\n"


def test_text_that_is_not_utf8_is_refused_naming_the_file(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp_path / "noise.txt").write_bytes(noise)
    with pytest.raises(CorpusError, match="noise.txt' is not UTF-8 text"):
        open_corpus(str(tmp_path / "noise.txt"))
    # Bad bytes past the part checked up front are refused while reading.
    (tmp_path / "late.txt").write_bytes(b"fine text\n" * 20_000 + b"\xff\xfe bad\n")
    with pytest.raises(CorpusError, match="late.txt' is not UTF-8 text"):
        list(open_corpus(str(tmp_path / "late.txt")))
    with gzip.open(tmp_path / "noise.jsonl.gz", "wb") as handle:
        handle.write(noise)
    with pytest.raises(CorpusError, match="noise.jsonl.gz' is not UTF-8 text"):
        list(open_corpus(str(tmp_path / "noise.jsonl.gz")))


# --------------------------------------------------------------------------- any dataset


def test_saved_dataset_folder_is_read_with_its_text_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = {"body": ["first text", "  ", "second text"], "label": [0, 1, 2]}
    datasets.Dataset.from_dict(table).save_to_disk(str(tmp_path / "ds"))
    source = open_corpus(str(tmp_path / "ds"), text_field="body")
    assert source.kind == "hf_disk" and source.describe()["text_field"] == "body"
    assert list(source) == ["first text", "second text"]
    with pytest.raises(CorpusError, match="no column 'text'.*fields: body, label") as info:
        open_corpus(str(tmp_path / "ds"))  # refused up front, listing the columns
    assert "--text-field" in str(info.value) and "invalid JSON" not in str(info.value)


def test_saved_dataset_dict_takes_train_or_its_only_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {
        "train": datasets.Dataset.from_dict({"text": ["a train doc"]}),
        "test": datasets.Dataset.from_dict({"text": ["a test doc"]}),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "both"))
    assert list(open_corpus(str(tmp_path / "both"))) == ["a train doc"]
    assert list(open_corpus(str(tmp_path / "both" / "test"))) == ["a test doc"]  # a split folder
    datasets.DatasetDict({"validation": splits["test"]}).save_to_disk(str(tmp_path / "one"))
    assert list(open_corpus(str(tmp_path / "one"))) == ["a test doc"]
    no_train = {"validation": splits["test"], "test": splits["test"]}
    datasets.DatasetDict(no_train).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(CorpusError, match="splits validation, test and none is 'train'") as info:
        open_corpus(str(tmp_path / "two"))
    assert "two/validation" in str(info.value) and "\n" not in str(info.value)


def test_json_array_and_json_lines_with_a_text_field(tmp_path):
    records = [{"content": "one", "id": 1}, {"content": "two", "id": 2}]
    (tmp_path / "array.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "strings.json").write_text(json.dumps(["plain one", "plain two"]))
    for name in ("array.json", "lines.json", "lines.jsonl"):
        assert list(open_corpus(str(tmp_path / name), text_field="content")) == ["one", "two"]
        with pytest.raises(CorpusError, match="no field 'text' .fields: content, id; choose"):
            open_corpus(str(tmp_path / name))
    assert list(open_corpus(str(tmp_path / "strings.json"))) == ["plain one", "plain two"]
    (tmp_path / "bad.json").write_text('[{"text": "ok"},\n {oops}]')
    with pytest.raises(CorpusError, match=r"bad.json:2: invalid JSON"):
        open_corpus(str(tmp_path / "bad.json"))
    (tmp_path / "number.json").write_text('[{"text": 5}]')
    with pytest.raises(CorpusError, match="array item 0: field 'text' is not a string"):
        open_corpus(str(tmp_path / "number.json"))


def test_csv_and_tsv_with_a_text_field(tmp_path):
    import csv

    with open(tmp_path / "t.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "review"])
        writer.writerow([1, 'a long review, with a comma and "quotes"\nand a second line'])
        writer.writerow([2, ""])
        writer.writerow([3, "short"])
    with gzip.open(tmp_path / "t.tsv.gz", "wt") as handle:
        handle.write("review\tid\nfirst\t1\nsecond\t2\n")
    expected = ['a long review, with a comma and "quotes"\nand a second line', "short"]
    assert list(open_corpus(str(tmp_path / "t.csv"), text_field="review")) == expected
    assert list(open_corpus(str(tmp_path / "t.tsv.gz"), text_field="review")) == ["first", "second"]
    with pytest.raises(CorpusError, match="t.csv' has no column 'text' .fields: id, review"):
        open_corpus(str(tmp_path / "t.csv"))
    assert len(list(open_corpus(str(tmp_path), text_field="review"))) == 4  # a folder of both


def test_parquet_with_a_text_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc": ["x1", "x2"], "n": [1, 2]}), tmp_path / "d.parquet")
    assert list(open_corpus(str(tmp_path / "d.parquet"), text_field="doc")) == ["x1", "x2"]
    with pytest.raises(CorpusError, match="no column 'text' .fields: doc, n"):
        open_corpus(str(tmp_path / "d.parquet"))


def test_empty_text_field_is_refused():
    with pytest.raises(CorpusError, match="text_field"):
        open_corpus("builtin", text_field="")
