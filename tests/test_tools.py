"""Tests for tools/: submission.json, refusals, plots, records folder, seed runner."""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GPU_LOGS = sorted(FIXTURES.glob("gpu_seed*.txt"))
CPU_LOG = FIXTURES / "cpu_seed1337.txt"
sys.path.insert(0, str(TOOLS))

from conftest import frozen_code  # noqa: E402
from make_submission import parse_log  # noqa: E402
from time_plan import complete, plan, rates_from_e2e, rates_from_results  # noqa: E402
from train_gpt import HPARAMS, Hyperparameters  # noqa: E402

# The numbers written into the GPU fixtures, per seed:
# (mixed bpb, neural bpb, roundtrip bpb, model bytes, steps, train ms, roundtrip ms, sliding ms)
EXPECTED = {
    1337: (1.0950, 1.1245, 1.1484, 15865748, 7024, 600012, 12000, 85000),
    42: (1.0962, 1.1251, 1.1490, 15861022, 6990, 600070, 12150, 85400),
    2024: (1.0941, 1.1239, 1.1479, 15870310, 7010, 600041, 11980, 84800),
}
CODE_BYTES = 77261
CODE_FILES = {"train_gpt.py": 60000, "backoff_mixer.py": 15000, "kg_data.py": 2261}


def tool(name, *args, cwd=REPO, env=None):
    """Run a tool script; returns the CompletedProcess."""
    script = TOOLS / name
    cmd = ["bash", str(script)] if name.endswith(".sh") else [sys.executable, str(script)]
    return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def variant(tmp_path, src, name, *edits, drop=()):
    """Copy a fixture log with (old, new) text replacements and dropped line prefixes."""
    text = src.read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    lines = [ln for ln in text.splitlines(keepends=True) if not ln.startswith(tuple(drop))]
    out = tmp_path / name
    out.write_text("".join(lines))
    return out


def make_json(tmp_path, *logs, extra=()):
    out = tmp_path / "submission.json"
    proc = tool("make_submission.py", *logs, "--out", out, *extra)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def close(a, b):
    return math.isclose(a, b, rel_tol=0, abs_tol=1e-7)


# --- make_submission ---------------------------------------------------------------------

def test_json_matches_fixture_numbers(tmp_path):
    proc, sub = make_json(tmp_path, *GPU_LOGS, extra=["--name", "fixture", "--author", "team"])
    assert proc.returncode == 0, proc.stderr
    assert sub["record"] is True and sub["name"] == "fixture" and sub["author"] == "team"
    assert sub["dataset"] == "fineweb10B_sp1024" and sub["sample"] is False
    assert sub["hardware"] == "8x NVIDIA H100 80GB HBM3"
    assert sub["git_commit"] == "3f9c2d1a7b4e5f60718293a4b5c6d7e8f9a0b1c2"
    assert sub["config_hash"] == "a41f07c93e5d" and sub["mixer"] is True
    assert sub["hparams"]["num_layers"] == 11 and "seed" not in sub["hparams"]
    assert sub["blurb"].startswith("3 seed(s) on 8x NVIDIA H100 80GB HBM3")
    assert sub["bytes_code"] == CODE_BYTES and sub["code_files"] == CODE_FILES

    assert [s["seed"] for s in sub["seeds"]] == sorted(EXPECTED)
    for s in sub["seeds"]:
        mixed, neural, rt, model, steps, train_ms, rt_ms, sl_ms = EXPECTED[s["seed"]]
        assert close(s["val_bpb"], mixed) and close(s["neural_sliding_bpb"], neural)
        assert close(s["roundtrip_bpb"], rt)
        assert s["bytes_model"] == model and s["bytes_total"] == model + CODE_BYTES
        assert s["steps"] == steps and close(s["train_time_s"], train_ms / 1000)
        assert close(s["eval_time_s"], (rt_ms + sl_ms) / 1000)

    columns = list(zip(*EXPECTED.values()))
    expected_stats = {
        "val_bpb": columns[0], "neural_sliding_bpb": columns[1], "roundtrip_bpb": columns[2],
        "bytes_total": [m + CODE_BYTES for m in columns[3]], "steps": columns[4],
        "train_time_s": [t / 1000 for t in columns[5]],
        "eval_time_s": [(a + b) / 1000 for a, b in zip(columns[6], columns[7])],
    }
    for key, values in expected_stats.items():
        stat = sub["summary"][key]
        assert stat["n"] == 3
        assert math.isclose(stat["mean"], statistics.mean(values), abs_tol=1e-8), key
        assert math.isclose(stat["std"], statistics.stdev(values), abs_tol=1e-8), key
    assert close(sub["val_bpb"], statistics.mean(columns[0]))
    assert close(sub["val_bpb_std"], statistics.stdev(columns[0]))
    assert sub["bytes_total"] == max(m + CODE_BYTES for m in columns[3])


def test_single_seed_has_zero_std(tmp_path):
    proc, sub = make_json(tmp_path, GPU_LOGS[0])
    assert proc.returncode == 0, proc.stderr
    assert sub["summary"]["val_bpb"]["std"] == 0 and sub["summary"]["val_bpb"]["n"] == 1


def test_parse_ignores_interleaved_lines_and_reads_curves():
    run = parse_log(FIXTURES / "gpu_seed1337.txt")
    assert run.get("gpu") == "NVIDIA H100 80GB HBM3" and run.get("world_size") == 8
    assert run.hparams["num_layers"] == 11 and run.get("model_params") == 28042332
    assert run.val_points[0] == (0.0, 6.9312, pytest.approx(4.1037))
    assert run.train_points and run.mixer_points[-1] == (62021632, 1.095)
    assert run.steps == 7024 and run.peak_memory_mib is not None


@pytest.mark.parametrize("cut", ["run_complete", "final_int6_sliding_window_exact",
                                 "Total submission size", "mixer_pass"])
def test_truncated_log_refused(tmp_path, cut):
    text = GPU_LOGS[0].read_text()
    bad = tmp_path / "truncated.txt"
    bad.write_text(text[:text.index(cut)])
    proc, sub = make_json(tmp_path, GPU_LOGS[1], bad)
    assert proc.returncode == 1 and sub is None
    assert f"{bad}: incomplete log, missing" in proc.stderr
    assert GPU_LOGS[1].name not in proc.stderr  # only the bad file is blamed


def test_mixed_configs_refused(tmp_path):
    other = variant(tmp_path, GPU_LOGS[1], "other.txt",
                    ("config_hash:a41f07c93e5d", "config_hash:0123456789ab"))
    proc, sub = make_json(tmp_path, GPU_LOGS[0], other)
    assert proc.returncode == 1 and sub is None
    assert "mixed config_hash" in proc.stderr and str(other) in proc.stderr


def test_duplicate_seed_refused(tmp_path):
    copy = tmp_path / "copy.txt"
    shutil.copy(GPU_LOGS[0], copy)
    proc, _ = make_json(tmp_path, GPU_LOGS[0], copy)
    assert proc.returncode == 1 and "already used" in proc.stderr


def test_oversize_refused(tmp_path):
    big = variant(tmp_path, GPU_LOGS[0], "big.txt",
                  ("serialized_model_int6_lzma:15865748", "serialized_model_int6_lzma:15965748"),
                  ("int6+lzma: 15943009 bytes", "int6+lzma: 16043009 bytes"))
    proc, sub = make_json(tmp_path, big, extra=["--non-record"])
    assert proc.returncode == 1 and sub is None
    assert f"{big}: artifact is 16,043,009 bytes, over the 16,000,000 limit" in proc.stderr


def test_over_cap_line_refused(tmp_path):
    """A run whose export could not fit TARGET_BYTES says so (train_gpt's over_cap line), even under 16,000,000."""
    line = ("over_cap: total 15943009 bytes exceeds TARGET_BYTES=15900000 by 43009 (by 1200 with FIT_MAX_FRACTION=0.02 "
            "of the int6 values zeroed): NOT a valid submission; kept unfitted as artifacts/x.OVER_CAP.ptz; shrink MLP_MULT\n")
    over = variant(tmp_path, GPU_LOGS[0], "over.txt", ("Total submission size", line + "Total submission size"))
    proc, sub = make_json(tmp_path, over, extra=["--non-record"])
    assert proc.returncode == 1 and sub is None
    assert f"{over}: the run says it is over the cap, not a valid submission (over_cap: total 15943009 bytes" in proc.stderr
    proc, sub = make_json(tmp_path, GPU_LOGS[0], extra=["--non-record"])  # the same log without the line passes
    assert proc.returncode == 0 and sub is not None


PACKED_LINE = ("code_bytes:77261 files:train_gpt.py=60000,backoff_mixer.py=15000,kg_data.py=2261",
               "code_bytes:30000 raw_bytes:77261 files:train_gpt.py=60000,backoff_mixer.py=15000,kg_data.py=2261")
PACKED_TOTAL = ("int6+lzma: 15943009 bytes", "int6+lzma: 15895748 bytes")  # 15,865,748 + 30,000


def test_packed_code_log(tmp_path):
    """A log that counted its code packed (raw_bytes: the listed files' own bytes): code_bytes, the pack's size, is
    what the total and submission.json count; the files must add up to raw_bytes."""
    packed = variant(tmp_path, GPU_LOGS[0], "packed.txt", PACKED_LINE, PACKED_TOTAL)
    run = parse_log(packed)
    assert (run.code_bytes, run.code_raw_bytes, run.code_files) == (30000, CODE_BYTES, CODE_FILES)
    proc, sub = make_json(tmp_path, packed)
    assert proc.returncode == 0, proc.stderr
    assert sub["bytes_code"] == 30000 and sub["code_packed"] is True and sub["code_files"] == CODE_FILES
    assert sub["bytes_total"] == EXPECTED[1337][3] + 30000
    bad = variant(tmp_path, packed, "bad.txt", ("raw_bytes:77261", "raw_bytes:77000"))
    proc, _ = make_json(tmp_path, bad)
    assert proc.returncode == 1 and f"{bad}: raw_bytes 77000 != sum of listed files 77261" in proc.stderr
    proc, sub = make_json(tmp_path, GPU_LOGS[0])
    assert proc.returncode == 0 and sub["code_packed"] is False  # an older log counted its files unpacked


def test_inconsistent_size_refused(tmp_path):
    bad = variant(tmp_path, GPU_LOGS[0], "bad.txt",
                  ("int6+lzma: 15943009 bytes", "int6+lzma: 15900000 bytes"))
    proc, _ = make_json(tmp_path, bad)
    assert proc.returncode == 1 and "!= model" in proc.stderr


def test_diverged_log_refused(tmp_path):
    nan = variant(tmp_path, GPU_LOGS[0], "nan.txt",
                  ("val_loss:1.84945500 val_bpb:1.09500000", "val_loss:nan val_bpb:nan"))
    proc, _ = make_json(tmp_path, nan)
    assert proc.returncode == 1 and f"{nan}: sliding val_bpb is nan" in proc.stderr


def test_partial_validation_is_not_a_record(tmp_path):
    part = variant(tmp_path, GPU_LOGS[0], "part.txt", ("val_tokens:62021632", "val_tokens:1000000"))
    proc, _ = make_json(tmp_path, part)
    assert proc.returncode == 1 and "not the full 62,021,632" in proc.stderr


def test_cpu_sample_log_needs_non_record(tmp_path):
    proc, sub = make_json(tmp_path, CPU_LOG)
    assert proc.returncode == 1 and sub is None
    assert "sample dataset" in proc.stderr and "device:cpu" in proc.stderr

    proc, sub = make_json(tmp_path, CPU_LOG, extra=["--non-record"])
    assert proc.returncode == 0, proc.stderr
    assert sub["record"] is False and sub["dataset"] == "sample_sp1024" and sub["sample"]
    assert sub["device"] == "cpu" and sub["hardware"] == "1x cpu"
    assert close(sub["val_bpb"], 2.8127) and close(sub["seeds"][0]["neural_sliding_bpb"], 2.9533)


def test_single_gpu_log_is_not_a_record(tmp_path):
    one = variant(tmp_path, GPU_LOGS[0], "one.txt", ("world_size:8", "world_size:1"))
    proc, _ = make_json(tmp_path, one)
    assert proc.returncode == 1 and "not 8xH100" in proc.stderr
    proc, sub = make_json(tmp_path, one, extra=["--non-record"])
    assert proc.returncode == 0 and sub["record"] is False


def test_mixer_off_log(tmp_path):
    plain = variant(tmp_path, GPU_LOGS[0], "plain.txt",
                    drop=("mixer_pass", "final_int6_sliding_window_neural_exact"))
    proc, sub = make_json(tmp_path, plain)
    assert proc.returncode == 0, proc.stderr
    assert sub["mixer"] is False
    assert sub["seeds"][0]["neural_sliding_bpb"] == sub["seeds"][0]["val_bpb"]


def test_refusal_keeps_existing_json(tmp_path):
    proc, sub = make_json(tmp_path, GPU_LOGS[0])
    assert proc.returncode == 0
    before = (tmp_path / "submission.json").read_bytes()
    proc, _ = make_json(tmp_path, CPU_LOG)
    assert proc.returncode == 1
    assert (tmp_path / "submission.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["submission.json"]


# --- plot_log ---------------------------------------------------------------------------

@pytest.mark.parametrize("log", [GPU_LOGS[0], CPU_LOG])
def test_plot_is_a_png(tmp_path, log):
    out = tmp_path / "docs" / "plot.png"
    proc = tool("plot_log.py", log, "--out", out)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000


def test_plot_refuses_log_without_curves(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("run_id:x\nsome free-form line\n")
    proc = tool("plot_log.py", empty, "--out", tmp_path / "x.png")
    assert proc.returncode == 1 and not (tmp_path / "x.png").exists()


# --- make_record ------------------------------------------------------------------------

@pytest.fixture
def fake_root(tmp_path):
    """A repo root holding code files of exactly the sizes the fixture logs counted."""
    root = tmp_path / "repo"
    root.mkdir()
    for name, size in CODE_FILES.items():
        (root / name).write_bytes(b"#" * size)
    return root


def record(root, *logs, extra=()):
    return tool("make_record.py", "--name", "fixture_run", "--date", "2026-01-02",
                "--root", root, *extra, *logs)


def test_record_folder_contents(fake_root):
    proc = record(fake_root, *GPU_LOGS)
    assert proc.returncode == 0, proc.stderr
    folder = fake_root / "records" / "track_10min_16mb" / "2026-01-02_fixture_run"
    expected = {"README.md", "submission.json", *CODE_FILES, *(p.name for p in GPU_LOGS)}
    assert {p.name for p in folder.iterdir()} == expected
    assert [p.name for p in (fake_root / "records" / "track_10min_16mb").iterdir()] == [folder.name]
    for log in GPU_LOGS:
        assert (folder / log.name).read_bytes() == log.read_bytes()
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["record"] is True and sub["date"] == "2026-01-02"
    assert close(sub["val_bpb"], statistics.mean(v[0] for v in EXPECTED.values()))
    readme = (folder / "README.md").read_text()
    assert "proper probability distribution" in readme and "8x NVIDIA H100" in readme
    assert f"{sub['summary']['val_bpb']['mean']:.4f}" in readme
    assert all(f"| {seed} |" in readme for seed in EXPECTED)


def test_record_refused_leaves_nothing(fake_root, tmp_path):
    bad = tmp_path / "truncated.txt"
    bad.write_text(GPU_LOGS[0].read_text().split("run_complete")[0])
    for logs, reason in [((CPU_LOG,), "device:cpu"), ((GPU_LOGS[0], bad), "incomplete")]:
        proc = record(fake_root, *logs)
        assert proc.returncode == 1 and reason in proc.stderr
        assert not (fake_root / "records").exists() or not any((fake_root / "records").rglob("*"))


def test_record_refuses_changed_code(fake_root):
    (fake_root / "kg_data.py").write_bytes(b"#" * 10)
    proc = record(fake_root, *GPU_LOGS)
    assert proc.returncode == 1 and "code changed" in proc.stderr
    assert not (fake_root / "records").exists()


def test_record_refuses_a_pack_that_is_not_what_the_log_counted(tmp_path):
    """make_record packs the root's files with the root's own train_gpt.pack_code and ships it only if its size is the
    log's code_bytes."""
    root = frozen_code(tmp_path)
    files = {f: (root / f).stat().st_size for f in ("train_gpt.py", "artifact_codec.py")}
    listing = ",".join(f"{f}={n}" for f, n in files.items())
    log = variant(tmp_path, GPU_LOGS[0], "packed.txt", PACKED_TOTAL,
                  (PACKED_LINE[0], f"code_bytes:30000 raw_bytes:{sum(files.values())} files:{listing}"))
    proc = record(root, log)
    assert proc.returncode == 1 and "but the log counted 30000 (code changed since the run" in proc.stderr, proc.stderr
    assert not (root / "records").exists()


def test_record_non_record_and_existing_target(fake_root):
    proc = record(fake_root, CPU_LOG, extra=["--non-record"])
    assert proc.returncode == 0, proc.stderr
    readme = (fake_root / "records" / "track_non_record_16mb" / "2026-01-02_fixture_run" / "README.md").read_text()
    assert "Non-record" in readme and "1x cpu" in readme
    proc = record(fake_root, CPU_LOG, extra=["--non-record"])
    assert proc.returncode == 1 and "already exists" in proc.stderr


# --- run_seeds.sh -----------------------------------------------------------------------

def test_run_seeds_syntax():
    assert subprocess.run(["bash", "-n", str(TOOLS / "run_seeds.sh")]).returncode == 0


def test_run_seeds_dry_run_commands():
    env = dict(os.environ, DRY_RUN="1", DEVICE="cuda", NPROC="8", RUN_PREFIX="t")
    proc = tool("run_seeds.sh", "1337", "42", "--", "--name", "x", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("SEED=1337 RUN_ID=t_seed1337 torchrun --standalone "
                             "--nproc_per_node=8 train_gpt.py")
    assert "SEED=42 RUN_ID=t_seed42" in lines[1]
    assert lines[2].endswith("tools/make_submission.py logs/t_seed1337.txt logs/t_seed42.txt "
                             "--name x")


FAKE_TRAIN = """\
import os, sys
seed, run_id = os.environ["SEED"], os.environ["RUN_ID"]
if seed == "42":
    sys.exit(3)
text = open(os.environ["FIXTURE"]).read()
text = text.replace("seed:1337", "seed:" + seed).replace("run_id:cpu_seed1337", "run_id:" + run_id)
open(os.path.join("logs", run_id + ".txt"), "w").write(text)
"""


@pytest.fixture
def seed_repo(tmp_path):
    """A throwaway repo with the tools and a fake train_gpt.py that copies the CPU fixture."""
    (tmp_path / "tools").mkdir()
    for name in ("run_seeds.sh", "make_submission.py"):
        shutil.copy(TOOLS / name, tmp_path / "tools" / name)
    (tmp_path / "train_gpt.py").write_text(FAKE_TRAIN)
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", RUN_PREFIX="t",
               FIXTURE=str(CPU_LOG))
    return tmp_path, env


def test_run_seeds_cpu_end_to_end(seed_repo):
    root, env = seed_repo
    proc = subprocess.run(["bash", "tools/run_seeds.sh", "7", "2024"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sub = json.loads((root / "submission.json").read_text())
    assert sub["record"] is False and [s["seed"] for s in sub["seeds"]] == [7, 2024]
    assert sorted(p.name for p in (root / "logs").iterdir()) == ["t_seed2024.txt", "t_seed7.txt"]


def test_run_seeds_fails_fast(seed_repo):
    root, env = seed_repo
    proc = subprocess.run(["bash", "tools/run_seeds.sh", "7", "42", "2024"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and "seed 42 failed" in proc.stderr
    assert [p.name for p in (root / "logs").iterdir()] == ["t_seed7.txt"]
    assert not (root / "submission.json").exists()


# --- time_plan ---------------------------------------------------------------------------
# A synthetic one-GPU run, numbers picked so that every phase is easy to compute by hand.
SYNTH_RUN = {"date": "2026-12-01T00:00:00+00:00", "results": {
    "env": {"gpu": "NVIDIA H100 80GB HBM3"},
    "train": {"tokens_per_s": 1_000_000.0, "ms_per_step": 98.304, "tokens_per_step": 98_304, "warmup_steps": 5,
              "warmup_s": 40.49152},                                     # compile: 40.49152 - 5 x 0.098304 = 40
    "eval": {"windows_per_s": 2000.0, "seq_len": 2048, "batch_seqs": 128, "warmup_s": 30.128},  # compile 30
    "mixer": {"whole_stream_s": 10.0, "stream_tokens": 50_000_000, "rule": "online"},         # 5M tokens/s
    "export": {"load_s": 2.0, "quantize_s": 9.5},
    "ttt": {"error": "RuntimeError: a failed phase gives no rate"}}}
VAL = 64 * 10_000 + 2048 + 1   # N = 642,048 targets: 1 + (642,048 - 2048) / 64 = 10,001 sliding windows


def time_plan(tmp_path, *args, env=None, run=SYNTH_RUN):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    clean = {k: v for k, v in os.environ.items() if k not in {h.name for h in HPARAMS}}  # the record preset as is
    return tool("time_plan.py", "--runs", path, "--json", *args, env={**clean, **(env or {})})


def test_time_plan_arithmetic_on_a_synthetic_run(tmp_path):
    proc = time_plan(tmp_path, "--val-tokens", VAL)
    assert proc.returncode == 0, proc.stdout  # every clock kept
    out = json.loads(proc.stdout)
    got = {p["key"]: p["seconds"] for p in out["phases"]}
    step = 786_432 / 8 / 1e6                   # 0.098304 s a step on each of 8 GPUs
    # GPTQ_RESERVE_SECONDS unset: the reserve rises from 10 s to 1.5 x the 9.5 s of candidates = 14.25 s, as train_gpt
    steps = 5958                               # 5958 steps end at 585.69 s; a 5959th would end past the 585.75 s cap
    expected = {
        "train_compile": 40 + 20 * step, "train": steps * step, "validation": 4 * (642_048 // 2048) / 8 / 2000,
        "calibration": 262_144 / 8 / 1e6, "quantize": 9.5, "search": 60.0,   # search: an estimate
        "scorer_compile": 30.0, "ttt_compile": 40.0, "load": 2.0, "roundtrip": 313 / 8 / 2000,
        "no_ttt_pass": 10_001 / 8 / 2000, "mixer_probe": 642_048 / 5e6, "sliding": 10_001 / 8 / 2000,
        "ttt_train": 9 * 3 * 65_536 / 8 / 1e6,    # 10 chunks of 1,024 windows, 9 trained on, 3 epochs
        "mixer": 642_048 / 5e6}
    assert list(got) == list(expected)
    assert all(math.isclose(got[k], v, rel_tol=1e-9) for k, v in expected.items()), got
    bases = {p["key"]: p["basis"] for p in out["phases"]}
    assert bases["search"].startswith("estimate:") and bases["ttt_train"].startswith("estimate:")
    assert bases["quantize"] == "measured: run.json export.quantize_s"
    assert bases["train"].endswith("cap 585.75 s (GPTQ reserve 14.25 s)")
    assert bases["mixer"].startswith("measured: run.json mixer.whole_stream_s") and "online" in bases["mixer"]
    clocks = {c["clock"]: c for c in out["clocks"]}
    train_total = steps * step + 262_144 / 8 / 1e6 + 9.5
    assert math.isclose(clocks["training"]["seconds"], train_total) and clocks["training"]["flag"] == ""
    eval_total = sum(v for k, v in expected.items() if k in ("scorer_compile", "ttt_compile", "load", "roundtrip",
                                                               "no_ttt_pass", "mixer_probe", "sliding", "ttt_train", "mixer"))
    assert math.isclose(clocks["evaluation"]["seconds"], eval_total) and clocks["evaluation"]["flag"] == ""
    budget = clocks["evaluation budget (EVAL_BUDGET_SECONDS)"]
    assert budget["limit"] == 540 and budget["flag"] == ""
    # A reserve of 5 s: the cap moves to 595 s, 6052 steps end at 594.94 s, and calibration + quantization break it.
    proc = time_plan(tmp_path, "--val-tokens", VAL, env={"GPTQ_RESERVE_SECONDS": "5"})
    clocks = {c["clock"]: c for c in json.loads(proc.stdout)["clocks"]}
    assert proc.returncode == 1 and math.isclose(clocks["training"]["seconds"], 6052 * step + 262_144 / 8 / 1e6 + 9.5)
    assert clocks["training"]["flag"].startswith("BREAKS the training clock: 604.47 s > 600 s")
    assert "a reserve of 10 s would fit" in clocks["GPTQ reserve (GPTQ_RESERVE_SECONDS)"]["flag"]


def test_time_plan_follows_the_settings_and_never_scales_compilation(tmp_path):
    base = {p["key"]: p["seconds"] for p in json.loads(time_plan(tmp_path, "--val-tokens", VAL).stdout)["phases"]}
    big = {p["key"]: p["seconds"] for p in json.loads(time_plan(tmp_path, "--val-tokens", 2 * VAL).stdout)["phases"]}
    assert big["scorer_compile"] == base["scorer_compile"] == 30.0 and big["ttt_compile"] == base["ttt_compile"] == 40.0
    assert math.isclose(big["mixer"], 2 * base["mixer"], rel_tol=1e-5) and big["sliding"] > 1.9 * base["sliding"]
    proc = time_plan(tmp_path, "--val-tokens", VAL, env={"USE_NGRAM_MIXER": "0", "GPTQ_RESERVE_SECONDS": "11"})
    out = json.loads(proc.stdout)
    keys = [p["key"] for p in out["phases"]]
    assert not {"no_ttt_pass", "mixer_probe", "mixer"} & set(keys) and proc.returncode == 0, out["clocks"]
    assert json.loads(time_plan(tmp_path, env={"EVAL_STRIDE": "8"}).stdout)["clocks"][1]["flag"].startswith(
        "BREAKS the evaluation clock")  # 7.75M windows a pass at 2,000/s on each of 8 GPUs
    proc = time_plan(tmp_path, run={"date": "x", "results": {"env": {"gpu": "NVIDIA H200"}}})
    assert proc.returncode == 2 and proc.stderr.startswith("error: no run measured the training rate")


E2E_LOG = """hparams:{"EVAL_SEQ_LEN": 2048, "EVAL_STRIDE": 64, "TTT_ENABLED": 1, "TTT_CHUNK_TOKENS": 65536, "TTT_EPOCHS": 3, "TRAIN_BATCH_TOKENS": 49152}
dataset:synth sample:0 data_path:/d tokenizer:/t val_tokens:262145
step:1500/1500 train_loss:3.0000 train_time:90000ms step_avg:60.00ms
training_clock train:90.0s calibration:2.0s quantize:6.0s total:98.0s max_wallclock:0s reserve:10.0s calibration_tokens:262144 quant:gptq rate_control:1
serialized_model_int6_lzma:123 bytes path:artifacts/x.ptz export_time:38.0s calibration:2.00s quantize:6.00s search:30.00s
eval_time_split roundtrip:1.0s no_ttt_pass:45.0s mixer_probe:0.1s sliding:3.0s ttt_train:20.0s ttt_steps:9 ttt_chunks:3 mixer:1.0s total:70.0s budget:540s
"""


def test_time_plan_rates_from_an_e2e_log():
    """bench/gpu_e2e.py's estimate: compilation kept apart (the no-TTT pass less the same windows warm; TTT's time
    less its work at the run's training rate), and scaled to the full validation only what is per window or token."""
    r = rates_from_e2e(E2E_LOG)
    wps = 4065 / 3.0                          # 1 + (262,144 - 2048) / 64 windows in the warm TTT pass
    assert math.isclose(r["windows_per_s"].value, wps) and math.isclose(r["eval_compile_s"].value, 45.0 - 3.0)
    assert math.isclose(r["ttt_tokens_per_s"].value, 49_152 / 0.060)
    assert math.isclose(r["ttt_compile_s"].value, 20.0 - 3 * 3 * 65_536 / (49_152 / 0.060))  # 4 chunks, 3 trained
    assert (r["calib_tokens_per_s"].value, r["quantize_s"].value, r["search_s"].value) == (131_072, 6.0, 30.0)
    assert "mixer_tokens_per_s" not in r  # a short stream's mixer time is mostly fixed cost
    full = complete({**rates_from_results(SYNTH_RUN["results"], "run.json"), **r})
    got = {p.key: p.seconds for p in plan(Hyperparameters({}, preset="record"), full)}
    assert math.isclose(got["sliding"], 969_057 / 8 / wps) and got["scorer_compile"] == 42.0
    assert math.isclose(got["ttt_train"], 946 * 3 * 65_536 / 8 / (49_152 / 0.060))
    assert math.isclose(got["mixer"], 62_021_631 / 5e6) and math.isclose(got["calibration"], 262_144 / 8 / 131_072)


def test_time_plan_export_rates_from_a_check_json():
    """The export's rates: the export phase's (calibrating the record preset's 262,144 tokens), overridden by the e2e
    phase's (a trained model through the real export; its export line names the calibration's token count)."""
    results = dict(SYNTH_RUN["results"], export={"calibration_s": 1.0, "quantize_s": 8.0, "search_s": 50.0, "load_s": 3.0},
                   e2e={"calibration_s": 0.5, "quantize_s": 4.0, "export_line": "training_clock train:9.0s calibration:0.5s "
                        "quantize:4.0s total:13.5s max_wallclock:0s reserve:10.0s calibration_tokens:131072 quant:gptq"})
    r = rates_from_results(results, "x.json")
    assert (r["calib_tokens_per_s"].value, r["quantize_s"].value, r["search_s"].value, r["load_s"].value) == (262_144, 4.0, 50.0, 3.0)
    assert r["quantize_s"].basis == "measured: x.json e2e.quantize_s" and r["search_s"].basis == "measured: x.json export.search_s"
    assert rates_from_results(dict(SYNTH_RUN["results"], export={"calibration_s": 1.0}), "x")["calib_tokens_per_s"].value == 262_144
