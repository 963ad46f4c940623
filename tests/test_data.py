"""Data layer: shard format, token loader, BPB byte counts, the sample builder and the FineWeb fetcher.

Expectations come from independent sources: a struct/numpy shard reader written here, the plain
token stream for the loader, and the UTF-8 length of decoded text for the byte rule."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402
from conftest import log_value, run_cli, tiny_env_for  # noqa: E402
from data.shards import write_shard  # noqa: E402
from train_gpt import UserError  # noqa: E402

BUILDER = ROOT / "data" / "build_sample_dataset.py"
FETCHER = ROOT / "data" / "cached_challenge_fineweb.py"


def independent_read(path: Path) -> np.ndarray:
    """The competition shard format, read by hand: 256 LE int32 header [20240520, 1, n, 0...], then n LE uint16 tokens."""
    raw = path.read_bytes()
    magic, version, n = struct.unpack("<3i", raw[:12])
    assert (magic, version) == (20240520, 1)
    assert struct.unpack("<253i", raw[12:1024]) == (0,) * 253
    assert len(raw) == 1024 + 2 * n
    return np.frombuffer(raw[1024:], dtype="<u2")


def build_sample(data_dir: Path, tokenizer: Path, *extra: str, builder: Path = BUILDER) -> str:
    return subprocess.run([sys.executable, str(builder), "--data-dir", str(data_dir), "--tokenizer", str(tokenizer),
                           *extra], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """The default sample build (all of the stdlib text), made once per test session."""
    root = tmp_path_factory.mktemp("sample")
    out = build_sample(root / "sample_sp1024", root / "sample_1024_bpe.model")
    return root / "sample_sp1024", root / "sample_1024_bpe.model", out


@pytest.fixture(scope="session")
def sp(sample):
    return train_gpt.load_tokenizer(str(sample[1]), 1024)


# ----------------------------------------------------------------------------- shards
@pytest.mark.parametrize("tokens", [[], [0], [0, 1, 65535, 1023, 7] * 50])
def test_shard_round_trip(tmp_path, tokens):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.array(tokens, dtype=np.int64))
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    assert independent_read(path).tolist() == tokens
    assert train_gpt.read_shard_header(path) == len(tokens)
    assert train_gpt.load_data_shard(path).tolist() == tokens


def test_write_shard_rejects_out_of_range(tmp_path):
    for bad in ([65536], [-1]):
        with pytest.raises(ValueError):
            write_shard(tmp_path / "x.bin", np.array(bad))
    assert not list(tmp_path.iterdir())


def _header(magic=20240520, version=1, n=4) -> bytes:
    return struct.pack("<256i", magic, version, n, *([0] * 253))


BAD_SHARDS = {
    "wrong magic": (_header(magic=12345) + b"\0" * 8, "magic"),
    "wrong version": (_header(version=2) + b"\0" * 8, "version"),
    "truncated body": (_header(n=4) + b"\0" * 6, "truncated"),
    "extra bytes": (_header(n=4) + b"\0" * 10, "truncated or corrupt"),
    "negative count": (_header(n=-1), "corrupt"),
    "shorter than header": (b"\x00" * 100, "header"),
    "empty file": (b"", "header"),
}


BAD_SHARDS["odd-sized stub"] = (b"\x00" * 11, "header")


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_bad_shard_is_refused_naming_the_file(tmp_path, case):
    data, why = BAD_SHARDS[case]
    path = tmp_path / "fineweb_train_000000.bin"
    path.write_bytes(data)
    for read in (train_gpt.read_shard_header, train_gpt.load_data_shard,
                 lambda p: train_gpt.TokenStream(str(tmp_path / "fineweb_train_*.bin"), 1024).take(1)):
        with pytest.raises(UserError) as err:
            read(path)
        assert str(path) in str(err.value) and why in str(err.value)
        assert "\n" not in str(err.value)


def test_bad_shard_later_in_the_list_fails_before_any_tokens(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(100))
    (tmp_path / "fineweb_train_000001.bin").write_bytes(_header(n=50) + b"\0" * 10)
    with pytest.raises(UserError, match="fineweb_train_000001.bin"):
        train_gpt.TokenStream(str(tmp_path / "fineweb_train_*.bin"), 1024)


def test_token_ids_are_checked_against_the_vocabulary_where_read(tmp_path):
    """Every shard read with a vocabulary is checked: the error names the file, the first bad position and
    its value, whether the shard is the validation split, the first train shard, or one reached mid-stream."""
    ok, bad = np.arange(100) % 50, np.arange(100) % 50
    bad[[17, 60]] = [50, 999]                       # 50 is the first id outside a 50-token vocabulary
    write_shard(tmp_path / "fineweb_train_000000.bin", ok)
    write_shard(tmp_path / "fineweb_train_000001.bin", bad)
    write_shard(tmp_path / "fineweb_val_000000.bin", bad)
    expect = "has token id 50 at position 17, outside the vocabulary [0, 50)"
    with pytest.raises(UserError, match=re.escape(f"fineweb_val_000000.bin {expect}")):
        train_gpt.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 50)
    ts = train_gpt.TokenStream(str(tmp_path / "fineweb_train_*.bin"), 50)
    assert ts.take(100).tolist() == ok.tolist()    # the first shard is fine
    with pytest.raises(UserError, match=re.escape(f"fineweb_train_000001.bin {expect}")):
        ts.take(1)                                  # the second is refused when it is read, before use
    assert train_gpt.TokenStream(str(tmp_path / "fineweb_train_*.bin"), 1000).take(200).tolist() == ok.tolist() + bad.tolist()
    assert train_gpt.load_data_shard(tmp_path / "fineweb_train_000001.bin").tolist() == bad.tolist()  # no vocabulary: no check


def test_missing_shards_and_files(tmp_path):
    with pytest.raises(UserError, match="no shards match"):
        train_gpt.list_shards(str(tmp_path / "fineweb_val_*.bin"))
    with pytest.raises(UserError, match="cannot read shard"):
        train_gpt.read_shard_header(tmp_path / "absent.bin")


# ----------------------------------------------------------------------------- loader
def _write_stream(tmp_path, sizes, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, 1024, n) for n in sizes]
    for i, part in enumerate(parts):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", part)
    return np.concatenate(parts)


def test_token_stream_reads_shards_in_order_and_wraps(tmp_path):
    stream = _write_stream(tmp_path, [50, 7, 30])
    ts = train_gpt.TokenStream(str(tmp_path / "fineweb_train_*.bin"), 1024)
    got = torch.cat([ts.take(n) for n in (13, 40, 60, 20)]).numpy()
    assert got.tolist() == np.tile(stream, 2)[:133].tolist()


def test_two_ranks_equal_one_rank_micro_batches(tmp_path):
    seq, local = 8, 32  # tokens per rank per micro-step
    stream = _write_stream(tmp_path, [101, 57, 230])
    pattern, cpu = str(tmp_path / "fineweb_train_*.bin"), torch.device("cpu")
    ranks = [train_gpt.DistributedTokenLoader(pattern, 1024, r, 2, cpu) for r in range(2)]
    single = train_gpt.DistributedTokenLoader(pattern, 1024, 0, 1, cpu)
    expected = np.tile(stream, 4)
    for step in range(6):  # long enough to cross every shard boundary and wrap
        two = [loader.next_batch(2 * local, seq, grad_accum_steps=1) for loader in ranks]
        one = [single.next_batch(2 * local, seq, grad_accum_steps=2) for _ in range(2)]
        for (x2, y2), (x1, y1), micro in zip(two, one, (2 * step, 2 * step + 1)):
            assert torch.equal(x2, x1) and torch.equal(y2, y1)
            window = expected[micro * (local + 1):(micro + 1) * (local + 1)]
            assert x1.shape == (local // seq, seq) and x1.dtype == torch.int64
            assert x1.flatten().tolist() == window[:-1].tolist()
            assert y1.flatten().tolist() == window[1:].tolist()


# ----------------------------------------------------------------------------- BPB bytes
BPB_TEXT = [
    "Plain ASCII with digits 0123456789 and 3.14159, then punctuation!?",
    "Accents: café, naïve, Ünïcödé, Øresund; ligature ﬁ and ½ (NFKC folds them).",
    "CJK 漢字テスト 한국어 and emoji 🦜🚀👩‍💻 with a rare char ꙮ and a NUL \x00 byte.",
    "Line one\nLine two\n\n   indented after spaces\tand a tab, trailing spaces   ",
    "  leading spaces, then   many   gaps",
    "x",
]


def _stream_bytes(tokens: list[int], sp) -> int:
    luts = train_gpt.build_byte_luts(sp, 1024)
    t = torch.tensor(tokens, dtype=torch.int64)
    return int(train_gpt.target_bytes(t[:-1], t[1:], luts).sum())


@pytest.mark.parametrize("start", ["document start", "first space-led token"])
@pytest.mark.parametrize("text", BPB_TEXT)
def test_target_bytes_match_decoded_utf8_length(sp, text, start):
    """A stream without BOS, from the start of a document or from mid-document (as an eval window
    may start): the first token is never a target, every byte after it is counted once. decode()
    drops the leading space of the first piece, as the rule does for a token after a boundary."""
    ids = sp.encode(text)
    if start != "document start":
        ids = ids[next((i for i, t in enumerate(ids) if i and sp.id_to_piece(t).startswith("\u2581")), 0):]
    first = sp.id_to_piece(ids[0])
    first_bytes = 1 if sp.is_byte(ids[0]) else len(first.lstrip("\u2581").encode())
    assert _stream_bytes(ids, sp) == len(sp.decode(ids).encode()) - first_bytes


def test_target_bytes_of_bos_documents_match_decoded_text(sp):
    """Shard layout (BOS before each document): every byte of every decoded document is counted once."""
    tokens, expected = [], 0
    for text in BPB_TEXT:
        ids = sp.encode(text)
        tokens += [sp.bos_id()] + ids
        expected += len(sp.decode(ids).encode())
    assert any(sp.is_byte(t) for t in tokens), "the text must exercise byte fallback"
    assert any(sp.id_to_piece(t).startswith("\u2581") for t in tokens)
    assert _stream_bytes(tokens, sp) == expected


def test_target_bytes_on_sample_val_shard(sample, sp):
    val = train_gpt.load_validation_tokens(str(sample[0] / "fineweb_val_*.bin"), 1024).tolist()
    bos = sp.bos_id()
    starts = [i for i, t in enumerate(val) if t == bos] + [len(val)]
    expected = sum(len(sp.decode(val[a + 1:b]).encode()) for a, b in zip(starts, starts[1:]))
    assert starts[0] == 0 and _stream_bytes(val, sp) == expected


# ----------------------------------------------------------------------------- sample builder
def _digests(*paths: Path) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.iterdir()))]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_sample_build_is_deterministic_and_replaces_stale_files(tmp_path):
    a, b = tmp_path / "a" / "sample_sp1024", tmp_path / "b" / "sample_sp1024"
    b.mkdir(parents=True)
    (b / "fineweb_train_000042.bin").write_bytes(b"stale")
    for d in (a, b):
        build_sample(d, d.parent / "tok.model", "--max-chars", "300000", "--shard-tokens", "40000")
    assert _digests(a, a.parent / "tok.model") == _digests(b, b.parent / "tok.model")
    assert not (b / "fineweb_train_000042.bin").exists()
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []  # no temp files left behind


def test_default_sample_meets_size_targets(sample, sp):
    data_dir, tokenizer, out = sample
    manifest = json.loads((data_dir / "manifest.json").read_text())
    train = [independent_read(data_dir / f) for f in manifest["files_train"]]
    val = [independent_read(data_dir / f) for f in manifest["files_val"]]
    n_train, n_val = sum(map(len, train)), sum(map(len, val))
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(
        manifest["files_train"] + manifest["files_val"] + ["manifest.json"])
    assert all(f.startswith("fineweb_train_") for f in manifest["files_train"])
    assert (n_train, n_val) == (manifest["tokens_train"], manifest["tokens_val"])
    assert n_train + n_val >= 300_000 and n_val >= 0.10 * (n_train + n_val)
    assert manifest["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert out.count("\n") == 1 and "sample dataset:" in out
    # every document starts with BOS and BOS appears nowhere else
    bos = sp.bos_id()
    assert bos == 1 and train[0][0] == bos and val[0][0] == bos
    assert int((np.concatenate(val) == bos).sum()) == manifest["docs_val"]
    assert int((np.concatenate(train) == bos).sum()) == manifest["docs_train"]
    assert max(int(t.max()) for t in train + val) < 1024
    for f in manifest["files_train"] + manifest["files_val"]:
        assert independent_read(data_dir / f).tolist() == train_gpt.load_data_shard(data_dir / f).tolist()


def test_sample_tokenizer_matches_competition_settings(sp):
    assert (sp.vocab_size(), sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1024, 0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(1024)) == 256  # byte fallback
    assert not any(any(c.isdigit() for c in sp.id_to_piece(i)) and len(sp.id_to_piece(i).strip("\u2581")) > 1
                   for i in range(1024) if not sp.is_byte(i) and not sp.is_control(i))  # split digits


# ----------------------------------------------------------------------------- FineWeb fetcher
@pytest.fixture(scope="module")
def fetcher():
    spec = importlib.util.spec_from_file_location("cached_challenge_fineweb", FETCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest(n_train=3, n_val=1) -> dict:
    """Shaped like the published export's manifest.json (only the fields the fetcher reads, plus noise)."""
    return {
        "version": "10B",
        "tokenizers": [
            {"name": "sp_bpe_512", "model_path": "tokenizers/fineweb_512_bpe.model"},
            {"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 1024,
             "model_path": "/export/root/tokenizers/fineweb_1024_bpe.model",  # may be unrelativized
             "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
        ],
        "datasets": [
            {"name": "fineweb10B_sp512", "tokenizer_name": "sp_bpe_512", "stats": {"files_train": 9, "files_val": 1}},
            {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
             "stats": {"files_train": n_train, "files_val": n_val, "tokens_train": 0}},
        ],
    }


def test_local_paths(fetcher, tmp_path):
    lp = fetcher.local_path
    assert lp("datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin", tmp_path) == \
        tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin"
    assert lp("datasets/tokenizers/fineweb_1024_bpe.model", tmp_path) == tmp_path / "tokenizers" / "fineweb_1024_bpe.model"
    assert lp("datasets/manifest.json", tmp_path) == tmp_path / "datasets" / "manifest.json"
    for bad in ("datasets/../../etc/passwd", "other/tokenizers/x.model", "manifest.json"):
        with pytest.raises(UserError):
            lp(bad, tmp_path)


def test_plan_downloads(fetcher):
    prefix = "datasets/datasets/fineweb10B_sp1024"
    assert fetcher.plan_downloads(_manifest(3, 2), "sp1024", 2) == [
        f"{prefix}/fineweb_val_000000.bin", f"{prefix}/fineweb_val_000001.bin",
        f"{prefix}/fineweb_train_000000.bin", f"{prefix}/fineweb_train_000001.bin",
        "datasets/tokenizers/fineweb_1024_bpe.model"]
    assert len(fetcher.plan_downloads(_manifest(3), "sp1024", None)) == 1 + 3 + 1  # default: all when < 80
    assert len(fetcher.plan_downloads(_manifest(195), "sp1024", None)) == 1 + 80 + 1
    assert len(fetcher.plan_downloads(_manifest(3), "sp1024", 0)) == 2
    for manifest, variant, n, match in [(_manifest(3), "sp1024", 4, "outside 0..3"),
                                        (_manifest(3), "sp1024", -1, "outside"),
                                        (_manifest(3), "sp4096", 1, "fineweb10B_sp4096 is not in the manifest"),
                                        ({"datasets": [], "tokenizers": []}, "sp1024", 1, "not in the manifest"),
                                        ({**_manifest(3), "tokenizers": []}, "sp1024", 1, "no tokenizer")]:
        with pytest.raises(UserError, match=match):
            fetcher.plan_downloads(manifest, variant, n)


def test_fetch_downloads_validates_and_skips(fetcher, tmp_path, monkeypatch):
    """A fake Hub (a local folder) stands in for hf_hub_download."""
    hub, data = tmp_path / "hub", tmp_path / "data"
    prefix = hub / "datasets" / "datasets" / "fineweb10B_sp1024"
    for split, n in (("val", 1), ("train", 3)):
        for i in range(n):
            write_shard(prefix / f"fineweb_{split}_{i:06d}.bin", np.arange(10 + i))
    (hub / "datasets" / "tokenizers").mkdir(parents=True)
    (hub / "datasets" / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model")
    (hub / "datasets" / "manifest.json").write_text(json.dumps(_manifest(3)))
    calls = []

    def fake_download(remote: str, staging: Path) -> Path:
        calls.append(remote)
        (staging / remote).parent.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copyfile(hub / remote, staging / remote))

    monkeypatch.setattr(fetcher, "hub_download", fake_download)

    assert fetcher.fetch("sp1024", 2, data) == (4, 0)
    assert len(calls) == 5  # manifest + 1 val + 2 train + tokenizer
    local = data / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in local.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    assert train_gpt.load_data_shard(local / "fineweb_train_000001.bin").tolist() == list(range(11))
    assert (data / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model"

    calls.clear()
    (local / "fineweb_train_000001.bin").write_bytes(b"half a file")  # corrupt local copy is fetched again
    assert fetcher.fetch("sp1024", 2, data) == (1, 3) and calls == [
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"]

    (prefix / "fineweb_train_000002.bin").write_bytes(_header(n=99))  # corrupt on the Hub: refused, not installed
    with pytest.raises(UserError, match="fineweb_train_000002.bin"):
        fetcher.fetch("sp1024", 3, data)
    assert not (local / "fineweb_train_000002.bin").exists()
    assert not [p for p in data.rglob(".*")]


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_fetch_without_network_fails_in_one_line(tmp_path, env):
    """One line, exit 2, from check_reachable's single connect before huggingface_hub is asked (no clock is read: the
    subprocess timeout only bounds a hang)."""
    full_env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", **env}
    res = subprocess.run([sys.executable, str(FETCHER), "--train-shards", "1", "--data-root", str(tmp_path / "data")],
                         capture_output=True, text=True, env=full_env, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: cannot reach the Hugging Face Hub")


def test_heldout_builder_strips_troff():
    """data/build_heldout_dataset.py keeps a man page's words and drops its markup (hand-written page)."""
    sys.path.insert(0, str(ROOT / "data"))
    from build_heldout_dataset import man_text
    page = ('.\\" a comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\n'
            '.B \\-\\-all\nit\\(aqs \\s-1small\\s0 and \\*(lqquoted\\*(rq\n.sp 2\n')
    assert man_text(page) == "NAME\nls - list directory contents\n\n--all\nit's small and quoted"


# ----------------------------------------------------------------------------- which dataset a run uses (issue 22.5)
@pytest.fixture
def no_fineweb(tmp_path, monkeypatch, sample_paths):
    """A cwd without ./data/datasets/fineweb10B_sp1024 (DATA_PATH's default); the sample at sample_paths; building a
    sample (a subprocess) is an error here, so a test sees any attempt."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_gpt, "SAMPLE_DATA_PATH", str(sample_paths[0]))
    monkeypatch.setattr(train_gpt, "SAMPLE_TOKENIZER_PATH", str(sample_paths[1]))
    monkeypatch.setattr(train_gpt.subprocess, "run", lambda *a, **k: pytest.fail(f"subprocess started: {a}"))
    return tmp_path


def resolve(env: dict, preset: str) -> tuple[train_gpt.Hyperparameters, bool | UserError, list[str]]:
    args, logged = train_gpt.Hyperparameters(env, preset=preset), []
    try:
        return args, train_gpt.resolve_data(args, logged.append), logged
    except UserError as e:
        return args, e, logged


@pytest.mark.parametrize("how", ["record preset", "CUDA faked in-process"])
def test_record_run_without_fineweb_is_an_error_not_the_sample(no_fineweb, monkeypatch, how):
    """On CUDA (the record preset, or torch.cuda.is_available() faked), a missing FineWeb is one error naming the path
    and the fetch command; nothing is built and nothing logged."""
    if how != "record preset":
        monkeypatch.setattr(train_gpt.torch.cuda, "is_available", lambda: True)
    _, err, logged = resolve({}, "record" if how == "record preset" else "cpu")
    assert isinstance(err, UserError) and logged == []
    msg = str(err)
    assert "DATA_PATH=./data/datasets/fineweb10B_sp1024 does not exist" in msg and str(no_fineweb) in msg
    assert "python data/cached_challenge_fineweb.py --train-shards 80" in msg and "DATA_PATH=sample" in msg


def test_sample_only_when_asked_on_cuda_and_by_default_on_cpu(no_fineweb, monkeypatch, sample_paths):
    for env, preset in [({"DATA_PATH": "sample"}, "record"), ({}, "cpu"), ({"DATA_PATH": "sample"}, "cpu")]:
        args, sample, logged = resolve(env, preset)
        assert sample is True and (args.data_path, args.tokenizer_path) == tuple(map(str, sample_paths))
        assert len(logged) == 1 and "SAMPLE dataset in use" in logged[0] and "not record evidence" in logged[0]
    args, sample, _ = resolve({"DATA_PATH": "sample", "TOKENIZER_PATH": "mine.model"}, "record")
    assert sample is True and args.tokenizer_path == "mine.model"  # an explicit tokenizer is kept
    (no_fineweb / "data" / "datasets" / "fineweb10B_sp1024").mkdir(parents=True)  # FineWeb present: used
    args, sample, logged = resolve({}, "record")
    assert sample is False and args.data_path == "./data/datasets/fineweb10B_sp1024" and logged == []
    _, err, _ = resolve({"DATA_PATH": str(no_fineweb / "nope")}, "cpu")  # an explicit path must exist, CPU or not
    assert isinstance(err, UserError) and f"DATA_PATH={no_fineweb / 'nope'} does not exist" in str(err)


# ----------------------------------------------------------------------------- the competition's layout (issue 22.8)
LAYOUT_BUILDER = ROOT / "data" / "build_competition_layout.py"


@pytest.fixture(scope="session")
def layouts(tmp_path_factory):
    """Competition-layout sets (no byte fallback: <unk> occurs), without and with the dummy prefix, built on demand."""
    built = {}

    def get(dummy_prefix: bool):
        if dummy_prefix not in built:
            root = tmp_path_factory.mktemp("layout")
            build_sample(root / "data", root / "tok.model", "--max-chars", "150000",
                         *(["--dummy-prefix"] if dummy_prefix else []), builder=LAYOUT_BUILDER)
            sp = train_gpt.load_tokenizer(str(root / "tok.model"), 1024)
            val = train_gpt.load_validation_tokens(str(root / "data" / "fineweb_val_*.bin"), 1024).tolist()
            manifest = json.loads((root / "data" / "manifest.json").read_text())
            built[dummy_prefix] = types.SimpleNamespace(data=root / "data", tok=root / "tok.model", sp=sp, val=val,
                                                        manifest=manifest)
        return built[dummy_prefix]
    return get


def decoded_bytes(tokens: list[int], sp) -> np.ndarray:
    """UTF-8 bytes of each target tokens[1:] from SentencePiece's own decoding, independent of the byte tables: the
    stream is cut at every control or unknown token (BOS, <unk>: no bytes of text, boundaries under the rule) into
    runs of ordinary pieces; the j-th piece of a run weighs len(decode(run[:j+1])) - len(decode(run[:j])) (decode
    drops a run's leading space, as the rule does after a boundary). The first token is context, not a target."""
    out, run = np.zeros(len(tokens) - 1, dtype=np.int64), []

    def flush():
        prev = 0
        for j, i in enumerate(run):
            n = len(sp.decode([tokens[k] for k in run[:j + 1]]).encode("utf-8"))
            if i > 0:
                out[i - 1] = n - prev
            prev = n
        run.clear()

    for i, t in enumerate(tokens):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            flush()
        else:
            run.append(i)
    flush()
    return out


@pytest.mark.parametrize("dummy_prefix", [False, True])
def test_competition_layout_bytes_match_decoded_runs(layouts, dummy_prefix):
    """No byte fallback, documents BOS-first with no EOS, characters the tokenizer lacks as <unk>: every target's bytes
    by the run's tables equal SentencePiece's own decoding (<unk> 0 bytes and a boundary)."""
    lay = layouts(dummy_prefix)
    sp, val = lay.sp, lay.val
    assert not any(sp.is_byte(i) for i in range(1024)) and sp.unk_id() == 3 and sp.bos_id() == 1
    assert lay.manifest["tokenizer_settings"]["byte_fallback"] is False
    assert val[0] == 1 and val.count(1) == lay.manifest["docs_val"] and sp.eos_id() not in val  # BOS each, no EOS
    unk = [i for i, t in enumerate(val) if t == sp.unk_id()]
    assert len(unk) > 50 and any(sp.id_to_piece(val[i + 1]).startswith("\u2581") for i in unk if i + 1 < len(val))
    t = torch.tensor(val, dtype=torch.int64)
    rule = train_gpt.target_bytes(t[:-1], t[1:], train_gpt.build_byte_luts(sp, 1024)).numpy()
    expected = decoded_bytes(val, sp)
    assert np.array_equal(rule, expected), np.flatnonzero(rule != expected)[:10]
    assert all(rule[i - 1] == 0 for i in unk)  # the characters behind <unk> are not counted


def test_whole_run_on_competition_layout(tmp_path, layouts, sample_paths):
    """The whole run (training, export, round trip, sliding + TTT, the online mixer) on the competition layout: the
    bytes of every target against the independent count, the logged BPBs recomputed from the per-token dump."""
    lay = layouts(False)
    env = tiny_env_for(lay.data, sample_paths, TOKENIZER_PATH=lay.tok, USE_NGRAM_MIXER=1, TTT_ENABLED=1,
                       TTT_CHUNK_TOKENS=1024, EVAL_DUMP=tmp_path / "dump.npz")
    p = run_cli(env, tmp_path, RUN_ID="layout")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    dump = np.load(tmp_path / "dump.npz")
    expected = decoded_bytes(lay.val, lay.sp)
    assert np.array_equal(dump["bytes"], expected)
    unk_targets = [i - 1 for i, t in enumerate(lay.val) if t == lay.sp.unk_id()]
    assert unk_targets and all(np.isfinite(dump[k]).all() for k in ("nll", "nll_neural", "entropy"))
    for key, line in (("nll", "final_int6_sliding_window_exact"), ("nll_neural", "final_int6_sliding_window_neural_exact")):
        bpb = dump[key].astype(np.float64).sum() / np.log(2) / expected.sum()
        assert abs(float(log_value(p.stdout, line, "val_bpb")) - bpb) < 1e-6, (key, bpb)
    assert int(log_value(p.stdout, "eval_time_split", "ttt_steps")) > 0 and "mixer_learned" in p.stdout
    assert np.isfinite(float(log_value(p.stdout, "final_int6_roundtrip_exact", "val_bpb")))
