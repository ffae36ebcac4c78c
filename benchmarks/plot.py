"""Plots of benchmark_results.csv: runtime vs generated tokens, speedup and throughput per mode.

    python -m benchmarks.plot benchmark_results.csv --out plots/ [--run-id ID]

The speedup and throughput charts show one invocation of test_alpaca.py (its rows
share a run_id): the given one, else the latest with the most modes. The runtime
chart shows every run of that invocation's model and device. Speedups are
relative to the no-cache mode when the run has one, else to its slowest mode.
Needs matplotlib (the `bench` extra).
"""

import argparse
import sys
from pathlib import Path

from .results_csv import read_runs


def _pick_run(rows: list[dict], run_id: str | None) -> list[dict]:
    if run_id is not None:
        picked = [r for r in rows if r["run_id"] == run_id]
        if not picked:
            raise ValueError(f"no rows with run_id {run_id!r}")
        return picked
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["run_id"], []).append(r)
    # the latest run among those with the most modes: a comparison says more than a single run
    return max(reversed(list(runs.values())), key=len)


def plot_runtime_vs_tokens(rows, ax):
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    for mode in dict.fromkeys(r["mode"] for r in rows):
        points = [(int(r["output_tokens"]), float(r["wall_s"])) for r in rows if r["mode"] == mode]
        ax.scatter(*zip(*points), label=mode)
    ax.set(xlabel="generated tokens", ylabel="wall time (s)", title="Runtime vs generated tokens")
    # from zero tokens: one run alone still reads as a rate
    ax.set_xlim(0, 1.1 * max(int(r["output_tokens"]) for r in rows))
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, alpha=0.3)
    ax.legend()


def _bars(ax, labels, values, fmt):
    # slim bars, kept slim when there are few of them
    bars = ax.bar(labels, values, width=0.5, color=[f"C{i}" for i in range(len(labels))])
    pad = max(0, 3 - len(labels)) / 2  # as wide as three slots, centred
    ax.set_xlim(-0.75 - pad, len(labels) - 0.25 + pad)
    ax.bar_label(bars, [fmt(v) for v in values], padding=2)
    ax.margins(y=0.15)
    ax.grid(True, axis="y", alpha=0.3)


def plot_speedup(run, ax):
    if len(run) == 1:  # a speedup needs two modes: say so rather than draw a 1.0x bar
        r = run[0]
        ax.text(0.5, 0.5, f"{r['mode']}: {float(r['output_tok_s']):,.0f} output tok/s\n\n"
                "one mode in this run, so no speedup to show:\nrun test_alpaca.py --compare",
                ha="center", va="center", transform=ax.transAxes, fontsize=12)
        ax.set_axis_off()
        ax.set_title(f"Speedup per mode ({r['experiment']}, {r['num_prompts']} prompts)")
        return
    baseline = next((r for r in run if r["mode"] == "no-cache"), None) \
        or min(run, key=lambda r: float(r["output_tok_s"]))
    speedups = [float(r["output_tok_s"]) / float(baseline["output_tok_s"]) for r in run]
    _bars(ax, [r["mode"] for r in run], speedups, lambda v: f"{v:.1f}x")
    ax.set(ylabel=f"output tokens/s relative to {baseline['mode']}",
           title=f"Speedup per mode ({run[0]['experiment']}, {run[0]['num_prompts']} prompts)")


def plot_throughput(run, ax):
    _bars(ax, [r["mode"] for r in run], [float(r["output_tok_s"]) for r in run], lambda v: f"{v:.0f}")
    ax.set(ylabel="output tokens/s",
           title=f"Throughput per mode ({run[0]['experiment']}, {run[0]['device']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="results CSV written by test_alpaca.py")
    parser.add_argument("--out", default="plots", help="directory for the PNG files")
    parser.add_argument("--run-id", help="the invocation to chart speedup and throughput for")
    args = parser.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        parser.error("plotting needs matplotlib: pip install -e '.[bench]'")
    try:
        rows = read_runs(args.csv)
        if not rows:
            raise ValueError(f"{args.csv} has no rows")
        run = _pick_run(rows, args.run_id)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    same_setup = [r for r in rows if (r["model"], r["device"]) == (run[0]["model"], run[0]["device"])]
    for name, draw, data in (("runtime_vs_tokens", plot_runtime_vs_tokens, same_setup),
                             ("speedup", plot_speedup, run), ("throughput", plot_throughput, run)):
        fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
        draw(data, ax)
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)
        print(out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
