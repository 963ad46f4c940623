"""Model, optimizer and training-loop tests (issue 3): counts from the spec, parallel Muon == single-rank
Muon, 2-rank torchrun == 1-rank run, determinism, and a short run that learns."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
from conftest import SCRIPT, make_dataset, run_cli, run_two_ranks, tiny_env_for  # noqa: E402

TINY = dict(NUM_LAYERS="3", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", VE_LAYERS="1,2", XSA_LAST_N="2",
            BIGRAM_DIM="16", VE_DIM="16", TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", EVAL_STRIDE="32",
            TRAIN_BATCH_TOKENS="2048", VAL_BATCH_SIZE="8192", WARMUP_STEPS="0", MAX_WALLCLOCK_SECONDS="0",
            USE_NGRAM_MIXER="0", COMPILE="0")


def test_record_parameter_count_matches_spec():
    """The record configuration: 28,042,332 parameters, 1,048,576 of them MTP heads; every component's share as
    the competition record lists it (attention 8,650,752, MLP 17,301,504, ...)."""
    args = tg.Hyperparameters(env={}, preset="record")
    model = tg.build_model(args)
    assert tg.count_params(model) == (28_042_332, 1_048_576)
    by_part = {}
    for name, p in model.named_parameters():
        part = ("attention" if ".attn." in name and name.endswith(("q.weight", "k.weight", "v.weight", "proj.weight"))
                else "mlp" if ".mlp." in name else "block_scalars" if name.startswith("blocks.") else name.split(".")[0])
        by_part[part] = by_part.get(part, 0) + p.numel()
    assert by_part["attention"] == 8_650_752 and by_part["mlp"] == 17_301_504
    assert by_part["block_scalars"] == 22_616 and by_part["tok_emb"] == 524_288
    assert by_part["bigram_embed"] + by_part["bigram_proj"] + by_part["bigram_scale"] == 262_144 + 65_536 + 1
    assert sum(by_part[k] for k in ("ve_embed", "ve_proj", "ve_scale", "ve_layer_scales")) == 131_072 + 32_768 + 1 + 2
    assert by_part["smear_gate"] == 512 and by_part["skip_weights"] == 2_560


def test_init_follows_spec():
    model = tg.build_model(tg.Hyperparameters(env=TINY, preset="cpu"))
    b = model.blocks[0]
    for lin in (b.attn.q, b.attn.k, b.attn.v, b.mlp.up):  # orthogonal: W W^T = I on the short side
        w = lin.weight.detach()
        small = w @ w.T if w.size(0) <= w.size(1) else w.T @ w
        assert torch.allclose(small, torch.eye(small.size(0)), atol=1e-4)
    for t in (b.attn.proj.weight, b.mlp.down.weight, model.bigram_embed.weight, model.bigram_proj.weight,
              model.ve_proj.weight, *[h.weight for h in model.mtp_heads], model.smear_gate):
        assert not t.detach().any()
    assert abs(model.tok_emb.weight.std().item() - 0.005) < 0.0005
    assert torch.equal(b.resid_mix.detach(), torch.stack([torch.ones(64), torch.zeros(64)]))
    assert torch.allclose(b.attn.q_gain.detach(), torch.full((4,), 1.5))


def test_causality_and_mtp_loss():
    """Logits at t never depend on tokens after t; MTP changes the training loss only once its heads are non-zero."""
    torch.manual_seed(0)
    model = tg.build_model(tg.Hyperparameters(env=TINY, preset="cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randint(0, 1024, (2, 40))
    x2 = x.clone()
    x2[:, 25:] = torch.randint(0, 1024, (2, 15))
    h1, h2 = model.hidden(x), model.hidden(x2)
    assert torch.allclose(h1[:, :25], h2[:, :25], atol=1e-5) and not torch.allclose(h1[:, 25:], h2[:, 25:])
    y = torch.randint(0, 1024, (2, 40))
    main = torch.nn.functional.cross_entropy(model.logits(model.hidden(x)).reshape(-1, 1024), y.reshape(-1))
    mtp = [torch.nn.functional.cross_entropy(tg.softcap(head(model.hidden(x)[:, :40 - k]), 30.0).reshape(-1, 1024),
                                             y[:, k:].reshape(-1)) for k, head in enumerate(model.mtp_heads, 1)]
    assert torch.allclose(model(x, y), main + 0.1 * torch.stack(mtp).mean(), atol=1e-5)


def test_bigram_hash_formula():
    model = tg.build_model(tg.Hyperparameters(env=TINY, preset="cpu"))
    idx = torch.tensor([[5, 1000, 7, 7]])
    expect = [2047] + [((36313 * c) ^ (27191 * p)) % 2047 for p, c in zip([5, 1000, 7], [1000, 7, 7])]
    assert model.bigram_ids(idx).tolist() == [expect]


def test_newton_schulz_orthogonalizes():
    g = torch.randn(3, 32, 48)
    u = tg.newton_schulz5(g, 5)
    s = torch.linalg.svdvals(u)
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic's fixed band around 1, not exact orthogonality


def _muon_worker(rank, world, init_file, q):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    q.put((rank, [p.numpy() for p in _muon_run(rank, world)]))  # numpy: pickled by value, no shared-memory fds
    dist.destroy_process_group()


def _muon_run(rank, world):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in [(8, 4), (8, 4), (8, 4), (4, 8), (6, 6)]]
    muon = tg.Muon(params, lr=0.05, weight_decay=0.04, backend_steps=5, rank=rank, world_size=world)
    for step in range(3):
        gen = torch.Generator().manual_seed(100 + step)
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):  # each rank sees a different half of the gradient, summing to g
            p.grad = g * (2 * (rank + 1) / (world * (world + 1))) * world if world > 1 else g
        muon.reduce_grads()
        muon.step(1.0, 0.9, 0.7)
    return [p.detach().clone() for p in params]


def test_parallel_muon_matches_single_rank(tmp_path):
    single = _muon_run(0, 1)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_muon_worker, args=(r, 2, str(tmp_path / "store"), q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for r in range(2):
        for a, b in zip(results[r], single):
            a = torch.from_numpy(a)
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_lr_multiplier_schedule():
    args = tg.Hyperparameters(env=dict(ITERATIONS="100", WARMDOWN_ITERS="20", MAX_WALLCLOCK_SECONDS="0"), preset="cpu")
    assert [tg.lr_multiplier(args, s, 0, 0.0) for s in (0, 79, 80, 90, 100)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    args = tg.Hyperparameters(env=dict(ITERATIONS="100000", WARMDOWN_ITERS="100", MAX_WALLCLOCK_SECONDS="10",
                                       RATE_CONTROL="0", QUANT="clip"), preset="cpu")
    # 10 ms/step: warmdown spans the last 1000 ms of the 10 s cap
    assert tg.lr_multiplier(args, 500, 5000, 10.0) == 1.0
    assert tg.lr_multiplier(args, 950, 9500, 10.0) == pytest.approx(0.5)


@pytest.mark.parametrize("env, phrase", [
    (dict(NUM_HEADS="5"), "does not divide MODEL_DIM"),
    (dict(NUM_KV_HEADS="3"), "does not divide NUM_HEADS"),
    (dict(MODEL_DIM="36", NUM_HEADS="4", ROPE_DIMS="4"), "is odd"),
    (dict(ITERATIONS="ten"), "not a valid int"),
    (dict(EVAL_STRIDE="0"), "must be >= 1"),
    (dict(NGRAM_ORDER="1", USE_NGRAM_MIXER="1"), "must be >= 2"),  # mixer settings are checked when it runs
    (dict(NGRAM_RULE="hashed", USE_NGRAM_MIXER="1"), "NGRAM_RULE='hashed' must be one of"),
    (dict(ATTENTION="flex"), "ATTENTION='flex' must be one of auto, fa3, sdpa"),
])
def test_bad_hyperparameters_are_one_clear_error(env, phrase):
    with pytest.raises(tg.UserError, match=phrase):
        tg.Hyperparameters(env={**TINY, **env}, preset="cpu")


# --- end to end on a tiny dataset ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_data(tmp_path_factory, sample_paths):
    """(env, train tokens, val tokens): 200k train / 8k val tokens cut from the sample dataset, TINY model."""
    d = make_dataset(tmp_path_factory.mktemp("tiny"), sample_paths, val_tokens=8_000, train_tokens=200_000)
    read = lambda name: tg.load_data_shard(d / name).numpy()
    return tiny_env_for(d, sample_paths, **TINY), read("fineweb_train_000000.bin"), read("fineweb_val_000000.bin")


def run_train(tmp, env, nproc=1, **extra):
    """train_gpt.py in tmp (plain python, or torchrun --nproc_per_node=nproc on gloo)."""
    if nproc == 1:
        return run_cli(env, tmp, timeout=300, **extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT)]
    return run_two_ranks(cmd, tmp, dict(env, **extra), timeout=300)


def numbers(log_text, key):
    return [float(m) for m in re.findall(rf"{key}:([0-9.]+)", log_text)]


def test_two_rank_torchrun_matches_one_rank(model_data, tmp_path):
    env = dict(model_data[0], ITERATIONS="3", TRAIN_LOG_EVERY="1", VAL_LOSS_EVERY="0")
    one = run_train(tmp_path, env, RUN_ID="one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_train(tmp_path, env, nproc=2, RUN_ID="two")
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (tmp_path / "logs" / "one.txt").read_text(), (tmp_path / "logs" / "two.txt").read_text()
    assert "world_size:2 backend:gloo" in b
    la, lb = numbers(a, "train_loss"), numbers(b, "train_loss")
    assert len(la) == 3 and la == pytest.approx(lb, abs=2e-4)
    assert numbers(a, "post_ema val_loss") == pytest.approx(numbers(b, "post_ema val_loss"), abs=2e-4)


def test_same_seed_same_log_and_it_learns(model_data, sample_paths, tmp_path):
    base, train, val = model_data
    env = dict(base, ITERATIONS="60", WARMDOWN_ITERS="15", TRAIN_LOG_EVERY="20", VAL_LOSS_EVERY="30", SEED="7")
    runs = []
    for rid in ("a", "b"):
        r = run_train(tmp_path, env, RUN_ID=rid)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append((tmp_path / "logs" / f"{rid}.txt").read_text())
    pick = lambda t: [re.sub(r" (train_time|step_avg|eval_time):\S+", "", ln) for ln in t.splitlines()
                      if ln.startswith(("step:", "final_", "post_ema"))]
    assert pick(runs[0]) == pick(runs[1]) and len(pick(runs[0])) > 8
    # learns: final val BPB well below the unigram entropy of the train stream measured on val (an independent model)
    counts = np.bincount(train, minlength=1024) + 1.0
    unigram_nats = -np.log(counts[val[1:]] / counts.sum()).sum()
    sp = tg.load_tokenizer(str(sample_paths[1]), 1024)
    nbytes = tg.target_bytes(torch.from_numpy(val[:-1].astype(np.int64)), torch.from_numpy(val[1:].astype(np.int64)),
                             tg.build_byte_luts(sp, 1024)).sum().item()
    unigram_bpb = unigram_nats / math.log(2) / nbytes
    bpb = float(re.search(r"final_int6_sliding_window_exact val_loss:\S+ val_bpb:([0-9.]+)", runs[0]).group(1))
    assert bpb < unigram_bpb - 0.3, (bpb, unigram_bpb)  # 60 steps: 3.23 against 3.70


def test_cpu_import_is_cheap_and_does_no_work(tmp_path):
    """`import train_gpt` with no CUDA, flash-attn or triton: no compile, no subprocess (a dataset build, git), no
    files, no process group. (Checked by what it calls, not by a clock: an import time depends on the machine's load.)"""
    blockers = tmp_path / "blockers"
    blockers.mkdir()
    for mod in ("triton", "flash_attn_interface", "flash_attn"):
        (blockers / f"{mod}.py").write_text(f"raise ImportError('{mod} is not installed here')\n")
    probe = ("import sys, subprocess, torch; calls = []; "
             "torch.compile = lambda *a, **k: calls.append('torch.compile'); "
             "subprocess.Popen = lambda *a, **k: calls.append('subprocess'); "
             "import train_gpt, torch.distributed as d; "
             "print(calls, d.is_initialized(), train_gpt._fa3_func is None, 'triton' in sys.modules)")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{blockers}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "False", "True", "False"], out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blockers"]  # no logs/, artifacts/ or data written
