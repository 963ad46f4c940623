"""The counted code (issues 22.6, 23.4): what the run imported, nothing else, and packed as a record ships it.

Independent expectations: the interpreter's own import log (`python -X importtime`, which names every module a
process imports, to its exit) for which files are counted; the packed file on disk for how many bytes they weigh;
a second run of the packed file for whether it is the same program."""
from __future__ import annotations

import base64
import hashlib
import json
import lzma
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, frozen_code, log_value, make_dataset, run_cli, run_two_ranks, tiny_env_for
import train_gpt

sys.path.insert(0, str(ROOT / "tools"))
from make_submission import parse_log  # noqa: E402


def imported_repo_files(stderr: str, code: Path) -> set[str]:
    """The files of `code` whose module the process imported, read off `-X importtime`'s log (stderr), plus the
    script itself (run as __main__, never imported)."""
    names = {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    return {"train_gpt.py"} | {p.name for p in code.glob("*.py") if p.stem in names}


def counted(stdout: str) -> list[str]:
    return [f.split("=")[0] for f in log_value(stdout, "code_bytes:", "files").split(",")]


@pytest.mark.parametrize("mixer,kg", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_counted_code_is_what_the_interpreter_imported(tmp_path, sample_paths, mixer, kg):
    """With the mixer and the KG init on and off, the code_bytes line lists exactly the repository files the process
    imported over its whole life (so none was imported after the count), and its number is their packed size."""
    code = frozen_code(tmp_path)
    env = tiny_env_for(make_dataset(tmp_path / "data", sample_paths), sample_paths, USE_NGRAM_MIXER=mixer, KG_INIT=kg,
                       ITERATIONS=1, TTT_ENABLED=0)
    p = subprocess.run([sys.executable, "-X", "importtime", str(code / "train_gpt.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    files = counted(p.stdout)
    assert set(files) == imported_repo_files(p.stderr, code) and files[0] == "train_gpt.py"
    assert ("backoff_mixer.py" in files) == bool(mixer) and ("kg_data.py" in files) == bool(kg)
    sizes = dict(f.split("=") for f in log_value(p.stdout, "code_bytes:", "files").split(","))
    assert {f: int(n) for f, n in sizes.items()} == {f: (code / f).stat().st_size for f in files}
    assert int(log_value(p.stdout, "code_bytes:", "raw_bytes")) == sum(int(n) for n in sizes.values())
    assert int(log_value(p.stdout, "code_bytes:", "code_bytes")) == len(train_gpt.pack_code(files, code))


def test_pack_is_deterministic_and_holds_the_sources_byte_for_byte(tmp_path):
    files = ["train_gpt.py", "artifact_codec.py", "backoff_mixer.py"]
    packed = train_gpt.pack_code(files)
    assert packed == train_gpt.pack_code(list(files)) and packed.isascii()
    blob = re.search(rb'b85decode\("([^"]+)"\)', packed).group(1)
    sources = json.loads(lzma.decompress(base64.b85decode(blob)))
    assert list(sources) == files
    assert all(sources[f].encode() == (ROOT / f).read_bytes() for f in files)
    assert len(packed) < sum((ROOT / f).stat().st_size for f in files) / 2  # ~2.8x smaller


def finals(text: str) -> list[str]:
    return [re.sub(r" eval_time:\S+", "", line) for line in text.splitlines() if line.startswith("final_int6_")]


def test_record_ships_the_packed_code_it_counted_and_the_packed_copy_runs_the_same(tmp_path, sample_paths):
    """tools/make_record.py writes one self-extracting train_gpt.py of exactly the bytes the run counted; run with
    python (and with torchrun on 2 ranks), it unpacks the same sources and is the same program: the same code_bytes,
    the same final numbers, artifact + its own size as the total."""
    code = frozen_code(tmp_path)
    env = tiny_env_for(make_dataset(tmp_path / "data", sample_paths), sample_paths, USE_NGRAM_MIXER=1,
                       TMPDIR=tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    src = run_cli(env, tmp_path, script=code / "train_gpt.py", RUN_ID="src")
    assert src.returncode == 0, src.stdout[-2000:] + src.stderr[-2000:]
    log = parse_log(tmp_path / "logs" / "src.txt")
    assert log.code_files == {f: (code / f).stat().st_size for f in ("train_gpt.py", "artifact_codec.py", "backoff_mixer.py")}
    assert log.code_raw_bytes == sum(log.code_files.values()) > 2.5 * log.code_bytes

    rec = subprocess.run([sys.executable, str(ROOT / "tools" / "make_record.py"), "--name", "packed", "--date",
                          "2026-01-02", "--non-record", "--root", str(code), "--records-dir", str(tmp_path / "records"),
                          str(tmp_path / "logs" / "src.txt")], capture_output=True, text=True, timeout=120)
    assert rec.returncode == 0, rec.stderr
    folder = tmp_path / "records" / "2026-01-02_packed"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "src.txt", "submission.json", "train_gpt.py"]
    packed = folder / "train_gpt.py"
    assert packed.stat().st_size == log.code_bytes  # the folder holds exactly the counted code
    assert f"`train_gpt.py`, {log.code_bytes:,} B, a self-extracting" in (folder / "README.md").read_text()

    (run_dir := tmp_path / "packed_run").mkdir()
    again = run_cli(env, run_dir, script=packed, RUN_ID="packed")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert log_value(again.stdout, "code_bytes:", "code_bytes") == str(log.code_bytes)
    assert counted(again.stdout) == counted(src.stdout) and finals(again.stdout) == finals(src.stdout)
    total = int(re.search(r"^Total submission size int6\+lzma: (\d+) bytes$", again.stdout, re.M).group(1))
    assert total == (run_dir / "artifacts" / "packed.ptz").stat().st_size + packed.stat().st_size
    unpacked = {p.name: p.read_bytes() for p in (tmp_path / "tmp").glob("pgolf_code_*/*.py")}
    assert unpacked == {f: (code / f).read_bytes() for f in log.code_files}

    two = run_two_ranks([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(packed)],
                        run_dir, dict(env, RUN_ID="two", EVAL_ONLY="1", ARTIFACT=str(run_dir / "artifacts" / "packed.ptz")),
                        timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    two_log = (run_dir / "logs" / "two.txt").read_text()
    assert "world_size:2" in two_log and log_value(two_log, "code_bytes:", "code_bytes") == str(log.code_bytes)
    assert hashlib.sha256(packed.read_bytes()).hexdigest() == hashlib.sha256(train_gpt.pack_code(list(log.code_files), code)).hexdigest()
