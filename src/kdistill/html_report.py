"""One self-contained HTML page per run (or per set of runs): tables, curves, plots, config, environment.

The page fetches nothing: styles are inline, there is no script, and every image (the training curves
drawn here from ``metrics.jsonl`` and the run's own PNG plots) is embedded as a base64 ``data:`` URI,
so the file can be mailed, archived or opened offline and looks the same everywhere. Every piece of
text taken from the run directory is HTML-escaped.

:func:`write_report` is the entry point (``kdistill report`` and ``kdistill run`` call it).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

from .io import write_text
from .report import fmt

MAX_CURVES = 12
"""At most this many ``metrics.jsonl`` files are drawn per run (an experiment may hold hundreds)."""
MAX_PLOTS = 24
MAX_PLOT_BYTES = 8 * 1024 * 1024
HEADLINE = ("test_accuracy", "test_errors", "test_nll", "teacher_agreement", "params", "flops")

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222;line-height:1.4}
h1{border-bottom:2px solid #ddd;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:.8em;overflow-x:auto;font-size:.85em}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figcaption{font-size:.85em;color:#555}img{max-width:100%;height:auto}
.note{color:#666;font-size:.9em}section.run{margin-bottom:3em}.wide{overflow-x:auto}
table.environment td,table.extras td{text-align:left}
"""


@dataclass
class Run:
    """What a run directory holds that the report shows (missing pieces are None / empty)."""

    path: Path
    results: dict[str, Any] | None = None
    config: str | None = None
    environment: dict[str, Any] | None = None
    metrics: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)

    @property
    def title(self) -> str:
        r = self.results or {}
        what = r.get("experiment") or self.path.resolve().name
        return f"{what} ({r['profile']} profile)" if r.get("profile") else str(what)


# --------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable (a report never fails on one file)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _by_depth(paths: Iterable[Path], root: Path) -> list[Path]:
    """``paths`` with the run's own files first, then sub-directories', each level sorted by name."""
    return sorted(paths, key=lambda p: (len(p.relative_to(root).parts), str(p)))


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory (``kdistill train/distill/run --out DIR``); ValueError if it is not one."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"report: no run directory {root}")
    results = _read_json(root / "results.json")
    env = _read_json(root / "environment.json")
    config = (root / "config.yaml").read_text() if (root / "config.yaml").is_file() else None
    metrics = _by_depth(root.rglob("metrics.jsonl"), root)
    plots = _by_depth((p for p in root.rglob("*.png") if p.is_file()), root)
    if results is None and config is None and not metrics:
        raise ValueError(f"report: {root} holds no results.json, config.yaml or metrics.jsonl; "
                         "give a directory written by `kdistill train/distill/run --out`")
    return Run(root, results if isinstance(results, dict) else None, config,
               env if isinstance(env, dict) else None, metrics, plots)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file; blank or broken lines (a run killed mid-write) are skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- figures


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(x, y) of the rows that have a finite ``key``; x is the epoch (fractional for mid-epoch evals)."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(row.get("epoch", i + 1)))
            ys.append(float(v))
    return xs, ys


def loss_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``train_loss`` and every per-term ``loss_*`` column, in first-seen order."""
    keys: list[str] = []
    for row in rows:
        for k in row:
            if (k == "train_loss" or k.startswith("loss_")) and k not in keys:
                keys.append(k)
    return keys


def curves_png(rows: Sequence[dict[str, Any]], title: str) -> bytes | None:
    """Training curves of one ``metrics.jsonl`` as PNG bytes: losses (left), validation accuracy (right)."""
    import matplotlib.pyplot as plt

    losses = [(k, *_series(rows, k)) for k in loss_keys(rows)]
    losses = [s for s in losses if s[1]]
    acc = _series(rows, "val_accuracy")
    if not losses and not acc[0]:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, xs, ys in losses:
        left.plot(xs, ys, marker="." if len(xs) < 30 else None, label=name)
    left.set(xlabel="epoch", ylabel="loss", title="training loss")
    if losses:
        left.legend(fontsize=8)
        if all(y > 0 for _, _, ys in losses for y in ys) and _spread(losses) > 30:
            left.set_yscale("log")
    if acc[0]:
        right.plot(*acc, marker="." if len(acc[0]) < 30 else None, color="tab:green")
    right.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _spread(series: Sequence[tuple[str, list[float], list[float]]]) -> float:
    """max / min over all values: a log axis when the terms differ by orders of magnitude."""
    vals = [y for _, _, ys in series for y in ys]
    return max(vals) / min(vals) if vals and min(vals) > 0 else 1.0


# ------------------------------------------------------------------------------------------ HTML


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    """A results value as table text: summaries as ``mean ± std (n)``, other nesting as short JSON."""
    if isinstance(value, dict) and "mean" not in value or isinstance(value, list):
        text = json.dumps(value, default=str)
        return text if len(text) <= 80 else text[:77] + "..."
    return fmt(value) if isinstance(value, (float, dict)) else str(value)


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    """A ``<table>`` with escaped header and cells."""
    attr = f' class="{esc(cls)}"' if cls else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="wide"><table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _metric_order(models: dict[str, dict[str, Any]]) -> list[str]:
    """Metric columns: ``test_*`` first (sorted), then the rest in first-seen order."""
    keys: list[str] = []
    for m in models.values():
        keys += [k for k in m if k not in keys]
    return sorted(k for k in keys if k.startswith("test_")) + [k for k in keys if not k.startswith("test_")]


def results_section(results: dict[str, Any]) -> str:
    """The ``models`` table, the scalar extras and (collapsed) any nested extras of ``results.json``."""
    parts = []
    models = results.get("models")
    if isinstance(models, dict) and models:
        models = {k: v if isinstance(v, dict) else {"value": v} for k, v in models.items()}
        cols = _metric_order(models)
        parts.append(html_table(["model", *cols], ([role, *(_cell(m.get(c, "")) for c in cols)]
                                                   for role, m in models.items()), "results"))
    skip = {"models", "deployment", "experiment", "profile", "wall_time_s"}
    scalars = [(k, v) for k, v in results.items() if k not in skip and not isinstance(v, (dict, list))]
    nested = {k: v for k, v in results.items() if k not in skip and isinstance(v, (dict, list))}
    if scalars:
        parts.append(html_table(["setting", "value"], ([k, _cell(v)] for k, v in scalars), "extras"))
    if nested:
        parts.append("<details><summary>more results</summary><pre>"
                     + esc(json.dumps(nested, indent=2, default=str)) + "</pre></details>")
    return "<h3>Results</h3>" + "".join(parts) if parts else ""


def deployment_section(table: dict[str, Any]) -> str:
    """The deployment table written by :func:`kdistill.deploy.write_deployment`, with its notes."""
    from .deploy import deployment_columns, deployment_notes

    rows = table.get("rows")
    if not isinstance(rows, dict) or not rows:
        return ""
    try:
        cols = deployment_columns(table)
        notes = deployment_notes(table)
    except (KeyError, TypeError, ValueError, AttributeError):  # a hand-edited table: show it raw
        return "<h3>Deployment (CPU)</h3><pre>" + esc(json.dumps(table, indent=2, default=str)) + "</pre>"
    body = html_table(["model", *(h for h, _, _ in cols)],
                      ([name, *(f(row.get(k)) for _, k, f in cols)] for name, row in rows.items()), "deployment")
    return ("<h3>Deployment (CPU)</h3>" + body + "<ul class=\"note\">"
            + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")


def _figure(uri: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def curves_section(run: Run) -> str:
    """Training curves from up to :data:`MAX_CURVES` ``metrics.jsonl`` files of the run."""
    figs = []
    for path in run.metrics[:MAX_CURVES]:
        name = str(path.parent.relative_to(run.path)) if path.parent != run.path else run.title
        png = curves_png(read_metrics(path), name)
        if png:
            figs.append(_figure(png_data_uri(png), str(path.relative_to(run.path))))
    if not figs:
        return ""
    more = len(run.metrics) - MAX_CURVES
    note = f'<p class="note">{more} more metrics.jsonl files not drawn.</p>' if more > 0 else ""
    return "<h3>Training curves</h3>" + "".join(figs) + note


def plots_section(run: Run) -> str:
    """The run's own PNG plots, embedded (at most :data:`MAX_PLOTS`, each under :data:`MAX_PLOT_BYTES`)."""
    figs, skipped = [], []
    for path in run.plots[:MAX_PLOTS]:
        data = path.read_bytes()
        if len(data) > MAX_PLOT_BYTES or not data.startswith(b"\x89PNG"):
            skipped.append(str(path.relative_to(run.path)))
            continue
        figs.append(_figure(png_data_uri(data), str(path.relative_to(run.path))))
    more = len(run.plots) - MAX_PLOTS
    notes = [f"{more} more plots not shown"] if more > 0 else []
    notes += [f"skipped {s} (too big or not a PNG)" for s in skipped]
    if not figs and not notes:
        return ""
    return "<h3>Plots</h3>" + "".join(figs) + "".join(f'<p class="note">{esc(n)}</p>' for n in notes)


def run_section(run: Run, anchor: str, heading: bool = True) -> str:
    """Everything about one run: title, deployment, results, curves, plots, config, environment."""
    r = run.results or {}
    parts = [f'<section class="run" id="{esc(anchor)}">' + (f"<h2>{esc(run.title)}</h2>" if heading else ""),
             f'<p class="note">{esc(run.path)}'
             + (f" · wall time {esc(fmt(r['wall_time_s'], 1))} s" if "wall_time_s" in r else "") + "</p>"]
    if isinstance(r.get("deployment"), dict):
        parts.append(deployment_section(r["deployment"]))
    if r:
        parts.append(results_section(r))
    else:
        parts.append('<p class="note">no results.json (the run may still be going)</p>')
    parts += [curves_section(run), plots_section(run)]
    if run.config is not None:
        parts.append("<h3>Config</h3><pre>" + esc(run.config) + "</pre>")
    if run.environment is not None:
        env_rows = ([k, _cell(v)] for k, v in run.environment.items())
        parts.append("<h3>Environment</h3>" + html_table(["key", "value"], env_rows, "environment"))
    return "".join(parts) + "</section>"


def _models(run: Run) -> dict[str, dict[str, Any]]:
    """The run's ``models`` of ``results.json`` (roles whose entry is not a dict are left out)."""
    models = (run.results or {}).get("models")
    return {k: v for k, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else {}


def summary_section(runs: Sequence[Run]) -> str:
    """Side-by-side headline metrics of several runs: one row per (run, model)."""
    per_run = [_models(run) for run in runs]
    keys = [k for k in HEADLINE if any(k in m for models in per_run for m in models.values())]
    rows = []
    for run, models in zip(runs, per_run):
        for role, m in (models or {"–": {}}).items():
            rows.append([run.title, run.path.name, role, *(_cell(m[k]) if k in m else "–" for k in keys)])
    return "<h2>Summary</h2>" + html_table(["run", "directory", "model", *keys], rows, "summary")


def render(runs: Sequence[Run]) -> str:
    """The whole page for ``runs`` (a summary table first when there are several)."""
    title = runs[0].title if len(runs) == 1 else f"{len(runs)} kdistill runs"
    body = [f"<h1>{esc(title)}</h1>"]
    if len(runs) > 1:
        body.append(summary_section(runs))
    body += [run_section(run, f"run-{i}", heading=len(runs) > 1) for i, run in enumerate(runs)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{_STYLE}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def write_report(run_dirs: str | os.PathLike | Sequence[str | os.PathLike],
                 out: str | os.PathLike | None = None) -> Path:
    """Write the report of ``run_dirs`` to ``out`` atomically and return its path.

    ``out`` defaults to ``RUN_DIR/report.html`` for one run and ``./report.html`` for several.
    """
    dirs = [run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else list(run_dirs)
    if not dirs:
        raise ValueError("report: give at least one run directory")
    runs = [load_run(d) for d in dirs]
    path = Path(out) if out is not None else (runs[0].path / "report.html" if len(runs) == 1 else Path("report.html"))
    write_text(path, render(runs))
    return path
