"""Causal GQA attention paths side by side, in isolation, at the record's shapes (a benchmark, not a test).

Each path computes softmax(q k^T / sqrt(64) + causal mask) v for B x T tokens, 8 query heads and 4 KV heads of
64 (bf16 on CUDA, fp32 on CPU), forward + backward, and is timed after its own warm-up; no whole-model compile
per path. Paths: PyTorch SDPA restricted to one backend (flash, cuDNN, memory-efficient, math), FlexAttention
(compiled, causal block mask) and FlashAttention-3 / -4 where they import. Every path is checked against the
math reference on the same inputs (max abs error of the output and of dq), so a fast path that computes
something else is reported as wrong, not as fast. A path that cannot run says why.

    python bench/attention_paths.py [--batch 48] [--seq 2048] [--iters 20] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

H, KV, D = 8, 4, 64


def sdpa_path(backend):
    """SDPA with only `backend` allowed (torch.nn.attention.sdpa_kernel); inputs [B, H, T, D]."""
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return fn


def flex_path(T: int, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, T, T, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask, enable_gqa=True)


def fa_path(module: str):
    """FlashAttention-3 (flash_attn_interface) or -4 (flash_attn.cute): inputs [B, T, H, D]."""
    mod = __import__(module, fromlist=["flash_attn_func"])

    def fn(q, k, v):
        y = mod.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return (y[0] if isinstance(y, tuple) else y).transpose(1, 2)
    return fn


def paths(T: int, device) -> dict:
    """name -> a function of (q, k, v) [B, H|KV, T, D], or the reason it is unavailable."""
    from torch.nn.attention import SDPBackend
    out = {f"sdpa_{n}": sdpa_path(getattr(SDPBackend, b)) for n, b in
           (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
            ("math", "MATH"))}
    try:
        out["flex"] = flex_path(T, device)
    except Exception as e:  # noqa: BLE001 (an unavailable path is a result, not a failure)
        out["flex"] = f"unavailable: {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    for name, module in (("fa3", "flash_attn_interface"), ("fa4", "flash_attn.cute")):
        try:
            out[name] = fa_path(module)
        except ImportError as e:
            out[name] = f"not importable: {e}"
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_paths(batch: int, T: int, device, iters: int = 20, warmup: int = 3, log=print, skip=()) -> dict:
    """{path: {ms_fwd_bwd, tflops, max_err_out, max_err_dq} or {error}}, fastest first; 'fastest' names it.
    Paths named in `skip` are reported as skipped (the CPU smoke skips FlexAttention's compile)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(batch, h, T, D, generator=gen).to(device, dtype) for h in (H, KV, KV))
    dy = torch.randn(batch, H, T, D, generator=gen).to(device, dtype)

    def run(fn):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        y = fn(qq, kk, vv)
        y.backward(dy)
        return y.detach(), qq.grad

    small = slice(0, min(batch, 2))   # the math reference holds T x T scores: check on 2 sequences
    ref_y, ref_dq = None, None
    qs, ks, vs, dys = q[small].float(), k[small].float(), v[small].float(), dy[small].float()
    qs.requires_grad_()
    ref_y = F.scaled_dot_product_attention(qs, ks.repeat_interleave(H // KV, 1), vs.repeat_interleave(H // KV, 1),
                                           is_causal=True)
    ref_y.backward(dys)
    ref_y, ref_dq = ref_y.detach(), qs.grad
    flops = 4 * batch * H * T * T * D / 2 * 3.5    # causal: half the T^2; backward ~2.5x the forward
    res = {}
    for name, fn in paths(T, device).items():
        fn = "skipped" if name in skip else fn
        if isinstance(fn, str):
            res[name] = {"error": fn}
            continue
        try:
            for _ in range(warmup):
                run(fn)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                y, dq = run(fn)
            sync(device)
            ms = 1000 * (time.perf_counter() - t0) / iters
            err_y = (y[small].float() - ref_y).abs().max().item()
            err_dq = (dq[small].float() - ref_dq).abs().max().item()
            res[name] = {"ms_fwd_bwd": ms, "tflops": flops / ms / 1e9, "max_err_out": err_y, "max_err_dq": err_dq}
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            res[name] = {"error": f"{type(e).__name__}: {first}"}
        log(f"attention {name}: {json.dumps(res[name])}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    ok = {n: r for n, r in res.items() if "ms_fwd_bwd" in r and r["max_err_out"] < tol and r["max_err_dq"] < 4 * tol}
    for n, r in res.items():
        if "ms_fwd_bwd" in r:
            r["matches_reference"] = n in ok
    fastest = min(ok, key=lambda n: ok[n]["ms_fwd_bwd"]) if ok else None
    return {"shape": f"{batch}x{T}, {H} q / {KV} kv heads of {D}, {dtype}".replace("torch.", ""),
            "fastest": fastest, "paths": res}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = time_paths(a.batch, a.seq, torch.device(a.device), a.iters)
    print(f"{res['shape']}; fastest correct path: {res['fastest']}")
    for name, r in sorted(res["paths"].items(), key=lambda kv: kv[1].get("ms_fwd_bwd", float("inf"))):
        print(f"  {name:15s} " + (f"{r['ms_fwd_bwd']:8.2f} ms  {r['tflops']:6.1f} TFLOP/s  err {r['max_err_out']:.1e}/"
                                  f"{r['max_err_dq']:.1e}{'' if r['matches_reference'] else '  WRONG'}"
                                  if "ms_fwd_bwd" in r else r["error"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
