"""The report's figures (PNG, matplotlib's Agg backend): per-scenario harmless rates and ECSO flag rates with 95%
intervals, the harm detector's ROC curve, and the threshold sweep's trade-off and utility curves."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llava.eval.metrics.safety import ALL, PAPER8

__all__ = ["safety_plots", "roc_plot", "sweep_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_values(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[list[float]]]:
    vals, err = [], [[], []]
    for r in rows:
        d = r.get(key)
        rate = 100 * d["rate"] if d and d["rate"] is not None else 0.0
        lo, hi = (100 * d["ci95"][0], 100 * d["ci95"][1]) if d and d["rate"] is not None else (rate, rate)
        vals.append(rate)
        err[0].append(rate - lo)
        err[1].append(hi - rate)
    return vals, err


def safety_plots(rows: list[dict[str, Any]], out: Path, name: str) -> list[str]:
    """Per-scenario harmless rates (direct vs ECSO, paper rule, 95% CI) and ECSO flag rates; PNG file names."""
    per = sorted((r for r in rows if r["mode"] == ALL), key=lambda r: (r["scenario"] in (ALL, PAPER8), r["scenario"]))
    labels = [r["scenario"].split("-")[0] for r in per]
    plt, files = _pyplot(), []
    x = list(range(len(per)))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(per) + 2), 4))
    for offset, side in ((-0.2, "direct"), (0.2, "ecso")):
        vals, err = _bar_values(per, f"harmless_{side}_paper")
        ax.bar([i + offset for i in x], vals, 0.4, yerr=err, capsize=2, label=side)
    ax.set_xticks(x, labels, rotation=45)
    ax.set_ylabel("harmless rate (%)")
    ax.set_ylim(0, 105)
    ax.set_title("harmless rate per scenario (paper rule, 95% CI)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}_scenarios.png", dpi=100)
    plt.close(fig)
    files.append(f"{name}_scenarios.png")
    if any(r["flag_rate_ecso"] for r in per):
        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(per) + 2), 4))
        vals, err = _bar_values(per, "flag_rate_ecso")
        ax.bar(x, vals, 0.6, yerr=err, capsize=2, color="tab:orange")
        ax.set_xticks(x, labels, rotation=45)
        ax.set_ylabel("answers replaced by ECSO (%)")
        ax.set_ylim(0, 105)
        ax.set_title("ECSO flag rate per scenario (95% CI)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"{name}_flags.png", dpi=100)
        plt.close(fig)
        files.append(f"{name}_flags.png")
    return files


def roc_plot(curve: Any, auc: float | None, out: Path, name: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(curve.fpr, curve.tpr, marker=".", label=f"harm_score (AUC {auc:.3f})" if auc is not None else "harm_score")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set_xlabel("false-alarm rate")
    ax.set_ylabel("recall of judge-harmful answers")
    ax.set_title("ECSO harm detector ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / f"{name}_roc.png", dpi=100)
    plt.close(fig)
    return f"{name}_roc.png"


def _rate_pct(row: dict[str, Any], key: str) -> float:
    value = row[key]["rate"]
    return float("nan") if value is None else 100 * value


def sweep_plots(rows: list[dict[str, Any]], run_threshold: float, recommended: float, out: Path) -> list[str]:
    """The threshold sweep's two figures: attack success vs over-refusal along the thresholds (the run's threshold
    and the recommended one marked), and the rates, the utility (or, without utility runs, the cost) vs threshold."""
    plt = _pyplot()
    ts = [r["threshold"] for r in rows]
    asr, over = [_rate_pct(r, "attack_success_rate") for r in rows], [_rate_pct(r, "over_refusal_rate") for r in rows]
    nearest = lambda t: min(range(len(ts)), key=lambda i: abs(ts[i] - t))  # noqa: E731
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(over, asr, marker=".", color="tab:blue", label="thresholds 0 to 1")
    for i in range(0, len(ts), max(1, len(ts) // 10)):
        ax.annotate(f"{ts[i]:g}", (over[i], asr[i]), fontsize=7, textcoords="offset points", xytext=(4, 2))
    for t, style, label in ((run_threshold, "s", "run's threshold"), (recommended, "*", "recommended")):
        i = nearest(t)
        ax.plot([over[i]], [asr[i]], style, markersize=11, label=f"{label} {ts[i]:g}")
    ax.set_xlabel("over-refusal on benign prompts (%)")
    ax.set_ylabel("attack success on harmful prompts (%)")
    ax.set_title("ECSO threshold sweep", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep_tradeoff.png", dpi=100)
    plt.close(fig)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    top.plot(ts, asr, label="attack success")
    top.plot(ts, over, label="over-refusal")
    top.plot(ts, [_rate_pct(r, "flag_rate") for r in rows], linestyle="--", label="flag rate")
    top.axvline(recommended, color="grey", linestyle=":")
    top.set_ylabel("%")
    top.legend(fontsize=8)
    keys = sorted({k for r in rows for k in r.get("utility", {})})
    for key in keys:  # as a share of the score with (almost) nothing flagged, so MME and MMBench share an axis
        values = [r["utility"].get(key) for r in rows]
        base = values[-1] or 1.0
        bottom.plot(ts, [None if v is None else 100 * v / base for v in values], label=key)
    if keys:
        bottom.set_ylabel("utility (% of threshold 1)")
        bottom.legend(fontsize=8)
    else:
        bottom.plot(ts, [r["seconds_per_sample"] for r in rows], color="tab:red")
        bottom.set_ylabel("seconds per sample")
    bottom.axvline(recommended, color="grey", linestyle=":")
    bottom.set_xlabel("threshold (flag when P(yes) >= threshold)")
    fig.tight_layout()
    fig.savefig(out / "sweep_utility.png", dpi=100)
    plt.close(fig)
    return ["sweep_tradeoff.png", "sweep_utility.png"]
