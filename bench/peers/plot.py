"""The peer benchmark's figures as one PNG: a row per model family.

Columns: latency (warm p50/p99, Zipf p99, cold start; log scale), throughput (warm and
Zipf, closed loop), and open-loop p99 latency against offered rate, with the share of
failed requests next to any point where it is 1% or more (latency is of successes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"gpufaas": "#1b7837", "ray": "#2166ac", "triton": "#b2182b"}


def plot_report(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(report["families"])
    fig, axes = plt.subplots(len(families), 3, figsize=(13, 3.2 * len(families)), squeeze=False)
    for row, family in enumerate(families):
        figures = report["families"][family]["figures"]
        systems = list(figures)
        width = 0.8 / max(1, len(systems))

        ax = axes[row][0]
        keys = [
            ("warm_p50_ms", "warm p50"),
            ("warm_p99_ms", "warm p99"),
            ("zipf_p99_ms", "Zipf p99"),
            ("cold_ms", "cold"),
        ]
        for i, system in enumerate(systems):
            values = [figures[system].get(k) or 0 for k, _ in keys]
            ax.bar(
                [x + i * width for x in range(len(keys))],
                values,
                width,
                label=system,
                color=COLORS.get(system),
            )
        ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(keys))])
        ax.set_xticklabels([label for _, label in keys])
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(f"{family}: latency (lower is better)", fontsize=9)
        ax.legend(fontsize=7)

        ax = axes[row][1]
        keys = [("throughput_rps", "warm"), ("zipf_throughput_rps", "Zipf")]
        for i, system in enumerate(systems):
            values = [figures[system].get(k) or 0 for k, _ in keys]
            ax.bar(
                [x + i * width for x in range(len(keys))],
                values,
                width,
                label=system,
                color=COLORS.get(system),
            )
        ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(keys))])
        ax.set_xticklabels([label for _, label in keys])
        ax.set_ylabel("req/s")
        ax.set_title(f"{family}: closed-loop throughput, N clients", fontsize=9)

        ax = axes[row][2]
        for system in systems:
            entry = report["systems"].get(system, {}).get("families", {}).get(family, {})
            points = [
                (p["offered_rps"], p["p99_ms"], p["errors"] / max(1, p["count"] + p["errors"]))
                for p in entry.get("open_loop") or []
                if p.get("p99_ms") is not None
            ]
            if points:
                xs, ys, failed = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=system, color=COLORS.get(system))
                for x, y, share in zip(xs, ys, failed, strict=True):
                    if share >= 0.01:  # p99 is of the successful requests only: say so
                        ax.annotate(
                            f"{share:.0%} failed",
                            (x, y),
                            fontsize=6,
                            color=COLORS.get(system),
                            textcoords="offset points",
                            xytext=(3, -9),
                        )
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (req/s, Poisson, Zipf mix)")
        ax.set_ylabel("p99 ms")
        ax.set_title(f"{family}: open loop", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"gpufaas vs Ray Serve (multiplexed) vs PyTriton - {report['date']}, "
        f"{report['machine']['cores']} cores",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
