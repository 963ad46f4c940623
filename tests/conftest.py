"""Shared fixtures: a tiny dataset built from slices of the sample shards, a tiny-model env, and a CLI runner.

Every CLI run happens in a tmp cwd with the script path absolute, so logs/ and artifacts/ land in tmp
and the repo's own logs/ are never touched."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402
from data.shards import write_shard  # noqa: E402

SCRIPT = ROOT / "train_gpt.py"
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker on a 2-core machine
    import torch
    torch.set_num_threads(1)

# A model that trains and evaluates in a few seconds on 2 CPU cores.
TINY_ENV = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", VE_LAYERS="1", XSA_LAST_N="1",
                ITERATIONS="3", WARMUP_STEPS="0", WARMDOWN_ITERS="2", TRAIN_BATCH_TOKENS="2048", TRAIN_SEQ_LEN="64",
                EVAL_SEQ_LEN="64", EVAL_STRIDE="32", EVAL_BATCH_SEQS="8", VAL_BATCH_SIZE="4096", VAL_LOSS_EVERY="0",
                MTP_NUM_HEADS="2", BIGRAM_DIM="16", VE_DIM="16", MAX_WALLCLOCK_SECONDS="0", USE_NGRAM_MIXER="0",
                NGRAM_ORDER="4", COLLECTIVE_TIMEOUT_SECONDS="60", GPTQ_CALIB_TOKENS="2048")


@pytest.fixture(scope="session")
def sample_paths(tmp_path_factory):
    """(data dir, tokenizer) of the sample dataset: the repo's copy, else built into tmp."""
    data, tok = ROOT / "data" / "datasets" / "sample_sp1024", ROOT / "data" / "tokenizers" / "sample_1024_bpe.model"
    if not (data / "fineweb_val_000000.bin").is_file() or not tok.is_file():
        root = tmp_path_factory.mktemp("sample")
        data, tok = root / "sample_sp1024", root / "sample_1024_bpe.model"
        subprocess.run([sys.executable, str(ROOT / "data" / "build_sample_dataset.py"), "--data-dir", str(data),
                        "--tokenizer", str(tok)], check=True, capture_output=True)
    return data, tok


def make_dataset(dest: Path, sample_paths, val_tokens: int = 1500, train_tokens: int = 20000,
                 train_shards: int = 1) -> Path:
    """A tiny copy of the sample dataset at dest (slices of its shards); returns dest."""
    data, _ = sample_paths
    dest.mkdir(parents=True, exist_ok=True)
    val = train_gpt.load_data_shard(data / "fineweb_val_000000.bin").numpy()
    train = train_gpt.load_data_shard(data / "fineweb_train_000000.bin").numpy()
    write_shard(dest / "fineweb_val_000000.bin", val[:val_tokens])
    for k in range(train_shards):
        write_shard(dest / f"fineweb_train_{k:06d}.bin", train[k * train_tokens:(k + 1) * train_tokens])
    return dest


@pytest.fixture
def tiny_data(tmp_path, sample_paths) -> Path:
    return make_dataset(tmp_path / "data", sample_paths)


@pytest.fixture
def tiny_env(tiny_data, sample_paths) -> dict:
    """Env for a tiny CLI run on tiny_data (add RUN_ID etc. per test)."""
    return tiny_env_for(tiny_data, sample_paths)


def tiny_env_for(data: Path, sample_paths, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in {h.name for h in train_gpt.HPARAMS}}
    env.update(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=str(sample_paths[1]), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight the CLI subprocesses for the cores)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def frozen_code(root: Path) -> Path:
    """A copy of the counted code files in root/code: runs from it keep their sizes while the repo is edited."""
    import shutil
    code = root / "code"
    code.mkdir()
    for f in ("train_gpt.py", "artifact_codec.py", "backoff_mixer.py", "kg_data.py"):
        shutil.copy(ROOT / f, code / f)
    return code


def run_cli(env: dict, cwd: Path, args=(), script: Path = SCRIPT, timeout: float = 600, **env_extra):
    """Run `python script` in cwd; returns the CompletedProcess (text) with .seconds added."""
    env = dict(env, **{k: str(v) for k, v in env_extra.items()})
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    p.seconds = time.perf_counter() - t0
    return p


# What a 2-rank CPU run prints when the sandbox's loopback networking, not our code, broke the run
# (seen about once in eight full test runs on the gVisor development machine).
NETWORK_FLAKES = ("Connection reset by peer", "Connection refused", "Address already in use", "Broken pipe",
                  "RendezvousConnectionError", "DistNetworkError", "Socket Timeout")


def run_two_ranks(cmd: list, cwd: Path, env: dict, timeout: float, ok=lambda p: p.returncode == 0) -> subprocess.CompletedProcess:
    """torchrun --nproc_per_node=2: rerun once if the first try is not `ok` (default: it must succeed) and failed with a
    networking error (printed, so the retry shows in the test log); any other outcome is returned as is."""
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if not ok(p) and any(f in p.stdout + p.stderr for f in NETWORK_FLAKES):
        print(f"retrying a 2-rank run after a networking failure:\n{(p.stdout + p.stderr)[-1500:]}")
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return p


def artifact_of(qstate: dict, meta: dict) -> bytes:
    """The artifact file of a quantized state, as the export writes it (artifact_codec's rest stream and tensor streams)."""
    import artifact_codec as ac
    return ac.assemble(ac.rest_stream(qstate, meta), [ac.compress(ac.stream_bytes(e)) for e in qstate.values() if e["kind"] != "float"])


def log_value(text: str, prefix: str, key: str) -> str:
    """The value of key:… on the last line starting with prefix."""
    line = [l for l in text.splitlines() if l.startswith(prefix)][-1]
    return line.split(f"{key}:", 1)[1].split()[0]


def snapshot(root: Path) -> dict:
    """{relative path: (size, mtime_ns, bytes)} of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}
