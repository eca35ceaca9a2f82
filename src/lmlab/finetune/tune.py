"""Hyperparameter search with Optuna (the seed's "which hyperparameters, and how to tune them").

Each trial is one fine-tuning run with sampled settings. Trials report every evaluation, so the
median pruner stops hopeless ones early. The study lives in SQLite under the output folder: a
killed search resumes where it stopped. Trial 0 is always the recipe's own settings, so the best
trial is reported against the default.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.finetune.run import finetune_config, load_records, run_records
from lmlab.train.config import Recipe, apply_overrides, recipe_from_dict
from lmlab.train.trainer import lower_is_better
from lmlab.utils.atomic import write_json

# name -> spec: [choices] | {low, high, log?, int?}; names are dotted recipe keys
DEFAULT_SPACE: dict[str, Any] = {
    "train.lr": {"low": 1e-5, "high": 1e-3, "log": True},
    "train.micro_batch_size": [8, 16, 32],
    "finetune.epochs": [1, 2, 3],
    "train.weight_decay": [0.0, 0.01, 0.1],
    "model.resid_dropout": [0.0, 0.1, 0.2],
    "train.warmup_steps": [0, 25, 100],
}
LORA_SPACE = {"finetune.lora.r": [4, 8, 16]}


def _default_metric(task: str) -> str:
    return {"classification": "val_macro_f1", "ner": "val_entity_f1"}.get(task, "val_loss")


def _get(d: dict[str, Any], dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def search_space(recipe: Recipe) -> dict[str, Any]:
    """The recipe's tune.space, or the default space (plus the LoRA rank for LoRA recipes)."""
    space = recipe.tune.get("space")
    if space:
        return dict(space)
    space = dict(DEFAULT_SPACE)
    if recipe.finetune.get("method", "lora") == "lora":
        space.update(LORA_SPACE)
    return space


def _suggest(trial: Any, name: str, spec: Any) -> Any:
    if isinstance(spec, list):
        return trial.suggest_categorical(name, spec)
    if isinstance(spec, dict) and "low" in spec and "high" in spec:
        low, high = spec["low"], spec["high"]
        if spec.get("int") or (isinstance(low, int) and isinstance(high, int) and not spec.get("log")):
            return trial.suggest_int(name, int(low), int(high), log=bool(spec.get("log")))
        return trial.suggest_float(name, float(low), float(high), log=bool(spec.get("log")))
    raise LmlabError("a search dimension is a list of choices or {low, high, log}", field=f"tune.space.{name}")


def _trial_recipe(base: dict[str, Any], params: dict[str, Any], out_dir: Path, source: str | None) -> Recipe:
    raw = copy.deepcopy(base)
    raw.pop("tune", None)
    apply_overrides(raw, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in params.items()])
    raw.setdefault("train", {})["out_dir"] = str(out_dir)
    raw["train"]["save_checkpoints"] = False  # a trial is scored, not kept: no weights on disk
    return recipe_from_dict(raw, source)


def tune(recipe: Recipe, trials: int, out_dir: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Run (or resume) a study until `trials` trials have finished; returns the report."""
    import optuna
    from optuna.trial import TrialState

    ft = finetune_config(recipe)
    metric = recipe.tune.get("metric", _default_metric(ft.task))
    direction = "minimize" if lower_is_better(metric) else "maximize"
    out = Path(out_dir or Path(recipe.train.out_dir) / "tune")
    out.mkdir(parents=True, exist_ok=True)
    space = search_space(recipe)
    base = recipe.to_dict()
    records = {s: load_records(recipe, ft, s) for s in ("train", "validation")}
    if not records["validation"]:
        raise LmlabError("hyperparameter search needs a validation split", field="data.validation")
    records["test"] = None

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="lmlab",
        storage=f"sqlite:///{out / 'study.db'}",
        load_if_exists=True,
        direction=direction,
        sampler=optuna.samplers.TPESampler(seed=recipe.train.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    # a fresh sampler replays its seed's draws: offset it by the trials so far so a resumed study
    # explores new settings instead of repeating the ones it already tried
    study.sampler = optuna.samplers.TPESampler(seed=recipe.train.seed + len(study.trials))
    # a killed run leaves its trial RUNNING forever: mark it failed so it does not count
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    if not study.trials:
        defaults = {k: _get(base, k) for k in space}
        study.enqueue_trial({k: v for k, v in defaults.items() if v is not None}, user_attrs={"default": True})

    def objective(trial: Any) -> float:
        params = {name: _suggest(trial, name, spec) for name, spec in space.items()}
        trial_recipe = _trial_recipe(base, params, out / f"trial-{trial.number:03d}", recipe.source)
        trial_ft = finetune_config(trial_recipe)

        def report(step: int, metrics: dict[str, float]) -> None:
            if metric not in metrics:
                raise LmlabError(f"evaluation has no {metric!r}; it has {', '.join(metrics)}", field="tune.metric")
            trial.report(metrics[metric], step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        s = run_records(trial_recipe, trial_ft, records, progress=progress, on_eval=report, report=False)
        value = s["train"]["best_value"] if s["train"]["best_metric"] == metric else None
        if value is None:
            raise LmlabError(f"set train.early_stopping_metric: {metric} so trials are scored on it",
                             field="train.early_stopping_metric")  # fmt: skip
        return value

    done = lambda: sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    while done() < trials:
        study.optimize(objective, n_trials=1, catch=())
    return write_report(study, metric, out)


def write_report(study: Any, metric: str, out: Path) -> dict[str, Any]:
    """tune.json, report.md and search.png: every trial, the best, and the default for comparison."""
    from optuna.trial import TrialState

    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    if not complete:
        raise LmlabError("no trial completed", hint="look at the trials' logs under " + str(out))
    best = study.best_trial
    default = next((t for t in study.trials if t.user_attrs.get("default")), None)
    rows = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "default": bool(t.user_attrs.get("default"))} for t in finished]  # fmt: skip
    report = {
        "metric": metric,
        "direction": study.direction.name.lower(),
        "trials": len(finished),
        "pruned": sum(t.state == TrialState.PRUNED for t in finished),
        "best": {"number": best.number, "value": best.value, "params": best.params},
        "default": {"number": default.number, "value": default.value, "params": default.params}
        if default is not None and default.state == TrialState.COMPLETE
        else None,
        "all": rows,
        "study": str(out / "study.db"),
    }
    write_json(out / "tune.json", report)
    lines = [f"# Hyperparameter search ({metric}, {report['direction']})", "",
             f"{report['trials']} trials, {report['pruned']} pruned.", ""]  # fmt: skip
    if report["default"]:
        lines.append(f"- default (trial {default.number}): {default.value:.4f}")
    lines += [f"- best (trial {best.number}): {best.value:.4f}", "", "| trial | state | value | params |",
              "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        lines.append(
            f"| {r['number']}{' (default)' if r['default'] else ''} | {r['state']} | {value} | {r['params']} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report["plot"] = str(_plot(complete, study.direction.name.lower(), metric, out / "search.png"))
    return report


def _plot(trials: list[Any], direction: str, metric: str, path: Path) -> Path:
    from lmlab.viz.figure import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [t.number for t in trials]
    ys = [t.value for t in trials]
    pick = max if direction == "maximize" else min
    running = [pick(ys[: i + 1]) for i in range(len(ys))]
    ax.scatter(xs, ys, label="trial", color="tab:blue")
    ax.step(xs, running, where="post", label="best so far", color="tab:orange")
    default = [t for t in trials if t.user_attrs.get("default")]
    if default:
        ax.axhline(default[0].value, ls="--", color="gray", label="default settings")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.legend()
    ax.set_title("hyperparameter search")
    return save_png(fig, path)
