"""artifact_codec.py: the artifact's encoding: per-row quantization (clip search, GPTQ), the rate control that fills a
byte budget at the least estimated loss, the uniform export and its fit, and the decoder the evaluation runs.
Self-contained (torch, brotli); train_gpt.py imports it.

A matrix is stored as per-row integer codes q (int8 container, width <= 8 bits) with fp16 scales s (w ~ s q), or as
fp16 values; vectors and scalars as fp32, the small matrices of the uniform export as fp16. The file (format pgolf-v3):
ARTIFACT_MAGIC, then length-prefixed (uint32 LE) brotli streams: first the rest (a JSON header, one [name, kind, dtype,
shape] row per tensor, then every float tensor, byte-shuffled), then one stream per matrix in table order (tag 0, its
codes, its byte-shuffled scales; or tag 1, its byte-shuffled fp16 values). One stream per matrix makes every matrix's
compressed size exact and additive, so the size search recompresses only the matrices whose encoding changed, in
parallel."""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import brotli
import torch
from torch import Tensor

ARTIFACT_FORMAT, ARTIFACT_MAGIC = "pgolf-v3", b"PGOLFv3\n"
INT6_SUFFIXES = (".attn.q.weight", ".attn.k.weight", ".attn.v.weight", ".attn.proj.weight",
                 ".mlp.up.weight", ".mlp.down.weight")
CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
SMALL_TENSOR = 65_536
BROTLI = {"quality": 11, "lgwin": 24}  # the compressor: it beat LZMA-9 and zstd-22 on every part (docs/artifact.md)
STEPS = tuple(2.0 ** (i / 4) for i in range(-20, 9))  # the rate control's steps t, in units of the row's RMS: 1/32 .. 4
WIDTHS = (4, 5, 6, 7, 8)  # the clip search's widths under rate control
SEARCH_ROUNDS, AIM = 8, 0.002  # the size search's rounds at most; it aims this fraction under the budget
RESERVE_MARGIN = 1.5  # train_gpt's reserve for calibration + candidates: their timed cost times this


def compress(data: bytes) -> bytes:
    """Every stream of the artifact goes through this one compressor."""
    return brotli.compress(data, **BROTLI)


def shuffled(t: Tensor) -> bytes:
    """A tensor's bytes, byte-shuffled: all first bytes, then all second bytes, ..."""
    return t.flatten().view(torch.uint8).view(-1, t.itemsize).T.numpy().tobytes()


# ----------------------------------------------------------------------------- quantization
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


def gptq_rows(w: Tensor, H: Tensor, s: Tensor, qmax, block: int, damp: float) -> Tensor:
    """GPTQ at fixed per-row scales s and code limits qmax (a number, or one per row), H damped by damp * mean(diag H):
    columns rounded in order of decreasing diag(H); once column j is, the later columns absorb its error
    e_j = (w_j - s*q_j)/U_jj times row j of U, the upper Cholesky factor of H^-1 (the least-squares update of the
    unrounded weights for the output error e H e^T), blockwise."""
    order = torch.argsort(H.diag(), descending=True, stable=True)
    H = H[order][:, order].double() + damp * H.diag().mean() * torch.eye(H.size(0), dtype=torch.float64, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    W, s, Q, lo = w.float()[:, order].clone(), s.float(), torch.empty(w.shape, device=w.device), -qmax
    for a in range(0, W.size(1), block):  # ~10 small kernels per column: on a GPU, launch-bound
        b, E = min(a + block, W.size(1)), torch.empty_like(W[:, a:a + block])
        for j in range(a, b):
            Q[:, j] = torch.clamp(torch.round(W[:, j] / s), lo, qmax)
            E[:, j - a] = (W[:, j] - Q[:, j] * s) / U[j, j]
            W[:, j:b] -= E[:, j - a, None] * U[j, j:b]
        W[:, b:] -= E @ U[a:b, b:]
    return Q[:, torch.argsort(order)]


def dequantize_rows(q: Tensor, s: Tensor) -> Tensor:
    return q.float() * s.float()[:, None]


def quantize_state(state: dict, stats: dict | None = None, damp: float = 0.01, block: int = 128, bits: int = 6) -> dict:
    """The uniform export (RATE_CONTROL=0): MTP heads dropped; attention/MLP matrices int6 (`bits` wide) per row (GPTQ
    given their inputs' Hessians stats[name]["H"], else the clip search), other big matrices int8 per row, tensors of
    <= SMALL_TENSOR elements float (fp16 matrices, fp32 vectors)."""
    out = {}
    for name, t in state.items():
        if name.startswith("mtp_heads."):
            continue
        t, six = t.detach(), name.endswith(INT6_SUFFIXES)
        if six or (t.ndim == 2 and t.numel() > SMALL_TENSOR):
            H = stats[name]["H"] if six and stats else None
            q, s = quantize_rows(t, 2 ** (bits - 1) - 1 if six else 127, H, damp, block)
            out[name] = {"kind": "int6" if six else "int8", "q": q.cpu(), "scale": s.cpu()}
        else:
            out[name] = {"kind": "float", "value": (t.half() if t.ndim == 2 else t.float()).cpu()}
    return out


def dequantize_state(qstate: dict) -> dict:
    return {name: e["value"].float() if "value" in e else dequantize_rows(e["q"], e["scale"]) for name, e in qstate.items()}


# ----------------------------------------------------------------------------- rate control
# The loss's second-order change when a matrix W (rows x cols) becomes W - E, from the calibration statistics
# (train_gpt.collect_stats, n positions): a linear layer y = x W^T changes its output by E x, which costs
# ~ sum_t sum_r g_tr^2 (e_r . x_t)^2 with g_tr = dL/dy_tr; taking g^2 and x apart, sum_r (g_r / n) e_r H e_r^T with
# g_r = sum_t g_tr^2 and H = sum_t x_t x_t^T. An embedding table read by lookup changes its output by row e_v at the
# positions that read v: sum_v sum_j F_vj e_vj^2, F_vj = the squared gradients summed there. The tied embedding has both.
def row_distortion(E: Tensor, st: dict) -> Tensor:
    """[..., rows, cols] errors -> [..., rows] estimated loss increase per row (above); g = 1 and n = 1 when absent;
    without statistics, the squared error."""
    d = torch.zeros(E.shape[:-1], dtype=torch.float64, device=E.device) if "H" in st or "F" in st else E.square().sum(-1).double()
    if "H" in st:
        d += ((E @ st["H"].float()) * E).sum(-1).double() * (st["g"] / st["n"] if "g" in st else 1)
    if "F" in st:
        d += (st["F"].float() * E.square()).sum(-1).double()
    return d


def candidates(w: Tensor, st: dict, gptq: bool, damp: float, block: int) -> dict:
    """Every encoding the rate control may pick for matrix w: labels, distortions D (row_distortion summed) and
    predicted bytes, per candidate; codes "q" [C, rows, cols] (int8) and fp16 scales [C, rows] of the C coded ones;
    the last candidate is w in fp16 ("value"). Steps: scale = t * rms(row) for each t in STEPS, codes up to +-127
    (unclipped but for the widest rows at the finest steps; the step sets the rate: about 2.05 - log2 t bits per
    Gaussian entry); clip search: for each width b in WIDTHS, each row takes the CLIP_QUANTILES scale of least
    distortion (RATE_CONTROL=0's rule at b bits). GPTQ in the loop for a linear layer's matrix (gptq, st["H"] given and
    no per-entry weights F)."""
    w, n = w.detach().float(), len(STEPS)
    qm = torch.tensor([2.0 ** (b - 1) - 1 for b in WIDTHS], device=w.device)
    S = torch.cat([torch.tensor(STEPS, device=w.device)[:, None] * w.square().mean(1).sqrt(),
                   (torch.quantile(w.abs(), torch.tensor(CLIP_QUANTILES, device=w.device), dim=1)[None] / qm[:, None, None]).flatten(0, 1)])
    S = S.half().clamp_min(2.0 ** -24)  # the smallest positive fp16: no zero scale
    qmax = torch.cat([torch.full((n,), 127.0, device=w.device), qm.repeat_interleave(len(CLIP_QUANTILES))])[:, None].expand(S.shape)
    if gptq and "H" in st and "F" not in st and st["H"].diag().max() > 0:  # (an input that is all zeros needs no GPTQ)
        Q = gptq_rows(w.repeat(len(S), 1), st["H"], S.flatten(), qmax.flatten(), block, damp).view(*S.shape, -1)
    else:
        Q = torch.minimum(torch.maximum(torch.round(w / S.float()[..., None]), -qmax[..., None]), qmax[..., None])
    D = row_distortion(w - Q * S.float()[..., None], st)  # [groups, rows]
    pick = D[n:].view(len(WIDTHS), len(CLIP_QUANTILES), -1).argmin(1)  # each row's clip at each width: [widths, rows]
    widths, rows = torch.arange(len(WIDTHS), device=w.device)[:, None], torch.arange(w.size(0), device=w.device)

    def keep(X: Tensor) -> Tensor:  # the steps' groups, then per width the rows' picks
        return torch.cat([X[:n], X[n:].view(len(WIDTHS), len(CLIP_QUANTILES), *X.shape[1:])[widths, pick, rows]])
    Q, S, D, half = keep(Q).to(torch.int8), keep(S), keep(D).sum(-1), w.half()
    pred = [16 + entropy_bytes(q.flatten().view(torch.uint8)) + 2 * len(s) for q, s in zip(Q, S)]  # 16: a stream's own cost
    bits = [1 + math.ceil(math.log2(int(q.abs().max()) + 1)) for q in Q]  # the width each candidate's codes need
    return {"labels": [f"step{t:.3g}/int{b}" for t, b in zip(STEPS, bits)] + [f"clip/int{b}" for b in bits[n:]] + ["fp16"], "q": Q, "scale": S,
            "value": half, "D": D.tolist() + [row_distortion(w - half.float(), st).sum().item()],
            "pred": pred + [16 + entropy_bytes(half.flatten().view(torch.uint8)[0::2]) + entropy_bytes(half.flatten().view(torch.uint8)[1::2])]}


def candidates_seconds(shapes: list, device, gptq: bool, damp: float, block: int) -> float:
    """The candidates' time for matrices of these shapes, from one timed matrix per distinct shape: their work depends
    on the shape alone (here random weights, an identity Hessian, unit gradients)."""
    seconds = {}
    for r, c in sorted(set(map(tuple, shapes))):
        st = {"H": torch.eye(c, dtype=torch.float64, device=device), "g": torch.ones(r, dtype=torch.float64, device=device), "n": 1}
        t = time.perf_counter()
        candidates(torch.randn(r, c, device=device), st, gptq, damp, block)  # it reads its results back: synchronized
        seconds[r, c] = time.perf_counter() - t
    return sum(seconds[tuple(s)] for s in shapes)


def entry(cands: dict, c: int) -> dict:
    """Candidate c of a matrix as a quantized-state entry: codes and scales, or fp16 values."""
    return {"kind": "q", "value": cands["value"]} if c == len(cands["q"]) else {"kind": "q", "q": cands["q"][c], "scale": cands["scale"][c]}


def entropy_bytes(x: Tensor) -> float:
    """The order-0 entropy of a byte tensor, in bytes."""
    counts = torch.bincount(x.long(), minlength=256).double()
    return -(counts * torch.log2((counts / x.numel()).clamp_min(1e-300))).sum().item() / 8


def lower_hull(D: list[float], B: list[float]) -> list[int]:
    """The candidates on the lower convex hull of (bytes, distortion), by increasing bytes: the only ones a Lagrange
    multiplier can pick."""
    hull = []
    for c in sorted(range(len(B)), key=lambda c: (B[c], D[c])):
        if hull and D[c] >= D[hull[-1]]:
            continue  # more bytes, no less distortion
        while len(hull) >= 2 and (D[hull[-1]] - D[hull[-2]]) * (B[c] - B[hull[-1]]) >= (D[c] - D[hull[-1]]) * (B[hull[-1]] - B[hull[-2]]):
            hull.pop()  # hull[-1] lies on or above the chord from hull[-2] to c
        hull.append(c)
    return hull


def allocate(D: list[list[float]], B: list[list[float]], budget: float) -> tuple[list[int], float]:
    """Each matrix's candidate, least total distortion for total bytes <= budget: every matrix starts at its smallest
    candidate; hull steps are taken in order of distortion saved per byte (one Lagrange multiplier swept down), each
    while the total stays within the budget (a step that does not fit ends its matrix's climb; smaller steps of other
    matrices still fill the rest). Returns (choice, total)."""
    hulls = [lower_hull(d, b) for d, b in zip(D, B)]
    choice = [h[0] for h in hulls]
    total = sum(b[c] for b, c in zip(B, choice))
    steps = sorted(((D[m][c0] - D[m][c1]) / (B[m][c1] - B[m][c0]), m, c0, c1)
                   for m, h in enumerate(hulls) for c0, c1 in zip(h, h[1:]))
    for _, m, c0, c1 in reversed(steps):
        if choice[m] == c0 and total + B[m][c1] - B[m][c0] <= budget:
            choice[m], total = c1, total + B[m][c1] - B[m][c0]
    return choice, total


def estimated(pred: list[float], exact: dict) -> list[float]:
    """A matrix's candidates' bytes in the artifact (4 + the stream): exact once compressed, else the prediction times
    the ratio real / predicted of the compressed candidate nearest in predicted size (1 before any)."""
    def ratio(c: int) -> float:
        k = min(exact, key=lambda k: abs(math.log(pred[k] / pred[c])), default=None)
        return 1.0 if k is None else len(exact[k]) / pred[k]
    return [4 + (len(exact[c]) if c in exact else ratio(c) * p) for c, p in enumerate(pred)]


def rate_control(cands: dict, fixed: int, budget: int, workers: int, log) -> tuple[dict, dict, int, str]:
    """The size search: each matrix's candidate such that fixed + its streams (4 + compressed bytes each) <= budget at
    the least total distortion. Round by round: allocate on the bytes known so far (`estimated`), aiming AIM under the
    budget (further only when rounds keep missing), compress what it chose and had not compressed (in parallel), until
    a round's choice is all exact. Deterministic: every rank runs it alike, with no collective. Returns (choice {name:
    index}, streams {name: compressed}, total, over): when even every matrix's smallest candidate is over, over says so
    and the total is that floor, else over is empty; of the rounds that fit, the least distortion wins."""
    names, exact, best = list(cands), {n: {} for n in cands}, None
    D = [cands[n]["D"] for n in names]
    with ThreadPoolExecutor(workers) as pool:
        for rnd in range(SEARCH_ROUNDS):
            t0 = time.perf_counter()
            B = [estimated(cands[n]["pred"], exact[n]) for n in names]
            choice, predicted = allocate(D, B, budget * (1 - AIM * max(1, rnd - 2)) - fixed)
            todo = [(n, c) for n, c in zip(names, choice) if c not in exact[n]]
            for (n, c), blob in zip(todo, pool.map(lambda nc: compress(stream_bytes(entry(cands[nc[0]], nc[1]))), todo)):
                exact[n][c] = blob
            total, dist = fixed + sum(4 + len(exact[n][c]) for n, c in zip(names, choice)), sum(d[c] for d, c in zip(D, choice))
            log(f"rate_search round:{rnd} predicted:{fixed + predicted:.0f} actual:{total} error:{(fixed + predicted) / total - 1:+.4%} "
                f"compressed:{len(todo)} distortion:{dist:.6g} time:{time.perf_counter() - t0:.2f}s")
            if total <= budget and (best is None or dist < best[0]):
                best = (dist, dict(zip(names, choice)), total)
            if not todo:
                break  # all exact: it fits, or even the smallest candidates are over (the floor)
    dist, choice, total = best or (dist, dict(zip(names, choice)), total)
    log(f"rate_control total:{total} target:{budget} ({total / budget:.4%}) bits_per_weight:"
        f"{8 * (total - fixed) / sum(c['value'].numel() for c in cands.values()):.3f} choice:"
        + ",".join(f"{n.removesuffix('.weight')}={cands[n]['labels'][c]}" for n, c in choice.items()))
    return choice, {n: exact[n][c] for n, c in choice.items()}, total, "" if best else "the floor: every matrix at its smallest encoding"


# ----------------------------------------------------------------------------- layout
def stream_bytes(e: dict) -> bytes:
    """A tensor's own stream, uncompressed: tag 0, its codes (row-major) and byte-shuffled fp16 scales; or tag 1 and
    its byte-shuffled fp16 values."""
    return b"\x01" + shuffled(e["value"].cpu()) if "value" in e else b"\x00" + e["q"].cpu().numpy().tobytes() + shuffled(e["scale"].cpu())


def rest_stream(qstate: dict, meta: dict) -> bytes:
    """The first stream: a JSON header (format, `meta` (the trainer stores the arch the evaluation builds), a
    [name, kind, dtype, shape] row per tensor; kind "float" or the kind of a tensor with its own stream, its dtype
    then "int8"), a newline, then every float tensor's values, byte-shuffled."""
    table = [[n, e["kind"], str(e["value"].dtype)[6:] if e["kind"] == "float" else "int8",
              list((e["value"] if "value" in e else e["q"]).shape)] for n, e in qstate.items()]
    head = json.dumps({"format": ARTIFACT_FORMAT, "meta": meta, "tensors": table}).encode()
    return compress(b"".join([head, b"\n"] + [shuffled(e["value"]) for e in qstate.values() if e["kind"] == "float"]))


def assemble(rest: bytes, streams: list[bytes]) -> bytes:
    """The artifact file: ARTIFACT_MAGIC, then each stream (the rest, then the quantized tensors') prefixed by its length."""
    return ARTIFACT_MAGIC + b"".join(len(s).to_bytes(4, "little") + s for s in [rest, *streams])


class ArtifactError(ValueError):
    """The bytes are not a readable artifact of this format."""


def read_artifact(raw: bytes) -> tuple[dict, dict]:
    """(meta, qstate) from an artifact file's bytes; ArtifactError if they are not one."""
    try:
        if raw[:8] != ARTIFACT_MAGIC:
            raise ValueError("no magic")
        streams, pos = [], 8
        while pos < len(raw):
            n = int.from_bytes(raw[pos:pos + 4], "little")
            if pos + 4 + n > len(raw):
                raise ValueError("truncated")
            streams.append(brotli.decompress(raw[pos + 4:pos + 4 + n]))
            pos += 4 + n
        head, body = streams[0].split(b"\n", 1)
        head, floats, quant, qstate = json.loads(head), 0, iter(streams[1:]), {}
        if head["format"] != ARTIFACT_FORMAT:
            raise ValueError(f"format {head['format']}")
        for name, kind, dtype, shape in head["tensors"]:
            if kind == "float":
                dt = getattr(torch, dtype)
                qstate[name] = {"kind": kind, "value": unshuffle(body[floats:floats + math.prod(shape) * dt.itemsize], dt, shape)}
                floats += math.prod(shape) * dt.itemsize
            else:
                qstate[name] = {"kind": kind, **decode_stream(next(quant), shape)}
        if next(quant, None) is not None or floats != len(body):
            raise ValueError("streams left over")
        return head["meta"], qstate
    except (brotli.error, ValueError, KeyError, TypeError, RuntimeError, StopIteration) as e:
        raise ArtifactError(str(e) or type(e).__name__) from None


def unshuffle(raw: bytes, dt: torch.dtype, shape: list) -> Tensor:
    n = math.prod(shape)
    if len(raw) != n * dt.itemsize:
        raise ValueError("size mismatch")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt.itemsize, n).T.flatten().view(dt).reshape(shape)


def decode_stream(raw: bytes, shape: list) -> dict:
    """stream_bytes, undone."""
    if raw[:1] == b"\x01":
        return {"value": unshuffle(raw[1:], torch.float16, shape)}
    if raw[:1] != b"\x00":
        raise ValueError("unknown stream tag")
    n = math.prod(shape)
    return {"q": torch.frombuffer(bytearray(raw[1:1 + n]), dtype=torch.int8).reshape(shape),
            "scale": unshuffle(raw[1 + n:], torch.float16, shape[:1])}


# ----------------------------------------------------------------------------- the uniform export (RATE_CONTROL=0) and its fit
def fit_uniform(qstate: dict, stats: dict | None, fixed: int, budget: int, max_fraction: float, workers: int, log) -> tuple[dict, int, str]:
    """The uniform export's streams and total (fixed + 4 + compressed bytes per quantized tensor); over budget, with
    the fewest cheapest int6 ±1s zeroed that fit (fit_int6). Returns (streams, total, over): over says by how much
    even max_fraction misses (the streams are then the unfitted ones), else it is empty."""
    quant = [n for n, e in qstate.items() if e["kind"] != "float"]
    with ThreadPoolExecutor(workers) as pool:
        streams = dict(zip(quant, pool.map(lambda n: compress(stream_bytes(qstate[n])), quant)))
    total = fixed + sum(4 + len(s) for s in streams.values())
    log(f"export uniform total:{total} bytes")
    if total <= budget:
        return streams, total, ""
    rest = total - sum(4 + len(s) for n, s in streams.items() if qstate[n]["kind"] == "int6")
    fitted, k, at_k = fit_int6(qstate, stats, budget - rest, max_fraction, workers)
    if fitted is None:
        return streams, total, f"by {rest + at_k - budget} with FIT_MAX_FRACTION zeroed"
    n6 = sum(e["q"].numel() for e in qstate.values() if e["kind"] == "int6")
    log(f"fit_to_cap: total {total} -> {rest + at_k} bytes zeroed:{k}/{n6} int6 values ({k / n6:.4%})")
    return {**streams, **fitted}, rest + at_k, ""


def fit_int6(qstate: dict, stats: dict | None, budget: int, max_fraction: float, workers: int = 8) -> tuple[dict | None, int, int]:
    """Zero the cheapest int6 ±1s (cost s_row^2 * H_jj: the output error added, to first order; 1 under clip): the fewest
    k <= max_fraction of the int6 values whose streams (4 + compressed bytes each) take <= budget bytes in all; 3 rounds
    of 8 counts, compressed in parallel. Returns ({name: stream} at k or None, k, bytes at k)."""
    six = [n for n, e in qstate.items() if e["kind"] == "int6"]
    codes = torch.cat([qstate[n]["q"].flatten() for n in six])
    cost = torch.cat([(qstate[n]["scale"].float()[:, None] ** 2 * (stats[n]["H"].diag().float().cpu() if stats else 1)).expand(
        qstate[n]["q"].shape).flatten() for n in six])
    cand = torch.nonzero(codes.abs() == 1).squeeze(1)
    cand = cand[torch.argsort(cost[cand], stable=True)][:int(max_fraction * codes.numel())]
    ends = torch.tensor([qstate[n]["q"].numel() for n in six]).cumsum(0).tolist()

    def trial(k):
        z = codes.index_fill(0, cand[:k], 0)
        return {n: compress(stream_bytes(dict(qstate[n], q=z[e - qstate[n]["q"].numel():e].view_as(qstate[n]["q"]))))
                for n, e in zip(six, ends)}
    size = lambda streams: sum(4 + len(s) for s in streams.values())  # noqa: E731
    lo, hi, best = 0, len(cand), None  # k = lo is over budget; k = hi fits once best holds its streams
    with ThreadPoolExecutor(workers) as pool:
        for _ in range(3):
            ks = sorted({lo + (hi - lo) * i // 8 for i in range(1, 9)} - ({lo, hi} if best else set()))
            for k, streams in zip(ks, pool.map(trial, ks)):
                if size(streams) <= budget:
                    hi, best = k, streams
                    break
                lo = k
            if best is None:  # even k = max_fraction is over
                break
    return best, hi, size(best or streams)
