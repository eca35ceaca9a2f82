"""Outputs of an evaluation: results.json (config, model hash, per-example records) and a Markdown report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.eval.bootstrap import paired_bootstrap
from lmlab.eval.calibration import (
    calibration_bins,
    choice_probabilities,
    confusion_matrix,
    plot_confusion,
    plot_reliability,
)
from lmlab.utils.atomic import write_json, write_text


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, standard error) for every headline number."""
    rows: list[tuple[str, str, float, float | None]] = []
    for name, r in results["tasks"].items():
        if "perplexity" in r:
            rows.append((name, "nll_per_token", r["nll_per_token"], r.get("nll_per_token_se")))
            rows.append((name, "perplexity", r["perplexity"], None))
            rows.append((name, "bits_per_byte", r["bits_per_byte"], None))
        for m in ("acc", "acc_norm", "ece"):
            if m in r:
                rows.append((name, m, r[m], r.get(f"{m}_se")))
    return rows


def format_markdown(results: dict[str, Any]) -> str:
    """The Markdown report: config, headline table with standard errors, per-group accuracy."""
    c = results["config"]
    lines = [
        f"# Evaluation of `{c['model']}`",
        "",
        f"- model sha256: `{results['model_hash'][:16]}…`",
        f"- tasks: {', '.join(c['tasks'])}; limit: {c['limit']}; few-shot: {c['num_fewshot']}",
        "",
        "| task | metric | value | ± SE (bootstrap) |",
        "|---|---|---:|---:|",
    ]
    for task, metric, value, se in summary_rows(results):
        lines.append(f"| {task} | {metric} | {value:.4f} | {'' if se is None else f'{se:.4f}'} |")
    for name, r in results["tasks"].items():
        if "by_group" in r:
            lines += ["", f"## {name} by group", "", "| group | n | acc |", "|---|---:|---:|"]
            lines += [f"| {g} | {v['n']} | {v['acc']:.3f} |" for g, v in r["by_group"].items()]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write results.json and report.md into `out`; returns the folder."""
    out = Path(out)
    write_json(out / "results.json", results)
    text = format_markdown(results)
    for name, r in results["tasks"].items():
        if r.get("records") and "choices" in r["records"][0]:
            text += f"\n![{name} confusion matrix]({_mc_plots(name, r['records'], out)})\n"
            text += f"\n![{name} reliability](reliability-{name}.png)\n"
    write_text(out / "report.md", text)
    return out


def _mc_plots(name: str, records: list[dict[str, Any]], out: Path) -> str:
    """Confusion matrix (true vs picked choice) and reliability diagram of a multiple-choice task; returns the first."""
    labels = list(range(max(len(r["choices"]) for r in records)))
    matrix, _ = confusion_matrix([r["target"] for r in records], [r["pred"] for r in records], labels)
    names = records[0]["choices"] if all(r["choices"] == records[0]["choices"] for r in records) else labels
    plot_confusion(matrix, names, out / f"confusion-{name}.png", title=f"{name}: true vs predicted choice")
    conf = [max(choice_probabilities(r["loglikelihoods"])) for r in records]
    bins = calibration_bins(conf, [r["acc"] for r in records])
    plot_reliability(bins, out / f"reliability-{name}.png", title=f"{name}: reliability")
    return f"confusion-{name}.png"


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """results.json from a file or an output folder."""
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise LmlabError("no such results file", file=str(p)) from e


def compare(a: dict[str, Any], b: dict[str, Any], n_boot: int = 1000) -> list[dict[str, Any]]:
    """B minus A per shared task and metric, with a paired-bootstrap 95% interval over the shared examples."""
    rows = []
    for name in a["tasks"].keys() & b["tasks"].keys():
        ra, rb = a["tasks"][name], b["tasks"][name]
        if "records" in ra and "records" in rb:
            if len(ra["records"]) != len(rb["records"]):
                raise LmlabError(f"{name}: {len(ra['records'])} vs {len(rb['records'])} examples", field="limit")
            for m in ("acc", "acc_norm"):
                xa, xb = [r[m] for r in ra["records"]], [r[m] for r in rb["records"]]
                rows.append({"task": name, "metric": m, **paired_bootstrap(xa, xb, n_boot=n_boot)})
        elif "windows" in ra and "windows" in rb and len(ra["windows"]) == len(rb["windows"]):
            wa = [(w["nll"], w["tokens"]) for w in ra["windows"]]
            wb = [(w["nll"], w["tokens"]) for w in rb["windows"]]
            ratio = lambda ws: sum(x for x, _ in ws) / sum(n for _, n in ws)
            rows.append({"task": name, "metric": "nll_per_token", **paired_bootstrap(wa, wb, ratio, n_boot=n_boot)})
    return sorted(rows, key=lambda r: (r["task"], r["metric"]))


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: A, B, B - A and its 95% interval."""
    lines = ["| task | metric | A | B | B - A | 95% CI |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        ci = f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        lines.append(f"| {r['task']} | {r['metric']} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} | {ci} |")
    return "\n".join(lines) + "\n"
