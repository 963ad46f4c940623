"""Exact, normalized, causal n-gram mixer for evaluation.

Order of work (score first, update after). The evaluation cuts the stream into chunks of consecutive
targets; every target of a chunk is scored against the counts of the tokens before the chunk's first
target, and only then is the chunk added to the counts. Streaming: update(tokens[:1]), then per chunk
score(...) or score_from_net(...) followed by update(the chunk's targets). `score_stream` computes the
same numbers for a whole known stream at once. No target's probability depends on itself or on anything
after it.

Notation. The stream s_0, s_1, ... is what has been passed to `update` so far (N tokens).
For a gram g of L tokens, c(g) = number of positions where g occurs in the stream.
At row t the input token is x_t; the context of order n (2 <= n <= max_order) is the n-1
tokens ctx_n = x_{t-n+2..t} of the same row (orders whose context would start before the row
are unavailable). Counts are exact (open addressing over the full token key, no collisions):

    c_n(ctx)    = c(ctx) - [ctx is the suffix of the stream]   # occurrences followed by a token
    c_n(ctx, v) = c(ctx . v)                                   # so sum_v c_n(ctx, v) = c_n(ctx)
    p_1(v)      = (c(v) + 1) / (N + V)                         # add-one unigram; uniform if N = 0

p_net is the network's distribution at row t, H its entropy in nats, and
    alpha(H) = alpha_base + alpha_range * sigmoid(2 (H - alpha_center)).

rule="backoff" (the record's rule, exact counts):
    n* = the largest n with c_n(ctx_n) >= min_count;
    p_ng(v) = c_{n*}(ctx, v) / c_{n*}(ctx)   (p_ng = p_1 if no order qualifies)
    p(v) = (1 - alpha(H)) p_net(v) + alpha(H) p_ng(v)

rule="dirichlet" (hierarchical Dirichlet / PPM-style interpolation of every order, then mixed):
    q_1(v) = p_1(v)
    q_n(v) = (c_n(ctx, v) + beta q_{n-1}(v)) / (c_n(ctx) + beta)   if c_n(ctx) >= min_count
    q_n(v) = q_{n-1}(v)                                               otherwise (n = 2..max_order)
    p(v) = (1 - alpha(H)) p_net(v) + alpha(H) q_{max_order}(v)
  A context seen c times gets weight c / (c + beta) against its shorter contexts, so rare long
  contexts no longer take all of the n-gram's mass as in greedy backoff.

rule="dirichlet_evidence": the same q_max, mixed in only as far as it rests on counts:
    lambda = 1 - prod_{n: c_n(ctx) >= min_count} beta / (c_n(ctx) + beta)
    p(v) = (1 - alpha(H) lambda) p_net(v) + alpha(H) lambda q_{max_order}(v)
  lambda is the share of q_max that comes from counts rather than from its add-one unigram base
  (unrolling the recursion, q_max = (count terms) + (1 - lambda) p_1). With no context seen
  (lambda = 0, e.g. the first chunk of a stream) p = p_net: a well-calibrated network no longer
  pays for an n-gram model that has nothing to say yet.

rule="online" (the default): a Bayesian mixture of K experts, its weights learned from the targets
already scored. It takes J >= 1 networks (`networks`; the evaluation hands the unadapted network as
network 0 and the test-time-trained one as network 1), each a proper distribution p_j with entropy H_j.
With q_b, lambda_b the q_max and lambda above at concentration b, each network brings E experts:
    p_j;  (1 - g lambda_b) p_j + g lambda_b q_b  for each b in online_betas and each g > 0 in
    online_grid;  (1 - alpha(H_j) lambda) p_j + alpha(H_j) lambda q  (the dirichlet_evidence rule)
(E = 2 + (|grid| - 1) |betas|, K = J E; expert j E is network j alone). Each row has a bucket known
before its target:
    bucket = k n^J + sum_j bin_j n^j,  bin_j = #{e in online_edges: e < H_j},  n = |online_edges| + 1,
    k = the longest context (n - 1 tokens) with c_n(ctx) >= min_count, 0 if none: max_order n^J buckets.
The weights at row t are the posterior given the earlier targets of its bucket:
    L_k(t) = sum_{s before t, same bucket} -log p_k(y_s),
    w_k(t) = exp(-eta L_k(t)) / sum_j exp(-eta L_j(t)),   p(v) = sum_k w_k(t) p_k(v).
"Before t": every target of the earlier chunks and, within its chunk, the earlier rows of the same
batch row (a score_from_net call of B rows of T: the losses committed by earlier update() calls, plus
rows (b, 0..t-1) at their targets y[b, :t]; the batch rows of one call are independent, as for the
counts). The loss of an earlier target depends only on tokens up to x_t (and on each network's
p_j(y_s), itself causal), so p(y_t) is still causal, and all of it computes in parallel: per bucket an
exclusive prefix sum over a stable sort, one expert at a time. score changes no state: update(tokens)
adds the last score's losses to the learned sums when its tokens end with that score's targets (y
row-major); tokens that were not scored add counts only. distribution(logits, x) takes the rows' next
inputs x[b, P+t+1] as the targets of the rows before (what score uses whenever the rows are windows of
a stream). Losses are summed in fixed point: -log p_k(y) rounded to 2**-28 nats and clamped to
[0, 128] nats, so every sum is exact in any order (the whole-stream path is bitwise the streaming one;
a call of M targets raises OverflowError if M + the fullest bucket's targets reach 2**27, before any
sum could pass 2**62).
Bound (eta <= 1, one row per call as in the evaluation): in every bucket with n targets, whenever each
expert's loss is below 128 nats (p_k(y) > e^-128),
    sum_t -log p(y_t) <= min_k sum_t -log p_k(y_t) + (log K) / eta + 2**-28 n,
since -log sum_k w_k p_k <= -(1/eta) log sum_k w_k p_k^eta telescopes to -(1/eta) log (1/K) sum_k
exp(-eta L_k(end)). Each network alone and its dirichlet_evidence rule are experts, so over the stream
the mixture is worse than any of them by at most (buckets with targets) (log K) / eta + 2**-28 N nats.
At eta = 1 the sum is exactly -log (1/K) sum_k exp(-L_k(end)) >= min_k L_k(end) per bucket, and the
buckets of J networks refine those of any one of them: so the mixture over J networks is worse than
rule online over network j alone by at most (its buckets with targets) log K + 2**-28 N nats. In the
evaluation: test-time training, however harmful, costs at most that against not training at all.

Each level is a convex combination of proper distributions, and alpha, lambda, w_k in [0, 1] depend
only on H, on counts of the past and on losses of targets already scored, never on v, so
sum_v p(v) = 1 exactly for every rule; p(y) needs only each network's p_net(y) and H: the distributed
evaluation gathers just those two numbers per position and network (`score_from_net`). Row t uses only
the stream, x_{..t} and y_t (and, rule online, the targets of the rows before it).
The default rule is "online" (grid 0, .1, .3, .6, .9; betas 2, 8, 32, 128; edges 2, 4 nats; eta 1:
one network: K = 18, 30 buckets; two: K = 36, 90 buckets): where the network is the true model it
costs +0.0003 nats/token at 200k tokens (one network), against +0.11 for "dirichlet_evidence", and it
beat that rule on every held-out text measured, with the trained model and with proxy networks
(docs/mixer.md).

Storage. Unigram counts are a dense [V] vector and bigram counts a dense [V*V] one (for
V <= 2048). Every longer gram that occurred is one 16-byte row of a linear-probing table keyed
by the gram's tokens themselves (b = ceil(log2 V) bits each): lo = the newest 60 // b tokens +
the length as a 4-bit tag, and the row's second word = the older tokens + count * 2**(their
bits). Lookups compare the whole key: no collisions. V = 1024 allows max_order <= 10, and a
10-gram's count up to 2**23 (more raises OverflowError; shorter grams hold far more). The table
starts at 2**24 rows (256 MiB, about the record's 288 MiB of hashed counters), is grown 4x when
half full, and sits on 2 MiB pages where Linux allows.
score() looks up the target gram of every order in one batch; the context counts of row t are
the target counts of row t-1 (y_{t-1} = x_t). The slots found are kept, so the update() that
follows with the same tokens writes without probing again: counts of present grams go up in
place, and each absent gram takes the empty slot its lookup stopped at (one write per new row).
On CPU that streaming path runs in numpy (lower per-call overhead than torch), with the same
arithmetic as the torch path, so the same bits; the table's probes and writes there are two
small loops compiled by numba (numpy does the same, more slowly, where numba is missing).
`score_stream` gives the same numbers, bitwise, for a whole known stream at once (one stable sort
per gram length instead of the table); it uses no state, so a mixer used only that way never
allocates its table (the table is made, and on CPU the kernels compiled, on first score/update).
`check_settings` validates the settings without building anything.
"""
from __future__ import annotations

import math
import mmap

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Shared pieces
# -----------------------------------------------------------------------------

def _alpha(H: torch.Tensor, base: float, rng: float, center: float) -> torch.Tensor:
    return base + rng * torch.sigmoid(2.0 * (H - center))


def _check_tokens(t: torch.Tensor, V: int, name: str) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
        raise ValueError(f"{name}: token ids must lie in [0, {V}), got [{int(t.min())}, {int(t.max())}]")


def _rev_windows(x: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """x [B, P+T] -> [B*T, K] with out[b*T+t, j] = x[b, P+t-j] (0 where P+t-j < 0)."""
    B, W = x.shape
    xp = F.pad(x, (K - 1, 0))
    win = xp.unfold(1, K, 1)[:, W - T:, :]          # [B, T, K], oldest first
    return win.flip(-1).reshape(B * T, K)


def _net_stats(logits: torch.Tensor, y: torch.Tensor | None = None, rows: int = 256):
    """log p_net = log_softmax(logits) in float32 and its entropy H = -sum_v p log p (nats),
    `rows` rows at a time (cache-sized blocks: several times faster on CPU than whole-batch
    passes, same bits). Returns (log p_net [.., V], H [..]), or with targets y (log p_net(y), H)."""
    lead, V = logits.shape[:-1], logits.shape[-1]
    flat, lp, H = logits.reshape(-1, V), [], []
    for i in range(0, max(1, flat.shape[0]), rows):                 # (one empty block if no rows)
        logp = torch.log_softmax(flat[i:i + rows].float(), dim=-1)
        lp.append(logp if y is None else logp.gather(-1, y.reshape(-1, 1)[i:i + rows]).squeeze(-1))
        H.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(lp).reshape(logits.shape if y is None else lead), torch.cat(H).reshape(lead)


# Rule online's losses in fixed point: an integer sum is exact in any order, so the weights of a row
# are the same bits whether its predecessors were summed in one pass or call by call.
_LOSS_BITS, _LOSS_MAX = 28, 128.0         # 2**-28 nats, at most 2**35 per target: with fewer than
_MAX_TARGETS = 1 << 27                    # 2**27 targets in a bucket its sums stay below 2**62


def _group_prefix(key: torch.Tensor):
    """f(v) for v [M] int64: v[m] replaced by the sum of v[m'] over the earlier m' < m with key[m'] == key[m]
    (exact: integers). One stable sort of key serves every v."""
    M = key.numel()
    o = torch.argsort(key, stable=True)
    ks = key[o]
    start = torch.ones(M, dtype=torch.bool, device=key.device)
    start[1:] = ks[1:] != ks[:-1]
    first = torch.where(start, torch.arange(M, device=key.device), 0).cummax(0).values
    del ks, start

    def prefix(v: torch.Tensor) -> torch.Tensor:
        vs = v.index_select(0, o)
        ex = vs.cumsum(0).sub_(vs)               # exclusive prefix in sorted order
        return torch.empty_like(v).index_copy_(0, o, ex.sub_(ex.index_select(0, first)))
    return prefix


class _MixerAPI:
    """score / distribution in terms of score_from_net (one code path)."""
    networks = 1

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.shape[-1] != self.V:
            raise ValueError(f"logits last dim {logits.shape[-1]} != vocab_size {self.V}")

    def _learner(self, B, T, tgt):
        """Where the learned weights of one call come from (rule online); None: no learned weights."""
        return None

    def _per_net(self, v, M: int, name: str) -> torch.Tensor:
        """A per-position input of every network ([M] numbers each, any shape, networks first) -> [J, M] float64."""
        if v.numel() != self.networks * M:
            raise ValueError(f"{name}: {tuple(v.shape)} holds {v.numel()} numbers, not {self.networks} network(s) x {M}")
        return v.to(self.device).double().reshape(self.networks, M)

    def score(self, logits, x, y):
        """[J,B,T,V] (J = networks; [B,T,V] for one), [B,P+T], [B,T] -> [B,T] NLL (nats) of the mixed
        distribution; state unchanged."""
        self._check_logits(logits)
        y = y.to(logits.device).long()
        _check_tokens(y, self.V, "y")
        logp_y, H = _net_stats(logits, y.expand(logits.shape[:-1]))
        return self.score_from_net(logp_y, H, x, y)

    def score_from_net(self, logp_y, entropy, x, y):
        """log p_net(y) [J,B,T], H [J,B,T] (each network's; [B,T] for one), x [B,P+T], y [B,T] -> [B,T] NLL in
        nats (at least fp32)."""
        x, y = x.to(self.device).long(), y.to(self.device).long()
        _check_tokens(x, self.V, "x")
        _check_tokens(y, self.V, "y")
        B, T = y.shape
        rev_x, t_in = self._rows(x, B, T)
        p = self._mix(self._per_net(logp_y, B * T, "logp_y").exp()[..., None], self._per_net(entropy, B * T, "entropy"),
                      rev_x, t_in, y.reshape(B * T, 1), self._learner(B, T, y.reshape(B * T)))
        return (-torch.log(p)).reshape(B, T).to(torch.promote_types(logp_y.dtype, torch.float32))

    def distribution(self, logits, x, rows_per_call: int = 256):
        """[J,B,T,V] ([B,T,V] for one network), [B,P+T] -> [B,T,V]: the full distribution whose value at y score()
        returns (rule online: for targets y[:, t] = x[:, P+t+1], the rows' next inputs, as in a stream)."""
        self._check_logits(logits)
        x = x.to(self.device).long()
        _check_tokens(x, self.V, "x")
        logp, H = _net_stats(logits.to(self.device))
        B, T, V = logp.shape[-3:]
        pnet, H = logp.double().exp().reshape(-1, B * T, V), self._per_net(H, B * T, "logits")
        rev_x, t_in = self._rows(x, B, T)
        cand = torch.arange(V, device=self.device).expand(B * T, V)
        nxt = torch.cat([x[:, x.shape[1] - T + 1:], x[:, :1]], 1).reshape(B * T)   # (a row's last: unused)
        learn = self._learner(B, T, nxt)
        out = torch.empty(B * T, V, dtype=torch.float64, device=self.device)
        for i in range(0, B * T, rows_per_call):
            r = slice(i, i + rows_per_call)
            out[r] = self._mix(pnet[:, r], H[:, r], rev_x[r], t_in[r], cand[r],
                               learn and (learn[0][r], learn[1][r], learn[2]))
        return out.reshape(B, T, V)

    def _rows(self, x, B, T):
        """x [B, P+T] -> contexts rev_x [B*T, max_order-1] (newest first) and t_in [B*T], the
        index of x_t in its row (a context of k tokens exists iff t_in >= k-1)."""
        if x.dim() != 2 or x.shape[0] != B or x.shape[1] < T:
            raise ValueError(f"x {tuple(x.shape)} must be [B, P+T] for B={B}, T={T}")
        W = x.shape[1]
        t_in = (W - T) + torch.arange(T, device=self.device).repeat(B)
        return _rev_windows(x, T, self.max_order - 1), t_in


# -----------------------------------------------------------------------------
# Exact gram table: open addressing keyed by the full token sequence
# -----------------------------------------------------------------------------

_M1, _M2 = -7046029254386353131, 5443315617234345911   # odd 64-bit mixing constants
_W = 16                                                 # probe rounds read 1, 4, then 16 slots
_ROW = np.dtype((np.void, 16))                          # one table row (2 words) as one numpy item
_QBITS = 23                                             # add_probed: occurrences per call < 2**23
_LOG2CAP = 24                                           # default table: 2**24 rows, 256 MiB
_BLOCK = 1 << 16                                        # CPU update(): tokens keyed and probed at once
_LOG2CAP_MIN = 4                                         # smallest table: 16 rows


def _wrap64(v: int) -> int:
    """An unsigned 64-bit pattern as the int64 with the same bits."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _zeros_int64(shape, device) -> torch.Tensor:
    """torch.zeros(shape, int64). On CPU, where the OS offers it (Linux madvise), a large table
    is asked to live on 2 MiB pages: its random accesses then miss the TLB far less often."""
    nbytes = math.prod(shape) * 8
    if torch.device(device).type != "cpu" or nbytes < 1 << 24 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=torch.int64, device=device)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # zero-filled
    mm.madvise(mmap.MADV_HUGEPAGE)
    a = np.frombuffer(mm, dtype=np.int64)
    a[::512] = 0                                  # fault every page in now, as torch.zeros does
    return torch.from_numpy(a.reshape(shape))


def _probe_rows(tab, hi, lo, sh, mask, res, cnt):
    """numba kernel of _ExactTable._probe_np, given each key's home slot in res."""
    flat = tab.reshape(-1)
    for i in range(hi.size):          # home rows first: these loads do not wait on each other
        cnt[i] = flat[2 * res[i]]
    for i in range(hi.size):
        h, k, w, hm = res[i], cnt[i], flat[2 * res[i] + 1], (1 << sh[i]) - 1
        while k != 0 and (k != lo[i] or (w & hm) != hi[i]):
            h = (h + 1) & mask
            k, w = flat[2 * h], flat[2 * h + 1]
        res[i], cnt[i] = (h, w >> sh[i]) if k != 0 else (~h, 0)


def _add_rows(tab, hi, lo, res, sh, mask):
    """numba kernel of _ExactTable.add_probed, one occurrence at a time: a present key's count
    goes up in place; an absent one probes on from its empty slot (an earlier occurrence may
    have taken it) and claims the first empty slot, unless it meets its own key first.
    Returns (rows claimed, index of an occurrence whose count overflowed, or -1)."""
    claimed, bad = 0, -1
    for i in range(hi.size):
        h = res[i]
        if h < 0:
            h, hm = ~h, (1 << sh[i]) - 1
            while tab[h, 0] != 0 and (tab[h, 0] != lo[i] or (tab[h, 1] & hm) != hi[i]):
                h = (h + 1) & mask
            if tab[h, 0] == 0:
                tab[h, 0], tab[h, 1] = lo[i], hi[i]
                claimed += 1
        tab[h, 1] += 1 << sh[i]
        if tab[h, 1] < 0:
            bad = i
    return claimed, bad


_KERNELS = []


def _kernels():
    """(probe, add) compiled by numba (cached on disk), or None where numba is not installed:
    the numpy code of _ExactTable then does the same work, more slowly."""
    if not _KERNELS:
        try:
            import numba
        except ImportError:
            _KERNELS.append(None)
        else:                                           # compiled (or loaded) now, not mid-stream
            def jit(sig, f):
                try:
                    return numba.njit(sig, cache=True)(f)
                except RuntimeError:                    # nowhere to cache: compile every time
                    return numba.njit(sig)(f)
            a = "int64[:]"
            _KERNELS.append((jit(f"void(int64[:, ::1], {a}, {a}, {a}, int64, {a}, {a})", _probe_rows),
                             jit(f"UniTuple(int64, 2)(int64[:, ::1], {a}, {a}, {a}, {a}, int64)", _add_rows)))
    return _KERNELS[0]


class _ExactTable:
    """Map keys (hi, lo) of two int64 words to counts, exactly. A key's tag t = bits 60..63 of lo
    is nonzero and fixes sh = shifts[t], the width of hi (0 <= hi < 2**sh). A row is 16 bytes,
    four per cache line: tab[slot] = (lo, hi + count * 2**sh), count < 2**(63 - sh); lo == 0
    marks an empty slot. Linear probing at load <= 1/2; lookups compare lo and the hi bits of
    the row, so no two keys share a count."""

    def __init__(self, device, log2cap: int = _LOG2CAP_MIN, shifts=(0,) * 16, dense=None):
        """dense = (tag, bits): the keys of that tag (hi = 0) are counted in a dense array
        indexed by the low `bits` bits of lo, not in the table (the mixer's bigrams)."""
        self.device, self.size = torch.device(device), 0
        self.sh = torch.tensor(shifts, dtype=torch.int64, device=self.device)
        self.sh_np = np.array(shifts, dtype=np.int64)
        self.dense_tag, self.dense_mask, self.dense = None, 0, None
        if dense is not None:
            self.dense_tag, self.dense_mask = dense[0], (1 << dense[1]) - 1
            self.dense = torch.zeros(1 << dense[1], dtype=torch.int64, device=self.device)
        self._alloc(log2cap)

    def _alloc(self, log2cap):
        self.bits, self.mask = log2cap, (1 << log2cap) - 1
        self.tab = _zeros_int64((1 << log2cap, 2), self.device)

    def memory_bytes(self):
        return self.tab.numel() * 8 + (0 if self.dense is None else self.dense.numel() * 8)

    def _hash(self, hi, lo):
        h = (hi * _M1 ^ lo) * _M2
        return (h >> (64 - self.bits)) & self.mask

    def _shift(self, lo):
        """sh of each key (torch or numpy, like lo)."""
        if isinstance(lo, np.ndarray):
            return self.sh_np[(lo >> 60) & 15]
        return self.sh[(lo >> 60) & 15]

    def _row_hi(self, rows):
        """The key's hi of table rows [.., 2] (their second word without the count)."""
        return rows[:, 1] & ((1 << self._shift(rows[:, 0])) - 1)

    @staticmethod
    def _overflow(sh):
        raise OverflowError(f"an n-gram count reached 2**{63 - int(sh)}, the most this exact table holds "
                            f"for its length: split the stream, or use fewer tokens per key")

    def _find(self, hi, lo, insert: bool):
        """_find_rows for the table's keys; a dense key gets 'slot' S + its index (S = table
        size), present whether its count is 0 or not."""
        if self.dense is None:
            return self._find_rows(hi, lo, insert)
        dn = ((lo >> 60) & 15) == self.dense_tag
        res = torch.where(dn, self.mask + 1 + (lo & self.dense_mask), -1)
        rest = (~dn).nonzero().squeeze(1)
        return res.index_copy(0, rest, self._find_rows(hi[rest], lo[rest], insert))

    def _find_rows(self, hi, lo, insert: bool):
        """Slot of each key (-1 if absent and not inserting). Probe rounds read windows of
        1, 4, then _W consecutive slots; the key, if present, precedes the first empty slot.
        Inserting claims that empty slot (its second word, 0 while empty, serves as scratch):
        concurrent claims on one slot go to the lowest query index, the others re-read from
        there (a duplicate then hits it)."""
        n = hi.numel()
        res = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        q = torch.arange(n, device=self.device)
        h = self._hash(hi, lo)
        hmask = (1 << self._shift(lo)) - 1
        flat, W = self.tab.view(-1), 1
        while q.numel():
            idx = ((h[:, None] + torch.arange(W, device=self.device)) & self.mask).view(-1)
            rows = self.tab.index_select(0, idx).view(-1, W, 2)
            hit = (rows[..., 0] == lo[:, None]) & ((rows[..., 1] & hmask[:, None]) == hi[:, None])
            stop = hit | (rows[..., 0] == 0)
            first, found = stop.byte().argmax(1), stop.any(1)
            slot = (h + first) & self.mask
            is_hit = hit.gather(1, first[:, None]).squeeze(1) & found
            res.scatter_(0, q[is_hit], slot[is_hit])
            keep = ~is_hit
            if insert:
                e = (found & ~is_hit).nonzero().squeeze(1)
                qe, he = q[e], slot[e]
                flat.scatter_reduce_(0, he * 2 + 1, qe - n, reduce="amin")
                w = flat.index_select(0, he * 2 + 1) == qe - n
                hw, ew = he[w], e[w]
                self.tab.index_copy_(0, hw, torch.stack([lo[ew], hi[ew]], 1))
                self.size += int(hw.numel())
                res.scatter_(0, q[ew], hw)
                keep.scatter_(0, ew, False)
            else:
                keep &= ~found
            h = torch.where(found, slot, h + W)
            nz = keep.nonzero().squeeze(1)
            q, h, hi, lo, hmask = (t.index_select(0, nz) for t in (q, h, hi, lo, hmask))
            W = min(4 * W, _W)
        return res

    # CPU streaming path in numpy (several times less per-call overhead than torch on these
    # small arrays; the table is shared memory, so both paths see the same rows).
    def _probe_np(self, hi, lo, sh=None):
        """Lookup without insert; hi, lo int64 arrays -> (res, counts): res is the slot of each
        key if present, else -1 - e where e is the first empty slot on its probe path (where
        linear probing would insert it); counts 0 for absent keys. sh: _shift(lo), if known."""
        tab = self.tab.numpy()
        sh = self._shift(lo) if sh is None else sh
        if _kernels():
            res, cnt = self._hash(hi, lo), np.empty_like(hi)
            _kernels()[0](tab, hi, lo, sh, self.mask, res, cnt)
            return res, cnt
        hmask = (1 << sh) - 1
        h = self._hash(hi, lo)                             # same expression on arrays (wraps alike)
        rows = tab.take(h, axis=0)
        hit = (rows[:, 0] == lo) & ((rows[:, 1] & hmask) == hi)
        res, cnt = np.where(hit, h, ~h), (rows[:, 1] >> sh) * hit   # ~h = -1 - h
        q = np.flatnonzero((rows[:, 0] != 0) > hit)       # home slot holds another key: probe on
        W, ar = 4, np.arange(_W)
        while q.size:                                      # windows of 4, then _W slots
            idx = (h[q, None] + 1 + ar[:W]) & self.mask
            r = tab.take(idx.reshape(-1), axis=0).reshape(-1, W, 2)
            hit = (r[..., 0] == lo[q, None]) & ((r[..., 1] & hmask[q, None]) == hi[q, None])
            stop = hit | (r[..., 0] == 0)
            first, found = stop.argmax(1), stop.any(1)
            rq = np.arange(q.size)
            slot = idx[rq, first]
            is_hit = hit[rq, first]
            res[q[found]] = np.where(is_hit, slot, ~slot)[found]
            cnt[q[found]] = np.where(is_hit, r[rq, first, 1] >> sh[q], 0)[found]
            h[q] = idx[:, -1]
            q = q[~found]
            W = _W
        return res, cnt

    def add_probed(self, hi, lo, res, cnt, sh=None):
        """c(key) += 1 per occurrence, given (res, cnt) = _probe_np(hi, lo) against the current
        table (CPU; numpy int64; res is overwritten). Keys present: their rows' counts are
        incremented in place. Absent keys are sorted by the empty slot where they would go; each
        slot's first occurrence writes its row once, with the number of occurrences of its key
        there. An occurrence whose empty slot went to another key probes again (it is taken now).
        No dense keys here (nor in _probe_np): the caller counts those itself."""
        n = hi.size
        sh = self._shift(lo) if sh is None else sh
        if not _kernels() and (n >= 1 << _QBITS                # (numpy's sort key holds the index)
                               or n and int(cnt.max()) + n >> (63 - int(sh.max()))):   # count overflow?
            return self.add(torch.from_numpy(hi), torch.from_numpy(lo))   # (checks exactly)
        if self._grow_for(n):                                  # slots moved: probe again
            res = self._probe_np(hi, lo, sh)[0]
        if _kernels():
            claimed, bad = _kernels()[1](self.tab.numpy(), hi, lo, res, sh, self.mask)
            self.size += claimed
            if bad >= 0:
                self._overflow(sh[bad])
            return
        tab = self.tab.numpy()
        rows, flat = tab.view(_ROW).reshape(-1), tab.reshape(-1)   # one item per row / word
        q = np.arange(n)
        while q.size:
            r = res[q]
            old = r >= 0
            short = sh[q] == 0                                 # count in the whole word: + 1
            np.add.at(flat, r[old & short] * 2 + 1, 1)
            np.add.at(flat, r[old > short] * 2 + 1, 1 << sh[q[old > short]])
            new = np.flatnonzero(~old)
            if not new.size:
                break
            q, r = q[new], r[new]
            v = np.sort(~r << _QBITS | q)                      # by empty slot e = -1 - r
            e, q = v >> _QBITS, v & ((1 << _QBITS) - 1)
            first = np.ones(q.size, dtype=bool)
            np.not_equal(e[1:], e[:-1], out=first[1:])
            lead = np.flatnonzero(first)
            ql = q[lead]
            k = np.diff(lead, append=q.size)                   # occurrences per empty slot
            lost = np.zeros(0, dtype=np.int64)
            many = k > 1
            if many.any():                                     # same key, or keys competing?
                g = np.flatnonzero(many)
                mem = np.flatnonzero(np.repeat(many, k))       # their occurrences, in order
                gm = np.repeat(g, k[g])
                lq = ql[gm]
                other = (hi[lq] != hi[q[mem]]) | (lo[lq] != lo[q[mem]])
                lost = mem[other]
                k -= np.bincount(gm[other], minlength=lead.size)
            out = np.empty((lead.size, 2), dtype=np.int64)
            out[:, 0], out[:, 1] = lo[ql], hi[ql] + (k << sh[ql])
            rows[e[lead]] = out.view(_ROW).reshape(-1)
            self.size += int(lead.size)
            q = q[lost]
            if q.size:
                res[q] = self._probe_np(hi[q], lo[q], sh[q])[0]

    def counts_at(self, slot):
        S = self.mask + 1
        rows = self.tab.index_select(0, slot.clamp(0, S - 1))
        out = torch.where(slot >= 0, rows[:, 1] >> self._shift(rows[:, 0]), 0)
        if self.dense is None:
            return out
        return torch.where(slot >= S, self.dense.index_select(0, (slot - S).clamp(min=0)), out)

    def count(self, hi, lo):
        return self.counts_at(self._find(hi, lo, insert=False))

    def _rebuild(self, log2cap):
        """Re-insert every row into a table of 2**log2cap slots in one pass: sorted by home slot,
        key i goes to p_i = max(h_i, p_{i-1} + 1) = i + cummax(h - i), a valid linear-probing
        layout; the few keys pushed past the end wrap around through _find."""
        if self.device.type == "cpu":                    # the same steps in numpy (faster on CPU)
            tab = self.tab.numpy()
            old = tab[tab[:, 0] != 0]
            self._alloc(log2cap)
            h = self._hash(self._row_hi(old), old[:, 0])
            order = np.argsort(h)
            h, old = h[order], old[order]
            i = np.arange(h.size)
            p = np.maximum.accumulate(h - i) + i
            fits = p <= self.mask
            self.tab.numpy().view(_ROW).reshape(-1)[p[fits]] = old[fits].view(_ROW).reshape(-1)
            old = torch.from_numpy(old[~fits])
            self.size = int(np.count_nonzero(fits))
        else:
            old = self.tab[self.tab[:, 0] != 0]
            self._alloc(log2cap)
            h, order = self._hash(self._row_hi(old), old[:, 0]).sort()
            old, i = old[order], torch.arange(h.numel(), device=self.device)
            p = (h - i).cummax(0).values + i
            fits = p <= self.mask
            self.tab.index_copy_(0, p[fits], old[fits])
            self.size = int(fits.sum())
            old = old[~fits]
        self.tab[:, 1].index_copy_(0, self._find_rows(self._row_hi(old), old[:, 0], insert=True), old[:, 1])

    def _grow_for(self, n) -> bool:
        """Before adding up to n new keys: grow (x4, or more) if the load would pass 1/2."""
        need = self.size + n
        if 2 * need <= self.mask + 1:
            return False
        self._rebuild(max(self.bits + 2, math.ceil(math.log2(2 * need + 1))))
        return True

    def add(self, hi, lo, slot=None):
        """c(key) += 1 per occurrence (duplicates included). slot: known slots (-1: unknown),
        valid only if the table has not changed since they were found. Raises OverflowError if
        a count outgrows its bits (only for the longest keys, after 2**23 or more occurrences)."""
        if hi.numel() > 1 << 22:                          # bounded steps: an overflow shows as a sign
            for a in range(0, hi.numel(), 1 << 22):
                self.add(hi[a:a + (1 << 22)], lo[a:a + (1 << 22)])
            return
        if self._grow_for(hi.numel()):
            slot = None
        if slot is None:
            slot = self._find(hi, lo, insert=True)
        else:
            miss = (slot < 0).nonzero().squeeze(1)
            slot = slot.scatter(0, miss, self._find(hi[miss], lo[miss], insert=True))
        if self.dense is not None:
            dn = slot > self.mask
            self.dense.index_add_(0, slot[dn] - (self.mask + 1), torch.ones_like(slot[dn]))
            keep = (~dn).nonzero().squeeze(1)
            slot, lo = slot[keep], lo[keep]
        sh = self._shift(lo)
        self.tab.view(-1).index_add_(0, slot * 2 + 1, 1 << sh)
        bad = self.tab[:, 1].index_select(0, slot) < 0        # count reached 2**(63 - sh)
        if bool(bad.any()):
            self._overflow(sh[bad][0])


# -----------------------------------------------------------------------------
# BackoffNgramMixer
# -----------------------------------------------------------------------------

RULES = ("backoff", "dirichlet", "dirichlet_evidence", "online")


class SettingError(ValueError):
    """A mixer setting out of range; `setting` is the keyword's name, `value` what it was given."""

    def __init__(self, setting: str, value, problem: str):
        super().__init__(f"{setting}={value!r}: {problem}")
        self.setting, self.value, self.problem = setting, value, problem


def max_order_for(vocab_size: int) -> int:
    """The longest gram an exact key holds: 60 bits of newest tokens + 40 of older ones, 15 at most."""
    b = max(1, (vocab_size - 1).bit_length())
    return min(15, 60 // b + 40 // b)


ONLINE = dict(online_grid="0,0.1,0.3,0.6,0.9", online_betas="2,8,32,128", online_edges="2,4", online_eta=1.0)


def _numbers(setting: str, value) -> tuple:
    """A comma-separated list (str) or a sequence of numbers -> a tuple of finite floats."""
    try:
        out = tuple(float(v) for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip())
    except (TypeError, ValueError):
        out = (math.nan,)
    if not all(map(math.isfinite, out)):
        raise SettingError(setting, value, "must be a comma-separated list of finite numbers")
    return out


def online_settings(online_grid=ONLINE["online_grid"], online_betas=ONLINE["online_betas"],
                    online_edges=ONLINE["online_edges"], online_eta=ONLINE["online_eta"]):
    """Rule online's settings, checked -> (grid, betas, entropy edges, eta); SettingError names the first bad one."""
    grid, betas, edges = (_numbers(k, v) for k, v in (("online_grid", online_grid), ("online_betas", online_betas),
                                                        ("online_edges", online_edges)))
    if 0.0 not in grid or not all(0 <= g <= 1 for g in grid) or len(set(grid)) < len(grid):
        raise SettingError("online_grid", online_grid, "must list distinct mixing weights in [0, 1], 0 (the network "
                                                       "alone) among them")
    if not betas or not all(b > 0 for b in betas) or len(set(betas)) < len(betas):
        raise SettingError("online_betas", online_betas, "must list one or more distinct concentrations > 0")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise SettingError("online_edges", online_edges, "must list entropies (nats) in increasing order, or none")
    if not 0 < online_eta <= 1:
        raise SettingError("online_eta", online_eta, "must lie in (0, 1] (above 1 the mixture has no regret bound)")
    return tuple(sorted(grid)), betas, edges, float(online_eta)


def check_settings(vocab_size: int = 1024, max_order: int = 10, min_count: int = 1, alpha_base: float = 0.20,
                   alpha_range: float = 0.55, alpha_center: float = 3.0, rule: str = "online",
                   beta: float = 32.0, networks: int = 1, **online) -> None:
    """Raise SettingError for the first setting out of range; allocates nothing, compiles nothing."""
    if vocab_size < 2:
        raise SettingError("vocab_size", vocab_size, "must be >= 2")
    if not 2 <= max_order <= max_order_for(vocab_size):
        raise SettingError("max_order", max_order, f"must be >= 2 and <= {max_order_for(vocab_size)} "
                                                   f"(the longest exact key for a vocabulary of {vocab_size})")
    if min_count < 1:
        raise SettingError("min_count", min_count, "must be >= 1")
    if rule not in RULES:
        raise SettingError("rule", rule, f"must be one of {', '.join(RULES)}")
    if not beta > 0 or not math.isfinite(beta):
        raise SettingError("beta", beta, "must be a finite number > 0")
    if not 0 <= alpha_base <= 1:
        raise SettingError("alpha_base", alpha_base, "must lie in [0, 1]")
    if not 0 <= alpha_range <= 1 - alpha_base:
        raise SettingError("alpha_range", alpha_range, f"must lie in [0, 1 - alpha_base = {1 - alpha_base:g}] "
                                                       f"(so that alpha(H) stays in [0, 1])")
    if not math.isfinite(alpha_center):
        raise SettingError("alpha_center", alpha_center, "must be finite")
    if networks < 1 or (networks > 1 and rule != "online"):
        raise SettingError("networks", networks, "must be 1, or more with rule online (the only rule that weighs networks)")
    online_settings(**online)


class BackoffNgramMixer(_MixerAPI):
    """score(logits, x, y) / score_from_net(logp_y, H, x, y) -> NLL [B,T] (state unchanged);
    distribution(logits, x) -> [B,T,V]; update(tokens) appends to the stream. See module doc."""
    RULES = RULES

    def __init__(self, vocab_size: int = 1024, max_order: int = 10, min_count: int = 1,
                 alpha_base: float = 0.20, alpha_range: float = 0.55, alpha_center: float = 3.0,
                 device="cpu", rule: str = "online", beta: float = 32.0, expected_tokens: int | None = None,
                 networks: int = 1, **online):
        """expected_tokens: stream length to pre-size the gram table for (it grows on demand anyway);
        None: 2**24 rows (256 MiB). The table is allocated on first use (score/update), never by
        score_stream. networks: how many network distributions each call hands in (more than 1: rule
        online). online: online_grid, online_betas, online_edges, online_eta (rule online)."""
        check_settings(vocab_size, max_order, min_count, alpha_base, alpha_range, alpha_center, rule, beta, networks,
                       **online)
        self.V, self.max_order, self.min_count, self.rule, self.beta = vocab_size, max_order, min_count, rule, beta
        self.networks = networks
        self.alpha = (alpha_base, alpha_range, alpha_center)
        self.device = torch.device(device)
        self.grid, self.betas, edges, self.eta = online_settings(**online)
        self.edges = torch.tensor(edges, dtype=torch.float64, device=self.device)
        self.n_buckets = max_order * (len(edges) + 1) ** networks   # (longest context with counts, entropy bins)
        self.n_experts = networks * (2 + (len(self.grid) - 1) * len(self.betas)) if rule == "online" else 1
        self._sums = torch.zeros(self.n_buckets, self.n_experts + 1, dtype=torch.int64, device=self.device)
        self._pending = None    # the last score's (targets, buckets, fixed-point losses), for update
        self.stream_sums = None  # score_stream's final loss sums (rule online), for learned()
        # key of a gram of L tokens, b bits per token, newest first: lo = the newest k_lo tokens
        # + L * 2**60 (the tag), hi = the older ones (b (L - k_lo) bits, the rest of the table
        # row's word holds the count: at least 2**23 for the longest grams)
        self.b = max(1, (vocab_size - 1).bit_length())
        self.k_lo = 60 // self.b
        j = torch.arange(max_order, device=self.device)
        self._is_lo = j < self.k_lo
        self._sh_lo = torch.where(self._is_lo, self.b * j, 0)
        self._sh_hi = torch.where(self._is_lo, 0, self.b * (j - self.k_lo))
        self._is_lo_np, self._sh_lo_np, self._sh_hi_np = (t.cpu().numpy() for t in (self._is_lo, self._sh_lo, self._sh_hi))
        self._tag = torch.tensor([_wrap64(L << 60) for L in range(1, max_order + 1)], device=self.device)
        self._tag_np = self._tag.cpu().numpy()
        shifts = [self.b * max(0, L - self.k_lo) for L in range(16)]
        grams = 2 * (max_order - 1) * (expected_tokens or 0)                # slots at load <= 1/2
        dense = (2, 2 * self.b) if 2 * self.b <= 22 else None               # bigrams: a [V*V] array
        log2cap = _LOG2CAP if expected_tokens is None else max(_LOG2CAP_MIN, grams.bit_length())
        self._table_args, self._table = (log2cap, shifts, dense), None
        self.uni = torch.zeros(vocab_size, dtype=torch.int64, device=self.device)
        self.N = 0
        self.tail = torch.zeros(0, dtype=torch.int64, device=self.device)   # last max_order-1 tokens
        self._memo = None   # the last score's target grams and where they are, for update

    @property
    def table(self) -> _ExactTable:
        """The gram table, allocated (and on CPU the kernels compiled) on first use."""
        if self._table is None:
            self._table = _ExactTable(self.device, *self._table_args)
            if self.device.type == "cpu":
                _kernels()
        return self._table

    def memory_bytes(self):
        return (0 if self._table is None else self._table.memory_bytes()) + self.uni.numel() * 8

    def _keys(self, rev: torch.Tensor):
        """rev [..., L] (newest first) -> (hi, lo) [..., L]: keys of the grams of length 1..L."""
        L = rev.shape[-1]
        lo = torch.where(self._is_lo[:L], rev << self._sh_lo[:L], 0).cumsum(-1)
        hi = torch.where(self._is_lo[:L], 0, rev << self._sh_hi[:L]).cumsum(-1)
        return hi, lo + self._tag[:L]

    def _keys_np(self, rev: np.ndarray):
        """_keys for the CPU streaming path, transposed: numpy rev [L, M] (newest first along
        axis 0) -> (hi, lo) [L, M] (a loop over the L rows: numpy's cumsum along axis 0 is slow)."""
        hi, lo = np.empty_like(rev), np.empty_like(rev)
        acc_hi, acc_lo = 0, 0
        for j in range(rev.shape[0]):
            if self._is_lo_np[j]:
                acc_lo = acc_lo + (rev[j] << int(self._sh_lo_np[j]))
            else:
                acc_hi = acc_hi + (rev[j] << int(self._sh_hi_np[j]))
            lo[j], hi[j] = acc_lo + self._tag_np[j], acc_hi
        return hi, lo

    # --- state ------------------------------------------------------------------------------
    def update(self, tokens: torch.Tensor) -> None:
        """Append the next tokens of the stream (1-D, in order) to the counts. Rule online: if they end
        with the targets of the last score (row-major), that score's losses join the learned sums;
        tokens that were not scored only add counts."""
        tokens = tokens.to(self.device).long().reshape(-1)
        _check_tokens(tokens, self.V, "tokens")
        K, n = self.max_order, tokens.numel()
        pending, self._pending = self._pending, None
        if pending is not None and 0 < pending[0].numel() <= n and torch.equal(tokens[n - pending[0].numel():],
                                                                               pending[0]):
            self._sums.index_add_(0, pending[1], pending[2].T)
        if not n:
            return
        seq = torch.cat([self.tail, tokens])
        memo, self._memo = self._memo, None
        if self.device.type == "cpu":
            self._update_np(memo, seq.numpy(), n)
        else:
            rev = _rev_windows(seq[None], n, K)                          # [n, K] newest first
            ok = self._fits(n)
            if memo is not None and memo[0].shape == rev.shape and bool((memo[0] == rev).all()):
                _, hi, lo, slot = memo                                    # score() looked these up
                self.table.add(hi[ok].reshape(-1), lo[ok].reshape(-1), slot[ok].reshape(-1))
            else:
                hi, lo = self._keys(rev)
                self.table.add(hi[ok].reshape(-1), lo[ok].reshape(-1))
        self.uni += torch.bincount(tokens, minlength=self.V)
        self.N += n
        self.tail = seq[-(K - 1):]

    def _fits(self, n):
        """[n, K] mask of the grams of length 2..K ending at the next n stream positions that
        fit after the stream start (unigrams, column 0, are counted in self.uni)."""
        pos = self.N + torch.arange(n, device=self.device)[:, None]
        ok = pos >= torch.arange(self.max_order, device=self.device)
        ok[:, 0] = False
        return ok

    def _update_np(self, memo, seq, n):
        """CPU update of the grams ending at the n new tokens (seq = tail + tokens). Their keys,
        and where each one is (its row, or the empty slot it would take), come from the probe of
        the score() just before if it scored exactly these grams against the table as it is;
        otherwise they are built and probed here, _BLOCK tokens at a time."""
        K, d = self.max_order, 1 + (self.table.dense is not None)    # d: first length in the table
        pad = np.concatenate([np.zeros(K - 1 - (seq.size - n), dtype=np.int64), seq])
        toks = np.stack([pad[K - 1 - j: K - 1 - j + n] for j in range(K)])   # [K, n] newest first
        fresh = (memo is not None and memo[0].shape == toks.shape and np.array_equal(memo[0], toks)
                 and memo[-2] is self.table.tab and memo[-1] == self.table.size)
        step = n if fresh else _BLOCK
        for a in range(0, n, step):
            t = toks[:, a:a + step]
            m = t.shape[1]
            if fresh:
                bigram, hi, lo, slot, cnt, sh = memo[1:7]
            else:
                hi, lo = self._keys_np(t)
                bigram = lo[1] & self.table.dense_mask if d == 2 else None
                hi, lo = hi[d:], lo[d:]
                sh = np.repeat(self.table.sh_np[d + 1:K + 1], m).reshape(-1, m)
                slot, cnt = (v.reshape(-1, m) for v in self.table._probe_np(hi.ravel(), lo.ravel(), sh.ravel()))
            pos = self.N + a + np.arange(m)
            okT = pos >= np.arange(1, K)[:, None] if pos[0] < K - 1 else None   # [K-1, m]: lengths 2..K fit
            if bigram is not None:
                np.add.at(self.table.dense.numpy(), bigram if okT is None else bigram[okT[0]], 1)
            if okT is not None:
                okT = okT[d - 1:]
                hi, lo, slot, cnt, sh = hi[okT], lo[okT], slot[okT], cnt[okT], sh[okT]
            self.table.add_probed(hi.ravel(), lo.ravel(), slot.ravel(), cnt.ravel(), sh.ravel())

    # --- counts -----------------------------------------------------------------------------
    def _suffix_match(self, rev_x):
        """[M, K1]: column j is 1 where the context of j+1 tokens is the stream's suffix, i.e. its
        last occurrence is not yet followed by a token."""
        M, K1 = rev_x.shape
        L = min(K1, self.tail.numel())
        out = torch.zeros(M, K1, dtype=torch.int64, device=self.device)
        if L:
            out[:, :L] = (rev_x[:, :L] == self.tail.flip(0)[:L]).long().cummin(1).values
        return out

    def _context_counts(self, rev_x, avail):
        """c(ctx) of the contexts of n-1 = 1..max_order-1 tokens -> [M, K1]; 0 where unavailable."""
        hi, lo = self._keys(rev_x)
        longer = self.table.count(hi[:, 1:].reshape(-1), lo[:, 1:].reshape(-1)).view(hi.shape[0], -1)
        return torch.cat([self.uni[rev_x[:, :1]], longer], 1) * avail

    def _target_counts(self, rev_x, cand, need):
        """c_n(ctx_n, v) for candidates cand [M, C] -> [M, C, K1] (column n-2), looked up where
        need [M, K1] (0 elsewhere)."""
        M, C = cand.shape
        K1 = rev_x.shape[1]
        hi, lo = self._keys(torch.cat([cand.unsqueeze(-1), rev_x[:, None, :].expand(M, C, K1)], -1))
        sel = need[:, None, :].expand(M, C, K1)
        out = torch.zeros(M, C, K1, dtype=torch.int64, device=self.device)
        out[sel] = self.table.count(hi[..., 1:][sel], lo[..., 1:][sel])
        return out

    # --- probabilities ----------------------------------------------------------------------
    def _mix(self, pnet, H, rev_x, t_in, cand, learn=None):
        """Mixed probability at candidates cand [M, C] given each network's p_net(cand) [J, M, C] and H [J, M]
        (learn: rule online's weights, see _learned).
        With C == 1 (score) every order's target count comes from one lookup whose keys and
        slots are kept for update(); the context counts of row t are then the target counts
        of row t-1 wherever y_{t-1} = x_t."""
        M, C = cand.shape
        K1 = self.max_order - 1
        avail = t_in[:, None] >= torch.arange(K1, device=self.device)   # ctx of j+1 tokens fits
        if C == 1:
            toks = torch.cat([cand, rev_x], 1)
            hi, lo = self._keys(toks)                                    # [M, K]: lengths 1..K
            prev = torch.zeros(M, dtype=torch.bool, device=self.device)
            prev[1:] = (t_in[1:] > t_in[:-1]) & (cand[:-1, 0] == rev_x[1:, 0])   # row m-1: same row, y = x_t
            r = (~prev).nonzero().squeeze(1)                             # rows needing own context lookup
            chi, clo = self._keys(rev_x.index_select(0, r))
            found = self.table._find(torch.cat([hi[:, 1:].reshape(-1), chi[:, 1:].reshape(-1)]),
                                     torch.cat([lo[:, 1:].reshape(-1), clo[:, 1:].reshape(-1)]), insert=False)
            slot = found[: M * K1].view(M, K1)
            self._memo = (toks, hi, lo, F.pad(slot, (1, 0), value=-1))
            tc = self.table.counts_at(found[: M * K1]).view(M, K1) * avail
            cc = torch.zeros(M, K1, dtype=torch.int64, device=self.device)
            cc[:, 0] = self.uni[rev_x[:, 0]]
            cc[1:, 1:] = tc[:-1, :-1]
            cc[:, 1:].index_copy_(0, r, self.table.counts_at(found[M * K1:]).view(-1, K1 - 1))
            tcnt = tc[:, None, :]
        else:
            cc = self._context_counts(rev_x, avail)
            tcnt = None
        cc = (cc - self._suffix_match(rev_x)) * avail
        p1 = (self.uni[cand].double() + 1.0) / (self.N + self.V)
        if tcnt is None:
            return self._combine(pnet, H, cc, p1, lambda need: self._target_counts(rev_x, cand, need), learn)
        return self._combine(pnet, H, cc, p1, lambda need: tcnt, learn)

    # --- CPU streaming path -----------------------------------------------------------------
    def score_from_net(self, logp_y, entropy, x, y):
        """On CPU the streaming score runs in numpy (several times less per-call overhead than
        torch on these arrays), with the same arithmetic as _mix/_combine, so the same bits."""
        self._pending = None
        if self.device.type != "cpu":
            return super().score_from_net(logp_y, entropy, x, y)
        xn, yn = np.asarray(x.long()), np.asarray(y.long())
        for a, name in ((xn, "x"), (yn, "y")):
            if a.size and (a.min() < 0 or a.max() >= self.V):
                raise ValueError(f"{name}: token ids must lie in [0, {self.V}), got [{a.min()}, {a.max()}]")
        B, T = yn.shape
        if xn.ndim != 2 or xn.shape[0] != B or xn.shape[1] < T:
            raise ValueError(f"x {tuple(xn.shape)} must be [B, P+T] for B={B}, T={T}")
        if not B * T:
            return torch.zeros(B, T, dtype=torch.promote_types(logp_y.dtype, torch.float32))
        K1, P = self.max_order - 1, xn.shape[1] - T
        xp = np.zeros((B, K1 + xn.shape[1]), dtype=np.int64)
        xp[:, K1:] = xn
        toks = np.empty((K1 + 1, B * T), dtype=np.int64)          # [y_t, x_t, x_{t-1}, ...] per row
        toks[0] = yn.reshape(-1)
        for j in range(K1):
            toks[1 + j] = xp[:, K1 + P - j: K1 + P - j + T].reshape(-1)
        t_in = np.tile(np.arange(P, P + T), B)
        tc, cc = self._score_counts_np(toks, t_in)
        pnets, H = self._per_net(logp_y, B * T, "logp_y").exp(), self._per_net(entropy, B * T, "entropy")
        alphas = _alpha(H, *self.alpha)
        pnet, a = pnets[0].numpy(), alphas[0].numpy()                     # (the other rules: one network)
        p1 = (self.uni.numpy()[toks[0]].astype(np.float64) + 1.0) / (self.N + self.V)
        ok = cc >= self.min_count
        if self.rule == "backoff":
            has = ok.any(0)
            col = np.where(has, K1 - 1 - np.argmax(ok[::-1], 0), 0)      # highest order that qualifies
            m = np.arange(B * T)
            c_ng = (tc[col, m] * has).astype(np.float64)
            c_ctx = (cc[col, m] * has).astype(np.float64)
            q = np.where(has, c_ng / np.maximum(c_ctx, 1.0), p1)
        else:
            betas = {self.beta, *(self.betas if self.rule == "online" else ())}
            qs = {b: self._hierarchy_np(tc, cc, ok, p1, b) for b in betas}
            q, keep = qs[self.beta]
            if self.rule == "online":                       # the experts and their weights in torch, as _combine
                col = lambda v: torch.from_numpy(v)[:, None]
                expert = self._experts(pnets[..., None], alphas[..., None], {b: (col(v), 1 - col(k)) for b, (v, k) in qs.items()})
                bucket = self._bucket(torch.from_numpy((ok * np.arange(1, K1 + 1)[:, None]).max(0)), H)
                p = self._learned(expert, bucket, self._learner(B, T, torch.from_numpy(yn.reshape(-1))))
                return (-torch.log(p)).reshape(B, T).to(torch.promote_types(logp_y.dtype, torch.float32))
            if self.rule == "dirichlet_evidence":
                a = a * (1 - keep)
        p = torch.from_numpy((1 - a) * pnet + a * q)
        return (-torch.log(p)).reshape(B, T).to(torch.promote_types(logp_y.dtype, torch.float32))

    def _hierarchy_np(self, tc, cc, ok, p1, beta):
        """q_max and 1 - lambda at concentration beta: _combine's hierarchy in numpy, the same bits."""
        den = (cc.astype(np.float32) + np.float32(beta)).astype(np.float64)   # float32, as in torch
        q, t, keep = p1.copy(), np.empty_like(p1), np.ones_like(p1)
        for j in range(tc.shape[0]):
            np.multiply(q, beta, out=t)
            t += tc[j]
            t /= den[j]
            np.copyto(q, t, where=ok[j])
            np.copyto(keep, keep * beta / den[j], where=ok[j])
        return q, keep

    def _score_counts_np(self, toks, t_in):
        """toks [K, M] (y_t, then the context newest first), t_in [M] -> target counts tc and
        context counts cc [K1, M] (row j: order j+2), as _mix's C == 1 branch; the keys and the
        probe results are kept for update()."""
        K1, M = toks.shape[0] - 1, toks.shape[1]
        y, x = toks[0], toks[1]
        hi, lo = self._keys_np(toks)                                 # [K, M]: lengths 1..K
        prev = np.zeros(M, dtype=bool)
        prev[1:] = (t_in[1:] > t_in[:-1]) & (y[:-1] == x[1:])       # row m-1: same row, y = x_t
        r = np.flatnonzero(~prev)                                    # rows needing own context lookup
        chi, clo = self._keys_np(toks[1:, r])
        d = 1 + (self.table.dense is not None)                       # first length in the table
        sh_of = self.table.sh_np                                     # by gram length
        sh = np.concatenate([np.repeat(sh_of[d + 1: K1 + 2], M), np.repeat(sh_of[d + 1: K1 + 1], r.size)])
        res, cnt = self.table._probe_np(np.concatenate([hi[d:].ravel(), chi[d:].ravel()]),
                                        np.concatenate([lo[d:].ravel(), clo[d:].ravel()]), sh)
        n_t = M * (K1 + 1 - d)                                       # the target grams' share
        tc = np.empty((K1, M), dtype=np.int64)
        tc[d - 1:] = cnt[:n_t].reshape(-1, M)
        c_r = cnt[n_t:].reshape(-1, r.size)                          # own context counts, lengths d..K1
        bigram = None
        if d == 2:                                                   # bigrams: from the dense array
            bigram = lo[1] & self.table.dense_mask
            dense = self.table.dense.numpy()
            tc[0] = dense[bigram]
            if K1 > 1:
                c_r = np.concatenate([dense[clo[1] & self.table.dense_mask][None], c_r])
        self._memo = (toks, bigram, hi[d:], lo[d:], res[:n_t].reshape(-1, M), cnt[:n_t].reshape(-1, M),
                      sh[:n_t].reshape(-1, M), self.table.tab, self.table.size)
        avail = t_in >= np.arange(K1)[:, None]                       # ctx of j+1 tokens fits
        tc *= avail
        cc = np.empty((K1, M), dtype=np.int64)
        cc[0] = self.uni.numpy()[x]
        cc[1:, 1:] = tc[:-1, :-1]
        cc[1:, r] = c_r
        L = min(K1, self.tail.numel())                               # minus 1 where ctx = stream suffix
        if L:
            tail, match = self.tail.numpy(), np.ones(M, dtype=bool)
            for j in range(L):
                match &= toks[1 + j] == tail[-1 - j]
                cc[j] -= match
        return tc, cc * avail

    def _combine(self, pnets, Hs, cc, p1, target_counts, learn=None):
        """The rules. pnets [J, M, C] and entropies Hs [J, M] of the J networks (the rules but online: J = 1);
        p1 [M, C]; cc [M, K1] context counts (0 where unavailable); target_counts(need [M, K1]) -> c_n(ctx, cand)
        [M, C, K1] (int64), needed only where `need`."""
        K1 = self.max_order - 1
        alphas = _alpha(Hs, *self.alpha)[..., None]
        pnet, a = pnets[0], alphas[0]
        ok = cc >= self.min_count
        if self.rule == "backoff":
            n_star = (ok * torch.arange(1, K1 + 1, device=ok.device)).amax(1) + 1   # 1: no order
            col, has = (n_star - 2).clamp(min=0)[:, None], (n_star >= 2)[:, None]   # the one needed column
            tcnt = target_counts(F.one_hot(col[:, 0], K1).bool() & has)
            c_ng = (tcnt.gather(2, col[:, :, None].expand(-1, tcnt.shape[1], 1)).squeeze(2) * has).double()
            c_ctx = (cc.gather(1, col) * has).double()
            p_ng = torch.where(has, c_ng / c_ctx.clamp(min=1), p1)
            return (1 - a) * pnet + a * p_ng
        tcnt = target_counts(ok)                                 # (int64, made double column by column: exact)

        def hierarchy(beta):                                     # -> q_max, lambda
            den = (cc + beta).double()                           # cc + beta in float32, widened exactly
            q, keep = p1, torch.ones_like(a)
            for j in range(K1):
                q = torch.where(ok[:, j:j + 1], (tcnt[:, :, j] + beta * q) / den[:, j:j + 1], q)
                keep = torch.where(ok[:, j:j + 1], keep * beta / den[:, j:j + 1], keep)   # keep = 1 - lambda
            return q, 1 - keep
        q, lam = hierarchy(self.beta)
        if self.rule == "online":
            qs = {self.beta: (q, lam), **{b: hierarchy(b) for b in self.betas if b != self.beta}}
            del tcnt
            n_star = (ok * torch.arange(1, K1 + 1, device=ok.device)).amax(1)
            return self._learned(self._experts(pnets, alphas, qs), self._bucket(n_star, Hs), learn)
        if self.rule == "dirichlet_evidence":
            a = a * lam
        return (1 - a) * pnet + a * q

    # --- rule online ------------------------------------------------------------------------
    def _experts(self, pnets, alphas, qs):
        """expert(k) -> [M, C], k < K: for each network j (E = K / J experts each, k = j E + i), with p = its
        distribution pnets[j] [M, C] and alpha = alphas[j] [M, 1]: i = 0: p; then (1 - g lambda_b) p + g lambda_b q_b
        for each beta b of online_betas and each g > 0 of online_grid; last, (1 - alpha lambda) p + alpha lambda q
        at beta (the default rule). qs: beta -> (q_max [M, C], lambda [M, 1]). Made on demand (losses, then
        weights): K of them at [M, C] at once would be the largest arrays of the pass."""
        G, E = len(self.grid) - 1, self.n_experts // self.networks

        def expert(k):
            (j, k), nb = divmod(k, E), len(self.betas) * G
            if k == 0:
                return pnets[j]
            q, lam = qs[self.betas[(k - 1) // G]] if k <= nb else qs[self.beta]
            w = lam * self.grid[1 + (k - 1) % G] if k <= nb else alphas[j] * lam
            return (1 - w) * pnets[j] + w * q
        return expert

    def _bucket(self, n_star, Hs):
        """Bucket of a row: k (the longest context with counts, 0..max_order-1) and each network's entropy bin
        (#edges < H_j), as the number k n^J + sum_j bin_j n^j (n = entropy bins, J = networks)."""
        b = n_star
        for H in reversed(Hs):
            b = b * (self.edges.numel() + 1) + torch.bucketize(H, self.edges)
        return b

    def _learner(self, B, T, tgt):
        """Rule online in a call of B rows of T: (batch row of each position, its target tgt [B*T], loss
        sums [B * buckets, K+1] so far: the committed ones for every batch row); None for the other rules."""
        if self.rule != "online":
            return None
        return torch.arange(B, device=self.device).repeat_interleave(T), tgt, self._sums.repeat(B, 1)

    def _learned(self, expert, bucket, learn):
        """The mixture sum_k w_k expert(k) [M, C] of the K experts, each row's weights from its bucket's
        loss sums: learn = (batch row of each row, or None: one stream; each row's target, or None: the
        candidates, C == 1; sums [rows * buckets, K+1] so far, the last column counting targets, updated
        in place). Scoring (C == 1, rows given) keeps its losses for update(). One expert at a time ([M]
        temporaries): a first pass finds each row's smallest loss sum L0, a second weighs."""
        row, tgt, sums = learn
        M, K = bucket.numel(), self.n_experts
        if M + int(sums[:, -1].max()) >= _MAX_TARGETS:
            raise OverflowError(f"rule online: {M} targets more than the {int(sums[:, -1].max())} of a bucket reach "
                                f"{_MAX_TARGETS}, past what its exact loss sums hold: split the stream")
        at = lambda e: e[:, 0] if tgt is None or e.shape[1] == 1 else e.gather(1, tgt[:, None])[:, 0]
        key = bucket if row is None else row * self.n_buckets + bucket
        prefix, pending = _group_prefix(key), [] if row is not None and tgt is not None and expert(0).shape[1] == 1 else None

        def losses(k):  # -log p_k(y) in units of 2**-_LOSS_BITS nats, rounded (exact), clamped to [0, _LOSS_MAX] nats
            return (-torch.log(at(expert(k)))).clamp_(0.0, _LOSS_MAX).mul_(2.0 ** _LOSS_BITS).round_().long()

        def loss_sums(ql, k):  # expert k's loss over each row's earlier targets of its bucket, committed ones included
            return prefix(ql).add_(sums[:, k].index_select(0, key))
        L0 = None
        for k in range(K):
            Lk = loss_sums(losses(k), k)
            L0 = Lk if L0 is None else torch.minimum(L0, Lk)
        num, den = 0.0, 0.0
        for k in range(K):                       # w_k = exp(-eta (L_k - L0)), elementwise: the same bits for any M
            ql = losses(k)
            w = (loss_sums(ql, k) - L0).double().mul_(-self.eta * 2.0 ** -_LOSS_BITS).exp_()[:, None]
            num, den = num + expert(k) * w, den + w
            sums[:, k].index_add_(0, key, ql)
            if pending is not None:
                pending.append(ql)
        sums[:, K].index_add_(0, key, torch.ones_like(key))
        if pending is not None:           # (streaming) for update(): this score's losses, committed there
            self._pending = (tgt, bucket, torch.stack(pending + [torch.ones_like(key)]))
        return num / den

    def learned(self, sums=None) -> str:
        """What rule online learned, one line: per bucket with targets ("k,h": longest context k, entropy
        bin h), its targets, the expert of largest weight and network 0 alone's weight (with J > 1 networks,
        also each network's share of the weight, its experts' names ending in /j). sums: loss sums
        [buckets, K+1] (default: those of the last score_stream, else the ones committed by update)."""
        sums = (self.stream_sums if self.stream_sums is not None else self._sums) if sums is None else sums
        J = self.networks
        names = [n + (f"/{j}" if J > 1 else "") for j in range(J)
                 for n in ["net"] + [f"g{g:g}b{b:g}" for b in self.betas for g in self.grid[1:]] + ["default"]]
        nh, out = self.edges.numel() + 1, []
        for i in (sums[:, -1] > 0).nonzero().squeeze(1).tolist():
            bins = "/".join(str(i // nh ** j % nh) for j in range(J))
            L = sums[i, :-1].cpu()
            w = torch.softmax(-(L - L.min()).double() * (self.eta * 2.0 ** -_LOSS_BITS), 0)
            k, share = int(w.argmax()), "/".join(f"{v:.2f}" for v in w.view(J, -1).sum(1).tolist())
            out.append(f"{i // nh ** J},{bins}:{int(sums[i, -1])}:{names[k]}@{w[k]:.2f},net@{w[0]:.2f}"
                       + (f",nets@{share}" if J > 1 else ""))
        edges = ",".join(f"{e:g}" for e in self.edges.tolist())
        return (f"experts:{self.n_experts} buckets(context,H bin{'s' if J > 1 else ''} of {edges or 'none'} nats):targets:best@weight,"
                f"net@weight{',nets@share' if J > 1 else ''} " + " ".join(out))

    # --- whole-stream path ------------------------------------------------------------------
    def score_stream(self, tokens, logp_y, entropy, chunk: int):
        """NLL [N-1] (nats) of the targets tokens[1:] of a whole known stream, bitwise what this
        mixer's settings give streaming from an empty state: update(tokens[:1]), then for each
        chunk of `chunk` targets: score_from_net with full contexts, update(those targets).
        So target i is scored against the history tokens[0 .. h_i - 1], h_i = the position of
        the first target of its chunk. logp_y, entropy: [J, N-1] (J = networks; [N-1] for one). Uses no state, changes none (rule
        online leaves its final loss sums in stream_sums, for learned()).
        Counts come from one stable sort per gram length: sorted by (key, position), the history
        count of the gram at p is the number of its group's members before p's own chunk (for
        contexts, chunks shifted by one position since they end at the input token)."""
        s = tokens.to(self.device).long().reshape(-1)
        _check_tokens(s, self.V, "tokens")
        N, K = s.numel(), self.max_order
        if chunk < 1 or N < 2:
            raise ValueError(f"need chunk >= 1 and N >= 2 tokens, got {chunk}, {N}")
        pnets, Hs = self._per_net(logp_y, N - 1, "logp_y").exp()[..., None], self._per_net(entropy, N - 1, "entropy")
        pos = torch.arange(N, device=self.device)
        i = pos[1:]                                                      # target positions
        h = ((i - 1) // chunk) * chunk + 1                               # history size at scoring
        tc = torch.zeros(N - 1, K, dtype=torch.int64, device=self.device)   # c(gram of L ending at i), L = col+1
        cc = torch.zeros(N - 1, K - 1, dtype=torch.int64, device=self.device)   # followed c(gram of L ending at i-1)
        hi = torch.zeros(N, dtype=torch.int64, device=self.device)
        lo = torch.zeros(N, dtype=torch.int64, device=self.device)
        o_lo = None
        for L in range(1, K + 1):
            j = L - 1
            older = F.pad(s, (j, 0))[:N]                                 # s[p - j] (0 before the start)
            fit = pos >= j                                               # gram of length L ends at p
            if self._is_lo[j]:        # hi is just the length tag: sort by lo (non-fitting: own keys)
                lo = lo + (older << self._sh_lo[j])
                ka = kb = torch.where(fit, lo, -1 - pos)
                o = torch.argsort(ka, stable=True)
            else:                     # lo (the newest tokens) no longer changes: sort it once
                hi = hi + (older << self._sh_hi[j])
                ka, kb = torch.where(fit, hi + L, -1), lo
                o_lo = torch.argsort(lo, stable=True) if o_lo is None else o_lo
                o = o_lo[torch.argsort(ka[o_lo], stable=True)]
            sa, sb = ka[o], kb[o]
            new = torch.ones(N, dtype=torch.bool, device=self.device)
            new[1:] = (sa[1:] != sa[:-1]) | (sb[1:] != sb[:-1])
            gstart = torch.where(new, pos, 0).cummax(0).values           # group start, in sorted order

            def count(cid):   # per position p: #{p' before p's chunk cid(p): key(p') = key(p)}
                c = cid[o]
                sub = new.clone()
                sub[1:] |= c[1:] != c[:-1]
                out = torch.empty(N, dtype=torch.int64, device=self.device)
                out[o] = torch.where(sub, pos, 0).cummax(0).values - gstart
                return out

            tc[:, j] = count(torch.div(pos - 1, chunk, rounding_mode="floor"))[1:] * (i >= j)
            if L < K:
                cc[:, j] = count(torch.div(pos, chunk, rounding_mode="floor"))[:-1] * (i - 1 >= j)
        del hi, lo, o_lo, o, ka, kb, sa, sb, new, gstart, older, fit    # the sorts' arrays: memory for the rule
        p1 = (tc[:, :1].double() + 1.0) / (h[:, None] + self.V)
        learn = self.rule == "online" and (None, None, torch.zeros_like(self._sums))
        p = self._combine(pnets, Hs, cc, p1, lambda need: tc[:, None, 1:], learn or None)
        self.stream_sums = learn[2] if learn else None
        return (-torch.log(p)).reshape(-1).to(torch.promote_types(logp_y.dtype, torch.float32))
