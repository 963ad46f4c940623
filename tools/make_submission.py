"""Write submission.json from training logs, refusing logs a reviewer should not trust.

Usage: python tools/make_submission.py logs/*.txt [--non-record] [--name NAME]
       [--author A] [--out submission.json]

`parse_log` is the single parser of the log format; plot_log.py and make_record.py reuse it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

SIZE_LIMIT = 16_000_000
EVAL_LIMIT_S = 600.0
RECORD_DATASET = "fineweb10B_sp1024"
RECORD_WORLD_SIZE = 8
RECORD_VAL_TOKENS = 62_021_632

# Lines whose first token is one of these keys carry run metadata.
HEADER_KEYS = {
    "run_id", "preset", "device", "world_size", "backend", "attention", "compile", "gpu",
    "dataset", "sample", "data_path", "tokenizer", "val_tokens", "seed", "git_commit",
    "config_hash", "model_params", "mtp_params",
}
INT_KEYS = {"world_size", "compile", "sample", "val_tokens", "seed", "model_params", "mtp_params"}
KEY_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(.*)$")
STEP_RE = re.compile(r"^step:(\d+)/(\d+)$")
TOTAL_SIZE_RE = re.compile(r"^Total submission size int6\+lzma:\s*(\d+)\s*bytes")
PEAK_MEM_RE = re.compile(r"^peak memory allocated:\s*(\d+)\s*MiB")

# Fields that must agree across the logs of one submission, with the refusal wording.
MUST_AGREE = {
    "config_hash": "config_hash",
    "git_commit": "git_commit",
    "code_files": "code files",
    "dataset": "dataset",
    "sample": "sample flag",
    "device": "device",
    "world_size": "world_size",
    "gpu": "gpu",
}


@dataclass
class RunLog:
    """Everything a tool needs from one logs/<RUN_ID>.txt; None means the line was absent."""

    path: Path
    header: dict = field(default_factory=dict)
    hparams: dict | None = None
    train_points: list = field(default_factory=list)  # (train_time_s, train_loss)
    val_points: list = field(default_factory=list)  # (train_time_s, val_loss, val_bpb)
    mixer_points: list = field(default_factory=list)  # (tokens, running_bpb)
    steps: int | None = None
    train_time_ms: float | None = None
    peak_memory_mib: int | None = None
    model_bytes: int | None = None
    code_bytes: int | None = None  # the code as it ships: one self-extracting train_gpt.py packing code_files
    code_raw_bytes: int | None = None  # the packed files' own bytes; None: an older log that counted them unpacked
    code_files: dict | None = None  # file name -> bytes, in log order
    total_bytes: int | None = None
    roundtrip_eval_ms: float | None = None
    roundtrip_loss: float | None = None
    roundtrip_bpb: float | None = None
    neural_loss: float | None = None
    neural_bpb: float | None = None
    sliding_loss: float | None = None
    sliding_bpb: float | None = None
    sliding_eval_ms: float | None = None
    total_time_s: float | None = None
    over_cap: str | None = None  # the run's own over_cap line: its artifact does not fit TARGET_BYTES

    def get(self, key):
        """A metadata value (int for numeric keys); None when absent or malformed."""
        value = self.header.get(key)
        if value is None or key not in INT_KEYS:
            return value
        return int(value) if re.fullmatch(r"-?\d+", value) else None

    @property
    def mixer_on(self) -> bool:
        """The mixer ran iff the log reports a separate neural-only sliding score."""
        return self.neural_bpb is not None

    @property
    def eval_time_s(self) -> float | None:
        if self.roundtrip_eval_ms is None or self.sliding_eval_ms is None:
            return None
        return (self.roundtrip_eval_ms + self.sliding_eval_ms) / 1000.0


def tokenize(line: str) -> tuple[str, dict]:
    """Split `tag key:value key:value ...`; words without a colon extend the previous value."""
    tag_words, pairs, key = [], {}, None
    for word in line.split():
        match = KEY_RE.match(word)
        if match:
            key = match.group(1)
            pairs[key] = match.group(2)
        elif key is None:
            tag_words.append(word)
        else:
            pairs[key] = f"{pairs[key]} {word}".strip()
    return " ".join(tag_words), pairs


def number(text: str) -> float:
    """Parse '600012ms', '1.2s', '15865748 bytes', '1.1484' or 'nan' by its leading number."""
    match = re.match(r"-?(\d+(\.\d*)?([eE][-+]?\d+)?|nan|inf)", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a number: {text!r}")
    return float(match.group(0))


def parse_log(path) -> RunLog:
    """Parse one training log; unknown and free-form lines are ignored."""
    run = RunLog(Path(path))
    for raw in Path(path).read_text(errors="replace").splitlines():
        line = raw.strip()
        if line.startswith("hparams:"):
            try:
                run.hparams = json.loads(line[len("hparams:"):])
            except json.JSONDecodeError:
                run.hparams = None
            continue
        if m := TOTAL_SIZE_RE.match(line):
            run.total_bytes = int(m.group(1))
            continue
        if m := PEAK_MEM_RE.match(line):
            run.peak_memory_mib = int(m.group(1))
            continue
        tag, kv = tokenize(line)
        try:
            _apply_line(run, tag or next(iter(kv), ""), tag, kv)
        except (ValueError, KeyError):
            continue  # a malformed line counts as absent; completeness checks report it
    return run


def _apply_line(run: RunLog, first: str, tag: str, kv: dict) -> None:
    """Record one recognised line (identified by its first token) into `run`."""
    if first in HEADER_KEYS:
        for key, value in kv.items():
            if key in HEADER_KEYS:
                run.header.setdefault(key, value)
    elif first == "step" and (m := STEP_RE.match(f"step:{kv['step']}")):
        t = number(kv["train_time"]) / 1000.0
        if "train_loss" in kv:
            run.train_points.append((t, number(kv["train_loss"])))
        if "val_loss" in kv:
            run.val_points.append((t, number(kv["val_loss"]), number(kv["val_bpb"])))
        run.steps, run.train_time_ms = int(m.group(1)), number(kv["train_time"])
    elif first == "stopping_early":
        run.steps = int(kv["step"].split("/")[0])
        run.train_time_ms = number(kv["train_time"])
    elif first == "serialized_model_int6_lzma":
        run.model_bytes = int(number(kv["serialized_model_int6_lzma"]))
    elif first == "over_cap":
        run.over_cap = kv["over_cap"]
    elif first == "code_bytes":
        run.code_bytes = int(number(kv["code_bytes"]))
        run.code_raw_bytes = int(number(kv["raw_bytes"])) if "raw_bytes" in kv else None
        files = [item.split("=") for item in kv.get("files", "").split(",") if item]
        run.code_files = {name: int(size) for name, size in files}
    elif tag == "final_int6_roundtrip":
        run.roundtrip_eval_ms = number(kv["eval_time"])
    elif tag == "final_int6_roundtrip_exact":
        run.roundtrip_loss, run.roundtrip_bpb = number(kv["val_loss"]), number(kv["val_bpb"])
    elif tag == "final_int6_sliding_window_neural_exact":
        run.neural_loss, run.neural_bpb = number(kv["val_loss"]), number(kv["val_bpb"])
    elif tag == "final_int6_sliding_window_exact":
        run.sliding_loss, run.sliding_bpb = number(kv["val_loss"]), number(kv["val_bpb"])
        run.sliding_eval_ms = number(kv["eval_time"])
    elif tag == "mixer_pass":
        run.mixer_points = [(int(n), number(b)) for n, b in (p.split(":") for p in kv["running_bpb"].split(","))]
    elif tag == "run_complete":
        run.total_time_s = number(kv["total_time"])


def run_problems(run: RunLog, non_record: bool) -> list[str]:
    """Reasons to refuse one log on its own (empty list: acceptable)."""
    required = {
        "seed": run.get("seed"), "config_hash": run.get("config_hash"),
        "device": run.get("device"), "dataset": run.get("dataset"),
        "val_tokens": run.get("val_tokens"),
        "serialized_model_int6_lzma": run.model_bytes, "code_bytes": run.code_bytes,
        "Total submission size": run.total_bytes,
        "final_int6_roundtrip": run.roundtrip_eval_ms,
        "final_int6_roundtrip_exact": run.roundtrip_bpb,
        "final_int6_sliding_window_exact": run.sliding_bpb,
        "step lines": run.steps, "run_complete": run.total_time_s,
    }
    missing = [name for name, value in required.items() if value is None]
    if missing:
        return [f"incomplete log, missing {', '.join(missing)}"]
    problems = []
    scores = {"round-trip": run.roundtrip_bpb, "sliding": run.sliding_bpb,
              "neural sliding": run.neural_bpb}
    problems += [f"{label} val_bpb is {value}" for label, value in scores.items()
                 if value is not None and not math.isfinite(value)]
    if run.over_cap is not None:
        problems.append(f"the run says it is over the cap, not a valid submission (over_cap: {run.over_cap[:80]}...)")
    if run.total_bytes > SIZE_LIMIT:
        problems.append(f"artifact is {run.total_bytes:,} bytes, over the {SIZE_LIMIT:,} limit")
    if run.total_bytes != run.model_bytes + run.code_bytes:
        problems.append(f"total size {run.total_bytes} != model {run.model_bytes}"
                        f" + code {run.code_bytes}")
    listed = run.code_bytes if run.code_raw_bytes is None else run.code_raw_bytes
    if run.code_files is not None and sum(run.code_files.values()) != listed:
        key = "code_bytes" if run.code_raw_bytes is None else "raw_bytes"
        problems.append(f"{key} {listed} != sum of listed files {sum(run.code_files.values())}")
    if not non_record:
        problems += _record_problems(run)
    return problems


def _record_problems(run: RunLog) -> list[str]:
    """Reasons a complete log cannot back a record submission."""
    problems = []
    if run.get("sample") == 1 or run.get("dataset") != RECORD_DATASET:
        problems.append(f"sample dataset ({run.get('dataset')}, sample:{run.get('sample')});"
                        " pass --non-record for a non-record summary")
    elif run.get("val_tokens") != RECORD_VAL_TOKENS:
        problems.append(f"scored {run.get('val_tokens')} validation tokens, not the full"
                        f" {RECORD_VAL_TOKENS:,}; pass --non-record for a non-record summary")
    if run.get("device") != "cuda":
        problems.append(f"device:{run.get('device')} run; pass --non-record for a"
                        " non-record summary")
    elif run.get("world_size") != RECORD_WORLD_SIZE or "H100" not in str(run.get("gpu")):
        problems.append(f"not 8xH100 (world_size:{run.get('world_size')} gpu:{run.get('gpu')});"
                        " pass --non-record for a non-record summary")
    if run.eval_time_s > EVAL_LIMIT_S:
        problems.append(f"evaluation took {run.eval_time_s:.1f}s, over {EVAL_LIMIT_S:.0f}s")
    return problems


def check_runs(runs: list[RunLog], non_record: bool) -> list[str]:
    """All refusal lines, each naming the file and the reason; empty list means accept."""
    if not runs:
        return ["no logs given"]
    errors = [f"{run.path}: {why}" for run in runs for why in run_problems(run, non_record)]
    if errors:
        return errors
    for key, label in MUST_AGREE.items():
        values = {run.path: _agree_value(run, key) for run in runs}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            listing = ", ".join(f"{path}={value}" for path, value in values.items())
            errors.append(f"mixed {label} across logs: {listing}")
    seen = {}
    for run in runs:
        seed = run.get("seed")
        if seed in seen:
            errors.append(f"{run.path}: seed {seed} already used by {seen[seed]}")
        seen.setdefault(seed, run.path)
    return errors


def _agree_value(run: RunLog, key: str):
    return run.code_files if key == "code_files" else run.get(key)


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n-1); std is 0 for a single value."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 8), "std": round(std, 8), "n": len(values)}


def seed_entry(run: RunLog) -> dict:
    """The per-seed record written into submission.json."""
    return {
        "seed": run.get("seed"),
        "run_id": run.get("run_id"),
        "log": run.path.name,
        "val_bpb": run.sliding_bpb,
        "val_loss": run.sliding_loss,
        "neural_sliding_bpb": run.neural_bpb if run.mixer_on else run.sliding_bpb,
        "roundtrip_bpb": run.roundtrip_bpb,
        "bytes_model": run.model_bytes,
        "bytes_code": run.code_bytes,
        "bytes_total": run.total_bytes,
        "train_time_s": run.train_time_ms / 1000.0,
        "eval_time_s": run.eval_time_s,
        "steps": run.steps,
        "peak_memory_mib": run.peak_memory_mib,
    }


SUMMARY_METRICS = ["val_bpb", "neural_sliding_bpb", "roundtrip_bpb", "bytes_total",
                   "train_time_s", "eval_time_s", "steps"]


def build_submission(runs: list[RunLog], *, name: str, author: str, non_record: bool,
                     today: str | None = None) -> dict:
    """The submission dict for logs that already passed `check_runs`."""
    seeds = sorted((seed_entry(run) for run in runs), key=lambda s: s["seed"])
    stats = {key: mean_std([s[key] for s in seeds]) for key in SUMMARY_METRICS}
    first = runs[0]
    chip = first.get("gpu") if first.get("device") == "cuda" else "cpu"
    hardware = f"{first.get('world_size')}x {chip}"
    bpb, neural = stats["val_bpb"], stats["neural_sliding_bpb"]
    blurb = (f"{bpb['n']} seed(s) on {hardware}, {first.get('dataset')}: val_bpb "
             f"{bpb['mean']:.4f} +/- {bpb['std']:.4f}"
             + (f" (network alone {neural['mean']:.4f})" if first.mixer_on else "")
             + ("" if not non_record else "; non-record"))
    return {
        "name": name,
        "author": author,
        "blurb": blurb,
        "date": today or date.today().isoformat(),
        "record": not non_record,
        "val_bpb": stats["val_bpb"]["mean"],
        "val_bpb_std": stats["val_bpb"]["std"],
        "val_loss": round(statistics.fmean(s["val_loss"] for s in seeds), 8),
        "bytes_total": max(s["bytes_total"] for s in seeds),
        "bytes_code": first.code_bytes,
        "code_packed": first.code_raw_bytes is not None,
        "code_files": first.code_files,
        "mixer": first.mixer_on,
        "hardware": hardware,
        "device": first.get("device"),
        "world_size": first.get("world_size"),
        "gpu": first.get("gpu"),
        "dataset": first.get("dataset"),
        "sample": bool(first.get("sample")),
        "val_tokens": first.get("val_tokens"),
        "git_commit": first.get("git_commit"),
        "config_hash": first.get("config_hash"),
        "model_params": first.get("model_params"),
        "hparams": {k: v for k, v in (first.hparams or {}).items()
                    if k.lower() not in ("seed", "run_id")},
        "seeds": seeds,
        "summary": stats,
    }


def load_submission(paths, *, name: str, author: str, non_record: bool,
                    today: str | None = None) -> tuple[dict | None, list[RunLog], list[str]]:
    """Parse and check logs; returns (submission or None, runs, refusal lines)."""
    runs = [parse_log(p) for p in paths]
    errors = check_runs(runs, non_record)
    if errors:
        return None, runs, errors
    return build_submission(runs, name=name, author=author, non_record=non_record,
                            today=today), runs, []


def write_json_atomic(data: dict, out: Path) -> None:
    """Write JSON to a temp file beside `out`, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments shared with make_record.py."""
    parser.add_argument("logs", nargs="+", type=Path, help="training logs (logs/*.txt)")
    parser.add_argument("--non-record", action="store_true",
                        help="accept sample-dataset / CPU / non-8xH100 logs; JSON says record:false")
    parser.add_argument("--author", default="", help="author shown in submission.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--name", default="parameter-golf-submission", help="submission name")
    parser.add_argument("--out", type=Path, default=Path("submission.json"))
    args = parser.parse_args(argv)
    submission, _, errors = load_submission(args.logs, name=args.name, author=args.author,
                                            non_record=args.non_record)
    if errors:
        for line in errors:
            print(f"refused: {line}", file=sys.stderr)
        return 1
    write_json_atomic(submission, args.out)
    bpb = submission["summary"]["val_bpb"]
    print(f"wrote {args.out}: val_bpb {bpb['mean']:.4f} ± {bpb['std']:.4f} over {bpb['n']} seed(s),"
          f" {submission['bytes_total']:,} bytes, record:{str(submission['record']).lower()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
