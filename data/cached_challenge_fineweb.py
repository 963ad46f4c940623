"""Fetch the competition's tokenized FineWeb (shards + tokenizer) from the Hugging Face Hub.

    python data/cached_challenge_fineweb.py [--variant sp1024] [--train-shards N] [--data-root DIR]

Reads the published manifest (dataset repo willdepueoai/parameter-golf, export under datasets/),
then downloads every val shard, the first N train shards and the tokenizer model into
data/datasets/fineweb10B_<variant>/ and data/tokenizers/. Files already present and valid are
skipped; every shard is checked with train_gpt.read_shard_header before it is put in place. Any
failure (no network, missing file, bad shard) is one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from train_gpt import HEADER_BYTES, UserError, read_shard_header  # noqa: E402

REPO_ID = os.environ.get("MATCHED_FINEWEB_REPO_ID", "willdepueoai/parameter-golf")
REMOTE_ROOT = "datasets"  # the export's folder inside the dataset repo
DATA_ROOT = ROOT / "data"
DEFAULT_TRAIN_SHARDS = 80  # the competition's 8B training tokens


def manifest_remote_path() -> str:
    return f"{REMOTE_ROOT}/manifest.json"


def local_path(remote: str, data_root: Path) -> Path:
    """Where a repo file lives locally: <root>/datasets/... and <root>/tokenizers/... keep their place
    under data_root; anything else (the manifest) goes to data_root/datasets/. Refuses paths that
    would land outside data_root."""
    parts = PurePosixPath(remote).parts
    if len(parts) < 2 or parts[0] != REMOTE_ROOT or ".." in parts:
        raise UserError(f"manifest names an unexpected file {remote!r}; is {REPO_ID} the right repo?")
    inner = parts[1:]
    if inner[0] not in ("datasets", "tokenizers"):
        inner = ("datasets",) + inner
    return data_root.joinpath(*inner)


def plan_downloads(manifest: dict, variant: str, train_shards: int | None) -> list[str]:
    """Repo paths to fetch for a variant: all val shards, the first train_shards train shards
    (None = the default 80, or all if fewer), then the tokenizer model."""
    name = f"fineweb10B_{variant}"
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        known = sorted(d.get("name", "?") for d in manifest.get("datasets", []))
        raise UserError(f"dataset {name} is not in the manifest (it lists {', '.join(known) or 'nothing'})")
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards is None:
        train_shards = min(DEFAULT_TRAIN_SHARDS, n_train)
    if not 0 <= train_shards <= n_train:
        raise UserError(f"--train-shards {train_shards} is outside 0..{n_train}, the train shards {name} has")
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tok is None or not tok.get("model_path"):
        raise UserError(f"the manifest has no tokenizer model for {name} (tokenizer {entry.get('tokenizer_name')!r})")
    prefix = f"{REMOTE_ROOT}/datasets/{name}"
    return ([f"{prefix}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
            + [f"{prefix}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
            + [f"{REMOTE_ROOT}/tokenizers/{PurePosixPath(tok['model_path']).name}"])


def is_valid(path: Path) -> bool:
    """True if the file exists and, for a shard, has a correct header and size."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    if path.suffix == ".bin":
        if path.stat().st_size < HEADER_BYTES:
            return False
        try:
            read_shard_header(path)
        except UserError:
            return False
    return True


def check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when the Hub's host cannot be reached (huggingface_hub would retry
    for ~25 s, logging each try). Skipped behind a proxy, where a direct connection proves nothing."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        raise UserError(f"cannot reach the Hugging Face Hub at {endpoint} ({e.strerror or e}); "
                        f"check the network or set HF_ENDPOINT") from None


def hub_download(remote: str, staging: Path) -> Path:
    """Download one repo file into the staging folder (beside its destination, so a rename puts it in
    place without a second copy); network and Hub failures become one-line UserErrors."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    from huggingface_hub.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # no per-retry warnings: failures are reported once, below
    if not constants.HF_HUB_OFFLINE:
        check_reachable(constants.ENDPOINT)
    try:
        return Path(hf_hub_download(repo_id=REPO_ID, filename=remote, repo_type="dataset", local_dir=staging))
    except LocalEntryNotFoundError as e:  # raised when the Hub cannot be reached and nothing is cached
        cause = e.__cause__ or e.__context__ or e
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{type(cause).__name__}: {first_line(cause)}"
        raise UserError(f"cannot reach the Hugging Face Hub ({reason}); "
                        f"check the network or set HF_ENDPOINT") from None
    except (EntryNotFoundError, RepositoryNotFoundError):
        raise UserError(f"{remote} is not in the Hub dataset {REPO_ID}") from None
    except HfHubHTTPError as e:
        raise UserError(f"the Hugging Face Hub refused {remote}: {first_line(e)}") from None
    except OSError as e:
        raise UserError(f"cannot download {remote} ({type(e).__name__}: {first_line(e)}); "
                        f"check the network, disk space or HF_ENDPOINT") from None


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def install(source: Path, dest: Path) -> None:
    """Move a downloaded file to dest with one atomic rename; a shard is validated first (and dropped if bad)."""
    if dest.suffix == ".bin":
        try:
            read_shard_header(source)
        except UserError:
            source.unlink()
            raise
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, dest)


def load_manifest(data_root: Path, staging: Path) -> dict:
    """The local manifest if present, else the Hub's."""
    path = local_path(manifest_remote_path(), data_root)
    if not is_valid(path):
        install(hub_download(manifest_remote_path(), staging), path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"manifest {path} is unreadable ({first_line(e)}); delete it and rerun") from None


def fetch(variant: str, train_shards: int | None, data_root: Path = DATA_ROOT) -> tuple[int, int]:
    """Download what is missing; returns (files fetched, files already present)."""
    fetched = skipped = 0
    staging = data_root / "datasets" / f".download.{os.getpid()}"
    try:
        for remote in plan_downloads(load_manifest(data_root, staging), variant, train_shards):
            dest = local_path(remote, data_root)
            if is_valid(dest):
                skipped += 1
                continue
            install(hub_download(remote, staging), dest)
            fetched += 1
            print(f"fetched {dest}", flush=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return fetched, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="sp1024", help="tokenizer family, e.g. sp1024 (fineweb10B_sp1024)")
    parser.add_argument("--train-shards", type=int, default=None,
                        help=f"number of train shards (100M tokens each); default {DEFAULT_TRAIN_SHARDS}")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT,
                        help="folder that receives datasets/ and tokenizers/ (default: this repo's data/)")
    args = parser.parse_args()
    try:
        fetched, skipped = fetch(args.variant, args.train_shards, args.data_root.resolve())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # train_gpt's exit code for a UserError
    print(f"fineweb10B_{args.variant}: {fetched} files fetched, {skipped} already present, "
          f"in {args.data_root / 'datasets'} and {args.data_root / 'tokenizers'}")


if __name__ == "__main__":
    main()
