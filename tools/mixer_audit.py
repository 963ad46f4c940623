"""The mixer's audit tools, outside the counted code: the record's hashed target-only rule as it was built,
the n-gram proxy networks, a synthetic text-like stream, and the audit itself.

    python tools/mixer_audit.py [--tokens GLOB] [--positions N] [--buckets B] [--proxy-order 2|3] ...

prints, for each exact rule of backoff_mixer.py and for the record's hashed rule, sum_v p(v) at sampled
positions (1 for a distribution) and the bits it would claim, with a proxy network fitted on a separate
prefix of the stream. The hashed rule's "probability" sums far above 1 at the record's load: the number it
reports measures collisions, not compression.
"""
from __future__ import annotations

import argparse
import glob
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backoff_mixer import BackoffNgramMixer, _alpha, _check_tokens, _MixerAPI, _rev_windows  # noqa: E402
from train_gpt import build_byte_luts, load_data_shard, load_tokenizer, target_bytes  # noqa: E402


def read_shard(path: str) -> np.ndarray:
    """A competition shard's tokens (header and size validated by train_gpt)."""
    return load_data_shard(path).numpy()


def zipf_stream(n: int, V: int, seed: int = 0, exponent: float = 1.1) -> np.ndarray:
    """Synthetic text-like stream: Zipf unigrams, with half of it made of copies of earlier
    spans (lengths 4..64), so long contexts recur as in real text."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, V + 1) ** exponent
    out = rng.choice(V, size=n, p=w / w.sum())
    i = 1024
    while i < n:
        L = int(rng.integers(4, 65))
        if rng.random() < 0.5:
            src = int(rng.integers(0, i - L))
            out[i:i + L] = out[src:src + L][: n - i]
        i += L
    return out


# -----------------------------------------------------------------------------
# The record's hashed target-only rule (NOT a distribution; audit and benchmark only)
# -----------------------------------------------------------------------------

_PRIMES = [36313, 27191, 51647, 81929, 131071, 174763, 233017, 299993, 350377, 412637, 479909]


class HashedTargetOnlyMixer(_MixerAPI):
    """Per order n = 2..max_order: ctx_counts[n][h(ctx)] and full_counts[n][h(ctx, y)] in flat
    tables of `buckets` float counters, g(ctx) = XOR_k ctx_k * prime_k, h(ctx) = g(ctx) mod
    buckets, h(ctx, y) = (g(ctx) XOR y * prime_{n-1}) mod buckets (a mask for powers of 2).
    The claimed p_ng(y) at the highest order with ctx count >= min_count is min(full, ctx) / ctx
    (clipped to [0, 1]), else the add-one unigram; mixed with the same alpha(H). Summed over y it
    is not 1 (module docstring). Unlike the record, grams spanning two update() calls are
    counted, so both mixers see the same grams."""

    def __init__(self, vocab_size: int = 1024, max_order: int = 10, min_count: int = 1,
                 alpha_base: float = 0.20, alpha_range: float = 0.55, alpha_center: float = 3.0,
                 device="cpu", buckets: int = 4_194_304):
        if max_order < 2:
            raise ValueError(f"max_order must be >= 2, got {max_order}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.V, self.max_order, self.min_count, self.buckets = vocab_size, max_order, min_count, buckets
        self.alpha = (alpha_base, alpha_range, alpha_center)
        self.device = torch.device(device)
        self.ctx_counts = [torch.zeros(buckets, dtype=torch.float32, device=self.device) for _ in range(max_order - 1)]
        self.full_counts = [torch.zeros(buckets, dtype=torch.float32, device=self.device) for _ in range(max_order - 1)]
        self.uni = torch.zeros(vocab_size, dtype=torch.int64, device=self.device)
        self.N = 0
        self.tail = torch.zeros(0, dtype=torch.int64, device=self.device)

    def memory_bytes(self):
        return sum(t.numel() * 4 for t in self.ctx_counts + self.full_counts) + self.uni.numel() * 8

    def _ctx_hash(self, rev, n):
        """rev [..., >=n-1] newest first -> hash of the n-1 context tokens."""
        h = rev[..., 0] * _PRIMES[0]
        for k in range(1, n - 1):
            h = h ^ (rev[..., k] * _PRIMES[k % len(_PRIMES)])
        return h

    def _full_hash(self, hctx, y, n):
        return self._bucket(hctx ^ (y * _PRIMES[(n - 1) % len(_PRIMES)]))

    def _bucket(self, h):
        b = self.buckets
        return h & (b - 1) if b & (b - 1) == 0 else h.abs() % b

    def update(self, tokens):
        tokens = tokens.to(self.device).long().reshape(-1)
        _check_tokens(tokens, self.V, "tokens")
        if not tokens.numel():
            return
        seq = torch.cat([self.tail, tokens])
        rev = _rev_windows(seq[None], tokens.numel(), self.max_order)   # rev[:, 0] = target
        pos = self.N + torch.arange(tokens.numel(), device=self.device)
        for n in range(2, self.max_order + 1):
            ok = pos >= n - 1
            hc = self._ctx_hash(rev[ok, 1:], n)
            hf = self._full_hash(hc, rev[ok, 0], n)
            hc = self._bucket(hc)
            one = torch.ones(hc.numel(), device=self.device)
            self.ctx_counts[n - 2].index_add_(0, hc, one)
            self.full_counts[n - 2].index_add_(0, hf, one)
        self.uni += torch.bincount(tokens, minlength=self.V)
        self.N += tokens.numel()
        self.tail = seq[-(self.max_order - 1):]

    def _mix(self, pnet, H, rev_x, t_in, cand, learn=None):
        pnet, H = pnet[0], H[0]                       # (one network: _MixerAPI hands [1, M, C], [1, M])
        p = (self.uni[cand].double() + 1.0) / (self.N + self.V)
        done = torch.zeros(cand.shape[0], dtype=torch.bool, device=self.device)
        for n in range(self.max_order, 1, -1):
            hc = self._ctx_hash(rev_x, n)
            ctx = self.ctx_counts[n - 2][self._bucket(hc)]
            full = self.full_counts[n - 2][self._full_hash(hc[:, None], cand, n)]
            ratio = (torch.minimum(full, ctx[:, None]) / ctx.clamp(min=1)[:, None]).clamp(0, 1).double()
            take = (ctx >= self.min_count) & (t_in >= n - 2) & ~done
            p = torch.where(take[:, None], ratio, p)
            done |= take
        a = _alpha(H, *self.alpha)[:, None]
        return (1 - a) * pnet + a * p


# -----------------------------------------------------------------------------
# Audit: does each rule sum to 1 over the vocabulary, and what would it claim?
# -----------------------------------------------------------------------------

class NgramProxy:
    """Neural proxy fitted on `fit` (a separate prefix of the stream), never on scored tokens.
    order 2: p(v|b) = (c(b,v) + 4 p_uni(v)) / (c(b) + 4), p_uni add-one;
    order 3: p(v|a,b) = (c(a,b,v) + 2 p(v|b)) / (c(a,b) + 2) (the bigram where no a precedes)."""

    def __init__(self, fit: np.ndarray, V: int, order: int = 3):
        fit = fit.astype(np.int64)
        self.V, self.order = V, order
        uni = np.bincount(fit, minlength=V) + 1.0
        big = np.bincount(fit[:-1] * V + fit[1:], minlength=V * V).reshape(V, V)
        self.p2 = (big + 4.0 * uni / uni.sum()) / (big.sum(1, keepdims=True) + 4.0)
        ctx = fit[:-2] * V + fit[1:-1]
        self.tri, self.tri_c = np.unique(ctx * V + fit[2:], return_counts=True)
        self.tri_ctx = self.tri // V  # each trigram's context, sorted like tri
        self.ctx, self.ctx_c = np.unique(ctx, return_counts=True)

    def logits(self, ev: np.ndarray, s: int, e: int) -> torch.Tensor:
        """[e-s, V] log-probabilities of the tokens after ev[s..e-1]."""
        t = np.arange(s, e)
        p = self.p2[ev[t]]
        if self.order == 3:
            q = np.where(t >= 1, ev[np.maximum(t - 1, 0)] * self.V + ev[t], -1)
            lo, hi = np.searchsorted(self.tri_ctx, q), np.searchsorted(self.tri_ctx, q, side="right")
            ci = np.minimum(np.searchsorted(self.ctx, q), len(self.ctx) - 1)
            c = np.where(self.ctx[ci] == q, self.ctx_c[ci], 0)
            rows = np.repeat(np.arange(e - s), hi - lo)
            idx = np.arange(len(rows)) - np.repeat(np.cumsum(hi - lo) - (hi - lo), hi - lo) + np.repeat(lo, hi - lo)
            num = np.zeros_like(p)
            np.add.at(num, (rows, self.tri[idx] % self.V), self.tri_c[idx])
            p = (num + 2.0 * p) / (c[:, None] + 2.0)
        return torch.from_numpy(np.log(p)).float()


def truth_stream(net: NgramProxy, n: int, first: int = 0, seed: int = 0):
    """A stream on which the proxy network is the true model: each next token drawn from the
    proxy's own (float32, normalized) distribution given the tokens before it.
    Returns (tokens [n+1] int64, log p_net(y) [n] float32, H [n] float32)."""
    V, rng = net.V, np.random.default_rng(seed)
    ev = np.zeros(n + 1, dtype=np.int64)
    ev[0] = first
    u = rng.random(n)
    for t in range(n):  # the proxy's own distribution after the tokens drawn so far
        p = torch.log_softmax(net.logits(ev, t, t + 1), -1)[0].double().exp().numpy()
        cdf = np.cumsum(p)
        ev[t + 1] = min(int(np.searchsorted(cdf, u[t] * cdf[-1])), V - 1)
    lp, H = [], []
    for s in range(0, n, 4096):
        logp = torch.log_softmax(net.logits(ev, s, min(s + 4096, n)), -1)
        lp.append(logp.gather(1, torch.from_numpy(ev[s + 1:min(s + 4096, n) + 1])[:, None]).squeeze(1))
        H.append(-(logp.exp() * logp).sum(-1))
    return ev, torch.cat(lp), torch.cat(H)


def token_bytes(model_path: str, V: int):
    """The competition's byte rule, from train_gpt: bytes(prev, y) as numpy arrays."""
    luts = build_byte_luts(load_tokenizer(model_path, V), V)
    return lambda prev, y: target_bytes(torch.as_tensor(prev).long(), torch.as_tensor(y).long(), luts).numpy()


def audit(args) -> list:
    V = args.vocab_size
    paths = sorted(glob.glob(args.tokens)) if args.tokens else []
    if args.tokens and not paths:
        raise ValueError(f"no file matches {args.tokens}")
    stream = (np.concatenate([read_shard(p) for p in paths]) if paths
              else zipf_stream(args.fit_tokens + args.eval_tokens + 1, V, seed=args.seed))
    if int(stream.max()) >= V:
        raise ValueError(f"tokens: ids up to {int(stream.max())} >= vocab_size {V}")
    fit, ev = stream[: args.fit_tokens], stream[args.fit_tokens: args.fit_tokens + args.eval_tokens + 1]
    ev = torch.from_numpy(ev.astype(np.int64))
    E = ev.numel() - 1
    net = NgramProxy(fit, V, args.proxy_order)
    evn = ev.numpy()
    buckets = args.buckets or max(1, E // 15)
    kw = dict(vocab_size=V, max_order=args.max_order, min_count=args.min_count)
    mixers = {f"exact {r}": BackoffNgramMixer(**kw, rule=r, beta=args.beta) for r in BackoffNgramMixer.RULES}
    mixers[f"hashed target-only ({buckets:,} buckets, INVALID)"] = HashedTargetOnlyMixer(**kw, buckets=buckets)
    rng = np.random.default_rng(args.seed)
    sample = set(rng.choice(np.arange(E // 10, E), size=min(args.positions, E - E // 10), replace=False).tolist())
    nll = {k: 0.0 for k in ["proxy alone", *mixers]}
    sums = {k: [] for k in mixers}
    P, C = args.max_order - 1, args.chunk
    done = 0
    for s in range(0, E, C):
        e = min(s + C, E)
        x, y = ev[max(0, s - P):e][None], ev[s + 1:e + 1][None]
        logits = net.logits(evn, s, e)[None]
        logp = torch.log_softmax(logits, -1)
        nll["proxy alone"] += float(-logp[0].gather(-1, y[0, :, None]).sum())
        for k, m in mixers.items():
            nll[k] += float(m.score(logits, x, y).double().sum())
            for t in range(s, e):
                if t in sample:   # full distribution at row t: input ev[t], context ev[t-P .. t-1]
                    row = ev[max(0, t - P): t + 1][None]
                    sums[k].append(float(m.distribution(net.logits(evn, t, t + 1)[None], row).sum()))
            m.update(ev[done:e + 1])
        done = e + 1
    nbytes = None
    if args.tokenizer:
        nbytes = float(token_bytes(args.tokenizer, V)(ev[:E].numpy(), ev[1:].numpy()).sum())
    rows = []
    for k, v in nll.items():
        s_ = np.array(sums.get(k, [1.0]))
        rows.append((k, s_.min(), s_.mean(), s_.max(), v / E / math.log(2), v / math.log(2) / nbytes if nbytes else None))
    print(f"stream: {'+'.join(paths) if paths else 'synthetic Zipf'}; order-{args.proxy_order} proxy fitted on {len(fit):,} tokens; "
          f"scored {E:,} tokens in chunks of {C}; orders 2..{args.max_order}; "
          f"hashed load {E / buckets:.1f} tokens/bucket; sum_v p(v) at {len(next(iter(sums.values())))} sampled positions")
    print(f"{'model':52s} {'min sum p':>10s} {'mean sum p':>11s} {'max sum p':>10s} {'bits/tok':>9s} {'BPB':>7s}")
    for k, a, b, c, bt, bpb in rows:
        print(f"{k:52s} {a:10.4f} {b:11.4f} {c:10.4f} {bt:9.4f} {'' if bpb is None else f'{bpb:7.4f}'}")
    return rows


def main(argv=None):
    a = argparse.ArgumentParser(description="sum_v p(v) and claimed bits for the exact rules and the hashed rule")
    a.add_argument("--tokens", default=None, help="shard file or glob (default: synthetic Zipf stream)")
    a.add_argument("--fit-tokens", type=int, default=400_000, help="stream prefix that fits the proxy")
    a.add_argument("--proxy-order", type=int, default=3, choices=(2, 3), help="n-gram proxy for the network")
    a.add_argument("--eval-tokens", type=int, default=100_000, help="tokens scored after that prefix")
    a.add_argument("--positions", type=int, default=200, help="positions where sum_v p(v) is computed")
    a.add_argument("--buckets", type=int, default=0, help="hashed buckets per order (default: eval tokens / 15)")
    a.add_argument("--max-order", type=int, default=10)
    a.add_argument("--min-count", type=int, default=1)
    a.add_argument("--beta", type=float, default=32.0, help="the dirichlet rules' concentration")
    a.add_argument("--chunk", type=int, default=4096)
    a.add_argument("--vocab-size", type=int, default=1024)
    a.add_argument("--tokenizer", default=None, help="sentencepiece model: also report BPB")
    a.add_argument("--seed", type=int, default=0)
    args = a.parse_args(argv)
    t0 = time.time()
    audit(args)
    print(f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
