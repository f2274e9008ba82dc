"""The report's defenses section: per model, a methods x benchmarks table with attack success and over-refusal side by
side and the change against ``direct``, and the threshold sweeps found next to the runs.

Attack success comes from a run's own harmful prompts; over-refusal from its benign prompts (XSTest) or, for a
benchmark of harmful prompts only, from its benign counterpart (``BenchmarkSpec.benign``: XSTest's safe prompts in
the matching mode) answered by the same model and method. The metrics are the benchmarks' own
(``llava.eval.metrics``): ``attack_success_rate`` and ``over_refusal_rate`` of their ``--json`` output.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava.ecso.defenses import defense_names
from llava.eval.benchmarks import get_benchmark

__all__ = ["RunRates", "methods_table", "sweep_lines", "TWO_SIDED_METRICS"]

logger = logging.getLogger(__name__)
TWO_SIDED_METRICS = ("safety", "refusal")  # metrics whose --json carries attack_success_rate / over_refusal_rate


@dataclass(frozen=True)
class RunRates:
    """One judged run's two rates (``Rate.to_dict`` form, or None), with what identifies it."""

    model_id: str
    benchmark: str
    mode: str | None
    method: str
    attack: dict[str, Any] | None
    over: dict[str, Any] | None
    judge: tuple
    path: str


def _name(benchmark: str, mode: str | None) -> str:
    return f"{benchmark} ({mode})" if mode else benchmark


def _pct(d: dict | None) -> str:
    return "-" if not d or d.get("rate") is None else f"{100 * d['rate']:.1f}"


def _delta(d: dict | None, base: dict | None) -> float | None:
    if not d or not base or d.get("rate") is None or base.get("rate") is None:
        return None
    return 100 * (d["rate"] - base["rate"])


def _cell(d: dict | None, base: dict | None, is_base: bool) -> str:
    delta = _delta(d, base)
    return _pct(d) + ("" if is_base or delta is None else f" ({delta:+.1f})")


def _over_refusal(r: RunRates, index: dict[tuple, RunRates]) -> tuple[dict | None, str]:
    """The run's over-refusal and where it comes from: its own benign prompts, or its counterpart's."""
    if r.over is not None:
        return r.over, f"its own benign prompts ({_name(r.benchmark, r.mode)})"
    benign = get_benchmark(r.benchmark).benign
    mode = benign.mode_for(r.mode) if benign else None
    other = index.get((r.model_id, benign.benchmark, mode, r.method)) if benign and mode else None
    source = f"{_name(benign.benchmark, mode)}, {benign.summary}" if benign and mode else "no benign counterpart"
    return (other.over if other else None), source


def _judge_warnings(model: str, runs: list[RunRates], columns: list[tuple], index: dict[tuple, RunRates]) -> list[str]:
    """A warning per method judged otherwise than ``direct`` in the same column (ECSO against direct on
    MM-SafetyBench / VLSafe is already warned about by the report's direct vs ECSO section)."""
    out = []
    for bench, mode in columns:
        base = index.get((model, bench, mode, "direct"))
        for r in runs:
            if (r.benchmark, r.mode) != (bench, mode) or base is None or r is base or not (r.judge and base.judge):
                continue
            paired = r.method == "ecso" and get_benchmark(bench).metric == "safety"
            if r.judge != base.judge and not paired:
                out.append(f"{model}, {_name(bench, mode)}: {r.method} was judged {r.judge}, direct {base.judge}; "
                           "their rates are NOT comparable")
    return out


def methods_table(runs: list[RunRates], out: Path) -> tuple[list[str], list[str]]:
    """Markdown lines (one table per model) and warnings; writes ``methods.csv`` (one row per model, benchmark, mode
    and method)."""
    order = {name: i for i, name in enumerate(defense_names())}
    index: dict[tuple, RunRates] = {}
    lines, warnings, flat = [], [], []
    for r in runs:
        key = (r.model_id, r.benchmark, r.mode, r.method)
        if key in index:
            warnings.append(f"{r.model_id}, {_name(r.benchmark, r.mode)}, {r.method}: two runs ({index[key].path}, "
                            f"{r.path}); the table shows the second")
        index[key] = r
    for model in sorted({r.model_id for r in runs}):
        mine = [r for r in runs if r.model_id == model]
        columns = sorted({(r.benchmark, r.mode) for r in mine}, key=lambda c: (c[0], str(c[1])))
        methods = sorted({r.method for r in mine}, key=lambda m: (order.get(m, len(order)), m))
        lines += [f"### {model}", "", "Attack success (harmful prompts) / over-refusal (benign prompts), % ; in "
                  "parentheses the change against `direct` in points. Over-refusal of a benchmark of harmful prompts "
                  "only comes from its benign counterpart (below the table).", ""]
        head = " | ".join(f"{_name(b, m)} ASR | over-refusal" for b, m in columns)
        lines += [f"| method | {head} |", "|---" * (1 + 2 * len(columns)) + "|"]
        sources: dict[tuple, str] = {}
        for method in methods:
            cells = []
            for bench, mode in columns:
                r, base = index.get((model, bench, mode, method)), index.get((model, bench, mode, "direct"))
                if r is None:
                    cells += ["-", "-"]
                    continue
                over, source = _over_refusal(r, index)
                base_over = _over_refusal(base, index)[0] if base else None
                sources[(bench, mode)] = source
                cells += [_cell(r.attack, base and base.attack, method == "direct"),
                          _cell(over, base_over, method == "direct")]
                flat.append({"model": model, "benchmark": bench, "mode": mode, "method": method,
                             "attack_success_rate": r.attack and r.attack["rate"], "over_refusal_rate":
                             over and over["rate"], "over_refusal_from": source,
                             "delta_attack_success": _delta(r.attack, base and base.attack),
                             "delta_over_refusal": _delta(over, base_over), "answers": r.path})
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += [""] + [f"- over-refusal of {_name(b, m)}: {s}" for (b, m), s in sources.items()] + [""]
        warnings += _judge_warnings(model, mine, columns, index)
    if flat:
        with open(out / "methods.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
        lines.append("CSV: `methods.csv`\n")
    return lines, warnings


def sweep_lines(folders: list[Path], out: Path) -> list[str]:
    """The sweeps (``sweep.json`` from ``python -m llava.eval.sweep``) under the run folders: their recommendation
    and their two plots, copied into the report folder."""
    lines = []
    for n, path in enumerate(p for folder in folders for p in sorted(folder.rglob("sweep.json"))):
        summary = json.loads(path.read_text(encoding="utf-8"))
        best = summary["recommended"]
        row = best["row"]
        met = "meets" if best["met_target"] else "cannot meet"
        lines += [f"### Threshold sweep: {', '.join(summary.get('models', []))} (`{path.parent}`)", "",
                  f"{summary['n_harmful']} harmful and {summary['n_benign']} benign prompts. Recommended threshold "
                  f"**{best['threshold']:g}** ({met} over-refusal <= {100 * best['target_over_refusal']:g}%): attack "
                  f"success {_pct(row['attack_success_rate'])}%, over-refusal {_pct(row['over_refusal_rate'])}%, flag "
                  f"rate {_pct(row['flag_rate'])}%; the runs used {summary['run_threshold']:g}.", ""]
        for png in summary.get("plots", []):
            if (path.parent / png).is_file():
                shutil.copyfile(path.parent / png, out / f"sweep{n}_{png}")
                lines.append(f"![{png}](sweep{n}_{png})")
        lines.append("")
    return lines
