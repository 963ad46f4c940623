"""Build a second held-out text, unlike the sample's Python docstrings: this machine's English man pages.

No network needed. Every /usr/share/man/man[1-8]/*.gz page (English sections only; not the ~17k generated pages of one CLI) is stripped of its troff
markup and becomes one document; documents are taken in an order fixed by the SHA-256 of their file names and
encoded with the SAMPLE tokenizer (data/tokenizers/sample_1024_bpe.model, trained on CPython docstrings), BOS
first as in the competition shards. The first documents fill the val shard (--val-tokens), the next the train
shard (--train-tokens): a fitting split for proxy networks, never scored. Nothing here is committed; a
manifest.json records the pages used and a hash of the tokens, so two builds on one machine are identical.

    python data/build_heldout_dataset.py [--data-dir DIR] [--val-tokens N] [--train-tokens N]

Used as: DATA_PATH=data/datasets/heldout_man_sp1024 TOKENIZER_PATH=data/tokenizers/sample_1024_bpe.model
EVAL_ONLY=1 ARTIFACT=artifacts/<run>.ptz python train_gpt.py   (a sample-trained model on another domain).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from train_gpt import write_atomic  # noqa: E402
from data.shards import write_shard  # noqa: E402

MAN_ROOT = Path("/usr/share/man")
ESCAPES = {r"\-": "-", r"\(aq": "'", r"\(dq": '"', r"\(em": "--", r"\(en": "-", r"\(bu": "*", r"\(co": "(c)",
           r"\(lq": '"', r"\(rq": '"', r"\(oq": "'", r"\(cq": "'", r"\e": "\\", r"\ ": " ", r"\~": " ",
           r"\&": "", r"\|": "", r"\^": "", r"\/": "", r"\,": "", r"\:": "", r"\%": ""}
ESCAPE_RE = re.compile("|".join(re.escape(k) for k in sorted(ESCAPES, key=len, reverse=True)))
DROP_RE = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\s[+-]?\d+|\\\*(\(..|\[[^\]]*\]|.)|\\\((..)|\\n(\(..|.)|\\[a-zA-Z]'[^']*'")
TEMPLATED = ("gcloud",)  # ~17k generated near-identical pages of one CLI: they would swamp the text
TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB", "TP", "IP", "HP", "Nm", "Nd"}


def man_text(raw: str) -> str:
    """Plain text of a troff man page: comments and request lines dropped, the words of font/heading macros
    kept, font and size escapes removed, the common character escapes replaced."""
    out = []
    for line in raw.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line[1:].strip().partition(" ")
            if name not in TEXT_MACROS or not rest:
                if name in ("SH", "SS", "PP", "LP", "P", "TP", "IP", "sp", "br"):
                    out.append("")
                continue
            line = " ".join(w.strip('"') for w in rest.split())
        line = DROP_RE.sub("", ESCAPE_RE.sub(lambda m: ESCAPES[m.group(0)], line))
        out.append(line.replace("\\", ""))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data" / "datasets" / "heldout_man_sp1024")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "data" / "tokenizers" / "sample_1024_bpe.model")
    ap.add_argument("--val-tokens", type=int, default=200_000)
    ap.add_argument("--train-tokens", type=int, default=1_000_000)
    a = ap.parse_args(argv)
    if not a.tokenizer.is_file():
        print(f"error: tokenizer {a.tokenizer} not found; build it first: python data/build_sample_dataset.py", file=sys.stderr)
        return 2
    pages = sorted(p for p in MAN_ROOT.glob("man[1-8]/*.gz") if not p.name.startswith(TEMPLATED))
    if not pages:
        print(f"error: no man pages under {MAN_ROOT}/man[1-8]; install some (apt-get install manpages)", file=sys.stderr)
        return 2
    pages.sort(key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    sp = spm.SentencePieceProcessor(model_file=str(a.tokenizer))
    splits, used, want = {"val": [], "train": []}, {"val": [], "train": []}, {"val": a.val_tokens, "train": a.train_tokens}
    for page in pages:
        split = "val" if sum(map(len, splits["val"])) < want["val"] else "train"
        if split == "train" and sum(map(len, splits["train"])) >= want["train"]:
            break
        try:
            text = man_text(gzip.decompress(page.read_bytes()).decode("utf-8", errors="replace"))
        except (OSError, EOFError):
            continue
        if len(text) < 200:  # stubs (".so" redirects) and empty pages
            continue
        splits[split].append([sp.bos_id()] + sp.encode(text))
        used[split].append(str(page.relative_to(MAN_ROOT)))
    a.data_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"source": str(MAN_ROOT), "tokenizer": a.tokenizer.name}
    for split, docs in splits.items():
        tokens = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
        write_shard(a.data_dir / f"fineweb_{split}_000000.bin", tokens)
        manifest[split] = {"docs": len(docs), "tokens": int(tokens.size), "pages": used[split],
                           "sha256": hashlib.sha256(tokens.astype("<u2").tobytes()).hexdigest()}
    write_atomic(a.data_dir / "manifest.json", json.dumps(manifest, indent=1).encode())
    print(f"held-out man-page dataset: {manifest['train']['tokens']:,} train + {manifest['val']['tokens']:,} val tokens "
          f"({manifest['train']['docs']}+{manifest['val']['docs']} pages) in {a.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
