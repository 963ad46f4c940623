"""
train_gpt.py — Parameter Golf record submission, honest edition.

Trains an 11-layer GPT with multi-token-prediction heads (torchrun, 8xH100, 600 s), exports it as an
int6 artifact (GPTQ, brotli) whose total with every code file the run needs fits 16,000,000 bytes, and scores it with
a sharded sliding-window evaluation mixed with an exact, normalized n-gram model (backoff_mixer.py):
each batch is scored first, the n-gram counts are updated after. The score is a real BPB.

Sections: hyperparameters -> data -> model -> optimizer -> training -> export -> evaluation -> main.
Runs as `torchrun --standalone --nproc_per_node=8 train_gpt.py` on GPUs, or `python train_gpt.py`
on a CPU (a small preset on the built-in sample dataset). Every number is an env var.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import glob
import hashlib
import io
import json
import lzma
import math
import os
import re
import signal
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # artifact_codec.py / backoff_mixer.py / kg_data.py sit beside this file, whatever the cwd
import artifact_codec as ac  # noqa: E402


class UserError(Exception):
    """A problem the user can fix (bad path, bad value, bad file): printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- hyperparameters
class HP(NamedTuple):
    """One setting, in one place: env name, record default (its type is the setting's type), CPU-preset
    value (None: the same), range check, and role: "arch" (the model's architecture: stored in the artifact,
    the evaluation's model is built from it), "run" (bookkeeping, outside the config hash), or
    "mixer:<kwarg>" (passed to BackoffNgramMixer as that keyword, which checks it)."""
    name: str
    record: object
    cpu: object = None
    check: str = ""
    role: str = ""


# Checks: ">=1" (counts, sizes), ">=0", ">0", "[0,1]", "[2,8]", "0/1" (switches), "a|b|c" (one of), "" (none/the mixer's).
CHECKS = {">=1": (lambda v: v >= 1, "must be >= 1"), ">=0": (lambda v: v >= 0, "must be >= 0"),
          ">0": (lambda v: v > 0, "must be > 0"), "[0,1]": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
          "0/1": (lambda v: v in (0, 1), "must be 0 or 1"), "[2,8]": (lambda v: 2 <= v <= 8, "must lie in [2, 8]")}
# The CPU preset is chosen when CUDA is absent: a small model that trains for a couple of minutes on the
# sample dataset. Any env var wins.
HPARAMS = [
    # data and run
    HP("DATA_PATH", "./data/datasets/fineweb10B_sp1024", role="run"),  # "sample": the built-in sample dataset
    HP("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model", role="run"),
    HP("RUN_ID", "", role="run"),
    HP("SEED", 1337, role="run"),
    HP("ITERATIONS", 20000, 150, ">=1"),
    HP("MAX_WALLCLOCK_SECONDS", 600.0, 0.0, ">=0"),
    HP("WARMUP_STEPS", 20, 0, ">=0"),
    HP("WARMDOWN_ITERS", 3700, 50, ">=0"),
    HP("TRAIN_BATCH_TOKENS", 786432, 16384, ">=1"),
    HP("TRAIN_SEQ_LEN", 2048, 256, ">=1"),
    HP("TRAIN_LOG_EVERY", 200, 25, ">=1"),
    HP("VAL_LOSS_EVERY", 4000, 50, ">=0"),
    HP("VAL_BATCH_SIZE", 524288, 16384, ">=1"),
    HP("COMPILE", 1, 0, "0/1"),
    HP("ATTENTION", "auto", None, "auto|fa3|sdpa|sdpa_flash|sdpa_cudnn|sdpa_efficient", "run"),
    # model
    HP("VOCAB_SIZE", 1024, None, ">=1", "arch"),
    HP("NUM_LAYERS", 11, 4, ">=1", "arch"),
    HP("MODEL_DIM", 512, 128, ">=1", "arch"),
    HP("NUM_HEADS", 8, 4, ">=1", "arch"),
    HP("NUM_KV_HEADS", 4, 2, ">=1", "arch"),
    HP("MLP_MULT", 3, None, ">=1", "arch"),
    HP("MLP_LEAKY_SLOPE", 0.75, None, "[0,1]", "arch"),
    HP("ROPE_DIMS", 16, None, ">=0", "arch"),
    HP("ROPE_BASE", 10000.0, None, "", "arch"),
    HP("LOGIT_SOFTCAP", 30.0, None, "", "arch"),
    HP("QK_GAIN_INIT", 1.5),
    HP("TIED_EMBED_INIT_STD", 0.005),
    HP("BIGRAM_VOCAB_SIZE", 2048, None, ">=1", "arch"),
    HP("BIGRAM_DIM", 128, 64, ">=1", "arch"),
    HP("XSA_LAST_N", 4, 2, ">=0", "arch"),
    HP("VE_DIM", 128, 32, ">=1", "arch"),
    HP("VE_LAYERS", "9,10", "2,3", "", "arch"),
    HP("MTP_NUM_HEADS", 2, None, ">=0"),
    HP("MTP_LOSS_WEIGHT", 0.1, None, ">=0"),
    HP("KG_INIT", 0, None, "0/1"),
    HP("KG_INIT_STRENGTH", 0.5, None, ">=0"),
    # optimizer
    HP("MATRIX_LR", 0.027, 0.02, ">=0"),
    HP("TIED_EMBED_LR", 0.035, None, ">=0"),
    HP("SCALAR_LR", 0.025, None, ">=0"),
    HP("MUON_MOMENTUM", 0.99, 0.95, "[0,1]"),
    HP("MUON_MOMENTUM_WARMUP_START", 0.92, 0.85, "[0,1]"),
    HP("MUON_MOMENTUM_WARMUP_STEPS", 1500, 100, ">=0"),
    HP("MUON_BACKEND_STEPS", 5, None, ">=1"),
    HP("MUON_WD", 0.04, None, ">=0"),
    HP("ADAM_WD", 0.04, None, ">=0"),
    HP("BETA1", 0.9, None, "[0,1]"),
    HP("BETA2", 0.95, None, "[0,1]"),
    HP("ADAM_EPS", 1e-8),
    HP("GRAD_CLIP_NORM", 0.3, None, ">=0"),
    HP("EMA_DECAY", 0.997, 0.98, "[0,1]"),
    # export and evaluation
    HP("RATE_CONTROL", 1, None, "0/1"),  # 1: every matrix's encoding picked by rate and loss to fill TARGET_BYTES
    HP("QUANT", "gptq", None, "gptq|clip"),
    HP("QUANT_BITS", 6, None, "[2,8]"),  # RATE_CONTROL=0: the attention/MLP ("int6") matrices' width
    HP("GPTQ_CALIB_TOKENS", 262144, 65536, ">=1"),
    HP("GPTQ_DAMP", 0.01, None, ">0"),
    HP("GPTQ_BLOCK", 128, None, ">=1"),
    HP("GPTQ_RESERVE_SECONDS", 10.0, None, ">=0"),
    HP("TARGET_BYTES", 16_000_000, None, ">=1"),
    HP("FIT_MAX_FRACTION", 0.02, None, "[0,1]"),
    HP("EVAL_SEQ_LEN", 2048, 256, ">=1"),
    HP("EVAL_STRIDE", 64, 128, ">=1"),
    HP("EVAL_BATCH_SEQS", 128, 32, ">=1"),
    HP("USE_NGRAM_MIXER", 1, None, "0/1"),
    HP("NGRAM_ORDER", 10, None, "", "mixer:max_order"),
    HP("NGRAM_MIN_COUNT", 1, None, "", "mixer:min_count"),
    HP("NGRAM_RULE", "online", None, "", "mixer:rule"),
    HP("NGRAM_BETA", 32.0, None, "", "mixer:beta"),
    HP("ALPHA_BASE", 0.20, None, "", "mixer:alpha_base"),
    HP("ALPHA_RANGE", 0.55, None, "", "mixer:alpha_range"),
    HP("ALPHA_CENTER", 3.0, None, "", "mixer:alpha_center"),
    HP("NGRAM_ONLINE_GRID", "0,0.1,0.3,0.6,0.9", None, "", "mixer:online_grid"),  # rule online's experts: weights g on q
    HP("NGRAM_ONLINE_BETAS", "2,8,32,128", None, "", "mixer:online_betas"),  # ... at these Dirichlet betas
    HP("NGRAM_ONLINE_H_EDGES", "2,4", None, "", "mixer:online_edges"),  # its buckets: entropy bins x longest context
    HP("NGRAM_ONLINE_ETA", 1.0, None, "", "mixer:online_eta"),
    HP("TTT_ENABLED", 1, None, "0/1"),
    HP("TTT_CHUNK_TOKENS", 65536, 4096, ">=1"),
    HP("TTT_EPOCHS", 3, 1, ">=1"),
    HP("TTT_LR", 0.0003, None, ">=0"),
    HP("TTT_OPTIMIZER", "adamw", None, "sgd|adamw"),
    HP("TTT_BATCH_SEQS", 32, 4, ">=1"),
    HP("TTT_GRAD_CLIP", 1.0, None, ">=0"),
    HP("TTT_PARAMS", "."),
    HP("EVAL_BUDGET_SECONDS", 540.0, 0.0, ">=0"),  # the evaluation's clock (0: none): TTT stops adapting to keep it
    HP("EVAL_ONLY", 0, None, "0/1", "run"),
    HP("ARTIFACT", "", role="run"),
    HP("EVAL_DUMP", "", role="run"),
    HP("COLLECTIVE_TIMEOUT_SECONDS", 600, 120, ">=1"),
]


class Hyperparameters:
    """Every HPARAMS setting read from the environment (record default, or the CPU preset without CUDA),
    parsed and range-checked before any work starts; attribute = the env name in lower case."""

    def __init__(self, env=None, preset: str | None = None):
        env = os.environ if env is None else env
        self.preset = preset or ("record" if torch.cuda.is_available() else "cpu")
        self.explicit = {h.name for h in HPARAMS if h.name in env}
        for h in HPARAMS:
            default = h.cpu if (self.preset == "cpu" and h.cpu is not None) else h.record
            raw = env.get(h.name)
            setattr(self, h.name.lower(), default if raw is None else self._parse(h.name, raw, type(h.record)))
        self._validate()

    @staticmethod
    def _parse(name, raw, kind):
        if kind is str:
            return raw
        try:
            value = float(raw.strip())
            if not math.isfinite(value) or (kind is int and value != int(value)):
                raise ValueError
            return int(value) if kind is int else value
        except ValueError:
            raise UserError(f"{name}={raw!r} is not a valid {kind.__name__}; set {name} to a finite number") from None

    def _validate(self):
        for h in HPARAMS:
            v = getattr(self, h.name.lower())
            if "|" in h.check and v not in h.check.split("|"):
                raise UserError(f"{h.name}={v!r} must be one of {', '.join(h.check.split('|'))}")
            if h.check in CHECKS and not CHECKS[h.check][0](v):
                raise UserError(f"{h.name}={v} {CHECKS[h.check][1]}")
        if self.model_dim % self.num_heads:
            raise UserError(f"NUM_HEADS={self.num_heads} does not divide MODEL_DIM={self.model_dim}; pick a divisor")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"NUM_KV_HEADS={self.num_kv_heads} does not divide NUM_HEADS={self.num_heads}; pick a divisor")
        head_dim = self.model_dim // self.num_heads
        if head_dim % 2:
            raise UserError(f"head dim MODEL_DIM/NUM_HEADS={head_dim} is odd; rotary embeddings need an even head dim")
        if self.rope_dims % 2 or self.rope_dims > head_dim:
            raise UserError(f"ROPE_DIMS={self.rope_dims} must be even and <= head dim {head_dim}")
        if self.eval_stride > self.eval_seq_len:
            raise UserError(f"EVAL_STRIDE={self.eval_stride} exceeds EVAL_SEQ_LEN={self.eval_seq_len}; use a stride <= the window")
        if self.xsa_last_n > self.num_layers:
            raise UserError(f"XSA_LAST_N={self.xsa_last_n} exceeds NUM_LAYERS={self.num_layers}")
        for layer in layer_ids(self.ve_layers):
            if not 0 <= layer < self.num_layers:
                raise UserError(f"VE_LAYERS={self.ve_layers!r} names layer {layer}, outside 0..{self.num_layers - 1}")
        if self.rate_control and (fixed := sorted({"QUANT_BITS", "FIT_MAX_FRACTION"} & self.explicit)):
            raise UserError(f"{fixed[0]}={getattr(self, fixed[0].lower())} sets the uniform export (RATE_CONTROL=0); with "
                            f"RATE_CONTROL=1 the rate control picks every width: unset {fixed[0]} or set RATE_CONTROL=0")
        self.calibrates = bool(self.rate_control or self.quant == "gptq")  # the export reads training tokens
        if self.calibrates and self.gptq_calib_tokens % (CALIB_SLICES * self.train_seq_len):
            raise UserError(f"GPTQ_CALIB_TOKENS={self.gptq_calib_tokens} must be a multiple of {CALIB_SLICES} x TRAIN_SEQ_LEN")
        if self.calibrates and 0 < self.max_wallclock_seconds <= self.gptq_reserve_seconds:
            raise UserError(f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds} leaves no training time; lower it")
        mixer_settings(self)
        self.check_ttt()

    def check_ttt(self):
        """With TTT on: chunks end where windows' scored spans end, and TTT_PARAMS names some parameter of the arch."""
        if self.ttt_enabled and self.ttt_chunk_tokens % self.eval_stride:
            raise UserError(f"TTT_CHUNK_TOKENS={self.ttt_chunk_tokens} is not a multiple of EVAL_STRIDE={self.eval_stride} "
                            f"(chunks end where windows' scored spans end); use a multiple of {self.eval_stride}")
        mini = dict(self.arch(), VOCAB_SIZE=2, MODEL_DIM=2 * self.num_heads, BIGRAM_VOCAB_SIZE=2, BIGRAM_DIM=1, VE_DIM=1)
        try:  # parameter names do not depend on widths: a miniature of the arch has them all, and builds in ms
            if self.ttt_enabled and not any(re.search(self.ttt_params, n) for n, _ in GPT(mini).named_parameters()):
                raise UserError(f"TTT_PARAMS={self.ttt_params!r} matches no parameter name; '.' adapts all of them")
        except re.error as e:
            raise UserError(f"TTT_PARAMS={self.ttt_params!r} is not a regular expression ({e})") from None

    def as_dict(self) -> dict:
        return {h.name: getattr(self, h.name.lower()) for h in HPARAMS}

    def arch(self) -> dict:
        """The model's architecture: what the artifact stores and the evaluation builds its model from."""
        return {h.name: getattr(self, h.name.lower()) for h in HPARAMS if h.role == "arch"}

    def meta(self) -> dict:
        """What the artifact stores beside the weights: the arch and the config hash."""
        return {"arch": self.arch(), "config_hash": self.config_hash()}

    def config_hash(self) -> str:
        """Hash of every setting that changes the model or its score (not seed, run id or paths)."""
        cfg = {h.name: getattr(self, h.name.lower()) for h in HPARAMS if h.role != "run"}
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def layer_ids(spec: str) -> list[int]:
    """'9,10' -> [9, 10]."""
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"VE_LAYERS={spec!r} must be a comma-separated list of layer indices") from None


def mixer_settings(args: Hyperparameters) -> dict:
    """The BackoffNgramMixer keywords of the "mixer:" settings, checked by the mixer module itself (no table
    allocated, no kernel compiled); a rejected value is named by its env var. Mixer off: {}, and no import (not counted)."""
    if not args.use_ngram_mixer:
        return {}
    from backoff_mixer import SettingError, check_settings
    mixer = {h.role[6:]: h.name for h in HPARAMS if h.role.startswith("mixer:")}
    kw = {k: getattr(args, name.lower()) for k, name in mixer.items()}
    try:
        check_settings(vocab_size=args.vocab_size, **kw)
    except SettingError as e:
        name = mixer.get(e.setting, "VOCAB_SIZE")
        raise UserError(f"{name}={e.value!r} {e.problem}; fix {name}") from None
    return kw


# ----------------------------------------------------------------------------- data
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
SAMPLE_DATA_PATH = str(ROOT / "data" / "datasets" / "sample_sp1024")
SAMPLE_TOKENIZER_PATH = str(ROOT / "data" / "tokenizers" / "sample_1024_bpe.model")


def write_atomic(path, data: bytes) -> None:
    """Write bytes to path via a temp file in the same folder and a rename: whole or absent, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path, name: str) -> None:
    """Fail now, not after a long run, if `path` (an output file) cannot be written: create and remove a probe."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        (probe := path.with_name(f".{path.name}.{os.getpid()}.probe")).touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"{name}={path} cannot be written ({e.strerror}); choose another path") from None


def read_shard_header(path) -> int:
    """Validate a shard's header and size; return its token count. Names the file and the fault."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise UserError(f"cannot read shard {path}: {e.strerror}") from None
    if len(raw) < HEADER_BYTES:
        raise UserError(f"shard {path} is {size} bytes, shorter than its {HEADER_BYTES}-byte header; re-download or rebuild it")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != SHARD_MAGIC:
        raise UserError(f"shard {path} has magic {header[0]}, expected {SHARD_MAGIC}: not a competition shard")
    if header[1] != SHARD_VERSION:
        raise UserError(f"shard {path} has version {header[1]}, expected {SHARD_VERSION}; rebuild it with this code")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise UserError(f"shard {path} is {size} bytes but its header promises {n} tokens "
                        f"({HEADER_BYTES + 2 * max(n, 0)} bytes): truncated or corrupt; re-download or rebuild it")
    return n


def load_data_shard(path, vocab_size: int | None = None) -> Tensor:
    """All tokens of one validated shard as a uint16 tensor; with vocab_size, every id must be < vocab_size
    (one max per shard; a bad id would crash the embedding, on a GPU as a device-side assert)."""
    n = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)
    if vocab_size is not None and n and int(tokens.max()) >= vocab_size:
        pos = int(np.argmax(tokens >= vocab_size))
        raise UserError(f"shard {path} has token id {int(tokens[pos])} at position {pos}, outside the vocabulary "
                        f"[0, {vocab_size}): tokenized with another tokenizer? rebuild it or set VOCAB_SIZE")
    return torch.from_numpy(tokens.astype(np.uint16, copy=False))


def list_shards(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise UserError(f"no shards match {pattern}; fetch FineWeb (python data/cached_challenge_fineweb.py) "
                        f"or build the sample (python data/build_sample_dataset.py)")
    return files


class TokenStream:
    """Reads shards in order as one endless stream (wrapping to the first shard at the end)."""

    def __init__(self, pattern: str, vocab_size: int):
        self.files, self.vocab_size, self.file_idx, self.pos = list_shards(pattern), vocab_size, 0, 0
        for f in self.files:
            read_shard_header(f)  # fail on a bad shard now, not an hour into training
        self.tokens = load_data_shard(self.files[0], vocab_size)

    def take(self, n: int) -> Tensor:
        chunks, left = [], n
        while left > 0:
            if self.pos >= self.tokens.numel():
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = load_data_shard(self.files[self.file_idx], self.vocab_size), 0
                continue
            k = min(left, self.tokens.numel() - self.pos)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos, left = self.pos + k, left - k
        return torch.cat(chunks)


class DistributedTokenLoader:
    """Each micro-step takes world*(local+1) tokens of the stream; rank r keeps its own contiguous slice.

    local = global_tokens / (world * grad_accum). A micro-step of W ranks covers exactly the W
    consecutive micro-batches a single rank would take, so the global batch does not depend on W."""

    def __init__(self, pattern: str, vocab_size: int, rank: int, world_size: int, device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.stream = TokenStream(pattern, vocab_size)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        local = global_tokens // (self.world_size * grad_accum_steps)
        chunk = self.stream.take((local + 1) * self.world_size)
        mine = chunk[self.rank * (local + 1):(self.rank + 1) * (local + 1)].to(torch.int64)
        x, y = mine[:-1].reshape(-1, seq_len), mine[1:].reshape(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def load_validation_tokens(pattern: str, vocab_size: int, min_tokens: int = 2) -> Tensor:
    """The whole validation stream (all val shards, in order, every id checked against the vocabulary)."""
    tokens = torch.cat([load_data_shard(f, vocab_size) for f in list_shards(pattern)])
    if tokens.numel() < min_tokens:
        raise UserError(f"validation split {pattern} has {tokens.numel()} tokens, fewer than the {min_tokens} "
                        f"needed (one window + 1); use more val data or a shorter EVAL_SEQ_LEN/TRAIN_SEQ_LEN")
    return tokens


def load_tokenizer(path: str, vocab_size: int):
    import sentencepiece as spm
    if not Path(path).is_file():
        raise UserError(f"tokenizer {path} not found; set TOKENIZER_PATH or fetch it (python data/cached_challenge_fineweb.py)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError):
        raise UserError(f"tokenizer {path} is not a SentencePiece model; re-download or rebuild it") from None
    if sp.vocab_size() != vocab_size:
        raise UserError(f"tokenizer {path} has vocab {sp.vocab_size()} but VOCAB_SIZE={vocab_size}; "
                        f"use the matching tokenizer or set VOCAB_SIZE={sp.vocab_size()}")
    return sp


def build_byte_luts(sp, vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token byte tables of the competition rule: base bytes (UTF-8 of the piece without its leading "▁";
    byte-fallback pieces 1; control/unknown/unused 0), leading space, boundary (control/unknown/unused)."""
    base = torch.zeros(vocab_size, dtype=torch.int32)
    space = torch.zeros(vocab_size, dtype=torch.bool)
    boundary = torch.ones(vocab_size, dtype=torch.bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return base, space, boundary


def target_bytes(prev: Tensor, tgt: Tensor, luts) -> Tensor:
    """bytes(y) = base[y] + (leading_space[y] and not boundary[prev]), elementwise."""
    base, space, boundary = (t.to(tgt.device) for t in luts)
    return base[tgt] + (space[tgt] & ~boundary[prev]).to(base.dtype)


def resolve_data(args: Hyperparameters, log) -> bool:
    """Pick the dataset: FineWeb at DATA_PATH; the built-in sample with DATA_PATH=sample, or on a CPU when DATA_PATH is
    unset and FineWeb absent. A record run (CUDA) never falls back to the sample silently. True = sample."""
    cuda = args.preset == "record" or torch.cuda.is_available()
    if args.data_path != "sample" and ("DATA_PATH" in args.explicit or Path(args.data_path).is_dir() or cuda):
        if not Path(args.data_path).is_dir():
            raise UserError(f"DATA_PATH={args.data_path} does not exist (cwd {os.getcwd()}); fetch FineWeb (python data/cached_"
                            f"challenge_fineweb.py --train-shards 80), fix DATA_PATH, or set DATA_PATH=sample for the sample dataset")
        return False
    if not Path(SAMPLE_DATA_PATH).is_dir() or not Path(SAMPLE_TOKENIZER_PATH).is_file():
        log(f"data: FineWeb not found at {args.data_path}; building the sample dataset (data/build_sample_dataset.py)")
        if subprocess.run([sys.executable, str(ROOT / "data" / "build_sample_dataset.py")]).returncode:
            raise UserError("building the sample dataset failed (see above); run python data/build_sample_dataset.py")
    args.data_path = SAMPLE_DATA_PATH
    if "TOKENIZER_PATH" not in args.explicit:
        args.tokenizer_path = SAMPLE_TOKENIZER_PATH
    log(f"data: SAMPLE dataset in use ({SAMPLE_DATA_PATH}): built-in CPython text, not FineWeb; not record evidence")
    return True


# ----------------------------------------------------------------------------- model
try:  # FlashAttention-3 (Hopper); everything else uses PyTorch SDPA
    from flash_attn_interface import flash_attn_func as _fa3_func
except ImportError:
    _fa3_func = None


def attention_backend(device: torch.device, choice: str = "auto") -> str:
    """ATTENTION: auto = FlashAttention-3 on Hopper when it imports, else SDPA with PyTorch's own kernel choice;
    sdpa_<kernel> allows SDPA only that kernel (global switches, which torch.compile respects). Measured side by
    side by bench/attention_paths.py (bench/gpu_check.py's attention phase)."""
    if choice == "auto":
        hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
        return "fa3" if _fa3_func is not None and hopper else "sdpa"
    if choice == "fa3" and (_fa3_func is None or device.type != "cuda"):
        raise UserError("ATTENTION=fa3 needs CUDA and flash_attn_interface (FlashAttention-3); use ATTENTION=auto")
    if choice.startswith("sdpa_"):
        if device.type != "cuda":
            raise UserError(f"ATTENTION={choice} picks a CUDA kernel; on CPU use ATTENTION=auto")
        for kernel in ("flash", "cudnn", "mem_efficient", "math"):
            getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(choice == "sdpa_" + kernel.replace("mem_", ""))
    return choice


def rms_norm(x: Tensor) -> Tensor:
    """RMSNorm without weight: x / sqrt(mean(x^2) + eps)."""
    return F.rms_norm(x, (x.size(-1),))


def softcap(z: Tensor, cap: float) -> Tensor:
    return cap * torch.tanh(z / cap)


class Rotary(nn.Module):
    """Partial RoPE on the first `dims` channels of each head. For T > 1024 the base is NTK-scaled:
    base' = base * (T/1024)^(dims/(dims-2))."""

    def __init__(self, dims: int, base: float):
        super().__init__()
        self.dims, self.base = dims, base

    def forward(self, x: Tensor) -> Tensor:  # x [B, T, H, D]
        if self.dims == 0:
            return x
        T = x.size(1)
        base = self.base * (T / 1024) ** (self.dims / (self.dims - 2)) if T > 1024 else self.base
        inv_freq = base ** (-torch.arange(0, self.dims, 2, device=x.device, dtype=torch.float32) / self.dims)
        freqs = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos()[None, :, None, :].to(x.dtype), freqs.sin()[None, :, None, :].to(x.dtype)
        rot, keep = x[..., :self.dims], x[..., self.dims:]
        a, b = rot[..., : self.dims // 2], rot[..., self.dims // 2:]
        return torch.cat([a * cos + b * sin, b * cos - a * sin, keep], dim=-1)


class Attention(nn.Module):
    """GQA causal attention: QK-RMSNorm, partial RoPE, per-head q gain, optional value embedding added
    to V, optional XSA (remove from each head's output its component along its own normalized value)."""

    def __init__(self, a, xsa: bool):
        super().__init__()
        d, self.h, self.kv = a.model_dim, a.num_heads, a.num_kv_heads
        self.hd = d // self.h
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, self.kv * self.hd, bias=False)
        self.v = nn.Linear(d, self.kv * self.hd, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.q_gain = nn.Parameter(torch.ones(self.h))
        self.rotary = Rotary(a.rope_dims, a.rope_base)
        self.xsa, self.backend = xsa, "sdpa"

    def forward(self, x: Tensor, ve: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.hd)
        k = self.k(x).view(B, T, self.kv, self.hd)
        v = (self.v(x) if ve is None else self.v(x) + ve).view(B, T, self.kv, self.hd)
        q = self.rotary(rms_norm(q)) * self.q_gain.to(q.dtype)[None, None, :, None]
        k = self.rotary(rms_norm(k))
        q, k = q.to(v.dtype), k.to(v.dtype)  # rms_norm runs in fp32 under autocast; FA3 needs one dtype
        if self.backend == "fa3":
            y = _fa3_func(q, k, v, causal=True)
            y = y[0] if isinstance(y, tuple) else y
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=self.kv != self.h).transpose(1, 2)
        if self.xsa:
            vn = F.normalize(v, dim=-1).unsqueeze(3)  # [B, T, KV, 1, D]
            yg = y.reshape(B, T, self.kv, self.h // self.kv, self.hd)
            y = (yg - (yg * vn).sum(-1, keepdim=True) * vn).reshape(B, T, self.h, self.hd)
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    """down(leaky_relu(up(x), slope)^2)."""

    def __init__(self, a):
        super().__init__()
        self.up = nn.Linear(a.model_dim, a.mlp_mult * a.model_dim, bias=False)
        self.down = nn.Linear(a.mlp_mult * a.model_dim, a.model_dim, bias=False)
        self.slope = a.mlp_leaky_slope

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.leaky_relu(self.up(x), self.slope).square())


class Block(nn.Module):
    """x_in = m0*x + m1*x0;  x = x_in + a*Attn(norm(x_in)*s);  x = x + c*MLP(norm(x)*s),  s = 1/sqrt(i+1)."""

    def __init__(self, a, i: int):
        super().__init__()
        d = a.model_dim
        self.attn = Attention(a, xsa=i >= a.num_layers - a.xsa_last_n)
        self.mlp = MLP(a)
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.ln_scale = 1.0 / math.sqrt(i + 1)

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.ln_scale, ve)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.ln_scale)


class GPT(nn.Module):
    """Tied embedding + bigram-hash embedding -> RMSNorm -> SmearGate -> U-Net of blocks -> RMSNorm ->
    softcapped tied logits, plus MTP heads predicting tokens t+2.. t+1+mtp_heads (training only).
    Built from `arch` alone (the "arch" settings by env name, as the artifact stores them)."""

    def __init__(self, arch: dict, mtp_heads: int = 0, mtp_weight: float = 0.0):
        super().__init__()
        a = types.SimpleNamespace(**{k.lower(): v for k, v in arch.items()})
        d, V = a.model_dim, a.vocab_size
        self.softcap, self.mtp_weight = a.logit_softcap, mtp_weight
        self.tok_emb = nn.Embedding(V, d)
        self.bigram_buckets = a.bigram_vocab_size - 1  # the last bucket is position 0's
        self.bigram_embed = nn.Embedding(a.bigram_vocab_size, a.bigram_dim)
        self.bigram_proj = nn.Linear(a.bigram_dim, d, bias=False)
        self.bigram_scale = nn.Parameter(torch.tensor(0.05))
        self.smear_gate = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(Block(a, i) for i in range(a.num_layers))
        self.num_enc = a.num_layers // 2
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_enc, a.num_layers - self.num_enc), d))
        self.ve_layers = layer_ids(a.ve_layers)
        if self.ve_layers:
            kv_dim = a.num_kv_heads * (d // a.num_heads)
            self.ve_embed = nn.Embedding(V, a.ve_dim)
            self.ve_proj = nn.Linear(a.ve_dim, kv_dim, bias=False)
            self.ve_scale = nn.Parameter(torch.tensor(0.1))
            self.ve_layer_scales = nn.Parameter(torch.ones(len(self.ve_layers)))
        self.mtp_heads = nn.ModuleList(nn.Linear(d, V, bias=False) for _ in range(mtp_heads))

    @torch.no_grad()
    def init_weights(self, embed_std: float, qk_gain: float) -> GPT:
        """Training's init: N(0, embed_std) tied embedding, orthogonal Q/K/V/MLP-up, zero output projections,
        bigram and value-embedding projections and MTP heads, q gain qk_gain."""
        nn.init.normal_(self.tok_emb.weight, std=embed_std)
        nn.init.zeros_(self.bigram_embed.weight)
        nn.init.zeros_(self.bigram_proj.weight)
        for b in self.blocks:
            for lin in (b.attn.q, b.attn.k, b.attn.v, b.mlp.up):
                nn.init.orthogonal_(lin.weight)
            nn.init.zeros_(b.attn.proj.weight)
            nn.init.zeros_(b.mlp.down.weight)
            b.attn.q_gain.fill_(qk_gain)
        if self.ve_layers:
            nn.init.normal_(self.ve_embed.weight, std=0.01)
            nn.init.zeros_(self.ve_proj.weight)
        for head in self.mtp_heads:
            nn.init.zeros_(head.weight)
        return self

    def set_attention_backend(self, backend: str):
        for b in self.blocks:
            b.attn.backend = backend

    def bigram_ids(self, idx: Tensor) -> Tensor:
        """h = (36313*cur XOR 27191*prev) mod (buckets-1); position 0 gets the last bucket."""
        h = torch.bitwise_xor(36313 * idx[:, 1:], 27191 * idx[:, :-1]) % self.bigram_buckets
        return torch.cat([torch.full_like(idx[:, :1], self.bigram_buckets), h], dim=1)

    def hidden(self, idx: Tensor) -> Tensor:
        """The one forward trunk: token ids [B, T] -> final normalized hidden states [B, T, D]."""
        x = self.tok_emb(idx) + self.bigram_scale * self.bigram_proj(self.bigram_embed(self.bigram_ids(idx)))
        x = rms_norm(x)
        g = torch.sigmoid(self.smear_gate).to(x.dtype)
        x = (1 - g) * x + g * F.pad(x[:, :-1], (0, 0, 1, 0))
        x0, skips = x, []
        ve = self.ve_scale * self.ve_proj(self.ve_embed(idx)) if self.ve_layers else None
        for i, block in enumerate(self.blocks):
            if i >= self.num_enc and skips:
                x = x + self.skip_weights[i - self.num_enc].to(x.dtype) * skips.pop()
            v = ve * self.ve_layer_scales[self.ve_layers.index(i)] if i in self.ve_layers else None
            x = block(x, x0, v)
            if i < self.num_enc:
                skips.append(x)
        return rms_norm(x)

    def logits(self, h: Tensor) -> Tensor:
        return softcap(F.linear(h, self.tok_emb.weight.to(h.dtype)), self.softcap).float()

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Training loss: CE(next token) + MTP_LOSS_WEIGHT * mean_k CE(head k predicts token t+1+k)."""
        h = self.hidden(idx)
        V = self.tok_emb.weight.size(0)
        loss = F.cross_entropy(self.logits(h).view(-1, V), targets.reshape(-1))
        if self.mtp_heads and self.training and self.mtp_weight > 0:
            T = idx.size(1)
            mtp = [F.cross_entropy(softcap(head(h[:, :T - k]), self.softcap).float().reshape(-1, V),
                                   targets[:, k:].reshape(-1)) for k, head in enumerate(self.mtp_heads, start=1)]
            loss = loss + self.mtp_weight * torch.stack(mtp).mean()
        return loss

    @torch.no_grad()
    def target_stats(self, idx: Tensor, targets: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        """For positions start..T-1: log p(target) and the entropy H (nats) of the network's distribution."""
        logp = torch.log_softmax(self.logits(self.hidden(idx)[:, start:]), dim=-1)
        return logp.gather(-1, targets[:, start:].unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def build_model(args: Hyperparameters) -> GPT:
    """The training model: the architecture of `args`, its MTP heads, initialized."""
    model = GPT(args.arch(), args.mtp_num_heads, args.mtp_loss_weight)
    return model.init_weights(args.tied_embed_init_std, args.qk_gain_init)


def count_params(model: GPT) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.mtp_heads.parameters())


# ----------------------------------------------------------------------------- optimizer
def newton_schulz5(G: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Orthogonalize a batch of matrices: X0 = G/||G||_F, then X <- aX + (bA + cA^2)X with A = XX^T,
    (a, b, c) = (3.4445, -4.7750, 2.0315), which drives every singular value towards ~1 (UV^T of G)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


class Muon:
    """Muon for matrices, in the parallel form: same-shape matrices are stacked and their gradients
    reduce-scattered, so each rank keeps momentum for and orthogonalizes only its shard; the new weights
    are all-gathered. Update per matrix: m <- mu*m + g;  u = NS5(g + mu*m) * sqrt(max(1, rows/cols));
    W <- W*(1 - lr*wd) - lr*u. With one rank this is plain Muon; with W ranks it is the same math."""

    def __init__(self, params: list[nn.Parameter], lr: float, weight_decay: float, backend_steps: int,
                 rank: int = 0, world_size: int = 1):
        self.lr, self.wd, self.steps, self.rank, self.world = lr, weight_decay, backend_steps, rank, world_size
        groups: dict[tuple, list] = {}
        for p in params:
            groups.setdefault(tuple(p.shape), []).append(p)
        self.groups = list(groups.values())
        self.momentum = [torch.zeros(math.ceil(len(ps) / world_size), *ps[0].shape, device=ps[0].device,
                                     dtype=torch.float32) for ps in self.groups]  # this rank's shard of each group
        self.shard_grads: list[Tensor] = []

    def _stack(self, ps: list[Tensor], shard: int) -> Tensor:
        pad = shard * self.world - len(ps)
        return torch.stack([t.float() for t in ps] + [torch.zeros_like(ps[0], dtype=torch.float32)] * pad)

    def reduce_grads(self) -> Tensor:
        """Average gradients across ranks, keeping this rank's shard. Returns the shard's squared norm."""
        self.shard_grads, sq = [], torch.zeros((), device=self.momentum[0].device)
        for ps, buf in zip(self.groups, self.momentum):
            full = self._stack([p.grad for p in ps], buf.size(0))
            if self.world > 1:
                mine = torch.empty_like(buf)
                dist.reduce_scatter_tensor(mine, full)
                mine /= self.world
            else:
                mine = full
            self.shard_grads.append(mine)
            sq = sq + mine.square().sum()
        return sq

    @torch.no_grad()
    def step(self, lr_mul: float, momentum: float, grad_scale: Tensor | float = 1.0):
        lr = self.lr * lr_mul
        for ps, buf, g in zip(self.groups, self.momentum, self.shard_grads):
            g = g * grad_scale
            buf.mul_(momentum).add_(g)
            u = newton_schulz5(g.add(buf, alpha=momentum), self.steps).float()
            u *= max(1.0, ps[0].size(0) / ps[0].size(1)) ** 0.5
            lo = self.rank * buf.size(0)
            weights = self._stack([p.data for p in ps], buf.size(0))[lo:lo + buf.size(0)]
            new = weights * (1 - lr * self.wd) - lr * u
            if self.world > 1:
                full = torch.empty(buf.size(0) * self.world, *new.shape[1:], device=new.device, dtype=new.dtype)
                dist.all_gather_into_tensor(full, new.contiguous())
                new = full
            for i, p in enumerate(ps):
                p.data.copy_(new[i])


def split_params(model: GPT) -> tuple[list, list, list]:
    """Muon: every Linear weight. AdamW: embeddings (TIED_EMBED_LR) and scalar/control tensors (SCALAR_LR)."""
    matrices = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    taken = {id(p) for p in matrices + embeddings}
    scalars = [p for p in model.parameters() if id(p) not in taken]
    return matrices, embeddings, scalars


def all_reduce_sum(tensors: list[Tensor], scale: float = 1.0):
    """tensors <- scale * (their sum across ranks), in place, in one flat collective."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip((flat * scale).split([t.numel() for t in tensors]), tensors)])


class Optimizers:
    """Muon + AdamW with the record's schedule hooks, global grad-norm clipping and gradient averaging."""

    def __init__(self, model: GPT, args: Hyperparameters, rank: int, world_size: int):
        matrices, embeddings, scalars = split_params(model)
        self.args, self.world = args, world_size
        self.muon = Muon(matrices, args.matrix_lr, args.muon_wd, args.muon_backend_steps, rank, world_size)
        fused = {"fused": True} if matrices[0].is_cuda else {}
        self.adam = torch.optim.AdamW(
            [{"params": embeddings, "lr": args.tied_embed_lr, "base_lr": args.tied_embed_lr},
             {"params": scalars, "lr": args.scalar_lr, "base_lr": args.scalar_lr}],
            betas=(args.beta1, args.beta2), eps=args.adam_eps, weight_decay=args.adam_wd, **fused)
        self.adam_params = embeddings + scalars
        self.params = list(model.parameters())
        for p in self.params:  # dense zero grads from the start: every rank reduces the same tensors
            p.grad = torch.zeros_like(p)

    def step(self, step: int, lr_mul: float):
        a = self.args
        grads = [p.grad for p in self.adam_params]
        if self.world > 1:
            all_reduce_sum(grads, 1 / self.world)
        sq = self.muon.reduce_grads()
        if self.world > 1:
            dist.all_reduce(sq)
        sq = sq + sum(g.float().square().sum() for g in grads)
        scale = torch.ones((), device=sq.device)
        if a.grad_clip_norm > 0:  # kept on the device: no host sync
            scale = (a.grad_clip_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, scale)
        frac = min(step / a.muon_momentum_warmup_steps, 1.0) if a.muon_momentum_warmup_steps else 1.0
        momentum = (1 - frac) * a.muon_momentum_warmup_start + frac * a.muon_momentum
        self.muon.step(lr_mul, momentum, scale)
        for group in self.adam.param_groups:
            group["lr"] = group["base_lr"] * lr_mul
        self.adam.step()

    def zero_grad(self):
        for p in self.params:
            p.grad.zero_()


# ----------------------------------------------------------------------------- training
class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: stop, keep the log, write nothing half-done."""


class TrainingDiverged(Exception):
    """The training loss became NaN/inf: no artifact is written from a broken model."""


class Logger:
    """Rank 0 prints and appends to logs/<RUN_ID>.txt, flushed line by line; other ranks stay quiet."""

    def __init__(self, path: Path | None):
        self.path, self.file = path, None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)

    def __call__(self, msg: str):
        if self.file is not None:
            print(msg, flush=True)
            self.file.write(msg + "\n")  # line-buffered: on disk as it goes


class Progress:
    """Prints `progress phase:... done/total rate eta` at most every `every` seconds (never floods)."""

    def __init__(self, log, phase: str, total: int, unit: str, every: float = 30.0):
        self.log, self.phase, self.total, self.unit, self.every = log, phase, total, unit, every
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int):
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        rate, self.last = done / max(now - self.t0, 1e-9), now
        self.log(f"progress phase:{self.phase} {self.unit}:{done}/{self.total} rate:{rate:.1f}/s "
                 f"eta:{(self.total - done) / max(rate, 1e-9):.0f}s")


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def make_stats_fn(model: GPT, args: Hyperparameters):
    """target_stats, compiled once per input shape (static: batches are padded to few shapes)."""
    return torch.compile(model.target_stats, dynamic=False) if args.compile else model.target_stats


def lr_multiplier(args: Hyperparameters, step: int, elapsed_ms: float, cap_s: float) -> float:
    """1, then linear warmdown to 0 over the last WARMDOWN_ITERS steps: by step count against ITERATIONS,
    and by wallclock (WARMDOWN_ITERS * mean step time before the training cap cap_s, 0: none); the smaller wins."""
    if args.warmdown_iters <= 0:
        return 1.0
    mul = min(max((args.iterations - step) / args.warmdown_iters, 0.0), 1.0)
    if cap_s > 0 and step > 0:
        warmdown_ms = args.warmdown_iters * elapsed_ms / step
        remaining_ms = max(1000 * cap_s - elapsed_ms, 0.0)
        mul = min(mul, remaining_ms / max(warmdown_ms, 1e-9))
    return mul


def eval_val(stats_fn, tokens: Tensor, luts, seq_len: int, batch_tokens: int, ctx) -> tuple[float, float]:
    """Loss and BPB on non-overlapping seq_len windows of the stream (sharded across ranks, summed); every batch has
    one shape (a short one is padded with rows that count nothing)."""
    n_seqs = (tokens.numel() - 1) // seq_len
    lo, hi = n_seqs * ctx.rank // ctx.world, n_seqs * (ctx.rank + 1) // ctx.world
    per_batch = max(batch_tokens // (seq_len * ctx.world), 1)
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # nll, tokens, bytes
    with torch.no_grad():
        for s in range(lo, hi, per_batch):
            e = min(s + per_batch, hi)
            chunk = tokens[s * seq_len:e * seq_len + 1].to(ctx.device, torch.int64)
            x, y = chunk[:-1].view(-1, seq_len), chunk[1:].view(-1, seq_len)
            with autocast(ctx.device):
                logp = stats_fn(*(F.pad(t, (0, 0, 0, per_batch - (e - s))) for t in (x, y)), 0)[0][:e - s]
            sums += torch.stack([-logp.double().sum(), torch.tensor(y.numel(), device=ctx.device, dtype=torch.float64),
                                 target_bytes(x, y, luts).double().sum()])
    if ctx.world > 1:
        dist.all_reduce(sums)
    loss = (sums[0] / sums[1]).item()
    return loss, (sums[0] / math.log(2) / sums[2]).item()


def train(args: Hyperparameters, model: GPT, val_tokens: Tensor, luts, ctx, log) -> tuple[int, TokenStream, float]:
    """The training loop: (steps taken, the training stream, whose next tokens calibrate the export, training seconds
    on the clock); leaves the EMA in `model`."""
    grad_accum = 8 // ctx.world
    train_pattern = os.path.join(args.data_path, "fineweb_train_*.bin")
    if args.rate_control and args.max_wallclock_seconds > 0 and "GPTQ_RESERVE_SECONDS" not in args.explicit:
        shapes = [t.shape for n, t in model.state_dict().items() if t.ndim == 2 and not n.startswith("mtp_heads.")]
        need = ctx.broadcast(ac.RESERVE_MARGIN * ac.candidates_seconds(shapes, ctx.device, args.quant == "gptq", args.gptq_damp, args.gptq_block))
        if need > args.gptq_reserve_seconds:  # this machine's candidates would overrun the reserve: raise it
            log(f"gptq_reserve: candidates timed at {need / ac.RESERVE_MARGIN:.1f}s (one matrix a shape) x{ac.RESERVE_MARGIN}: "
                f"GPTQ_RESERVE_SECONDS {args.gptq_reserve_seconds} -> {need:.1f}")
            args.gptq_reserve_seconds = need
        if need >= args.max_wallclock_seconds:
            raise UserError(f"the export's candidates need ~{need:.0f}s here, MAX_WALLCLOCK_SECONDS={args.max_wallclock_seconds:g} "
                            f"leaves no training: raise it, or RATE_CONTROL=0 for the uniform export")
    compiled = torch.compile(model) if args.compile else model
    stats_fn = make_stats_fn(model, args)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def one_step(opt, loader, step, lr_mul) -> float:
        loss_sum = torch.zeros((), device=ctx.device)
        for _ in range(grad_accum):
            x, y = loader.next_batch(args.train_batch_tokens, args.train_seq_len, grad_accum)
            with autocast(ctx.device):
                loss = compiled(x, y)
            (loss / grad_accum).backward()
            loss_sum += loss.detach() / grad_accum
        if ctx.world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= ctx.world
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):  # stop before the broken gradients touch the weights
            raise TrainingDiverged(f"train_loss is {loss_value} at step {step + 1}")
        opt.step(step, lr_mul)
        opt.zero_grad()
        return loss_value

    if args.warmup_steps:  # compile and warm the kernels, then reset weights, optimizer and data
        opt = Optimizers(model, args, ctx.rank, ctx.world)
        loader = DistributedTokenLoader(train_pattern, args.vocab_size, ctx.rank, ctx.world, ctx.device)
        for ws in range(args.warmup_steps):
            one_step(opt, loader, ws, 1.0)
            if ws + 1 == args.warmup_steps or (ws + 1) % 10 == 0:
                log(f"warmup_step:{ws + 1}/{args.warmup_steps}")
        model.load_state_dict(initial)
    opt = Optimizers(model, args, ctx.rank, ctx.world)
    loader = DistributedTokenLoader(train_pattern, args.vocab_size, ctx.rank, ctx.world, ctx.device)
    ema = [p.detach().float().clone() for p in model.parameters()]
    params = list(model.parameters())
    train_ms, step, stop_after, last_loss = 0.0, 0, None, float("nan")
    cap_s = args.max_wallclock_seconds - args.gptq_reserve_seconds * (args.calibrates and args.max_wallclock_seconds > 0)
    if cap_s != args.max_wallclock_seconds:
        log(f"gptq_reserve:{args.gptq_reserve_seconds}s training_cap:{cap_s}s (kept from MAX_WALLCLOCK_SECONDS for GPTQ)")
    progress = Progress(log, "train", args.iterations, "steps", every=60.0)
    ctx.sync()
    t0 = time.perf_counter()
    while True:
        last = step == args.iterations or (stop_after is not None and step >= stop_after)
        if last or (args.val_loss_every and step % args.val_loss_every == 0):
            ctx.sync()
            train_ms += 1000 * (time.perf_counter() - t0)
            val_loss, val_bpb = eval_val(stats_fn, val_tokens, luts, args.train_seq_len, args.val_batch_size, ctx)
            log(f"step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
            ctx.sync()
            t0 = time.perf_counter()
        if last:
            break
        began = train_ms + 1000 * (time.perf_counter() - t0)
        try:
            last_loss = one_step(opt, loader, step, lr_multiplier(args, step, began, cap_s))
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}; last good step {step} train_loss:{last_loss:.4f}") from None
        torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - args.ema_decay)
        step += 1
        elapsed = train_ms + 1000 * (time.perf_counter() - t0)
        if step <= 10 or step % args.train_log_every == 0:
            log(f"step:{step}/{args.iterations} train_loss:{last_loss:.4f} train_time:{elapsed:.0f}ms "
                f"step_avg:{elapsed / step:.2f}ms")
        progress.update(step)
        if cap_s > 0 and stop_after is None:  # no step may end past the cap: stop if one more at this pace would
            hit = torch.tensor(float(2 * elapsed - began >= 1000 * cap_s), device=ctx.device)
            if ctx.world > 1:
                dist.all_reduce(hit, op=dist.ReduceOp.MAX)
            if hit.item():
                stop_after = step
                log(f"stopping_early: wallclock_cap train_time:{elapsed:.0f}ms step:{step}/{args.iterations} "
                    f"next_step_end:{2 * elapsed - began:.0f}ms cap:{1000 * cap_s:.0f}ms")
    if ctx.device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e.to(p.dtype))
    log(f"ema:applied decay:{args.ema_decay}")
    return step, loader.stream, train_ms / 1000


# ----------------------------------------------------------------------------- export
# Calibration and GPTQ read training data: they run inside the training clock (GPTQ_RESERVE_SECONDS). The encoding and
# the size search (artifact_codec.py) run alike on every rank, so no rank waits in a collective on them; rank 0 writes.
LIMIT_BYTES = 16_000_000
CALIB_SLICES = 8  # world sizes 1, 2, 4 and 8 all own whole slices: the sums add up in one order at every size


def collect_stats(model: GPT, tokens: Tensor, seq_len: int, ctx, fisher: bool) -> dict[str, dict]:
    """Calibration statistics of every matrix the artifact stores, over `tokens` cut into CALIB_SLICES slices of whole
    sequences: "H" = X^T X (float64) of a linear layer's input X (q, k and v read one X: q's H serves all three; the
    tied head's X is the final hidden state); with `fisher` the squared gradients of the summed next-token loss too:
    "g" per output channel of a linear layer (the tied head: per logit), "F" per entry of an embedding table (summed
    over the positions that read its row); "n" positions. Rank r runs its contiguous block of slices, one forward (and
    backward) call each; an all-reduce gathers the slices (one non-zero term per slot: exact); one fixed tree adds them."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and not n.startswith("mtp_heads.")}
    sums, slot, outs, kv = {}, [0], [], r"\.attn\.[kv]$"

    def acc(key: tuple, shape) -> Tensor:  # the running slice's sum of `key`
        return sums.setdefault(key, torch.zeros(CALIB_SLICES, *shape, dtype=torch.float64, device=ctx.device))[slot[0]]

    def seen(n: str, linear: bool, x: Tensor, out: Tensor, shape):  # hooks return None: a value would replace the output/grad
        def grad(g: Tensor):
            g2 = g.flatten(0, -2).double().square()
            acc((n, "g"), g2.shape[1:]).add_(g2.sum(0)) if linear else acc((n, "F"), shape).index_add_(0, x.flatten(), g2)
        if linear and not re.search(kv, n):
            acc((n, "H"), (x.size(-1),) * 2).addmm_((x2 := x.detach().flatten(0, -2).double()).T, x2)
        if fisher:
            outs.append(out)
            out.register_hook(grad)
    hooks = [m.register_forward_hook(lambda m, inp, out, n=n: seen(n, isinstance(m, nn.Linear), inp[0], out, m.weight.shape))
             for n, m in mods.items()]
    with torch.set_grad_enabled(fisher), autocast(ctx.device):
        for slot[0] in range(CALIB_SLICES * ctx.rank // ctx.world, CALIB_SLICES * (ctx.rank + 1) // ctx.world):
            x = tokens.view(CALIB_SLICES, -1, seq_len)[slot[0]].to(ctx.device, torch.int64)
            h = model.hidden(x)
            if fisher:  # the tied head by hand (no module computes the logits): positions 0..T-2 predict tokens 1..T-1
                seen("tok_emb", True, h[:, :-1], z := F.linear(h[:, :-1], model.tok_emb.weight.to(h.dtype)), None)
                loss = F.cross_entropy(softcap(z, model.softcap).float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
                torch.autograd.grad(loss, outs, allow_unused=True)
                outs.clear()
    for h in hooks:
        h.remove()
    stats = {n + ".weight": {"n": tokens.numel()} for n in mods}
    for (n, key), s in sums.items():
        if ctx.world > 1:
            dist.all_reduce(s)
        stats[n + ".weight"][key] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))  # one order at every world size
    for n in [n for n in mods if re.search(kv, n)]:
        stats[n + ".weight"]["H"] = stats[n[:-1] + "q.weight"]["H"]
    return stats


def load_artifact(path: str) -> tuple[dict, dict]:
    """(meta, float state dict) from an artifact file; every way it can be wrong is a UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"artifact {path} not found; set ARTIFACT to a .ptz written by a training run")
    raw = p.read_bytes()
    old = {b"\xfd7zXZ\x00": "pgolf-int6-lzma-v1 (torch.save + LZMA)", b"PGOLFv": "pgolf-int6-v2 (two streams)"}
    if raw[:6] in old and raw[:8] != ac.ARTIFACT_MAGIC:  # how the older formats began
        raise UserError(f"artifact {path} is in the older format {old[raw[:6]]} (or corrupt), which this code does not read; "
                        f"re-export it: train again with this train_gpt.py")
    try:
        meta, qstate = ac.read_artifact(raw)
    except ac.ArtifactError as e:
        raise UserError(f"artifact {path} is truncated or corrupt, or not a {ac.ARTIFACT_FORMAT} artifact ({e}); "
                        f"re-export it from a training run") from None
    return meta, ac.dequantize_state(qstate)


def export(model: GPT, args: Hyperparameters, stream: TokenStream, ctx, log, run_id: str, n_code: int, train_s: float) -> tuple[str, str]:
    """Calibrate on the training stream's next GPTQ_CALIB_TOKENS tokens and quantize, inside the training clock; then
    encode so that artifact + code fill TARGET_BYTES: RATE_CONTROL=1 picks every matrix's encoding by rate and loss,
    RATE_CONTROL=0 quantizes uniformly and zeroes at most FIT_MAX_FRACTION of the int6 values. Returns the path written
    and, when nothing fits, the over_cap line (the smallest encoding is then kept as .OVER_CAP.ptz)."""
    t0, stats, path = time.perf_counter(), None, f"artifacts/{run_id}.ptz"
    if args.calibrates:
        stats = collect_stats(model, stream.take(args.gptq_calib_tokens), args.train_seq_len, ctx, bool(args.rate_control))
    t1, state = time.perf_counter(), {n: t.detach() for n, t in model.state_dict().items() if not n.startswith("mtp_heads.")}
    if args.rate_control:  # the candidates of every weight matrix (GPTQ in the loop); the rest fp32
        cands = {n: ac.candidates(t, stats[n], args.quant == "gptq", args.gptq_damp, args.gptq_block) for n, t in state.items() if n in stats}
        qstate = {n: {"kind": "q", "q": cands[n]["q"][0]} if n in cands else {"kind": "float", "value": t.float().cpu()} for n, t in state.items()}
    else:
        qstate = ac.quantize_state(state, stats, args.gptq_damp, args.gptq_block, args.quant_bits)
    t2, cap = time.perf_counter(), args.max_wallclock_seconds
    log(f"training_clock train:{train_s:.1f}s calibration:{t1 - t0:.1f}s quantize:{t2 - t1:.1f}s total:{train_s + t2 - t0:.1f}s "
        f"max_wallclock:{cap:.0f}s reserve:{args.gptq_reserve_seconds:.1f}s calibration_tokens:{args.gptq_calib_tokens * bool(stats)} "
        f"quant:{args.quant} rate_control:{args.rate_control}")
    if cap > 0 and stats is not None and t2 - t0 > args.gptq_reserve_seconds:
        log(f"WARNING: calibration+quantization took {t2 - t0:.1f}s, over GPTQ_RESERVE_SECONDS={args.gptq_reserve_seconds} by "
            f"{t2 - t0 - args.gptq_reserve_seconds:.1f}s (training clock {train_s + t2 - t0:.1f}s of {cap:.0f}s): "
            f"GPTQ_RESERVE_SECONDS={math.ceil(t2 - t0)} would have fit")
    rest, workers = ac.rest_stream(qstate, args.meta()), max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    fixed = len(ac.assemble(rest, [])) + n_code  # all but the matrices' streams
    if args.rate_control:
        choice, streams, total, over = ac.rate_control(cands, fixed, args.target_bytes, workers, log)
        qstate.update({n: ac.entry(cands[n], c) for n, c in choice.items()})
    else:
        streams, total, over = ac.fit_uniform(qstate, stats, fixed, args.target_bytes, args.fit_max_fraction, workers, log)
    if over:
        path = f"artifacts/{run_id}.OVER_CAP.ptz"
        log(over := f"over_cap: total {total} bytes exceeds TARGET_BYTES={args.target_bytes} by {total - args.target_bytes} "
            f"({over}): NOT a valid submission, kept as {path}; shrink MLP_MULT, BIGRAM_VOCAB_SIZE, NUM_LAYERS or MODEL_DIM")
    if ctx.rank == 0:
        write_atomic(path, blob := ac.assemble(rest, [streams[n] for n, e in qstate.items() if e["kind"] != "float"]))
        log(f"serialized_model_int6_lzma:{len(blob)} bytes path:{path} export_time:{time.perf_counter() - t0:.1f}s "
            f"calibration:{t1 - t0:.2f}s quantize:{t2 - t1:.2f}s search:{time.perf_counter() - t2:.2f}s")
    return ctx.broadcast((path, over))


def adopt_artifact_arch(args: Hyperparameters, meta: dict, path: str):
    """EVAL_ONLY builds the artifact's architecture; an explicitly set env var that contradicts it is an error."""
    clash = [f"{k}={getattr(args, k.lower())!r} (artifact: {v!r})" for k, v in meta["arch"].items()
             if k in args.explicit and getattr(args, k.lower()) != v]
    if clash:
        raise UserError(f"artifact {path} is from a different config: {', '.join(clash)}; unset or match these")
    for k, v in meta["arch"].items():
        setattr(args, k.lower(), v)
    mixer_settings(args)  # the mixer's limits depend on the vocabulary


def build_eval_model(arch: dict, state: dict, path: str, device) -> GPT:
    """The artifact's weights in a model of the artifact's architecture, without MTP heads (not exported)."""
    model = GPT(arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"artifact {path} does not fit this model ({first[:200]}); use the training run's settings") from None
    return model.to(device)


def code_files() -> list[str]:
    """The run's code: every file beside train_gpt.py that this process imported (train_gpt.py first)."""
    files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]  # some are relative (torch._classes)
    loaded = {Path(f).resolve() for f in files if isinstance(f, str) and os.path.isabs(f)}
    return sorted((p.name for p in loaded if p.parent == ROOT), key=lambda name: (name != "train_gpt.py", name))


def pack_code(files: list[str], root: Path = ROOT) -> bytes:
    """The self-extracting train_gpt.py a record ships and the run counts (the same files, the same bytes): see stub."""
    blob = lzma.compress(json.dumps({f: (root / f).read_bytes().decode() for f in files}).encode(), preset=9)
    stub = ('import base64,hashlib,json,lzma,os,runpy,sys,tempfile\nb=lzma.decompress(base64.b85decode("B85"))\n'
            'd=os.path.join(tempfile.gettempdir(),"pgolf_code_"+hashlib.sha256(b).hexdigest()[:16])\nos.makedirs(d,exist_ok=True)\n'
            'for n,s in json.loads(b).items():\n t=os.path.join(d,f".{n}.{os.getpid()}")\n open(t,"wb").write(s.encode())\n'
            ' os.replace(t,os.path.join(d,n))\nsys.argv[0]=os.path.join(d,"train_gpt.py")\nrunpy.run_path(sys.argv[0],run_name="__main__")\n')
    return stub.replace("B85", base64.b85encode(blob).decode(), 1).encode()


def code_bytes() -> tuple[int, int, str]:
    sizes = {f: (ROOT / f).stat().st_size for f in code_files()}  # (packed bytes, raw bytes, "file=raw bytes,...")
    return len(pack_code(list(sizes))), sum(sizes.values()), ",".join(f"{f}={n}" for f, n in sizes.items())


# ----------------------------------------------------------------------------- evaluation
def sliding_windows(n_targets: int, seq_len: int, stride: int) -> list[int]:
    """Window starts. Window 0 scores targets [0, L); window k >= 1 starts at k*stride and scores its last
    `stride` targets [L + (k-1)*stride, L + k*stride). Together they score each of the n targets once."""
    return [0] + [ws for ws in range(stride, max(n_targets - seq_len + stride, stride), stride)]


def rank_span(starts: list[int], rank: int, world: int, L: int, S: int, N: int) -> tuple[list[int], int, int]:
    """Rank r's share of the sliding windows (a contiguous run of starts) and the target span [lo, hi) those
    windows score: window 0 scores from target 0, a later window ws from ws + L - S, up to ws + L."""
    mine = starts[len(starts) * rank // world: len(starts) * (rank + 1) // world]
    if not mine:
        return mine, N, N
    return mine, (0 if mine[0] == 0 else min(mine[0] + L - S, N)), min(mine[-1] + L, N)


def eval_sliding(stats_fn, tokens: Tensor, args: Hyperparameters, ctx, log, adapt=None) -> tuple[Tensor, Tensor]:
    """Neural pass: per target position of the stream, log p(y) and the entropy H, from windows of
    EVAL_SEQ_LEN every EVAL_STRIDE (batches of EVAL_BATCH_SEQS), windows sharded across ranks, gathered. A short batch
    is padded with copies of its last window (their scores dropped): the stats see two shapes, window 0's batch
    (scored from position 0) and every other. With `adapt` (TTT) the windows are cut in order into chunks of
    TTT_CHUNK_TOKENS/EVAL_STRIDE: a chunk is scored with the current weights, then adapt(lo, hi, left) trains on the
    targets [lo, hi) it scored (left: the seconds the scoring still to do should take; not after the last chunk)."""
    L, S, N, B = args.eval_seq_len, args.eval_stride, tokens.numel() - 1, args.eval_batch_seqs
    starts = sliding_windows(N, L, S)
    per = args.ttt_chunk_tokens // S if adapt else len(starts)
    padded = torch.cat([tokens.to(ctx.device, torch.int64), torch.zeros(L, dtype=torch.int64, device=ctx.device)])
    progress = Progress(log, "sliding_eval" + ("+ttt" if adapt else ""), len(starts), "windows")
    offsets, rows, parts, t_score = torch.arange(L, device=ctx.device), torch.arange(B, device=ctx.device)[:, None], [], 0.0
    for c in range(0, len(starts), per):
        t0, chunk = time.perf_counter(), starts[c:c + per]
        mine, lo, hi = rank_span(chunk, ctx.rank, ctx.world, L, S, N)
        out = torch.zeros(2, hi - lo, dtype=torch.float32, device=ctx.device)
        for i in range(0, len(mine), B):
            part = mine[i:i + B]
            ws = torch.tensor(part + part[-1:] * (B - len(part)), device=ctx.device)
            idx = ws[:, None] + offsets[None]
            start = 0 if part[0] == 0 else L - S
            with torch.no_grad(), autocast(ctx.device):
                logp, ent = stats_fn(padded[idx], padded[idx + 1], start)
            pos = idx[:, start:]
            keep = (pos < N) & ((pos - ws[:, None] >= L - S) | (ws[:, None] == 0)) & (rows < len(part))
            out[0, pos[keep] - lo], out[1, pos[keep] - lo] = logp.float()[keep], ent.float()[keep]
            progress.update(c + min(len(chunk), (i + len(part)) * ctx.world))
        if ctx.world > 1:
            bounds = [rank_span(chunk, r, ctx.world, L, S, N)[1:] for r in range(ctx.world)]
            width = max(b - a for a, b in bounds)
            buf = torch.zeros(ctx.world * 2 * width, device=ctx.device)
            dist.all_gather_into_tensor(buf, F.pad(out, (0, width - out.size(1))).flatten())
            out = torch.cat([buf.view(ctx.world, 2, width)[r, :, :b - a] for r, (a, b) in enumerate(bounds)], dim=1)
        parts.append(out)
        if adapt and c + per < len(starts):
            ctx.sync()  # (queued work finished: the time is the scoring's)
            t_score += time.perf_counter() - t0
            adapt(*rank_span(chunk, 0, 1, L, S, N)[1:], t_score * (len(starts) - c - per) / (c + per))
    return tuple(torch.cat(parts, dim=1).cpu())


class TestTimeTrainer:
    """Score-first TTT: a call (lo, hi, left) trains on targets already scored. Sequences of L = EVAL_SEQ_LEN tokens end
    at hi, hi - L, ... until they cover [lo, hi) (the first may reach back into earlier scored tokens, never past hi);
    TTT_EPOCHS passes in order, TTT_BATCH_SEQS a step, R = ceil(TTT_BATCH_SEQS / world) rows on every rank, a step's
    short end padded with rows whose targets are ignored (no loss, no gradient): every rank runs the same steps in one
    shape. The gradients of the step's summed CE / its real targets are summed across ranks (same weights everywhere).
    Parameters whose names match TTT_PARAMS adapt, by SGD (momentum 0.9) or AdamW (betas 0.9/0.999, no decay),
    gradient norm clipped at TTT_GRAD_CLIP. The clock: with EVAL_BUDGET_SECONDS, a call first projects the evaluation's
    end, seconds since t_start + the last call's training + left (the scoring still to do) + reserve (the mixer's);
    once the latest rank's projection passes the budget, no call trains any more."""

    def __init__(self, model: GPT, tokens: Tensor, args: Hyperparameters, ctx, log, t_start: float, reserve: float = 0.0):
        self.args, self.ctx, self.log, self.model, self.tokens = args, ctx, log, model, tokens.to(ctx.device, torch.int64)
        self.t_start, self.reserve, self.seconds, self.last, self.steps, self.chunks = t_start, reserve, 0.0, 0.0, 0, 0
        self.stopped = False
        named = [(n, p.requires_grad_(bool(re.search(args.ttt_params, n)))) for n, p in model.named_parameters()]
        self.params = [p for _, p in named if p.requires_grad]
        for p in self.params:  # dense zero grads from the start: every rank all-reduces the same list
            p.grad = torch.zeros_like(p)
        self.opt = (torch.optim.SGD(self.params, lr=args.ttt_lr, momentum=0.9) if args.ttt_optimizer == "sgd"
                    else torch.optim.AdamW(self.params, lr=args.ttt_lr, betas=(0.9, 0.999), weight_decay=0.0))
        self.loss_fn = torch.compile(self.loss, dynamic=False) if args.compile else self.loss

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The rows' summed next-token CE; targets -100 (padding) count nothing."""
        return F.cross_entropy(self.model.logits(self.model.hidden(x)).flatten(0, 1), y.flatten(), reduction="sum")

    def __call__(self, lo: int, hi: int, left: float = 0.0):
        a, world, dev = self.args, self.ctx.world, self.ctx.device
        T, budget = a.eval_seq_len, a.eval_budget_seconds
        end = torch.tensor([time.perf_counter() - self.t_start + self.last + left + self.reserve], dtype=torch.float64, device=dev)
        if world > 1 and budget > 0 and not self.stopped:
            dist.all_reduce(end, op=dist.ReduceOp.MAX)  # one decision for all ranks: the latest projection
        if 0 < budget < end.item() and not self.stopped:
            self.stopped = True
            self.log(f"ttt_stop chunks_trained:{self.chunks} scored:{hi}/{self.tokens.numel() - 1} projected_end:{end.item():.1f}s "
                     f"budget:{budget:g}s training:{self.last:.1f}s scoring_left:{left:.1f}s mixer:{self.reserve:.1f}s")
        if self.stopped:
            return
        t0, R = time.perf_counter(), math.ceil(a.ttt_batch_seqs / world)
        seqs = [max(hi - (k + 1) * T, 0) for k in reversed(range(math.ceil((hi - lo) / T)))]
        for _ in range(a.ttt_epochs):
            for b in range(0, len(seqs), a.ttt_batch_seqs):
                step = seqs[b:b + a.ttt_batch_seqs]
                mine = step[R * self.ctx.rank:R * (self.ctx.rank + 1)]
                idx = torch.tensor(mine + [0] * (R - len(mine)), device=dev)[:, None] + torch.arange(T, device=dev)
                y = self.tokens[idx + 1].index_fill_(0, torch.arange(len(mine), R, device=dev), -100)
                self.opt.zero_grad(set_to_none=False)
                with autocast(dev):
                    loss = self.loss_fn(self.tokens[idx], y)
                (loss / (len(step) * T)).backward()
                if world > 1:
                    all_reduce_sum([p.grad for p in self.params])
                torch.nn.utils.clip_grad_norm_(self.params, a.ttt_grad_clip or math.inf)  # inf: scale 1, a no-op
                self.opt.step()
                self.steps += 1
        self.ctx.sync()
        self.last, self.chunks = time.perf_counter() - t0, self.chunks + 1
        self.seconds += self.last


def mix_stream(tokens: Tensor, logp: Tensor, ent: Tensor, nbytes: Tensor, args: Hyperparameters, device, log) -> Tensor:
    """The n-gram pass over the stream in evaluation order: targets in chunks of EVAL_BATCH_SEQS*EVAL_STRIDE,
    each chunk scored with the counts of the tokens before it, then added (score first, update after); logp, ent:
    [N], or [J, N] for J networks (experts of rule online). Computed by the mixer's whole-stream path (no table),
    bitwise equal to streaming score_from_net/update."""
    from backoff_mixer import BackoffNgramMixer
    mixer = BackoffNgramMixer(vocab_size=args.vocab_size, device=str(device), networks=logp.numel() // (tokens.numel() - 1),
                              **mixer_settings(args))
    t0 = time.perf_counter()
    nll = mixer.score_stream(tokens.to(torch.int64), logp, ent, args.eval_batch_seqs * args.eval_stride).double().cpu()
    N, cum_nll, cum_bytes = nll.numel(), nll.cumsum(0), nbytes.cumsum(0)
    running = ",".join(f"{e}:{cum_nll[e - 1].item() / math.log(2) / max(cum_bytes[e - 1].item(), 1):.4f}"
                       for e in sorted({max(N * k // 20, 1) for k in range(1, 21)}))  # the score as counts accumulate
    log(f"mixer_pass tokens:{N} rule:{args.ngram_rule} time:{time.perf_counter() - t0:.1f}s running_bpb:{running}")
    if args.ngram_rule == "online":
        log(f"mixer_learned {mixer.learned()}")
    return nll


def mixer_seconds(tokens: Tensor, networks: int, args: Hyperparameters, device) -> float:
    """The mixer pass's time on the whole stream, projected from a timed pass over its first 2**20 targets."""
    t0, n = time.perf_counter(), min(tokens.numel() - 1, 1 << 20)
    mix_stream(tokens[:n + 1], torch.zeros(networks, n), torch.zeros(networks, n), torch.ones(n), args, device, lambda _: None)
    return (time.perf_counter() - t0) * (tokens.numel() - 1) / n


def evaluate_artifact(path: str, args: Hyperparameters, val_tokens: Tensor, luts, ctx, log, loaded=None):
    """Round trip (non-overlapping windows) and sliding-window scoring of an artifact (read from disk unless
    `loaded`, load_artifact's result, is given), mixer included, on the clock EVAL_BUDGET_SECONDS counts from here.
    With TTT and rule online the unadapted network's pass comes first and counts: the mixture's experts are built on
    both networks (net 0 unadapted, net 1 adapted), so adapting cannot cost more than the mixture's bound."""
    t0 = time.perf_counter()
    meta, state = loaded or load_artifact(path)
    model = build_eval_model(meta["arch"], state, path, ctx.device)
    model.set_attention_backend(attention_backend(ctx.device, args.attention))
    stats_fn = make_stats_fn(model, args)
    loss, bpb = eval_val(stats_fn, val_tokens, luts, args.eval_seq_len, args.val_batch_size, ctx)
    log(f"final_int6_roundtrip val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{1000 * (time.perf_counter() - t0):.0f}ms")
    log(f"final_int6_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    t1, both = time.perf_counter(), args.ttt_enabled and args.use_ngram_mixer and args.ngram_rule == "online"
    base = eval_sliding(stats_fn, val_tokens, args, ctx, log) if both else None
    t2, timed = time.perf_counter(), ctx.rank == 0 and args.ttt_enabled and args.use_ngram_mixer and args.eval_budget_seconds > 0
    reserve = mixer_seconds(val_tokens, 1 + both, args, ctx.device) if timed else 0.0
    t3, ttt = time.perf_counter(), TestTimeTrainer(model, val_tokens, args, ctx, log, t0, reserve) if args.ttt_enabled else None
    logp, ent = eval_sliding(stats_fn, val_tokens, args, ctx, log, ttt)
    t4, t_ttt = time.perf_counter(), ttt.seconds if ttt else 0.0
    if ctx.rank == 0:
        nbytes = target_bytes(val_tokens[:-1].long(), val_tokens[1:].long(), luts).double()
        bpb = lambda nll: nll.sum().item() / math.log(2) / nbytes.sum().item()  # noqa: E731
        nll_neural, nets = -logp.double(), (torch.stack([base[0], logp]), torch.stack([base[1], ent])) if both else (logp, ent)
        log(f"final_int6_sliding_window_neural_exact val_loss:{nll_neural.mean().item():.8f} val_bpb:{bpb(nll_neural):.8f}")
        if both:
            b0 = bpb(-base[0].double())
            log(f"sliding_window_neural_no_ttt val_bpb:{b0:.8f} ttt_gain_bpb:{bpb(nll_neural) - b0:+.8f}")
        nll = mix_stream(val_tokens, *nets, nbytes, args, ctx.device, log) if args.use_ngram_mixer else nll_neural
        t5 = time.perf_counter()
        log(f"eval_time_split roundtrip:{t1 - t0:.1f}s no_ttt_pass:{t2 - t1:.1f}s mixer_probe:{t3 - t2:.1f}s sliding:"
            f"{t4 - t3 - t_ttt:.1f}s ttt_train:{t_ttt:.1f}s ttt_steps:{ttt.steps if ttt else 0} ttt_chunks:"
            f"{ttt.chunks if ttt else 0} mixer:{t5 - t4:.1f}s total:{t5 - t0:.1f}s budget:{args.eval_budget_seconds:g}s")
        log(f"final_int6_sliding_window_exact val_loss:{nll.mean().item():.8f} "
            f"val_bpb:{bpb(nll):.8f} eval_time:{1000 * (time.perf_counter() - t1):.0f}ms")
        if args.eval_dump:
            buf = io.BytesIO()
            np.savez(buf, nll=nll.numpy(), nll_neural=nll_neural.numpy(), entropy=ent.numpy(), bytes=nbytes.numpy(),
                     **({"nll_no_ttt": -base[0].numpy(), "entropy_no_ttt": base[1].numpy()} if both else {}))
            write_atomic(args.eval_dump, buf.getvalue())
            log(f"eval_dump:{args.eval_dump} positions:{nll.numel()}")
    ctx.sync()


# ----------------------------------------------------------------------------- main
class DistContext:
    """rank / world / device, from torchrun's env (or a single process)."""

    def __init__(self, args: Hyperparameters):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if 8 % self.world:
            raise UserError(f"WORLD_SIZE={self.world} must divide 8 (grad accumulation is 8/world); use 1, 2, 4 or 8 ranks")
        per_step = self.world * (8 // self.world) * args.train_seq_len
        if args.train_batch_tokens % per_step:
            raise UserError(f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} is not divisible by world_size*grad_accum*"
                            f"TRAIN_SEQ_LEN={per_step}; use a multiple of {per_step}")
        self.device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.backend = ("nccl" if self.device.type == "cuda" else "gloo") if self.world > 1 else "none"
        if self.world > 1:
            dist.init_process_group(self.backend, timeout=datetime.timedelta(seconds=args.collective_timeout_seconds))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def git_commit() -> str:
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()  # noqa: E731
    try:
        sha, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run(args: Hyperparameters, ctx: DistContext, log_box: list):
    run_id = ctx.broadcast(args.run_id or f"{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}")
    log_path = Path("logs") / f"{run_id}.txt"
    if ctx.rank == 0 and log_path.exists():
        raise UserError(f"{log_path} already exists; choose a new RUN_ID (logs are never overwritten)")
    log = Logger(log_path if ctx.rank == 0 else None)
    log_box.append(log)
    t_start = time.perf_counter()
    attention = attention_backend(ctx.device, args.attention)
    gpu = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "none"
    log(f"run_id:{run_id}")
    log(f"preset:{args.preset} device:{ctx.device.type} world_size:{ctx.world} backend:{ctx.backend} "
        f"attention:{attention} compile:{args.compile} gpu:{gpu}")
    sample = resolve_data(args, log)
    loaded, over = None, ""  # EVAL_ONLY: the artifact, read once
    if args.eval_only:  # the artifact's arch (VOCAB_SIZE included) before the token and tokenizer checks
        if not args.artifact:
            raise UserError("EVAL_ONLY=1 needs ARTIFACT=path/to/artifact.ptz")
        loaded = load_artifact(args.artifact)
        adopt_artifact_arch(args, loaded[0], args.artifact)
        args.check_ttt()  # TTT_PARAMS against the artifact's arch
    luts = build_byte_luts(load_tokenizer(args.tokenizer_path, args.vocab_size), args.vocab_size)
    val_tokens = load_validation_tokens(os.path.join(args.data_path, "fineweb_val_*.bin"), args.vocab_size,
                                        max(args.eval_seq_len, args.train_seq_len) + 1)
    if args.eval_dump and ctx.rank == 0:
        check_writable(args.eval_dump, "EVAL_DUMP")
    if args.kg_init and not args.eval_only:
        import kg_data  # noqa: F401  (the KG init's module, imported before the code below is counted)
    n_code, n_raw, detail = code_bytes()
    if not args.eval_only:
        calib = sum(map(read_shard_header, list_shards(pattern := os.path.join(args.data_path, "fineweb_train_*.bin"))))
        if args.target_bytes <= n_code:
            raise UserError(f"TARGET_BYTES={args.target_bytes} does not exceed the code alone ({n_code} bytes); raise it")
        if args.calibrates and calib < args.gptq_calib_tokens:
            raise UserError(f"GPTQ_CALIB_TOKENS={args.gptq_calib_tokens} exceeds the {calib} training tokens of {pattern}; lower it")
    log(f"dataset:{Path(args.data_path).name} sample:{int(sample)} data_path:{args.data_path} "
        f"tokenizer:{args.tokenizer_path} val_tokens:{val_tokens.numel()}")
    log(f"seed:{args.seed}")
    log(f"git_commit:{git_commit()}")
    log(f"torch:{torch.__version__} python:{sys.version.split()[0]}")
    log(f"config_hash:{args.config_hash()}")
    log(f"hparams:{json.dumps(args.as_dict(), sort_keys=True)}")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.eval_only:
        log(f"eval_only:1 artifact:{(artifact := args.artifact)}")
    else:
        model = build_model(args).to(ctx.device)
        total, mtp = count_params(model)
        log(f"model_params:{total}")
        log(f"mtp_params:{mtp}")
        if args.kg_init:
            try:
                kg_data.kg_embedding_init(model.tok_emb.weight.data, args.kg_init_strength, args.vocab_size)
            except ValueError as e:
                raise UserError(f"KG_INIT=1 cannot use kg_data.py: {e}") from None
            log(f"kg_init:1 strength:{args.kg_init_strength} tokens:{len(kg_data.token_importance())}")
        model.set_attention_backend(attention)
        steps, stream, train_s = train(args, model, val_tokens, luts, ctx, log)
        stats_fn = make_stats_fn(model, args)
        loss, bpb = eval_val(stats_fn, val_tokens, luts, args.train_seq_len, args.val_batch_size, ctx)
        log(f"post_ema val_loss:{loss:.4f} val_bpb:{bpb:.4f} steps:{steps}")
        artifact, over = export(model, args, stream, ctx, log, run_id, n_code, train_s)
    model_bytes = Path(artifact).stat().st_size if ctx.rank == 0 else 0
    log(f"code_bytes:{n_code} raw_bytes:{n_raw} files:{detail}")
    log(f"Total submission size int6+lzma: {model_bytes + n_code} bytes")
    if ctx.rank == 0 and model_bytes + n_code > LIMIT_BYTES:
        log(f"WARNING: submission size {model_bytes + n_code} exceeds the {LIMIT_BYTES}-byte limit: NOT a valid submission")
    evaluate_artifact(artifact, args, val_tokens, luts, ctx, log, loaded)
    log(f"run_complete total_time:{time.perf_counter() - t_start:.1f}s" + (" NOT a valid submission (over_cap)" if over else ""))
    return 4 if over else 0  # over the cap: not a valid submission


def main() -> int:
    def on_signal(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log_box, ctx = [], None
    prefix = f"[rank {os.environ.get('RANK')}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""

    def report(msg: str, code: int) -> int:
        if log_box:
            log_box[0](msg)
        if not log_box or log_box[0].file is None:
            print(prefix + msg, file=sys.stderr, flush=True)
        return code

    try:
        args = Hyperparameters()
        ctx = DistContext(args)
        return run(args, ctx, log_box)
    except UserError as e:
        return report(f"error: {e}", 2)
    except TrainingDiverged as e:
        return report(f"error: training diverged: {e}; no artifact written (lower MATRIX_LR or check the data)", 3)
    except Interrupted as e:
        return report(f"interrupted: {e}; the log is complete to here and no partial artifact exists "
                      f"(rerun, or EVAL_ONLY=1 ARTIFACT=... if an artifact was written)", 130)
    finally:
        if ctx is not None and ctx.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
