"""Cold starts against device memory-time, one point per policy and parameter setting (issue
#13's plot), from the records of the fourteenth and fifteenth sessions' confirmations; no new
simulation.

Each run is divided by its own seed's LRU + 10 min (device memory-time and cold-start ratio),
so seeds of different sizes share one pair of axes; a setting's point is the mean of those
per-seed ratios over the seeds it ran on (``n`` beside it: the bracket walk of
``bench/predict-bracket.py`` runs some prices on a few seeds only, so the points of a family are
not all over the same seeds). LRU + 10 min is (1, 1) by construction. The stars are the
confirmations' primary figures, ours' family interpolated at each reference's own device
memory-time on each seed (``predict._interpolate``, never extrapolated) and averaged as the
per-seed ratios: at x = 1, ours at LRU's memory-time; at the hybrid's mean x, ours at the
hybrid's memory-time, drawn against LRU's cold starts (its label gives the ratio to the hybrid,
the figure the goal is judged on).

    python bench/predict-plot-s15.py --out bench/predict-s15.png \\
        --set 'ours-l1 (fifteenth session C, seeds 110-129)=bench/predict-confirm-s15a.json,bench/predict-confirm-s15b.json' \\
        --set 'ours-f1 (fourteenth session C, seeds 90-109)=bench/predict-confirm-s14.json'
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import predict  # bench/predict.py, found through the path above

LRU = "lru+ka-10min"


def _by_seed(paths: Sequence[str]) -> dict[int, dict[str, Mapping[str, Any]]]:
    out: dict[int, dict[str, Mapping[str, Any]]] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["runs"]:
            out.setdefault(int(r["seed"]), {})[str(r["label"])] = r
    return out


def points(paths: Sequence[str]) -> dict[str, Any]:
    """Per label: mean normalised (memory-time, cold starts) and n; per reference: ours'
    family interpolated at its memory-time (mean x, mean y over LRU, mean ratio, n)."""
    seeds = _by_seed(paths)
    per_label: dict[str, list[tuple[float, float]]] = {}
    at: dict[str, list[tuple[float, float, float]]] = {}
    for labels in seeds.values():
        if LRU not in labels:
            continue
        x0 = float(labels[LRU]["device_gb_s"])
        y0 = float(labels[LRU]["cold_start_ratio"])
        for label, r in labels.items():
            per_label.setdefault(label, []).append(
                (float(r["device_gb_s"]) / x0, float(r["cold_start_ratio"]) / y0)
            )
        curves = predict._curves(
            {k: (float(r["device_gb_s"]), float(r["cold_start_ratio"])) for k, r in labels.items()}
        )
        ours = [name for name in curves if name.startswith("ours")]
        for reference in predict.REFERENCES:
            if reference not in labels or len(ours) != 1:
                continue
            x = float(labels[reference]["device_gb_s"])
            y = predict._interpolate(curves[ours[0]], x)
            base = float(labels[reference]["cold_start_ratio"])
            if y is not None and base > 0:
                at.setdefault(reference, []).append((x / x0, y / y0, y / base))
    return {
        "labels": {
            label: {
                "x": statistics.fmean(p[0] for p in pts),
                "y": statistics.fmean(p[1] for p in pts),
                "n": len(pts),
            }
            for label, pts in per_label.items()
        },
        "at": {
            ref: {
                "x": statistics.fmean(p[0] for p in pts),
                "y": statistics.fmean(p[1] for p in pts),
                "ratio": statistics.fmean(p[2] for p in pts),
                "n": len(pts),
            }
            for ref, pts in at.items()
        },
    }


def _price(label: str) -> float:
    return next(float(p[1:]) for p in label.split("-") if predict._is_price(p))


def plot(sets: Mapping[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    colours = iter(["tab:red", "tab:blue", "tab:purple", "tab:brown"])
    for i, (name, data) in enumerate(sets.items()):
        labels = data["labels"]
        colour = next(colours)
        for ref, marker, text in ((LRU, "o", "LRU + 10 min"), ("hybrid", "s", "hybrid")):
            if ref in labels:
                p = labels[ref]
                ax.plot(
                    p["x"],
                    p["y"],
                    marker=marker,
                    color="black" if ref == LRU else colour,
                    markerfacecolor="none" if i else None,
                    linestyle="none",
                    label=f"{text} ({name.split(' (')[1].rstrip(')')})",
                )
        ours = sorted((k for k in labels if k.startswith("ours")), key=_price)
        xs = [labels[k]["x"] for k in ours]
        ys = [labels[k]["y"] for k in ours]
        ax.plot(xs, ys, marker="^", color=colour, label=f"{name}: one point per price")
        for k, x, y in zip(ours, xs, ys, strict=True):
            ax.annotate(
                f"p{_price(k):g} (n={labels[k]['n']})",
                (x, y),
                fontsize=7,
                color=colour,
                xytext=(4, 3),
                textcoords="offset points",
            )
        for ref, p in data["at"].items():
            ax.plot(p["x"], p["y"], marker="*", markersize=13, color=colour, linestyle="none")
            short = "LRU + 10 min" if ref == LRU else "the hybrid"
            ax.annotate(
                f"{p['ratio']:.3f}x {short}\nat its memory-time (n={p['n']})",
                (p["x"], p["y"]),
                fontsize=7,
                color=colour,
                fontweight="bold",
                xytext=(-110, -4) if ref == LRU else (-115, 6),
                textcoords="offset points",
            )
    ax.set_xlabel("device memory-time / LRU + 10 min's (same seed), mean over seeds")
    ax.set_ylabel("cold-start ratio / LRU + 10 min's (same seed), mean over seeds")
    ax.set_yscale("log")
    ax.set_title(
        "Cold starts vs device memory-time, per policy and price (simulator, orcbench hour,\n"
        "12 x 80 GB; stars: ours interpolated at a reference's memory-time, the goals' figure)",
        fontsize=9,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", action="append", required=True, metavar="NAME=FILE[,FILE]")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", type=Path, help="the points drawn, for the record")
    args = p.parse_args(argv)
    sets = {}
    for spec in args.set:
        name, _, files = spec.partition("=")
        sets[name] = points(files.split(","))
    plot(sets, args.out)
    if args.json:
        args.json.write_text(json.dumps(sets, indent=1) + "\n")
    print(json.dumps(sets, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
