"""Windows/s of the sliding-window evaluation's neural pass (train_gpt.eval_sliding), and the full run it implies.

The model is a given artifact (--artifact, its architecture adopted) or a random-init one at the preset's
config; tokens are random (speed does not depend on them). A warm-up pass over two batches pays for the
compile (COMPILE=1) of both window shapes (window 0 scores all positions, later windows their last
EVAL_STRIDE); then a slice of --windows windows is timed on one device, as one rank of the sharded eval.

Extrapolation: the validation set's 62,021,632 tokens give ceil((N - L)/S) + 1 windows (L = EVAL_SEQ_LEN,
S = EVAL_STRIDE), split evenly over --gpus ranks; seconds = windows per rank / windows/s. Compared with the
90 s target (issue 4) and the record's ~590 s (every rank scored every window).

    python bench/bench_eval.py [--preset record|cpu] [--artifact PATH] [--windows 2048] [--gpus 8] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import default_device, make_args, sync  # noqa: E402
from train_gpt import (GPT, attention_backend, adopt_artifact_arch, build_eval_model, eval_sliding,  # noqa: E402
                       load_artifact, make_stats_fn, sliding_windows)

VAL_TOKENS = 62_021_632
TARGET_S = 90.0
RECORD_EVAL_S = 590.0


def full_val_windows(args) -> int:
    """Windows of the full validation stream (its VAL_TOKENS - 1 targets)."""
    return len(sliding_windows(VAL_TOKENS - 1, args.eval_seq_len, args.eval_stride))


def random_eval_model(args, device) -> GPT:
    """A random-init model as the eval builds it (no MTP heads)."""
    return build_eval_model(args.arch(), GPT(args.arch()).state_dict(), "random-init", device)


def time_sliding(model: GPT, args, device: torch.device, windows: int, gpus: int = 8, log=print) -> dict:
    """Time eval_sliding over `windows` windows of random tokens; extrapolate to the full validation."""
    L, S, B = args.eval_seq_len, args.eval_stride, args.eval_batch_seqs
    model.eval().set_attention_backend(attention_backend(device))
    stats_fn = make_stats_fn(model, args)
    ctx = SimpleNamespace(rank=0, world=1, device=device, sync=lambda: sync(device))
    gen = torch.Generator().manual_seed(0)

    def run(n_windows: int) -> float:
        tokens = torch.randint(0, args.vocab_size, (L + (n_windows - 1) * S + 1,), generator=gen)
        sync(device)
        t0 = time.perf_counter()
        logp, _ = eval_sliding(stats_fn, tokens, args, ctx, lambda msg: None)
        if logp.numel() != tokens.numel() - 1 or not torch.isfinite(logp).all():
            raise RuntimeError("eval_sliding did not score every target with a finite log-probability")
        return time.perf_counter() - t0

    warmup_s = run(2 * B)
    seconds = run(windows)
    wps = windows / seconds
    total = full_val_windows(args)
    per_rank = math.ceil(total / gpus)
    full_s = per_rank / wps
    log(f"eval: {windows} windows of {L} (stride {S}, batch {B}) in {seconds:.2f} s")
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "preset": args.preset, "compile": args.compile, "seq_len": L, "stride": S, "batch_seqs": B,
        "warmup_s": warmup_s, "windows": windows, "seconds": seconds, "windows_per_s": wps,
        "val_windows": total, "gpus": gpus, "windows_per_rank": per_rank, "full_eval_s": full_s,
        "ratio_to_target": full_s / TARGET_S, "ratio_to_record": full_s / RECORD_EVAL_S,
    }


def describe(res: dict) -> str:
    return "\n".join([
        f"device {res['device']}  preset {res['preset']}  compile {res['compile']}  "
        f"window {res['seq_len']} stride {res['stride']} batch {res['batch_seqs']}",
        f"{res['windows']} windows in {res['seconds']:.2f} s = {res['windows_per_s']:,.1f} windows/s "
        f"(warm-up {res['warmup_s']:.1f} s)",
        f"full validation: {res['val_windows']:,} windows / {res['gpus']} GPUs = {res['windows_per_rank']:,} per rank "
        f"-> {res['full_eval_s']:,.1f} s = {res['ratio_to_target']:.2f} x the {TARGET_S:.0f} s target, "
        f"{res['ratio_to_record']:.2f} x the record's ~{RECORD_EVAL_S:.0f} s",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["record", "cpu"], default=None, help="default: record on CUDA, cpu otherwise")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--artifact", default=None, help="an artifact .ptz (default: random-init model)")
    ap.add_argument("--windows", type=int, default=None, help="timed windows (default: 16 batches)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    a = ap.parse_args(argv)
    device = torch.device(a.device) if a.device else default_device()
    args = make_args(a.preset, device)
    if a.artifact:
        meta, state = load_artifact(a.artifact)
        adopt_artifact_arch(args, meta, a.artifact)
        model = build_eval_model(meta["arch"], state, a.artifact, device)
    else:
        model = random_eval_model(args, device)
    res = time_sliding(model, args, device, a.windows or 16 * args.eval_batch_seqs, a.gpus)
    print(describe(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
