"""artifact_codec.py: the artifact's encoding: per-row quantization (clip search or GPTQ), the two brotli streams,
the fit to a byte budget, and the decoder the evaluation runs. Self-contained (torch, brotli); train_gpt.py imports it.

A state dict is encoded tensor by tensor: attention/MLP matrices (names ending in INT6_SUFFIXES) as `bits`-wide
per-row codes q with fp16 scales s (w ~ s q), other matrices of more than SMALL_TENSOR elements as int8 codes the same
way, the rest as floats (fp16 matrices, fp32 vectors). The file: ARTIFACT_MAGIC, the length of the int6 stream, the
int6 stream (brotli of every int6 code, tensor after tensor), the rest (brotli of a JSON header and every other tensor,
byte-shuffled)."""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import brotli
import torch
from torch import Tensor

ARTIFACT_FORMAT, ARTIFACT_MAGIC = "pgolf-int6-v2", b"PGOLFv2\n"
INT6_SUFFIXES = (".attn.q.weight", ".attn.k.weight", ".attn.v.weight", ".attn.proj.weight",
                 ".mlp.up.weight", ".mlp.down.weight")
CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
SMALL_TENSOR = 65_536
BROTLI = {"quality": 11, "lgwin": 24}  # the compressor: it beat LZMA-9 and zstd-22 on every part (docs/artifact.md)


def quantize_rows(w: Tensor, qmax: int, H: Tensor | None = None, damp: float = 0.01, block: int = 128) -> tuple[Tensor, Tensor]:
    """Per-row symmetric quantization q = clamp(round(w/s), -qmax, qmax), s = clip/qmax (fp16), with the row's clip
    chosen among |w| quantiles CLIP_QUANTILES by least squared error; given the input Hessian H, every candidate
    scale goes through GPTQ instead (rows are independent: one pass) and the least output error e H e^T wins."""
    S = (torch.quantile(w.float().abs(), torch.tensor(CLIP_QUANTILES, device=w.device), dim=1) / qmax).clamp_min(1e-10).half()
    Q = (torch.clamp(torch.round(w.float() / S.float()[..., None]), -qmax, qmax) if H is None else
         gptq_rows(w.float().repeat(len(S), 1), H, S.flatten(), qmax, block, damp).view(*S.shape, -1))
    E, rows = w.float() - Q * S.float()[..., None], torch.arange(w.size(0), device=w.device)
    best = (E.square() if H is None else (E @ H.float()) * E).sum(-1).argmin(0)
    return Q[best, rows].to(torch.int8), S[best, rows]


def gptq_rows(w: Tensor, H: Tensor, s: Tensor, qmax: int, block: int, damp: float) -> Tensor:
    """GPTQ at fixed per-row scales s, H damped by damp * mean(diag H): columns rounded in order of decreasing diag(H);
    once column j is, the later columns absorb its error e_j = (w_j - s*q_j)/U_jj times row j of U, the upper Cholesky
    factor of H^-1 (the least-squares update of the unrounded weights for the output error e H e^T), blockwise."""
    order = torch.argsort(H.diag(), descending=True, stable=True)
    H = H[order][:, order].double() + damp * H.diag().mean() * torch.eye(H.size(0), dtype=torch.float64, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    W, s, Q = w.float()[:, order].clone(), s.float(), torch.empty(w.shape, device=w.device)
    for a in range(0, W.size(1), block):
        b, E = min(a + block, W.size(1)), torch.empty_like(W[:, a:a + block])
        for j in range(a, b):
            Q[:, j] = torch.clamp(torch.round(W[:, j] / s), -qmax, qmax)
            E[:, j - a] = (W[:, j] - Q[:, j] * s) / U[j, j]
            W[:, j:b] -= E[:, j - a, None] * U[j, j:b]
        W[:, b:] -= E @ U[a:b, b:]
    return Q[:, torch.argsort(order)]


def dequantize_rows(q: Tensor, s: Tensor) -> Tensor:
    return q.float() * s.float()[:, None]


def quantize_state(state: dict, hessians: dict | None = None, damp: float = 0.01, block: int = 128, bits: int = 6) -> dict:
    """MTP heads dropped; attention/MLP matrices int6 (`bits` wide) per row (GPTQ given their inputs' Hessians, else the
    clip search), other big matrices int8 per row, tensors of <= SMALL_TENSOR elements float (fp16 matrices, fp32 vectors)."""
    out = {}
    for name, t in state.items():
        if name.startswith("mtp_heads."):
            continue
        t, six = t.detach(), name.endswith(INT6_SUFFIXES)
        if six or (t.ndim == 2 and t.numel() > SMALL_TENSOR):
            q, s = quantize_rows(t, 2 ** (bits - 1) - 1 if six else 127, hessians[name] if six and hessians else None, damp, block)
            out[name] = {"kind": "int6" if six else "int8", "q": q.cpu(), "scale": s.cpu()}
        else:
            out[name] = {"kind": "float", "value": (t.half() if t.ndim == 2 else t.float()).cpu()}
    return out


def dequantize_state(qstate: dict) -> dict:
    return {name: dequantize_rows(e["q"], e["scale"]) if e["kind"] in ("int6", "int8") else e["value"].float()
            for name, e in qstate.items()}


def artifact_parts(qstate: dict, meta: dict) -> tuple[bytes, bytes]:
    """The artifact's two compressed streams: the int6 codes, tensor after tensor (the fit recompresses them alone), and
    the rest: a JSON header (format, `meta` (the trainer stores the arch the evaluation builds), a [name, kind, dtype, shape] row per tensor),
    a newline, then per tensor its int8 codes, per-row scales or float values, byte-shuffled (all first bytes, ...)."""
    six, rest, table, shuffled = [], [], [], lambda t: t.flatten().view(torch.uint8).view(-1, t.itemsize).T.numpy().tobytes()
    for name, e in qstate.items():
        t = e["value"] if e["kind"] == "float" else e["q"]
        table.append([name, e["kind"], str(t.dtype)[6:], list(t.shape)])
        (six if e["kind"] == "int6" else rest).append(shuffled(t))
        rest += [shuffled(e["scale"])] if "scale" in e else []
    head = {"format": ARTIFACT_FORMAT, "meta": meta, "tensors": table}
    return tuple(brotli.compress(b"".join(part), **BROTLI) for part in (six, [json.dumps(head).encode(), b"\n", *rest]))


def assemble(six: bytes, rest: bytes) -> bytes:
    """The artifact file: ARTIFACT_MAGIC, the int6 stream's length (uint32 LE), the int6 stream, the rest."""
    return ARTIFACT_MAGIC + len(six).to_bytes(4, "little") + six + rest


def unpack(six: bytes, rest: bytes) -> tuple[dict, dict]:
    """(meta, qstate) from the decompressed streams, each read in table order."""
    head, body = rest.split(b"\n", 1)
    head, streams, pos = json.loads(head), {"int6": six, "rest": body}, {"int6": 0, "rest": 0}

    def take(stream: str, dtype: str, shape: list) -> Tensor:
        dt, n = getattr(torch, dtype), math.prod(shape)
        raw, pos[stream] = streams[stream][pos[stream]:pos[stream] + n * dt.itemsize], pos[stream] + n * dt.itemsize
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt.itemsize, n).T.flatten().view(dt).reshape(shape)
    return head["meta"], {name: {"kind": kind, "value": take("rest", dtype, shape)} if kind == "float" else
                          {"kind": kind, "q": take("int6" if kind == "int6" else "rest", dtype, shape),
                           "scale": take("rest", "float16", shape[:1])} for name, kind, dtype, shape in head["tensors"]}


class ArtifactError(ValueError):
    """The bytes are not a readable artifact of this format."""


def read_artifact(raw: bytes) -> tuple[dict, dict]:
    """(meta, qstate) from an artifact file's bytes; ArtifactError if they are not one."""
    try:
        if raw[:8] != ARTIFACT_MAGIC:
            raise ValueError("no magic")
        n = 12 + int.from_bytes(raw[8:12], "little")
        return unpack(brotli.decompress(raw[12:n]), brotli.decompress(raw[n:]))
    except (brotli.error, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ArtifactError(str(e)) from None


def fit_int6(qstate: dict, hessians: dict | None, budget: int, max_fraction: float) -> tuple[bytes | None, int, int]:
    """Zero the cheapest int6 ±1s (cost s_row^2 * H_jj: the output error added, to first order; 1 under clip): the fewest
    k <= max_fraction of the int6 values whose stream compresses to <= budget, 3 rounds of 8 sizes compressed at once."""
    codes = torch.cat([e["q"].flatten() for e in qstate.values() if e["kind"] == "int6"])
    cost = torch.cat([(e["scale"].float()[:, None] ** 2 * (hessians[n].diag().float().cpu() if hessians else 1)).expand(
        e["q"].shape).flatten() for n, e in qstate.items() if e["kind"] == "int6"])
    cand = torch.nonzero(codes.abs() == 1).squeeze(1)
    cand = cand[torch.argsort(cost[cand], stable=True)][:int(max_fraction * codes.numel())]
    trial = lambda k: brotli.compress(codes.index_fill(0, cand[:k], 0).numpy().tobytes(), **BROTLI)  # noqa: E731
    lo, hi, best = 0, len(cand), None  # k = lo is over budget; k = hi fits once best holds its stream
    with ThreadPoolExecutor(8) as pool:  # brotli releases the GIL
        for _ in range(3):
            ks = sorted({lo + (hi - lo) * i // 8 for i in range(1, 9)} - ({lo, hi} if best else set()))
            for k, blob in zip(ks, pool.map(trial, ks)):
                if len(blob) <= budget:
                    hi, best = k, blob
                    break
                lo = k
            if best is None:  # even k = max_fraction is over
                break
    return best, hi, len(best or blob)
