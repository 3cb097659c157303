"""The quickstart's closing summary and loss curve, read from the training log.

Parses the Megatron log lines (`` iteration N/M | ... | lm loss: X | ... | tokens/s: T |``) that
``mindlora.train`` prints, the per-stage times the quickstart recorded, and writes the loss curve
as a PNG (matplotlib, Agg backend) next to the log.

    python examples/quickstart/summary.py --log logs/tune.log --times OUT/stage_times.tsv \
        --png logs/loss_curve.png [--file LABEL=PATH ...]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics

LINE = re.compile(r"^ iteration +(\d+)/ *(\d+) \|.*\| lm loss: ([0-9.E+-]+) \|"
                  r".*\| tokens/s: ([0-9.]+) \|")


def parse_log(path: str) -> list[tuple[int, float, float]]:
    """(iteration, lm loss, tokens/s) of every logged training iteration, in order."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE.match(line.rstrip("\n"))
            if m:
                rows.append((int(m[1]), float(m[3]), float(m[4])))
    if not rows:
        raise SystemExit(f"{path}: no ' iteration N/M | ... lm loss' lines (did training run?)")
    return rows


def read_times(path: str) -> list[tuple[str, float]]:
    """(stage, seconds) rows of the tab-separated file the quickstart appends to."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            name, _, sec = line.rstrip("\n").rpartition("\t")
            try:
                rows.append((name, float(sec)))
            except ValueError:
                raise SystemExit(f"{path}:{n}: expected 'stage<TAB>seconds', got {line!r}")
    return rows


def plot(rows: list[tuple[int, float, float]], png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    its, losses = [r[0] for r in rows], [r[1] for r in rows]
    ax.plot(its, losses, marker=".", linewidth=1, alpha=0.6, label="per logged iteration")
    if len(rows) >= 20:  # per-iteration losses of small batches are noisy: show the trend too
        w = 10
        mean = [sum(losses[k - w + 1:k + 1]) / w for k in range(w - 1, len(losses))]
        ax.plot(its[w - 1:], mean, linewidth=2, label=f"mean of the last {w}")
        ax.legend()
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    tmp = png + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log", required=True)
    p.add_argument("--times", required=True)
    p.add_argument("--png", required=True)
    p.add_argument("--title", default="LoRA fine-tuning loss")
    p.add_argument("--file", action="append", default=[], metavar="LABEL=PATH")
    args = p.parse_args()
    rows = parse_log(args.log)
    plot(rows, args.png, args.title)
    speeds = [r[2] for r in rows[1:]] or [rows[0][2]]  # the first step includes warm-up
    times = read_times(args.times)
    print("=" * 72)
    print("quickstart summary")
    print(f"  loss            first {rows[0][1]:.4f} (iteration {rows[0][0]}) -> last "
          f"{rows[-1][1]:.4f} (iteration {rows[-1][0]})")
    if len(rows) >= 20:
        first, last = [r[1] for r in rows[:10]], [r[1] for r in rows[-10:]]
        print(f"                  mean of the first 10 logged {statistics.mean(first):.4f} -> "
              f"of the last 10 {statistics.mean(last):.4f}")
    print(f"  training speed  {statistics.median(speeds):.1f} tokens/s (median over "
          f"{len(speeds)} iterations; input tokens of all processes)")
    print("  time per stage")
    for name, sec in times:
        print(f"    {name:<62s} {sec:7.1f} s")
    print(f"    {'total':<62s} {sum(s for _, s in times):7.1f} s")
    print("  files")
    for item in args.file + [f"loss curve={args.png}", f"training log={args.log}"]:
        label, _, path = item.partition("=")
        print(f"    {label:<18s} {path}")
    print("=" * 72)


if __name__ == "__main__":
    main()
