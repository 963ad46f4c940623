"""What each n-gram rule scores on a real run, from its per-token dump.

Takes an EVAL_DUMP npz (nll_neural, entropy, bytes per target) and the validation stream it came from,
drives each rule through the streaming contract in the evaluation's chunks (score first, then update),
and prints the BPB each rule gives: our exact rules (real distributions) and the record's hashed
target-only rule at two loads (tokens per bucket), whose number is not a BPB at all.

    EVAL_DUMP=run.npz python train_gpt.py            # or EVAL_ONLY=1 ARTIFACT=... with EVAL_DUMP
    python bench/mixer_claims.py run.npz --val 'data/datasets/sample_sp1024/fineweb_val_*.bin' --chunk 4096 [--targets N]
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from backoff_mixer import BackoffNgramMixer  # noqa: E402
from mixer_audit import HashedTargetOnlyMixer  # noqa: E402


def stream_scores(mixer, tokens: torch.Tensor, logp: torch.Tensor, ent: torch.Tensor, chunk: int, order: int) -> np.ndarray:
    """NLL per target: chunk by chunk, score_from_net with the counts so far, then update with the chunk."""
    n, out = tokens.numel() - 1, []
    mixer.update(tokens[:1])
    for a in range(0, n, chunk):
        e, p = min(a + chunk, n), min(a, order - 1)
        out.append(mixer.score_from_net(logp[None, a:e], ent[None, a:e], tokens[None, a - p:e], tokens[None, a + 1:e + 1])[0])
        mixer.update(tokens[a + 1:e + 1])
    return torch.cat(out).double().numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dump", help="EVAL_DUMP npz of a run")
    ap.add_argument("--val", required=True, help="glob of the validation shards the run scored")
    ap.add_argument("--chunk", type=int, default=128 * 64, help="targets per mixer chunk (EVAL_BATCH_SEQS*EVAL_STRIDE)")
    ap.add_argument("--order", type=int, default=10)
    ap.add_argument("--load", type=float, default=15.0, help="tokens per bucket for the loaded hashed rule (record: 62M/4M)")
    ap.add_argument("--targets", type=int, default=0, help="score only the first N targets (a short stream); 0: all")
    a = ap.parse_args(argv)
    d = np.load(a.dump)
    tokens = torch.cat([train_gpt.load_data_shard(f) for f in train_gpt.list_shards(a.val)]).long()
    if tokens.numel() - 1 != d["nll_neural"].size:
        sys.exit(f"error: {a.dump} has {d['nll_neural'].size} targets but {a.val} holds {tokens.numel() - 1}; use the run's val data")
    keep = slice(0, a.targets or None)
    d = {k: d[k][keep] for k in ("nll_neural", "entropy", "bytes")}
    tokens = tokens[: d["bytes"].size + 1]
    logp, ent, nbytes = torch.from_numpy(-d["nll_neural"]), torch.from_numpy(d["entropy"]), d["bytes"].sum()
    bpb = lambda nll: nll.sum() / math.log(2) / nbytes
    n = tokens.numel() - 1
    rows = [("network alone", bpb(d["nll_neural"]), "real")]
    for rule in BackoffNgramMixer.RULES:
        m = BackoffNgramMixer(max_order=a.order, rule=rule)
        rows.append((f"exact {rule}", bpb(stream_scores(m, tokens, logp, ent, a.chunk, a.order)), "real"))
    for buckets in (4_194_304, max(int(n / a.load), 1)):
        m = HashedTargetOnlyMixer(max_order=a.order, buckets=buckets)
        label = f"hashed target-only, {buckets:,} buckets ({n / buckets:.2f} tokens/bucket)"
        rows.append((label, bpb(stream_scores(m, tokens, logp, ent, a.chunk, a.order)), "NOT a BPB"))
    print(f"{'rule':62} {'BPB':>8}  valid?")
    for name, value, valid in rows:
        print(f"{name:62} {value:8.4f}  {valid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
