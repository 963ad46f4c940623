"""The uniform export (issue 15, RATE_CONTROL=0): GPTQ against independent expectations, the artifact layout,
fit-to-cap, the GPTQ reserve. (Rate control, 1 == 2 ranks, the clock lines: tests/test_rate.py.)

Expectations: the layer's output error computed from X directly (not through H), GPTQ written as what it is
meant to compute (each column rounded after the later columns were re-fitted by least squares to the errors
of the earlier ones, solved from scratch at every column), bitwise tensor equality, and file sizes on disk."""
from __future__ import annotations

import math
import re
import types

import brotli
import pytest
import torch

from conftest import artifact_of, frozen_code, log_value, make_dataset, run_cli, tiny_env_for
import artifact_codec as ac
import train_gpt as tg


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread in this module


def correlated_layer(rows=48, cols=64, n=4000, seed=0):
    """(W, X): weights with a few outliers, inputs whose columns are strongly correlated and unevenly scaled."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols // 4, generator=g) @ torch.randn(cols // 4, cols, generator=g)
    X = X + 0.3 * torch.randn(n, cols, generator=g)
    X = X * torch.linspace(0.2, 3.0, cols)
    W = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    W[::5, :3] *= 8
    return W, X


def scale_at(w, qmax, quantile):
    """The per-row scale of one clip candidate: the row's |w| quantile / qmax, in fp16."""
    return (torch.quantile(w.abs(), quantile, dim=1) / qmax).half()


def sequential_least_squares(w, H, s, qmax):
    """GPTQ's target, brute force: columns in order of decreasing diag(H); before rounding column j, the columns
    j.. are re-fitted to minimize (w - ŵ) H (w - ŵ)^T given the rounded columns before j (a fresh solve)."""
    order = torch.argsort(H.diag(), descending=True, stable=True)
    Hp, wp, sf = H[order][:, order].double(), w.double()[:, order], s.double()[:, None]
    Q = torch.zeros_like(wp)
    for j in range(wp.size(1)):
        ef = wp[:, :j] - Q[:, :j] * sf  # errors of the rounded columns
        rest = wp[:, j:] + torch.linalg.solve(Hp[j:, j:], Hp[j:, :j] @ ef.T).T if j else wp
        Q[:, j] = torch.clamp(torch.round(rest[:, 0] / sf[:, 0]), -qmax, qmax)
    return Q[:, torch.argsort(order)]


@pytest.mark.parametrize("block", [1, 5, 128])
def test_gptq_equals_sequential_least_squares(block):
    W, X = correlated_layer(rows=12, cols=16, n=300)
    H = (X.T @ X).double()
    s = scale_at(W, 7, 0.9999)
    q = ac.gptq_rows(W, H, s, 7, block, 0.0)
    ref = sequential_least_squares(W, H, s, 7)
    assert torch.equal(q, ref.float())
    assert not torch.equal(q, torch.clamp(torch.round(W / s.float()[:, None]), -7, 7))  # the propagation mattered


def test_gptq_two_columns_by_hand():
    """2 columns, H = [[4, 2], [2, 2]] (diag 4 first): column 0 rounds 0.3 -> 0 (s = 1), error 0.3; the optimal
    continuous update of column 1 is w1 + e0 * H10/H11 = 0.4 + 0.3 = 0.7, which rounds to 1 (plain rounding: 0)."""
    H = torch.tensor([[4.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    q = ac.gptq_rows(torch.tensor([[0.3, 0.4]]), H, torch.tensor([1.0]), 7, 128, 0.0)
    assert q.tolist() == [[0.0, 1.0]]


def test_gptq_with_identity_hessian_is_plain_rounding():
    W, _ = correlated_layer()
    eye = torch.eye(W.size(1), dtype=torch.float64)
    s = scale_at(W, 31, 0.9995)
    assert torch.equal(ac.gptq_rows(W, eye, s, 31, 16, 0.01), torch.clamp(torch.round(W / s.float()[:, None]), -31, 31))
    q, scale = ac.quantize_rows(W, 31, eye, 0.01, 16)  # the clip choice in the loop reduces to the clip search
    q_clip, scale_clip = ac.quantize_rows(W, 31)
    assert torch.equal(q, q_clip) and torch.equal(scale, scale_clip)


def test_gptq_keeps_per_row_the_scale_of_least_output_error():
    """With H, each row's scale is the clip candidate whose GPTQ result has the least e H e^T (each candidate run alone)."""
    W, X = correlated_layer(n=2000)
    H = (X.T @ X).double()
    q, s = ac.quantize_rows(W, 7, H, 0.01, 16)
    runs = []
    for qt in ac.CLIP_QUANTILES:
        sc = scale_at(W, 7, qt)
        e = W.double() - ac.gptq_rows(W, H, sc, 7, 16, 0.01).double() * sc.double()[:, None]
        runs.append((sc, ((e @ H) * e).sum(1)))
    best = torch.stack([r[1] for r in runs]).argmin(0)
    assert torch.equal(s, torch.stack([r[0] for r in runs])[best, torch.arange(len(best))])
    assert len(set(best.tolist())) > 1  # the choice differs between rows


@pytest.mark.parametrize("qmax", [31, 7])
def test_gptq_reduces_the_layer_output_error(qmax):
    """||X W^T - X Ŵ^T||^2 from X itself, on held-out rows of X (the Hessian saw the other rows only)."""
    W, X = correlated_layer(n=6000)
    fit, held = X[:3000], X[3000:]
    err = lambda q, s: ((held @ W.T - held @ ac.dequantize_rows(q, s).T).square().sum() / (held @ W.T).square().sum()).item()
    clip = err(*ac.quantize_rows(W, qmax))
    gptq = err(*ac.quantize_rows(W, qmax, (fit.T @ fit).double(), 0.01, 16))
    assert gptq < 0.7 * clip, (gptq, clip)


@pytest.mark.parametrize("bits", [4, 6])
def test_quant_bits_sets_the_int6_group_width(bits):
    """QUANT_BITS=b: the attention/MLP codes use all of, and stay in, [-(2^(b-1)-1), 2^(b-1)-1]; int8 stays int8."""
    args = tg.Hyperparameters(dict(NUM_LAYERS="2", MODEL_DIM="128", NUM_HEADS="2", NUM_KV_HEADS="1", VE_LAYERS="1",
                                   XSA_LAST_N="1", BIGRAM_DIM="8", VE_DIM="8", ROPE_DIMS="8", QUANT_BITS=str(bits), RATE_CONTROL="0"), "cpu")
    torch.manual_seed(0)
    model = tg.build_model(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    qs = ac.quantize_state(model.state_dict(), bits=args.quant_bits)
    six = max(int(e["q"].abs().max()) for e in qs.values() if e["kind"] == "int6")
    eight = max(int(e["q"].abs().max()) for e in qs.values() if e["kind"] == "int8")
    assert six == {4: 7, 6: 31}[bits] and eight == 127


def test_hessians_are_the_input_gram_matrices():
    """collect_stats' H == X^T X of each linear layer's input, captured by an independent forward hook."""
    args = tg.Hyperparameters(dict(NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", VE_LAYERS="1",
                                   XSA_LAST_N="1", BIGRAM_DIM="8", VE_DIM="8", ROPE_DIMS="8", TRAIN_SEQ_LEN="16"), "cpu")
    torch.manual_seed(0)
    model = tg.build_model(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    tokens = torch.randint(0, 1024, (8 * 2 * 16,))
    ctx = types.SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))
    H = {n: st["H"] for n, st in tg.collect_stats(model, tokens, 16, ctx, False).items() if "H" in st}
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.setdefault(n, []).append(inp[0].reshape(-1, inp[0].size(-1))))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model.hidden(tokens.view(-1, 16))
    for h in hooks:
        h.remove()
    assert set(H) == {n for n in model.state_dict() if n.endswith(ac.INT6_SUFFIXES)} | {"bigram_proj.weight", "ve_proj.weight"}
    for name, h in H.items():
        x = torch.cat(seen[name[:-7]]).double()
        torch.testing.assert_close(h, x.T @ x, rtol=1e-5, atol=1e-6)
    assert torch.equal(H["blocks.0.attn.k.weight"], H["blocks.0.attn.q.weight"])  # one input, summed alike
    assert not torch.equal(H["blocks.0.attn.q.weight"], H["blocks.0.attn.proj.weight"])


def test_layout_roundtrips_every_tensor_bitwise():
    """The file is the magic, then length-prefixed brotli streams: the rest (header, floats byte-shuffled), then one per
    quantized tensor (tag 0, codes, shuffled scales; or tag 1, shuffled fp16 values); read_artifact gives them back."""
    g = torch.Generator().manual_seed(0)
    qstate = {"a.weight": {"kind": "int6", "q": torch.randint(-31, 32, (7, 5), generator=g, dtype=torch.int8),
                           "scale": torch.rand(7, generator=g).half()},
              "emb": {"kind": "int8", "q": torch.randint(-127, 128, (9, 4), generator=g, dtype=torch.int8),
                      "scale": torch.rand(9, generator=g).half()},
              "mat": {"kind": "float", "value": torch.randn(3, 6, generator=g).half()},
              "vec": {"kind": "float", "value": torch.randn(11, generator=g)},
              "scalar": {"kind": "float", "value": torch.tensor(0.05)},
              "b.weight": {"kind": "q", "value": torch.randn(2, 3, generator=g).half()},
              "c.weight": {"kind": "q", "q": torch.randint(-3, 4, (4, 2), generator=g, dtype=torch.int8),
                           "scale": torch.rand(4, generator=g).half()}}
    args = tg.Hyperparameters({}, preset="cpu")
    raw = artifact_of(qstate, args.meta())
    assert raw[:8] == ac.ARTIFACT_MAGIC
    streams, pos = [], 8
    while pos < len(raw):
        n = int.from_bytes(raw[pos:pos + 4], "little")
        streams.append(brotli.decompress(raw[pos + 4:pos + 4 + n]))
        pos += 4 + n
    assert len(streams) == 1 + 4 and len(streams[0].split(b"\n", 1)[1]) == 2 * 18 + 4 * 11 + 4
    assert streams[1] == b"\x00" + qstate["a.weight"]["q"].numpy().tobytes() + qstate["a.weight"]["scale"].view(torch.uint8).view(-1, 2).T.numpy().tobytes()
    assert streams[3] == b"\x01" + qstate["b.weight"]["value"].view(torch.uint8).view(-1, 2).T.numpy().tobytes()
    meta, back = ac.read_artifact(raw)
    assert meta == {"arch": args.arch(), "config_hash": args.config_hash()} and list(back) == list(qstate)
    for name, e in qstate.items():
        assert set(back[name]) == set(e) and back[name]["kind"] == e["kind"], name
        for key, t in e.items():
            if key != "kind":
                assert back[name][key].dtype == t.dtype and torch.equal(back[name][key], t), (name, key)
    with pytest.raises(ac.ArtifactError):
        ac.read_artifact(raw[:-3])


def test_fit_zeroes_the_cheapest_ones_first_and_fits():
    """fit_int6 zeroes a prefix of the ±1s ordered by s_row^2 * H_jj (computed here independently), as few as fit."""
    g = torch.Generator().manual_seed(0)
    q = torch.clamp(torch.round(torch.randn(64, 96, generator=g) * 2), -31, 31).to(torch.int8)
    scale, h = torch.rand(64, generator=g).half() + 0.1, torch.rand(96, generator=g).double() + 0.1
    qstate = {"w": {"kind": "int6", "q": q, "scale": scale}, "f": {"kind": "float", "value": torch.ones(3)}}
    size = 4 + len(ac.compress(ac.stream_bytes(qstate["w"])))
    streams, k, nbytes = ac.fit_int6(qstate, {"w": {"H": torch.diag(h)}}, size - 100, 0.2)
    assert streams is not None and nbytes == 4 + len(streams["w"]) <= size - 100 and 0 < k <= 0.2 * q.numel()
    out = ac.decode_stream(brotli.decompress(streams["w"]), [64, 96])
    zeroed = (q.abs() == 1) & (out["q"] == 0)
    assert zeroed.sum() == k and torch.equal(out["q"][~zeroed], q[~zeroed]) and torch.equal(out["scale"], scale)
    cost = (scale.float()[:, None] ** 2 * h.float()[None, :])
    assert cost[zeroed].max() <= cost[(q.abs() == 1) & ~zeroed].min()  # the cheapest first
    assert ac.fit_int6(qstate, {"w": {"H": torch.diag(h)}}, size - 100, 0.001)[0] is None  # 0.1% cannot save 100 B


# ----------------------------------------------------------------------------- CLI: fit to the cap
@pytest.fixture(scope="module")
def unfitted(tmp_path_factory, sample_paths):
    """One tiny uniform-export run (RATE_CONTROL=0) at the default TARGET_BYTES, with a frozen copy of the code (its
    sizes are what the runs count)."""
    root = tmp_path_factory.mktemp("fit")
    data = make_dataset(root / "data", sample_paths)
    code = frozen_code(root)
    env = tiny_env_for(data, sample_paths, RATE_CONTROL=0)
    p = run_cli(env, root, script=code / "train_gpt.py", RUN_ID="free")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    total = int(re.search(r"^Total submission size int6\+lzma: (\d+) bytes$", p.stdout, re.M).group(1))
    return types.SimpleNamespace(root=root, code=code, env=env, total=total, out=p.stdout)


CUT = 150  # bytes under the unfitted total: well above the tens of bytes the header's config hash may change it by


def finals(text):
    return [re.sub(r" eval_time:\S+", "", l) for l in text.splitlines() if l.startswith("final_int6_")]


def test_fit_to_cap_total_is_the_files_and_under_target_and_eval_only_reproduces(unfitted):
    target = unfitted.total - CUT
    p = run_cli(unfitted.env, unfitted.root, script=unfitted.code / "train_gpt.py", RUN_ID="fit", TARGET_BYTES=target)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    total = int(re.search(r"^Total submission size int6\+lzma: (\d+) bytes$", p.stdout, re.M).group(1))
    artifact = unfitted.root / "artifacts" / "fit.ptz"
    names = [f.split("=")[0] for f in log_value(p.stdout, "code_bytes:", "files").split(",")]
    assert total == artifact.stat().st_size + len(tg.pack_code(names, unfitted.code)) <= target
    fit = re.search(r"^fit_to_cap: total (\d+) -> (\d+) bytes zeroed:(\d+)/(\d+) int6 values", p.stdout, re.M)
    # before: about the unfitted run's total (TARGET_BYTES is in the config hash the header stores: its 12 hex
    # digits compress differently, by tens of bytes)
    assert fit and abs(int(fit.group(1)) - unfitted.total) < CUT and int(fit.group(2)) == total and int(fit.group(3)) > 0, p.stdout[-3000:]
    assert int(fit.group(3)) <= 0.02 * int(fit.group(4))
    again = run_cli(unfitted.env, unfitted.root, script=unfitted.code / "train_gpt.py", RUN_ID="fit_again", EVAL_ONLY=1,
                    ARTIFACT=str(artifact))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert len(finals(p.stdout)) == 4 and finals(again.stdout) == finals(p.stdout)
    assert finals(p.stdout) != finals(unfitted.out)  # the zeroed values changed the model


def test_over_cap_keeps_the_model_evaluates_it_and_exits_4(unfitted):
    target = unfitted.total - CUT
    p = run_cli(unfitted.env, unfitted.root, script=unfitted.code / "train_gpt.py", RUN_ID="over", TARGET_BYTES=target,
                FIT_MAX_FRACTION="0.0001")
    assert p.returncode == 4, p.stdout[-2000:] + p.stderr[-2000:]
    kept = unfitted.root / "artifacts" / "over.OVER_CAP.ptz"
    assert kept.is_file() and not (unfitted.root / "artifacts" / "over.ptz").exists()
    (_, kept_state), (_, free_state) = (tg.load_artifact(str(unfitted.root / "artifacts" / f)) for f in ("over.OVER_CAP.ptz", "free.ptz"))
    assert all(torch.equal(kept_state[k], free_state[k]) for k in free_state)  # the unfitted model, whole
    over = [l for l in p.stdout.splitlines() if l.startswith("over_cap:")]
    assert len(over) == 1 and "NOT a valid submission" in over[0] and "MLP_MULT" in over[0]
    total, by = map(int, re.search(rf"total (\d+) bytes exceeds TARGET_BYTES={target} by (\d+) ", over[0]).groups())
    assert total - target == by > 0
    logged = int(re.search(r"^Total submission size int6\+lzma: (\d+) bytes$", p.stdout, re.M).group(1))
    assert logged == total == kept.stat().st_size + len(tg.pack_code(["train_gpt.py", "artifact_codec.py"], unfitted.code))
    assert finals(p.stdout) == finals(unfitted.out)  # evaluated, and it is the unfitted model
    assert re.match(r"run_complete total_time:\S+ NOT a valid submission \(over_cap\)$", p.stdout.splitlines()[-1])


# ----------------------------------------------------------------------------- the training clock
# (1 rank == 2 gloo ranks, byte for byte, with a slow compressor: tests/test_rate.py)
def test_gptq_reserve_comes_off_the_training_clock(tmp_path, sample_paths):
    """MAX_WALLCLOCK_SECONDS=4 with GPTQ_RESERVE_SECONDS=3: training stops at the 1 s cap, not at 4 s, before a step
    that would end past it (at the last step's pace): the stopping line's own numbers, whatever the machine's speed."""
    data = make_dataset(tmp_path / "data", sample_paths)
    env = tiny_env_for(data, sample_paths, RUN_ID="reserve", ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=4, GPTQ_RESERVE_SECONDS=3)

    def stop(out: str, cap_ms: int):
        line = next(l for l in out.splitlines() if l.startswith("stopping_early"))
        got = dict(kv.split(":", 1) for kv in line.split()[1:] if ":" in kv)
        ended, nxt, step = float(got["train_time"][:-2]), float(got["next_step_end"][:-2]), int(got["step"].split("/")[0])
        assert got["cap"] == f"{cap_ms}ms" and nxt >= cap_ms and (ended < cap_ms or step == 1), line  # step 1 always runs

    p = run_cli(env, tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "gptq_reserve:3.0s training_cap:1.0s" in p.stdout
    stop(p.stdout, 1000)
    clip = run_cli(env, tmp_path, RUN_ID="no_reserve", QUANT="clip", RATE_CONTROL=0)  # no calibration: nothing reserved
    assert clip.returncode == 0 and "gptq_reserve:" not in clip.stdout
    stop(clip.stdout, 4000)
