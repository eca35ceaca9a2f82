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
from lmlab.eval.scoring import compare_generations
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
        for m in r.get("metrics", []) if is_generation(r) else []:
            rows.append((name, m, r[m], r.get(f"{m}_se")))
    return rows


def is_generation(task_result: dict[str, Any]) -> bool:
    """Whether a task's results come from a generate_until task (predictions scored against references)."""
    return task_result.get("output_type") == "generate_until"


def _cell(text: str, width: int = 80) -> str:
    """Text fit for one Markdown table cell: one line, pipes escaped, shortened."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _examples(name: str, r: dict[str, Any], k: int = 5) -> list[str]:
    """The first k examples of a generation task: what the numbers are made of."""
    m = r["metrics"][0]
    lines = ["", f"## {name}: first {min(k, len(r['records']))} examples", ""]
    lines += [f"| input | prediction | reference | {m} |", "|---|---|---|---:|"]
    for rec in r["records"][:k]:
        refs = " / ".join(rec["references"])
        lines.append(f"| {_cell(rec.get('input', ''))} | {_cell(rec['prediction'])} | {_cell(refs)} | {rec[m]:.3f} |")
    return lines


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
            cols = r["metrics"] if is_generation(r) else ["acc"]
            lines += ["", f"## {name} by group", "", f"| group | n | {' | '.join(cols)} |"]
            lines.append("|---|---:|" + "---:|" * len(cols))
            for g, v in r["by_group"].items():
                lines.append(f"| {g} | {v['n']} | " + " | ".join(f"{v[c]:.3f}" for c in cols) + " |")
        if is_generation(r) and r.get("records"):
            lines += _examples(name, r)
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
            if is_generation(ra) or is_generation(rb):
                rows += _compare_generation(name, ra, rb, n_boot)
                continue
            for m in ("acc", "acc_norm"):
                xa, xb = [r[m] for r in ra["records"]], [r[m] for r in rb["records"]]
                rows.append({"task": name, "metric": m, **paired_bootstrap(xa, xb, n_boot=n_boot)})
        elif "windows" in ra and "windows" in rb and len(ra["windows"]) == len(rb["windows"]):
            wa = [(w["nll"], w["tokens"]) for w in ra["windows"]]
            wb = [(w["nll"], w["tokens"]) for w in rb["windows"]]
            ratio = lambda ws: sum(x for x, _ in ws) / sum(n for _, n in ws)
            rows.append({"task": name, "metric": "nll_per_token", **paired_bootstrap(wa, wb, ratio, n_boot=n_boot)})
    return sorted(rows, key=lambda r: (r["task"], r["metric"]))


def _compare_generation(name: str, ra: dict[str, Any], rb: dict[str, Any], n_boot: int) -> list[dict[str, Any]]:
    """Rows of B minus A for the metrics both generation runs computed, paired over the same examples."""
    if not (is_generation(ra) and is_generation(rb)):
        raise LmlabError(f"{name}: one run is a generation task and the other is not", field="tasks")
    if any(x["references"] != y["references"] for x, y in zip(ra["records"], rb["records"])):
        raise LmlabError(f"{name}: the two runs scored different examples", field="limit", hint="use the same --limit")
    metrics = [m for m in ra["metrics"] if m in rb["metrics"]]
    diffs = compare_generations(ra["records"], rb["records"], metrics, n_boot=n_boot)
    return [{"task": name, "metric": m, **d} for m, d in diffs.items()]


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: A, B, B - A and its 95% interval."""
    lines = ["| task | metric | A | B | B - A | 95% CI |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        ci = f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        lines.append(f"| {r['task']} | {r['metric']} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} | {ci} |")
    return "\n".join(lines) + "\n"
