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
import time
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
        assert x.size(0) == args.eval_batch_seqs  # one batch shape: a short batch repeats its last window
        events.append(("score", torch.unique(x, dim=0).size(0)))
        return lp, en

    ttt = train_gpt.TestTimeTrainer(model, tokens_for(N), args, cpu_ctx(), quiet, time.perf_counter())
    real_loss = ttt.loss_fn
    seen = []
    ttt.loss_fn = lambda x, y: seen.append(y) or real_loss(x, y)

    def adapt(lo, hi, left):
        events.append(("train", lo, hi))
        seen.clear()
        ttt(lo, hi, left)
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
    ttt = train_gpt.TestTimeTrainer(model, tokens_for(150), args, cpu_ctx(), quiet, time.perf_counter())
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
    ttt = train_gpt.TestTimeTrainer(model, tokens_for(N, 5), args, cpu_ctx(), quiet, time.perf_counter())
    after = []

    def adapt(lo, hi, left):
        ttt(lo, hi, left)
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
    ttt = train_gpt.TestTimeTrainer(model, tokens_for(N, 2), args, cpu_ctx(), quiet, time.perf_counter())
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
    """A tiny training run with TTT and the mixer (so the unadapted network's pass too) and EVAL_DUMP."""
    root = tmp_path_factory.mktemp("ttt_cli")
    data = make_dataset(root / "data", sample_paths)
    code = frozen_code(root)
    env = tiny_env_for(data, sample_paths, **TTT_ENV)
    train = run_cli(env, root, script=code / "train_gpt.py", RUN_ID="train", EVAL_DUMP="train.npz")
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
    chunks = math.ceil(len(train_gpt.sliding_windows(1499, 64, 32)) / (256 // 32))
    assert int(log_value(out, "eval_time_split", "ttt_chunks")) == chunks - 1  # trained on all but the last
    phases = ("roundtrip", "no_ttt_pass", "mixer_probe", "sliding", "ttt_train", "mixer")
    split = {k: float(log_value(out, "eval_time_split", k).rstrip("s")) for k in phases}
    total = float(log_value(out, "eval_time_split", "total").rstrip("s"))
    assert all(v >= 0 for v in split.values())  # (how long each took depends on the machine: not tested)
    assert any(l.startswith("progress phase:sliding_eval windows:") for l in out.splitlines())  # the unadapted pass ran
    assert split["mixer_probe"] == 0 and log_value(out, "eval_time_split", "budget") == "0s"  # the CPU preset: no clock
    assert abs(sum(split.values()) - total) <= 0.35  # the phases add up (each rounded to 0.1 s)
    assert any(l.startswith("progress phase:sliding_eval+ttt windows:") and " eta:" in l for l in out.splitlines())


def test_eval_only_reproduces_ttt_numbers_exactly_and_the_artifact_never_changes(trained):
    digest = hashlib.sha256(trained.artifact.read_bytes()).hexdigest()
    p, dump = eval_only(trained, "again")
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
    for key in ("nll", "nll_neural", "entropy", "nll_no_ttt", "entropy_no_ttt"):  # the mixture of both passes
        np.testing.assert_array_equal(a[key][:k - 1], b[key][:k - 1])
    assert not np.array_equal(a["nll_neural"][k - 1:], b["nll_neural"][k - 1:])
    _, off = eval_only(trained, "off", TTT_ENABLED=0)
    assert not np.array_equal(a["nll_neural"][800:], off["nll_neural"][800:])  # TTT changed later chunks' scores
    np.testing.assert_array_equal(a["nll_neural"][:288], off["nll_neural"][:288])  # chunk 0: same weights
    assert all(d[key].shape == (1499,) and np.isfinite(d[key]).all() for d in (a, b) for key in d.files)  # each target once


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


# ----------------------------------------------------------------------------- the evaluation's clock (issue 22)
def test_clock_stops_adapting_where_the_projection_passes_the_budget():
    """An injected clock: after the second chunk the evaluation 'has run' a million seconds. The third call stops
    adapting (logged once, at that chunk); every chunk is still scored, the later ones with the weights after the
    second chunk (a hand-trained reference), and no later call trains."""
    args = ttt_args(EVAL_BUDGET_SECONDS=1000)
    N, tokens, logs, calls = 90, tokens_for(90, 2), [], []
    model, ref_model = random_model(args, seed=1), random_model(args, seed=1)
    ttt = train_gpt.TestTimeTrainer(model, tokens, args, cpu_ctx(), logs.append, time.perf_counter())

    def adapt(lo, hi, left):
        calls.append(hi)
        if len(calls) == 3:
            ttt.t_start -= 1e6
        ttt(lo, hi, left)

    logp, _ = train_gpt.eval_sliding(model.target_stats, tokens, args, cpu_ctx(), quiet, adapt)
    spans = chunk_spans(N, args.eval_seq_len, args.eval_stride, args.ttt_chunk_tokens)
    assert len(calls) == len(spans) - 1 >= 4 and ttt.chunks == 2
    assert len(logs) == 1 and logs[0].startswith(f"ttt_stop chunks_trained:2 scored:{spans[2][1]}/{N} projected_end:")
    assert float(log_value(logs[0], "ttt_stop", "projected_end").rstrip("s")) >= 1e6  # 1e6 s + a moment, printed to 0.1 s
    after_two = hand_trained(ref_model, tokens, spans[:3], args)[-1]
    for k, v in after_two.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    ref_model.load_state_dict(after_two)
    plain, _ = train_gpt.eval_sliding(ref_model.target_stats, tokens, args, cpu_ctx(), quiet)
    torch.testing.assert_close(logp[spans[2][0]:], plain[spans[2][0]:], rtol=1e-5, atol=1e-5)
    assert logp.shape == (N,) and torch.isfinite(logp).all()


def test_forcing_budget_stops_at_the_first_chance_and_scores_everything(trained):
    """EVAL_BUDGET_SECONDS=0.001 is over before the first chance to adapt (the round trip alone takes longer):
    no TTT step, the stop logged at chunk 0, every target scored; the adapted network is the unadapted one."""
    p, dump = eval_only(trained, "forced", EVAL_BUDGET_SECONDS=0.001)
    N, first_hi = 1499, 64 - 32 + 256
    stop = [l for l in p.stdout.splitlines() if l.startswith("ttt_stop ")]
    assert len(stop) == 1 and stop[0].startswith(f"ttt_stop chunks_trained:0 scored:{first_hi}/{N} ")
    assert log_value(p.stdout, "eval_time_split", "ttt_steps") == "0" and log_value(p.stdout, "eval_time_split", "ttt_chunks") == "0"
    # the stop at chunk 0 is the projection past 0.001 s; the printed value has 0.1 s steps, so only its form is checked
    assert re.fullmatch(r"\d+\.\ds", log_value(stop[0], "ttt_stop", "projected_end")) and " budget:0.001s " in stop[0]
    assert all(dump[k].shape == (N,) and np.isfinite(dump[k]).all() for k in dump.files)
    np.testing.assert_allclose(dump["nll_neural"], dump["nll_no_ttt"], rtol=0, atol=1e-5)
    assert float(log_value(p.stdout, "final_int6_sliding_window_exact", "val_bpb")) > 0


DRIVER = '''
import json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
import train_gpt
seen = []


def record(fn, **kw):  # torch.compile stand-in: compiles nothing, records every call's shapes
    def call(*a):
        seen.append([fn.__name__] + [list(t.shape) if isinstance(t, torch.Tensor) else t for t in a])
        return fn(*a)
    return call


torch.compile = record
if os.environ.get("SLOW_RANK") == os.environ["RANK"]:  # this rank's clock reads a million seconds later
    init = train_gpt.TestTimeTrainer.__init__
    train_gpt.TestTimeTrainer.__init__ = lambda self, *a, **k: (init(self, *a, **k), setattr(self, "t_start", self.t_start - 1e6))[0]
code = train_gpt.main()
json.dump(seen, open(f"shapes_{os.environ['RANK']}.json", "w"))
sys.exit(code)
'''


def two_rank_driver(t, run_id, **extra):
    (t.root / "driver.py").write_text(DRIVER)
    env = dict(tiny_env_for(t.data, t.sample, **TTT_ENV), RUN_ID=run_id, EVAL_ONLY="1", ARTIFACT=str(t.artifact), COMPILE="1",
               **{k: str(v) for k, v in extra.items()})
    p = run_two_ranks([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(t.root / "driver.py"), str(t.code)], t.root, env, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p, [[tuple(tuple(x) if isinstance(x, list) else x for x in call) for call in
                __import__("json").loads((t.root / f"shapes_{r}.json").read_text())] for r in (0, 1)]


def test_two_ranks_see_one_shape_per_compiled_function(trained):
    """2 gloo ranks, TTT steps that do not split evenly (chunk 0: 5 sequences in steps of 4; a 1-sequence step
    leaves rank 1 nothing but padding): both ranks run the same TTT steps, all of one shape [R, L]; the stats see
    the round trip's batch, the sliding batch and (rank 0 only, window 0) the batch scored from position 0."""
    _, seen = two_rank_driver(trained, "shapes")
    L, S, B, R, rt = 64, 32, 8, 2, 4096 // (64 * 2)
    common = {("target_stats", (rt, L), (rt, L), 0), ("target_stats", (B, L), (B, L), L - S)}
    want = [common | {("target_stats", (B, L), (B, L), 0)}, common]
    for r in (0, 1):
        assert {c for c in seen[r] if c[0] == "target_stats"} == want[r], r
        assert {c for c in seen[r] if c[0] != "target_stats"} == {("loss", (R, L), (R, L))}, r
    steps = [sum(c[0] == "loss" for c in seen[r]) for r in (0, 1)]
    assert steps[0] == steps[1] == int(log_value(trained.train.stdout, "eval_time_split", "ttt_steps"))


def test_two_ranks_take_one_clock_decision(trained):
    """Rank 1's clock reads a million seconds late, rank 0's is fine (budget 1e5 s): the projection is reduced across
    ranks, so both stop adapting at the first chance (without it rank 0 would train alone and stall its all-reduce)."""
    p, seen = two_rank_driver(trained, "slow", SLOW_RANK=1, EVAL_BUDGET_SECONDS=1e5)
    assert [l.split()[1] for l in p.stdout.splitlines() if l.startswith("ttt_stop ")] == ["chunks_trained:0"]
    assert log_value(p.stdout, "eval_time_split", "ttt_steps") == "0"
    assert not any(c[0] == "loss" for r in (0, 1) for c in seen[r])


def test_harmful_ttt_stays_within_the_bound_of_no_ttt(trained):
    """A learning rate that wrecks the adapted network: the mixture (experts on both networks, buckets refining
    either network's) is still within (buckets with targets) log K nats of the score without TTT and of rule online
    over the harmful network alone (Bayes mixtures at eta = 1); the unadapted pass equals the TTT-off run's."""
    from backoff_mixer import BackoffNgramMixer
    p, bad = eval_only(trained, "harmful", TTT_LR=0.3)
    q, off = eval_only(trained, "ttt_off", TTT_ENABLED=0)
    np.testing.assert_array_equal(bad["nll_no_ttt"], off["nll_neural"])
    np.testing.assert_array_equal(bad["entropy_no_ttt"], off["entropy"])
    assert bad["nll_neural"].mean() > off["nll_neural"].mean() + 0.5      # TTT did real harm to the network
    learned = [l for l in p.stdout.splitlines() if l.startswith("mixer_learned ")][0]
    assert learned.startswith("mixer_learned experts:36 ") and "mixer_learned experts:18 " in q.stdout
    buckets, K, N = sum(bool(re.match(r"\d+,\d/\d:\d+:", w)) for w in learned.split()), 36, 1499
    assert 2 <= buckets <= 4 * 9                                          # (NGRAM_ORDER 4, 3 entropy bins a network)
    val = torch.from_numpy(train_gpt.load_data_shard(trained.data / "fineweb_val_000000.bin").numpy().astype(np.int64))
    alone = BackoffNgramMixer(vocab_size=1024, max_order=4).score_stream(
        val, torch.from_numpy(-bad["nll_neural"]), torch.from_numpy(bad["entropy"]), 8 * 32).double().numpy()
    slack = buckets * math.log(K) + N * (2.0 ** -28 + 1e-6)
    assert bad["nll"].sum() <= off["nll"].sum() + slack and bad["nll"].sum() <= alone.sum() + slack
    assert alone.sum() > off["nll"].sum() + 2 * slack                    # alone, the harmful network loses far more


def test_sliding_and_ttt_under_bf16_autocast(monkeypatch):
    """CPU autocast is a no-op unless asked: here train_gpt.autocast gives bf16 on CPU, as CUDA does. The sliding pass
    and TTT run in bf16 (a linear's output is bf16), return float32 scores close to float32's, and the weights stay
    float32 and move."""
    args = ttt_args()
    tokens, model = tokens_for(90, 2), random_model(args, seed=1)
    plain32, _ = train_gpt.eval_sliding(model.target_stats, tokens, args, cpu_ctx(), quiet)
    ttt32, _ = train_gpt.eval_sliding(model.target_stats, tokens, args, cpu_ctx(), quiet,
                                      train_gpt.TestTimeTrainer(model, tokens, args, cpu_ctx(), quiet, time.perf_counter()))
    monkeypatch.setattr(train_gpt, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    model, dtypes = random_model(args, seed=1), set()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.blocks[0].attn.q.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    plain16, ent16 = train_gpt.eval_sliding(model.target_stats, tokens, args, cpu_ctx(), quiet)
    ttt = train_gpt.TestTimeTrainer(model, tokens, args, cpu_ctx(), quiet, time.perf_counter())
    ttt16, _ = train_gpt.eval_sliding(model.target_stats, tokens, args, cpu_ctx(), quiet, ttt)
    assert dtypes == {torch.bfloat16} and plain16.dtype == ttt16.dtype == ent16.dtype == torch.float32
    assert torch.isfinite(ttt16).all() and ttt.steps > 0
    assert (plain16 - plain32).abs().max() < 0.1 and (ttt16 - ttt32).abs().mean() < 0.1
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert any(not torch.equal(model.state_dict()[k], start[k]) for k in start)


def test_evaluate_artifact_under_bf16_autocast(trained, monkeypatch):
    """The whole evaluation in-process (round trip, both sliding passes, TTT, the mixer) under bf16 autocast: it
    completes and its score is close to the float32 run's."""
    env = dict(tiny_env_for(trained.data, trained.sample, **TTT_ENV), EVAL_ONLY="1", ARTIFACT=str(trained.artifact))
    args = train_gpt.Hyperparameters(env, preset="cpu")
    loaded = train_gpt.load_artifact(args.artifact)
    train_gpt.adopt_artifact_arch(args, loaded[0], args.artifact)
    luts = train_gpt.build_byte_luts(train_gpt.load_tokenizer(args.tokenizer_path, args.vocab_size), args.vocab_size)
    val = train_gpt.load_validation_tokens(str(trained.data / "fineweb_val_*.bin"), args.vocab_size, 65)
    ctx = types.SimpleNamespace(rank=0, world=1, device=torch.device("cpu"), sync=lambda: None)
    scores = []
    for bf16 in (False, True):
        if bf16:
            monkeypatch.setattr(train_gpt, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
        lines = []
        train_gpt.evaluate_artifact(args.artifact, args, val, luts, ctx, lines.append, train_gpt.load_artifact(args.artifact))
        scores.append(float(log_value("\n".join(lines), "final_int6_sliding_window_exact", "val_bpb")))
        assert int(log_value("\n".join(lines), "eval_time_split", "ttt_steps")) > 0
    assert scores[0] == pytest.approx(float(log_value(trained.train.stdout, "final_int6_sliding_window_exact", "val_bpb")), abs=1e-6)
    assert scores[1] == pytest.approx(scores[0], abs=0.02) and scores[1] != scores[0]
