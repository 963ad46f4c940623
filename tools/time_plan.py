"""The record run's time plan on 8 GPUs, phase by phase, from measured one-GPU rates and the run's settings.

    python tools/time_plan.py [--runs docs/gpu_runs/*.json] [--gpu H100] [--gpus 8] [--val-tokens N] [--json]

Settings: train_gpt.py's record preset with any env var applied (`TTT_ENABLED=0 python tools/time_plan.py`).
Rates: the newest bench/gpu_check.py JSON (docs/gpu_runs/) of the chosen GPU that measured each one; a rate no run
measured falls back to a stated estimate, marked `estimate:` (what it stands on). Arithmetic, per phase:
  training steps      (TRAIN_BATCH_TOKENS / gpus) / train tokens/s a step; as many as end inside MAX_WALLCLOCK_SECONDS
                      minus GPTQ_RESERVE_SECONDS (ITERATIONS at most): train_gpt.py starts no step that would end past
                      it; compilation and validation stop the clock. Under RATE_CONTROL=1 with GPTQ_RESERVE_SECONDS
                      unset the reserve is at least RESERVE_MARGIN x quantize, as train_gpt.py raises it from its
                      timed candidates
  calibration         GPTQ_CALIB_TOKENS / gpus at the calibration rate (forward + backward), in the training clock
  quantize            every matrix's encodings (GPTQ; under RATE_CONTROL=1 all ~35 candidates), the same work on every
                      rank: one GPU's seconds; in the training clock, must fit GPTQ_RESERVE_SECONDS with calibration
  search              the size search (brotli-11 on the rank's share of the cores), alike on every rank, after the
                      training clock, before the evaluation's
  evaluation          compilation (the sliding scorer's, TTT's: fixed costs, never scaled by the token ratio), the
                      artifact's load, the round trip ((N-1)//EVAL_SEQ_LEN windows), each sliding pass (with TTT and
                      rule online the unadapted pass, then the TTT pass: 1+ceil((N-1-L)/S) windows each), the mixer's
                      probe (2**20 tokens, rank 0, when EVAL_BUDGET_SECONDS is set), TTT training ((chunks-1) x
                      TTT_EPOCHS x TTT_CHUNK_TOKENS / gpus tokens a rank), the mixer (rank 0, N tokens)
Windows and tokens shard evenly over the gpus; collectives are not included (one GPU measures none). A clock that
breaks (training 600 s; evaluation 600 s and EVAL_BUDGET_SECONDS where train_gpt.py has it) is flagged: exit 1.
bench/gpu_e2e.py plans the evaluation the same way, with the rates its own train_gpt.py log measured (rates_from_e2e).
The GPU check can call rates_from_results (one gpu_check JSON's results; its e2e log through rates_from_e2e),
complete, plan and clocks directly.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from artifact_codec import RESERVE_MARGIN  # noqa: E402
from train_gpt import Hyperparameters, UserError  # noqa: E402

FULL_VAL_TOKENS, GPUS, LIMIT_S = 62_021_632, 8, 600.0
MEASURED_SEQ_LEN = 2048  # gpu_check's eval windows; other window lengths scale the window rate by 2048 / L
RECORD_CALIB_TOKENS = 262_144  # GPTQ_CALIB_TOKENS of the record preset, which gpu_check's export phase calibrates
MIXER_PROBE_TOKENS = 2 ** 20  # train_gpt.py's timed mixer pass that projects the mixer's time for the evaluation clock
# What no GPU run has measured yet, with what each guess stands on (docs/artifact.md: CPU timings at record size).
ESTIMATES = {
    "quantize_s": (30.0, "every matrix's ~35 candidates (GPTQ) at record size on one GPU, a guess"),
    "search_s": (60.0, "the size search at record size: ~3 rounds of brotli-11 on the rank's cores, a guess from "
                       "the CPU timings in docs/artifact.md"),
    "load_s": (3.0, "reading and dequantizing the artifact, a guess"),
}


@dataclass
class Rate:
    value: float
    basis: str  # "measured: <file> <key> ..." or "estimate: <what it stands on>"


@dataclass
class Phase:
    key: str  # stable name for tools: train_compile, train, validation, calibration, quantize, search,
    #           scorer_compile, ttt_compile, load, roundtrip, no_ttt_pass, mixer_probe, sliding, ttt_train, mixer
    name: str
    clock: str  # "training", "evaluation", or "" (neither: before or between the clocks)
    seconds: float
    basis: str


def rates_from_results(results: dict, source: str) -> dict[str, Rate]:
    """The one-GPU rates a gpu_check JSON's "results" measured (absent phases, or phases that failed, give none)."""
    r = {k: v for k, v in results.items() if isinstance(v, dict) and "error" not in v}
    out: dict[str, Rate] = {}
    tr, ev, ttt, mx, ex, e2e = (r.get(k, {}) for k in ("train", "eval", "ttt", "mixer", "export", "e2e"))
    if tr.get("tokens_per_s"):
        out["train_tokens_per_s"] = Rate(tr["tokens_per_s"], f"measured: {source} train.tokens_per_s "
                                         f"({tr['ms_per_step']:.1f} ms per {tr['tokens_per_step']:,}-token step)")
        if tr.get("warmup_s") is not None:
            compile_s = tr["warmup_s"] - tr["warmup_steps"] * tr["ms_per_step"] / 1000
            out["train_compile_s"] = Rate(compile_s, f"measured: {source} train.warmup_s {tr['warmup_s']:.1f} less "
                                          f"{tr['warmup_steps']} steps")
    if not tr.get("tokens_per_s") and e2e.get("tokens_per_s"):  # one GPU, 8 micro-batches of a record rank's a step
        out["train_tokens_per_s"] = Rate(e2e["tokens_per_s"], f"measured: {source} e2e.tokens_per_s ({e2e['ms_per_step']:.1f} "
                                         f"ms per {e2e['batch_tokens']:,}-token step on one GPU)")
    if ev.get("windows_per_s"):
        out["windows_per_s"] = Rate(ev["windows_per_s"], f"measured: {source} eval.windows_per_s "
                                    f"({ev['seq_len']}-token windows, batch {ev['batch_seqs']})")
        if ev.get("warmup_s") is not None:
            compile_s = ev["warmup_s"] - 2 * ev["batch_seqs"] / ev["windows_per_s"]
            out["eval_compile_s"] = Rate(compile_s, f"measured: {source} eval.warmup_s {ev['warmup_s']:.1f} less 2 batches")
    if ttt.get("train_s_per_chunk"):
        work = ttt["rank_chunk_tokens"] * ttt["epochs"]
        out["ttt_tokens_per_s"] = Rate(work / ttt["train_s_per_chunk"], f"measured: {source} ttt.train_s_per_chunk "
                                       f"{ttt['train_s_per_chunk']:.3f} for {ttt['epochs']} x {ttt['rank_chunk_tokens']:,} tokens")
        if ttt.get("warmup_s") is not None:  # the warm-up scored 2 chunks and trained on 1
            compile_s = ttt["warmup_s"] - 2 * ttt["score_s_per_chunk"] - ttt["train_s_per_chunk"]
            out["ttt_compile_s"] = Rate(compile_s, f"measured: {source} ttt.warmup_s {ttt['warmup_s']:.1f} less its work")
    if mx.get("whole_stream_s"):
        rule = mx.get("rule", "before rule online")
        out["mixer_tokens_per_s"] = Rate(mx["stream_tokens"] / mx["whole_stream_s"], f"measured: {source} "
                                         f"mixer.whole_stream_s {mx['whole_stream_s']:.1f} for {mx['stream_tokens']:,} tokens ({rule})")
    for phase, d, keys in (("export", ex, ("quantize_s", "search_s", "load_s")),
                           ("e2e", e2e, ("quantize_s", "search_s"))):  # e2e: a trained model, so it overrides
        out.update({key: Rate(d[key], f"measured: {source} {phase}.{key}") for key in keys if d.get(key) is not None})
        m = re.search(r"calibration_tokens:(\d+)", d.get("export_line") or "")  # e2e's training_clock line names its count
        tokens = int(m.group(1)) if m else RECORD_CALIB_TOKENS   # the export phase calibrates the record preset's
        if d.get("calibration_s"):
            out["calib_tokens_per_s"] = Rate(tokens / d["calibration_s"], f"measured: {source} {phase}.calibration_s "
                                             f"{d['calibration_s']:.2f} for {tokens:,} tokens")
    return out


def rates_from_runs(paths: list[str], gpu: str) -> tuple[dict[str, Rate], list[str]]:
    """Each rate from the newest run (by its "date") of a GPU whose name contains `gpu` that measured it."""
    runs = []
    for path in paths:
        report = json.loads(Path(path).read_text())
        name = report.get("results", {}).get("env", {}).get("gpu") or ""
        if gpu.lower() in name.lower():
            runs.append((report.get("date", ""), Path(path).name, name, report["results"]))
    rates: dict[str, Rate] = {}
    for _, source, _, results in sorted(runs):  # oldest first: newer runs overwrite
        rates.update(rates_from_results(results, source))
    return rates, sorted({name for *_, name, _ in runs})


def rates_from_e2e(text: str, source: str = "e2e log") -> dict[str, Rate]:
    """The one-GPU rates an end-to-end train_gpt.py log measured (bench/gpu_e2e.py), compilation kept apart:
      windows/s        the TTT pass's scoring (`sliding` of eval_time_split), warm: the unadapted pass compiled first
      scorer compile   the unadapted pass less the same windows at that rate (when it ran)
      TTT rate         the run's own training rate per token (its micro-batches are TTT-step sized)
      TTT compile      TTT's time less its work at that rate (its first step compiles)
      export           calibration tokens/s and quantization (the training_clock line), the size search
    The mixer's time on a short stream is mostly fixed cost: its rate comes from a full-stream run, not from here."""
    hp = json.loads(re.search(r"^hparams:(.*)$", text, re.M).group(1))
    n = int(re.search(r"val_tokens:(\d+)", text).group(1)) - 1
    L, S = hp["EVAL_SEQ_LEN"], hp["EVAL_STRIDE"]
    split = {k: float(v) for k, v in re.findall(r"(no_ttt_pass|sliding|ttt_train|mixer):([0-9.]+)s",
                                                 (re.findall(r"^eval_time_split .*$", text, re.M) or [""])[-1])}
    out: dict[str, Rate] = {}
    windows = sliding_window_count(n, L, S)
    if split.get("sliding"):
        wps = windows / split["sliding"]
        out["windows_per_s"] = Rate(wps * L / MEASURED_SEQ_LEN, f"measured: {source} sliding {split['sliding']:.1f} s "
                                    f"for {windows:,} windows of {L}")
        if hp["TTT_ENABLED"] and split.get("no_ttt_pass"):
            out["eval_compile_s"] = Rate(max(split["no_ttt_pass"] - windows / wps, 0.0), f"measured: {source} no_ttt_pass "
                                         f"{split['no_ttt_pass']:.1f} s less its windows at that rate")
    step_ms = re.findall(r"step_avg:([0-9.]+)ms", text)
    if step_ms and hp["TTT_ENABLED"] and "ttt_train" in split:
        rate = hp["TRAIN_BATCH_TOKENS"] / (float(step_ms[-1]) / 1000)
        work = (math.ceil(windows / (hp["TTT_CHUNK_TOKENS"] // S)) - 1) * hp["TTT_EPOCHS"] * hp["TTT_CHUNK_TOKENS"]
        out["ttt_tokens_per_s"] = Rate(rate, f"measured: {source} training step_avg {float(step_ms[-1]):.1f} ms for "
                                       f"{hp['TRAIN_BATCH_TOKENS']:,} tokens (as TTT's rate)")
        out["ttt_compile_s"] = Rate(max(split["ttt_train"] - work / rate, 0.0), f"measured: {source} ttt_train "
                                    f"{split['ttt_train']:.1f} s less {work:,} tokens at that rate")
    if m := re.search(r"^training_clock .*calibration:([0-9.]+)s quantize:([0-9.]+)s .*calibration_tokens:(\d+)", text, re.M):
        calib, quantize, tokens = float(m.group(1)), float(m.group(2)), int(m.group(3))
        if tokens and calib > 0:
            out["calib_tokens_per_s"] = Rate(tokens / calib, f"measured: {source} calibration {calib:.1f} s for {tokens:,} tokens")
        out["quantize_s"] = Rate(quantize, f"measured: {source} quantize {quantize:.1f} s")
    if m := re.search(r"^serialized_model_int6_lzma:.* search:([0-9.]+)s", text, re.M):
        out["search_s"] = Rate(float(m.group(1)), f"measured: {source} search {float(m.group(1)):.1f} s")
    return out


def complete(rates: dict[str, Rate]) -> dict[str, Rate]:
    """The rates with every gap filled by a stated estimate (derived from a measured rate where one stands in)."""
    out = dict(rates)
    for key, (value, why) in ESTIMATES.items():
        out.setdefault(key, Rate(value, f"estimate: {why}"))
    train = out.get("train_tokens_per_s")
    if train is None:
        raise UserError("no run measured the training rate (train.tokens_per_s); pass --runs with a gpu_check JSON")
    out.setdefault("calib_tokens_per_s", Rate(train.value, "estimate: calibration forward + Hessians at the training "
                                              "step's rate per token (a forward alone is ~3x faster)"))
    out.setdefault("ttt_tokens_per_s", Rate(train.value, "estimate: the training step's rate; TTT's smaller steps run "
                                            "slower"))
    if "train_compile_s" in out:
        out.setdefault("ttt_compile_s", Rate(out["train_compile_s"].value, "estimate: the training model's compilation"))
    for key in ("windows_per_s", "mixer_tokens_per_s", "train_compile_s", "eval_compile_s", "ttt_compile_s"):
        if key not in out:
            raise UserError(f"no run measured {key}; pass --runs with a gpu_check JSON that has it")
    return out


def sliding_window_count(n_targets: int, L: int, S: int) -> int:
    """Windows of train_gpt.sliding_windows: window 0, then one every S while the last still ends past the previous."""
    return 1 + max(0, math.ceil((n_targets - L) / S))


def plan(args: Hyperparameters, rates: dict[str, Rate], gpus: int = GPUS, val_tokens: int = FULL_VAL_TOKENS) -> list[Phase]:
    """The run's phases in order with their seconds on `gpus` GPUs (module docstring)."""
    r, N, G, L, S = rates, val_tokens - 1, gpus, args.eval_seq_len, args.eval_stride
    wps = lambda length: r["windows_per_s"].value * MEASURED_SEQ_LEN / length  # noqa: E731  windows/s at a length
    step_s = args.train_batch_tokens / G / r["train_tokens_per_s"].value
    reserve = args.gptq_reserve_seconds if args.calibrates and args.max_wallclock_seconds > 0 else 0.0
    if reserve and args.rate_control and "GPTQ_RESERVE_SECONDS" not in args.explicit:  # as train_gpt.train: the
        reserve = args.gptq_reserve_seconds = max(reserve, RESERVE_MARGIN * r["quantize_s"].value)  # timed candidates x margin
    cap_s = args.max_wallclock_seconds - reserve
    steps = min(args.iterations, math.ceil(cap_s / step_s) - 1) if cap_s > 0 else args.iterations  # no step ends past
    # the cap: train_gpt.py stops after step k when k + 1 steps would reach it
    evals = ((steps - 1) // args.val_loss_every + 1 if args.val_loss_every else 0) + 2  # steps 0, k*EVERY; end; post-EMA
    val_s = (N // args.train_seq_len) / G / wps(args.train_seq_len)
    train_basis = r["train_tokens_per_s"].basis
    phases = [
        Phase("train_compile", f"compile + {args.warmup_steps} warm-up steps", "", r["train_compile_s"].value + args.warmup_steps * step_s,
              r["train_compile_s"].basis),
        Phase("train", f"training: {steps:,} steps of {step_s * 1000:.1f} ms", "training", steps * step_s,
              f"{train_basis}; {args.train_batch_tokens // G:,} tokens a GPU a step"
              + (f"; cap {cap_s:.2f} s (GPTQ reserve {reserve:.2f} s)" if cap_s > 0 else "")),
        Phase("validation", f"validation x{evals} (clock stopped)", "", evals * val_s, r["windows_per_s"].basis),
    ]
    if args.calibrates:
        phases.append(Phase("calibration", "calibration (forward + backward)", "training",
                            args.gptq_calib_tokens / G / r["calib_tokens_per_s"].value, r["calib_tokens_per_s"].basis))
    phases += [Phase("quantize", f"export: {'candidates' if args.rate_control else 'quantization'} (every rank)", "training",
                     r["quantize_s"].value, r["quantize_s"].basis),
               Phase("search", f"export: {'size search' if args.rate_control else 'fit'} (every rank)", "",
                     r["search_s"].value, r["search_s"].basis),
               Phase("scorer_compile", "compile: sliding scorer (fixed)", "evaluation", r["eval_compile_s"].value, r["eval_compile_s"].basis)]
    ttt = bool(args.ttt_enabled)
    if ttt:
        phases.append(Phase("ttt_compile", "compile: TTT step (fixed)", "evaluation", r["ttt_compile_s"].value, r["ttt_compile_s"].basis))
    windows = sliding_window_count(N, L, S)
    sliding_s = windows / G / wps(L)
    phases += [Phase("load", "artifact load", "evaluation", r["load_s"].value, r["load_s"].basis),
               Phase("roundtrip", f"round trip: {N // L:,} windows", "evaluation", (N // L) / G / wps(L), r["windows_per_s"].basis)]
    mixer = bool(args.use_ngram_mixer)
    if ttt and mixer and args.ngram_rule == "online":  # the unadapted network is network 0 of the mixture
        phases.append(Phase("no_ttt_pass", f"sliding pass, unadapted: {windows:,} windows", "evaluation", sliding_s, r["windows_per_s"].basis))
    if ttt and mixer and args.eval_budget_seconds > 0:
        phases.append(Phase("mixer_probe", f"mixer probe (rank 0): {min(MIXER_PROBE_TOKENS, N):,} tokens", "evaluation",
                            min(MIXER_PROBE_TOKENS, N) / r["mixer_tokens_per_s"].value, r["mixer_tokens_per_s"].basis))
    phases.append(Phase("sliding", f"sliding pass{', TTT' if ttt else ''}: {windows:,} windows", "evaluation", sliding_s,
                        r["windows_per_s"].basis))
    if ttt:
        chunks = math.ceil(windows / (args.ttt_chunk_tokens // S))
        tokens = (chunks - 1) * args.ttt_epochs * args.ttt_chunk_tokens / G
        phases.append(Phase("ttt_train", f"TTT training: {chunks - 1:,} chunks x {args.ttt_epochs} epochs", "evaluation",
                            tokens / r["ttt_tokens_per_s"].value, r["ttt_tokens_per_s"].basis))
    if mixer:
        phases.append(Phase("mixer", f"mixer (rank 0): {N:,} tokens", "evaluation", N / r["mixer_tokens_per_s"].value,
                            r["mixer_tokens_per_s"].basis))
    return phases


def clocks(phases: list[Phase], args: Hyperparameters) -> list[tuple[str, float, float, str]]:
    """(clock, its seconds, its limit, a flag line or "") for each limit the competition and the settings set."""
    total = {c: sum(p.seconds for p in phases if p.clock == c) for c in ("training", "evaluation")}
    rows = [("training", total["training"], LIMIT_S), ("evaluation", total["evaluation"], LIMIT_S)]
    if budget := args.eval_budget_seconds:
        rows.append(("evaluation budget (EVAL_BUDGET_SECONDS)", total["evaluation"], budget))
    out = [(c, s, lim, f"BREAKS the {c} clock: {s:.2f} s > {lim:.0f} s, by {s - lim:.2f} s" if s > lim else "")
           for c, s, lim in rows]
    gptq = sum(p.seconds for p in phases if p.key in ("calibration", "quantize"))
    if args.calibrates and args.max_wallclock_seconds > 0 and gptq > args.gptq_reserve_seconds:
        out.append(("GPTQ reserve (GPTQ_RESERVE_SECONDS)", gptq, args.gptq_reserve_seconds,
                    f"BREAKS the training clock: calibration + GPTQ take {gptq:.2f} s, GPTQ_RESERVE_SECONDS="
                    f"{args.gptq_reserve_seconds:g} (a reserve of {math.ceil(gptq)} s would fit)"))
    return out


def render(phases: list[Phase], limits, args: Hyperparameters, gpus: int, val_tokens: int, gpu_names: list[str]) -> str:
    lines = [f"TIME PLAN: the record run on {gpus} GPUs, {val_tokens:,} validation tokens (rates: one "
             f"{' / '.join(gpu_names) or 'GPU'}; collectives not included)",
             f"settings: {' '.join(f'{k}={getattr(args, k.lower())}' for k in SHOWN)}",
             f"{'phase':44} {'clock':11} {'seconds':>9}  basis", "-" * 130]
    lines += [f"{p.name:44} {p.clock or '-':11} {p.seconds:9.1f}  {p.basis}" for p in phases]
    lines.append("-" * 130)
    lines += [f"{c:44} {'':11} {s:9.1f}  of {lim:.0f} s  {flag or 'ok'}" for c, s, lim, flag in limits]
    return "\n".join(lines)


SHOWN = ["ITERATIONS", "MAX_WALLCLOCK_SECONDS", "GPTQ_RESERVE_SECONDS", "TRAIN_BATCH_TOKENS", "WARMUP_STEPS", "QUANT",
         "RATE_CONTROL", "GPTQ_CALIB_TOKENS", "EVAL_SEQ_LEN", "EVAL_STRIDE", "TTT_ENABLED", "TTT_CHUNK_TOKENS",
         "TTT_EPOCHS", "USE_NGRAM_MIXER", "NGRAM_RULE", "EVAL_BUDGET_SECONDS"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="*", default=sorted(glob.glob(str(ROOT / "docs" / "gpu_runs" / "*.json"))),
                    help="gpu_check JSON files (default: docs/gpu_runs/*.json)")
    ap.add_argument("--gpu", default="H100", help="use runs of the GPU whose name contains this (default H100)")
    ap.add_argument("--gpus", type=int, default=GPUS)
    ap.add_argument("--val-tokens", type=int, default=FULL_VAL_TOKENS)
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = ap.parse_args(argv)
    try:
        args = Hyperparameters(os.environ, preset="record")
        measured, names = rates_from_runs(a.runs, a.gpu)
        rates = complete(measured)
    except (UserError, OSError, json.JSONDecodeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    phases = plan(args, rates, a.gpus, a.val_tokens)
    limits = clocks(phases, args)
    if a.json:
        print(json.dumps({"phases": [asdict(p) for p in phases],
                          "clocks": [dict(clock=c, seconds=s, limit=lim, flag=f) for c, s, lim, f in limits]}, indent=1))
    else:
        print(render(phases, limits, args, a.gpus, a.val_tokens, names))
    return 1 if any(flag for *_, flag in limits) else 0


if __name__ == "__main__":
    sys.exit(main())
