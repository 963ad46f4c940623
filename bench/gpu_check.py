"""One-call GPU check (issues 9, 18, 25): does the full-size record path work, how fast, and what does it weigh?

Phases, each in its own try block (a failure is recorded and the others still run), in this order, what decides
the record first (issue 25's four answers: e2e, attention + e2e, plan, mixer):
  env        nvidia-smi line, torch / CUDA / triton versions, FlashAttention-3 importable or SDPA
  model      the record-size model's parameter counts (expected 28,042,332, of which 1,048,576 MTP)
  attention  causal GQA attention paths side by side at 48x2048 (bench/attention_paths.py): every SDPA backend,
             FlexAttention, FA3/FA4 if importable, forward+backward, checked against the math reference
  e2e        the real train_gpt.py at the record's batch (786,432 tokens a step: on one GPU 8 micro-batches of a
             record rank's 48x2048, so its tokens/s is the per-GPU rate, less the collectives) for E2E steps on a
             sampled offline stream, with the fastest correct attention path ATTENTION can name; the real export
             (calibration, candidates, rate control to TARGET_BYTES) and the real evaluation (round trip, the
             unadapted pass, TTT, the two-network mixer) on a 262,144-token validation stream: bits/parameter, the
             rate the controller chose, the export's and the evaluation's phase times (gpu_e2e.py)
  mixer      the evaluation's mixer pass (train_gpt.mix_stream) over a 62M-token synthetic Zipf stream with two
             networks' numbers (the record's evaluation): time and peak GPU memory; with --mixer-seconds > 0 also
             the streaming score_from_net/update API on a time-capped prefix
  plan       tools/time_plan.py with this run's rates over docs/gpu_runs/'s: the record run on 8 GPUs phase by
             phase (training, export, each evaluation pass, compilation) and the evaluation on one GPU; the clocks
  train      (if the budget allows) --steps timed training steps at 48x2048 in one micro-batch (bench_train.py)
  eval       (if the budget allows) the sliding scorer on a slice: windows/s (bench_eval.py)
  ttt        (if the budget allows) score-first TTT on one rank's share of a few chunks (bench_ttt.py)
  export     (only with --phases) train_gpt.export on an untrained model: calibration, candidates, a forced search
Writes gpu_check.json (after every phase), gpu_check_summary.txt, gpu_check.log, gpu_check_e2e_log.txt and
gpu_check_plan.txt to $OUT (or --out, or ./gpu_check_out/).

    bash bench/gpu_check.sh                # on the GPU machine: ~7 minutes on one H100/H200 (--budget 420)
    bash bench/gpu_check.sh --cpu-smoke    # tiny sizes on CPU (also GPU_CHECK_CPU_SMOKE=1)
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tools")]
import train_gpt  # noqa: E402
from bench_eval import RECORD_EVAL_S, TARGET_S, VAL_TOKENS, random_eval_model, time_sliding  # noqa: E402
from bench_ttt import EVAL_BUDGET_S, time_ttt  # noqa: E402
from bench_train import (RECORD_MS_PER_STEP, RECORD_TOKENS_PER_S_PER_GPU, make_args, sync,  # noqa: E402
                         time_training)
from attention_paths import time_paths  # noqa: E402
from gpu_e2e import phase_e2e  # noqa: E402
from time_plan import (FULL_VAL_TOKENS, GPUS, clocks, complete, plan, rates_from_e2e, rates_from_results,  # noqa: E402
                       rates_from_runs, render)
from train_gpt import (LIMIT_BYTES, autocast, build_eval_model, build_model, code_bytes, count_params,  # noqa: E402
                       load_artifact)

RECORD_PARAMS, RECORD_MTP_PARAMS, RECORD_MODEL_BYTES = 28_042_332, 1_048_576, 15_865_748
SMOKE_ENV = {"TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "32", "EVAL_BATCH_SEQS": "8",
             "COMPILE": "0", "TTT_CHUNK_TOKENS": "256", "TTT_BATCH_SEQS": "2", "GPTQ_CALIB_TOKENS": "4096"}
ROUNDTRIP_TOL = 0.05  # nats: int6 error on the loss of one batch
PHASES = ["env", "model", "attention", "e2e", "mixer", "plan", "train", "eval", "ttt", "export"]
DEFAULT_PHASES = [p for p in PHASES if p != "export"]  # e2e runs the real export on trained weights
ATTENTION_CHOICES = next(h.check for h in train_gpt.HPARAMS if h.name == "ATTENTION").split("|")
# e2e: full size (40 steps of the record's 786,432 tokens: 31M tokens, ~0.8 s a step on one H100-class GPU;
# 262,144 validation tokens) and the CPU smoke's tiny run
E2E = {"full": {"steps": 40, "batch_tokens": 786_432, "val_tokens": 262_144, "env": {"WARMUP_STEPS": "3"}},
       "smoke": {"steps": 4, "batch_tokens": 2048, "val_tokens": 4096,
                 "env": {"NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "VE_LAYERS": "1",
                         "XSA_LAST_N": "1", "BIGRAM_DIM": "16", "VE_DIM": "16", "TRAIN_SEQ_LEN": "64",
                         "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "32", "EVAL_BATCH_SEQS": "8", "VAL_BATCH_SIZE": "4096",
                         "WARMUP_STEPS": "0", "GPTQ_CALIB_TOKENS": "2048", "TTT_CHUNK_TOKENS": "1024",
                         "TTT_BATCH_SEQS": "4", "NGRAM_ORDER": "4", "COMPILE": "0"}}}
E2E_RESERVE_S = 60.0  # what the e2e phase leaves of the budget for the mixer and the plan
NEED_S = {"train": 75.0, "eval": 45.0, "ttt": 60.0}  # the phases after the plan run only with this much budget left


class Check:
    """Runs phases, keeps their results, logs to the console and to gpu_check.log."""

    def __init__(self, out: Path, budget_s: float, mode: str):
        self.out, self.budget_s, self.mode, self.t0 = out, budget_s, mode, time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "gpu_check.log", "w", buffering=1)
        self.results: dict[str, dict] = {}
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def log(self, msg: str):
        line = f"[{time.perf_counter() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def phase(self, name: str, fn):
        self.log(f"== {name}")
        t = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # one phase's failure must not hide the others' results
            self.log(traceback.format_exc().rstrip())
            first = (str(e).strip().splitlines() or [""])[0]
            res = {"error": f"{type(e).__name__}: {first[:300]}"}
        res["phase_s"] = time.perf_counter() - t
        self.results[name] = res
        self.log(f"{name}: " + json.dumps(res, default=str))
        self.save()

    def failed(self) -> list[str]:
        return [k for k, v in self.results.items() if "error" in v]

    def save(self):
        """gpu_check.json after every phase, so a run cut off by its time limit still leaves its results."""
        report = {"mode": self.mode, "date": self.date, "total_s": time.perf_counter() - self.t0,
                  "failed": self.failed(), "results": self.results}
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))


def flash_gqa(device: torch.device) -> bool | str:
    """Does SDPA's flash kernel take GQA (8 query / 4 KV heads, bf16, causal) forward and backward?
    If not, training falls back to the math kernel: T x T scores in memory."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(2, 8, 256, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 4, 256, 64, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    except RuntimeError as e:
        return f"no: {str(e).strip().splitlines()[0][:200]}"
    return True


def phase_env(device: torch.device) -> dict:
    smi = "no nvidia-smi"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"nvidia_smi": smi, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "fa3_importable": train_gpt._fa3_func is not None, "attention": train_gpt.attention_backend(device),
            "sdpa_flash_gqa": flash_gqa(device) if device.type == "cuda" else None}


def phase_model(args) -> dict:
    with torch.device("meta"):
        total, mtp = count_params(build_model(args))
    res = {"model_params": total, "mtp_params": mtp}
    if args.preset == "record":
        res["matches_spec"] = (total, mtp) == (RECORD_PARAMS, RECORD_MTP_PARAMS)
    return res


SEARCH_BITS = 4.8  # the timed export's target: artifact + code at this many bits per matrix entry (a forced search)


def phase_export(args, device, state: dict, seqs: int) -> dict:
    """train_gpt.export itself, timed from its log lines: calibration (forward + backward) on GPTQ_CALIB_TOKENS random
    tokens (the training stream is not needed for timing), every matrix's candidates (GPTQ), the size search towards a
    target of SEARCH_BITS per matrix entry; then the artifact is reloaded and the losses of both models compared on
    one batch."""
    model = state.get("model") or build_model(args).to(device)
    ctx = types.SimpleNamespace(rank=0, world=1, device=device, broadcast=lambda obj: obj)
    tokens = torch.randint(0, args.vocab_size, (args.gptq_calib_tokens,), generator=torch.Generator().manual_seed(0))
    n_code = code_bytes()[0]
    n_mat = sum(t.numel() for n, t in model.state_dict().items() if t.ndim == 2 and not n.startswith("mtp_heads."))
    args.target_bytes, lines, cwd = n_code + int(SEARCH_BITS * n_mat / 8), [], os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            t = time.perf_counter()
            path, over = train_gpt.export(model, args, types.SimpleNamespace(take=lambda n: tokens[:n]), ctx, lines.append,
                                          "gpu_check", n_code, 0.0)
            export_s, blob_bytes = time.perf_counter() - t, Path(path).stat().st_size
            t = time.perf_counter()
            meta, sd = load_artifact(path)
            eval_model = build_eval_model(meta["arch"], sd, path, device)
            load_s = time.perf_counter() - t
        finally:
            os.chdir(cwd)
    text = "\n".join(lines)
    grab = lambda pat: float(m.group(1)) if (m := re.search(pat, text)) else None  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab_size, (seqs, args.train_seq_len + 1), generator=gen).to(device)
    model.eval()
    eval_model.eval()
    with torch.no_grad(), autocast(device):
        before = model(batch[:, :-1], batch[:, 1:]).item()
        after = eval_model(batch[:, :-1], batch[:, 1:]).item()
    orig = {k: v.float().cpu() for k, v in model.state_dict().items() if not k.startswith("mtp_heads.")}
    err = max(((orig[k] - v.cpu()).abs().max() / orig[k].abs().max().clamp_min(1e-12)).item() for k, v in sd.items())
    state["eval_model"] = eval_model
    return {"artifact_bytes": blob_bytes, "code_bytes": n_code, "total_bytes": blob_bytes + n_code, "target_bytes": args.target_bytes,
            "over": over, "under_limit": blob_bytes + n_code <= LIMIT_BYTES, "export_s": export_s, "load_s": load_s,
            "calibration_s": grab(r"training_clock .*calibration:(\S+)s"), "quantize_s": grab(r"training_clock .*quantize:(\S+)s"),
            "search_s": grab(r"serialized_model_int6_lzma:.* search:(\S+)s"), "rounds": len(re.findall(r"rate_search round", text)),
            "rate_control": next((l for l in lines if l.startswith("rate_control")), None), "loss_before": before,
            "loss_after": after, "loss_delta": after - before, "max_rel_weight_err": err, "roundtrip_ok": abs(after - before) < ROUNDTRIP_TOL}


def phase_mixer(args, device, n_tokens: int, check: Check, cap_s: float, networks: int = 2) -> dict:
    """The mixer over a synthetic Zipf stream: the evaluation's own pass (train_gpt.mix_stream, the whole-stream
    path) over all of it with `networks` networks' numbers (the record's evaluation: the unadapted and the adapted
    network), its time and peak GPU memory; then, if cap_s > 0, the streaming score_from_net/update contract (one
    network) on a prefix, chunked as the evaluation, until done or out of time."""
    from backoff_mixer import BackoffNgramMixer
    from mixer_audit import zipf_stream
    t = time.perf_counter()
    stream = torch.from_numpy(zipf_stream(n_tokens, args.vocab_size, seed=0).astype(np.int64))
    gen_s = time.perf_counter() - t
    N, P, chunk = n_tokens - 1, args.ngram_order - 1, args.eval_batch_seqs * args.eval_stride
    gen = torch.Generator().manual_seed(0)
    logp, ent = -4 * torch.rand(networks, N, generator=gen), 6 * torch.rand(networks, N, generator=gen)
    res = {"stream_tokens": n_tokens, "chunk": chunk, "zipf_gen_s": gen_s, "rule": args.ngram_rule, "networks": networks}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    try:
        nll = train_gpt.mix_stream(stream, logp if networks > 1 else logp[0], ent if networks > 1 else ent[0],
                                   torch.ones(N), args, device, lambda _m: None)
        sync(device)
        res.update(whole_stream_s=time.perf_counter() - t0, mean_nll=nll.mean().item())
    except torch.cuda.OutOfMemoryError:
        res.update(whole_stream_s=None, whole_stream_error="CUDA out of memory")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        res.update(cuda_peak_gib=peak / 2**30, cuda_peak_added_gib=(peak - base) / 2**30,
                   cuda_peak_bytes_per_token=(peak - base) / n_tokens,
                   cuda_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30,
                   cuda_total_gib=torch.cuda.get_device_properties(device).total_memory / 2**30)
    del logp, ent
    if cap_s <= 0:
        return res
    logp, ent = -4 * torch.rand(N, generator=gen), 6 * torch.rand(N, generator=gen)
    mixer = BackoffNgramMixer(vocab_size=args.vocab_size, device=device, **train_gpt.mixer_settings(args))   # default table size
    budget = max(min(cap_s, check.remaining() - 20), 10.0)
    stream_d, done, stopped, t0 = stream.to(device), 0, None, time.perf_counter()
    mixer.update(stream_d[:1])
    for a in range(0, N, chunk):
        if time.perf_counter() - t0 > budget:
            stopped = "time budget"
            break
        e = min(a + chunk, N)
        try:
            mixer.score_from_net(logp[None, a:e].to(device), ent[None, a:e].to(device), stream_d[None, a - min(a, P):e],
                                 stream_d[None, a + 1:e + 1])
            mixer.update(stream_d[a + 1:e + 1])
        except torch.cuda.OutOfMemoryError:
            stopped = f"CUDA out of memory at token {e:,}"
            break
        done = e
    sync(device)
    seconds = time.perf_counter() - t0
    rate = done / seconds if seconds > 0 else 0.0
    res.update(tokens_scored=done, complete=done == N, stopped=stopped, seconds=seconds, tokens_per_s=rate,
               est_full_val_s=(VAL_TOKENS - 1) / rate if rate else None, table_bytes=mixer.memory_bytes())
    return res


def phase_plan(results: dict, out: Path) -> dict:
    """tools/time_plan.py's plan of the record run (its preset as shipped) from the rates of this run's e2e log, then
    of its phases, then docs/gpu_runs/'s of the same GPU kind: every phase on 8 GPUs, the evaluation on one GPU too,
    and the clocks (gpu_check_plan.txt holds the table)."""
    name = results.get("env", {}).get("gpu") or ""
    kind = next((k for k in ("H100", "H200") if k in name), "")
    measured, _ = rates_from_runs(sorted(str(f) for f in (HERE.parent / "docs" / "gpu_runs").glob("*.json")), kind)
    measured.update(rates_from_results(results, "this run"))
    log_path = out / "gpu_check_e2e_log.txt"
    if log_path.is_file() and "eval_time_split" in (text := log_path.read_text()):
        measured.update(rates_from_e2e(text, "this run's e2e log"))
    rates, args = complete(measured), train_gpt.Hyperparameters({}, preset="record")
    p8, p1 = plan(args, rates, GPUS, FULL_VAL_TOKENS), plan(args, rates, 1, FULL_VAL_TOKENS)
    limits = clocks(p8, args)
    (out / "gpu_check_plan.txt").write_text(render(p8, limits, args, GPUS, FULL_VAL_TOKENS, [name or "CPU"]) + "\n")
    evaluation = lambda phases: sum(p.seconds for p in phases if p.clock == "evaluation")  # noqa: E731
    steps = re.search(r"training: ([0-9,]+) steps", next(p.name for p in p8 if p.key == "train")).group(1)
    return {"gpu_kind": kind, "gpus": GPUS, "val_tokens": FULL_VAL_TOKENS, "train_steps_8gpu": int(steps.replace(",", "")),
            "phases_8gpu_s": {p.key: p.seconds for p in p8}, "eval_8gpu_s": evaluation(p8),
            "compile_8gpu_s": sum(p.seconds for p in p8 if p.key.endswith("compile") and p.clock == "evaluation"),
            "eval_1gpu_s": evaluation(p1), "basis": {p.key: p.basis for p in p8},
            "clocks": [{"clock": c, "seconds": sec, "limit": lim, "flag": f} for c, sec, lim, f in limits],
            "flags": [f for *_, f in limits if f]}


def fmt(res: dict, key: str, spec: str = "{:,.1f}") -> str:
    v = res.get(key)
    return "n/a" if v is None else spec.format(v)


def summary(results: dict, mode: str) -> str:
    """The one-screen table: phase | measured | record / target."""
    r = {k: results.get(k, {}) for k in PHASES}
    paths = r["attention"].get("paths", {})
    att = ", ".join(f"{n} {v['ms_fwd_bwd']:.2f}" + ("" if v.get("matches_reference") else " WRONG")
                    for n, v in sorted(paths.items(), key=lambda kv: kv[1].get("ms_fwd_bwd", 1e9)) if "ms_fwd_bwd" in v)
    e2e, pl = r["e2e"], r["plan"]
    p8, choice = pl.get("phases_8gpu_s") or {}, ", ".join(f"{k} x{v}" for k, v in sorted(
        (e2e.get("rate_choice_counts") or {}).items(), key=lambda kv: -kv[1]))
    rows = [
        ("env", f"{r['env'].get('gpu') or r['env'].get('device')} | torch {r['env'].get('torch')} "
                f"triton {r['env'].get('triton')} | {r['env'].get('attention')}, flash GQA {r['env'].get('sdpa_flash_gqa')}", r["env"].get("nvidia_smi", "")),
        ("model", f"{fmt(r['model'], 'model_params', '{:,}')} params, {fmt(r['model'], 'mtp_params', '{:,}')} MTP",
                  f"{RECORD_PARAMS:,} / {RECORD_MTP_PARAMS:,}"),
        ("attention", f"fastest {r['attention'].get('fastest')} (ms fwd+bwd: {att or 'n/a'})",
                      f"{r['attention'].get('shape', '48x2048')}; the record used FA3"),
        ("e2e", f"{fmt(e2e, 'steps', '{}')} steps of {fmt(e2e, 'batch_tokens', '{:,}')} tokens at {fmt(e2e, 'ms_per_step')} ms "
                f"({e2e.get('attention')}) = {fmt(e2e, 'tokens_per_s', '{:,.0f}')} tok/s/GPU = "
                f"{fmt(e2e, 'ratio_to_record_per_gpu', '{:.3f}')} x rec", f"{RECORD_TOKENS_PER_S_PER_GPU:,.0f} tok/s/GPU "
                f"(786,432 per {RECORD_MS_PER_STEP} ms on 8)"),
        ("", f"artifact {fmt(e2e, 'artifact_bytes', '{:,}')} B = {fmt(e2e, 'bits_per_param', '{:.3f}')} bits/param, total "
             f"{fmt(e2e, 'total_bytes', '{:,}')} B{', OVER CAP' if e2e.get('over_cap') else ''}; post-EMA "
             f"{fmt(e2e, 'post_ema_bpb', '{:.4f}')} BPB, round trip {fmt(e2e, 'roundtrip_bpb', '{:.4f}')}",
             f"<= {LIMIT_BYTES:,} B; lineage 4.59-4.72 bits/param"),
        ("", f"rate: {(e2e.get('rate_line') or 'n/a').split(' choice:')[0]}", ""),
        ("", f"chosen: {choice or 'n/a'}", ""),
        ("", f"calibration {fmt(e2e, 'calibration_s')} s, candidates {fmt(e2e, 'quantize_s')} s, search "
             f"{fmt(e2e, 'search_s')} s; eval on one GPU {fmt(e2e.get('eval_split_s') or {}, 'total')} s for "
             f"{fmt(e2e, 'val_tokens', '{:,}')} tokens; BPB unadapted {fmt(e2e, 'no_ttt_bpb', '{:.4f}')} -> TTT "
             f"{fmt(e2e, 'neural_bpb', '{:.4f}')} -> mixed {fmt(e2e, 'mixed_bpb', '{:.4f}')}",
             "calibration + candidates <= GPTQ_RESERVE_SECONDS"),
        ("mixer", f"eval pass, {fmt(r['mixer'], 'networks', '{}')} networks, {fmt(r['mixer'], 'stream_tokens', '{:,}')} tokens: "
                  f"{fmt(r['mixer'], 'whole_stream_s')} s, peak {fmt(r['mixer'], 'cuda_peak_gib')} GiB (+"
                  f"{fmt(r['mixer'], 'cuda_peak_bytes_per_token', '{:.0f}')} B/token) of {fmt(r['mixer'], 'cuda_total_gib', '{:.0f}')}",
                  "rank 0 also holds the model (~25 GB peak in training)"),
        ("plan", f"8 GPUs: {fmt(pl, 'train_steps_8gpu', '{:,}')} steps; evaluation {fmt(pl, 'eval_8gpu_s')} s (compile "
                 f"{fmt(pl, 'compile_8gpu_s')}, unadapted {fmt(p8, 'no_ttt_pass')}, TTT pass {fmt(p8, 'sliding')} + train "
                 f"{fmt(p8, 'ttt_train')}, mixer {fmt(p8, 'mixer')}); one GPU {fmt(pl, 'eval_1gpu_s')} s",
                 f"<= {EVAL_BUDGET_S:.0f} s (limit 600 s)"),
        ("", "; ".join(pl.get("flags") or []) or ("every clock kept" if pl else "n/a"), "gpu_check_plan.txt"),
        ("train", f"{fmt(r['train'], 'ms_per_step')} ms/step ({fmt(r['train'], 'seqs', '{}')}x{fmt(r['train'], 'seq_len', '{}')}), "
                  f"{fmt(r['train'], 'tokens_per_s', '{:,.0f}')} tok/s = {fmt(r['train'], 'ratio_to_record_per_gpu', '{:.3f}')} x rec, "
                  f"MFU {fmt(r['train'], 'mfu', '{:.1%}')}, peak {fmt(r['train'], 'peak_mem_gib')} GiB, warm-up "
                  f"{fmt(r['train'], 'warmup_s')} s", f"{RECORD_MS_PER_STEP} ms/step on 8 GPUs"),
        ("eval", f"{fmt(r['eval'], 'windows_per_s')} windows/s -> full val {fmt(r['eval'], 'full_eval_s')} s "
                 f"on {fmt(r['eval'], 'gpus', '{}')} GPUs", f"target {TARGET_S:.0f} s, record ~{RECORD_EVAL_S:.0f} s"),
        ("ttt", f"one rank of {fmt(r['ttt'], 'gpus', '{}')}: score {fmt(r['ttt'], 'score_s_per_chunk', '{:.3f}')} s + train "
                f"{fmt(r['ttt'], 'train_s_per_chunk', '{:.3f}')} s per {fmt(r['ttt'], 'chunk_tokens', '{:,}')}-token chunk", ""),
        ("export", f"untrained: artifact {fmt(r['export'], 'artifact_bytes', '{:,}')} B, calibration "
                   f"{fmt(r['export'], 'calibration_s')} s, candidates {fmt(r['export'], 'quantize_s')} s, search to "
                   f"{SEARCH_BITS} bits/entry {fmt(r['export'], 'search_s')} s, round trip dloss "
                   f"{fmt(r['export'], 'loss_delta', '{:+.4f}')}", ""),
    ]
    lines = [f"GPU CHECK SUMMARY ({mode})", f"{'phase':9}| {'measured':78}| record / target", "-" * 130]
    shown = False
    for name, measured, ref in rows:
        shown = name in results if name else shown  # a row without a name continues its phase's
        if not shown:
            continue
        res = results.get(name, {}) if name else {}
        if res.get("error") or res.get("skipped"):  # one line, and none of the phase's continuation rows
            measured, shown = f"FAILED: {res['error']}" if res.get("error") else f"skipped: {res['skipped']}", False
        lines.append(f"{name:9}| {measured:78}| {ref}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", default=os.environ.get("GPU_CHECK_CPU_SMOKE") == "1",
                    help="tiny sizes on CPU, all phases, well under a minute")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (50; smoke 3)")
    ap.add_argument("--eval-windows", type=int, default=None, help="timed eval windows (16 batches; smoke 4)")
    ap.add_argument("--mixer-tokens", type=int, default=None, help=f"Zipf stream length ({VAL_TOKENS:,}; smoke 20,000)")
    ap.add_argument("--mixer-seconds", type=float, default=0.0,
                    help="cap on the mixer's streaming-API timing (0: not timed; the evaluation uses the whole-stream pass)")
    ap.add_argument("--budget", type=float, default=420.0,
                    help=f"seconds for the whole check: e2e stops {E2E_RESERVE_S:.0f} s before it; train, eval and ttt "
                         f"run only if their time is left")
    ap.add_argument("--ttt-chunks", type=int, default=None, help="timed TTT chunks (6; smoke 3)")
    ap.add_argument("--e2e-steps", type=int, default=None, help=f"e2e training steps ({E2E['full']['steps']:,} of "
                    f"{E2E['full']['batch_tokens']:,} tokens; smoke 4)")
    ap.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                    help=f"comma list of phases among {','.join(PHASES)} (default: all but export)")
    a = ap.parse_args(argv)
    smoke = a.cpu_smoke
    device = torch.device("cpu") if smoke or not torch.cuda.is_available() else torch.device("cuda")
    mode = "CPU smoke" if smoke else f"full size on {device.type}"
    args = make_args("cpu" if smoke else "record", device, SMOKE_ENV if smoke else None)
    seqs = 4 if smoke else None
    check = Check(Path(a.out), a.budget, mode)
    check.log(f"gpu_check: {mode}, out {a.out}, budget {a.budget:.0f} s")
    state: dict = {}

    def attention():
        res = time_paths(2 if smoke else 48, args.train_seq_len, device, iters=2 if smoke else 10,
                         warmup=1 if smoke else 3, log=check.log, skip=("flex",) if smoke else ())
        state["attention"] = res["fastest"]
        return res

    def train():
        fastest, default = state.get("attention"), args.attention
        args.attention = fastest if device.type == "cuda" and fastest in ATTENTION_CHOICES else default
        try:
            res, state["model"] = time_training(args, device, a.steps or (3 if smoke else 20), 1 if smoke else 5,
                                                seqs, log=check.log)
        finally:
            args.attention = default
        res["fastest_measured"] = fastest
        return res

    def e2e():
        size = E2E["smoke" if smoke else "full"]
        env, fastest = dict(size["env"]), state.get("attention")
        if device.type == "cuda" and fastest in ATTENTION_CHOICES:
            env["ATTENTION"] = fastest
        res = phase_e2e(device, check.log, check.remaining() - (0 if smoke else E2E_RESERVE_S),
                        a.e2e_steps or size["steps"], size["batch_tokens"], size["val_tokens"], env,
                        keep=check.out / "gpu_check_e2e_log.txt")
        res["attention"] = env.get("ATTENTION", "auto")
        if res.get("ms_per_step"):  # one GPU runs a step as 8 micro-batches of a record rank's: the per-GPU rate
            res["tokens_per_s"] = res["batch_tokens"] / (res["ms_per_step"] / 1000)
            res["ratio_to_record_per_gpu"] = res["tokens_per_s"] / RECORD_TOKENS_PER_S_PER_GPU
        if m := re.search(r"choice:(\S+)", res.get("rate_line") or ""):
            res["rate_choice_counts"] = dict(Counter(c.split("=", 1)[1] for c in m.group(1).split(",")))
        return res

    phases = a.phases.split(",")
    unknown = set(phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases: {', '.join(sorted(unknown))}")

    def run(name: str, fn):
        if name not in phases:
            return
        if not smoke and check.remaining() < NEED_S.get(name, 0.0):  # what decides the record ran first
            check.results[name] = {"skipped": f"{check.remaining():.0f} s of the budget left, {NEED_S[name]:.0f} s needed"}
            check.log(f"== {name}: {check.results[name]['skipped']}")
            check.save()
            return
        check.phase(name, fn)

    run("env", lambda: phase_env(device))
    run("model", lambda: phase_model(args))
    run("attention", attention)
    run("e2e", e2e)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run("mixer", lambda: phase_mixer(args, device, a.mixer_tokens or (20_000 if smoke else VAL_TOKENS),
                                     check, a.mixer_seconds))
    run("plan", lambda: phase_plan(check.results, check.out))
    run("train", train)
    run("eval", lambda: time_sliding(state.get("eval_model") or random_eval_model(args, device), args, device,
                                     a.eval_windows or (4 if smoke else 16) * args.eval_batch_seqs, log=check.log))
    run("ttt", lambda: time_ttt(state.get("eval_model") or random_eval_model(args, device), args, device,
                                a.ttt_chunks or (3 if smoke else 6), 1 if smoke else 8, log=check.log))
    run("export", lambda: phase_export(args, device, state, seqs or 8))
    table = summary(check.results, mode)
    (check.out / "gpu_check_summary.txt").write_text(table + "\n")
    check.log(f"done in {time.perf_counter() - check.t0:.1f} s; failed phases: {check.failed() or 'none'}")
    print(table, flush=True)
    return 1 if check.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
