"""Time training steps of the record model on whatever device is present (a benchmark, not a test).

One step is what train_gpt.py's loop does on one rank of the record run (8 ranks, grad accumulation 1):
forward + backward on TRAIN_BATCH_TOKENS/8 tokens (48 x 2048 at the record config), loss.item(), the
Muon + AdamW step, the EMA update. Tokens are random (speed does not depend on them). On CUDA the model is compiled
(COMPILE=1) and runs in bf16 autocast; the warm-up steps pay for the compile and are not timed.

Model FLOPs per token (stated, PaLM-style, attention counted as non-causal):
    6 * N  +  12 * L * T * d
N = matmul parameters: every parameter except the embedding lookup tables (token, bigram, value
embeddings), plus V*d for the tied output head (a real matmul); MTP heads included. L layers,
T sequence length, d model width. MFU = FLOPs/token * tokens/s / 989 TFLOP/s (H100 bf16 dense).

Single GPU caveat: the record's parallel Muon orthogonalizes 1/8 of the matrices per rank; here one
device does all of them, and there are no collectives. The ratio to the record is per GPU.

    python bench/bench_train.py [--preset record|cpu] [--steps 50] [--warmup 5] [--seqs 48] [--json PATH]
Any train_gpt.py env var (NUM_LAYERS=2, TRAIN_SEQ_LEN=128, COMPILE=0, ...) overrides the preset.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import GPT, Hyperparameters, Optimizers, attention_backend, autocast, build_model, count_params  # noqa: E402

RECORD_GLOBAL_TOKENS = 786_432
RECORD_MS_PER_STEP = 85.5
RECORD_GPUS = 8
RECORD_TOKENS_PER_S_PER_GPU = RECORD_GLOBAL_TOKENS / (RECORD_MS_PER_STEP / 1000) / RECORD_GPUS  # ~1.15M
H100_BF16_PEAK_FLOPS = 989e12


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def make_args(preset: str | None, device: torch.device, overrides: dict | None = None) -> Hyperparameters:
    """Hyperparameters of the preset (record on CUDA, cpu otherwise); overrides, then the environment, win."""
    env = {**(overrides or {}), **os.environ}
    return Hyperparameters(env=env, preset=preset or ("record" if device.type == "cuda" else "cpu"))


def matmul_params(model: GPT) -> int:
    """N of the FLOPs formula: parameters outside embedding tables, plus the tied output head (V*d)."""
    tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return sum(p.numel() for p in model.parameters()) - tables + model.tok_emb.weight.numel()


def flops_per_token(model: GPT, args: Hyperparameters) -> int:
    """6*N + 12*L*T*d (forward + backward)."""
    return 6 * matmul_params(model) + 12 * args.num_layers * args.train_seq_len * args.model_dim


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(args: Hyperparameters, device: torch.device, steps: int, warmup: int,
                  seqs: int | None = None, log=print) -> tuple[dict, GPT]:
    """Build the model, run `warmup` untimed then `steps` timed training steps; (results, trained model)."""
    seqs = seqs or args.train_batch_tokens // (RECORD_GPUS * args.train_seq_len)
    T, V = args.train_seq_len, args.vocab_size
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(args).to(device)
    backend = attention_backend(device, args.attention)
    model.set_attention_backend(backend)
    total, mtp = count_params(model)
    compiled = torch.compile(model) if args.compile else model
    opt = Optimizers(model, args, 0, 1)
    params = list(model.parameters())
    ema = [p.detach().float().clone() for p in params]
    gen = torch.Generator(device=device).manual_seed(0)

    def step(i: int) -> float:
        batch = torch.randint(0, V, (seqs, T + 1), device=device, generator=gen)
        with autocast(device):
            loss = compiled(batch[:, :-1], batch[:, 1:])
        loss.backward()
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"training loss is {value} at step {i}")
        opt.step(i, 1.0)
        opt.zero_grad()
        torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - args.ema_decay)
        return value

    log(f"train: {total:,} params ({mtp:,} MTP), {seqs}x{T} tokens/step, attention {backend}, "
        f"compile {args.compile}, device {device}")
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = step(i)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = seqs * T * steps
    fpt = flops_per_token(model, args)
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "preset": args.preset, "compile": args.compile, "attention": backend,
        "model_params": total, "mtp_params": mtp, "matmul_params": matmul_params(model),
        "flops_per_token": fpt, "seqs": seqs, "seq_len": T, "tokens_per_step": seqs * T,
        "warmup_steps": warmup, "warmup_s": warmup_s, "steps": steps,
        "ms_per_step": 1000 * seconds / steps, "tokens_per_s": tokens / seconds, "final_loss": loss,
        "ratio_to_record_per_gpu": tokens / seconds / RECORD_TOKENS_PER_S_PER_GPU,
        "mfu": fpt * tokens / seconds / H100_BF16_PEAK_FLOPS if device.type == "cuda" else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    return res, model


def describe(res: dict) -> str:
    lines = [
        f"device {res['device']}  preset {res['preset']}  compile {res['compile']}  attention {res['attention']}",
        f"params {res['model_params']:,} (MTP {res['mtp_params']:,}); FLOPs/token 6N+12LTd = {res['flops_per_token'] / 1e6:.1f}M",
        f"{res['steps']} steps of {res['seqs']}x{res['seq_len']} after {res['warmup_steps']} warm-up ({res['warmup_s']:.1f} s)",
        f"{res['ms_per_step']:.1f} ms/step  {res['tokens_per_s']:,.0f} tokens/s  "
        f"= {res['ratio_to_record_per_gpu']:.3f} x record per GPU ({RECORD_TOKENS_PER_S_PER_GPU:,.0f} tokens/s)",
    ]
    if res["mfu"] is not None:
        lines.append(f"MFU {100 * res['mfu']:.1f}% of 989 TFLOP/s  peak memory {res['peak_mem_gib']:.1f} GiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["record", "cpu"], default=None, help="default: record on CUDA, cpu otherwise")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=None, help="default: 5 with COMPILE=1, else 1")
    ap.add_argument("--seqs", type=int, default=None, help="sequences per step (default TRAIN_BATCH_TOKENS/8/TRAIN_SEQ_LEN)")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    a = ap.parse_args(argv)
    device = torch.device(a.device) if a.device else default_device()
    args = make_args(a.preset, device)
    warmup = a.warmup if a.warmup is not None else (5 if args.compile else 1)
    res, _ = time_training(args, device, a.steps, warmup, a.seqs)
    print(describe(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
