"""Export and scoring (issue 4): sliding-window coverage, brute-force equality, sharding, int6 bounds,
artifact contents, honest size, EVAL_DUMP audit, eval-only reproduction and causality of the score.

Expectations are independent: an explicit per-target loop for coverage, one model call per target on
exactly the context it should see, a simulated all-gather, os.path.getsize, and SentencePiece decoding."""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
import types

import numpy as np
import pytest
import sentencepiece as spm
import torch

from conftest import artifact_of, frozen_code, log_value, make_dataset, run_cli, run_two_ranks, tiny_env_for
import artifact_codec
import train_gpt
from data.shards import write_shard  # noqa: E402
from train_gpt import GPT, Hyperparameters

LN2 = math.log(2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread in this module


def tiny_args(**over) -> Hyperparameters:
    env = dict(NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", VE_LAYERS="1", XSA_LAST_N="1",
               BIGRAM_DIM="8", VE_DIM="8", ROPE_DIMS="8", MTP_NUM_HEADS="0", EVAL_SEQ_LEN="32", EVAL_STRIDE="8",
               EVAL_BATCH_SEQS="4")
    env.update({k: str(v) for k, v in over.items()})
    return Hyperparameters(env, preset="cpu")


def random_model(args: Hyperparameters, seed: int = 0) -> GPT:
    """A GPT whose every weight is random (the init zeros some projections, which would hide context bugs)."""
    torch.manual_seed(seed)
    model = train_gpt.build_model(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim < 2 else 1 / math.sqrt(p.size(-1)))
    return model.eval()


def cpu_ctx(rank=0, world=1):
    return types.SimpleNamespace(rank=rank, world=world, device=torch.device("cpu"), sync=lambda: None)


def quiet(_msg):
    pass


# ----------------------------------------------------------------------------- coverage
CASES = [(1, 16, 4), (5, 16, 4), (15, 16, 4), (16, 16, 4), (17, 16, 4), (18, 16, 4), (23, 16, 4), (37, 16, 5),
         (100, 16, 16), (40, 16, 1), (64, 64, 32), (1499, 64, 32), (1000, 2048, 64), (5000, 2048, 64)]


def scored_by(ws: int, L: int, S: int, N: int) -> range:
    """What eval_sliding's window at ws scores (the spec's rule, written independently)."""
    return range(0, min(L, N)) if ws == 0 else range(ws + L - S, min(ws + L, N))


@pytest.mark.parametrize("N,L,S", CASES)
def test_sliding_windows_score_every_target_once(N, L, S):
    starts = train_gpt.sliding_windows(N, L, S)
    hits = np.zeros(N, dtype=int)
    for ws in starts:
        assert ws == 0 or (ws % S == 0 and ws + L - S < N), f"window {ws} scores nothing"
        for t in scored_by(ws, L, S, N):
            hits[t] += 1
            assert t - ws < L and (ws == 0 or t - ws >= L - S)  # inside the window, >= L-S tokens of context
    assert (hits == 1).all(), f"unscored {np.flatnonzero(hits == 0)[:5]} double {np.flatnonzero(hits > 1)[:5]}"
    assert len(starts) == 1 + max(0, math.ceil((N - L) / S))  # no wasted windows


# ----------------------------------------------------------------------------- brute force
def brute_force(model: GPT, tokens: torch.Tensor, L: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y_t) and entropy per target t, each from one call on exactly the context t should see."""
    N = tokens.numel() - 1
    logp, ent = torch.empty(N), torch.empty(N)
    for t in range(N):
        ws = 0 if t < L else math.ceil((t - L + 1) / S) * S
        assert ws + L - S <= t < ws + L or ws == 0
        x = tokens[ws:t + 1].long()[None]
        lp = torch.log_softmax(model.logits(model.hidden(x))[0, -1].double(), -1)
        logp[t], ent[t] = lp[tokens[t + 1]], -(lp.exp() * lp).sum()
    return logp, ent


@pytest.mark.parametrize("N", [20, 32, 33, 77])
def test_eval_sliding_equals_brute_force(N):
    args = tiny_args()
    model = random_model(args)
    tokens = torch.randint(0, args.vocab_size, (N + 1,), generator=torch.Generator().manual_seed(N)).to(torch.uint16)
    logp, ent = train_gpt.eval_sliding(model.target_stats, tokens, args, cpu_ctx(), quiet)
    ref_lp, ref_ent = brute_force(model, tokens, args.eval_seq_len, args.eval_stride)
    assert logp.shape == (N,) and ent.shape == (N,)
    torch.testing.assert_close(logp, ref_lp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent, ref_ent, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("N,world", [(77, 2), (20, 2), (200, 2), (200, 4), (41, 4)])
def test_sharded_eval_gathers_to_single_rank_result(N, world, monkeypatch):
    """Each rank scores its own windows (counted), and a simulated all_gather reassembles the world-1 arrays."""
    args = tiny_args()
    model = random_model(args)
    tokens = torch.randint(0, args.vocab_size, (N + 1,), generator=torch.Generator().manual_seed(1)).to(torch.uint16)
    ref = train_gpt.eval_sliding(model.target_stats, tokens, args, cpu_ctx(), quiet)
    n_windows = len(train_gpt.sliding_windows(N, args.eval_seq_len, args.eval_stride))
    sent, counts = {}, {}

    def counting(rank):
        def fn(x, y, start):
            assert x.size(0) == args.eval_batch_seqs  # one shape: a short batch repeats its last window (not counted)
            counts[rank] = counts.get(rank, 0) + torch.unique(x, dim=0).size(0)
            return model.target_stats(x, y, start)
        return fn

    def capture(rank):
        def gather(buf, mine):
            sent[rank] = mine.clone()
        return gather

    for r in range(world):  # pass 1: what each rank contributes
        monkeypatch.setattr(train_gpt.dist, "all_gather_into_tensor", capture(r))
        train_gpt.eval_sliding(counting(r), tokens, args, cpu_ctx(r, world), quiet)
    assert sum(counts.values()) == n_windows, "windows are split across ranks, each scored once"
    assert max(counts.values()) <= math.ceil(n_windows / world)

    def gather(buf, mine):
        buf.copy_(torch.stack([sent[r] for r in range(world)]).reshape(buf.shape))

    monkeypatch.setattr(train_gpt.dist, "all_gather_into_tensor", gather)
    for r in range(world):  # pass 2: every rank ends with the full arrays
        logp, ent = train_gpt.eval_sliding(model.target_stats, tokens, args, cpu_ctx(r, world), quiet)
        assert torch.equal(logp, ref[0]) and torch.equal(ent, ref[1])


# ----------------------------------------------------------------------------- quantization
def heavy_rows(rows=64, cols=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    w[::3, :2] *= 40  # outliers, so a clip below the max wins on some rows
    return w


def test_int6_rows_error_bound_and_clip_search():
    w = heavy_rows()
    q, s = artifact_codec.quantize_rows(w, 31)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 31 and s.dtype == torch.float16
    sf = s.float()[:, None]
    deq = artifact_codec.dequantize_rows(q, s)
    torch.testing.assert_close(deq, q.float() * sf)
    inside = w.abs() <= 31 * sf  # entries the clip did not cut
    err = (w - deq).abs()
    assert (err[inside] <= (sf / 2).expand_as(w)[inside] * (1 + 1e-5)).all()
    assert (err[~inside] >= 0).all() and (q[~inside].abs() == 31).all()  # clipped entries saturate
    # the chosen clip is never worse than the plain max-abs clip, and beats it somewhere
    s_max = (w.abs().amax(1) / 31).half().float()[:, None]
    err_max = (torch.clamp(torch.round(w / s_max), -31, 31) * s_max - w).square().sum(1)
    err_chosen = (deq - w).square().sum(1)
    assert (err_chosen <= err_max * (1 + 1e-6)).all()
    assert (err_chosen < err_max * (1 - 1e-3)).any()


def test_int8_rows_error_bound():
    w = heavy_rows(seed=1)
    q, s = artifact_codec.quantize_rows(w, 127)
    sf = s.float()[:, None]
    inside = w.abs() <= 127 * sf
    assert int(q.abs().max()) <= 127
    assert ((w - artifact_codec.dequantize_rows(q, s)).abs()[inside] <= (sf / 2).expand_as(w)[inside] * (1 + 1e-5)).all()


INT6_NAME = re.compile(r"blocks\.\d+\.(attn\.(q|k|v|proj)|mlp\.(up|down))\.weight$")


def test_quantize_state_kinds():
    args = tiny_args(MODEL_DIM=128, BIGRAM_DIM=64, MTP_NUM_HEADS=2, ROPE_DIMS=16)
    model = random_model(args)
    qs = artifact_codec.quantize_state(model.state_dict())
    sd = model.state_dict()
    assert not any(k.startswith("mtp_heads.") for k in qs) and any(k.startswith("mtp_heads.") for k in sd)
    assert set(qs) == {k for k in sd if not k.startswith("mtp_heads.")}
    kinds = {}
    for name, e in qs.items():
        t = sd[name]
        want = "int6" if INT6_NAME.search(name) else "int8" if t.ndim == 2 and t.numel() > 65536 else "float"
        assert e["kind"] == want, name
        kinds[want] = kinds.get(want, 0) + 1
        if want == "int6":
            assert int(e["q"].abs().max()) <= 31 and e["q"].shape == t.shape and e["scale"].shape == (t.size(0),)
        elif want == "float":
            assert e["value"].dtype == (torch.float16 if t.ndim == 2 else torch.float32)
    assert kinds["int6"] == 6 * args.num_layers and kinds["int8"] == 2  # tok_emb and bigram_embed
    assert {"tok_emb.weight", "bigram_embed.weight"} == {k for k, e in qs.items() if e["kind"] == "int8"}


ROUNDTRIP_TOL = 0.02  # nats: int6/int8 round trip of a briefly trained tiny model


def test_roundtrip_loss_close_to_float_model(tmp_path):
    """Train a few Adam steps, export, reload through the artifact path; the loss moves by < ROUNDTRIP_TOL."""
    args = tiny_args(MODEL_DIM=128, BIGRAM_DIM=64, MTP_NUM_HEADS=2, ROPE_DIMS=16)
    torch.manual_seed(0)
    model = train_gpt.build_model(args)
    data = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(2))
    data[:, 1::2] = (data[:, 0::2][:, :16] * 7 + 3) % 64  # learnable structure
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        opt.zero_grad()
        model(data[:, :-1], data[:, 1:]).backward()
        opt.step()
    model.eval()
    path = tmp_path / "m.ptz"
    train_gpt.write_atomic(path, artifact_of(artifact_codec.quantize_state(model.state_dict()), args.meta()))
    meta, state = train_gpt.load_artifact(str(path))
    assert meta["config_hash"] == args.config_hash()
    rt = train_gpt.build_eval_model(meta["arch"], state, str(path), torch.device("cpu")).eval()
    with torch.no_grad():
        before = float(F_loss(model, data))
        after = float(F_loss(rt, data))
    assert before < 6.0  # it did learn something
    assert abs(after - before) < ROUNDTRIP_TOL, (before, after)


def F_loss(model, data):
    logp, _ = model.target_stats(data[:, :-1], data[:, 1:], 0)
    return -logp.mean()


# ----------------------------------------------------------------------------- CLI runs (one training run shared)
@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_paths):
    """One tiny training run with EVAL_DUMP, then EVAL_ONLY reruns of its artifact (plain and perturbed data)."""
    root = tmp_path_factory.mktemp("eval_cli")
    data = make_dataset(root / "data", sample_paths)
    env = tiny_env_for(data, sample_paths)
    code = frozen_code(root)
    train = run_cli(env, root, script=code / "train_gpt.py", RUN_ID="train", EVAL_DUMP="train.npz")
    assert train.returncode == 0, train.stderr[-3000:]
    artifact = root / "artifacts" / "train.ptz"
    return types.SimpleNamespace(root=root, data=data, env=env, train=train, artifact=artifact, sample=sample_paths,
                                 code=code)


def eval_only(t, run_id, data=None, **extra):
    env = tiny_env_for(data or t.data, t.sample)
    p = run_cli(env, t.root, script=t.code / "train_gpt.py", RUN_ID=run_id, EVAL_ONLY=1, ARTIFACT=str(t.artifact), EVAL_DUMP=f"{run_id}.npz", **extra)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    return p, np.load(t.root / f"{run_id}.npz")


def test_total_size_line_adds_up(trained):
    out = trained.train.stdout
    total = int(re.search(r"^Total submission size int6\+lzma: (\d+) bytes$", out, re.M).group(1))
    files = log_value(out, "code_bytes:", "files").split(",")
    names = [f.split("=")[0] for f in files]
    assert "train_gpt.py" in names
    code = len(train_gpt.pack_code(names, trained.code))  # the code as shipped: one self-extracting file (test_code.py)
    assert total == trained.artifact.stat().st_size + code
    m = re.search(r"^serialized_model_int6_lzma:(\d+) bytes path:(\S+) export_time:(\S+)s calibration:(\S+)s quantize:(\S+)s "
                  r"search:(\S+)s$", out, re.M)
    assert int(m.group(1)) == trained.artifact.stat().st_size and (trained.root / m.group(2)) == trained.artifact
    assert float(m.group(3)) == pytest.approx(sum(float(m.group(i)) for i in (4, 5, 6)), abs=0.1)  # 4 roundings


def test_cli_roundtrip_loss_close_to_post_ema(trained):
    """Same windows (TRAIN_SEQ_LEN == EVAL_SEQ_LEN here): the exported model's loss is within ROUNDTRIP_TOL."""
    out = trained.train.stdout
    post = float(log_value(out, "post_ema", "val_loss"))
    rt = float(log_value(out, "final_int6_roundtrip_exact", "val_loss"))
    assert abs(rt - post) < ROUNDTRIP_TOL, (post, rt)


def test_size_counts_mixer_file_when_used(trained):
    p, _ = eval_only(trained, "sizemix", USE_NGRAM_MIXER=1)
    names = [f.split("=")[0] for f in log_value(p.stdout, "code_bytes:", "files").split(",")]
    assert names == ["train_gpt.py", "artifact_codec.py", "backoff_mixer.py"]
    total = int(re.search(r"Total submission size int6\+lzma: (\d+) bytes", p.stdout).group(1))
    assert total == trained.artifact.stat().st_size + len(train_gpt.pack_code(names, trained.code))


def independent_bytes(tokens: list[int], sp) -> np.ndarray:
    """UTF-8 bytes of each target, from SentencePiece's own decoding of each document (split at control tokens)."""
    out = np.zeros(len(tokens) - 1)
    doc: list[int] = []

    def flush():
        if doc:  # whole-document byte count, spread over its targets by cumulative decode
            prev = 0
            for j in range(len(doc)):
                n = len(sp.decode([tokens[i + 1] for i in doc[:j + 1]]).encode("utf-8"))
                out[doc[j]] = n - prev
                prev = n
            doc.clear()

    for t in range(len(tokens) - 1):
        if sp.is_control(tokens[t + 1]):
            flush()
        else:
            doc.append(t)
    flush()
    return out


def test_eval_dump_audits_the_logged_bpb(trained):
    out = trained.train.stdout
    dump = np.load(trained.root / "train.npz")
    nll, nll_neural, nbytes = dump["nll"], dump["nll_neural"], dump["bytes"]
    val = train_gpt.load_data_shard(trained.data / "fineweb_val_000000.bin").numpy().astype(int).tolist()
    assert nll.shape == nll_neural.shape == nbytes.shape == (len(val) - 1,)
    bpb = float(log_value(out, "final_int6_sliding_window_exact", "val_bpb"))
    assert nll.sum() / LN2 / nbytes.sum() == pytest.approx(bpb, abs=2e-8)
    assert nll.mean() == pytest.approx(float(log_value(out, "final_int6_sliding_window_exact", "val_loss")), abs=2e-8)
    neural = float(log_value(out, "final_int6_sliding_window_neural_exact", "val_bpb"))
    assert nll_neural.sum() / LN2 / nbytes.sum() == pytest.approx(neural, abs=2e-8)
    sp = spm.SentencePieceProcessor()
    sp.Load(str(trained.sample[1]))
    ref = independent_bytes(val, sp)
    assert nbytes.sum() == len(sp.decode(val).encode("utf-8"))
    np.testing.assert_array_equal(nbytes, ref)


FINAL_KEYS = ("final_int6_roundtrip_exact", "final_int6_sliding_window_neural_exact", "final_int6_sliding_window_exact")


def finals(text: str) -> list[str]:
    lines = [l for l in text.splitlines() if l.startswith(FINAL_KEYS) or l.startswith("final_int6_roundtrip ")]
    return [re.sub(r" eval_time:\S+", "", l) for l in lines]


def test_eval_only_reproduces_training_numbers_exactly(trained):
    p, dump = eval_only(trained, "again")
    assert len(finals(p.stdout)) == 4 and finals(p.stdout) == finals(trained.train.stdout)
    ref = np.load(trained.root / "train.npz")
    for k in ("nll", "nll_neural", "bytes"):
        np.testing.assert_array_equal(dump[k], ref[k])
    assert "eval_only:1" in p.stdout and "train_loss" not in p.stdout


@pytest.mark.parametrize("mixer", [0, 1])
def test_changing_the_tail_leaves_earlier_scores_unchanged(trained, mixer):
    """Score is causal end to end: perturbing the last K val tokens changes no nll before them."""
    K = 40
    val = train_gpt.load_data_shard(trained.data / "fineweb_val_000000.bin").numpy().copy()
    pert = trained.root / f"pert{mixer}"
    shutil.copytree(trained.data, pert)
    val[-K:] = (val[-K:].astype(int) * 31 + 7) % 1024
    write_shard(pert / "fineweb_val_000000.bin", val)
    _, a = eval_only(trained, f"base{mixer}", USE_NGRAM_MIXER=mixer)
    _, b = eval_only(trained, f"perturbed{mixer}", data=pert, USE_NGRAM_MIXER=mixer)
    first = len(val) - K - 1  # target index of the first changed token
    np.testing.assert_array_equal(a["nll"][:first], b["nll"][:first])
    np.testing.assert_array_equal(a["nll_neural"][:first], b["nll_neural"][:first])
    assert not np.array_equal(a["nll"][first:], b["nll"][first:])


def test_two_gloo_ranks_score_like_one(trained):
    """A real 2-rank run (torchrun, gloo): each rank scores half the windows; the gathered arrays equal world 1's."""
    env = dict(tiny_env_for(trained.data, trained.sample), RUN_ID="two", EVAL_ONLY="1", ARTIFACT=str(trained.artifact),
               EVAL_DUMP="two.npz")
    p = run_two_ranks([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(trained.code / "train_gpt.py")], trained.root, env, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "world_size:2 backend:gloo" in p.stdout
    two, one = np.load(trained.root / "two.npz"), np.load(trained.root / "train.npz")
    np.testing.assert_allclose(two["nll_neural"], one["nll_neural"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(two["bytes"], one["bytes"])
    for key in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact"):
        assert float(log_value(p.stdout, key, "val_loss")) == pytest.approx(
            float(log_value(trained.train.stdout, key, "val_loss")), abs=1e-6)


def test_mixed_scores_equal_the_streaming_contract(trained):
    """The eval's mixed nll == the mixer's streaming API driven by hand: per chunk of EVAL_BATCH_SEQS*EVAL_STRIDE
    targets, score_from_net(log p_net(y), H, context, y) first, then update with those tokens."""
    from backoff_mixer import BackoffNgramMixer
    p, dump = eval_only(trained, "mixcontract", USE_NGRAM_MIXER=1)
    hp = json.loads(p.stdout.split("hparams:", 1)[1].splitlines()[0])
    m = BackoffNgramMixer(vocab_size=hp["VOCAB_SIZE"], **{h.role[6:]: hp[h.name] for h in train_gpt.HPARAMS
                                                           if h.role.startswith("mixer:")})
    assert m.rule == "online" and m.n_experts == 18
    val = torch.from_numpy(train_gpt.load_data_shard(trained.data / "fineweb_val_000000.bin").numpy().astype(np.int64))
    logp, ent = torch.from_numpy(-dump["nll_neural"]), torch.from_numpy(dump["entropy"])
    chunk, N, out = hp["EVAL_BATCH_SEQS"] * hp["EVAL_STRIDE"], val.numel() - 1, []
    m.update(val[:1])
    for a in range(0, N, chunk):
        e, P = min(a + chunk, N), min(a, hp["NGRAM_ORDER"] - 1)
        out.append(m.score_from_net(logp[None, a:e], ent[None, a:e], val[None, a - P:e], val[None, a + 1:e + 1])[0])
        m.update(val[a + 1:e + 1])
    np.testing.assert_allclose(torch.cat(out).double().numpy(), dump["nll"], rtol=0, atol=1e-6)
    assert dump["nll"].sum() < dump["nll_neural"].sum()  # mixing helps on held-out text


def test_eval_mixer_holds_no_table(monkeypatch):
    """Checking the settings builds nothing; the eval's mixer (score_stream only) never allocates its gram
    table nor compiles the CPU kernels: only the [V] unigram vector exists."""
    import backoff_mixer
    built = []
    monkeypatch.setattr(backoff_mixer, "_ExactTable", lambda *a, **k: built.append(a) or pytest.fail("table built"))
    monkeypatch.setattr(backoff_mixer, "_kernels", lambda: pytest.fail("kernels compiled"))
    args = train_gpt.Hyperparameters(env={}, preset="record")     # validates the mixer settings
    toks = torch.randint(0, 1024, (5000,), generator=torch.Generator().manual_seed(0))
    logs = []
    nll = train_gpt.mix_stream(toks, torch.full((4999,), -3.0), torch.full((4999,), 3.0), torch.ones(4999), args,
                               "cpu", logs.append)
    assert nll.shape == (4999,) and torch.isfinite(nll).all() and not built
    assert len(logs) == 2 and logs[0].startswith("mixer_pass tokens:4999 rule:online ")
    assert logs[1].startswith("mixer_learned experts:18 buckets(context,H bin of 2,4 nats)")   # what rule online learned
