"""Score-first test-time training (issue 17): chunks score every target once, each chunk with the weights
trained only on the chunks before it; the weights after chunk j equal an independent re-implementation of
the training steps; causality end to end (TTT and mixer on); 1 rank == 2 gloo ranks; EVAL_ONLY is bitwise.

Expectations are independent: chunk spans from the spec's window rule, hand-written SGD/AdamW steps and
gradient clipping on a copy of the model, and CLI dumps compared with perturbed data."""
from __future__ import annotations

import copy
import hashlib
import math
import re
import shutil
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import frozen_code, log_value, make_dataset, run_cli, run_two_ranks, tiny_env_for
import train_gpt
from data.shards import write_shard  # noqa: E402
from test_eval import cpu_ctx, finals, quiet, random_model, scored_by, tiny_args


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread in this module


def ttt_args(**over):
    return tiny_args(**{**dict(TTT_ENABLED=1, TTT_CHUNK_TOKENS=16, TTT_EPOCHS=2, TTT_LR=0.05, TTT_BATCH_SEQS=2,
                               TTT_GRAD_CLIP=0.5), **over})


def chunk_spans(N: int, L: int, S: int, C: int) -> list[tuple[int, int]]:
    """Chunk j = windows j*C/S .. (j+1)*C/S - 1 of the spec's sliding rule; its targets are what they score."""
    starts = [0] + list(range(S, max(N - L + S, S), S))
    spans = []
    for j in range(0, len(starts), C // S):
        hit = [t for ws in starts[j:j + C // S] for t in scored_by(ws, L, S, N)]
        spans.append((min(hit), max(hit) + 1))
    return spans


def tokens_for(N: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (N + 1,), generator=torch.Generator().manual_seed(seed)).to(torch.uint16)


@pytest.mark.parametrize("N", [32, 33, 70, 101])
def test_chunks_score_each_target_once_before_training_on_it(N):
    """Events in order: every target is written once, by a window of its chunk, before that chunk's training;
    training sees only targets < the chunk's end, and every chunk but the last is trained on."""
    args = ttt_args()
    model = random_model(args)
    L, S = args.eval_seq_len, args.eval_stride
    events, hits = [], np.zeros(N, dtype=int)

    def stats(x, y, start):
        lp, en = model.target_stats(x, y, start)
        events.append(("score", x.size(0)))
        return lp, en

    ttt = train_gpt.TestTimeTrainer(model, tokens_for(N), args, cpu_ctx())
    real_loss = ttt.loss_fn
    seen = []
    ttt.loss_fn = lambda x, y: seen.append(y) or real_loss(x, y)

    def adapt(lo, hi):
        events.append(("train", lo, hi))
        seen.clear()
        ttt(lo, hi)
        tokens = tokens_for(N).long()
        for y in seen:  # every training target is one of tokens[1..hi]: scored already
            assert any(torch.equal(y[i], tokens[s + 1:s + 1 + L]) for i in range(y.size(0))
                       for s in range(0, hi - L + 1))

    logp, _ = train_gpt.eval_sliding(stats, tokens_for(N), args, cpu_ctx(), quiet, adapt)
    spans = chunk_spans(N, L, S, args.ttt_chunk_tokens)
    assert [e[1:] for e in events if e[0] == "train"] == spans[:-1]
    for lo, hi in spans:
        hits[lo:hi] += 1
    assert (hits == 1).all() and spans[0][0] == 0 and spans[-1][1] == N
    per_chunk = args.ttt_chunk_tokens // S
    n_windows = len(train_gpt.sliding_windows(N, L, S))
    scored, chunk = 0, 0
    for e in events:  # windows scored between trainings = exactly that chunk's windows
        if e[0] == "score":
            scored += e[1]
        else:
            chunk += 1
            assert scored == min(chunk * per_chunk, n_windows)
    assert scored == n_windows and logp.shape == (N,)


def test_zero_learning_rate_gives_the_plain_sliding_scores_bitwise():
    """With TTT_LR=0 the chunked pass is the plain pass: same windows, same batches (chunks hold whole batches)."""
    args = ttt_args(TTT_LR=0, TTT_CHUNK_TOKENS=32)
    model = random_model(args)
    plain = train_gpt.eval_sliding(model.target_stats, tokens_for(150), args, cpu_ctx(), quiet)
    ttt = train_gpt.TestTimeTrainer(model, tokens_for(150), args, cpu_ctx())
    chunked = train_gpt.eval_sliding(model.target_stats, tokens_for(150), args, cpu_ctx(), quiet, ttt)
    assert ttt.steps > 0 and torch.equal(plain[0], chunked[0]) and torch.equal(plain[1], chunked[1])


def hand_trained(model0, tokens, spans, args):
    """Independent re-implementation: weights after each chunk, trained by hand from model0 on chunks 0..j."""
    model = copy.deepcopy(model0)
    names = [n for n, _ in model.named_parameters() if re.search(args.ttt_params, n)]
    params = dict(model.named_parameters())
    state = {n: {"m": torch.zeros_like(params[n]), "v": torch.zeros_like(params[n]), "t": 0} for n in names}
    L, out, tokens = args.eval_seq_len, [], tokens.long()
    for lo, hi in spans[:-1]:
        n = math.ceil((hi - lo) / L)
        seqs = sorted(max(hi - L * (k + 1), 0) for k in range(n))
        for _ in range(args.ttt_epochs):
            for b in range(0, n, args.ttt_batch_seqs):
                x = torch.stack([tokens[s:s + L] for s in seqs[b:b + args.ttt_batch_seqs]])
                y = torch.stack([tokens[s + 1:s + L + 1] for s in seqs[b:b + args.ttt_batch_seqs]])
                logits = model.logits(model.hidden(x))
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
                grads = torch.autograd.grad(loss, [params[k] for k in names])
                norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
                scale = min(1.0, args.ttt_grad_clip / (norm + 1e-6)) if args.ttt_grad_clip else 1.0
                with torch.no_grad():
                    for k, g in zip(names, grads):
                        g, st, p = g * scale, state[k], params[k]
                        st["t"] += 1
                        if args.ttt_optimizer == "sgd":  # m <- mu*m + g (m = g at the first step); p <- p - lr*m
                            st["m"] = g.clone() if st["t"] == 1 else 0.9 * st["m"] + g
                            p -= args.ttt_lr * st["m"]
                        else:  # Adam with bias correction, eps 1e-8, beta2 0.999, no decay
                            st["m"] = 0.9 * st["m"] + (1 - 0.9) * g
                            st["v"] = 0.999 * st["v"] + 0.001 * g * g
                            mh, vh = st["m"] / (1 - 0.9 ** st["t"]), st["v"] / (1 - 0.999 ** st["t"])
                            p -= args.ttt_lr * mh / (vh.sqrt() + 1e-8)
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


@pytest.mark.parametrize("opt,params,clip", [("sgd", ".", 0.5), ("adamw", "scale|gain|mix", 0.5), ("sgd", r"^blocks\.1\.", 0)])
def test_model_after_chunk_j_equals_hand_training_on_chunks_up_to_j(opt, params, clip):
    args = ttt_args(TTT_OPTIMIZER=opt, TTT_PARAMS=params, TTT_LR=0.05 if opt == "sgd" else 0.01, TTT_GRAD_CLIP=clip)
    N = 90
    model = random_model(args, seed=3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ttt = train_gpt.TestTimeTrainer(model, tokens_for(N, 5), args, cpu_ctx())
    after = []

    def adapt(lo, hi):
        ttt(lo, hi)
        after.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    ref_model = random_model(args, seed=3)
    train_gpt.eval_sliding(model.target_stats, tokens_for(N, 5), args, cpu_ctx(), quiet, adapt)
    spans = chunk_spans(N, args.eval_seq_len, args.eval_stride, args.ttt_chunk_tokens)
    ref = hand_trained(ref_model, tokens_for(N, 5), spans, args)
    assert len(after) == len(ref) == len(spans) - 1 >= 3
    for j, (got, want) in enumerate(zip(after, ref)):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"chunk {j} {k}")
    moved = {k for k in start if not torch.equal(after[-1][k], start[k])}
    assert moved == {k for k in start if re.search(params, k)}  # exactly the chosen ones adapt


def test_scores_of_chunk_j_come_from_the_weights_after_chunk_j_minus_1():
    """Chunk j's scores equal a plain sliding pass of the hand-trained weights after chunk j-1, on chunk j."""
    args = ttt_args()
    N = 90
    model = random_model(args, seed=1)
    ref_model = random_model(args, seed=1)
    ttt = train_gpt.TestTimeTrainer(model, tokens_for(N, 2), args, cpu_ctx())
    logp, _ = train_gpt.eval_sliding(model.target_stats, tokens_for(N, 2), args, cpu_ctx(), quiet, ttt)
    spans = chunk_spans(N, args.eval_seq_len, args.eval_stride, args.ttt_chunk_tokens)
    weights = [{k: v.clone() for k, v in ref_model.state_dict().items()}] + hand_trained(ref_model, tokens_for(N, 2), spans, args)
    for (lo, hi), w in zip(spans, weights):
        ref_model.load_state_dict(w)
        plain, _ = train_gpt.eval_sliding(ref_model.target_stats, tokens_for(N, 2), args, cpu_ctx(), quiet)
        torch.testing.assert_close(logp[lo:hi], plain[lo:hi], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logp[spans[-1][0]:], train_gpt.eval_sliding(
        random_model(args, seed=1).target_stats, tokens_for(N, 2), args, cpu_ctx(), quiet)[0][spans[-1][0]:])


# ----------------------------------------------------------------------------- CLI (one TTT training run shared)
TTT_ENV = dict(TTT_ENABLED="1", TTT_CHUNK_TOKENS="256", TTT_EPOCHS="2", TTT_LR="0.01", TTT_BATCH_SEQS="4",
               USE_NGRAM_MIXER="1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_paths):
    """A tiny training run with TTT (and its no-TTT baseline pass) and EVAL_DUMP."""
    root = tmp_path_factory.mktemp("ttt_cli")
    data = make_dataset(root / "data", sample_paths)
    code = frozen_code(root)
    env = tiny_env_for(data, sample_paths, **TTT_ENV)
    train = run_cli(env, root, script=code / "train_gpt.py", RUN_ID="train", EVAL_DUMP="train.npz", TTT_BASELINE=1)
    assert train.returncode == 0, train.stderr[-3000:]
    return types.SimpleNamespace(root=root, data=data, train=train, artifact=root / "artifacts" / "train.ptz",
                                 sample=sample_paths, code=code)


def eval_only(t, run_id, data=None, **extra):
    env = tiny_env_for(data or t.data, t.sample, **TTT_ENV)
    p = run_cli(env, t.root, script=t.code / "train_gpt.py", RUN_ID=run_id, EVAL_ONLY=1, ARTIFACT=str(t.artifact),
                EVAL_DUMP=f"{run_id}.npz", **extra)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    return p, np.load(t.root / f"{run_id}.npz")


def test_log_reports_ttt_gain_and_time_split(trained):
    out = trained.train.stdout
    neural = float(log_value(out, "final_int6_sliding_window_neural_exact", "val_bpb"))
    base = float(log_value(out, "sliding_window_neural_no_ttt", "val_bpb"))
    assert float(log_value(out, "sliding_window_neural_no_ttt", "ttt_gain_bpb")) == pytest.approx(neural - base, abs=2e-8)
    assert neural < base  # adapting to the stream helps the network here
    assert int(log_value(out, "eval_time_split", "ttt_steps")) > 0
    split = {k: float(log_value(out, "eval_time_split", k).rstrip("s")) for k in ("no_ttt_pass", "sliding", "ttt_train", "mixer")}
    total = float(log_value(out, "final_int6_sliding_window_exact", "eval_time").rstrip("ms")) / 1000
    assert all(v >= 0 for v in split.values()) and split["ttt_train"] > 0 and sum(split.values()) <= total + 0.1
    assert any(l.startswith("progress phase:sliding_eval+ttt windows:") and " eta:" in l for l in out.splitlines())


def test_eval_only_reproduces_ttt_numbers_exactly_and_the_artifact_never_changes(trained):
    digest = hashlib.sha256(trained.artifact.read_bytes()).hexdigest()
    p, dump = eval_only(trained, "again", TTT_BASELINE=1)
    assert len(finals(p.stdout)) == 4 and finals(p.stdout) == finals(trained.train.stdout)
    same = lambda s: [l for l in s.splitlines() if l.startswith("sliding_window_neural_no_ttt")]  # noqa: E731
    assert len(same(p.stdout)) == 1 and same(p.stdout) == same(trained.train.stdout)
    assert log_value(p.stdout, "eval_time_split", "ttt_steps") == log_value(trained.train.stdout, "eval_time_split", "ttt_steps")
    ref = np.load(trained.root / "train.npz")
    for k in ("nll", "nll_neural", "entropy", "bytes"):
        np.testing.assert_array_equal(dump[k], ref[k])
    assert hashlib.sha256(trained.artifact.read_bytes()).hexdigest() == digest


def test_changing_tokens_after_k_changes_no_score_before_k(trained):
    """TTT and mixer on: perturbing the val tokens from position k (inside a chunk) on leaves every nll of a
    target < k - 1 (whose context and token lie before k) bitwise unchanged; later ones change."""
    val = train_gpt.load_data_shard(trained.data / "fineweb_val_000000.bin").numpy().copy()
    k = 700  # chunk 1 scores targets [288, 544), chunk 2 [544, 800): k is mid-chunk
    pert = trained.root / "pert"
    shutil.copytree(trained.data, pert)
    val[k:] = (val[k:].astype(int) * 31 + 7) % 1024
    write_shard(pert / "fineweb_val_000000.bin", val)
    _, a = eval_only(trained, "base")
    _, b = eval_only(trained, "perturbed", data=pert)
    for key in ("nll", "nll_neural", "entropy"):
        np.testing.assert_array_equal(a[key][:k - 1], b[key][:k - 1])
    assert not np.array_equal(a["nll_neural"][k - 1:], b["nll_neural"][k - 1:])
    _, off = eval_only(trained, "off", TTT_ENABLED=0)
    assert not np.array_equal(a["nll_neural"][800:], off["nll_neural"][800:])  # TTT changed later chunks' scores
    np.testing.assert_array_equal(a["nll_neural"][:288], off["nll_neural"][:288])  # chunk 0: same weights


def test_two_gloo_ranks_ttt_like_one(trained):
    env = dict(tiny_env_for(trained.data, trained.sample, **TTT_ENV), RUN_ID="two", EVAL_ONLY="1",
               ARTIFACT=str(trained.artifact), EVAL_DUMP="two.npz")
    p = run_two_ranks([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(trained.code / "train_gpt.py")], trained.root, env, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "world_size:2 backend:gloo" in p.stdout
    two, one = np.load(trained.root / "two.npz"), np.load(trained.root / "train.npz")
    np.testing.assert_allclose(two["nll_neural"], one["nll_neural"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(two["nll"], one["nll"], rtol=0, atol=1e-4)
    assert log_value(p.stdout, "eval_time_split", "ttt_steps") == log_value(trained.train.stdout, "eval_time_split", "ttt_steps")
