"""Build kg_data.py: a per-token importance table from a token co-occurrence graph.

Usage: python tools/build_kg.py --shards 'data/datasets/sample_sp1024/fineweb_train_*.bin'
       [--window 2] [--top-n 358] [--vocab-size 1024] [--max-tokens N] [--out kg_data.py]
       [--date YYYY-MM-DD]

Graph: W[a, b] = number of positions i (within one shard) with {x_i, x_{i+d}} = {a, b}, 1 <= d <= window,
counted in both directions (W symmetric); self-pairs are dropped (diagonal zero).
Rank: PageRank on W, r = d * (P r + m / V) + (1 - d) / V with P[b, a] = W[a, b] / sum_b W[a, b],
d = 0.85, m = rank mass on tokens with no edges; power iteration in float64 from r = 1/V until the L1
change is < 1e-12 (at most 1000 steps). Tokens with no edges are never kept.
Importance: the kept top-N tokens (score descending, ties by lower id) get importance (N - rank) / N,
rank = 0..N-1, so the top token has 1 and the last 1/N; stored as round(importance * 65535).
Same shards and options -> byte-identical file; the date comes from --date, else SOURCE_DATE_EPOCH,
else today (UTC).
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from train_gpt import UserError, list_shards, load_data_shard, write_atomic  # noqa: E402

DAMPING, TOL, MAX_ITER = 0.85, 1e-12, 1000
QMAX = 65535
TABLE_MAGIC = b"KGI1"  # then <HH vocab_size, n; n <u2 ids; n <u2 quantized importances
CHUNK = 1 << 22  # tokens per bincount, bounds memory on full-size shards

TEMPLATE = '''"""{header}"""
KG_IMPORTANCE_B64 = (
{payload})


def token_importance(payload=None):
    """{{token id: importance in [0, 1]}} decoded from payload (default KG_IMPORTANCE_B64).

    Table: zlib of b"KGI1", <HH vocab n, n <u2 ids, n <u2 q; importance = q / 65535.
    Raises ValueError on bad base64, a corrupt or truncated stream, a wrong length, or bad ids."""
    import base64, struct, zlib
    try:
        raw = zlib.decompress(base64.b64decode(KG_IMPORTANCE_B64 if payload is None else payload, validate=True))
    except (ValueError, zlib.error) as e:  # binascii.Error is a ValueError
        raise ValueError(f"kg_data: corrupt or truncated importance table ({{e}}); rebuild with tools/build_kg.py") from None
    if len(raw) < 8 or raw[:4] != b"KGI1":
        raise ValueError(f"kg_data: table header missing or wrong ({{len(raw)}} bytes); rebuild with tools/build_kg.py")
    vocab, n = struct.unpack_from("<HH", raw, 4)
    if len(raw) != 8 + 4 * n:
        raise ValueError(f"kg_data: table promises {{n}} entries ({{8 + 4 * n}} bytes) but has {{len(raw)}} bytes")
    ids, qs = struct.unpack_from(f"<{{n}}H", raw, 8), struct.unpack_from(f"<{{n}}H", raw, 8 + 2 * n)
    bad = [i for i in ids if i >= vocab]
    if bad:
        raise ValueError(f"kg_data: token ids {{bad[:5]}} are outside the table's vocab {{vocab}}")
    if len(set(ids)) != n:
        raise ValueError("kg_data: the table repeats token ids")
    return {{i: q / 65535 for i, q in zip(ids, qs)}}


def kg_embedding_init(weight, strength, vocab_size):
    """In place: weight[v] *= 1 + strength * importance[v] for each table token v; other rows untouched.

    The factor is computed in float64 and cast to weight.dtype. Returns weight. Raises ValueError if
    a table id >= vocab_size, weight has fewer than vocab_size rows, or strength is not finite."""
    import math
    import torch
    imp = token_importance()
    if weight.dim() != 2 or weight.shape[0] < vocab_size:
        raise ValueError(f"kg_embedding_init: weight {{tuple(weight.shape)}} needs >= {{vocab_size}} rows")
    if not math.isfinite(strength):
        raise ValueError(f"kg_embedding_init: strength must be finite, got {{strength}}")
    bad = sorted(i for i in imp if i >= vocab_size)
    if bad:
        raise ValueError(f"kg_embedding_init: table ids {{bad[:5]}} are outside vocab_size {{vocab_size}}")
    idx = torch.tensor(list(imp), dtype=torch.long, device=weight.device)
    scale = (1 + strength * torch.tensor(list(imp.values()), dtype=torch.float64)).to(weight.device, weight.dtype)
    with torch.no_grad():
        weight[idx] = weight[idx] * scale[:, None]
    return weight
'''


def cooccurrence(tokens: np.ndarray, vocab_size: int, window: int) -> np.ndarray:
    """Symmetric int64 [V, V] counts of token pairs at distance 1..window, diagonal zeroed."""
    t, n = np.asarray(tokens), len(tokens)
    counts = np.zeros(vocab_size * vocab_size, dtype=np.int64)
    for d in range(1, window + 1):
        for s in range(0, max(n - d, 0), CHUNK):
            e = min(s + CHUNK, n - d)
            pair = t[s:e].astype(np.int64) * vocab_size + t[s + d:e + d]
            counts += np.bincount(pair, minlength=vocab_size * vocab_size)
    w = counts.reshape(vocab_size, vocab_size)
    w = w + w.T
    np.fill_diagonal(w, 0)
    return w


def pagerank(w: np.ndarray, damping: float = DAMPING, tol: float = TOL, max_iter: int = MAX_ITER):
    """PageRank of weighted graph w (see module doc) by power iteration; returns (scores, iterations)."""
    w = np.asarray(w, dtype=np.float64)
    n = w.shape[0]
    deg = w.sum(axis=1)
    dangling = deg == 0
    inv = np.divide(1.0, deg, out=np.zeros(n), where=~dangling)
    r = np.full(n, 1.0 / n)
    for it in range(1, max_iter + 1):
        nxt = damping * (w.T @ (r * inv) + r[dangling].sum() / n) + (1 - damping) / n
        delta = np.abs(nxt - r).sum()
        r = nxt
        if delta < tol:
            break
    return r, it


def top_importance(scores: np.ndarray, active: np.ndarray, top_n: int):
    """Ids of the top_n active tokens (score desc, ties by lower id) and importances (N - rank) / N."""
    order = [i for i in np.lexsort((np.arange(scores.size), -scores)) if active[i]][:top_n]
    n = len(order)
    return np.array(order, dtype=np.int64), (n - np.arange(n)) / n


def encode_table(ids, importances, vocab_size: int) -> str:
    """Base64 of zlib(b"KGI1" <HH vocab n, ids <u2, round(importance * 65535) <u2)."""
    ids = np.asarray(ids, dtype=np.int64)
    imp = np.asarray(importances, dtype=np.float64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size) or not np.all((imp >= 0) & (imp <= 1)):
        raise ValueError("encode_table: ids must be in [0, vocab_size) and importances in [0, 1]")
    q = np.rint(imp * QMAX).astype("<u2")
    raw = TABLE_MAGIC + struct.pack("<HH", vocab_size, ids.size) + ids.astype("<u2").tobytes() + q.tobytes()
    return base64.b64encode(zlib.compress(raw, 9)).decode()


def render(header: str, payload: str, width: int = 96) -> str:
    """The kg_data.py source for a header docstring and a base64 payload."""
    lines = "".join(f'    "{payload[i:i + width]}"\n' for i in range(0, len(payload), width))
    return TEMPLATE.format(header=header, payload=lines)


def build_date(arg: str | None) -> str:
    if arg is not None:
        try:
            return datetime.date.fromisoformat(arg).isoformat()
        except ValueError:
            raise UserError(f"--date {arg!r} is not YYYY-MM-DD") from None
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None:
        try:
            return datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).date().isoformat()
        except (ValueError, OverflowError, OSError):
            raise UserError(f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix timestamp") from None
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def build(shards: str, window: int = 2, top_n: int = 358, vocab_size: int = 1024,
          max_tokens: int | None = None, date: str | None = None) -> str:
    """Read shards (in sorted order, up to max_tokens in all), rank tokens, return kg_data.py source."""
    if window < 1 or top_n < 1 or not 1 <= vocab_size <= 65535 or (max_tokens is not None and max_tokens < 2):
        raise UserError("need --window >= 1, --top-n >= 1, 1 <= --vocab-size <= 65535, --max-tokens >= 2")
    date = build_date(date)
    w = np.zeros((vocab_size, vocab_size), dtype=np.int64)
    sources, total = [], 0
    for path in list_shards(shards):
        if max_tokens is not None and total >= max_tokens:
            break
        tokens = load_data_shard(path).numpy()
        if max_tokens is not None:
            tokens = tokens[:max_tokens - total]
        if tokens.size and int(tokens.max()) >= vocab_size:
            raise UserError(f"shard {path} has token id {int(tokens.max())} >= --vocab-size {vocab_size}")
        w += cooccurrence(tokens, vocab_size, window)
        total += tokens.size
        sources.append((Path(path).name, hashlib.sha256(Path(path).read_bytes()).hexdigest()))
    active = w.sum(axis=1) > 0
    if not active.any():
        raise UserError(f"shards {shards} hold no token pairs within window {window}: nothing to rank")
    scores, iters = pagerank(w)
    ids, imp = top_importance(scores, active, top_n)
    header = "\n".join([
        "Token importance table for a KG-conditioned embedding init. GENERATED by tools/build_kg.py: do not edit.",
        "",
        f"date: {date}",
        f"window: {window}  top_n: {top_n}  entries: {ids.size}  vocab_size: {vocab_size}  tokens: {total}",
        f"pagerank: damping {DAMPING}, {iters} iterations (L1 tol {TOL:g}); importance = (N - rank) / N",
        "sources (sha256):",
        *(f"  {name} {digest}" for name, digest in sources),
        "",
    ])
    return render(header, encode_table(ids, imp, vocab_size))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="glob of token shards")
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--top-n", type=int, default=358)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "kg_data.py")
    parser.add_argument("--date", default=None, help="YYYY-MM-DD for the header")
    args = parser.parse_args(argv)
    try:
        source = build(args.shards, args.window, args.top_n, args.vocab_size, args.max_tokens, args.date)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_atomic(args.out, source.encode())
    print(f"wrote {args.out} ({len(source.encode())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
