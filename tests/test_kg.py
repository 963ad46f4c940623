"""tools/build_kg.py and the generated kg_data.py: determinism, PageRank, table codec, embedding init."""
from __future__ import annotations

import base64
import importlib.util
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_kg  # noqa: E402
from train_gpt import UserError  # noqa: E402  (build_kg put ROOT on sys.path)
from data.shards import write_shard  # noqa: E402


def load_module(path: Path, name: str = "kg_under_test"):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(2):
        write_shard(tmp_path / f"fineweb_train_{k:06d}.bin", np.minimum(rng.zipf(1.3, 20000) - 1, 255))
    return str(tmp_path / "fineweb_train_*.bin")


def test_build_is_deterministic(shards, tmp_path, monkeypatch):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    assert build_kg.main(["--shards", shards, "--vocab-size", "256", "--top-n", "40", "--out", str(a),
                          "--date", "2026-01-02"]) == 0
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767312000")  # 2026-01-02 UTC
    assert build_kg.main(["--shards", shards, "--vocab-size", "256", "--top-n", "40", "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    text = a.read_text()
    assert "date: 2026-01-02" in text and "entries: 40" in text and "tokens: 40000" in text
    assert "fineweb_train_000001.bin" in text
    assert len(load_module(a).token_importance()) == 40


def test_build_changes_with_input(shards):
    one = build_kg.build(shards, vocab_size=256, top_n=40, date="2026-01-02")
    assert build_kg.build(shards, vocab_size=256, top_n=40, date="2026-01-02", max_tokens=20000) != one
    assert build_kg.build(shards, vocab_size=256, top_n=40, date="2026-01-02", window=3) != one


def test_build_rejects_bad_input(shards, tmp_path):
    with pytest.raises(UserError, match="--vocab-size"):
        build_kg.build(shards, vocab_size=100, date="2026-01-02")
    with pytest.raises(UserError, match="YYYY-MM-DD"):
        build_kg.build(shards, vocab_size=256, date="yesterday")
    with pytest.raises(UserError, match="no shards"):
        build_kg.build(str(tmp_path / "missing_*.bin"), date="2026-01-02")


def test_cooccurrence_counts_pairs_symmetrically():
    w = build_kg.cooccurrence(np.array([0, 1, 2, 1]), 3, 2)
    # d=1: (0,1) (1,2) (2,1); d=2: (0,2) (1,1, dropped)
    assert w.tolist() == [[0, 1, 1], [1, 0, 2], [1, 2, 0]]
    old, build_kg.CHUNK = build_kg.CHUNK, 3
    try:
        t = np.random.default_rng(1).integers(0, 7, 50)
        chunked = build_kg.cooccurrence(t, 7, 3)
    finally:
        build_kg.CHUNK = old
    assert np.array_equal(chunked, build_kg.cooccurrence(t, 7, 3))


def test_pagerank_star_hub_first():
    w = np.zeros((6, 6))
    w[0, 1:] = w[1:, 0] = 1
    scores, _ = build_kg.pagerank(w)
    assert np.argmax(scores) == 0 and np.allclose(scores[1:], scores[1])
    assert abs(scores.sum() - 1) < 1e-12


def test_pagerank_matches_dense_eigenvector():
    rng = np.random.default_rng(3)
    w = rng.integers(0, 5, (8, 8)).astype(float)
    w = w + w.T
    np.fill_diagonal(w, 0)
    w[7, :] = w[:, 7] = 0  # an isolated (dangling) token
    n, d = 8, build_kg.DAMPING
    deg = w.sum(1)
    p = np.where(deg[:, None] > 0, w / np.where(deg > 0, deg, 1)[:, None], 1.0 / n).T  # column-stochastic
    g = d * p + (1 - d) / n
    vals, vecs = np.linalg.eig(g)
    ref = np.real(vecs[:, np.argmin(abs(vals - 1))])
    ref /= ref.sum()
    scores, iters = build_kg.pagerank(w)
    assert iters < build_kg.MAX_ITER
    assert np.allclose(scores, ref, atol=1e-10)


def test_top_importance_ranks_and_skips_inactive():
    ids, imp = build_kg.top_importance(np.array([0.1, 0.4, 0.4, 0.9, 0.2]),
                                       np.array([True, True, True, False, True]), 3)
    assert ids.tolist() == [1, 2, 4] and np.allclose(imp, [1, 2 / 3, 1 / 3])


def test_table_round_trip():
    mod = load_module(ROOT / "kg_data.py")
    ids, imp = [5, 0, 900, 17], [1.0, 0.123456, 0.5, 0.0]
    got = mod.token_importance(build_kg.encode_table(ids, imp, 1024))
    assert list(got) == ids
    assert all(abs(got[i] - v) <= 0.5 / build_kg.QMAX + 1e-12 for i, v in zip(ids, imp))


def raw_payload(raw: bytes) -> str:
    return base64.b64encode(zlib.compress(raw)).decode()


@pytest.mark.parametrize("payload, message", [
    ("not base64!!", "corrupt or truncated"),
    (build_kg.encode_table([1, 2, 3], [1, 0.5, 0.2], 16)[:-8], "corrupt or truncated"),
    (base64.b64encode(b"garbage bytes").decode(), "corrupt or truncated"),
    (raw_payload(b"KGI1" + struct.pack("<HH", 16, 3) + b"\0" * 10), "promises 3 entries"),
    (raw_payload(b"XXXX" + struct.pack("<HH", 16, 0)), "header"),
    (raw_payload(b"KGI1" + struct.pack("<HH3H3H", 16, 3, 1, 16, 2, 9, 9, 9)), r"\[16\] are outside"),
    (raw_payload(b"KGI1" + struct.pack("<HH2H2H", 16, 2, 4, 4, 9, 9)), "repeats"),
])
def test_bad_payload_is_a_clear_error(payload, message):
    mod = load_module(ROOT / "kg_data.py")
    with pytest.raises(ValueError, match=message):
        mod.token_importance(payload)


def test_init_scales_exactly_the_table_rows(monkeypatch):
    mod = load_module(ROOT / "kg_data.py")
    monkeypatch.setattr(mod, "KG_IMPORTANCE_B64", build_kg.encode_table([3, 7, 1], [1.0, 0.25, 0.5], 16))
    imp = mod.token_importance()
    w0 = torch.randn(16, 4)
    w = mod.kg_embedding_init(w0.clone(), 0.5, 16)
    changed = (w != w0).any(dim=1).nonzero().flatten().tolist()
    assert changed == [1, 3, 7]
    for v, i in imp.items():
        assert torch.equal(w[v], w0[v] * torch.tensor(1 + 0.5 * i, dtype=torch.float64).float())
    assert torch.allclose(w[3], w0[3] * 1.5)
    with pytest.raises(ValueError, match=r"\[7\] are outside vocab_size 5"):
        mod.kg_embedding_init(w0[:5].clone(), 0.5, 5)
    with pytest.raises(ValueError, match="rows"):
        mod.kg_embedding_init(w0[:8].clone(), 0.5, 16)
    with pytest.raises(ValueError, match="finite"):
        mod.kg_embedding_init(w0.clone(), float("nan"), 16)


def test_committed_kg_data_is_consistent():
    path = ROOT / "kg_data.py"
    mod = load_module(path)
    header = mod.__doc__
    entries = int(re.search(r"entries: (\d+)", header).group(1))
    vocab = int(re.search(r"vocab_size: (\d+)", header).group(1))
    imp = mod.token_importance()
    assert len(imp) == entries and max(imp) < vocab
    assert max(imp.values()) == 1.0 and min(imp.values()) > 0
    payload = "".join(re.findall(r'^    "([A-Za-z0-9+/=]+)"$', path.read_text(), re.M))
    assert path.read_text() == build_kg.render(header, payload), "kg_data.py was hand-edited: regenerate it"
    w0 = torch.randn(vocab, 8)
    assert (mod.kg_embedding_init(w0.clone(), 0.5, vocab) != w0).any(dim=1).sum() == entries
