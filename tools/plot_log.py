"""Plot a training log: loss vs train time, and the mixer's running BPB vs tokens scored.

Usage: python tools/plot_log.py logs/X.txt [--out docs/X.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from make_submission import RunLog, parse_log  # noqa: E402


def plot_run(run: RunLog, out: Path) -> None:
    """Write a two-panel PNG for one parsed log."""
    fig, (loss_ax, mix_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    title = run.get("run_id") or run.path.stem
    fig.suptitle(f"{title} ({run.get('device')}, {run.get('dataset')}, seed {run.get('seed')})")

    if run.train_points:
        t, loss = zip(*run.train_points)
        loss_ax.plot(t, loss, label="train loss", lw=1.2)
    if run.val_points:
        t, loss, _ = zip(*run.val_points)
        loss_ax.plot(t, loss, "o-", label="val loss", ms=4)
    loss_ax.set_xlabel("train time (s)")
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.set_title("Training")
    loss_ax.grid(alpha=0.3)
    if run.train_points or run.val_points:
        loss_ax.legend()

    if run.mixer_points:
        tokens, bpb = zip(*run.mixer_points)
        mix_ax.plot([n / 1e6 for n in tokens], bpb, label="mixer running BPB", lw=1.2)
    if run.neural_bpb is not None:
        mix_ax.axhline(run.neural_bpb, color="gray", ls="--",
                       label=f"neural-only sliding BPB {run.neural_bpb:.4f}")
    if not run.mixer_points and run.neural_bpb is None:
        mix_ax.text(0.5, 0.5, "no mixer pass in this log", ha="center", va="center",
                    transform=mix_ax.transAxes)
    else:
        mix_ax.legend()
    mix_ax.set_xlabel("tokens scored (millions)")
    mix_ax.set_ylabel("bits per byte")
    mix_ax.set_title("Evaluation (n-gram mixer)")
    mix_ax.grid(alpha=0.3)

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log", type=Path, help="a training log (logs/<RUN_ID>.txt)")
    parser.add_argument("--out", type=Path, help="PNG path (default: docs/<log name>.png)")
    args = parser.parse_args(argv)
    run = parse_log(args.log)
    if not (run.train_points or run.val_points or run.mixer_points):
        print(f"refused: {args.log}: no step or mixer_pass lines to plot", file=sys.stderr)
        return 1
    out = args.out or Path("docs") / f"{args.log.stem}.png"
    plot_run(run, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
