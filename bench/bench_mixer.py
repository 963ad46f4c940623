"""Streaming score+update throughput: exact BackoffNgramMixer vs the record's hashed rule.

Both mixers see the same stream in the same order: for each chunk, score the chunk (x = chunk
with P = max_order-1 columns of preceding context, y = next tokens), then update() with the
scored tokens. Three modes, each timed for both mixers:
  net    score_from_net(log p(y), H, x, y): the mixer's own work (what the distributed eval calls)
  logits score(logits, x, y): also log_softmax + entropy of [chunk, 1024] logits (same for both)
  update update() alone, chunk by chunk (nothing scored first)
Then, for reference, the exact mixer's whole-stream path score_stream (same numbers as its
streaming path, bitwise) on the same stream: not a streaming contract, only usable when the
whole stream is known (the validation set).
Tables are allocated before the clock starts: the hashed rule's fixed 2 x 9 x 4,194,304 counters,
the exact table pre-sized with expected_tokens = stream length (2 (max_order-1) slots per token),
and once more at its default size (2**24 rows, 256 MiB), which may have to grow during the run.
The default rule is online (18 experts, their weights learned per bucket: more work per target than
dirichlet_evidence, which is timed too; plain dirichlet runs at the speed of dirichlet_evidence).
The exact table's CPU probes and writes are numba kernels; --numpy-tables times the numpy code
that stands in for them where numba is not installed.
Prints tokens/s, the ratio exact/hashed, mixer state size and peak RSS (or CUDA peak).

    python bench/bench_mixer.py [--tokens N] [--chunk 4096] [--shard PATH] [--device cpu] [--numpy-tables]
"""
import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import backoff_mixer  # noqa: E402
from backoff_mixer import BackoffNgramMixer  # noqa: E402
from mixer_audit import HashedTargetOnlyMixer, read_shard, zipf_stream  # noqa: E402


def run(mixer, stream, chunk, P, device, logits, mode):
    logp = torch.log_softmax(logits, -1)
    H = -(logp.exp() * logp).sum(-1)
    t0 = time.perf_counter()
    nll_sum, done = 0.0, 0
    for s in range(P, stream.numel() - 1, chunk):
        e = min(s + chunk, stream.numel() - 1)
        x = stream[s - P:e][None]
        y = stream[s + 1:e + 1][None]
        if mode == "update":
            nll = torch.zeros(1)
        elif mode == "logits":
            nll = mixer.score(logits[: e - s][None], x, y)
        else:
            lp_y = logp[torch.arange(e - s, device=device), y[0]]
            nll = mixer.score_from_net(lp_y[None], H[None, : e - s], x, y)
        nll_sum += float(nll.sum())
        mixer.update(stream[done:e + 1])   # everything up to the last scored target
        done = e + 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, nll_sum


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_048_576)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--max-order", type=int, default=10)
    ap.add_argument("--shard", default=None, help="competition .bin shard (default: synthetic Zipf stream)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    ap.add_argument("--modes", default="net,logits,update", help="comma list of: net, logits, update")
    ap.add_argument("--numpy-tables", action="store_true", help="exact table without its numba kernels")
    args = ap.parse_args()
    if args.numpy_tables:
        backoff_mixer._KERNELS[:] = [None]
    if args.threads:
        torch.set_num_threads(args.threads)
    V, dev = 1024, torch.device(args.device)
    stream = (read_shard(args.shard)[: args.tokens] if args.shard else zipf_stream(args.tokens, V, seed=0))
    stream = torch.from_numpy(stream.astype(np.int64)).to(dev)
    logits = torch.randn(args.chunk, V, generator=torch.Generator().manual_seed(0)).to(dev)
    P = args.max_order - 1
    print(f"stream {stream.numel():,} tokens ({'shard ' + args.shard if args.shard else 'synthetic Zipf'}), "
          f"chunk {args.chunk}, orders 2..{args.max_order}, device {dev}, threads {torch.get_num_threads()}, "
          f"exact table code: {'numba kernels' if backoff_mixer._kernels() else 'numpy'}")
    for mode in args.modes.split(","):
        res = {}
        for name, make in [
            ("hashed target-only (record, 4,194,304 buckets/order)",
             lambda: HashedTargetOnlyMixer(V, args.max_order, device=dev)),
            ("exact BackoffNgramMixer rule=backoff", lambda: BackoffNgramMixer(V, args.max_order, device=dev, rule="backoff", expected_tokens=stream.numel())),
            ("exact BackoffNgramMixer rule=dirichlet_evidence", lambda: BackoffNgramMixer(
                V, args.max_order, device=dev, rule="dirichlet_evidence", expected_tokens=stream.numel())),
            ("exact BackoffNgramMixer (default rule)", lambda: BackoffNgramMixer(V, args.max_order, device=dev, expected_tokens=stream.numel())),
            ("exact, default rule, default table size", lambda: BackoffNgramMixer(V, args.max_order, device=dev)),
        ]:
            m = make()
            getattr(m, "table", None)                 # the exact table is allocated on first use: now, before the clock
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sec, nll = run(m, stream, args.chunk, P, dev, logits, mode)
            peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            res[name] = stream.numel() / sec
            print(f"[{mode:6s}] {name:52s} {res[name]:>9,.0f} tok/s {sec:6.2f} s  state {m.memory_bytes() / 2**20:5,.0f} MiB"
                  f"  peak {'CUDA' if dev.type == 'cuda' else 'RSS so far'} {peak:,.0f} MiB  mean nll {'-' if mode == 'update' else f'{nll / (stream.numel() - P - 1):.4f}'}")
            del m
        rates = list(res.values())
        print(f"[{mode:6s}] speed ratio exact/hashed: backoff {rates[1] / rates[0]:.2f}x, dirichlet_evidence "
              f"{rates[2] / rates[0]:.2f}x, default rule {rates[3] / rates[0]:.2f}x (default table size {rates[4] / rates[0]:.2f}x)")
    logp = torch.log_softmax(logits, -1)
    idx = torch.arange(stream.numel() - 1, device=dev) % args.chunk
    lp_y, H = logp[idx, stream[1:]], -(logp.exp() * logp).sum(-1)[idx]
    for rule in BackoffNgramMixer.RULES:
        t0 = time.perf_counter()
        BackoffNgramMixer(V, args.max_order, device=dev, rule=rule).score_stream(stream, lp_y, H, args.chunk)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        print(f"[stream] exact score_stream rule={rule:18s} (whole stream at once) {stream.numel() / sec:>12,.0f} tok/s {sec:6.2f} s")


if __name__ == "__main__":
    main()
