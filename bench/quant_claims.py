"""Quantization and artifact-size claims (issues 15 and 23), measured on CPU-preset models trained by train_gpt's own code.

    python bench/quant_claims.py train --seed 1337 --out /tmp/quant   # 5-30 min: trains, saves the float state
    python bench/quant_claims.py measure --out /tmp/quant             # round-trip gap and layer error, clip vs GPTQ
    python bench/quant_claims.py variants --out /tmp/quant            # GPTQ's settings and scale rule (seed 1337)
    python bench/quant_claims.py sizes --out /tmp/quant               # bytes per parameter by compressor and layout
    python bench/quant_claims.py fit --out /tmp/quant                 # cost of fitting: BPB against values zeroed
    python bench/quant_claims.py record --out /tmp/quant              # record-size state: sizes and export timings
    python bench/quant_claims.py rate --out /tmp/quant                # rate control: round trip against bytes, 3 rules
    python bench/quant_claims.py rate_table --out /tmp/quant          # its tables (docs/artifact.md)
    python bench/quant_claims.py plan                                 # shapes that fill 16 MB at 3.5/4.2/4.7 bits/param

`train` runs exactly what `python train_gpt.py` runs on CPU (the CPU preset, SEED, same seeding, same train()),
then saves the post-EMA float weights (artifacts hold only the quantized ones) and the training stream's next
tokens: the first CALIB for calibration (what the export uses), the following HELDOUT for measuring the layer
output error on training text the calibration never saw.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import lzma
import math
import os
import re
import sys
import time
import types
from pathlib import Path

import brotli
import numpy as np
import torch
import zstandard

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
import artifact_codec as ac  # noqa: E402
import train_gpt as tg  # noqa: E402

CALIB, HELDOUT = 131072, 65536  # tokens; the bench calibrates on prefixes of CALIB


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in {h.name for h in tg.HPARAMS}}
    return dict(env, **{k: str(v) for k, v in extra.items()})


def setup(seed: int):
    """(args, ctx, val_tokens, luts) of a CPU-preset run with this seed, as train_gpt.run sets them up."""
    args = tg.Hyperparameters(clean_env(SEED=seed), preset="cpu")
    ctx = tg.DistContext(args)
    tg.resolve_data(args, print)
    luts = tg.build_byte_luts(tg.load_tokenizer(args.tokenizer_path, args.vocab_size), args.vocab_size)
    val = tg.load_validation_tokens(os.path.join(args.data_path, "fineweb_val_*.bin"), args.vocab_size,
                                    max(args.eval_seq_len, args.train_seq_len) + 1)
    return args, ctx, val, luts


def cmd_train(a):
    args, ctx, val, luts = setup(a.seed)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = tg.build_model(args).to(ctx.device)
    steps, stream, _ = tg.train(args, model, val, luts, ctx, print)
    loss, bpb = tg.eval_val(tg.make_stats_fn(model, args), val, luts, args.train_seq_len, args.val_batch_size, ctx)
    print(f"post_ema val_loss:{loss:.4f} val_bpb:{bpb:.4f} steps:{steps} ({time.perf_counter() - t0:.0f}s)")
    calib = stream.take(CALIB)
    out = Path(a.out) / f"seed{a.seed}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "calib": calib, "heldout": stream.take(HELDOUT), "seed": a.seed,
                "post_ema": (loss, bpb), "hparams": args.as_dict()}, out)
    print(f"saved {out}")


CPU = torch.device("cpu")
CTX = types.SimpleNamespace(rank=0, world=1, device=CPU, sync=lambda: None, broadcast=lambda obj: obj)
QMAX = {6: 31, 5: 15, 4: 7, 3: 3}


def hessians(model, tokens, args) -> dict:
    """{name: H = X^T X} of every linear layer's input over these tokens (train_gpt.collect_stats without gradients)."""
    return {n: st["H"] for n, st in tg.collect_stats(model, tokens, args.train_seq_len, CTX, False).items() if "H" in st}


def load_seed(path):
    """(saved dict, args, post-EMA float model) of a `train` output."""
    d = torch.load(path, weights_only=False)
    args = tg.Hyperparameters(clean_env(SEED=d["seed"]), preset="cpu")
    model = tg.build_model(args)
    model.load_state_dict(d["state"])
    return d, args, model.eval()


def quantized(model, H, bits, quant, damp=0.01, block=128, calib_scale=False):
    """quantize_state with the int6 matrices at `bits` (clip search, or GPTQ with Hessians H); calib_scale: GPTQ at
    the clip search's scales instead of the clip choice in the loop."""
    qs, sd = ac.quantize_state(model.state_dict()), model.state_dict()
    for n, e in qs.items():
        if e["kind"] != "int6" or (quant == "clip" and bits == 6):
            continue
        w, qmax = sd[n], QMAX[bits]
        if quant == "clip":
            e["q"], e["scale"] = ac.quantize_rows(w, qmax)
        elif calib_scale:
            e["scale"] = ac.quantize_rows(w, qmax)[1]
            e["q"] = ac.gptq_rows(w, H[n], e["scale"], qmax, block, damp).to(torch.int8)
        else:
            e["q"], e["scale"] = ac.quantize_rows(w, qmax, H[n], damp, block)
    return qs


def roundtrip_bpb(qs, args, val, luts) -> float:
    """What the evaluation's final_int6_roundtrip line reports for this quantized state."""
    m = tg.build_eval_model(args.arch(), ac.dequantize_state(qs), "bench", CPU).eval()
    return tg.eval_val(tg.make_stats_fn(m, args), val, luts, args.eval_seq_len, args.val_batch_size, CTX)[1]


def layer_errors(model, qs, H) -> dict:
    """||X W^T - X Ŵ^T||^2 / ||X W^T||^2 per int6 matrix, X = held-out activations (H = X^T X): tr(E H E^T)/tr(W H W^T)."""
    sd, out = model.state_dict(), {}
    for n, e in qs.items():
        if e["kind"] == "int6":
            W = sd[n].double()
            E = W - ac.dequantize_rows(e["q"], e["scale"]).double()
            out[n] = ((E @ H[n]) * E).sum().item() / ((W @ H[n]) * W).sum().item()
    return out


def kind_means(errs: dict) -> dict:
    kinds = {}
    for n, v in errs.items():
        kinds.setdefault(n.split(".")[-2], []).append(v)
    return {k: sum(v) / len(v) for k, v in kinds.items()}


def cmd_measure(a):
    rows = []
    for path in sorted(Path(a.out).glob("seed*.pt")):
        d, args, model = load_seed(path)
        _, _, val, luts = setup(d["seed"])
        t0 = time.perf_counter()
        post = tg.eval_val(tg.make_stats_fn(model, args), val, luts, args.train_seq_len, args.val_batch_size, CTX)[1]
        calib = d["calib"][:args.gptq_calib_tokens]
        H, Hh = hessians(model, calib, args), hessians(model, d["heldout"], args)
        row = {"seed": d["seed"], "post_ema_bpb": post, "saved_post_ema_bpb": d["post_ema"][1], "calib_tokens": calib.numel()}
        for bits in a.bits:
            for quant in ("clip", "gptq"):
                t = time.perf_counter()
                qs = quantized(model, H, bits, quant)
                qt = time.perf_counter() - t
                errs = layer_errors(model, qs, Hh)
                bpb = roundtrip_bpb(qs, args, val, luts)
                row[f"int{bits}_{quant}"] = {"roundtrip_bpb": bpb, "gap": bpb - post, "quantize_s": qt,
                                             "layer_err_mean": sum(errs.values()) / len(errs), "by_kind": kind_means(errs)}
                print(json.dumps({"seed": d["seed"], "bits": bits, "quant": quant, **row[f"int{bits}_{quant}"]}), flush=True)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        Path(a.out, f"measure_seed{d['seed']}.json").write_text(json.dumps(row, indent=1))
    print_table(rows, a.bits)


def print_table(rows, bits):
    print("| seed | width | post-EMA BPB | round trip clip | round trip GPTQ | gap clip | gap GPTQ | layer err clip | layer err GPTQ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for b in bits:
            c, g = r[f"int{b}_clip"], r[f"int{b}_gptq"]
            print(f"| {r['seed']} | int{b} | {r['post_ema_bpb']:.4f} | {c['roundtrip_bpb']:.4f} | {g['roundtrip_bpb']:.4f} | "
                  f"{c['gap']:+.4f} | {g['gap']:+.4f} | {c['layer_err_mean']:.5f} | {g['layer_err_mean']:.5f} |")


VARIANTS = {  # name -> quantized() keywords; calib = calibration tokens
    "clip": dict(quant="clip"), "gptq": dict(quant="gptq"), "gptq fixed scale": dict(quant="gptq", calib_scale=True),
    "gptq damp 0.001": dict(quant="gptq", damp=0.001), "gptq damp 0.1": dict(quant="gptq", damp=0.1),
    "gptq calib 16384": dict(quant="gptq", calib=16384), "gptq calib 131072": dict(quant="gptq", calib=131072),
    "gptq block 32": dict(quant="gptq", block=32),
    "gptq calib 2nd window": dict(quant="gptq", calib=(65536, 131072)),  # the same count, other tokens: the noise
    "gptq calib 3rd window": dict(quant="gptq", calib=(32768, 98304))}
BPB_VARIANTS = ("clip", "gptq", "gptq fixed scale", "gptq damp 0.1", "gptq calib 16384", "gptq calib 2nd window",
                "gptq calib 3rd window")


def cmd_variants(a):
    d, args, model = load_seed(Path(a.out) / f"seed{a.seed}.pt")
    _, _, val, luts = setup(d["seed"])
    Hh = hessians(model, d["heldout"], args)
    Hs = {}
    out = {}
    for bits in a.bits:
        for name, kw in VARIANTS.items():
            if a.names and name not in a.names.split(","):
                continue
            kw = dict(kw)
            calib = kw.pop("calib", (0, args.gptq_calib_tokens))
            calib = (0, calib) if isinstance(calib, int) else calib
            if calib not in Hs:
                Hs[calib] = hessians(model, d["calib"][calib[0]:calib[1]], args)
            t = time.perf_counter()
            qs = quantized(model, Hs[calib], bits, **kw)
            res = {"quantize_s": time.perf_counter() - t, "layer_err_mean": float(np.mean(list(layer_errors(model, qs, Hh).values())))}
            if bits == min(a.bits) and name in BPB_VARIANTS:
                res["roundtrip_bpb"] = roundtrip_bpb(qs, args, val, luts)
            out[f"int{bits} {name}"] = res
            print(json.dumps({f"int{bits} {name}": res}), flush=True)
    Path(a.out, f"variants_seed{a.seed}.json").write_text(json.dumps(out, indent=1))


def old_layout(qs, args) -> bytes:
    """What the code before format v2 wrote, uncompressed: torch.save of {format, meta, tensors}."""
    buf = io.BytesIO()
    torch.save({"format": "pgolf-int6-lzma-v1", "meta": {"arch": args.arch(), "config_hash": args.config_hash()},
                "tensors": qs}, buf)
    return buf.getvalue()


def grouped_layout(qs, args) -> tuple[bytes, bytes]:
    """Format v2's two streams, uncompressed: every int6 (or rate-controlled) matrix's codes, tensor after tensor; then
    a JSON header and, per tensor, its int8 codes, scales or float values, byte-shuffled."""
    six = [e["q"].numpy().tobytes() for e in qs.values() if e["kind"] in ("int6", "q") and "q" in e]
    rest = [json.dumps({"meta": args.meta(), "tensors": list(qs)}).encode(), b"\n"]
    for e in qs.values():
        rest += [ac.shuffled(e["q"])] if e["kind"] == "int8" else []
        rest += [ac.shuffled(e["scale"] if "q" in e else e["value"])]
    return b"".join(six), b"".join(rest)


CODECS = {"lzma-9": lambda b: lzma.compress(b, preset=9), "brotli-11": lambda b: brotli.compress(b, **ac.BROTLI),
          "zstd-22": lambda b: zstandard.ZstdCompressor(level=22).compress(b)}


def entropy_bytes(codes: bytes) -> float:
    """Order-0 entropy of a byte string, in bytes."""
    p = np.bincount(np.frombuffer(codes, np.uint8), minlength=256) / len(codes)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() * len(codes) / 8)


def size_table(qs, args, codecs=CODECS, timings=False) -> dict:
    """Compressed bytes of the old layout (one stream) and of the two-stream layout, per codec; bits per parameter."""
    n = sum(e["value"].numel() if e["kind"] == "float" else e["q"].numel() for e in qs.values())
    old, (six, rest) = old_layout(qs, args), grouped_layout(qs, args)
    res = {"params": n, "int6_values": len(six), "int6_order0_entropy_bytes": entropy_bytes(six)}
    for name, f in codecs.items():
        t = time.perf_counter()
        a = len(f(old))
        t_old, t = time.perf_counter() - t, time.perf_counter()
        b6, br = len(f(six)), len(f(rest))
        res[name] = {"old_layout": a, "grouped": b6 + br, "int6_stream": b6, "rest_stream": br,
                     "old_bits_per_param": 8 * a / n, "grouped_bits_per_param": 8 * (b6 + br) / n}
        if timings:
            res[name].update(old_s=t_old, grouped_s=time.perf_counter() - t)
        print(name, json.dumps(res[name]), flush=True)
    return res


def cmd_sizes(a):
    out = {}
    for path in sorted(Path(a.out).glob("seed*.pt")):
        d, args, model = load_seed(path)
        stats = tg.collect_stats(model, d["calib"][:args.gptq_calib_tokens], args.train_seq_len, CTX, False)
        for quant in ("clip", "gptq"):
            print(f"seed {d['seed']} {quant}", flush=True)
            out[f"seed{d['seed']} {quant}"] = size_table(ac.quantize_state(model.state_dict(), stats if quant == "gptq" else None), args)
    Path(a.out, "sizes.json").write_text(json.dumps(out, indent=1))


class Replay:
    """A stand-in for the training stream: hands out saved tokens, in order."""

    def __init__(self, tokens):
        self.tokens, self.pos = tokens, 0

    def take(self, n):
        self.pos += n
        return self.tokens[self.pos - n:self.pos]


def cmd_fit(a):
    """The uniform export's fit (RATE_CONTROL=0): fit_int6 with TARGET_BYTES below the unfitted total (H-aware cost, and
    scale^2 alone by QUANT=clip's rule on the same GPTQ codes), then train_gpt.export itself; the round-trip BPB of
    what it wrote, read back by load_artifact."""
    d, args, model = load_seed(Path(a.out) / "seed1337.pt")
    _, _, val, luts = setup(d["seed"])
    n_code = tg.code_bytes()[0]
    work = Path(a.out) / "fit"
    work.mkdir(exist_ok=True)
    os.chdir(work)
    stats = tg.collect_stats(model, d["calib"][:args.gptq_calib_tokens], args.train_seq_len, CTX, False)
    qs = ac.quantize_state(model.state_dict(), stats)
    fixed = len(ac.assemble(ac.rest_stream(qs, args.meta()), [])) + n_code
    streams, total, _ = ac.fit_uniform(qs, stats, fixed, 10 ** 9, 0, 8, lambda m: None)
    six = sum(4 + len(b) for n, b in streams.items() if qs[n]["kind"] == "int6")
    n6 = sum(e["q"].numel() for e in qs.values() if e["kind"] == "int6")
    rows = [{"target": total, "zeroed": 0, "fraction": 0.0, "total": total,
             "roundtrip_bpb": roundtrip_bpb(qs, args, val, luts)}]
    print(json.dumps(rows[0]), flush=True)
    for cut in a.cuts:
        for rule, st in (("scale^2*H_jj", stats), ("scale^2", None)):
            t = time.perf_counter()
            fitted, k, size = ac.fit_int6(qs, st, six - cut, 1.0)
            if fitted is None:
                rows.append({"target": total - cut, "rule": rule, "over": True, "zeroed": k, "total": total - six + size})
                print(json.dumps(rows[-1]), flush=True)
                continue
            fq = {n: dict(e, **ac.decode_stream(brotli.decompress(fitted[n]), list(e["q"].shape))) if n in fitted else e
                  for n, e in qs.items()}
            row = {"target": total - cut, "rule": rule, "zeroed": k, "fraction": k / n6,
                   "total": total - six + size, "fit_s": time.perf_counter() - t,
                   "roundtrip_bpb": roundtrip_bpb(fq, args, val, luts)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    # the run's own path: train_gpt.export with a small TARGET_BYTES, then EVAL_ONLY's loader
    args.target_bytes = total - a.cuts[0]
    args.rate_control = 0
    path, over = tg.export(model, args, Replay(d["calib"]), CTX, print, "fit_export", n_code, 0.0)
    meta, state = tg.load_artifact(path)
    m = tg.build_eval_model(meta["arch"], state, path, CPU).eval()
    bpb = tg.eval_val(tg.make_stats_fn(m, args), val, luts, args.eval_seq_len, args.val_batch_size, CTX)[1]
    rows.append({"export_target": args.target_bytes, "file_plus_code": Path(path).stat().st_size + n_code,
                 "over": over, "roundtrip_bpb": bpb})
    print(json.dumps(rows[-1]), flush=True)
    Path(a.out, "fit.json").write_text(json.dumps(rows, indent=1))


def matrix_stats(w: torch.Tensor) -> dict:
    """Row and column RMS factors (mean 1) and the excess kurtosis of w / (r c^T): what the synthetic state copies."""
    w = w.double()
    c = w.square().mean(0).sqrt()
    c = c / c.mean()
    r = (w / c).square().mean(1).sqrt()
    z = w / c / r[:, None]
    return {"r": r / r.mean(), "c": c, "rms": w.square().mean().sqrt().item(),
            "kurt": ((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2 - 3}


def synthetic_like(src: dict, shape, g) -> torch.Tensor:
    """A matrix of `shape` whose row/column RMS factors are resampled from src and whose entries are Student-t with
    src's excess kurtosis k (nu = 4 + 6/k; Gaussian when k <= 0.05), at src's RMS."""
    R, C = shape
    r = src["r"][torch.randint(len(src["r"]), (R,), generator=g)]
    c = src["c"][torch.randint(len(src["c"]), (C,), generator=g)]
    if src["kurt"] > 0.05:
        nu = 4 + 6 / src["kurt"]
        z = torch.distributions.StudentT(nu).sample((R, C)).double() / math.sqrt(nu / (nu - 2))
    else:
        z = torch.randn(R, C, generator=g, dtype=torch.float64)
    return (src["rms"] * r[:, None] * z * c[None, :]).float()


def synthetic_state(cpu_model, args_to) -> dict:
    """A state dict of GPT(args_to.arch()) whose quantized matrices follow the trained CPU model's: each record
    matrix copies the statistics (matrix_stats) of the CPU matrix of the same name at the proportional depth; float
    tensors are resampled from the CPU tensor of the same name (normal(0, 0.02) where none exists)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cpu_sd, n_cpu = cpu_model.state_dict(), len(cpu_model.blocks)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in tg.GPT(args_to.arch()).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        src = name
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            src = name.replace(f"blocks.{i}.", f"blocks.{round(i * (n_cpu - 1) / max(args_to.num_layers - 1, 1))}.", 1)
        ref = cpu_sd.get(src)
        if len(shape) == 2 and (name.endswith(ac.INT6_SUFFIXES) or math.prod(shape) > ac.SMALL_TENSOR):
            out[name] = synthetic_like(matrix_stats(ref), shape, g)
        elif ref is not None:
            flat = ref.flatten()
            out[name] = flat[torch.randint(len(flat), (math.prod(shape),), generator=g)].view(shape).clone()
        else:
            out[name] = torch.randn(shape, generator=g) * 0.02
    return out


def record_model(cpu_model):
    args = tg.Hyperparameters(clean_env(), preset="record")
    model = tg.GPT(args.arch())
    model.load_state_dict(synthetic_state(cpu_model, args))
    return args, model


def cmd_record(a):
    """Parts (each well under 15 minutes on a loaded 2-core machine): twin = the generator checked at the CPU size
    (a synthetic twin of the trained CPU model against the real one); time = the rate-controlled export's phases at the
    record size (every matrix's candidates with GPTQ, one round of compression); codecs =
    bytes per parameter of lzma-9 / brotli-11 / zstd-22 over the old and the two-stream layout at the record size."""
    d, cpu_args, cpu_model = load_seed(Path(a.out) / "seed1337.pt")
    out_path = Path(a.out, "record.json")
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    fast = {"brotli-11": CODECS["brotli-11"]}
    if "twin" in a.parts:
        twin = tg.GPT(cpu_args.arch())
        twin.load_state_dict(synthetic_state(cpu_model, cpu_args))
        print("trained CPU model / its synthetic twin", flush=True)
        out["cpu_trained"] = size_table(ac.quantize_state(cpu_model.state_dict()), cpu_args, fast)
        out["cpu_synthetic"] = size_table(ac.quantize_state(twin.state_dict()), cpu_args, fast)
    if "time" in a.parts:  # the export's phases at the record size: the embeddings and block 0 timed, x NUM_LAYERS
        args, model = record_model(cpu_model)
        state = {n: t for n, t in model.state_dict().items() if not n.startswith("mtp_heads.")}
        # GPTQ's time does not depend on the statistics' values: H of Gaussian inputs (4 rows per column), g = 1, F = 1
        stats = {n: {"F": torch.ones(state[n].shape, dtype=torch.float64), "n": 1} if "emb" in n else
                 {"H": (lambda x: x.T @ x)(torch.randn(4 * state[n].size(1), state[n].size(1), dtype=torch.float64)),
                  "g": torch.ones(state[n].size(0), dtype=torch.float64), "n": 1}
                 for n, t in state.items() if t.ndim == 2 and (n.startswith("blocks.0.") or not n.startswith("blocks."))
                 and "mtp" not in n and n not in ("skip_weights",) and not n.endswith("resid_mix")}
        res, cands = {"layers": args.num_layers, "matrices": {}}, {}
        for n in stats:
            t = time.perf_counter()
            cands[n] = ac.candidates(state[n], stats[n], True, args.gptq_damp, args.gptq_block)
            res["matrices"][n] = {"candidates_s": time.perf_counter() - t, "shape": list(state[n].shape)}
            i = len(ac.STEPS) // 2 + 4  # a middle step (t = 0.125): what a round compresses, per matrix
            t = time.perf_counter()
            res["matrices"][n].update(bytes=len(ac.compress(ac.stream_bytes(ac.entry(cands[n], i)))), compress_s=time.perf_counter() - t)
            print(n, json.dumps(res["matrices"][n]), flush=True)
        per = lambda key: sum(v[key] * (args.num_layers if k.startswith("blocks.0.") else 1) for k, v in res["matrices"].items())  # noqa: E731
        res.update(candidates_s=per("candidates_s"), compress_round_s=per("compress_s"), stream_bytes=per("bytes"),
                   gptq_columns=sum(state[n].size(1) * (args.num_layers if n.startswith("blocks.0.") else 1)
                                    for n in stats if "H" in stats[n]))
        w = torch.randn(64, 512)  # the column loop's own cost (dispatch per column), a problem small enough to be all overhead
        t = time.perf_counter()
        ac.gptq_rows(w, torch.eye(512, dtype=torch.float64), torch.ones(64), torch.full((64,), 127.0), 128, 0.01)
        res["per_column_overhead_us"] = 1e6 * (time.perf_counter() - t) / 512
        out["record_time"] = res
        print(json.dumps({k: v for k, v in res.items() if k != "matrices"}), flush=True)
    if "codecs" in a.parts:
        args, model = record_model(cpu_model)
        out["record_codecs"] = size_table(ac.quantize_state(model.state_dict()), args, CODECS, timings=True)
    out_path.write_text(json.dumps(out, indent=1, default=float))


# ----------------------------------------------------------------------------- rate control (issue 23)
BUDGETS = (1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.55)  # fractions of the natural total (RATE_CONTROL=0, QUANT_BITS=6)


def rate_candidates(model, args, calib):
    """(state, stats, candidates) of the rate control on these calibration tokens, as train_gpt.export computes them."""
    state = {n: t.detach() for n, t in model.state_dict().items() if not n.startswith("mtp_heads.")}
    stats = tg.collect_stats(model, calib, args.train_seq_len, CTX, True)
    return state, stats, {n: ac.candidates(state[n], stats[n], True, args.gptq_damp, args.gptq_block) for n in stats}


def rate_qstate(state, cands, choice) -> dict:
    """The quantized state of one choice {name: candidate index}: what the rate-controlled artifact stores."""
    return {n: ac.entry(cands[n], choice[n]) if n in cands else {"kind": "float", "value": t.float()} for n, t in state.items()}


def point(qs, streams, fixed, n_params, args, val, luts, post, **extra) -> dict:
    """One (bytes, round trip) point: total = fixed + the streams (what the run would count), bits per exported parameter."""
    total = fixed + sum(4 + len(b) for b in streams.values())
    bpb = roundtrip_bpb(qs, args, val, luts)
    row = {**extra, "total": total, "bits_per_param": 8 * (total - fixed) / n_params, "roundtrip_bpb": bpb, "gap": bpb - post}
    print(json.dumps(row), flush=True)
    return row


def two_streams_vs_v3(qs, args) -> dict:
    """Compressed bytes of one quantized state as format v3 writes it (the rest + one stream per matrix) and in format
    v2's layout (grouped_layout: two streams)."""
    v3 = len(ac.assemble(ac.rest_stream(qs, args.meta()), [ac.compress(ac.stream_bytes(e)) for e in qs.values() if e["kind"] != "float"]))
    v2 = 12 + sum(len(ac.compress(part)) for part in grouped_layout(qs, args))
    return {"v3": v3, "two_streams": v2, "cost": v3 - v2, "cost_pct": 100 * (v3 - v2) / v2}


def cmd_rate(a):
    """Per seed (parts, merged into rate_seed<S>.json): the natural total (the uniform export at int6: RATE_CONTROL=0's
    artifact + the code); round trip against bytes for uniform = (a) the uniform export (clip search + GPTQ) at
    int6/5/4; steps = (b) one step t for every matrix; steps6 = (b') one step t for the attention/MLP matrices, the rest
    as RATE_CONTROL=0 stores it; alloc = (c) the rate control at BUDGETS of the natural total and at (a)'s int5/int4
    totals; layout = the bytes one stream per matrix costs; export = train_gpt.export itself at 80% (its phase times);
    noise = (c) at 80% with two other calibration windows."""
    workers = max(1, len(os.sched_getaffinity(0)))
    a.parts = a.parts.split(",")  # whole names: "steps" must not match "steps6"
    steps = list(enumerate(ac.STEPS))[::a.step_stride]  # (b), (b'): the steps measured
    for path in sorted(Path(a.out).glob("seed*.pt")):
        if a.seeds and int(path.stem[4:]) not in a.seeds:
            continue
        d, args, model = load_seed(path)
        _, _, val, luts = setup(d["seed"])
        res = Path(a.out, f"rate_seed{d['seed']}.json")
        out = json.loads(res.read_text()) if res.exists() else {"seed": d["seed"]}
        if "post_ema_bpb" not in out:
            out["post_ema_bpb"] = tg.eval_val(tg.make_stats_fn(model, args), val, luts, args.train_seq_len, args.val_batch_size, CTX)[1]
        post, n_code = out["post_ema_bpb"], out.setdefault("n_code", tg.code_bytes()[0])
        state, stats, cands = rate_candidates(model, args, d["calib"][:args.gptq_calib_tokens])
        n_params = sum(t.numel() for t in state.values())
        if "uniform" in a.parts:  # (a): RATE_CONTROL=0's export, its own layout
            out["uniform"] = []
            for bits in (6, 5, 4):
                qs = ac.quantize_state(state, stats, args.gptq_damp, args.gptq_block, bits)
                fixed = len(ac.assemble(ac.rest_stream(qs, args.meta()), [])) + n_code
                streams = ac.fit_uniform(qs, stats, fixed, 10 ** 9, 0, workers, lambda m: None)[0]
                out["uniform"].append(point(qs, streams, fixed, n_params, args, val, luts, post, bits=bits))
            out["natural"] = out["uniform"][0]["total"]
        natural = out["natural"]
        qs0 = rate_qstate(state, cands, {n: 0 for n in cands})
        fixed = len(ac.assemble(ac.rest_stream(qs0, args.meta()), [])) + n_code
        res.write_text(json.dumps(out, indent=1))  # after every part
        if "steps" in a.parts:  # (b): one step for every matrix, where its predicted total is in range
            out["steps"] = []
            for i, t in steps:
                if 0.5 * natural < fixed + sum(4 + c["pred"][i] for c in cands.values()) < 1.3 * natural:
                    qs = rate_qstate(state, cands, {n: i for n in cands})
                    streams = {n: ac.compress(ac.stream_bytes(e)) for n, e in qs.items() if e["kind"] == "q"}
                    out["steps"].append(point(qs, streams, fixed, n_params, args, val, luts, post, step=t))
        res.write_text(json.dumps(out, indent=1))  # after every part
        if "steps6" in a.parts:  # (b'): one step for the attention/MLP matrices, the rest as RATE_CONTROL=0
            out["steps6"] = []
            base = ac.quantize_state(state, stats, args.gptq_damp, args.gptq_block, 6)
            fixed6 = len(ac.assemble(ac.rest_stream(base, args.meta()), [])) + n_code
            for i, t in steps:
                qs = {n: dict(e, q=cands[n]["q"][i], scale=cands[n]["scale"][i]) if e["kind"] == "int6" else e for n, e in base.items()}
                pred = sum(4 + cands[n]["pred"][i] if e["kind"] == "int6" else 4 + len(ac.compress(ac.stream_bytes(e)))
                           for n, e in base.items() if e["kind"] != "float")
                if 0.5 * natural < fixed6 + pred < 1.3 * natural:
                    streams = {n: ac.compress(ac.stream_bytes(e)) for n, e in qs.items() if e["kind"] != "float"}
                    out["steps6"].append(point(qs, streams, fixed6, n_params, args, val, luts, post, step=t))
        res.write_text(json.dumps(out, indent=1))  # after every part
        if "alloc" in a.parts:  # (c)
            out["alloc"] = []
            targets = [(f, round(f * natural)) for f in (a.budgets or BUDGETS)] + [(f"int{u['bits']}", u["total"]) for u in out["uniform"][1:]]
            for name, target in targets:
                lines = []
                choice, streams, total, over = ac.rate_control(cands, fixed, target, workers, lines.append)
                out["alloc"].append(point(rate_qstate(state, cands, choice), streams, fixed, n_params, args, val, luts, post,
                                          budget=name, target=target, fits=not over, rounds=lines,
                                          choice={n: cands[n]["labels"][c] for n, c in choice.items()}))
        res.write_text(json.dumps(out, indent=1))  # after every part
        if "layout" in a.parts:  # the cost of one stream per matrix: the same codes as two streams (format v2's layout)
            base = ac.quantize_state(state, stats, args.gptq_damp, args.gptq_block, 6)
            best = min(out["alloc"], key=lambda r: abs(r["total"] - natural))
            byname = {n: cands[n]["labels"].index(lab) for n, lab in best["choice"].items()}
            out["layout"] = {name: two_streams_vs_v3(qs, args) for name, qs in
                             (("uniform int6", base), ("rate control at the natural total", rate_qstate(state, cands, byname)))}
            print(json.dumps(out["layout"]), flush=True)
        res.write_text(json.dumps(out, indent=1))  # after every part
        if "export" in a.parts:  # train_gpt.export itself at 80%: its phase times on this machine (one thread)
            os.makedirs(work := Path(a.out) / "export", exist_ok=True)
            os.chdir(work)
            args.target_bytes, lines = round(0.8 * natural), []
            path, _ = tg.export(model, args, Replay(d["calib"]), CTX, lines.append, f"export{d['seed']}", n_code, 0.0)
            out["export"] = {"lines": lines, "file": Path(path).stat().st_size}
            print("\n".join(lines), flush=True)
            res.write_text(json.dumps(out, indent=1))
        if "noise" in a.parts:  # other calibration tokens, same budget
            out["noise"] = []
            for lo in (65536, 32768):
                _, _, cw = rate_candidates(model, args, d["calib"][lo:lo + args.gptq_calib_tokens])
                choice, streams, total, _ = ac.rate_control(cw, fixed, round(0.8 * natural), workers, lambda m: None)
                out["noise"].append(point(rate_qstate(state, cw, choice), streams, fixed, n_params, args, val, luts, post,
                                          calib_from=lo, budget=0.8))
        res.write_text(json.dumps(out, indent=1))


def interp(points, total):
    """The gap of a curve of (total, gap) points at `total`, linearly between its neighbours (None outside it)."""
    pts = sorted((p["total"], p["gap"]) for p in points)
    for (t0, g0), (t1, g1) in zip(pts, pts[1:]):
        if t0 <= total <= t1:
            return g0 + (g1 - g0) * (total - t0) / max(t1 - t0, 1)
    return None


def cmd_rate_table(a):
    """The rate control's tables from rate_seed*.json: per seed and budget the allocation (c) against one step for all
    (b) and for the attention/MLP matrices (b'), interpolated at (c)'s total, and the uniform export (a) at its own
    totals (the int5/int4 rows) or interpolated between its int4/int5/int6 points (the other budgets; none outside
    them); the means; (c) minus the best of the others per seed; the landing; the predictor's error (round 0 of every
    search); the layout's cost; the noise."""
    runs = [r for p in sorted(Path(a.out).glob("rate_seed*.json")) if "alloc" in (r := json.loads(p.read_text()))]
    f = lambda v, fmt="{:+.4f}": "n/a" if v is None else fmt.format(v)  # noqa: E731
    print("| seed | budget | target | total (% of target) | bits/param | gap (c) allocation | gap (b) one step | gap (b') one step, attn/MLP | gap (a) uniform |")
    print("|---|---|---|---|---|---|---|---|---|")
    means = {}
    for r in runs:
        uni = {f"int{u['bits']}": u for u in r["uniform"]}
        for c in r["alloc"]:
            b, b6 = interp(r.get("steps", []), c["total"]), interp(r.get("steps6", []), c["total"])
            u = uni[c["budget"]]["gap"] if c["budget"] in uni else interp(r["uniform"], c["total"])
            name = f"{c['budget']:.0%}" if isinstance(c["budget"], float) else f"= {c['budget']} total"
            print(f"| {r['seed']} | {name} | {c['target']:,} | {c['total']:,} ({c['total'] / c['target']:.2%}) | "
                  f"{c['bits_per_param']:.3f} | {f(c['gap'])} | {f(b)} | {f(b6)} | {f(u)} |")
            m = means.setdefault(name, [])
            m.append((c["gap"], b, b6, u, c["bits_per_param"]))
    print("\n| budget | runs | bits/param | gap (c) | gap (b) | gap (b') | gap (a) | (c) - best of (a), (b), (b'), per seed |")
    print("|---|---|---|---|---|---|---|---|")
    mean = lambda xs: None if any(x is None for x in xs) else sum(xs) / len(xs)  # noqa: E731
    for name, rows in means.items():
        cols = list(zip(*rows))
        best = [c - min(x for x in o if x is not None) if any(x is not None for x in o) else None
                for c, *o in (row[:4] for row in rows)]
        print(f"| {name} | {len(rows)} | {mean(cols[4]):.3f} | {f(mean(cols[0]))} | {f(mean(cols[1]))} | {f(mean(cols[2]))} | "
              f"{f(mean(cols[3]))} | {', '.join(f(x) for x in best)} |")
    land = [c["total"] / c["target"] for r in runs for c in r["alloc"]]
    print(f"\nlanding (total / target), {len(land)} searches: {min(land):.4%} .. {max(land):.4%}; "
          f"all within 0.5% below: {all(0.995 <= x <= 1 for x in land)}")
    errs = [float(re.search(r"error:(\S+)%", c["rounds"][0]).group(1)) for r in runs for c in r["alloc"]]
    rounds = [sum(x.startswith("rate_search") for x in c["rounds"]) for r in runs for c in r["alloc"]]
    print(f"\npredictor error, round 0 (predicted / brotli - 1), {len(errs)} searches: mean {sum(errs) / len(errs):+.3f}%, "
          f"range {min(errs):+.3f}% .. {max(errs):+.3f}%; rounds per search {min(rounds)}..{max(rounds)}")
    for r in runs:
        for name, v in r.get("layout", {}).items():
            print(f"layout seed {r['seed']} {name}: per-matrix streams {v['v3']:,} B, two streams {v['two_streams']:,} B, "
                  f"cost {v['cost']:+,} B ({v['cost_pct']:+.3f}%)")
        at80 = [c["gap"] for c in r["alloc"] if c["budget"] == 0.8] + [n["gap"] for n in r.get("noise", [])]
        if len(at80) > 1:
            print(f"noise seed {r['seed']}: gap at 80% over {len(at80)} calibration windows: " + ", ".join(f(x) for x in at80)
                  + f" (spread {max(at80) - min(at80):.4f})")


def cmd_plan(a):
    """Which shapes of our model fill TARGET_BYTES at a given number of bits per exported parameter (artifact bytes x 8
    / parameters, MTP heads not exported), with the code counted: parameters from GPT itself, built on the meta device."""
    base = tg.Hyperparameters(clean_env(), preset="record")
    n_code = a.code or tg.code_bytes()[0]
    rows = []
    for layers, dim, mult in itertools.product(range(8, 17), (512, 640, 768), (2, 3, 4)):
        heads = dim // 64  # heads of 64, half as many KV heads, value embeddings on the last two blocks (the record's rules)
        env = clean_env(NUM_LAYERS=layers, MODEL_DIM=dim, MLP_MULT=mult, NUM_HEADS=heads, NUM_KV_HEADS=heads // 2,
                        VE_LAYERS=f"{layers - 2},{layers - 1}")
        args = tg.Hyperparameters(env, preset="record")
        with torch.device("meta"):
            n = sum(t.numel() for t in tg.GPT(args.arch()).state_dict().values())
        rows.append((layers, dim, mult, heads, args.num_kv_heads, args.ve_layers, n))
    record = next(r for r in rows if r[:3] == (11, 512, 3))[-1]
    print(f"code {n_code:,} B; target {tg.LIMIT_BYTES:,} B; the record's shape (11 x 512, MLP 3): {record:,} parameters, "
          + ", ".join(f"{record * b / 8 + n_code:,.0f} B at {b}" for b in a.bits))
    for bits in a.bits:
        cap = (tg.LIMIT_BYTES - n_code) * 8 / bits
        fits = sorted((r for r in rows if 0.95 * cap <= r[-1] <= cap), key=lambda r: -r[-1])
        print(f"\n{bits} bits/param: at most {cap / 1e6:.2f}M exported parameters")
        for layers, dim, mult, heads, kv, ve, n in fits[:a.top]:
            print(f"| {bits} | {layers} | {dim} | {mult} | {n:,} | {n * bits / 8 + n_code:,.0f} | "
                  f"`NUM_LAYERS={layers} MODEL_DIM={dim} MLP_MULT={mult} NUM_HEADS={heads} NUM_KV_HEADS={kv} VE_LAYERS={ve}` |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--seed", type=int, required=True)
    t.add_argument("--out", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", required=True)
    m.add_argument("--bits", type=int, nargs="+", default=[6, 5, 4])
    v = sub.add_parser("variants")
    v.add_argument("--out", required=True)
    v.add_argument("--bits", type=int, nargs="+", default=[6, 4])
    v.add_argument("--seed", type=int, default=1337)
    v.add_argument("--names", default="", help="comma list of VARIANTS to run (default: all)")
    z = sub.add_parser("sizes")
    z.add_argument("--out", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--out", required=True)
    f.add_argument("--cuts", type=int, nargs="+", default=[2000, 5000, 10000, 20000], help="bytes below the unfitted total")
    q = sub.add_parser("rate")
    q.add_argument("--out", required=True)
    q.add_argument("--seeds", type=int, nargs="*", default=[])
    q.add_argument("--parts", default="uniform,steps,steps6,alloc,layout,export,noise")
    q.add_argument("--budgets", type=float, nargs="*", default=[], help="fractions of the natural total (default: BUDGETS)")
    q.add_argument("--step-stride", type=int, default=1, help="(b), (b'): every k-th step only (faster, coarser curves)")
    qt = sub.add_parser("rate_table")
    qt.add_argument("--out", required=True)
    pl = sub.add_parser("plan")
    pl.add_argument("--bits", type=float, nargs="+", default=[3.5, 4.2, 4.7])
    pl.add_argument("--code", type=int, default=0, help="code bytes (default: what the run counts now)")
    pl.add_argument("--top", type=int, default=6)
    r = sub.add_parser("record")
    r.add_argument("--out", required=True)
    r.add_argument("--parts", default="twin,time", help="comma list of: twin, time, fit, codecs")
    a = ap.parse_args(argv)
    {"train": cmd_train, "measure": cmd_measure, "variants": cmd_variants, "sizes": cmd_sizes, "fit": cmd_fit,
     "record": cmd_record, "rate": cmd_rate, "rate_table": cmd_rate_table, "plan": cmd_plan}[a.cmd](a)


if __name__ == "__main__":
    main()
