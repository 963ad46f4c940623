"""Build a test set in the competition's own layout, offline: a tokenizer without byte fallback, so <unk> occurs.

The competition's FineWeb shards are written document by document: BOS (id 1), the document's tokens, no EOS, by a
1024-piece SentencePiece BPE trained WITHOUT byte fallback, so a character the tokenizer lacks becomes <unk> (a run
of such characters, one <unk>), which counts 0 bytes and is a boundary under the byte rule. The repo's sample
tokenizer has byte fallback, so no <unk> ever reaches the run on it; this builder makes data that has them.

Text: the sample's CPython docstrings (data/build_sample_dataset.py) in documents of ~2,000 characters, interleaved with glossary documents generated
from Python's own Unicode database: for a range of each of several scripts (accented Latin, Greek, Cyrillic, Hebrew,
Arabic, Devanagari, kana, CJK, Hangul, arrows, mathematical operators, emoji), 16 characters a document, one line
per character, "<char> is <its Unicode name> (U+XXXX)." Each character occurs once or twice in the whole text, below the tokenizer's
character coverage, so it is not in the vocabulary: <unk> in both splits (every 8th document goes to val), between
ordinary space-led pieces. Same Python, same bytes. The tokenizer has the sample's competition settings except byte_fallback=False (and, with
--dummy-prefix, add_dummy_prefix=True).

    python data/build_competition_layout.py --data-dir DIR --tokenizer PATH [--max-chars N] [--dummy-prefix]
"""
from __future__ import annotations

import argparse
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "data"))
from build_sample_dataset import SOURCE, TRAINER_SETTINGS, build, split_document, stdlib_documents  # noqa: E402

SCRIPTS = [  # (name, first code point, last): ranges of named characters
    ("accented Latin", 0x00C0, 0x017F), ("Greek", 0x0391, 0x03C9), ("Cyrillic", 0x0410, 0x044F),
    ("Hebrew", 0x05D0, 0x05EA), ("Arabic", 0x0621, 0x064A), ("Devanagari", 0x0905, 0x0939),
    ("Hiragana", 0x3041, 0x3096), ("CJK", 0x4E00, 0x4E3F), ("Hangul", 0xAC00, 0xAC3F),
    ("arrows", 0x2190, 0x21FF), ("mathematical operators", 0x2200, 0x22FF), ("emoji", 0x1F600, 0x1F64F),
]


def glossaries(name: str, first: int, last: int, per_doc: int = 16) -> list[str]:
    """Documents of per_doc named characters of the range each, one character a line, in prose."""
    named = [cp for cp in range(first, last + 1) if unicodedata.name(chr(cp), "")]
    return [f"Characters of the {name} range, with their names.\n" + "\n".join(
        f"{chr(cp)} is {unicodedata.name(chr(cp)).lower()} (U+{cp:04X})." for cp in named[k:k + per_doc])
        for k in range(0, len(named), per_doc)]


def documents(max_chars: int | None) -> list[str]:
    """The docstring documents, cut to ~2,000 characters, with the glossaries spread evenly among them (so that both
    splits get many)."""
    docs = [part for doc in stdlib_documents(max_chars) for part in split_document(doc, 2000)]
    extra = [doc for script in SCRIPTS for doc in glossaries(*script)]
    extra = [extra[i] for i in sorted(range(len(extra)), key=lambda i: (i * 7919) % len(extra))]  # scripts mixed
    out = []
    for k, doc in enumerate(docs):
        out += [doc] + extra[k * len(extra) // len(docs):(k + 1) * len(extra) // len(docs)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data/datasets/unk_sp1024",
                        help="output folder for the shards and manifest.json")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "data/tokenizers/unk_1024_bpe.model",
                        help="output path of the SentencePiece model")
    parser.add_argument("--max-chars", type=int, default=None, help="docstring characters to take (small builds)")
    parser.add_argument("--shard-tokens", type=int, default=1_000_000, help="tokens per shard file")
    parser.add_argument("--dummy-prefix", action="store_true", help="add_dummy_prefix=True (a space before each text)")
    args = parser.parse_args()
    if args.shard_tokens <= 0 or (args.max_chars is not None and args.max_chars <= 0):
        parser.error("--shard-tokens and --max-chars must be positive")
    settings = dict(TRAINER_SETTINGS, byte_fallback=False, add_dummy_prefix=args.dummy_prefix)
    docs = documents(args.max_chars)
    m = build(args.data_dir.resolve(), args.tokenizer.resolve(), docs, args.shard_tokens, settings,
              SOURCE + ", with glossaries of Unicode characters from unicodedata (no byte fallback: <unk> occurs)",
              is_val=[k % 8 == 3 for k in range(len(docs))])
    print(f"competition-layout dataset: {m['tokens_train']:,} train + {m['tokens_val']:,} val tokens "
          f"({m['docs_train']}+{m['docs_val']} docs, no byte fallback) in {args.data_dir}, tokenizer {args.tokenizer}")


if __name__ == "__main__":
    main()
