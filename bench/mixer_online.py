"""Rule online against the fixed rules, side by side on the same numbers (backoff_mixer.score_stream, bitwise
the streaming score/update path), in three settings:

  truth    a stream on which the network is the true model: an n-gram proxy (tools/mixer_audit.NgramProxy)
           fitted on a text, then every next token drawn from the proxy's own distribution. Mixing can
           only cost here; prints each rule's harm (nats/token over the network alone) and rule online's
           bound (buckets with tokens * log K nats over the stream).
  heldout  a proxy fitted on one text (--fit), scoring another (--eval): BPB of each rule.
  dump     a trained run's EVAL_DUMP (log p(y), entropy, bytes per target) and its validation shards: BPB.

    python bench/mixer_online.py truth --fit 'data/datasets/sample_sp1024/fineweb_train_*.bin' --order 2 --tokens 200000
    python bench/mixer_online.py heldout --fit data/datasets/heldout_man_sp1024/fineweb_train_000000.bin \\
        --eval data/datasets/heldout_man_sp1024/fineweb_val_000000.bin --order 2
    python bench/mixer_online.py dump runs/dump_seed1337.npz --val 'data/datasets/sample_sp1024/fineweb_val_*.bin'

Options --chunk (targets per mixer chunk, default 4096), --set KEY=VALUE (a BackoffNgramMixer keyword for
rule online, e.g. online_grid=0,0.5), --rules (comma list), --prefixes 4096,20000 (dump: also the BPB over
the first targets). Each row also gives the whole-stream time.
"""
import argparse
import glob
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import train_gpt  # noqa: E402
from backoff_mixer import RULES, BackoffNgramMixer  # noqa: E402
from mixer_audit import NgramProxy, token_bytes, truth_stream  # noqa: E402

TOKENIZER = str(ROOT / "data" / "tokenizers" / "sample_1024_bpe.model")


def shards(pattern: str) -> np.ndarray:
    paths = sorted(glob.glob(pattern))
    if not paths:
        sys.exit(f"error: no file matches {pattern}")
    return np.concatenate([train_gpt.load_data_shard(p).numpy() for p in paths]).astype(np.int64)


def proxy_scores(net: NgramProxy, ev: np.ndarray):
    """log p_net(y) and H of the proxy on the stream ev (targets ev[1:])."""
    lp, H, n = [], [], ev.size - 1
    for s in range(0, n, 4096):
        e = min(s + 4096, n)
        logp = torch.log_softmax(net.logits(ev, s, e), -1)
        lp.append(logp.gather(1, torch.from_numpy(ev[s + 1:e + 1])[:, None]).squeeze(1))
        H.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(lp), torch.cat(H)


def score_rules(tokens, logp_y, H, chunk, rules, online_kw):
    """rule -> (nll [N-1] float64, seconds, mixer)."""
    out = {}
    for rule in rules:
        m = BackoffNgramMixer(rule=rule, **(online_kw if rule == "online" else {}))
        t0 = time.perf_counter()
        nll = m.score_stream(tokens, logp_y, H, chunk).double()
        out[rule] = (nll, time.perf_counter() - t0, m)
    return out


def prefixes(res, nll_net, nbytes, ends):
    """BPB of each rule over the first e targets (the stream start, where the counts are few)."""
    print(f"{'first targets':>14} {'network':>8} " + " ".join(f"{r:>18}" for r in res))
    for e in ends:
        bpb = lambda nll: nll[:e].sum().item() / math.log(2) / nbytes[:e].sum()
        print(f"{e:>14,} {bpb(nll_net):8.4f} " + " ".join(f"{bpb(nll):18.4f}" for nll, _, _ in res.values()))


def table(res, nll_net, nbytes=None, harm=False):
    n = nll_net.numel()
    unit = "harm nats/token" if harm else ("BPB" if nbytes else "nats/token")
    val = lambda nll: ((nll.mean() - nll_net.mean()).item() if harm else
                       (nll.sum().item() / math.log(2) / nbytes if nbytes else nll.mean().item()))
    print(f"{'rule':22} {unit:>16} {'score_stream s':>15}")
    if not harm:
        print(f"{'network alone':22} {val(nll_net):16.5f}")
    for rule, (nll, sec, m) in res.items():
        print(f"{rule:22} {val(nll):16.5f} {sec:15.2f}")
        if rule == "online":
            active = int((m.stream_sums[:, -1] > 0).sum())
            print(f"  online: K={m.n_experts} experts, {active}/{m.n_buckets} buckets with tokens; bound "
                  f"{active} log K = {active * math.log(m.n_experts):.1f} nats = {active * math.log(m.n_experts) / n:.5f} "
                  f"nats/token over the network alone ({n:,} targets)")
            print(f"  learned: {m.learned()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("truth", "heldout", "dump"))
    ap.add_argument("dump", nargs="?", help="dump: the EVAL_DUMP npz")
    ap.add_argument("--val", help="dump: glob of the validation shards the run scored")
    ap.add_argument("--fit", help="truth/heldout: glob of the shards the proxy is fitted on")
    ap.add_argument("--eval", help="heldout: glob of the shards scored")
    ap.add_argument("--order", type=int, default=2, choices=(2, 3), help="proxy order")
    ap.add_argument("--tokens", type=int, default=200_000, help="truth: stream length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for rule online (repeatable)")
    ap.add_argument("--prefixes", default="", help="dump: comma list of stream-start lengths to also score")
    a = ap.parse_args(argv)
    online_kw = dict(kv.split("=", 1) for kv in a.set)
    if "online_eta" in online_kw:
        online_kw["online_eta"] = float(online_kw["online_eta"])
    rules = a.rules.split(",")
    torch.set_num_threads(1)
    if a.mode == "dump":
        d = np.load(a.dump)
        tokens = torch.from_numpy(shards(a.val))
        if tokens.numel() - 1 != d["nll_neural"].size:
            sys.exit(f"error: {a.dump} has {d['nll_neural'].size} targets but {a.val} holds {tokens.numel() - 1}")
        nll_net = torch.from_numpy(d["nll_neural"]).double()
        res = score_rules(tokens, torch.from_numpy(-d["nll_neural"]), torch.from_numpy(d["entropy"]), a.chunk, rules, online_kw)
        print(f"{a.dump}: {nll_net.numel():,} targets, chunk {a.chunk}")
        table(res, nll_net, float(d["bytes"].sum()))
        if a.prefixes:
            prefixes(res, nll_net, d["bytes"], [int(e) for e in a.prefixes.split(",")] + [nll_net.numel()])
        return 0
    fit = shards(a.fit)
    net = NgramProxy(fit, 1024, a.order)
    if a.mode == "truth":
        t0 = time.perf_counter()
        ev, logp_y, H = truth_stream(net, a.tokens, int(fit[0]), a.seed)
        print(f"truth stream: {a.tokens:,} tokens drawn from the order-{a.order} proxy fitted on {a.fit} "
              f"({fit.size:,} tokens), seed {a.seed}, {time.perf_counter() - t0:.0f} s; network "
              f"{-logp_y.double().mean():.4f} nats/token, mean H {H.double().mean():.4f}; chunk {a.chunk}")
        table(score_rules(torch.from_numpy(ev), logp_y, H, a.chunk, rules, online_kw), -logp_y.double(), harm=True)
        return 0
    ev = shards(a.eval)
    logp_y, H = proxy_scores(net, ev)
    nbytes = float(token_bytes(TOKENIZER, 1024)(ev[:-1], ev[1:]).sum())
    print(f"held-out: order-{a.order} proxy fitted on {a.fit} ({fit.size:,} tokens), scoring {a.eval} "
          f"({ev.size - 1:,} targets, {nbytes:,.0f} bytes), chunk {a.chunk}")
    table(score_rules(torch.from_numpy(ev), logp_y, H, a.chunk, rules, online_kw), -logp_y.double(), nbytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
