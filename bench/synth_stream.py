"""A long training stream built offline: tokens sampled from an n-gram model fitted on a source stream.

The GPU check trains the record-size model for >= 1,500 steps to see what a *trained* artifact weighs, and
needs far more tokens than the offline sample holds (1.6M) without repeating them a hundred times. It samples
them from the interpolated n-gram model of the source stream s (N tokens, vocabulary V, order n):

    p_1(v)       = (c(v) + 1) / (N + V)
    p_j(v | ctx) = (c(ctx . v) + K p_{j-1}(v | ctx minus its oldest token)) / (c(ctx) + K),   j = 2..n

(c(ctx) counts the occurrences of ctx followed by a token). Sampling is exact and needs no table of
probabilities: at order j, with probability c(ctx) / (c(ctx) + K) emit the successor of a uniformly chosen
occurrence of ctx in s, else back off to order j-1; at order 1 emit a uniformly chosen token of s with
probability N / (N + V), else a uniform id. Contexts are found by binary search in the sorted keys of s, so
S streams advance in parallel, one vectorized step per token (torch; on a GPU ~150M tokens in seconds).
The text is not FineWeb, but it has real text's local statistics and never repeats as a whole.

    python bench/synth_stream.py OUT_DIR --train-tokens 150000000 --val-tokens 2000000 [--source GLOB]
writes OUT_DIR/fineweb_train_NNNNNN.bin (100M tokens a shard) and fineweb_val_000000.bin.
"""
from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from train_gpt import load_data_shard  # noqa: E402
from data.shards import write_shard  # noqa: E402

SHARD_TOKENS = 100_000_000


class NgramSampler:
    """The interpolated n-gram model of `source` (1-D int64 tensor), sampled exactly (module docstring)."""

    def __init__(self, source: torch.Tensor, vocab_size: int, order: int = 4, k: float = 2.0):
        self.s, self.V, self.order, self.k = source.long(), vocab_size, order, k
        self.bits = max(1, (vocab_size - 1).bit_length())
        if (order - 1) * self.bits > 62:
            raise ValueError(f"order {order}: contexts of {order - 1} tokens do not fit a 63-bit key")
        N = self.s.numel()
        self.keys, self.succ = [], []
        for j in range(1, order):                      # contexts of j tokens s[p-j+1..p], successor s[p+1]
            key = self.key(torch.stack([self.s[i:N - j + i] for i in range(j)], 1))
            key, o = key.sort()
            self.keys.append(key)
            self.succ.append(self.s[j:][o])

    def key(self, ctx: torch.Tensor) -> torch.Tensor:
        """[.., j] tokens (oldest first) -> one int64 key."""
        out = torch.zeros(ctx.shape[:-1], dtype=torch.int64, device=ctx.device)
        for i in range(ctx.shape[-1]):
            out = (out << self.bits) | ctx[..., i]
        return out

    def sample(self, streams: int, length: int, gen: torch.Generator) -> torch.Tensor:
        """[streams, length] tokens; each stream starts after a random window of the source."""
        dev, N, K1 = self.s.device, self.s.numel(), self.order - 1
        start = torch.randint(0, N - K1, (streams,), generator=gen, device=dev)
        ctx = torch.stack([self.s[start + i] for i in range(K1)], 1)   # oldest first
        out = torch.empty(streams, length, dtype=torch.int64, device=dev)
        for t in range(length):
            u = torch.rand(K1 + 3, streams, generator=gen, device=dev)   # order-1 branch and index, K1 hits, pick
            tok = torch.where(u[0] < N / (N + self.V), self.s[(u[1] * N).long().clamp(max=N - 1)],
                              (u[1] * self.V).long().clamp(max=self.V - 1))           # order 1
            for j in range(1, K1 + 1):                 # contexts of j tokens, low to high: the highest hit wins
                key = self.key(ctx[:, K1 - j:])
                lo = torch.searchsorted(self.keys[j - 1], key)
                c = torch.searchsorted(self.keys[j - 1], key, right=True) - lo
                hit = (c > 0) & (u[1 + j] < c / (c + self.k))
                pick = (lo + (u[K1 + 2] * c).long().clamp(max=(c - 1).clamp(min=0))).clamp(max=self.succ[j - 1].numel() - 1)
                tok = torch.where(hit, self.succ[j - 1][pick], tok)
            out[:, t] = tok
            ctx = torch.cat([ctx[:, 1:], tok[:, None]], 1)
        return out


def build(out_dir: Path, source: torch.Tensor, vocab_size: int, train_tokens: int, val_tokens: int,
          order: int = 4, streams: int = 65536, seed: int = 0, log=print) -> dict:
    """Sample val (seed+1) and train (seed) streams and write them as competition shards in out_dir."""
    t0 = time.perf_counter()
    sampler = NgramSampler(source, vocab_size, order)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {"source_tokens": source.numel(), "order": order, "streams": streams}
    for split, n, s in (("val", val_tokens, seed + 1), ("train", train_tokens, seed)):
        gen = torch.Generator(device=source.device).manual_seed(s)
        width = min(streams, max(1, n // 256))
        toks = sampler.sample(width, -(-n // width), gen).reshape(-1)[:n].cpu().numpy()
        for i, a in enumerate(range(0, n, SHARD_TOKENS)):
            write_shard(out_dir / f"fineweb_{split}_{i:06d}.bin", toks[a:a + SHARD_TOKENS])
        res[f"{split}_tokens"] = n
        log(f"synth_stream: {split} {n:,} tokens ({width} streams) after {time.perf_counter() - t0:.1f} s")
    res["seconds"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--source", default=str(ROOT / "data/datasets/sample_sp1024/fineweb_train_*.bin"))
    ap.add_argument("--train-tokens", type=int, default=150_000_000)
    ap.add_argument("--val-tokens", type=int, default=2_000_000)
    ap.add_argument("--order", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    files = sorted(glob.glob(a.source))
    if not files:
        print(f"error: no shards match {a.source}; build the sample first: python data/build_sample_dataset.py",
              file=sys.stderr)
        return 2
    source = torch.cat([load_data_shard(f, a.vocab_size).long() for f in files]).to(a.device)
    print(build(a.out_dir, source, a.vocab_size, a.train_tokens, a.val_tokens, a.order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
