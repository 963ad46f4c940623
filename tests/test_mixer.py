"""Tests for backoff_mixer: normalization, causality, exact counts (checked against brute force
and against a hand-computed stream), state handling, the hashed rule's excess mass, errors."""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from backoff_mixer import BackoffNgramMixer, check_settings  # noqa: E402
from mixer_audit import HashedTargetOnlyMixer  # noqa: E402

RULES = BackoffNgramMixer.RULES


TAG_SHIFTS = (0,) * 8 + (4,) * 8                     # _ExactTable keys: tags 8..15 carry hi < 16


@pytest.fixture(params=["numba", "numpy"])
def table_code(request, monkeypatch):
    """Run a test of the CPU streaming path with the numba table kernels, and again with the
    numpy code that stands in for them where numba is missing."""
    import backoff_mixer
    if request.param == "numba" and backoff_mixer._kernels() is None:
        pytest.skip("numba is not installed")
    if request.param == "numpy":
        monkeypatch.setattr(backoff_mixer, "_KERNELS", [None])
    return request.param


def tagged(v):
    """Table keys' lo word for small values v: tag 9 in bits 60..63 (as int64: negative)."""
    return v + ((9 << 60) - (1 << 64))


def alpha(H):
    return 0.20 + 0.55 / (1 + math.exp(-2 * (H - 3.0)))


def text_like(n, V, seed):
    """Random stream with repeated spans, so that long contexts recur."""
    g = np.random.default_rng(seed)
    s = g.integers(0, V, n)
    for i in range(64, n, 16):
        if g.random() < 0.5:
            j, L = int(g.integers(0, i - 12)), int(g.integers(3, 12))
            s[i:i + L] = s[j:j + L][: n - i]
    return torch.from_numpy(s.astype(np.int64))


def fed(rule="backoff", V=32, order=5, n=3000, chunks=(257, 1000, 1743), seed=0, **kw):
    s = text_like(n, V, seed)
    m = BackoffNgramMixer(vocab_size=V, max_order=order, rule=rule, **kw)
    for a, b in zip((0,) + chunks[:-1], chunks):
        m.update(s[a:b])
    return m, s


def brute_levels(hist, ctx_tokens, order, min_count, V):
    """Independent reference: count by scanning the history (python lists). Returns p_1 and, per order
    2..order, (c_n(ctx), [c_n(ctx, v)]) if the context fits and c_n(ctx) >= min_count, else None."""
    N = len(hist)
    uni = [hist.count(v) for v in range(V)]
    p1 = [(uni[v] + 1) / (N + V) for v in range(V)]

    def counts(ctx):
        k = len(ctx)
        follow = [0] * V
        for i in range(k - 1, N - 1):
            if hist[i - k + 1:i + 1] == ctx:
                follow[hist[i + 1]] += 1
        return sum(follow), follow

    levels = []
    for n in range(2, order + 1):
        if len(ctx_tokens) >= n - 1:
            c, f = counts(ctx_tokens[len(ctx_tokens) - (n - 1):])
            if c >= min_count:
                levels.append((c, f))
                continue
        levels.append(None)
    return p1, levels


def brute_p_ng(hist, ctx_tokens, order, min_count, V, rule, beta):
    """The n-gram distribution and the factor w on alpha (p = (1 - alpha w) p_net + alpha w p_ng)."""
    p1, levels = brute_levels(hist, ctx_tokens, order, min_count, V)
    if rule == "backoff":
        for lv in reversed(levels):
            if lv is not None:
                return [lv[1][v] / lv[0] for v in range(V)], 1.0
        return p1, 1.0
    q, base = p1, 1.0                                 # base: the weight q puts on p1 itself
    for lv in levels:
        if lv is not None:
            q = [(lv[1][v] + beta * q[v]) / (lv[0] + beta) for v in range(V)]
            base *= beta / (lv[0] + beta)
    return q, (1.0 - base if rule == "dirichlet_evidence" else 1.0)


def brute_experts(hist, ctx_tokens, order, min_count, V, pnet, H, beta, grid, betas):
    """Rule online's experts at one position, from brute-force counts: [K][V] probabilities (p_net; each
    g > 0 of the grid at each beta b: (1 - g lambda_b) p_net + g lambda_b q_b; the default rule at beta)
    and the length of the longest context with counts (the bucket's first coordinate)."""
    p1, levels = brute_levels(hist, ctx_tokens, order, min_count, V)
    n_star = max([j + 1 for j, lv in enumerate(levels) if lv is not None], default=0)
    ev = lambda b: brute_p_ng(hist, ctx_tokens, order, min_count, V, "dirichlet_evidence", b)
    mixed = lambda a, q: [(1 - a) * pn + a * qv for pn, qv in zip(pnet, q)]
    experts = [list(pnet)]
    for b in betas:
        q, lam = ev(b)
        experts += [mixed(g * lam, q) for g in grid if g > 0]
    q, lam = ev(beta)
    return experts + [mixed(alpha(H) * lam, q)], n_star


def bayes_mixture(P, buckets):
    """Reference of the learned weights: P [N, K] expert probabilities of the targets, per bucket the
    exact Bayes posterior (uniform prior) from the earlier targets of the bucket -> weights [N, K]."""
    P = np.asarray(P, dtype=np.float64)
    W, seen = np.empty_like(P), {}
    for t, b in enumerate(buckets):
        L = seen.get(b, np.zeros(P.shape[1]))
        w = np.exp(-(L - L.min()))
        W[t] = w / w.sum()
        seen[b] = L - np.log(P[t])
    return W


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
def test_distribution_sums_to_one(rule):
    m, s = fed(rule)
    g = torch.Generator().manual_seed(1)
    x = torch.stack([s[i:i + 40] for i in (0, 500, 2950 - 40)])
    logits = 3 * torch.randn(3, 36, 32, generator=g)
    p = m.distribution(logits, x)                     # P = 4 leading context columns
    assert p.shape == (3, 36, 32)
    assert (p > 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(3, 36, dtype=p.dtype), atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
def test_score_is_minus_log_distribution(rule):
    m, s = fed(rule)
    g = torch.Generator().manual_seed(2)
    x = torch.stack([s[i:i + 60] for i in (10, 1200)])
    y = torch.stack([s[i + 1:i + 61] for i in (10, 1200)])
    logits = 2 * torch.randn(2, 60, 32, generator=g)
    p = m.distribution(logits, x)
    nll = m.score(logits, x, y)
    ref = -torch.log(p.gather(-1, y[..., None]).squeeze(-1))
    assert torch.allclose(nll.double(), ref, atol=1e-5)
    # batch rows with leading context columns; row 1 starts with row 0's last target
    x = torch.stack([s[600:650], torch.cat([s[700:704], s[650:696]])])
    y = torch.stack([s[605:651], s[651:697]])
    assert x[1, 4] == y[0, -1]
    logits = torch.randn(2, 46, 32, generator=g)
    ref = -torch.log(m.distribution(logits, x).gather(-1, y[..., None]).squeeze(-1))
    nll = m.score(logits, x, y)
    assert torch.allclose(nll.double(), ref, atol=1e-5)
    # the gathered path the distributed eval uses
    logp = torch.log_softmax(logits, -1)
    H = -(logp.exp() * logp).sum(-1)
    nll2 = m.score_from_net(logp.gather(-1, y[..., None]).squeeze(-1), H, x, y)
    assert torch.allclose(nll, nll2, atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
def test_matches_brute_force_counts(rule):
    V, order, mc = 16, 5, 2
    m, s = fed(rule, V=V, order=order, n=1500, chunks=(700, 701, 1500), seed=3, min_count=mc, beta=3.0)
    hist = s.tolist()
    g = torch.Generator().manual_seed(4)
    q = text_like(200, V, 9)
    q[50:70] = s[300:320]                            # contexts that were seen
    logits = torch.randn(1, 200, V, generator=g)
    p = m.distribution(logits, q[None])[0]
    pnet = torch.softmax(logits[0].double(), -1)
    H = -(pnet * pnet.log()).sum(-1)
    if rule == "online":                            # weights from the rows before, at their next inputs
        E, b = zip(*[brute_experts(hist, q[:t + 1].tolist(), order, mc, V, pnet[t].tolist(), float(H[t]), 3.0,
                                   m.grid, m.betas) for t in range(200)])
        E = np.array(E)                               # [T, K, V]
        b = [n * 3 + int(h > 2) + int(h > 4) for n, h in zip(b, H.tolist())]
        W = bayes_mixture(E[np.arange(199), :, q[1:].numpy()], b[:199])
        assert np.allclose(p[:199].numpy(), np.einsum("tk,tkv->tv", W, E[:199]), atol=1e-6)
        return
    for t in list(range(0, 6)) + list(range(50, 72)) + [120, 199]:
        png, w = brute_p_ng(hist, q[:t + 1].tolist(), order, mc, V, rule, 3.0)
        a = alpha(float(H[t])) * w
        exp = (1 - a) * pnet[t] + a * torch.tensor(png, dtype=torch.float64)
        assert torch.allclose(p[t], exp, atol=1e-6), t


def test_hand_computed_tiny_stream():
    # stream 0 1 2 0 1 3 0 1, V = 5, orders 2..3.  Counts by hand:
    #   "0 1" occurs 3 times, twice followed by a token (by 2, by 3)       -> c_3 = 2
    #   "1"   occurs 3 times, twice followed (by 2, by 3)                  -> c_2 = 2
    #   unigrams 0:3 1:3 2:1 3:1 4:0, N = 8 -> p_1 = (4, 4, 2, 2, 1) / 13
    V = 5
    m = BackoffNgramMixer(vocab_size=V, max_order=3, rule="backoff")
    m.update(torch.tensor([0, 1, 2]))
    m.update(torch.tensor([0, 1, 3, 0, 1]))          # grams across the chunk boundary count
    logits = torch.zeros(1, 1, V)                    # uniform network: p_net = 1/5, H = ln 5
    a = alpha(math.log(5))
    p = m.distribution(logits, torch.tensor([[0, 1]]))[0, 0]       # order-3 context "0 1"
    assert torch.allclose(p, torch.tensor([(1 - a) / 5 + a * v for v in (0, 0, .5, .5, 0)], dtype=p.dtype), atol=1e-12)
    p = m.distribution(logits, torch.tensor([[1]]))[0, 0]          # only "1" fits in the row
    assert torch.allclose(p, torch.tensor([(1 - a) / 5 + a * v for v in (0, 0, .5, .5, 0)], dtype=p.dtype), atol=1e-12)
    p = m.distribution(logits, torch.tensor([[4]]))[0, 0]          # unseen context: unigram
    assert torch.allclose(p, torch.tensor([(1 - a) / 5 + a * v / 13 for v in (4, 4, 2, 2, 1)], dtype=p.dtype), atol=1e-12)
    # dirichlet, beta = 1: q2 = (c(1,v) + p1) / 3, q3 = (c(01,v) + q2) / 3
    d = BackoffNgramMixer(vocab_size=V, max_order=3, rule="dirichlet", beta=1.0)
    d.update(torch.tensor([0, 1, 2, 0, 1, 3, 0, 1]))
    p1 = [4 / 13, 4 / 13, 2 / 13, 2 / 13, 1 / 13]
    q2 = [(c + u) / 3 for c, u in zip((0, 0, 1, 1, 0), p1)]
    q3 = [(c + u) / 3 for c, u in zip((0, 0, 1, 1, 0), q2)]
    p = d.distribution(logits, torch.tensor([[0, 1]]))[0, 0]
    assert torch.allclose(p, torch.tensor([(1 - a) / 5 + a * v for v in q3], dtype=p.dtype), atol=1e-12)
    nll = d.score(logits, torch.tensor([[0, 1]]), torch.tensor([[3]]))
    assert abs(float(nll) + math.log((1 - a) / 5 + a * q3[3])) < 1e-6
    # dirichlet_evidence: q3 rests on counts except for the share (1/3)(1/3) left on p_1
    e = BackoffNgramMixer(vocab_size=V, max_order=3, rule="dirichlet_evidence", beta=1.0)
    e.update(torch.tensor([0, 1, 2, 0, 1, 3, 0, 1]))
    al = a * (1 - 1 / 9)
    p = e.distribution(logits, torch.tensor([[0, 1]]))[0, 0]
    assert torch.allclose(p, torch.tensor([(1 - al) / 5 + al * v for v in q3], dtype=p.dtype), atol=1e-12)
    p = e.distribution(logits, torch.tensor([[4]]))[0, 0]          # no context seen: the network alone
    assert torch.allclose(p, torch.full((V,), 0.2, dtype=p.dtype), atol=1e-12)


def test_empty_history_is_uniform_mixture():
    m = BackoffNgramMixer(vocab_size=7, max_order=4, rule="backoff")
    logits = torch.randn(1, 5, 7)
    p = m.distribution(logits, torch.tensor([[1, 2, 3, 4, 5]]))
    pn = torch.softmax(logits.double(), -1)
    H = -(pn * pn.log()).sum(-1)
    a = torch.tensor([[alpha(float(h)) for h in H[0]]], dtype=torch.float64)[..., None]
    assert torch.allclose(p, (1 - a) * pn + a / 7, atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
def test_causal_perturbation(rule):
    m, s = fed(rule)
    x = torch.stack([s[100:164], s[2000:2064]])
    y = torch.stack([s[101:165], s[2001:2065]])
    logits = torch.randn(2, 64, 32)
    base = m.score(logits, x, y)
    for t0 in (0, 17, 63):
        x2, y2, l2 = x.clone(), y.clone(), logits.clone()
        x2[:, t0 + 1:] = (x2[:, t0 + 1:] + 5) % 32
        y2[:, t0:] = (y2[:, t0:] + 3) % 32
        l2[:, t0 + 1:] = torch.randn_like(l2[:, t0 + 1:])
        out = m.score(l2, x2, y2)
        assert torch.equal(out[:, :t0], base[:, :t0])
    x3 = x.clone()                                   # rows of the batch are independent
    x3[1] = (x3[1] + 1) % 32
    assert torch.equal(m.score(logits, x3, y)[0], base[0])


@pytest.mark.parametrize("rule", RULES)
def test_score_changes_no_state(rule):
    m, s = fed(rule)
    ref, _ = fed(rule)
    x, y = s[2900:2990][None], s[2901:2991][None]
    logits = torch.randn(1, 90, 32)
    before = m.score(logits, x, y)
    for _ in range(2):
        m.score(torch.randn(1, 90, 32), x, y)
    assert torch.equal(m.score(logits, x, y), before)
    assert torch.equal(m.table.tab, ref.table.tab) and torch.equal(m.table.dense, ref.table.dense)
    assert torch.equal(m.uni, ref.uni) and m.N == ref.N


@pytest.mark.parametrize("rule", RULES)
def test_streaming_is_independent_of_chunking_and_scoring(rule, table_code):
    V, n, s = 32, 15000, text_like(16000, 32, 5)
    a = BackoffNgramMixer(vocab_size=V, max_order=6, rule=rule)
    b = BackoffNgramMixer(vocab_size=V, max_order=6, rule=rule)
    a.update(s[:n])
    P, done = 5, 0
    for st in range(P, n - 1, 1613):                 # b: score each chunk first, then update it
        e = min(st + 1613, n - 1)
        b.score(torch.randn(1, e - st, V), s[st - P:e][None], s[st + 1:e + 1][None])
        b.update(s[done:e + 1])
        done = e + 1
    b.update(s[done:n])
    assert a.N == b.N == n and a.table.size == b.table.size
    assert int(a._sums.abs().sum()) == 0 and int(b._sums[:, -1].sum()) == (n - 1 - P if rule == "online" else 0)
    b._sums.zero_()                                  # (online: b learned from what it scored, a did not)
    x, y, logits = s[n:n + 900][None], s[n + 1:n + 901][None], torch.randn(1, 900, V)
    assert torch.equal(a.score(logits, x, y), b.score(logits, x, y))
    assert a.table.mask + 1 > 1 << 16                # the table grew (rebuild path exercised)


def test_hashed_rule_is_not_a_distribution():
    V = 64
    s = text_like(20000, V, 7)
    h = HashedTargetOnlyMixer(vocab_size=V, max_order=6, buckets=1024)   # ~20 tokens per bucket
    e = BackoffNgramMixer(vocab_size=V, max_order=6, rule="backoff")
    h.update(s[:19000])
    e.update(s[:19000])
    x, logits = s[19000:19200][None], torch.randn(1, 200, V)
    ph, pe = h.distribution(logits, x).sum(-1), e.distribution(logits, x).sum(-1)
    assert ph.mean() > 5 and ph.min() > 1.0
    assert torch.allclose(pe, torch.ones_like(pe), atol=1e-6)


def test_validation_errors():
    for cls in (BackoffNgramMixer, HashedTargetOnlyMixer):
        with pytest.raises(ValueError, match="max_order"):
            cls(vocab_size=8, max_order=1)
        with pytest.raises(ValueError, match="min_count"):
            cls(vocab_size=8, min_count=0)
        m = cls(vocab_size=8, max_order=3)
        with pytest.raises(ValueError, match="token"):
            m.update(torch.tensor([1, 8]))
        with pytest.raises(ValueError, match="token"):
            m.update(torch.tensor([-1, 2]))
        with pytest.raises(ValueError, match="vocab_size"):
            m.score(torch.zeros(1, 2, 9), torch.tensor([[1, 2]]), torch.tensor([[2, 3]]))
        with pytest.raises(ValueError, match="vocab_size"):
            m.distribution(torch.zeros(1, 2, 7), torch.tensor([[1, 2]]))
        with pytest.raises(ValueError, match="token"):
            m.score(torch.zeros(1, 2, 8), torch.tensor([[1, 9]]), torch.tensor([[2, 3]]))
        with pytest.raises(ValueError, match="P\\+T"):
            m.score(torch.zeros(1, 3, 8), torch.tensor([[1, 2]]), torch.tensor([[2, 3, 4]]))
    with pytest.raises(ValueError, match="rule"):
        BackoffNgramMixer(vocab_size=8, rule="kneser")


@pytest.mark.parametrize("kw, setting", [
    (dict(max_order=1), "max_order"), (dict(max_order=11), "max_order"), (dict(min_count=0), "min_count"),
    (dict(rule="kneser"), "rule"), (dict(beta=0.0), "beta"), (dict(beta=float("inf")), "beta"),
    (dict(alpha_base=-0.1), "alpha_base"), (dict(alpha_base=0.6, alpha_range=0.6), "alpha_range"),
    (dict(alpha_center=float("nan")), "alpha_center"), (dict(vocab_size=1), "vocab_size"),
    (dict(online_grid="0.1,0.5"), "online_grid"), (dict(online_grid="0,1.5"), "online_grid"),
    (dict(online_grid="0,x"), "online_grid"), (dict(online_grid="0,0.5,0.5"), "online_grid"),
    (dict(online_grid="0,nan"), "online_grid"), (dict(online_betas="8,0"), "online_betas"),
    (dict(online_betas=""), "online_betas"), (dict(online_edges="4,2"), "online_edges"),
    (dict(online_eta=0.0), "online_eta"), (dict(online_eta=1.5), "online_eta"),
    (dict(online_eta=float("nan")), "online_eta"),
])
def test_check_settings_names_the_setting(kw, setting):
    """check_settings (what the constructor runs, and what train_gpt calls at start-up) names the keyword;
    max_order 11 is one past the longest exact key for V = 1024; alpha_base + alpha_range > 1 would make
    1 - alpha(H) negative, so no longer a mixture."""
    import backoff_mixer
    with pytest.raises(backoff_mixer.SettingError) as err:
        check_settings(**{"vocab_size": 1024, **kw})
    assert err.value.setting == setting and str(err.value).startswith(f"{setting}=")
    check_settings(vocab_size=1024, max_order=10, alpha_base=0.45, alpha_range=0.55)   # the edges are fine
    check_settings(online_grid="0", online_betas=(1e-3,), online_edges="", online_eta=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("rule", RULES)
def test_cuda_matches_cpu(rule):
    s = text_like(5000, 64, 11)
    c = BackoffNgramMixer(vocab_size=64, max_order=7, rule=rule)
    g = BackoffNgramMixer(vocab_size=64, max_order=7, rule=rule, device="cuda")
    c.update(s[:4000])
    g.update(s[:4000].cuda())
    x, y, logits = s[4000:4500][None], s[4001:4501][None], torch.randn(1, 500, 64)
    assert torch.allclose(c.score(logits, x, y), g.score(logits.cuda(), x.cuda(), y.cuda()).cpu(), atol=1e-5)


def test_table_exact_under_worst_case_collisions():
    from backoff_mixer import _ExactTable

    class OneHome(_ExactTable):                      # every key hashes to a slot near the end
        def _hash(self, hi, lo):
            return hi * 0 + (self.mask - 3)

    t = OneHome("cpu", log2cap=4, shifts=TAG_SHIFTS)
    hi = torch.arange(1, 8)
    lo = tagged(torch.tensor([5, 5, 7, 7, 9, 9, 11]))   # equal lo, different hi: must not merge
    t.add(hi, lo)                                    # 7 keys: probing wraps past the last slot
    t.add(hi[:3], lo[:3])                            # 10 > 16/2: rebuild (x4), placement wraps again
    assert t.mask + 1 == 64 and t.size == 7
    assert t.count(hi, lo).tolist() == [2, 2, 2, 1, 1, 1, 1]
    assert t.count(torch.tensor([1, 8]), tagged(torch.tensor([6, 5]))).tolist() == [0, 0]
    t.add(torch.tensor([4, 4, 4]), tagged(torch.tensor([7, 7, 7])))   # duplicates within one batch
    assert t.count(torch.tensor([4]), tagged(torch.tensor([7]))).tolist() == [4]


@pytest.mark.parametrize("rule,min_count,chunk,V,K", [("backoff", 1, 97, 24, 6), ("dirichlet", 1, 256, 24, 6),
                                                      ("dirichlet_evidence", 2, 128, 24, 6),
                                                      ("dirichlet_evidence", 1, 200, 1024, 10),
                                                      ("backoff", 2, 1, 24, 6), ("dirichlet", 3, 1000, 24, 6),
                                                      ("backoff", 1, 300, 1024, 10), ("dirichlet", 1, 64, 1024, 10),
                                                      ("dirichlet", 1, 128, 4096, 8),    # no dense bigrams
                                                      ("online", 1, 97, 24, 6), ("online", 2, 1000, 24, 6),
                                                      ("online", 1, 7, 24, 6), ("online", 1, 200, 1024, 10),
                                                      ("online", 1, 128, 4096, 8)])
def test_whole_stream_path_is_bitwise_the_streaming_path(rule, min_count, chunk, V, K, table_code):
    N = 2500                                          # V = 1024, K = 10: keys use both words
    s = text_like(N, V, 13)
    g = torch.Generator().manual_seed(14)
    logp = torch.log_softmax(2 * torch.randn(N - 1, V, generator=g), -1)
    logp_y = logp.gather(1, s[1:, None]).squeeze(1)
    H = -(logp.exp() * logp).sum(-1)
    m = BackoffNgramMixer(vocab_size=V, max_order=K, min_count=min_count, rule=rule)
    fast = m.score_stream(s, logp_y, H, chunk)
    assert m.N == 0                                   # no state used or changed
    m.update(s[:1])
    out = []
    for a in range(1, N, chunk):
        b = min(a + chunk, N)
        P = min(a - 1, K - 1)
        out.append(m.score_from_net(logp_y[None, a - 1:b - 1], H[None, a - 1:b - 1], s[None, a - 1 - P:b - 1], s[None, a:b])[0])
        m.update(s[a:b])
    assert torch.equal(fast, torch.cat(out))


def test_cpu_claim_path_matches_plain_insert_under_collisions(table_code):
    """_probe_np + add_probed (score's probe reused by update on CPU): absent keys claim the empty
    slot their probe found; several claimants of one slot (equal or different keys), keys already
    present, wrap-around: the counts must equal those of the plain insert path."""
    from backoff_mixer import _ExactTable

    class FewHomes(_ExactTable):                     # 3 home slots, near the end: long clusters
        def _hash(self, hi, lo):
            return (self.mask - 2) + (lo % 3)

    rng = np.random.default_rng(3)
    a, b = FewHomes("cpu", log2cap=7, shifts=TAG_SHIFTS), FewHomes("cpu", log2cap=7, shifts=TAG_SHIFTS)
    for _ in range(4):
        hi = rng.integers(1, 4, 12).astype(np.int64)
        lo = tagged(rng.integers(0, 5, 12).astype(np.int64))   # many equal keys within one batch
        a.add_probed(hi, lo, *a._probe_np(hi, lo))
        b.add(torch.from_numpy(hi), torch.from_numpy(lo))
        assert a.size == b.size
        qh, ql = np.repeat(np.arange(1, 5), 6), tagged(np.tile(np.arange(0, 6), 4))
        got, cnt = a._probe_np(qh, ql)
        assert cnt.tolist() == b.count(torch.from_numpy(qh), torch.from_numpy(ql)).tolist()
        assert ((got >= 0) == (cnt > 0)).all()


@pytest.mark.parametrize("rule", RULES)
def test_score_then_update_builds_the_same_table_as_update(rule, table_code):
    V, n, s = 1024, 6000, text_like(6000, 1024, 21)
    a = BackoffNgramMixer(vocab_size=V, max_order=10, rule=rule)
    b = BackoffNgramMixer(vocab_size=V, max_order=10, rule=rule)
    P, done = 9, 0
    for st in range(P, n - 1, 500):                  # a: score each chunk first (CPU: claims)
        e = min(st + 500, n - 1)
        a.score(torch.randn(1, e - st, V), s[st - P:e][None], s[st + 1:e + 1][None])
        a.update(s[done:e + 1])
        b.update(s[done:e + 1])
        done = e + 1
    rows = lambda m: sorted(map(tuple, m.table.tab[m.table.tab[:, 0] != 0].tolist()))
    assert a.table.size == b.table.size and rows(a) == rows(b) and torch.equal(a.table.dense, b.table.dense)


def test_long_update_in_blocks_builds_the_same_table(table_code, monkeypatch):
    """update() of many tokens at once (keyed and probed in blocks on CPU) counts the grams that
    span block boundaries and the stream start exactly as updates in small pieces do."""
    import backoff_mixer
    V, s = 1024, text_like(3000, 1024, 8)
    a = BackoffNgramMixer(vocab_size=V, max_order=10, expected_tokens=0)
    b = BackoffNgramMixer(vocab_size=V, max_order=10, expected_tokens=0)
    monkeypatch.setattr(backoff_mixer, "_BLOCK", 97)
    a.update(s)
    for st in range(0, 3000, 5):
        b.update(s[st:st + 5])
    rows = lambda m: sorted(map(tuple, m.table.tab[m.table.tab[:, 0] != 0].tolist()))
    assert a.table.size == b.table.size == len(rows(a)) and rows(a) == rows(b)
    assert torch.equal(a.table.dense, b.table.dense) and int(a.table.dense.sum()) == 2999
    assert a.table.size == sum(len(set(tuple(s[i - L + 1:i + 1].tolist()) for i in range(L - 1, 3000)))
                               for L in range(3, 11))


def test_count_overflow_raises_instead_of_wrapping(table_code):
    """A row's count shares its word with the key's older tokens: past its bits it must raise."""
    from backoff_mixer import _ExactTable
    t = _ExactTable("cpu", log2cap=6, shifts=(0,) * 8 + (60,) * 8)   # tags 8..15: counts < 2**3
    hi, lo = np.array([5], dtype=np.int64), tagged(np.array([3], dtype=np.int64))
    for _ in range(7):
        t.add_probed(hi, lo, *t._probe_np(hi, lo))
    assert t._probe_np(hi, lo)[1].tolist() == [7]
    with pytest.raises(OverflowError, match="2\\*\\*3"):
        t.add_probed(hi, lo, *t._probe_np(hi, lo))


def test_scoring_no_rows_returns_an_empty_result(table_code):
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        m = BackoffNgramMixer(vocab_size=64, max_order=4, device=device, expected_tokens=0)
        m.update(torch.arange(20))
        for T in (0, 3):
            out = m.score_from_net(torch.zeros(1, T), torch.zeros(1, T), torch.arange(5)[None, :max(T, 2)],
                                   torch.zeros(1, T, dtype=torch.long))
            assert out.shape == (1, T) and torch.isfinite(out).all()
        assert m.score_from_net(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 5, dtype=torch.long),
                                torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3)


def test_audit_command_from_tools(capsys):
    """tools/mixer_audit.py (moved out of the counted mixer module) still runs: the exact rules sum to 1 at
    every sampled position, the record's hashed rule at its load sums far above 1."""
    import mixer_audit
    rows = mixer_audit.audit(mixer_audit.argparse.Namespace(
        tokens=None, fit_tokens=20000, eval_tokens=6000, positions=12, buckets=0, max_order=6, min_count=1,
        beta=32.0, chunk=2048, vocab_size=256, tokenizer=None, seed=0, proxy_order=2))
    sums = {name: (lo, hi) for name, lo, _, hi, _, _ in rows}
    for rule in BackoffNgramMixer.RULES:
        assert sums[f"exact {rule}"] == pytest.approx((1.0, 1.0), abs=1e-6)   # (the proxy's float32 softmax)
    hashed = [name for name in sums if name.startswith("hashed")]
    assert len(hashed) == 1 and sums[hashed[0]][1] > 10
    assert "INVALID" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- rule online
def stream_nstar(s, chunk, order, min_count):
    """Brute force: for each target i = 1..N-1 of a stream scored in chunks (history = the tokens before
    its chunk's first target), the longest context s[i-k..i-1] (k <= order-1) whose occurrences in the
    history, followed there by a token, number >= min_count (0 if none)."""
    s, out, seen, h = s.tolist(), [], {}, 1
    for i in range(1, len(s)):
        while h < ((i - 1) // chunk) * chunk + 1:        # grow the history to this chunk's start
            for k in range(1, order):                     # contexts ending at h-1, followed by s[h]
                if h - k >= 0:
                    seen[tuple(s[h - k:h])] = seen.get(tuple(s[h - k:h]), 0) + 1
            h += 1
        out.append(max([k for k in range(1, order) if i - k >= 0 and seen.get(tuple(s[i - k:i]), 0) >= min_count],
                       default=0))
    return out


def expert_losses(m, s, logp_y, H, chunk):
    """Each expert's NLL per target, computed by the fixed rules (not by rule online): p_net; each grid
    weight g > 0 at each beta b as rule dirichlet_evidence with alpha(H) = g; the default rule."""
    V, K = m.V, m.max_order
    cols = [-logp_y.double()]
    for b in m.betas:
        for g in m.grid[1:]:
            e = BackoffNgramMixer(vocab_size=V, max_order=K, min_count=m.min_count, rule="dirichlet_evidence",
                                  beta=b, alpha_base=g, alpha_range=0.0)
            cols.append(e.score_stream(s, logp_y, H, chunk).double())
    d = BackoffNgramMixer(vocab_size=V, max_order=K, min_count=m.min_count, rule="dirichlet_evidence", beta=m.beta)
    return torch.stack(cols + [d.score_stream(s, logp_y, H, chunk).double()], 1)


def bound_streams():
    """(name, tokens, log p_net(y), H): adversarial and random streams for the regret bound."""
    V, N, g = 16, 3000, torch.Generator().manual_seed(5)
    out = []
    s = torch.randint(0, V, (N,), generator=g)                                   # random: n-grams useless
    lp = torch.log_softmax(3 * torch.randn(N - 1, V, generator=g), -1)
    out.append(("random", s, lp.gather(1, s[1:, None])[:, 0], -(lp.exp() * lp).sum(-1)))
    s = torch.cat([text_like(N // 2, V, 1)[:200].repeat(8)[:N // 2], torch.randint(0, V, (N - N // 2,), generator=g)])
    out.append(("copies then noise", s, torch.full((N - 1,), -math.log(V)), torch.full((N - 1,), math.log(V))))
    lp = torch.where(torch.arange(N - 1) % 500 < 250, -0.01, -40.0)              # confident, right then wrong,
    out.append(("switching network", s, lp, torch.where(lp > -1, 0.05, 0.05)))     # switching every 250 targets
    lp = torch.where(torch.rand(N - 1, generator=g) < 0.1, -100.0, -0.5)            # rare huge losses (< 128 nats)
    out.append(("huge losses", text_like(N, V, 2), lp, 6 * torch.rand(N - 1, generator=g)))
    return out


@pytest.mark.parametrize("case", range(4))
def test_online_regret_bound(case):
    """Per bucket, rule online's total log-loss <= the best expert's in hindsight + log K (+ the fixed point's
    2**-28 nats per target); so never worse than the network alone by more than (buckets) log K."""
    name, s, logp_y, H = bound_streams()[case]
    logp_y, H = logp_y.double(), H.double()            # (float64 scores: no float32 rounding in the sums)
    chunk, order = 97, 4
    m = BackoffNgramMixer(vocab_size=16, max_order=order, rule="online", online_edges="1,3")
    nll = m.score_stream(s, logp_y, H, chunk).double()
    L = expert_losses(m, s, logp_y, H, chunk)                                     # [N-1, K]
    n_star = torch.tensor(stream_nstar(s, chunk, order, 1))
    bucket = n_star * 3 + (H.double() > 1).long() + (H.double() > 3).long()
    K, slack = L.shape[1], 2.0 ** -28 + 1e-9
    assert K == m.n_experts == 2 + 4 * 4                # the default grid (5 weights) and betas (4)
    worst = 0.0
    for b in bucket.unique().tolist():
        sel = bucket == b
        regret = float(nll[sel].sum() - L[sel].sum(0).min())
        assert regret <= math.log(K) + slack * int(sel.sum()), (name, b, regret)
        worst = max(worst, regret)
    assert float(nll.sum() - L[:, 0].sum()) <= len(bucket.unique()) * math.log(K) + slack * nll.numel()
    assert torch.equal(torch.bincount(bucket, minlength=m.n_buckets), m.stream_sums[:, -1])   # the buckets agree
    if name == "copies then noise":                   # the bound is not vacuous: the mixer used the n-grams
        assert float(nll.sum()) < float(L[:, 0].sum()) - 500


def test_online_weights_by_hand():
    """V = 2, uniform network, stream 0 0 0 0, one target per chunk, orders 2 only, beta 1, grid {0, 1}, one
    entropy bin: experts (net, q at lambda, the default rule). Target 1: no context seen, all equal 1/2.
    Target 2 (first of bucket 'context seen'): c("0") = 1, c("0 0") = 1, p_1(0) = 3/4, q = (1 + 3/4)/2 = 7/8,
    lambda = 1/2; uniform weights. Target 3: p_1(0) = 4/5, q = (2 + 4/5)/3 = 14/15, lambda = 2/3; weights
    proportional to each expert's probability of target 2."""
    a = alpha(math.log(2))
    e2 = [1 / 2, (1 - 1 / 2) / 2 + 1 / 2 * 7 / 8, (1 - a / 2) / 2 + a / 2 * 7 / 8]
    e3 = [1 / 2, (1 - 2 / 3) / 2 + 2 / 3 * 14 / 15, (1 - 2 * a / 3) / 2 + 2 * a / 3 * 14 / 15]
    want = [-math.log(1 / 2), -math.log(sum(e2) / 3), -math.log(sum(x * y for x, y in zip(e2, e3)) / sum(e2))]
    kw = dict(vocab_size=2, max_order=2, rule="online", beta=1.0, online_grid="0,1", online_betas="1", online_edges="")
    s = torch.zeros(4, dtype=torch.long)
    lp, H = torch.full((3,), -math.log(2)), torch.full((3,), math.log(2))
    assert np.allclose(BackoffNgramMixer(**kw).score_stream(s, lp, H, 1).numpy(), want, atol=1e-7, rtol=0)
    m = BackoffNgramMixer(**kw)                       # streaming: the same, losses committed at each update
    m.update(s[:1])
    got = []
    for i in range(1, 4):
        got.append(float(m.score(torch.zeros(1, 1, 2), s[None, i - 1:i], s[None, i:i + 1])))
        m.update(s[i:i + 1])
    assert np.allclose(got, want, atol=1e-6)
    assert m._sums[:, -1].tolist() == [1, 2]          # tokens per bucket (no context / context seen)


def test_online_commits_only_scored_tokens(table_code):
    """update() adds the last score's losses to the learned sums only if its tokens end with the scored
    targets; a second score replaces the first; tokens never scored add counts only."""
    s = text_like(600, 32, 3)
    logits = torch.randn(1, 100, 32)
    m = BackoffNgramMixer(vocab_size=32, max_order=5, rule="online")
    m.update(s[:300])
    m.score(logits, s[None, 299:399], s[None, 300:400])
    m.update(s[300:400] + 1 - 2 * (s[300:400] > 0))    # other tokens: nothing learned
    assert int(m._sums.abs().sum()) == 0
    m.score(logits, s[None, 399:499], s[None, 400:500])
    m.score(logits, s[None, 99:199], s[None, 100:200])  # the last score is the one kept
    m.update(s[400:500])
    assert int(m._sums.abs().sum()) == 0
    ref = BackoffNgramMixer(vocab_size=32, max_order=5, rule="online")
    for part in (s[:300], s[300:400] + 1 - 2 * (s[300:400] > 0), s[400:500]):
        ref.update(part)                              # the same tokens, never scored
    before = ref.score(logits, s[None, 499:599], s[None, 500:600])
    assert torch.equal(m.score(logits, s[None, 499:599], s[None, 500:600]), before)   # same counts, nothing learned
    m.update(s[480:600])                              # ends with the scored targets: learned
    assert int(m._sums[:, -1].sum()) == 100
    assert not torch.equal(m.score(logits, s[None, 499:599], s[None, 500:600]), before)


def test_online_costs_little_where_the_network_is_the_truth():
    """Tokens drawn from a random bigram network's own distribution: any mixing costs in expectation. Rule
    online's harm stays within its bound and far below the default rule's."""
    V, N = 64, 20000
    g = torch.Generator().manual_seed(3)
    logp = torch.log_softmax(2.5 * torch.randn(V, V, generator=g), -1)
    s = torch.zeros(N, dtype=torch.long)
    u = torch.rand(N, generator=g, dtype=torch.float64)
    cdf = logp.double().exp().cumsum(1)
    for t in range(1, N):
        s[t] = min(int(torch.searchsorted(cdf[s[t - 1]], u[t] * cdf[s[t - 1], -1])), V - 1)
    lp, H = logp[s[:-1], s[1:]], -(logp.exp() * logp).sum(-1)[s[:-1]]
    net = -lp.double().mean()
    harm = lambda rule: float(BackoffNgramMixer(vocab_size=V, max_order=6, rule=rule).score_stream(s, lp, H, 1024)
                              .double().mean() - net)
    online, default = harm("online"), harm("dirichlet_evidence")      # measured: 0.0014, 0.021
    assert online <= 0.002 and default > 10 * online, (online, default)


def test_online_refuses_streams_its_exact_sums_cannot_hold(monkeypatch):
    """Past _MAX_TARGETS targets in a bucket the fixed-point loss sums could overflow: an OverflowError,
    never a wrapped sum (shown with the limit lowered to 300)."""
    import backoff_mixer
    monkeypatch.setattr(backoff_mixer, "_MAX_TARGETS", 300)
    s = torch.arange(8).repeat(50)                      # 400 tokens, nearly all in one bucket (context 2 seen)
    lp, H = torch.full((399,), -2.0), torch.full((399,), 2.0)
    kw = dict(vocab_size=16, max_order=3, rule="online")
    with pytest.raises(OverflowError, match="split the stream"):
        BackoffNgramMixer(**kw).score_stream(s, lp, H, 50)
    assert BackoffNgramMixer(**kw).score_stream(s[:250], lp[:249], H[:249], 50).shape == (249,)
    m = BackoffNgramMixer(**kw)
    m.update(s[:1])
    with pytest.raises(OverflowError, match="split the stream"):
        for a in range(1, 400, 50):                   # committed targets pile up in the buckets
            m.score_from_net(lp[None, a - 1:a + 49], H[None, a - 1:a + 49], s[None, a - 1:a + 49], s[None, a:a + 50])
            m.update(s[a:a + 50])


# ---------------------------------------------------------------------------------------------- two networks
def test_two_networks_match_brute_force_experts():
    """networks=2 (the evaluation's unadapted and adapted network): the experts are rule online's 18 built on each
    network in turn (36), the bucket from the longest context and both networks' entropy bins; the distribution
    is the Bayes mixture of the brute-force experts, weights from the earlier rows' targets."""
    V, order, mc = 16, 5, 2
    m, s = fed("online", V=V, order=order, n=1500, chunks=(700, 701, 1500), seed=3, min_count=mc, beta=3.0, networks=2)
    assert m.n_experts == 36
    hist, g = s.tolist(), torch.Generator().manual_seed(4)
    q = text_like(200, V, 9)
    q[50:70] = s[300:320]
    logits = torch.randn(2, 1, 200, V, generator=g)
    logits[1] *= 3                                    # a second, more confident network
    p = m.distribution(logits, q[None])[0]
    assert torch.allclose(p.sum(-1), torch.ones(200, dtype=p.dtype), atol=1e-9)
    pn = torch.softmax(logits[:, 0].double(), -1)
    H = -(pn * pn.log()).sum(-1)
    rows = []
    for t in range(200):
        E0, n0 = brute_experts(hist, q[:t + 1].tolist(), order, mc, V, pn[0, t].tolist(), float(H[0, t]), 3.0, m.grid, m.betas)
        E1, _ = brute_experts(hist, q[:t + 1].tolist(), order, mc, V, pn[1, t].tolist(), float(H[1, t]), 3.0, m.grid, m.betas)
        rows.append((E0 + E1, n0 * 9 + int(H[0, t] > 2) + int(H[0, t] > 4) + 3 * (int(H[1, t] > 2) + int(H[1, t] > 4))))
    E, b = np.array([r[0] for r in rows]), [r[1] for r in rows]
    W = bayes_mixture(E[np.arange(199), :, q[1:].numpy()], b[:199])
    assert np.allclose(p[:199].numpy(), np.einsum("tk,tkv->tv", W, E[:199]), atol=1e-6)
    y = q[1:][None]                                   # score = -log distribution, and the gathered path
    nll = m.score(logits[:, :, :199], q[None, :199], y)
    assert torch.allclose(nll.double()[0], -torch.log(p[torch.arange(199), q[1:]]), atol=1e-5)
    lp = torch.log_softmax(logits[:, :, :199], -1)
    nll2 = m.score_from_net(lp.gather(-1, y.expand(2, 1, 199)[..., None])[..., 0], -(lp.exp() * lp).sum(-1), q[None, :199], y)
    assert torch.allclose(nll, nll2, atol=1e-6)


@pytest.mark.parametrize("chunk,V,K", [(97, 24, 6), (200, 1024, 10)])
def test_two_networks_whole_stream_path_is_bitwise_the_streaming_path(chunk, V, K, table_code):
    N = 2500
    s = text_like(N, V, 13)
    g = torch.Generator().manual_seed(14)
    logp = torch.log_softmax(2 * torch.randn(2, N - 1, V, generator=g), -1)
    logp_y = logp.gather(2, s[1:, None].expand(2, N - 1, 1)).squeeze(2)
    H = -(logp.exp() * logp).sum(-1)
    m = BackoffNgramMixer(vocab_size=V, max_order=K, rule="online", networks=2)
    fast = m.score_stream(s, logp_y, H, chunk)
    m.update(s[:1])
    out = []
    for a in range(1, N, chunk):
        b = min(a + chunk, N)
        P = min(a - 1, K - 1)
        out.append(m.score_from_net(logp_y[:, None, a - 1:b - 1], H[:, None, a - 1:b - 1], s[None, a - 1 - P:b - 1],
                                    s[None, a:b])[0])
        m.update(s[a:b])
    assert torch.equal(fast, torch.cat(out)) and torch.equal(m._sums, m.stream_sums)
    one = BackoffNgramMixer(vocab_size=V, max_order=K, rule="online").score_stream(s, logp_y[0], H[0], chunk)
    assert not torch.equal(fast, one)                 # the second network takes part


@pytest.mark.parametrize("case", range(4))
def test_two_networks_regret_bound(case):
    """With a second network (worse on half the targets, better on the other half), the mixture stays within
    log K (K = 36) of every expert in every bucket: of each network alone above all; and, its buckets refining
    those of one network (eta = 1: the Bayes mixture loses at least its best expert's loss per bucket), within
    (buckets) log K of rule online over either network alone."""
    name, s, logp_y, H = bound_streams()[case]
    logp_y, H = logp_y.double(), H.double()
    g = torch.Generator().manual_seed(case)
    other = torch.where(torch.rand(logp_y.numel(), generator=g, dtype=torch.float64) < 0.5, logp_y - 3.0,
                        (logp_y + 1.0).clamp(max=-1e-3))                  # worse on half the targets, better on half
    chunk, order = 97, 4
    m = BackoffNgramMixer(vocab_size=16, max_order=order, rule="online", online_edges="1,3", networks=2)
    nll = m.score_stream(s, torch.stack([logp_y, other]), torch.stack([H, H.flip(0)]), chunk).double()
    one = BackoffNgramMixer(vocab_size=16, max_order=order, rule="online", online_edges="1,3")
    L = torch.cat([expert_losses(one, s, logp_y, H, chunk), expert_losses(one, s, other, H.flip(0), chunk)], 1)
    n_star = torch.tensor(stream_nstar(s, chunk, order, 1))
    bucket = n_star * 9 + (H > 1).long() + (H > 3).long() + 3 * ((H.flip(0) > 1).long() + (H.flip(0) > 3).long())
    K, slack = L.shape[1], 2.0 ** -28 + 1e-9
    assert K == m.n_experts == 36 and torch.equal(torch.bincount(bucket, minlength=m.n_buckets), m.stream_sums[:, -1])
    for b in bucket.unique().tolist():
        sel = bucket == b
        assert float(nll[sel].sum() - L[sel].sum(0).min()) <= math.log(K) + slack * int(sel.sum()), (name, b)
    B = len(bucket.unique())
    for j in (0, 18):                                 # over the stream: within (buckets) log K of either network
        assert float(nll.sum() - L[:, j].sum()) <= B * math.log(K) + slack * nll.numel()
    for lp, h in ((logp_y, H), (other, H.flip(0))):   # and of rule online over either network alone (its buckets
        alone = BackoffNgramMixer(vocab_size=16, max_order=order, rule="online", online_edges="1,3")   # are coarser)
        assert float(nll.sum() - alone.score_stream(s, lp, h, chunk).double().sum()) <= B * math.log(K) + slack * nll.numel()


def test_more_networks_need_rule_online():
    from backoff_mixer import SettingError
    with pytest.raises(SettingError, match="networks"):
        BackoffNgramMixer(vocab_size=16, max_order=3, rule="dirichlet_evidence", networks=2)
    m = BackoffNgramMixer(vocab_size=16, max_order=3, networks=2)
    with pytest.raises(ValueError, match="network"):
        m.score_stream(torch.arange(10) % 16, torch.zeros(9), torch.zeros(9), 4)   # one network's numbers
