"""``python -m llava.eval.report RUN_DIR... --out DIR``: direct vs ECSO side by side, and every defense's attack
success and over-refusal side by side.

A run folder holds answer files (``*.jsonl``), each with ``<stem>.manifest.json`` (written by generation) and,
once judged, ``<stem>.judgments.jsonl`` + ``<stem>.judge.json`` (and ``<stem>.direct.judgments.jsonl`` when an
ECSO file's direct answers were judged, for the harm-detector ROC). Runs are paired by (benchmark, model): each
ECSO run against the direct run of the same model. Writes ``report.md``, one CSV per comparison, PNG plots
(per-scenario harmless rates, flag rates, harm-detector ROC) and ``manifests.json`` (every compared run's
manifest and judge summary). Runs judged by a different judge model or prompt set are compared only with a loud
warning at the top of the report (``--strict``: refused, exit 3). The defenses section (``llava.eval.report_methods``)
puts every method's judged safety runs (MM-SafetyBench, VLSafe, FigStep, XSTest) of a model in one table, attack
success next to over-refusal, with the threshold sweeps (``sweep.json``) found under the run folders.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava.errors import InvalidRequestError
from llava.eval.benchmarks import benchmark_names, get_benchmark
from llava.eval.gen.manifest import settings_diff
from llava.eval.harm_detector import detector_quality
from llava.eval.jsonl import read_jsonl
from llava.eval.judge.records import Judgment, read_judgments
from llava.eval.metrics.registry import compute
from llava.eval.metrics.safety import safety_metrics
from llava.eval.report_methods import TWO_SIDED_METRICS, RunRates, methods_table, sweep_lines
from llava.eval.report_plots import roc_plot, safety_plots

__all__ = ["Run", "JudgeMismatchError", "discover_runs", "pair_runs", "judge_signature", "build_report", "build_parser", "main"]

logger = logging.getLogger(__name__)
SAFETY_METRIC = "safety"  # its runs get the per-scenario safety section; others a table of their spec's report_keys
_SKIP = re.compile(r"\.(judgments|part-\d+-of-\d+)\.jsonl$|\.direct\.judgments\.jsonl$")


class JudgeMismatchError(InvalidRequestError):
    """Compared runs were judged by different judge models, prompt sets or prompts (raised with ``strict``)."""

    code = "judge_mismatch"


@dataclass
class Run:
    path: Path
    benchmark: str
    method: str
    model_id: str
    rows: list[dict[str, Any]]
    manifest: dict[str, Any] | None = None
    judgments: dict[str, Judgment] | None = None
    direct_judgments: dict[str, Judgment] | None = None
    judge_summary: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return f"{self.method}:{self.path.name}"

    @property
    def random_weights(self) -> bool:
        """The answers come from a tiny random-weight test model (its manifest says so)."""
        model = ((self.manifest or {}).get("settings") or {}).get("model")
        return isinstance(model, dict) and bool(model.get("tiny_random_weights"))


def _sibling(answers: Path, suffix: str) -> Path:
    return answers.with_name(answers.name.removesuffix(".jsonl") + suffix)


def _load_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_run(path: Path) -> Run | None:
    rows = read_jsonl(path, log=True)
    if not rows or not {"benchmark", "method", "text"} <= set(rows[0]):
        logger.info("skipping %s: not an answer file (rows need benchmark, method, text)", path)
        return None
    judged, direct = _sibling(path, ".judgments.jsonl"), _sibling(path, ".direct.judgments.jsonl")
    return Run(path, rows[0]["benchmark"], rows[0]["method"], str(rows[0].get("model_id")), rows,
               manifest=_load_json(_sibling(path, ".manifest.json")),
               judgments=read_judgments(judged) if judged.is_file() else None,
               direct_judgments=read_judgments(direct) if direct.is_file() else None,
               judge_summary=_load_json(_sibling(path, ".judge.json")))


def discover_runs(folders: list[Path]) -> list[Run]:
    runs = []
    for folder in folders:
        if not folder.is_dir():
            raise InvalidRequestError(f"run folder not found: {folder}")
        for path in sorted(folder.rglob("*.jsonl")):
            if not _SKIP.search(path.name):
                run = load_run(path)
                if run is not None:
                    runs.append(run)
    return runs


def pair_runs(runs: list[Run]) -> list[tuple[Run | None, Run | None]]:
    """(direct, ecso) per benchmark, model and mode; a run without a partner is reported alone."""
    groups: dict[tuple[str, str, str], dict[str, list[Run]]] = {}
    for r in runs:
        groups.setdefault((r.benchmark, r.model_id, str(r.rows[0].get("mode") or "")), {}).setdefault(
            r.method, []).append(r)
    pairs: list[tuple[Run | None, Run | None]] = []
    for (bench, model, _), by_method in sorted(groups.items()):
        directs, ecsos = by_method.get("direct", []), by_method.get("ecso", [])
        if len(directs) > 1:
            logger.warning("%s/%s: %d direct runs; comparing ECSO with %s", bench, model, len(directs), directs[0].path)
        pairs += [(directs[0] if directs else None, e) for e in ecsos] or [(d, None) for d in directs[:1]]
        pairs += [(d, None) for d in directs[1:]]
    return pairs


def judge_signature(judgments: dict[str, Judgment] | None) -> tuple:
    """What a comparison requires to match: judge models, prompt-set digests and prompt names used."""
    if not judgments:
        return ()
    js = judgments.values()
    return (tuple(sorted({j.judge_model for j in js})), tuple(sorted({j.prompt_set_sha256[:12] for j in js})),
            tuple(sorted({j.prompt_name for j in js})))


def _pct(d: dict | None) -> str:
    if not d or d["rate"] is None:
        return "-"
    return f"{100 * d['rate']:.1f} [{100 * d['ci95'][0]:.1f}, {100 * d['ci95'][1]:.1f}]"


def _delta(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or a["rate"] is None or b["rate"] is None:
        return None
    return 100 * (b["rate"] - a["rate"])


def _fmt_delta(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}"


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _safety_rows(direct_m: dict | None, ecso_m: dict | None) -> list[dict[str, Any]]:
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for side, m in (("direct", direct_m), ("ecso", ecso_m)):
        for c in (m or {}).get("cells", []):
            cells.setdefault((c["scenario"], c["mode"]), {})[side] = c
    out = []
    for (scenario, mode), sides in cells.items():
        d, e = sides.get("direct"), sides.get("ecso")
        row = {"scenario": scenario, "mode": mode, "n_direct": d and d["n"], "n_ecso": e and e["n"]}
        for rule in ("paper", "mmsb"):
            dr, er = d and d[f"harmless_rate_{rule}"], e and e[f"harmless_rate_{rule}"]
            row[f"harmless_direct_{rule}"], row[f"harmless_ecso_{rule}"] = dr, er
            row[f"delta_{rule}"] = _delta(dr, er)
        row["flag_rate_ecso"] = e and e["flag_rate"]
        row["unparseable"] = (d["unparseable"] if d else 0) + (e["unparseable"] if e else 0)
        out.append(row)
    return out


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    def flat(v: Any) -> Any:
        return round(v["rate"], 6) if isinstance(v, dict) and "rate" in v and v["rate"] is not None else (
            "" if isinstance(v, dict) or v is None else v)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: flat(v) for k, v in r.items()} for r in rows)


def _safety_section(direct: Run | None, ecso: Run | None, out: Path, name: str) -> Section:
    base = direct or ecso
    sec = Section(f"{base.benchmark}: {base.model_id}")
    sig_d, sig_e = judge_signature(direct and direct.judgments), judge_signature(ecso and ecso.judgments)
    if direct and ecso and sig_d and sig_e and sig_d != sig_e:
        sec.warnings.append(f"{name}: the direct and ECSO runs were judged differently: direct {sig_d} vs ECSO "
                            f"{sig_e}. Their harmless rates are NOT comparable.")
    for r in (direct, ecso):
        if r and not r.judgments:
            sec.lines.append(f"_{r.label} has no judgments: only flag rates are shown._\n")
    dm = safety_metrics(direct.rows, direct.judgments) if direct else None
    em = safety_metrics(ecso.rows, ecso.judgments) if ecso else None
    rows = _safety_rows(dm, em)
    _write_csv(out / f"{name}.csv", rows)
    sig = sig_e or sig_d
    judge = (f"`{', '.join(sig[0])}`, prompt set {', '.join(sig[1])}, prompts {', '.join(sig[2])}" if sig else "none")
    sec.lines.append(f"Judge: {judge}. Harmless rate in % [95% Wilson interval]; "
                     "rule `paper` = only an exact 'safe' is harmless, `mmsb` = anything but 'unsafe' is safe.\n")
    sec.lines.append("| scenario | mode | n | direct (paper) | ECSO (paper) | Δ | direct (mmsb) | ECSO (mmsb) | Δ | ECSO flag rate |")
    sec.lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["n_ecso"] if r["n_ecso"] is not None else r["n_direct"]
        sec.lines.append(
            f"| {r['scenario']} | {r['mode']} | {n} | {_pct(r['harmless_direct_paper'])} | {_pct(r['harmless_ecso_paper'])} "
            f"| {_fmt_delta(r['delta_paper'])} | {_pct(r['harmless_direct_mmsb'])} | {_pct(r['harmless_ecso_mmsb'])} "
            f"| {_fmt_delta(r['delta_mmsb'])} | {_pct(r['flag_rate_ecso'])} |")
    sec.lines.append(f"\nCSV: `{name}.csv`\n")
    for png in safety_plots(rows, out, name):
        sec.lines.append(f"![{png}]({png})")
    sec.lines += _roc_lines(direct, ecso, out, name)
    return sec


def _roc_lines(direct: Run | None, ecso: Run | None, out: Path, name: str) -> list[str]:
    if ecso is None:
        return []
    labels, source = ecso.direct_judgments, "the ECSO run's direct answers"
    if labels is None and direct is not None and direct.judgments:
        labels, source = direct.judgments, "the direct run's judgments (same ids)"
    if not labels:
        return []
    q = detector_quality(ecso.rows, labels)
    d = q.to_dict()
    lines = [f"\nHarm detector (labels: {source}): precision {_pct(d['precision'])}, recall {_pct(d['recall'])}, "
             f"false alarms {_pct(d['false_alarm_rate'])}, ROC-AUC {d['roc_auc'] if d['roc_auc'] is None else round(d['roc_auc'], 3)}"]
    if q.curve is not None:
        png = roc_plot(q.curve, d["roc_auc"], out, name)
        lines.append(f"\n![{png}]({png})")
    return lines


def _utility_section(direct: Run | None, ecso: Run | None, gt: dict[str, Path], name: str) -> Section:
    base = direct or ecso
    sec = Section(f"{base.benchmark}: {base.model_id}")
    metrics = {}
    for r in (direct, ecso):
        if r is None:
            continue
        grades = r.path.with_name(r.path.name.removesuffix(".jsonl") + ".judgments.jsonl")
        try:
            metrics[r.method] = compute(r.benchmark, r.path, grades if grades.is_file() else None, gt.get(r.benchmark))
        except InvalidRequestError as e:
            sec.lines.append(f"_{r.label}: {e}_")
    if not metrics:
        return sec
    sec.lines += ["| metric | direct | ECSO | Δ |", "|---|---|---|---|"]
    for key in get_benchmark(base.benchmark).report_keys:
        d, e = (metrics.get(m, {}).get(key) for m in ("direct", "ecso"))
        delta = f"{e - d:+.2f}" if d is not None and e is not None else "-"
        sec.lines.append(f"| {key} | {'-' if d is None else f'{d:.2f}'} | {'-' if e is None else f'{e:.2f}'} | {delta} |")
    fa = metrics.get("ecso", {}).get("false_alarm_rate")
    sec.lines.append(f"\nECSO false-alarm (flag) rate: {_pct(fa)}\n")
    return sec


def _defenses_section(runs: list[Run], folders: list[Path], out: Path) -> Section | None:
    """Every defense's attack success and over-refusal, per model (``llava.eval.report_methods``)."""
    rates = []
    for r in runs:
        if get_benchmark(r.benchmark).metric not in TWO_SIDED_METRICS or not r.judgments:
            continue
        m = compute(r.benchmark, r.path, _sibling(r.path, ".judgments.jsonl"))
        rates.append(RunRates(r.model_id, r.benchmark, r.rows[0].get("mode"), r.method, m["attack_success_rate"],
                              m["over_refusal_rate"], judge_signature(r.judgments), str(r.path)))
    sweeps = sweep_lines(folders, out)
    if not rates and not sweeps:
        return None
    sec = Section("Defenses side by side: attack success and over-refusal")
    sec.lines, sec.warnings = methods_table(rates, out)
    sec.lines += sweeps
    return sec


def _runs_section(runs: list[Run], pairs) -> Section:
    sec = Section("Runs")
    sec.lines.append("Full manifests and judge summaries: `manifests.json`.\n")
    for r in runs:
        judge = (r.judge_summary or {}).get("prompt_set", {})
        model = f"model `{r.model_id}`" + (" (random weights)" if r.random_weights else "")
        sec.lines.append(f"- `{r.path}`: {r.benchmark}, {r.method}, {model}, {len(r.rows)} answers; "
                         f"manifest {'yes' if r.manifest else 'MISSING'}; judge prompt set "
                         f"{judge.get('source', '-')} ({str(judge.get('sha256', '-'))[:12]})")
    for d, e in pairs:
        if d and e and d.manifest and e.manifest:
            diff = settings_diff(d.manifest.get("settings", {}), e.manifest.get("settings", {}))
            sec.lines.append(f"\nSettings that differ, {d.path.name} -> {e.path.name}: " + ("; ".join(diff) or "none"))
    return sec


def build_report(folders: list[Path], out: Path, ground_truth: dict[str, Path] | None = None,
                 strict: bool = False) -> dict[str, Any]:
    """Write the report; returns {"sections", "warnings", "files"}."""
    runs = discover_runs(folders)
    if not runs:
        raise InvalidRequestError(f"no answer files in {[str(f) for f in folders]}")
    out.mkdir(parents=True, exist_ok=True)
    pairs = pair_runs(runs)
    sections = []
    for direct, ecso in pairs:
        base = direct or ecso
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{base.benchmark}_{base.model_id}_{(ecso or direct).path.stem}")
        metric = get_benchmark(base.benchmark).metric
        if metric == SAFETY_METRIC:
            sections.append(_safety_section(direct, ecso, out, name))
        elif metric not in TWO_SIDED_METRICS:  # FigStep and XSTest are in the defenses section
            sections.append(_utility_section(direct, ecso, ground_truth or {}, name))
    defenses = _defenses_section(runs, folders, out)
    if defenses is not None:
        sections.append(defenses)
    warnings = [w for s in sections for w in s.warnings]
    if warnings and strict:
        raise JudgeMismatchError("refusing to compare differently judged runs: " + " | ".join(warnings))
    sections.append(_runs_section(runs, pairs))
    random = sorted({r.model_id for r in runs if r.random_weights})
    notes = [f"**Random-weight test model** ({', '.join(f'`{m}`' for m in random)}): its answers are random text, so "
             "its numbers test the tooling, not a model."] if random else []
    _write_markdown(out / "report.md", sections, warnings, notes)
    manifests = {str(r.path): {"manifest": r.manifest, "judge": r.judge_summary} for r in runs}
    (out / "manifests.json").write_text(json.dumps(manifests, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    for w in warnings:
        logger.warning("%s", w)
    return {"sections": [s.title for s in sections], "warnings": warnings,
            "files": sorted(p.name for p in out.iterdir())}


def _write_markdown(path: Path, sections: list[Section], warnings: list[str], notes: list[str] = ()) -> None:
    lines = ["# ECSO evaluation report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    for w in warnings:
        lines += [f"> **WARNING — JUDGE MISMATCH.** {w}", ""]
    for note in notes:
        lines += [f"> {note}", ""]
    for s in sections:
        lines += [f"## {s.title}", "", *s.lines, ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _gt_arg(text: str) -> tuple[str, Path]:
    bench, sep, path = text.partition("=")
    compared = benchmark_names(has="report_keys")
    if not sep or bench not in compared:
        raise argparse.ArgumentTypeError(f"expected BENCHMARK=PATH with BENCHMARK in {sorted(compared)}, got {text!r}")
    return bench, Path(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (searched recursively for answer files)")
    p.add_argument("--out", type=Path, required=True, help="report folder (report.md, *.csv, *.png, manifests.json)")
    p.add_argument("--ground-truth", type=_gt_arg, action="append", default=[],
                   help="BENCHMARK=PATH: the ground truth (the file the metrics' --ground-truth takes) of a "
                        "benchmark whose rows lack it; BENCHMARK one of "
                        f"{', '.join(benchmark_names(has='report_keys'))} (repeatable)")
    p.add_argument("--strict", action="store_true", help="refuse (exit 3) when compared runs were judged differently")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = build_report(args.runs, args.out, dict(args.ground_truth), args.strict)
    except JudgeMismatchError as e:
        logger.error("%s", e)
        return 3
    except (InvalidRequestError, OSError) as e:
        logger.error("%s", e)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
