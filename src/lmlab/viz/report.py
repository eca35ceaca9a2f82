"""One HTML report per run: a single self-contained page (images inlined, no scripts, nothing fetched)
built from what a run already wrote.

It reads, when present: the resolved recipe (recipe.yaml, or one saved with the final model or the latest
checkpoint), metrics.jsonl (training curves), summary.json (`lmlab finetune`: before/after, test metrics,
sample answers), results.json (`lmlab eval`: metrics with bootstrap standard errors, examples),
samples.json ({"prompts", "before", "after"}), and every PNG under the run (confusion matrices,
reliability diagrams, `lmlab inspect` maps), checkpoints excepted.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import LmlabError
from lmlab.utils.atomic import write_text
from lmlab.viz import style

SKIP_DIRS = {"checkpoints", "final", "data", "__pycache__"}  # model and data folders hold no plots of the run
Z95 = 1.959964  # a 95% normal interval is +- 1.96 standard errors

TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
  body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC", sans-serif;
         margin: 0 auto; max-width: 1100px; padding: 1.5em; color: #1a1a1a; background: #fff; }
  h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #0072B2; padding-bottom: 0.2em; }
  .meta { color: #555; } nav a { margin-right: 1em; color: #0072B2; }
  table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
  th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
  th { background: #eef4fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
  pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; max-height: 28em; }
  figure { margin: 0.8em 0 1.4em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
  figcaption { color: #555; font-size: 0.85em; } .sample { white-space: pre-wrap; max-width: 30em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="meta">Run folder <code>{{ run_dir }}</code> · read from: {{ sources | join(", ") or "nothing" }}</p>
<nav>{% for s in sections %}<a href="#{{ s.id }}">{{ s.title }}</a>{% endfor %}</nav>
{% for s in sections %}
<section id="{{ s.id }}">
<h2>{{ s.title }}</h2>
{% for block in s.blocks %}
{% if block.kind == "pre" %}<pre>{{ block.text }}</pre>
{% elif block.kind == "text" %}<p>{{ block.text }}</p>
{% elif block.kind == "table" %}
{% if block.caption %}<p><b>{{ block.caption }}</b></p>{% endif %}
<table><tr>{% for h in block.header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in block.rows %}<tr>{% for cell in row %}<td{% if cell is number %} class="num"{% endif %}>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% elif block.kind == "image" %}
<figure><img src="data:image/png;base64,{{ block.data }}" alt="{{ block.caption }}"><figcaption>{{ block.caption }}</figcaption></figure>
{% endif %}
{% endfor %}
</section>
{% endfor %}
</body>
</html>
"""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmlabError(f"invalid JSON: {e.msg}", file=str(path), line=e.lineno) from None


def _image(png: bytes, caption: str) -> dict[str, Any]:
    return {"kind": "image", "data": base64.b64encode(png).decode("ascii"), "caption": caption}


def _table(header: list[str], rows: list[list[Any]], caption: str = "") -> dict[str, Any]:
    return {"kind": "table", "header": header, "rows": rows, "caption": caption}


def _f(x: Any, digits: int = 4) -> Any:
    return round(x, digits) if isinstance(x, float) else ("" if x is None else x)


def find_recipe(run: Path) -> Path | None:
    """The run's resolved recipe: run/recipe.yaml, the final model's, or the latest checkpoint's."""
    for p in (run / "recipe.yaml", run / "final" / "recipe.yaml"):
        if p.exists():
            return p
    steps = sorted((run / "checkpoints").glob("step-*/recipe.yaml")) if (run / "checkpoints").is_dir() else []
    return steps[-1] if steps else None


def run_images(run: Path) -> list[Path]:
    """Every PNG under the run folder, in path order, skipping checkpoint, model and data folders."""
    found = []
    for p in sorted(run.rglob("*.png")):
        rel = p.relative_to(run).parts
        if not any(part in SKIP_DIRS or part.startswith((".", "step-")) for part in rel[:-1]):
            found.append(p)
    return found


def _curves(records: list[dict[str, Any]], name: str) -> bytes:
    """Training and validation loss, and the learning rate, against steps (PNG bytes)."""
    from lmlab.viz.figure import png_bytes, pyplot

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, fmt, what in (("loss", "-", "train"), ("val_loss", "o-", "validation")):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if pts:
            ax1.plot(*zip(*pts), fmt, label=what, markersize=3)
    ax1.set(xlabel="step", ylabel="loss (nats/token)", title=style.title("Loss", name))
    ax1.legend()
    lr = [(r["step"], r["lr"]) for r in records if isinstance(r.get("lr"), (int, float))]
    if lr:
        ax2.plot(*zip(*lr))
    ax2.set(xlabel="step", ylabel="learning rate", title=style.title("Learning-rate schedule", name))
    fig.tight_layout()
    return png_bytes(fig)


def _error_bars(rows: list[tuple[str, str, float, float]], what: str) -> bytes:
    """One panel per metric: each task's value with its 95% interval (+- 1.96 bootstrap SE)."""
    from lmlab.viz.figure import png_bytes, pyplot

    plt = pyplot()
    metrics = list(dict.fromkeys(m for _, m, _, _ in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.8 + 0.45 * len(rows)), squeeze=False)
    for ax, metric, colour in zip(axes[0], metrics, style.PALETTE):
        sel = [(t, v, se) for t, m, v, se in rows if m == metric]
        ys = range(len(sel))
        ax.errorbar([v for _, v, _ in sel], ys, xerr=[Z95 * se for _, _, se in sel], fmt="o", color=colour, capsize=4)
        ax.set_yticks(list(ys), [t for t, _, _ in sel])
        ax.set_ylim(-0.6, len(sel) - 0.4)
        ax.set_title(metric)
        ax.set_xlabel("value, 95% interval")
    fig.suptitle(style.title("Evaluation with bootstrap error bars", what))
    fig.tight_layout()
    return png_bytes(fig)


def _eval_section(results: dict[str, Any], name: str) -> list[dict[str, Any]]:
    from lmlab.eval.report import is_generation, summary_rows

    blocks: list[dict[str, Any]] = []
    rows = summary_rows(results)
    table = []
    for task, metric, value, se in rows:
        ci = f"[{value - Z95 * se:.4f}, {value + Z95 * se:.4f}]" if se is not None else ""
        table.append([task, metric, _f(value), _f(se), ci])
    blocks.append(_table(["task", "metric", "value", "± SE (bootstrap)", "95% interval"], table,
                         f"model {results.get('config', {}).get('model', '?')}"))  # fmt: skip
    with_se = [(t, m, v, se) for t, m, v, se in rows if se is not None]
    if with_se:
        blocks.append(_image(_error_bars(with_se, name), "values with 95% intervals (± 1.96 bootstrap SE)"))
    for task, r in results.get("tasks", {}).items():
        if "by_group" in r:
            cols = r["metrics"] if is_generation(r) else ["acc"]
            grows = [[g, v["n"], *(_f(v[c]) for c in cols)] for g, v in r["by_group"].items()]
            blocks.append(_table(["group", "n", *cols], grows, f"{task} by group"))
    return blocks


def _finetune_section(s: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    p = s.get("parameters", {})
    if p:
        blocks.append({"kind": "text", "text": f"{s.get('task')} / {s.get('method')}: {p.get('trainable', 0):,} of "
                       f"{p.get('total', 0):,} parameters trained, {s.get('train', {}).get('steps', '?')} steps"})  # fmt: skip
    before, after = s.get("before") or {}, s.get("after") or {}
    keys = [k for k in after if k != "answers"]
    if keys:
        blocks.append(_table(["metric", "before", "after"], [[k, _f(before.get(k)), _f(after[k])] for k in keys],
                             "validation before and after fine-tuning"))  # fmt: skip
    test = s.get("test") or {}
    rows = []
    if "accuracy" in test:
        rows.append(["accuracy", _f(test["accuracy"]), _f(test.get("accuracy_se"))])
        for avg in ("macro", "micro"):
            if isinstance(test.get(avg), dict) and "f1" in test[avg]:
                rows.append([f"{avg}-F1", _f(test[avg]["f1"]), _f(test[avg].get("f1_se"))])
        if "ece" in test:
            rows.append(["ECE (calibration error)", _f(test["ece"]), ""])
    elif "f1" in test:
        rows += [[m, _f(test[m]), ""] for m in ("precision", "recall", "f1") if m in test]
    if rows:
        blocks.append(_table(["metric", "value", "± SE (bootstrap)"], rows, f"test set (n={test.get('n', '?')})"))
    return blocks


def _samples(prompts: list[str], before: list[str], after: list[str], what: str) -> dict[str, Any]:
    n = max(len(before), len(after))
    prompts = list(prompts) + [""] * (n - len(prompts))
    rows = [[prompts[i], before[i] if i < len(before) else "", after[i] if i < len(after) else ""] for i in range(n)]
    return _table(["prompt", "before", "after"], rows, what)


def build_sections(run: Path, samples: dict[str, list[str]] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The report's sections (id, title, blocks) and the files they were read from."""
    sections: list[dict[str, Any]] = []
    sources: list[str] = []
    used: set[Path] = set()
    images = run_images(run)

    def section(sid: str, title: str, blocks: list[dict[str, Any]]) -> None:
        if blocks:
            sections.append({"id": sid, "title": title, "blocks": blocks})

    def pngs(match: Any, caption: str = "") -> list[dict[str, Any]]:
        out = []
        for p in images:
            if p not in used and match(p):
                used.add(p)
                out.append(_image(p.read_bytes(), caption or str(p.relative_to(run))))
        return out

    recipe = find_recipe(run)
    results = _read_json(run / "results.json") if (run / "results.json").exists() else None
    summary = _read_json(run / "summary.json") if (run / "summary.json").exists() else None
    blocks: list[dict[str, Any]] = []
    if recipe is not None:
        sources.append(str(recipe.relative_to(run)))
        blocks.append({"kind": "pre", "text": recipe.read_text(encoding="utf-8")})
    elif results is not None and "config" in results:
        blocks.append({"kind": "pre", "text": yaml.safe_dump(results["config"], sort_keys=False, allow_unicode=True)})
    section("recipe", "Recipe", blocks)

    blocks = []
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        sources.append("metrics.jsonl")
        records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        if records:
            blocks.append(_image(_curves(records, run.name), "training curves, from metrics.jsonl"))
            pngs(lambda p: p.name == "curves.png" and p.parent == run)  # the same curves: shown once
    blocks += pngs(lambda p: p.name.startswith("curves"))
    section("curves", "Training curves", blocks)

    blocks = []
    if summary is not None:
        sources.append("summary.json")
        blocks += _finetune_section(summary)
    if results is not None:
        sources.append("results.json")
        blocks += _eval_section(results, run.name)
    section("evaluation", "Evaluation", blocks)
    section("plots", "Confusion and calibration", pngs(lambda p: "confusion" in p.name or "reliability" in p.name))

    blocks = []
    if samples is not None:
        blocks.append(_samples(samples.get("prompts", []), samples.get("before", []), samples.get("after", []),
                               "samples before and after training"))  # fmt: skip
    if (run / "samples.json").exists():
        sources.append("samples.json")
        sj = _read_json(run / "samples.json")
        blocks.append(_samples(sj.get("prompts", []), sj.get("before", []), sj.get("after", []), "samples.json"))
    if summary is not None and (summary.get("before") or {}).get("answers"):
        blocks.append(_samples(summary.get("prompts", []), summary["before"]["answers"],
                               (summary.get("after") or {}).get("answers", []), "answers before and after fine-tuning"))  # fmt: skip
    if results is not None:
        from lmlab.eval.report import is_generation

        for task, r in results.get("tasks", {}).items():
            if is_generation(r) and r.get("records"):
                m = r["metrics"][0]
                rows = [[rec.get("input", ""), rec["prediction"], " / ".join(rec["references"]), _f(rec[m], 3)]
                        for rec in r["records"][:5]]  # fmt: skip
                blocks.append(_table(["input", "prediction", "reference", m], rows, f"{task}: first examples"))
    section("samples", "Sample generations", blocks)

    section("inspect", "Inside the model", pngs(lambda p: p.name.startswith(("attention", "lens", "embeddings"))))
    section("other", "Other plots", pngs(lambda p: True))
    sources += [str(p.relative_to(run)) for p in images if p in used]
    return sections, sources


def render_report(
    run_dir: str | os.PathLike, samples: dict[str, list[str]] | None = None, title: str | None = None
) -> str:
    """The report page of a run folder as one HTML string."""
    import jinja2

    run = Path(run_dir)
    if not run.is_dir():
        raise LmlabError("no such run folder", file=str(run), hint="pass the out_dir of pretrain, finetune or eval")
    sections, sources = build_sections(run, samples)
    if not sections:
        raise LmlabError("nothing to report: no recipe, metrics.jsonl, summary.json, results.json or PNG here",
                         file=str(run))  # fmt: skip
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(
        title=title or f"Run report: {run.resolve().name}", run_dir=str(run), sections=sections, sources=sources
    )


def write_report(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    samples: dict[str, list[str]] | None = None,
    title: str | None = None,
) -> Path:
    """Write RUN_DIR/report.html (or `out`): one self-contained page; returns its path.

    samples: {"prompts": [...], "before": [...], "after": [...]} for runs that printed their samples
    rather than writing them (pretraining).
    """
    page = render_report(run_dir, samples, title)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    write_text(path, page)
    return path


def write_combined_report(
    runs: dict[str, str | os.PathLike],
    out: str | os.PathLike,
    samples: dict[str, dict[str, list[str]]] | None = None,
    title: str = "Run report",
) -> Path:
    """One page for several runs (the demo's stages): each run's sections under its name, in order.
    Runs that do not exist or have nothing to show are left out."""
    import jinja2

    sections: list[dict[str, Any]] = []
    sources: list[str] = []
    for name, run_dir in runs.items():
        run = Path(run_dir)
        if not run.is_dir():
            continue
        found, used = build_sections(run, (samples or {}).get(name))
        for sec in found:
            sections.append({**sec, "id": f"{name}-{sec['id']}", "title": f"{name}: {sec['title']}"})
        sources += [f"{run}/{u}" for u in used]
    if not sections:
        raise LmlabError("nothing to report in any of the runs", file=", ".join(str(r) for r in runs.values()))
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = env.from_string(TEMPLATE).render(title=title, run_dir=str(Path(out).parent), sections=sections,
                                            sources=sources)  # fmt: skip
    write_text(out, page)
    return Path(out)
