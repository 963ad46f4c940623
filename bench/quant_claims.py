"""Quantization and artifact-size claims (issue 15), measured on CPU-preset models trained by train_gpt's own code.

    python bench/quant_claims.py train --seed 1337 --out /tmp/quant   # 5-30 min: trains, saves the float state
    python bench/quant_claims.py measure --out /tmp/quant             # round-trip gap and layer error, clip vs GPTQ
    python bench/quant_claims.py variants --out /tmp/quant            # GPTQ's settings and scale rule (seed 1337)
    python bench/quant_claims.py sizes --out /tmp/quant               # bytes per parameter by compressor and layout
    python bench/quant_claims.py fit --out /tmp/quant                 # cost of fitting: BPB against values zeroed
    python bench/quant_claims.py record --out /tmp/quant              # record-size state: sizes and export timings

`train` runs exactly what `python train_gpt.py` runs on CPU (the CPU preset, SEED, same seeding, same train()),
then saves the post-EMA float weights (artifacts hold only the quantized ones) and the training stream's next
tokens: the first CALIB for calibration (what the export uses), the following HELDOUT for measuring the layer
output error on training text the calibration never saw.
"""
from __future__ import annotations

import argparse
import io
import json
import lzma
import math
import os
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
    steps, stream = tg.train(args, model, val, luts, ctx, print)
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
        H = tg.collect_hessians(model, calib, args.train_seq_len, CTX)
        Hh = tg.collect_hessians(model, d["heldout"], args.train_seq_len, CTX)
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
    Hh = tg.collect_hessians(model, d["heldout"], args.train_seq_len, CTX)
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
                Hs[calib] = tg.collect_hessians(model, d["calib"][calib[0]:calib[1]], args.train_seq_len, CTX)
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
    """train_gpt's two streams, uncompressed (its artifact_parts, with the compression undone)."""
    return tuple(brotli.decompress(p) for p in ac.artifact_parts(qs, args.meta()))


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
        H = tg.collect_hessians(model, d["calib"][:args.gptq_calib_tokens], args.train_seq_len, CTX)
        for quant in ("clip", "gptq"):
            print(f"seed {d['seed']} {quant}", flush=True)
            out[f"seed{d['seed']} {quant}"] = size_table(ac.quantize_state(model.state_dict(), H if quant == "gptq" else None), args)
    Path(a.out, "sizes.json").write_text(json.dumps(out, indent=1))


class Replay:
    """A stand-in for the training stream: hands out saved tokens, in order."""

    def __init__(self, tokens):
        self.tokens, self.pos = tokens, 0

    def take(self, n):
        self.pos += n
        return self.tokens[self.pos - n:self.pos]


def cmd_fit(a):
    """train_gpt.export itself with TARGET_BYTES below the unfitted total (H-aware cost, and scale^2 alone by
    QUANT=clip's rule on the same GPTQ codes), then the round-trip BPB of what it wrote, read back by load_artifact."""
    d, args, model = load_seed(Path(a.out) / "seed1337.pt")
    _, _, val, luts = setup(d["seed"])
    n_code = tg.code_bytes()[0]
    work = Path(a.out) / "fit"
    work.mkdir(exist_ok=True)
    os.chdir(work)
    H = tg.collect_hessians(model, d["calib"][:args.gptq_calib_tokens], args.train_seq_len, CTX)
    qs = ac.quantize_state(model.state_dict(), H)
    six, rest = ac.artifact_parts(qs, args.meta())
    total = len(ac.assemble(six, rest)) + n_code
    n6 = sum(e["q"].numel() for e in qs.values() if e["kind"] == "int6")
    rows = [{"target": total, "zeroed": 0, "fraction": 0.0, "total": total,
             "roundtrip_bpb": roundtrip_bpb(qs, args, val, luts)}]
    print(json.dumps(rows[0]), flush=True)
    for cut in a.cuts:
        for rule, hess in (("scale^2*H_jj", H), ("scale^2", None)):
            t = time.perf_counter()
            fitted, k, size = ac.fit_int6(qs, hess, len(six) - cut, 1.0)
            if fitted is None:
                rows.append({"target": total - cut, "rule": rule, "over": True, "zeroed": k, "total": total - len(six) + size})
                print(json.dumps(rows[-1]), flush=True)
                continue
            codes = torch.frombuffer(bytearray(brotli.decompress(fitted)), dtype=torch.int8)
            fq, pos = {n: dict(e) for n, e in qs.items()}, 0
            for n, e in fq.items():
                if e["kind"] == "int6":
                    e["q"], pos = codes[pos:pos + e["q"].numel()].view_as(e["q"]), pos + e["q"].numel()
            row = {"target": total - cut, "rule": rule, "zeroed": k, "fraction": k / n6,
                   "total": total - len(six) + size, "fit_s": time.perf_counter() - t,
                   "roundtrip_bpb": roundtrip_bpb(fq, args, val, luts)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    # the run's own path: train_gpt.export with a small TARGET_BYTES, then EVAL_ONLY's loader
    args.target_bytes = total - a.cuts[0]
    path, over = tg.export(model, args, Replay(d["calib"]), CTX, print, "fit_export", n_code)
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
    (a synthetic twin of the trained CPU model against the real one); time = the export's phases at the record size
    (clip search, GPTQ, brotli-11 of both streams; with "fit" also a fit removing 0.3% of the int6 stream); codecs =
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
    if "time" in a.parts:
        args, model = record_model(cpu_model)
        t = time.perf_counter()
        qs = ac.quantize_state(model.state_dict())
        res = {"clip_quantize_s": time.perf_counter() - t}
        # GPTQ's time does not depend on H's values: H of Gaussian inputs, 4 rows per column
        H = {n: (lambda x: x.T @ x)(torch.randn(4 * e["q"].size(1), e["q"].size(1), dtype=torch.float64))
             for n, e in qs.items() if e["kind"] == "int6"}
        t = time.perf_counter()
        qs = ac.quantize_state(model.state_dict(), H)
        res["gptq_quantize_s"], t = time.perf_counter() - t, time.perf_counter()
        six, rest = ac.artifact_parts(qs, args.meta())
        res["brotli_s"], t = time.perf_counter() - t, time.perf_counter()
        res.update(int6_stream=len(six), rest_stream=len(rest), bits_per_param=8 * (len(six) + len(rest)) /
                   sum(e["value"].numel() if e["kind"] == "float" else e["q"].numel() for e in qs.values()))
        if "fit" in a.parts:  # 3 rounds of 8 parallel compressions: needs >= 8 free cores to take ~3 brotli_s
            fitted, k, size = ac.fit_int6(qs, H, int(len(six) * 0.997), 0.02)
            res.update(fit_s=time.perf_counter() - t, fit_cut=len(six) - int(len(six) * 0.997), fit_zeroed=k, fit_bytes=size)
        out["record_time"] = res
        print(json.dumps(res), flush=True)
    if "codecs" in a.parts:
        args, model = record_model(cpu_model)
        out["record_codecs"] = size_table(ac.quantize_state(model.state_dict()), args, CODECS, timings=True)
    out_path.write_text(json.dumps(out, indent=1, default=float))


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
    r = sub.add_parser("record")
    r.add_argument("--out", required=True)
    r.add_argument("--parts", default="twin,time", help="comma list of: twin, time, fit, codecs")
    a = ap.parse_args(argv)
    {"train": cmd_train, "measure": cmd_measure, "variants": cmd_variants, "sizes": cmd_sizes, "fit": cmd_fit,
     "record": cmd_record}[a.cmd](a)


if __name__ == "__main__":
    main()
