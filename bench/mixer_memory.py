"""Peak memory (and time) of the evaluation's mixer pass (BackoffNgramMixer.score_stream), per token, on CPU.

Each configuration runs in a fresh process: a random stream of --tokens tokens (V = 1024; the pass's arrays do
not depend on the tokens), then one score_stream with the record's mixer settings (rule online, orders 2..10,
chunks of 8192) and J networks; the peak resident memory it added (ru_maxrss after - before) / tokens is printed,
and that rate x 62,021,632 tokens as the full validation's estimate; with the pass's seconds (side by side:
one network against two). CPU tensors have the sizes the GPU's have;
the CUDA caching allocator adds some slack on top. --module-dir: import backoff_mixer from there (an older copy,
side by side).

    python bench/mixer_memory.py [--tokens 2000000] [--networks 1,2] [--module-dir DIR]
"""
import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VAL_TOKENS = 62_021_632
CHILD = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from backoff_mixer import BackoffNgramMixer
n, J = int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
s = torch.randint(0, 1024, (n,), generator=g)
lp, H = -4 * torch.rand(J, n - 1, generator=g), 6 * torch.rand(J, n - 1, generator=g)
kw = {"networks": J} if J > 1 else {}
m = BackoffNgramMixer(vocab_size=1024, max_order=10, rule="online", **kw)
before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
nll = m.score_stream(s, lp if J > 1 else lp[0], H if J > 1 else H[0], 8192)
after, t1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
print(json.dumps({"experts": m.n_experts, "peak_added_bytes": (after - before) * 1024, "seconds": t1 - t0}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--networks", default="1,2")
    ap.add_argument("--module-dir", default=str(ROOT))
    a = ap.parse_args(argv)
    for J in (int(j) for j in a.networks.split(",")):
        p = subprocess.run([sys.executable, "-c", CHILD, a.module_dir, str(a.tokens), str(J)], capture_output=True, text=True)
        if p.returncode:
            print(f"networks {J}: failed\n{p.stderr[-1500:]}")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        per = r["peak_added_bytes"] / a.tokens
        print(f"{a.module_dir}  networks {J}  experts {r['experts']}  {a.tokens:,} tokens: peak +{r['peak_added_bytes'] / 2**30:.2f} GiB"
              f" = {per:.0f} B/token -> {per * VAL_TOKENS / 2**30:.1f} GiB at {VAL_TOKENS:,} tokens; {r['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
