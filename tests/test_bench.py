"""Tests for bench/: the GPU check in CPU smoke mode, and the training and eval benchmarks at tiny sizes."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_ENV
import backoff_mixer
import train_gpt
from data.shards import write_shard  # noqa: E402

BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import bench_eval  # noqa: E402
import bench_train  # noqa: E402
import gpu_check  # noqa: E402
import mixer_claims  # noqa: E402

PHASES = ["env", "model", "attention", "e2e", "mixer", "plan", "train", "eval", "ttt", "export"]


def clean_env(**extra) -> dict:
    """The environment without any train_gpt.py setting, one thread, plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in {h.name for h in train_gpt.HPARAMS} | {"OUT"}}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env, timeout=600):
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def test_gpu_check_cpu_smoke(tmp_path):
    """Every phase at tiny sizes on CPU (the default list is all of them but export, which runs on GPUs only when
    asked: e2e exports trained weights), so that the first GPU call does not fail on a bug a CPU can find."""
    assert gpu_check.PHASES == PHASES and gpu_check.DEFAULT_PHASES == [p for p in PHASES if p != "export"]
    p = run(["bash", str(BENCH / "gpu_check.sh"), "--cpu-smoke", "--phases", ",".join(PHASES), "--mixer-seconds", "60"],
            clean_env(OUT=tmp_path), timeout=300)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    summary = (tmp_path / "gpu_check_summary.txt").read_text()
    assert (tmp_path / "gpu_check.log").is_file()
    assert report["mode"] == "CPU smoke" and report["failed"] == []
    assert list(report["results"]) == PHASES
    assert summary.splitlines()[0] == "GPU CHECK SUMMARY (CPU smoke)" and summary.strip() in p.stdout
    for phase in PHASES:
        assert any(line.startswith(phase) for line in summary.splitlines()), phase
    r = report["results"]
    assert r["env"]["torch"] == torch.__version__ and r["env"]["attention"] == "sdpa"
    assert r["model"]["model_params"] == r["train"]["model_params"] > r["model"]["mtp_params"] > 0
    a = r["attention"]
    assert a["paths"]["flex"] == {"error": "skipped"} and a["paths"]["sdpa_math"]["matches_reference"]
    assert a["fastest"] in a["paths"] and a["paths"][a["fastest"]]["matches_reference"]
    assert r["train"]["fastest_measured"] == a["fastest"] and r["train"]["attention"] == "sdpa"  # CPU: ATTENTION=auto
    e2e = r["e2e"]
    assert e2e["returncode"] == 0 and e2e["steps"] == e2e["steps_asked"] == 4 and e2e["val_tokens"] == 4096
    assert e2e["total_bytes"] == e2e["artifact_bytes"] + e2e["code_bytes"] and e2e["zeroed"] == 0
    assert e2e["rate_line"].startswith(f"rate_control total:{e2e['total_bytes']} target:16000000")
    assert sum(e2e["rate_choice_counts"].values()) == e2e["rate_line"].count("=")  # one pick per matrix
    assert e2e["tokens_per_s"] == pytest.approx(2048 / (e2e["ms_per_step"] / 1000)) and e2e["attention"] == "auto"
    assert e2e["bits_per_param"] == pytest.approx(8 * e2e["artifact_bytes"] / (e2e["model_params"] - e2e["mtp_params"]))
    assert all(v >= 0 for v in e2e["eval_split_s"].values()) and e2e["est_8gpu_eval_s"]["total"] > 0
    assert e2e["eval_split_s"]["total"] >= e2e["eval_split_s"]["sliding"]
    pl = r["plan"]  # the time plan with this run's rates: the e2e log's window rate, the mixer phase's rate
    assert pl["eval_8gpu_s"] == pytest.approx(sum(v for k, v in pl["phases_8gpu_s"].items() if k in (
        "scorer_compile", "ttt_compile", "load", "roundtrip", "no_ttt_pass", "mixer_probe", "sliding", "ttt_train", "mixer")))
    assert pl["eval_1gpu_s"] > pl["eval_8gpu_s"] and pl["basis"]["mixer"].startswith("measured: this run mixer.whole_stream_s")
    assert pl["basis"]["sliding"].startswith("measured: this run's e2e log") and pl["flags"]  # CPU rates break the clocks
    assert (tmp_path / "gpu_check_plan.txt").read_text().startswith("TIME PLAN")
    assert all(math.isfinite(e2e[k]) for k in ("post_ema_bpb", "roundtrip_bpb", "no_ttt_bpb", "neural_bpb", "mixed_bpb"))
    assert e2e["mixer_learned"].startswith("mixer_learned") and e2e["synth"]["train_tokens"] >= 6 * 2048
    assert (tmp_path / "gpu_check_e2e_log.txt").read_text().count("run_complete") == 1
    t = r["train"]
    assert t["steps"] == 3 and t["seqs"] == 4 and t["seq_len"] == 128 and math.isfinite(t["final_loss"])
    assert t["ms_per_step"] > 0 and t["tokens_per_s"] == pytest.approx(4 * 128 / (t["ms_per_step"] / 1000))
    assert t["mfu"] is None and t["peak_mem_gib"] is None  # CUDA only
    e = r["export"]
    assert e["roundtrip_ok"] and e["artifact_bytes"] > 0 and e["total_bytes"] == e["artifact_bytes"] + e["code_bytes"]
    assert all(e[k] > 0 for k in ("calibration_s", "quantize_s", "search_s")) and e["rounds"] >= 1  # the export's phases, timed
    assert e["total_bytes"] <= e["target_bytes"] and not e["over"]
    v = r["eval"]
    assert v["windows"] == 32 and v["windows_per_s"] > 0
    assert v["val_windows"] == math.ceil((bench_eval.VAL_TOKENS - 1 - 128) / 32) + 1
    assert v["full_eval_s"] == pytest.approx(v["windows_per_rank"] / v["windows_per_s"])
    tt = r["ttt"]
    assert tt["chunks"] == 3 and tt["rank_chunk_tokens"] == tt["chunk_tokens"] == 256 and tt["steps"] == 3
    # chunk 0 scores 256 + 128 - 32 targets = 3 seqs of 128 (2 steps of 2 seqs), chunk 1 2 seqs (1 step), chunk 2 none
    assert tt["score_s_per_chunk"] > 0 and tt["train_s_per_chunk"] > 0
    assert tt["full_chunks"] == math.ceil((bench_eval.VAL_TOKENS - 1) / 256)
    assert tt["full_ttt_eval_s"] == pytest.approx(tt["full_chunks"] * tt["score_s_per_chunk"]
                                                  + (tt["full_chunks"] - 1) * tt["train_s_per_chunk"])
    m = r["mixer"]
    assert m["networks"] == 2 and m["whole_stream_s"] > 0 and 0 < m["mean_nll"] < math.log(1024)
    assert m["complete"] and m["tokens_scored"] == m["stream_tokens"] - 1 == 19_999  # the streaming API (--mixer-seconds)
    assert m["table_bytes"] > 0 and m["tokens_per_s"] > 0


def test_gpu_check_reports_the_other_phases_when_one_fails(tmp_path, monkeypatch):
    def broken(*_):
        raise RuntimeError("export exploded")

    monkeypatch.setattr(gpu_check, "phase_export", broken)
    for name in (h.name for h in train_gpt.HPARAMS):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU threads contend badly on a loaded 2-core machine
    try:
        rc = gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--steps", "1", "--mixer-tokens", "3000",
                             "--phases", "env,export,eval,mixer"])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1 and report["failed"] == ["export"]
    assert report["results"]["export"]["error"] == "RuntimeError: export exploded"
    assert report["results"]["eval"]["windows_per_s"] > 0 and report["results"]["mixer"]["whole_stream_s"] > 0
    assert "FAILED: RuntimeError: export exploded" in (tmp_path / "gpu_check_summary.txt").read_text()


def test_bench_train_tiny(tmp_path):
    out = tmp_path / "train.json"
    p = run([sys.executable, str(BENCH / "bench_train.py"), "--preset", "cpu", "--steps", "2", "--seqs", "2",
             "--json", out], clean_env(**TINY_ENV))
    res = json.loads(out.read_text())
    assert res["steps"] == 2 and res["seqs"] == 2 and res["seq_len"] == 64 and res["compile"] == 0
    assert res["tokens_per_s"] > 0 and res["ms_per_step"] > 0 and math.isfinite(res["final_loss"])
    assert res["ratio_to_record_per_gpu"] == pytest.approx(res["tokens_per_s"] / bench_train.RECORD_TOKENS_PER_S_PER_GPU)
    assert res["flops_per_token"] == 6 * res["matmul_params"] + 12 * 2 * 64 * 64
    assert "tokens/s" in p.stdout and "x record per GPU" in p.stdout


def test_record_figures_and_flops_formula():
    args = train_gpt.Hyperparameters(env={}, preset="record")
    with torch.device("meta"):
        model = train_gpt.build_model(args)
    # every parameter but the token/bigram/value embedding tables, plus the tied head (V*d)
    assert bench_train.matmul_params(model) == 28_042_332 - 524_288 - 262_144 - 131_072 + 524_288
    assert bench_train.flops_per_token(model, args) == 6 * 27_649_116 + 12 * 11 * 2048 * 512
    assert bench_train.RECORD_TOKENS_PER_S_PER_GPU == pytest.approx(1.15e6, rel=0.001)
    assert bench_eval.full_val_windows(args) == math.ceil((62_021_632 - 2048) / 64) + 1


def test_bench_eval_tiny(tmp_path):
    out = tmp_path / "eval.json"
    p = run([sys.executable, str(BENCH / "bench_eval.py"), "--preset", "cpu", "--windows", "16", "--json", out],
            clean_env(**TINY_ENV))
    res = json.loads(out.read_text())
    assert res["windows"] == 16 and res["windows_per_s"] > 0 and res["gpus"] == 8
    assert res["windows_per_rank"] == math.ceil(res["val_windows"] / 8)
    assert res["ratio_to_target"] == pytest.approx(res["full_eval_s"] / 90)
    assert res["ratio_to_record"] == pytest.approx(res["full_eval_s"] / 590)
    assert "windows/s" in p.stdout and "target" in p.stdout


def test_mixer_claims_runs_on_a_dump(tmp_path, capsys):
    """bench/mixer_claims.py on a made-up dump: exact rules are real BPBs and beat the network on a repetitive stream."""
    rng = np.random.default_rng(0)
    toks = np.tile(rng.integers(0, 1024, 300), 20)
    write_shard(tmp_path / "fineweb_val_000000.bin", toks)
    n = toks.size - 1
    np.savez(tmp_path / "d.npz", nll_neural=np.full(n, math.log(1024)), entropy=np.full(n, math.log(1024)),
             bytes=np.full(n, 2.0))
    assert mixer_claims.main([str(tmp_path / "d.npz"), "--val", str(tmp_path / "fineweb_val_*.bin"), "--chunk", "512"]) == 0
    rows = {line[:62].strip(): float(line[62:71]) for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["network alone"] == pytest.approx(10 / 2)  # log2(1024) bits over 2 bytes per token
    assert all(rows[f"exact {r}"] < rows["network alone"] for r in backoff_mixer.RULES)


def test_bench_mixer_tiny():
    """bench/bench_mixer.py at a tiny size: every mixer line and the ratios print, and both exact rules
    report the same mean NLL whatever the table size (the pre-sized and the default table)."""
    nlls = []
    for flags in ([], ["--numpy-tables"]):
        p = run([sys.executable, str(BENCH / "bench_mixer.py"), "--tokens", "20000", "--chunk", "1000",
                 "--modes", "net,update"] + flags, clean_env(), timeout=120)
        out = p.stdout.splitlines()
        assert out[0].endswith("exact table code: numpy") == (bool(flags) or importlib.util.find_spec("numba") is None)
        lines = [l for l in out if l.startswith("[net")]
        assert len(lines) == 6 and "speed ratio exact/hashed" in lines[-1] and "default table size" in lines[-1]
        nll = {l.split("mean nll")[0][8:60].strip(): float(l.split("mean nll")[1]) for l in lines[:5]}
        assert nll["exact BackoffNgramMixer (default rule)"] == nll["exact, default rule, default table size"]
        nlls.append(nll)
        upd = [l for l in out if l.startswith("[update")]
        assert len(upd) == 6 and all(l.endswith("mean nll -") for l in upd[:5]) and "speed ratio" in upd[-1]
        assert sum("score_stream" in l for l in out) == len(backoff_mixer.RULES)
    assert nlls[0] == nlls[1]                         # numba kernels and numpy code: the same numbers


def test_bench_ttt_sweep_tiny(tmp_path, sample_paths, capsys):
    """bench/bench_ttt.py sweep on a tiny artifact: the TTT-off run and one row per grid point, gains against it,
    logs (and dumps) in --out; a second call reuses the logs."""
    import bench_ttt
    from conftest import make_dataset, run_cli, tiny_env_for
    env = tiny_env_for(make_dataset(tmp_path / "data", sample_paths, val_tokens=3000), sample_paths)
    assert run_cli(env, tmp_path, RUN_ID="a").returncode == 0
    old = dict(os.environ)
    os.environ.update(env)
    try:
        argv = ["sweep", "--artifact", str(tmp_path / "artifacts" / "a.ptz"), "--out", str(tmp_path / "out"), "--dump",
                "--vary", "TTT_CHUNK_TOKENS=512,1024", "--vary", "TTT_LR=0.001"]
        assert bench_ttt.main(argv) == 0
        rows = capsys.readouterr().out.splitlines()
        assert bench_ttt.main(argv) == 0 and capsys.readouterr().out.splitlines() == rows  # logs reused
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert rows[0].startswith("| TTT_CHUNK_TOKENS | TTT_LR | TTT steps |") and len(rows) == 5
    cells = [[c.strip() for c in r.split("|")[1:-1]] for r in rows[2:]]
    assert cells[0][0] == "off" and [c[:2] for c in cells[1:]] == [["512", "0.001"], ["1024", "0.001"]]
    for c in cells[1:]:
        assert float(c[4]) == pytest.approx(float(c[3]) - float(cells[0][3]), abs=1.5e-4) and int(c[2]) > 0
    assert len(list((tmp_path / "out" / "dumps").glob("*.npz"))) == 3


def test_synth_stream_samples_the_interpolated_ngram_model_exactly():
    """NgramSampler at order 2: the first token after a context u follows p_2(v|u) = (c(uv) + K p_1(v)) / (c(u) + K),
    p_1(v) = (c(v) + 1) / (N + V), computed here by counting, within sampling noise of 200,000 streams."""
    from synth_stream import NgramSampler
    src = torch.tensor([0, 1, 2, 0, 1, 3, 0, 2, 2, 1, 0, 1])
    N, V, K = src.numel(), 5, 2.0
    sampler = NgramSampler(src, V, order=2, k=K)
    gen = torch.Generator().manual_seed(0)
    start = torch.randint(0, N - 1, (200_000,), generator=torch.Generator().manual_seed(0))  # sample()'s first draw
    out = sampler.sample(200_000, 1, gen)[:, 0]
    p1 = (torch.bincount(src, minlength=V).double() + 1) / (N + V)
    for u in range(3):
        c_uv = torch.bincount(src[1:][src[:-1] == u], minlength=V).double()
        exact = (c_uv + K * p1) / (c_uv.sum() + K)
        seen = torch.bincount(out[src[start] == u], minlength=V).double()
        assert exact.sum().item() == pytest.approx(1.0)
        assert torch.allclose(seen / seen.sum(), exact, atol=0.01), (u, seen / seen.sum(), exact)
