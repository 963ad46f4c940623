"""Reliability (issue 8), against the CLI: bad inputs, numerical faults, interruption, distributed faults.

Every bad-input case must exit non-zero with exactly one `error:` line naming the problem, no traceback,
and leave every pre-existing file byte-identical (same mtime), with no new artifact and no temp file."""
from __future__ import annotations

import io
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import brotli
import numpy as np
import pytest
import torch

from conftest import ROOT, SCRIPT, artifact_of, make_dataset, run_cli, run_two_ranks, snapshot, tiny_env_for
import artifact_codec
import train_gpt
from data.shards import write_shard  # noqa: E402


# No test here reads a clock: waits are for events (a log line, a process's exit), bounded by HANG_S only to fail
# rather than hang. "Every rank exits at once, not after COLLECTIVE_TIMEOUT_SECONDS" is tested the same way: the
# collective timeout is set far beyond HANG_S, so ranks that waited for it would be killed and the test would fail;
# a loaded machine makes a run slower, never its outcome different.
HANG_S, NEVER_S = 600, "7200"


@pytest.fixture(scope="module")
def base(tmp_path_factory, sample_paths):
    """A tiny trained artifact (for EVAL_ONLY cases), made once."""
    root = tmp_path_factory.mktemp("rel_base")
    data = make_dataset(root / "data", sample_paths)
    p = run_cli(tiny_env_for(data, sample_paths), root, RUN_ID="base")
    assert p.returncode == 0, p.stderr[-3000:]
    return types.SimpleNamespace(root=root, artifact=root / "artifacts" / "base.ptz", sample=sample_paths,
                                 env=tiny_env_for(data, sample_paths))


@pytest.fixture
def work(tmp_path, base):
    return make_work(tmp_path, base)


def put(path: Path, data: bytes, key: str, **env) -> dict:
    """Write a bad file and point env var key at it."""
    path.write_bytes(data)
    return dict(env, **{key: str(path)})


def patch_header(path: Path, index: int, value: int):
    raw = bytearray(path.read_bytes())
    raw[4 * index:4 * index + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(raw))


def truncate(path: Path, drop: int):
    path.write_bytes(path.read_bytes()[:-drop])


def other_meta_artifact(w):
    """The base artifact with its recorded arch edited (MODEL_DIM 64 -> 128): the tensors no longer fit."""
    raw = w.base.artifact.read_bytes()
    n = 12 + int.from_bytes(raw[8:12], "little")  # magic, the rest's length, the rest (header first), the tensors' streams
    head, body = brotli.decompress(raw[12:n]).split(b"\n", 1)
    head = json.loads(head)
    head["meta"]["arch"]["MODEL_DIM"] = 128
    path = w.root / "other.ptz"
    rest = brotli.compress(json.dumps(head).encode() + b"\n" + body, **artifact_codec.BROTLI)
    path.write_bytes(raw[:8] + len(rest).to_bytes(4, "little") + rest + raw[n:])
    return {"EVAL_ONLY": "1", "ARTIFACT": str(path), "MODEL_DIM": "128"}  # matches the edited meta


def old_format_artifact(w):
    """An artifact as the code before format v2 wrote it: torch.save of {format, meta, tensors}, then LZMA."""
    buf = io.BytesIO()
    torch.save({"format": "pgolf-int6-lzma-v1", "meta": {}, "tensors": {}}, buf)
    path = w.root / "v1.ptz"
    path.write_bytes(lzma.compress(buf.getvalue()))
    return {"EVAL_ONLY": "1", "ARTIFACT": str(path)}


def vocab512_artifact(w):
    """A well-formed artifact of a 512-token model: the 1024-token tokenizer does not match it."""
    env = {k: v for k, v in w.env.items() if k in {h.name for h in train_gpt.HPARAMS}}
    args = train_gpt.Hyperparameters(dict(env, VOCAB_SIZE="512"), preset="cpu")
    path = w.root / "v512.ptz"
    path.write_bytes(artifact_of(artifact_codec.quantize_state(train_gpt.build_model(args).state_dict()), args.meta()))
    return {"EVAL_ONLY": "1", "ARTIFACT": str(path)}


def corrupt_kg(w):
    """A copy of the code whose kg_data payload is damaged (the base64 is cut short)."""
    code = w.root / "code"
    code.mkdir()
    for f in ("train_gpt.py", "artifact_codec.py", "backoff_mixer.py", "kg_data.py"):
        shutil.copy(ROOT / f, code / f)
    text = (code / "kg_data.py").read_text()
    m = re.search(r'KG_IMPORTANCE_B64 = \(\n    "([^"]+)"', text)
    (code / "kg_data.py").write_text(text.replace(m.group(1), m.group(1)[:-8] + "AAAA", 1))
    return {"KG_INIT": "1", "_SCRIPT": str(code / "train_gpt.py")}


def ttt_params_vs_artifact(w):
    """EVAL_ONLY with TTT_PARAMS naming block 3: the CPU preset (NUM_LAYERS unset) has 4 blocks, the artifact 2."""
    w.env.pop("NUM_LAYERS")
    return {"TTT_ENABLED": "1", "TTT_PARAMS": r"^blocks\.3\.", "EVAL_ONLY": "1", "ARTIFACT": str(w.base.artifact)}


def out_of_vocab(path: Path, pos: int, value: int):
    """Put one token id >= VOCAB_SIZE (1024) into a shard at pos (a shard made with another tokenizer)."""
    tokens = train_gpt.load_data_shard(path).numpy().copy()
    tokens[pos] = value
    write_shard(path, tokens)


VAL = "fineweb_val_000000.bin"
TRAIN0 = "fineweb_train_000000.bin"
TRAIN1 = "fineweb_train_000001.bin"
CASES = {
    "data_path_missing": (lambda w: {"DATA_PATH": str(w.root / "nope")}, "does not exist"),
    "data_path_empty": (lambda w: (w.root / "empty").mkdir() or {"DATA_PATH": str(w.root / "empty")}, "no shards match"),
    "val_wrong_magic": (lambda w: patch_header(w.data / VAL, 0, 12345), "magic"),
    "train_wrong_version": (lambda w: patch_header(w.data / TRAIN1, 1, 7), "version"),
    "val_truncated": (lambda w: truncate(w.data / VAL, 10), "truncated"),
    "train_truncated": (lambda w: truncate(w.data / TRAIN1, 3), "truncated"),
    "train_header_only": (lambda w: (w.data / TRAIN1).write_bytes(b"\0" * 100), "shorter than"),
    "val_token_out_of_vocab": (lambda w: out_of_vocab(w.data / VAL, 777, 1024), f"{VAL} has token id 1024 at position 777"),
    "train_token_out_of_vocab": (lambda w: out_of_vocab(w.data / TRAIN0, 5, 40000), f"{TRAIN0} has token id 40000 at position 5"),
    "val_shorter_than_window": (lambda w: write_shard(w.data / VAL, np.arange(50)), "validation split"),
    "tokenizer_missing": (lambda w: {"TOKENIZER_PATH": str(w.root / "no.model")}, "not found"),
    "tokenizer_garbage": (lambda w: put(w.root / "g.model", b"junk" * 10, "TOKENIZER_PATH"), "not a SentencePiece"),
    "tokenizer_vocab_mismatch": (lambda w: {"VOCAB_SIZE": "512"}, "VOCAB_SIZE=512"),
    "non_numeric": (lambda w: {"ITERATIONS": "abc"}, "ITERATIONS='abc'"),
    "non_finite_int": (lambda w: {"ITERATIONS": "inf"}, "ITERATIONS='inf'"),
    "non_finite_float": (lambda w: {"MATRIX_LR": "nan"}, "MATRIX_LR='nan'"),
    "negative_stride": (lambda w: {"EVAL_STRIDE": "-1"}, "EVAL_STRIDE=-1"),
    "stride_over_window": (lambda w: {"EVAL_STRIDE": "65"}, "exceeds EVAL_SEQ_LEN"),
    "ngram_order_1": (lambda w: {"NGRAM_ORDER": "1", "USE_NGRAM_MIXER": "1"}, "NGRAM_ORDER=1"),
    "attention_fa3_without_cuda": (lambda w: {"ATTENTION": "fa3"}, "ATTENTION=fa3 needs CUDA"),
    "attention_cuda_kernel_on_cpu": (lambda w: {"ATTENTION": "sdpa_cudnn"}, "ATTENTION=sdpa_cudnn picks a CUDA kernel"),
    # the mixer's settings are checked (by the mixer module) whenever it runs; with USE_NGRAM_MIXER=0 it is not imported
    "ngram_online_grid_without_0": (lambda w: {"NGRAM_ONLINE_GRID": "0.2,0.5", "USE_NGRAM_MIXER": "1"}, "NGRAM_ONLINE_GRID='0.2,0.5'"),
    "ngram_online_grid_not_numbers": (lambda w: {"NGRAM_ONLINE_GRID": "0,a", "USE_NGRAM_MIXER": "1"}, "NGRAM_ONLINE_GRID='0,a'"),
    "ngram_online_eta_over_1": (lambda w: {"NGRAM_ONLINE_ETA": "2", "USE_NGRAM_MIXER": "1"}, "NGRAM_ONLINE_ETA=2.0"),
    "ngram_rule_unknown": (lambda w: {"NGRAM_RULE": "kneser", "USE_NGRAM_MIXER": "1"}, "NGRAM_RULE='kneser'"),
    "heads_not_dividing_dim": (lambda w: {"NUM_HEADS": "3"}, "does not divide MODEL_DIM"),
    "kv_not_dividing_heads": (lambda w: {"NUM_KV_HEADS": "3"}, "does not divide NUM_HEADS"),
    "odd_head_dim": (lambda w: {"MODEL_DIM": "66"}, "odd"),
    "batch_not_divisible": (lambda w: {"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000"),
    "existing_run_id": (lambda w: {"RUN_ID": "old"}, "already exists"),
    "eval_only_no_artifact_set": (lambda w: {"EVAL_ONLY": "1"}, "needs ARTIFACT"),
    "artifact_missing": (lambda w: {"EVAL_ONLY": "1", "ARTIFACT": str(w.root / "no.ptz")}, "not found"),
    "artifact_truncated": (lambda w: put(w.root / "t.ptz", w.base.artifact.read_bytes()[:-100], "ARTIFACT", EVAL_ONLY="1"),
                           "truncated or corrupt"),
    "artifact_not_ours": (lambda w: put(w.root / "n.ptz", lzma.compress(b"x" * 100), "ARTIFACT", EVAL_ONLY="1"), "corrupt"),
    "artifact_other_config_env": (lambda w: {"EVAL_ONLY": "1", "ARTIFACT": str(w.base.artifact), "MODEL_DIM": "128"},
                                  "different config"),
    "artifact_other_config_tensors": (other_meta_artifact, "does not fit"),
    "artifact_vocab_vs_tokenizer": (vocab512_artifact, "VOCAB_SIZE=512"),
    "artifact_old_format": (old_format_artifact, "older format pgolf-int6-lzma-v1"),
    "artifact_v2_format": (lambda w: put(w.root / "v2.ptz", b"PGOLFv2\n" + bytes(64), "ARTIFACT", EVAL_ONLY="1"),
                           "older format pgolf-int6-v2"),
    "quant_bits_with_rate_control": (lambda w: {"QUANT_BITS": "5"}, "QUANT_BITS=5 sets the uniform export"),
    "quant_unknown": (lambda w: {"QUANT": "int4"}, "QUANT='int4' must be one of gptq, clip"),
    "quant_bits_out_of_range": (lambda w: {"QUANT_BITS": "9"}, "QUANT_BITS=9 must lie in [2, 8]"),
    "gptq_calib_not_whole_slices": (lambda w: {"GPTQ_CALIB_TOKENS": "1000"}, "GPTQ_CALIB_TOKENS=1000 must be a multiple"),
    "gptq_calib_over_train_tokens": (lambda w: {"GPTQ_CALIB_TOKENS": "40960"}, "exceeds the 40000 training tokens"),
    "gptq_damp_zero": (lambda w: {"GPTQ_DAMP": "0"}, "GPTQ_DAMP=0.0 must be > 0"),
    "gptq_reserve_over_wallclock": (lambda w: {"MAX_WALLCLOCK_SECONDS": "5", "GPTQ_RESERVE_SECONDS": "5"},
                                    "leaves no training time"),
    "target_bytes_not_a_number": (lambda w: {"TARGET_BYTES": "16MB"}, "TARGET_BYTES='16MB'"),
    "target_bytes_below_code": (lambda w: {"TARGET_BYTES": "20000"}, "TARGET_BYTES=20000 does not exceed the code"),
    "kg_payload_corrupt": (corrupt_kg, "kg_data"),
    "eval_dump_unwritable": (lambda w: (w.root / "afile").write_bytes(b"x") and {"EVAL_DUMP": str(w.root / "afile" / "d.npz")},
                             "EVAL_DUMP"),  # refused before training, not after the evaluation
    "eval_dump_is_dir": (lambda w: {"EVAL_DUMP": str(w.data)}, "EVAL_DUMP"),
    "ttt_chunk_under_stride": (lambda w: {"TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "16"}, "TTT_CHUNK_TOKENS=16 is not a multiple of EVAL_STRIDE=32"),
    "ttt_chunk_not_multiple": (lambda w: {"TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "100"}, "TTT_CHUNK_TOKENS=100"),
    "ttt_negative_lr": (lambda w: {"TTT_ENABLED": "1", "TTT_LR": "-0.01"}, "TTT_LR=-0.01 must be >= 0"),
    "ttt_zero_epochs": (lambda w: {"TTT_ENABLED": "1", "TTT_EPOCHS": "0"}, "TTT_EPOCHS=0 must be >= 1"),
    "ttt_unknown_optimizer": (lambda w: {"TTT_ENABLED": "1", "TTT_OPTIMIZER": "lion"}, "TTT_OPTIMIZER='lion' must be one of sgd, adamw"),
    "ttt_params_match_nothing": (lambda w: {"TTT_ENABLED": "1", "TTT_PARAMS": "^nothing"}, "TTT_PARAMS='^nothing' matches no parameter"),
    "ttt_params_not_a_regex": (lambda w: {"TTT_ENABLED": "1", "TTT_PARAMS": "blocks.("}, "not a regular expression"),
    "ttt_params_vs_artifact_arch": (ttt_params_vs_artifact, r"TTT_PARAMS='^blocks\\.3\\.' matches no parameter"),
}


def make_work(root: Path, base) -> types.SimpleNamespace:
    """A cwd with a tiny dataset, an earlier run's log and artifact (which must survive every failure)."""
    data = make_dataset(root / "data", base.sample, train_shards=2)
    (root / "logs").mkdir()
    (root / "logs" / "old.txt").write_text("an earlier run\n")
    (root / "artifacts").mkdir()
    shutil.copy(base.artifact, root / "artifacts" / "old.ptz")
    return types.SimpleNamespace(root=root, data=data, env=tiny_env_for(data, base.sample, RUN_ID="bad"), base=base)


ZYGOTE = '''"""Imports train_gpt once, then runs each case as a forked child: cwd, env, argv and stdout/stderr
set as for `python train_gpt.py`, exit status = main()'s return. Saves a ~1.5 s torch import per case."""
import json, os, sys
sys.path.insert(0, sys.argv[2])
import train_gpt
for case in json.load(open(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        os.chdir(case["cwd"])
        os.environ.clear()
        os.environ.update(case["env"])
        sys.argv = [case["script"]]
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        code = 1
        try:
            code = train_gpt.main()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    open(case["rc"], "w").write(str(os.waitstatus_to_exitcode(status)))
'''
REAL_CLI = {"data_path_missing", "artifact_truncated", "non_numeric", "kg_payload_corrupt"}  # also via `python train_gpt.py`


@pytest.fixture(scope="module")
def battery(tmp_path_factory, base):
    """Every bad-input case in its own cwd: case -> (work, snapshot before, result). Cases run as forks of one
    process that imported train_gpt (ZYGOTE); REAL_CLI cases (and any needing another script) run as real CLIs."""
    jobs, forked = {}, []
    out = tmp_path_factory.mktemp("battery_out")
    for case, (setup, _) in CASES.items():
        w = make_work(tmp_path_factory.mktemp(case), base)
        extra = setup(w)
        extra = dict(extra) if isinstance(extra, dict) else {}
        script = Path(extra.pop("_SCRIPT", SCRIPT))
        jobs[case] = (w, script, dict(w.env, **extra), snapshot(w.root))
        if script == SCRIPT and case not in REAL_CLI:
            forked.append(dict(cwd=str(w.root), env=jobs[case][2], script=str(SCRIPT), **{
                k: str(out / f"{case}.{k}") for k in ("stdout", "stderr", "rc")}))
    (out / "cases.json").write_text(json.dumps(forked))
    (out / "zygote.py").write_text(ZYGOTE)
    with ThreadPoolExecutor(2) as pool:
        zyg = pool.submit(subprocess.run, [sys.executable, str(out / "zygote.py"), str(out / "cases.json"), str(ROOT)],
                          env=base.env, capture_output=True, text=True, timeout=HANG_S)
        real = {c: run_cli(env, w.root, script=script, timeout=HANG_S) for c, (w, script, env, _) in jobs.items()
                if c in REAL_CLI or script != SCRIPT}
        assert zyg.result().returncode == 0, zyg.result().stderr[-2000:]
    results = {}
    for c, (w, _, _, before) in jobs.items():
        if c in REAL_CLI or not (out / f"{c}.rc").exists():
            continue
        results[c] = types.SimpleNamespace(returncode=int((out / f"{c}.rc").read_text()),
                                           stdout=(out / f"{c}.stdout").read_text(), stderr=(out / f"{c}.stderr").read_text())
    results.update(real)
    return {c: (jobs[c][0], jobs[c][3], results[c]) for c in jobs}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_nonzero_nothing_overwritten(case, battery):
    w, before, p = battery[case]
    phrase = CASES[case][1]
    out = p.stdout + p.stderr
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert p.returncode == 2, out[-2000:]
    assert len(errors) == 1 and phrase in errors[0], out[-2000:]
    assert "Traceback" not in out
    after = snapshot(w.root)
    for path, meta in before.items():
        assert after.get(path) == meta, f"{path} changed"
    new = set(after) - set(before)
    assert all(n.startswith("logs/") for n in new), new  # at most the failing run's own log
    assert not [n for n in after if n.endswith(".tmp")]


# ----------------------------------------------------------------------------- numerical faults
def test_nan_loss_stops_within_one_step_no_artifact(work):
    """MATRIX_LR=1e30 (valid, finite) blows the weights up after step 1: step 2's loss is NaN."""
    p = run_cli(work.env, work.root, RUN_ID="nan", MATRIX_LR="1e30", ITERATIONS="50")
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    log = (work.root / "logs" / "nan.txt").read_text().splitlines()
    assert log[-1].startswith("error: training diverged: train_loss is nan at step 2")
    assert "last good step 1 train_loss:" in log[-1]
    good = [l for l in log if l.startswith("step:1/50 train_loss:")]
    assert good and good[0].split("train_loss:")[1].split()[0] in log[-1]
    assert not any(l.startswith("step:2/50 train_loss") for l in log)
    assert sorted(os.listdir(work.root / "artifacts")) == ["old.ptz"]


# ----------------------------------------------------------------------------- interruption
def test_write_atomic_is_whole_or_absent(tmp_path, monkeypatch):
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"old")

    def boom(*_):
        raise train_gpt.Interrupted("SIGTERM")

    monkeypatch.setattr(train_gpt.os, "replace", boom)
    with pytest.raises(train_gpt.Interrupted):
        train_gpt.write_atomic(dest, b"new" * 1000)
    assert dest.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def start_and_signal(w, run_id: str, sig, marker: str, timeout: float = HANG_S, **extra):
    """Start a CLI run, send sig once the log has a line starting with marker; returns (rc, log lines)."""
    env = dict(w.env, RUN_ID=run_id, **{k: str(v) for k, v in extra.items()})
    proc = subprocess.Popen([sys.executable, str(SCRIPT)], cwd=w.root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log, t0 = w.root / "logs" / f"{run_id}.txt", time.time()
    try:
        while time.time() - t0 < timeout:
            if log.exists() and any(l.startswith(marker) for l in log.read_text().splitlines()):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            raise AssertionError(f"{marker} never logged")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, log.read_text().splitlines(), out + err


def assert_clean(w):
    files = [str(p.relative_to(w.root)) for p in w.root.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith(".tmp")], files


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_during_training(work, sig):
    rc, log, out = start_and_signal(work, f"int{sig.value}", sig, "step:2/", ITERATIONS=100000)
    assert rc == 130 and "Traceback" not in out, out[-2000:]
    assert log[-1].startswith(f"interrupted: {sig.name}"), log[-3:]
    assert all(l.strip() for l in log)  # no half-written lines
    assert sorted(os.listdir(work.root / "artifacts")) == ["old.ptz"]
    assert_clean(work)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_during_evaluation_keeps_artifact_and_eval_only_resumes(work, sig, base):
    """Long sliding eval (stride 1 over 20k tokens); the signal lands after the artifact is written."""
    make_dataset(work.data, base.sample, val_tokens=20000, train_shards=2)
    rid = f"ev{sig.value}"
    rc, log, out = start_and_signal(work, rid, sig, "final_int6_roundtrip_exact", EVAL_STRIDE=1, EVAL_BATCH_SEQS=16)
    assert rc == 130 and "Traceback" not in out, out[-2000:]
    assert log[-1].startswith(f"interrupted: {sig.name}") and not any("sliding_window_exact" in l for l in log)
    artifact = work.root / "artifacts" / f"{rid}.ptz"
    train_gpt.load_artifact(str(artifact))  # whole and loadable
    assert_clean(work)
    p = run_cli(work.env, work.root, RUN_ID=f"{rid}_resume", EVAL_ONLY=1, ARTIFACT=str(artifact))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    roundtrip = [l for l in log if l.startswith("final_int6_roundtrip_exact")]
    assert roundtrip and roundtrip[0] in p.stdout.splitlines()  # same numbers as the interrupted run


# ----------------------------------------------------------------------------- distributed faults
def torchrun(w, script=SCRIPT, expect: str = "", **extra):
    """2 gloo ranks of script under torchrun; reruns once if `expect` is missing from the output and the sandbox's
    networking failed (conftest.run_two_ranks)."""
    env = dict(w.env, COLLECTIVE_TIMEOUT_SECONDS=NEVER_S, **{k: str(v) for k, v in extra.items()})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    return run_two_ranks(cmd, w.root, env, HANG_S, ok=lambda p: expect in p.stdout + p.stderr)


def test_two_ranks_config_error_exits_cleanly(work):
    p = torchrun(work, expect="error: TRAIN_BATCH_TOKENS=1000", TRAIN_BATCH_TOKENS="1000")
    out = p.stdout + p.stderr
    assert p.returncode != 0
    errors = [l for l in out.splitlines() if re.match(r"\[rank [01]\] error: TRAIN_BATCH_TOKENS=1000", l)]
    # both ranks find the error; under load torchrun may stop the slower one before it prints
    assert 1 <= len(errors) <= 2, out[-3000:]
    assert 'train_gpt.py", line' not in out  # no traceback from our code (torchrun prints its own summary)
    assert snapshot(work.root).keys() >= {"logs/old.txt", "artifacts/old.ptz"}


def test_one_rank_failing_stops_all_ranks(work):
    """Rank 0 alone refuses (its log already exists) while rank 1 goes on to training's first collective:
    every rank must exit without waiting for COLLECTIVE_TIMEOUT_SECONDS (see HANG_S), with rank 0's message visible."""
    before = snapshot(work.root)
    p = torchrun(work, expect="[rank 0] error: logs/old.txt already exists", RUN_ID="old", ITERATIONS="100000")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert "[rank 0] error: logs/old.txt already exists" in out, out[-3000:]
    after = snapshot(work.root)
    assert all(after.get(k) == v for k, v in before.items())
    assert not (set(after) - set(before))


RANK1_CRASH = '''"""Test harness only: rank 1 raises at its 12th training micro-batch; the rest is the real train_gpt.main()."""
import os, sys
sys.path.insert(0, os.environ["PGOLF_ROOT"])
import train_gpt
if os.environ.get("RANK") == "1":
    orig, calls = train_gpt.DistributedTokenLoader.next_batch, [0]
    def next_batch(self, *a, **k):
        calls[0] += 1
        if calls[0] == 12:
            raise RuntimeError("injected rank-1 failure")
        return orig(self, *a, **k)
    train_gpt.DistributedTokenLoader.next_batch = next_batch
sys.exit(train_gpt.main())
'''


def test_rank1_crash_mid_training_stops_all_ranks(work):
    """Rank 1 crashes mid-step while rank 0 waits in the loss all-reduce: gloo sees the peer gone and every
    rank exits without waiting for COLLECTIVE_TIMEOUT_SECONDS (see HANG_S), with rank 1's message visible and no artifact."""
    wrapper = work.root / "rank1_crash.py"
    wrapper.write_text(RANK1_CRASH)
    p = torchrun(work, wrapper, expect="injected rank-1 failure", RUN_ID="r1", ITERATIONS="100000", PGOLF_ROOT=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "injected rank-1 failure" in out, out[-3000:]
    assert "step:2/100000 train_loss" in (work.root / "logs" / "r1.txt").read_text()  # rank 0's log kept
    assert sorted(os.listdir(work.root / "artifacts")) == ["old.ptz"]
