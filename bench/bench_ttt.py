"""Score-first test-time training (train_gpt.TestTimeTrainer inside eval_sliding): its cost, and its gain.

time   Per-chunk cost of scoring and of training, measured on one device, and the full evaluation it implies
       on --gpus ranks. One rank of G scores 1/G of each chunk's windows and trains on 1/G of each step's
       sequences, so one device running chunks of TTT_CHUNK_TOKENS/G tokens and steps of TTT_BATCH_SEQS/G
       sequences does one rank's work per chunk (same batch shapes, same number of steps). Full-val seconds
       = (62,021,632 / TTT_CHUNK_TOKENS) chunks x that per-chunk time. Not measured: the collectives (one
       all_gather of the chunk's scores, one all_reduce of the adapted gradients per step: 4 bytes x the
       adapted parameters, 112 MB at record size when all adapt). Tokens are random (speed does not depend
       on them); a warm-up over two chunks pays for the compile (COMPILE=1).
sweep  EVAL_ONLY=1 runs of train_gpt.py on an artifact: one with TTT off, one per point of a grid of TTT settings
       (--vary), each with its log in --out/logs (a log already there is reused, not rerun); prints a markdown
       table (neural sliding BPB, mixed BPB, their gains, the eval time split). Any train_gpt.py env var
       (DATA_PATH, TOKENIZER_PATH, EVAL_DUMP is not set) passes through to every run.
three  One EVAL_ONLY=1 run with TTT (--set NAME=V: its settings) and EVAL_DUMP, and the three scores its arrays give
       (issue 24): rule online over the unadapted network alone ("no TTT": what a TTT_ENABLED=0 run scores, from
       the dump's nll_no_ttt/entropy_no_ttt), over the adapted network alone ("TTT alone"), and the run's own
       mixture of both ("both"); with the bound (buckets with targets) log K / (ln 2 x bytes) in BPB, and whether
       "both" is within it of the other two. A JSON line per run is appended to --out/three.jsonl.
table  The markdown table of --out/three.jsonl: a row per run, then per (split, settings, artifact name without
       its _s<seed> part) the mean and standard deviation over the seeds.

    python bench/bench_ttt.py time [--preset record|cpu] [--chunks 6] [--gpus 8] [--json PATH]
    python bench/bench_ttt.py sweep --artifact A.ptz --vary TTT_CHUNK_TOKENS=4096,16384 --vary TTT_EPOCHS=1,2 --out DIR
    python bench/bench_ttt.py three --artifact A.ptz --out DIR --tag s1337_sample [--set TTT_LR=0.009]
    python bench/bench_ttt.py table --out DIR
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from bench_eval import VAL_TOKENS, random_eval_model  # noqa: E402
from bench_train import default_device, make_args, sync  # noqa: E402
from train_gpt import TestTimeTrainer, attention_backend, eval_sliding, make_stats_fn  # noqa: E402

EVAL_BUDGET_S = 540.0  # of the 600 s evaluation limit, with a margin


def time_ttt(model, args, device: torch.device, chunks: int, gpus: int = 8, log=print) -> dict:
    """Time `chunks` chunks of one rank's share (see the module docstring); extrapolate to the full val on `gpus`."""
    C, B, L, S = args.ttt_chunk_tokens, args.ttt_batch_seqs, args.eval_seq_len, args.eval_stride
    if (C // gpus) % S:
        raise ValueError(f"TTT_CHUNK_TOKENS/{gpus} = {C / gpus} is not a multiple of EVAL_STRIDE={S}")
    args.ttt_enabled, args.ttt_chunk_tokens, args.ttt_batch_seqs = 1, C // gpus, max(B // gpus, 1)
    model.eval().set_attention_backend(attention_backend(device))
    stats_fn = make_stats_fn(model, args)
    ctx = SimpleNamespace(rank=0, world=1, device=device, sync=lambda: sync(device))
    gen = torch.Generator().manual_seed(0)

    def run(n: int) -> tuple[float, float, int]:
        tokens = torch.randint(0, args.vocab_size, (L - S + n * args.ttt_chunk_tokens + 1,), generator=gen)
        ttt = TestTimeTrainer(model, tokens, args, ctx, lambda _m: None, time.perf_counter())
        sync(device)
        t0 = time.perf_counter()
        logp, _ = eval_sliding(stats_fn, tokens, args, ctx, lambda _m: None, ttt)
        sync(device)
        if logp.numel() != tokens.numel() - 1 or not torch.isfinite(logp).all():
            raise RuntimeError("eval_sliding with TTT did not score every target with a finite log-probability")
        return time.perf_counter() - t0, ttt.seconds, ttt.steps

    warmup_s = run(2)[0]
    total_s, train_s, steps = run(chunks)
    score_chunk, train_chunk = (total_s - train_s) / chunks, train_s / (chunks - 1)
    full_chunks = math.ceil((VAL_TOKENS - 1) / C)
    full_s = full_chunks * score_chunk + (full_chunks - 1) * train_chunk
    args.ttt_chunk_tokens, args.ttt_batch_seqs = C, B
    log(f"ttt: {chunks} chunks of {C // gpus} tokens in {total_s:.2f} s ({train_s:.2f} s training, {steps} steps)")
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "preset": args.preset,
        "compile": args.compile, "gpus": gpus, "chunk_tokens": C, "rank_chunk_tokens": C // gpus, "epochs": args.ttt_epochs,
        "batch_seqs": B, "rank_batch_seqs": max(B // gpus, 1), "seq_len": L, "stride": S, "optimizer": args.ttt_optimizer,
        "adapted_params": sum(p.numel() for p in ttt_params(model, args)), "warmup_s": warmup_s, "chunks": chunks,
        "seconds": total_s, "train_s": train_s, "steps": steps, "score_s_per_chunk": score_chunk,
        "train_s_per_chunk": train_chunk, "full_chunks": full_chunks, "full_sliding_s": full_chunks * score_chunk,
        "full_train_s": (full_chunks - 1) * train_chunk, "full_ttt_eval_s": full_s,
    }


def ttt_params(model, args) -> list:
    return [p for n, p in model.named_parameters() if re.search(args.ttt_params, n)]


def describe(res: dict) -> str:
    return "\n".join([
        f"device {res['device']}  preset {res['preset']}  compile {res['compile']}  chunk {res['chunk_tokens']} tokens, "
        f"{res['epochs']} epochs, {res['batch_seqs']} seqs/step, {res['optimizer']}, {res['adapted_params']:,} params adapt",
        f"one rank of {res['gpus']}: chunks of {res['rank_chunk_tokens']} tokens, {res['rank_batch_seqs']} seqs/step: "
        f"score {res['score_s_per_chunk'] * 1000:.1f} ms + train {res['train_s_per_chunk'] * 1000:.1f} ms per chunk",
        f"full validation: {res['full_chunks']:,} chunks -> sliding {res['full_sliding_s']:,.1f} s + TTT training "
        f"{res['full_train_s']:,.1f} s = {res['full_ttt_eval_s']:,.1f} s on {res['gpus']} GPUs (collectives not included)",
    ])


FINAL = {"neural": r"^final_int6_sliding_window_neural_exact val_loss:\S+ val_bpb:(\S+)",
         "mixed": r"^final_int6_sliding_window_exact val_loss:\S+ val_bpb:(\S+)",
         "split": r"^eval_time_split (.*)$", "steps": r"^eval_time_split .*ttt_steps:(\d+)"}


def eval_only(artifact: str, out: Path, run_id: str, env: dict, dump: bool = False) -> dict:
    """One EVAL_ONLY=1 run of train_gpt.py (cwd out: give paths in the env absolute); the numbers of its log."""
    log = out / "logs" / f"{run_id}.txt"
    if log.exists() and "run_complete" not in log.read_text():
        log.unlink()  # an interrupted or failed run: run it again
    if not log.exists():
        cmd = [sys.executable, str(HERE.parent / "train_gpt.py")]
        env = dict(os.environ, EVAL_ONLY="1", ARTIFACT=str(Path(artifact).resolve()), RUN_ID=run_id, **env)
        if dump:
            env["EVAL_DUMP"] = str(out / "dumps" / f"{run_id}.npz")
        p = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"{run_id} failed:\n{(p.stdout + p.stderr)[-2000:]}")
    text = log.read_text()
    return {k: (m.group(1) if (m := re.search(rx, text, re.M)) else None) for k, rx in FINAL.items()}


def sweep(a) -> int:
    """The TTT-off run, then one TTT run per point of the grid (the product of every --vary NAME=v1,v2,...)."""
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    grid = [[(n, v) for v in vals.split(",")] for n, vals in (x.split("=", 1) for x in a.vary)]
    names = [g[0][0] for g in grid]
    base = eval_only(a.artifact, out, f"{a.tag}_off", {"TTT_ENABLED": "0"}, a.dump)
    print(f"| {' | '.join(names)} | TTT steps | neural BPB | gain | mixed BPB | gain | eval time split |\n"
          f"|{' --- |' * (len(names) + 6)}\n| off{' |' * len(names)} | {float(base['neural']):.4f} | | "
          f"{float(base['mixed']):.4f} | | {base['split']} |", flush=True)
    for point in itertools.product(*grid):
        tag = "_".join(f"{n.lower().replace('ttt_', '')}{v}" for n, v in point)
        r = eval_only(a.artifact, out, f"{a.tag}_{tag}", {"TTT_ENABLED": "1", **dict(point)}, a.dump)
        dn, dm = float(r["neural"]) - float(base["neural"]), float(r["mixed"]) - float(base["mixed"])
        print(f"| {' | '.join(v for _, v in point)} | {r['steps']} | {float(r['neural']):.4f} | {dn:+.4f} | "
              f"{float(r['mixed']):.4f} | {dm:+.4f} | {r['split']} |", flush=True)
    return 0


def three(a) -> int:
    """One TTT run with its dump; rule online over each network alone and the run's mixture of both, in BPB."""
    import numpy as np
    from backoff_mixer import BackoffNgramMixer
    from train_gpt import HPARAMS, load_data_shard
    out = Path(a.out).resolve()
    (out / "dumps").mkdir(parents=True, exist_ok=True)
    env = {"TTT_ENABLED": "1", "USE_NGRAM_MIXER": "1", **dict(x.split("=", 1) for x in a.set)}
    r = eval_only(a.artifact, out, a.tag, env, dump=True)
    text = (out / "logs" / f"{a.tag}.txt").read_text()
    hp = json.loads(re.search(r"^hparams:(.*)$", text, re.M).group(1))
    learned = re.search(r"^mixer_learned (.*)$", text, re.M).group(1).split()
    d = np.load(out / "dumps" / f"{a.tag}.npz")
    val = torch.from_numpy(load_data_shard(Path(hp["DATA_PATH"]) / "fineweb_val_000000.bin").numpy().astype(np.int64))
    kw = {h.role[6:]: hp[h.name] for h in HPARAMS if h.role.startswith("mixer:")}
    chunk, nbytes = hp["EVAL_BATCH_SEQS"] * hp["EVAL_STRIDE"], float(d["bytes"].sum())
    bpb = lambda nll: float(np.sum(nll)) / math.log(2) / nbytes  # noqa: E731
    alone = lambda lp, h: BackoffNgramMixer(vocab_size=hp["VOCAB_SIZE"], **kw).score_stream(  # noqa: E731
        val, torch.from_numpy(lp), torch.from_numpy(h), chunk).double().numpy()
    K, buckets = int(learned[0].split(":")[1]), sum(bool(re.match(r"\d+,[\d/]+:\d+:", w)) for w in learned)
    res = {"tag": a.tag, "set": a.set, "artifact": a.artifact, "data": hp["DATA_PATH"], "targets": int(d["nll"].size),
           "ttt_steps": int(r["steps"]), "neural_no_ttt": bpb(d["nll_no_ttt"]), "neural_ttt": bpb(d["nll_neural"]),
           "no_ttt": bpb(alone(-d["nll_no_ttt"], d["entropy_no_ttt"])), "ttt_alone": bpb(alone(-d["nll_neural"], d["entropy"])),
           "both": bpb(d["nll"]), "experts": K, "buckets": buckets, "bound": buckets * math.log(K) / math.log(2) / nbytes}
    res["within_bound"] = res["both"] <= min(res["no_ttt"], res["ttt_alone"]) + res["bound"]
    with open(out / "three.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    print(" ".join(f"{k}:{v:.4f}" if isinstance(v, float) else f"{k}:{v}" for k, v in res.items()), flush=True)
    return 0


def table(a) -> int:
    """three.jsonl as markdown: every run, then mean and std over seeds per (split, settings, artifact name)."""
    import statistics
    rows = [json.loads(line) for line in (Path(a.out) / "three.jsonl").read_text().splitlines() if line.strip()]
    keys = ["neural_no_ttt", "neural_ttt", "no_ttt", "ttt_alone", "both", "bound"]
    print("| run | settings | TTT steps | " + " | ".join(keys) + " | both - min(no TTT, TTT alone) | within bound |")
    print("|" + " --- |" * (len(keys) + 5))
    groups = {}
    for r in rows:
        r["margin"] = r["both"] - min(r["no_ttt"], r["ttt_alone"])
        print(f"| {r['tag']} | {' '.join(r['set']) or 'default'} | {r['ttt_steps']} | "
              + " | ".join(f"{r[k]:.4f}" for k in keys) + f" | {r['margin']:+.4f} | {r['within_bound']} |")
        name = re.sub(r"_s\d+", "", Path(r["artifact"]).stem)
        groups.setdefault((Path(r["data"]).name, " ".join(r["set"]) or "default", name), []).append(r)
    print("\n| split | settings | artifacts | seeds | " + " | ".join(keys + ["margin"]) + " |")
    print("|" + " --- |" * (len(keys) + 5))
    for (data, st, name), rs in groups.items():
        cell = lambda k: (f"{statistics.mean(r[k] for r in rs):.4f}"  # noqa: E731
                          + (f" ± {statistics.stdev(r[k] for r in rs):.4f}" if len(rs) > 1 else ""))
        print(f"| {data} | {st} | {name} | {len(rs)} | " + " | ".join(cell(k) for k in keys + ["margin"]) + " |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time")
    t.add_argument("--preset", choices=["record", "cpu"], default=None, help="default: record on CUDA, cpu otherwise")
    t.add_argument("--chunks", type=int, default=6, help="timed chunks (the last one is not trained on)")
    t.add_argument("--gpus", type=int, default=8)
    t.add_argument("--json", default=None)
    s = sub.add_parser("sweep")
    s.add_argument("--artifact", required=True)
    s.add_argument("--vary", action="append", default=[], help="NAME=v1,v2 (repeatable): the grid's axes")
    s.add_argument("--out", required=True, help="cwd of the runs (their logs/ land here; existing logs are reused)")
    s.add_argument("--tag", default="sweep")
    s.add_argument("--dump", action="store_true", help="EVAL_DUMP of every run to --out/dumps/<run id>.npz")
    h = sub.add_parser("three")
    h.add_argument("--artifact", required=True)
    h.add_argument("--out", required=True, help="cwd of the run (logs/, dumps/ and three.jsonl land here)")
    h.add_argument("--tag", required=True, help="the run id")
    h.add_argument("--set", action="append", default=[], help="NAME=V (repeatable): an env var of the run")
    tb = sub.add_parser("table")
    tb.add_argument("--out", required=True, help="the folder of three.jsonl")
    a = ap.parse_args(argv)
    if a.cmd == "table":
        return table(a)
    if a.cmd == "sweep":
        return sweep(a)
    if a.cmd == "three":
        return three(a)
    device = default_device()
    args = make_args(a.preset, device)
    res = time_ttt(random_eval_model(args, device), args, device, a.chunks, a.gpus)
    print(describe(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
