"""The GPU check's end-to-end phase: the real `train_gpt.py`, trained long enough that its artifact is a trained one.

What an untrained model weighs says little (near-Gaussian weights compress differently from trained ones), and what
the rate control picks for a trained one is what decides the artifact. On one GPU this phase: samples a long offline
stream from an n-gram model of the sample dataset (bench/synth_stream.py: no token sequence repeats, ~STEPS x BATCH
tokens), runs `python train_gpt.py` on it at the record's architecture for STEPS steps of BATCH tokens, with the real
export (calibration, candidates, the rate control to TARGET_BYTES) and the real evaluation (round trip, the unadapted
pass, test-time training, the two-network mixer) on a VAL-token validation stream, and reads its log: artifact bytes
and bits per parameter, the controller's line, the export's phase times, the evaluation's time split, and from those
the 8xH100 estimate of the full evaluation
(62,021,632 tokens) by tools/time_plan.py: this run's rates (window rate, TTT rate, export) with compilation kept
apart as a fixed cost, the rest from docs/gpu_runs/ (the mixer's full-stream rate among them), the record's settings.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "tools")]
from make_submission import parse_log  # noqa: E402
from synth_stream import build  # noqa: E402
from time_plan import FULL_VAL_TOKENS, GPUS, LIMIT_S, complete, plan, rates_from_e2e, rates_from_runs  # noqa: E402
from train_gpt import Hyperparameters, UserError, load_data_shard  # noqa: E402

EVAL_BUDGET_S = 540.0
RECORD_BITS_PER_PARAM = (4.59, 4.72)   # this stack's trained int6 models, published records
NUM = r"([-+0-9.eE]+)"


def grab(text: str, pattern: str, cast=float, default=None):
    """The first group of the last match of pattern in text, cast; default if none."""
    found = re.findall(pattern, text)
    return cast(found[-1] if isinstance(found[-1], str) else found[-1][0]) if found else default


def sample_paths(data_dir: Path | None, tokenizer: Path | None, log) -> tuple[Path, Path]:
    """The sample dataset (source of the n-gram model) and its tokenizer; built offline if absent."""
    data = data_dir or ROOT / "data" / "datasets" / "sample_sp1024"
    tok = tokenizer or ROOT / "data" / "tokenizers" / "sample_1024_bpe.model"
    if not (data / "fineweb_train_000000.bin").is_file() or not tok.is_file():
        log(f"e2e: building the sample dataset into {data}")
        subprocess.run([sys.executable, str(ROOT / "data" / "build_sample_dataset.py"), "--data-dir", str(data),
                        "--tokenizer", str(tok)], check=True, capture_output=True)
    return data, tok


def phase_e2e(device: torch.device, log, timeout_s: float, steps: int, batch_tokens: int, val_tokens: int,
              env_extra: dict | None = None, data_dir: Path | None = None, tokenizer: Path | None = None,
              keep: Path | None = None) -> dict:
    """Run train_gpt.py end to end on a sampled stream (module docstring) and report what its log says."""
    t0 = time.perf_counter()
    data, tok = sample_paths(data_dir, tokenizer, log)
    source = torch.cat([load_data_shard(f, 1024).long() for f in sorted(glob.glob(str(data / "fineweb_train_*.bin")))])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = int((env_extra or {}).get("GPTQ_CALIB_TOKENS", 262_144))
        train_tokens = (steps + 2) * (batch_tokens + 8) + calib   # no token seen twice, calibration included
        synth = build(tmp / "data", source.to(device), 1024, train_tokens, val_tokens, log=log)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(DATA_PATH=str(tmp / "data"), TOKENIZER_PATH=str(tok), RUN_ID="gpu_check_e2e", ITERATIONS=str(steps),
                   TRAIN_BATCH_TOKENS=str(batch_tokens), WARMDOWN_ITERS=str(max(steps // 4, 1)), VAL_LOSS_EVERY="0",
                   MAX_WALLCLOCK_SECONDS="0", PYTHONUNBUFFERED="1", **(env_extra or {}))
        log(f"e2e: train_gpt.py, {steps} steps of {batch_tokens:,} tokens, val {val_tokens:,} tokens, "
            f"timeout {timeout_s:.0f} s")
        t1 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=tmp, env=env, capture_output=True,
                               text=True, timeout=max(timeout_s - (t1 - t0), 30))
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:   # what the log holds so far is still reported
            rc, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        log_path = tmp / "logs" / "gpu_check_e2e.txt"
        text = log_path.read_text() if log_path.is_file() else out
        if keep is not None:
            keep.write_text(text)
        run = parse_log(log_path) if log_path.is_file() else None
    res = {"returncode": rc, "run_s": time.perf_counter() - t1, "synth": synth, "steps_asked": steps,
           "batch_tokens": batch_tokens, "val_tokens": val_tokens}
    if rc not in (0, 4):   # 4: over the cap, still evaluated
        res["error"] = f"train_gpt.py exited {rc}: {out.strip().splitlines()[-1][:300] if out.strip() else ''}"
    if run is None:
        return res
    params = grab(text, r"model_params:(\d+)", int)
    mtp = grab(text, r"mtp_params:(\d+)", int, 0)
    res.update(
        model_params=params, mtp_params=mtp, steps=run.steps, ms_per_step=grab(text, r"step:\d+/\d+ train_loss:\S+ train_time:\S+ step_avg:" + NUM + "ms"),
        final_train_loss=grab(text, r"step:\d+/\d+ train_loss:" + NUM), post_ema_bpb=grab(text, r"post_ema .*val_bpb:" + NUM),
        peak_mem_mib=run.peak_memory_mib, export_line=grab(text, r"(training_clock .*)", str),
        calibration_s=grab(text, r"training_clock .*calibration:" + NUM + "s"),
        quantize_s=grab(text, r"training_clock .*quantize:" + NUM + "s"), search_s=grab(text, r"serialized_model_int6_lzma:.* search:" + NUM + "s"),
        rate_line=grab(text, r"(rate_control total:.*)", str),
        export_s=grab(text, r"export_time:" + NUM + "s"), total_before_fit=grab(text, r"export uniform total:(\d+) bytes", int),
        fit_line=grab(text, r"(fit_to_cap: .*)", str), zeroed=grab(text, r"zeroed:(\d+)/", int, 0),
        over_cap=grab(text, r"(over_cap: .*)", str), artifact_bytes=run.model_bytes, code_bytes=run.code_bytes,
        total_bytes=run.total_bytes, roundtrip_bpb=run.roundtrip_bpb, neural_bpb=run.neural_bpb, mixed_bpb=run.sliding_bpb,
        no_ttt_bpb=grab(text, r"sliding_window_neural_no_ttt val_bpb:" + NUM),
        mixer_learned=grab(text, r"(mixer_learned.*)", str), eval_s=(run.sliding_eval_ms or 0) / 1000 or None)
    if params and res["artifact_bytes"]:
        res["bits_per_param"] = 8 * res["artifact_bytes"] / (params - mtp)   # MTP heads are not exported
        res["record_bits_per_param"] = RECORD_BITS_PER_PARAM
    split = {k: grab(text, rf"eval_time_split .*\b{k}:" + NUM + "s") for k in ("roundtrip", "no_ttt_pass", "mixer_probe", "sliding",
                                                                            "ttt_train", "mixer", "total")}
    res["eval_split_s"] = split
    if all(split[k] is not None for k in ("sliding", "ttt_train", "mixer")):
        res.update(estimate_8gpu_eval(text, env_extra, device))
    return res


def estimate_8gpu_eval(text: str, env_extra: dict | None, device: torch.device) -> dict:
    """The record evaluation on 8 GPUs by tools/time_plan.py: this log's rates over docs/gpu_runs/'s (this GPU's
    kind where there are some), the record's settings with the run's own overrides."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    kind = next((k for k in ("H100", "H200") if k in name), "")
    try:
        measured, _ = rates_from_runs(sorted(glob.glob(str(ROOT / "docs" / "gpu_runs" / "*.json"))), kind)
        rates = complete({**measured, **rates_from_e2e(text)})
        args = Hyperparameters(dict(env_extra or {}), preset="record")
    except UserError as e:   # the e2e phase's own results still count
        return {"est_error": str(e)}
    phases = [p for p in plan(args, rates, GPUS, FULL_VAL_TOKENS) if p.clock == "evaluation"]
    est = {p.key: p.seconds for p in phases}
    est["total"] = sum(est.values())
    return {"est_8gpu_eval_s": est, "est_basis": {p.key: p.basis for p in phases},
            "est_ratio_to_limit": est["total"] / LIMIT_S, "est_within_budget": est["total"] <= EVAL_BUDGET_S}
