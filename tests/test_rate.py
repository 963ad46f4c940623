"""Rate control (issue 23) and the export's clocks and collectives (issue 22, items 3, 4 and 7's export part).

Expectations come from elsewhere: the allocation against an exhaustive search, the candidates against the uniform
export's own clip search and against plain rounding written out here, the distortion against the loss change it
estimates computed from the activations themselves, the calibration gradients against the gradients of a zero
perturbation added to each output (a parameter's .grad, not a tensor hook), and the totals against the files on disk."""
from __future__ import annotations

import itertools
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, frozen_code, log_value, make_dataset, run_cli, run_two_ranks, tiny_env_for
import artifact_codec as ac
import train_gpt as tg

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread in this module
CPU = types.SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))


def tiny_model(seed=0, **env):
    args = tg.Hyperparameters(dict(dict(NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", VE_LAYERS="1",
                                        XSA_LAST_N="1", BIGRAM_DIM="8", VE_DIM="8", ROPE_DIMS="8", TRAIN_SEQ_LEN="16"), **env), "cpu")
    torch.manual_seed(seed)
    model = tg.build_model(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim < 2 else p.size(-1) ** -0.5)
    return args, model


# ----------------------------------------------------------------------------- the allocation
def brute_force(D, B, budget):
    """The least total distortion over every combination of candidates whose bytes fit."""
    best = None
    for combo in itertools.product(*[range(len(d)) for d in D]):
        if sum(b[c] for b, c in zip(B, combo)) <= budget:
            d = sum(dm[c] for dm, c in zip(D, combo))
            best = d if best is None else min(best, d)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_at_every_lagrange_point_and_always_fits(seed):
    """At a budget equal to the bytes of a Lagrange multiplier's choice (each matrix minimizing D + lam * B) the
    allocation finds the exhaustive optimum; at any budget it fits and leaves no hull step that would still fit."""
    g = torch.Generator().manual_seed(seed)
    D, B = [], []
    for _ in range(4):
        b = sorted(torch.randint(10, 200, (5,), generator=g).tolist())
        D.append([float(x) for x in (1000 / torch.tensor(b, dtype=torch.float64) + torch.rand(5, generator=g, dtype=torch.float64) * 3)])
        B.append([float(x) for x in b])
    for lam in (0.01, 0.1, 0.3, 1.0, 3.0, 10.0):
        budget = sum(b[min(range(len(d)), key=lambda c: (d[c] + lam * b[c], b[c]))] for d, b in zip(D, B))
        choice, total = ac.allocate(D, B, budget)
        assert total <= budget and sum(d[c] for d, c in zip(D, choice)) == pytest.approx(brute_force(D, B, budget))
    for budget in torch.randint(int(sum(min(b) for b in B)), int(sum(max(b) for b in B)), (10,), generator=g).tolist():
        choice, total = ac.allocate(D, B, budget)
        assert total == sum(b[c] for b, c in zip(B, choice)) <= budget
        for d, b, c in zip(D, B, choice):
            hull = ac.lower_hull(d, b)
            assert c in hull and (c == hull[-1] or total + b[hull[hull.index(c) + 1]] - b[c] > budget)


def test_lower_hull_by_hand():
    """(bytes, D): (1, 10) (2, 5) (3, 4.9) (4, 1) (5, 2): (3, 4.9) lies above the chord (2,5)-(4,1), (5, 2) is dominated."""
    assert ac.lower_hull([10, 5, 4.9, 1, 2], [1, 2, 3, 4, 5]) == [0, 1, 3]


# ----------------------------------------------------------------------------- the candidates
def test_step_candidates_are_rounding_at_t_times_the_row_rms():
    """Without GPTQ, candidate i is round(w / s) with s = STEPS[i] * rms(row) in fp16, codes within +-127; the
    clip candidates are the uniform export's clip search at each width; the last is w in fp16."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g) * torch.linspace(0.1, 2, 24)[:, None]
    c = ac.candidates(w, {}, False, 0.01, 128)
    assert len(c["labels"]) == len(c["D"]) == len(c["pred"]) == len(ac.STEPS) + len(ac.WIDTHS) + 1
    for i, t in enumerate(ac.STEPS):
        s = (t * w.square().mean(1).sqrt()).half()
        assert torch.equal(c["scale"][i], s)
        assert torch.equal(c["q"][i], torch.clamp(torch.round(w / s.float()[:, None]), -127, 127).to(torch.int8))
    for j, b in enumerate(ac.WIDTHS):
        q, s = ac.quantize_rows(w, 2 ** (b - 1) - 1)
        assert torch.equal(c["q"][len(ac.STEPS) + j], q) and torch.equal(c["scale"][len(ac.STEPS) + j], s)
    assert torch.equal(ac.entry(c, len(c["D"]) - 1)["value"], w.half())
    assert c["D"][0] == pytest.approx((w - c["q"][0] * c["scale"][0].float()[:, None]).square().sum().item(), rel=1e-6)


def test_gptq_clip_candidates_equal_the_uniform_export():
    """With H and per-row gradient weights g, each width's clip candidate is what quantize_rows (RATE_CONTROL=0's rule,
    rows chosen by e H e^T alone) gives: the weights g scale whole rows, so they cannot change a row's choice."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(600, 24, generator=g) @ torch.randn(24, 24, generator=g)
    w = torch.randn(16, 24, generator=g) / 5
    st = {"H": (X.T @ X).double(), "g": torch.rand(16, generator=g, dtype=torch.float64) + 0.1, "n": 600}
    c = ac.candidates(w, st, True, 0.01, 8)
    for j, b in enumerate(ac.WIDTHS):
        q, s = ac.quantize_rows(w, 2 ** (b - 1) - 1, st["H"], 0.01, 8)
        assert torch.equal(c["q"][len(ac.STEPS) + j], q) and torch.equal(c["scale"][len(ac.STEPS) + j], s), b


def test_distortion_is_the_gradient_weighted_output_error():
    """row_distortion = sum_r (mean_t G_tr^2) ||X e_r||^2 + sum F * E^2, computed here from X, G and E directly."""
    g = torch.Generator().manual_seed(2)
    X, G = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(50, 4, generator=g, dtype=torch.float64)
    E, F_ = torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g, dtype=torch.float64)
    st = {"H": X.T @ X, "g": G.square().sum(0), "n": 50, "F": F_}
    want = G.square().mean(0) * (X @ E.double().T).square().sum(0) + (F_ * E.double().square()).sum(1)
    torch.testing.assert_close(ac.row_distortion(E, st), want, rtol=1e-5, atol=0)


def test_calibration_gradients_are_the_outputs_gradients():
    """collect_stats(fisher): g = sum over positions of (dL/dy)^2 per output channel of every linear layer and of the
    tied head's logits, F = (dL/d out)^2 summed into the embedding rows read, for L the summed next-token loss;
    expected values from zero perturbations added to every output (their .grad), the whole batch at once."""
    args, model = tiny_model()
    tokens = torch.randint(0, 1024, (8 * 2 * 16,), generator=torch.Generator().manual_seed(3))
    stats = tg.collect_stats(model, tokens, 16, CPU, True)
    x = tokens.view(-1, 16)
    deltas, hooks = {}, []
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and not n.startswith("mtp_heads."):
            def add(mod, inp, out, n=n):
                deltas[n] = (torch.zeros_like(out, requires_grad=True), inp[0])
                return out + deltas[n][0]
            hooks.append(m.register_forward_hook(add))
    h = model.hidden(x)
    for hk in hooks:
        hk.remove()
    dz = torch.zeros(x.size(0), 15, 1024, requires_grad=True)
    z = F.linear(h[:, :-1], model.tok_emb.weight) + dz
    F.cross_entropy(tg.softcap(z, model.softcap).flatten(0, 1), x[:, 1:].flatten(), reduction="sum").backward()
    for n, (d, inp) in deltas.items():
        st = stats[n + ".weight"]
        if isinstance(model.get_submodule(n), torch.nn.Linear):
            torch.testing.assert_close(st["g"], d.grad.double().square().flatten(0, -2).sum(0), rtol=1e-4, atol=1e-9)
        else:
            want = torch.zeros(st["F"].shape, dtype=torch.float64).index_add_(0, inp.flatten(), d.grad.double().square().flatten(0, -2))
            torch.testing.assert_close(st["F"], want, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(stats["tok_emb.weight"]["g"], dz.grad.double().square().flatten(0, 1).sum(0), rtol=1e-4, atol=1e-9)
    hh = h[:, :-1].detach().flatten(0, 1).double()
    torch.testing.assert_close(stats["tok_emb.weight"]["H"], hh.T @ hh, rtol=1e-5, atol=1e-6)
    assert stats["tok_emb.weight"]["n"] == tokens.numel() and "F" in stats["tok_emb.weight"]


# ----------------------------------------------------------------------------- CLI: landing on the target
@pytest.fixture(scope="module")
def landed(tmp_path_factory, sample_paths):
    """Tiny runs with a frozen copy of the code: the uniform export's natural total, then rate-controlled runs."""
    root = tmp_path_factory.mktemp("rate")
    data = make_dataset(root / "data", sample_paths)
    code = frozen_code(root)
    env = tiny_env_for(data, sample_paths)
    nat = run_cli(env, root, script=code / "train_gpt.py", RUN_ID="natural", RATE_CONTROL=0)
    assert nat.returncode == 0, nat.stdout[-2000:] + nat.stderr[-2000:]
    return types.SimpleNamespace(root=root, code=code, env=env, natural=total_of(nat.stdout), out=nat.stdout)


def total_of(text):
    return int(re.search(r"^Total submission size int6\+lzma: (\d+) bytes$", text, re.M).group(1))


def finals(text):
    return [re.sub(r" eval_time:\S+", "", l) for l in text.splitlines() if l.startswith("final_int6_")]


@pytest.mark.parametrize("frac", [0.6, 1.0, 1.15])
def test_rate_control_lands_within_half_a_percent_under_the_target(landed, frac):
    """TARGET_BYTES from 60% to 115% of the uniform export's total: the files + code are <= the target and within 0.5%
    of it; EVAL_ONLY on the artifact reproduces the final lines digit for digit."""
    target = round(frac * landed.natural)
    p = run_cli(landed.env, landed.root, script=landed.code / "train_gpt.py", RUN_ID=f"t{frac}", TARGET_BYTES=target)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    total, artifact = total_of(p.stdout), landed.root / "artifacts" / f"t{frac}.ptz"
    assert total == artifact.stat().st_size + int(log_value(p.stdout, "code_bytes:", "code_bytes"))
    assert 0.995 * target <= total <= target, (total, target)
    assert re.search(rf"^rate_control total:{total} target:{target} ", p.stdout, re.M)
    rounds = [l for l in p.stdout.splitlines() if l.startswith("rate_search round:")]
    assert 1 <= len(rounds) <= ac.SEARCH_ROUNDS
    if frac == 1.0:
        again = run_cli(landed.env, landed.root, script=landed.code / "train_gpt.py", RUN_ID="again", EVAL_ONLY=1, ARTIFACT=str(artifact))
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert len(finals(p.stdout)) == 4 and finals(again.stdout) == finals(p.stdout)


def test_below_the_floor_exits_4_and_names_the_floor(landed):
    """A target under what every matrix's smallest encoding takes: the smallest artifact is kept as .OVER_CAP.ptz,
    evaluated, and the over_cap line gives its total (the floor); exit 4."""
    code = int(log_value(landed.out, "code_bytes:", "code_bytes"))
    p = run_cli(landed.env, landed.root, script=landed.code / "train_gpt.py", RUN_ID="floor", TARGET_BYTES=code + 1000)
    assert p.returncode == 4, p.stdout[-2000:] + p.stderr[-2000:]
    kept = landed.root / "artifacts" / "floor.OVER_CAP.ptz"
    over = [l for l in p.stdout.splitlines() if l.startswith("over_cap:")]
    assert len(over) == 1 and "floor" in over[0] and "NOT a valid submission" in over[0]
    floor = int(re.search(r"total (\d+) bytes exceeds", over[0]).group(1))
    assert floor == total_of(p.stdout) == kept.stat().st_size + code > code + 1000
    assert len(finals(p.stdout)) == 4 and p.stdout.splitlines()[-1].endswith("NOT a valid submission (over_cap)")


# ----------------------------------------------------------------------------- 2 gloo ranks, a slow compressor
EXPORT = '''import os, sys, threading, time, torch
sys.path.insert(0, sys.argv[1])
import artifact_codec as ac
import train_gpt as tg
fast, one_at_a_time = ac.compress, threading.Lock()


def slow(data):  # a deliberately slow compressor: SLOW_S per call, calls one at a time whatever the cores
    with one_at_a_time:
        time.sleep(float(os.environ["SLOW_S"]))
    return fast(data)


ac.compress = slow
args = tg.Hyperparameters()
ctx = tg.DistContext(args)
torch.manual_seed(0)
model = tg.build_model(args)
with torch.no_grad():  # every weight random (the init zeroes some projections)
    for p in model.parameters():
        p.normal_(0, 0.3 if p.ndim < 2 else p.size(-1) ** -0.5)
stream = tg.TokenStream(args.data_path + "/fineweb_train_*.bin", args.vocab_size)
t0 = time.perf_counter()
print(tg.export(model, args, stream, ctx, print if ctx.rank == 0 else (lambda m: None), sys.argv[2], 50000, 0.0))
print(f"rank {ctx.rank} export_s:{time.perf_counter() - t0:.1f}")
tg.dist.destroy_process_group() if ctx.world > 1 else None
'''


@pytest.mark.parametrize("rate_control", [1, 0])
def test_slow_compressor_stalls_no_collective_and_ranks_agree(tmp_path, sample_paths, rate_control):
    """Every compression sleeps SLOW_S, one at a time; the size search is forced (a target under the natural total)
    and takes longer than COLLECTIVE_TIMEOUT_SECONDS: 2 gloo ranks still finish (the search runs alike on both ranks,
    with no collective), and their artifact is byte for byte the one a single process writes."""
    data = make_dataset(tmp_path / "data", sample_paths)
    (tmp_path / "export.py").write_text(EXPORT)
    env = tiny_env_for(data, sample_paths, GPTQ_CALIB_TOKENS=4096, SLOW_S=0.2 if rate_control else 0.03,
                       COLLECTIVE_TIMEOUT_SECONDS=2, RATE_CONTROL=rate_control, TARGET_BYTES=170000 if rate_control else 250000)
    cmd = [str(tmp_path / "export.py"), str(ROOT)]
    one = run_cli(env, tmp_path, [str(ROOT), "one"], script=tmp_path / "export.py")
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    two = run_two_ranks([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         *cmd, "two"], tmp_path, env, timeout=180)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    searched = r"^rate_search round:1 " if rate_control else r"^(fit_to_cap:|over_cap: .* with FIT_MAX_FRACTION zeroed)"
    assert re.search(searched, one.stdout, re.M) and re.search(searched, two.stdout, re.M), one.stdout[-2000:]
    slowest = max(float(v) for v in re.findall(r"export_s:(\S+)", two.stdout))
    assert slowest > 2, two.stdout  # longer than the collective timeout
    (a,), (b,) = ([f.read_bytes() for f in (tmp_path / "artifacts").glob(f"{run}*.ptz")] for run in ("one", "two"))
    assert a == b


# ----------------------------------------------------------------------------- bf16 autocast on CPU
def test_export_under_bf16_autocast(monkeypatch, tmp_path):
    """The export (calibration with its backward pass, the candidates' GPTQ, the search) with autocast active in bf16,
    as on a GPU: it writes a readable artifact; the statistics stay within bf16's precision of the float32 ones."""
    args, model = tiny_model(seed=6, TARGET_BYTES="200000")
    tokens = torch.randint(0, 1024, (8 * 2 * 16,), generator=torch.Generator().manual_seed(7))
    ref = tg.collect_stats(model, tokens, 16, CPU, True)
    monkeypatch.setattr(tg, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    low = tg.collect_stats(model, tokens, 16, CPU, True)
    assert all(v.dtype == torch.float64 for st in low.values() for k, v in st.items() if k != "n")
    for n, st in ref.items():
        for k in ("H", "g", "F"):
            if k in st:
                assert (low[n][k] - st[k]).norm() <= 0.05 * st[k].norm() + 1e-12, (n, k)
    monkeypatch.chdir(tmp_path)
    stream = types.SimpleNamespace(take=lambda n: tokens[:n])
    ctx = types.SimpleNamespace(rank=0, world=1, device=torch.device("cpu"), broadcast=lambda o: o)
    args.gptq_calib_tokens, lines = tokens.numel(), []
    path, over = tg.export(model, args, stream, ctx, lines.append, "bf16", 0, 0.0)
    assert not over and (tmp_path / path).stat().st_size <= 200000
    meta, state = tg.load_artifact(path)
    assert set(state) == {k for k in model.state_dict() if not k.startswith("mtp_heads.")}


# ----------------------------------------------------------------------------- the training clock
def test_training_clock_line_and_the_loud_line_when_the_reserve_is_overrun(tmp_path, sample_paths):
    """MAX_WALLCLOCK_SECONDS=3 with GPTQ_RESERVE_SECONDS=0: calibration + quantization overrun the reserve: one
    WARNING line says by how much and which reserve would have fit; training + calibration + quantization are logged
    as one number."""
    data = make_dataset(tmp_path / "data", sample_paths)
    env = tiny_env_for(data, sample_paths, RUN_ID="clock", ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=3, GPTQ_RESERVE_SECONDS=0)
    p = run_cli(env, tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    line = [l for l in p.stdout.splitlines() if l.startswith("training_clock")]
    assert len(line) == 1
    parts = {k: float(log_value(line[0], "training_clock", k).rstrip("s")) for k in ("train", "calibration", "quantize", "total")}
    assert parts["total"] == pytest.approx(parts["train"] + parts["calibration"] + parts["quantize"], abs=0.21)  # 4 roundings
    assert parts["train"] > 0 and "max_wallclock:3s" in line[0]  # training stops before a step would pass 3 s
    warn = [l for l in p.stdout.splitlines() if l.startswith("WARNING: calibration+quantization took")]
    assert len(warn) == 1 and "over GPTQ_RESERVE_SECONDS=0.0 by" in warn[0], p.stdout[-3000:]
    took, fit = float(re.search(r"took (\S+)s", warn[0]).group(1)), int(re.search(r"GPTQ_RESERVE_SECONDS=(\d+) would have fit", warn[0]).group(1))
    assert 0 <= took and took - 0.05 <= fit < took + 1.05  # took is rounded to 0.1 s, fit = ceil of the unrounded time


def test_candidates_seconds_times_one_matrix_per_shape(monkeypatch):
    """The reserve's estimate: each distinct shape timed once (a fake clock that the work advances by rows x cols
    microseconds), every matrix of that shape charged that time."""
    clock, timed = [0.0], []

    def work(w, st, gptq, damp, block):
        timed.append((tuple(w.shape), gptq, tuple(st["H"].shape)))
        clock[0] += w.numel() * 1e-6

    monkeypatch.setattr(ac, "candidates", work)
    monkeypatch.setattr(ac.time, "perf_counter", lambda: clock[0])
    shapes = [torch.Size([64, 32]), torch.Size([64, 32]), torch.Size([32, 96]), torch.Size([64, 32])]
    assert ac.candidates_seconds(shapes, "cpu", True, 0.01, 128) == pytest.approx(3 * 64 * 32e-6 + 32 * 96e-6)
    assert sorted(timed) == [((32, 96), True, (96, 96)), ((64, 32), True, (32, 32))]


def test_reserve_raised_to_the_timed_candidates_unless_set(tmp_path, sample_paths):
    """With a training cap and GPTQ_RESERVE_SECONDS left at its default, the run times the candidates once before
    training (here made to report 0.5 s a matrix) and raises the reserve to 1.5x that when the default would
    not hold it; an explicit GPTQ_RESERVE_SECONDS is kept as set."""
    data = make_dataset(tmp_path / "data", sample_paths)
    wrapper = tmp_path / "slow_candidates.py"
    wrapper.write_text(f"import runpy, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport artifact_codec\n"
                       "artifact_codec.candidates_seconds = lambda shapes, *a: 0.5 * len(shapes)\n"
                       f"sys.argv[0] = {str(ROOT / 'train_gpt.py')!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = tiny_env_for(data, sample_paths, RUN_ID="auto", ITERATIONS=2, MAX_WALLCLOCK_SECONDS=100)
    n = sum(t.ndim == 2 and not k.startswith("mtp_heads.") for k, t in tg.build_model(tg.Hyperparameters(
        {k: v for k, v in env.items() if k in {h.name for h in tg.HPARAMS}}, "cpu")).state_dict().items())
    need = 1.5 * 0.5 * n
    assert need > 10  # the default reserve would not hold it
    p = run_cli(env, tmp_path, script=wrapper)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"GPTQ_RESERVE_SECONDS 10.0 -> {need:.1f}" in p.stdout
    assert f"gptq_reserve:{need}s training_cap:{100 - need}s" in p.stdout
    kept = run_cli(env, tmp_path, script=wrapper, RUN_ID="kept", GPTQ_RESERVE_SECONDS=10)
    assert kept.returncode == 0 and "candidates timed" not in kept.stdout and "gptq_reserve:10.0s training_cap:90.0s" in kept.stdout
