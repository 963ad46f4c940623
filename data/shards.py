"""Writing competition shards (the run only reads them: train_gpt.read_shard_header / load_data_shard)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, write_atomic  # noqa: E402


def write_shard(path, tokens) -> None:
    """Competition shard: 256 little-endian int32 [magic, version, n, 0...], then n little-endian uint16."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("shard tokens must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    write_atomic(path, header.tobytes() + tokens.astype("<u2").tobytes())
