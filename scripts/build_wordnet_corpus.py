"""Build hsae's built-in offline corpus and noun taxonomy from WordNet 3.0 (Debian `wordnet-base`).

Usage:  apt-get install -y wordnet-base && python scripts/build_wordnet_corpus.py

Writes (through hsae.io, atomically) into src/hsae/data/:
  wordnet_corpus.txt.xz   one document per line: "lemma: gloss; \"example\"" for every synset of
                          every part of speech, in a fixed pseudo-random order (seed 0)
  wordnet_nouns.tsv.gz    the noun taxonomy: synset_id, lexname, lemmas, hypernyms,
                          instance_hypernyms (see hsae.activations.corpora.load_noun_taxonomy)
  WORDNET_LICENSE         WordNet 3.0 license notice (copied from the Debian copyright file)
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import random
from dataclasses import dataclass
from pathlib import Path

from hsae.io import write_with

WORDNET_DIR = Path("/usr/share/wordnet")
COPYRIGHT = Path("/usr/share/doc/wordnet-base/copyright")
DATA_DIR = Path(__file__).resolve().parents[1] / "src" / "hsae" / "data"
POS_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]


@dataclass(frozen=True)
class Synset:
    synset_id: str
    lexname: str
    lemmas: tuple[str, ...]
    hypernyms: tuple[str, ...]
    instance_hypernyms: tuple[str, ...]
    gloss: str


def parse_data_line(line: str, pos: str) -> Synset:
    """Parse one line of a WordNet data.* file (format: wndb(5WN))."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, lex_filenum, n_words = fields[0], int(fields[1]), int(fields[3], 16)
    lemmas = tuple(fields[4 + 2 * i] for i in range(n_words))
    cursor = 4 + 2 * n_words
    n_pointers = int(fields[cursor])
    hypernyms: list[str] = []
    instances: list[str] = []
    for i in range(n_pointers):
        symbol, target, target_pos = fields[cursor + 1 + 4 * i : cursor + 4 + 4 * i]
        if symbol == "@":
            hypernyms.append(f"{target_pos}{target}")
        elif symbol == "@i":
            instances.append(f"{target_pos}{target}")
    return Synset(
        synset_id=f"{pos}{offset}",
        lexname=LEXNAMES[lex_filenum],
        lemmas=lemmas,
        hypernyms=tuple(hypernyms),
        instance_hypernyms=tuple(instances),
        gloss=gloss.strip(),
    )


def read_synsets(wordnet_dir: Path) -> dict[str, list[Synset]]:
    synsets: dict[str, list[Synset]] = {}
    for pos, name in POS_FILES.items():
        lines = (wordnet_dir / name).read_text(encoding="latin-1").splitlines()
        synsets[pos] = [parse_data_line(line, pos) for line in lines if not line.startswith("  ")]
    return synsets


def _clean_lemma(lemma: str) -> str:
    # adjective markers such as "(p)" and the underscore convention for multi-word lemmas
    return lemma.split("(")[0].replace("_", " ")


def corpus_document(synset: Synset) -> str:
    return f"{_clean_lemma(synset.lemmas[0])}: {synset.gloss}"


def taxonomy_row(synset: Synset) -> str:
    return "\t".join(
        [
            synset.synset_id,
            synset.lexname,
            "|".join(synset.lemmas),
            " ".join(synset.hypernyms),
            " ".join(synset.instance_hypernyms),
        ]
    )


def license_notice() -> str:
    text = COPYRIGHT.read_text(encoding="utf-8")
    start = text.index("License: WordNet3.0")
    block = text[start:].split("\n\n")[0]
    body = [line[1:] if line.startswith(" ") else line for line in block.splitlines()[1:]]
    body = ["" if line == "." else line for line in body]
    header = (
        "The built-in corpus (wordnet_corpus.txt.xz) and noun taxonomy (wordnet_nouns.tsv.gz)\n"
        "are derived from WordNet 3.0, Copyright 1996-2012 Cognitive Science Laboratory,\n"
        "Princeton University, distributed under the WordNet 3.0 license:\n\n"
    )
    return header + "\n".join(body).strip() + "\n"


def build(wordnet_dir: Path, out_dir: Path, seed: int = 0) -> None:
    synsets = read_synsets(wordnet_dir)
    documents = [corpus_document(s) for group in synsets.values() for s in group]
    random.Random(seed).shuffle(documents)
    corpus = ("\n".join(documents) + "\n").encode("utf-8")
    taxonomy_header = "synset_id\tlexname\tlemmas\thypernyms\tinstance_hypernyms"
    rows = [taxonomy_header] + [taxonomy_row(s) for s in synsets["n"]]
    taxonomy = ("\n".join(rows) + "\n").encode("utf-8")
    write_with(
        out_dir / "wordnet_corpus.txt.xz",
        lambda tmp: tmp.write_bytes(lzma.compress(corpus, preset=9 | lzma.PRESET_EXTREME)),
    )
    write_with(
        out_dir / "wordnet_nouns.tsv.gz",
        lambda tmp: tmp.write_bytes(gzip.compress(taxonomy, compresslevel=9, mtime=0)),
    )
    write_with(out_dir / "WORDNET_LICENSE", lambda tmp: tmp.write_text(license_notice()))
    n_words = sum(len(d.split()) for d in documents)
    print(f"{len(documents)} documents, {n_words} words; {len(rows) - 1} noun synsets")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=WORDNET_DIR)
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.wordnet_dir, args.out_dir, args.seed)


if __name__ == "__main__":
    main()
