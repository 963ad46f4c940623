"""Streaming score+update throughput: exact BackoffNgramMixer vs the record's hashed rule.

Both mixers see the same stream in the same order: for each chunk, score(logits, x, y) on the
chunk (x = chunk, y = next tokens, P = max_order-1 columns of preceding context) and then
update(chunk). Prints tokens/s for each, their ratio and peak memory (RSS, or CUDA peak).

    python bench/bench_mixer.py [--tokens N] [--chunk 4096] [--shard PATH] [--device cpu]
"""
import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from backoff_mixer import BackoffNgramMixer, HashedTargetOnlyMixer, read_shard, zipf_stream  # noqa: E402


def run(mixer, stream, chunk, P, V, device, logits_cache):
    t0 = time.perf_counter()
    nll_sum, done = 0.0, 0
    for s in range(P, stream.numel() - 1, chunk):
        e = min(s + chunk, stream.numel() - 1)
        x = stream[s - P:e][None]
        y = stream[s + 1:e + 1][None]
        logits = logits_cache[: e - s][None]
        nll_sum += float(mixer.score(logits, x, y).sum())
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
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    V, dev = 1024, torch.device(args.device)
    stream = (read_shard(args.shard)[: args.tokens] if args.shard else zipf_stream(args.tokens, V, seed=0))
    stream = torch.from_numpy(stream.astype(np.int64)).to(dev)
    logits = torch.randn(args.chunk, V, generator=torch.Generator().manual_seed(0)).to(dev)
    P = args.max_order - 1
    print(f"stream {stream.numel():,} tokens ({'shard ' + args.shard if args.shard else 'synthetic Zipf'}), "
          f"chunk {args.chunk}, orders 2..{args.max_order}, device {dev}, threads {torch.get_num_threads()}")
    res = {}
    for name, make in [
        ("hashed target-only (record, 4,194,304 buckets/order)",
         lambda: HashedTargetOnlyMixer(V, args.max_order, device=dev)),
        ("exact BackoffNgramMixer rule=backoff", lambda: BackoffNgramMixer(V, args.max_order, device=dev)),
    ]:
        m = make()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec, nll = run(m, stream, args.chunk, P, V, dev, logits)
        peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        res[name] = stream.numel() / sec
        print(f"{name:55s} {res[name]:>10,.0f} tok/s {sec:6.2f} s  state {m.memory_bytes() / 2**20:6,.0f} MiB"
              f"  peak {'CUDA' if dev.type == 'cuda' else 'RSS so far'} {peak:,.0f} MiB"
              f"  mean nll {nll / (stream.numel() - P - 1):.4f}")
        del m
    a, b = res.values()
    print(f"speed ratio exact / hashed: {b / a:.2f}x")


if __name__ == "__main__":
    main()
