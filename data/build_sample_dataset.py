"""Build the offline sample dataset: real text from CPython's own standard library, FineWeb layout.

No network needed. The text is the docstrings and comments (with def/class signatures) of the
standard-library .py sources of the Python running this script, read in sorted path order, so two
builds with the same Python give byte-identical files. A SentencePiece BPE tokenizer (vocab 1024,
trained with the competition's fineweb_1024_bpe settings) encodes it; each document starts with
BOS, as in the competition shards; whole documents go to val (>= 10% of tokens) or train.

    python data/build_sample_dataset.py [--data-dir DIR] [--tokenizer PATH] [--max-chars N]
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import shutil
import sys
import sysconfig
import time
import tokenize
from pathlib import Path

import numpy as np
import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from train_gpt import read_shard_header, write_atomic  # noqa: E402
from data.shards import write_shard  # noqa: E402

VOCAB_SIZE = 1024
SEED = 1337
MAX_DOC_CHARS = 16_000  # longer modules are split into several documents at paragraph breaks
VAL_SHARE = 0.12  # of characters, so val tokens stay safely >= 10%
MIN_VAL_TOKEN_SHARE = 0.10
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
# The competition's fineweb_1024_bpe trainer settings (ids: pad 0, bos 1, eos 2, unk 3).
TRAINER_SETTINGS = dict(
    model_type="bpe", vocab_size=VOCAB_SIZE, character_coverage=0.999, byte_fallback=True,
    split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
    pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
)


def stdlib_sources(stdlib: Path) -> list[Path]:
    """The standard library's .py files in sorted order, without test suites and installed packages."""
    return [p for p in sorted(stdlib.rglob("*.py"))
            if not SKIP_DIRS.intersection(p.relative_to(stdlib).parts[:-1])]


def _comment_text(line: str) -> str | None:
    """A comment's prose, or None for shebangs, encoding cookies and rules like '# ------'."""
    text = line.lstrip("#!").strip()
    if line.startswith("#!") or ("coding" in text[:20] and ":" in text) or not any(c.isalpha() for c in text):
        return None
    return text


def module_text(source: str) -> str:
    """Docstrings (with each def/class signature) and comment blocks of one module, in source order."""
    tree = ast.parse(source)
    lines = source.splitlines()
    pieces: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if isinstance(node, ast.Module):
            if doc:
                pieces.append((0, doc))
            continue
        header = "\n".join(line.strip() for line in lines[node.lineno - 1:node.body[0].lineno - 1])
        pieces.append((node.lineno, header + ("\n" + doc if doc else "")))
    block: list[str] = []
    block_line = 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and (text := _comment_text(tok.string)) is not None:
            block_line = block_line or tok.start[0]
            block.append(text)
        elif tok.type not in (tokenize.NL, tokenize.COMMENT) and block:
            pieces.append((block_line, " ".join(block)))
            block, block_line = [], 0
    if block:
        pieces.append((block_line, " ".join(block)))
    pieces.sort(key=lambda p: p[0])
    return "\n\n".join(text for _, text in pieces)


def split_document(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut a long text at paragraph breaks into documents of at most ~max_chars characters."""
    docs, current = [], ""
    for para in text.split("\n\n"):
        if current and len(current) + len(para) + 2 > max_chars:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        docs.append(current)
    return docs


def collect_documents(stdlib: Path, max_chars: int | None) -> list[str]:
    """All documents of the corpus, in a fixed order, stopping once max_chars characters are reached."""
    docs, total = [], 0
    for path in stdlib_sources(stdlib):
        try:
            text = module_text(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, tokenize.TokenError):
            continue  # a few stdlib files are deliberately invalid or not UTF-8
        for doc in split_document(text):
            if len(doc) < 200:
                continue  # near-empty modules carry no prose
            docs.append(doc)
            total += len(doc)
            if max_chars is not None and total >= max_chars:
                return docs
    return docs


def split_val(docs: list[str]) -> list[bool]:
    """Deterministic interleaved split: a document goes to val while val holds < VAL_SHARE of the characters."""
    is_val, val_chars, all_chars = [], 0, 0
    for doc in docs:
        all_chars += len(doc)
        to_val = val_chars < VAL_SHARE * all_chars
        val_chars += len(doc) if to_val else 0
        is_val.append(to_val)
    return is_val


def train_tokenizer(texts: list[str], settings: dict = TRAINER_SETTINGS) -> bytes:
    """Serialized SentencePiece model trained single-threaded with a fixed seed (reproducible bytes)."""
    spm.set_random_generator_seed(SEED)
    model = io.BytesIO()
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, num_threads=1,
                                   max_sentence_length=8192, minloglevel=2, **settings)
    return model.getvalue()


def encode_documents(sp: spm.SentencePieceProcessor, docs: list[str]) -> np.ndarray:
    """One token stream: BOS, then the document's tokens, for every document."""
    bos = sp.bos_id()
    ids = [[bos] + ids for ids in sp.encode(docs, out_type=int)]
    return np.fromiter((t for doc in ids for t in doc), dtype=np.uint16)


def write_split(out_dir: Path, split: str, tokens: np.ndarray, shard_tokens: int) -> list[str]:
    """Write tokens as fineweb_{split}_NNNNNN.bin shards of at most shard_tokens tokens."""
    names = []
    for i, start in enumerate(range(0, max(tokens.size, 1), shard_tokens)):
        name = f"fineweb_{split}_{i:06d}.bin"
        write_shard(out_dir / name, tokens[start:start + shard_tokens])
        names.append(name)
    return names


def stdlib_documents(max_chars: int | None) -> list[str]:
    """The sample's text: documents of the running Python's standard library (see the module docstring)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = collect_documents(stdlib, max_chars)
    if not docs:
        raise SystemExit(f"error: no usable text found in the standard library at {stdlib}")
    return docs


SOURCE = "docstrings, signatures and comments of the CPython standard library (not FineWeb)"


def build(data_dir: Path, tokenizer_path: Path, docs: list[str], shard_tokens: int, settings: dict = TRAINER_SETTINGS,
          source: str = SOURCE, is_val: list[bool] | None = None) -> dict:
    """Tokenizer (trained on the train documents with `settings`) and shards of docs (val: is_val, default split_val);
    the dataset folder is swapped in whole, the tokenizer written last."""
    is_val = is_val or split_val(docs)
    train_docs = [d for d, v in zip(docs, is_val) if not v]
    val_docs = [d for d, v in zip(docs, is_val) if v]

    tokenizer_path.unlink(missing_ok=True)  # a build cut short leaves no tokenizer, so it is seen as absent
    model = train_tokenizer(train_docs, settings)
    sp = spm.SentencePieceProcessor(model_proto=model)
    train_tokens, val_tokens = encode_documents(sp, train_docs), encode_documents(sp, val_docs)
    val_share = val_tokens.size / (val_tokens.size + train_tokens.size)
    if val_share < MIN_VAL_TOKEN_SHARE:
        raise SystemExit(f"error: val is only {val_share:.1%} of tokens; use a larger --max-chars")

    tmp_dir = data_dir.with_name(f".{data_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    manifest = {
        "source": source,
        "python_version": sys.version.split()[0],
        "python_implementation": sys.implementation.name,
        "corpus_sha256": hashlib.sha256("\0".join(docs).encode()).hexdigest(),
        "tokenizer": tokenizer_path.name,
        "tokenizer_sha256": hashlib.sha256(model).hexdigest(),
        "tokenizer_settings": settings,
        "vocab_size": sp.vocab_size(),
        "bos_id": sp.bos_id(),
        "docs_train": len(train_docs), "docs_val": len(val_docs),
        "chars_train": sum(map(len, train_docs)), "chars_val": sum(map(len, val_docs)),
        "tokens_train": int(train_tokens.size), "tokens_val": int(val_tokens.size),
        "files_train": write_split(tmp_dir, "train", train_tokens, shard_tokens),
        "files_val": write_split(tmp_dir, "val", val_tokens, shard_tokens),
    }
    for name in manifest["files_train"] + manifest["files_val"]:
        read_shard_header(tmp_dir / name)
    write_atomic(tmp_dir / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    old_dir = data_dir.with_name(f".{data_dir.name}.{os.getpid()}.old")
    if data_dir.exists():
        data_dir.rename(old_dir)
    tmp_dir.rename(data_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    write_atomic(tokenizer_path, model)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data/datasets/sample_sp1024",
                        help="output folder for the shards and manifest.json")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "data/tokenizers/sample_1024_bpe.model",
                        help="output path of the SentencePiece model")
    parser.add_argument("--max-chars", type=int, default=None,
                        help="stop collecting text after this many characters (small builds for tests)")
    parser.add_argument("--shard-tokens", type=int, default=1_000_000, help="tokens per shard file")
    args = parser.parse_args()
    if args.shard_tokens <= 0 or (args.max_chars is not None and args.max_chars <= 0):
        parser.error("--shard-tokens and --max-chars must be positive")
    t0 = time.perf_counter()
    m = build(args.data_dir.resolve(), args.tokenizer.resolve(), stdlib_documents(args.max_chars), args.shard_tokens)
    print(f"sample dataset: {m['tokens_train']:,} train + {m['tokens_val']:,} val tokens "
          f"({len(m['files_train'])}+{len(m['files_val'])} shards, {m['docs_train']}+{m['docs_val']} docs, "
          f"Python {m['python_version']} stdlib text) in {args.data_dir}, tokenizer {args.tokenizer}, "
          f"{time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
