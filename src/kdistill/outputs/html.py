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
import yaml
from kdistill.outputs.deploy import deployment_columns, deployment_notes
from kdistill.outputs.deploy import _num, _times
from kdistill.outputs.deploy import human

matplotlib.use("Agg")

from kdistill.io import write_text
from kdistill.outputs.results import fmt

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
td{white-space:nowrap}th{vertical-align:bottom}table.environment td{white-space:normal;word-break:break-all}
.flag{color:#b00020;font-weight:600;white-space:normal;display:inline-block;text-align:left}.ok{color:#1b7f3b}
details{margin:.6em 0}summary{cursor:pointer;font-weight:600;color:#444}
table.summary td:last-child,table.summary th:last-child{white-space:normal;text-align:left}
table.summary td:nth-child(3),table.summary th:nth-child(3){white-space:normal;overflow-wrap:anywhere;min-width:12em;text-align:left}
h2{overflow-wrap:anywhere}
"""


class Html(str):
    """A table cell that is already markup (a link, a flagged value): :func:`html_table` does not escape it."""


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
    def settings(self) -> dict[str, Any]:
        """The run's resolved ``config.yaml`` as a mapping (empty when missing or unreadable)."""
        try:
            cfg = yaml.safe_load(self.config) if self.config else None
        except yaml.YAMLError:
            return {}
        return cfg if isinstance(cfg, dict) else {}

    @property
    def title(self) -> str:
        """``kd: cnn:16,32 → cnn:4,8 on digits`` for a CLI run, ``hinton-mnist (quick profile)`` for an experiment."""
        r = self.results or {}
        if r.get("profile") == "cli" and r.get("experiment") in ("distill", "train"):
            cfg = self.settings
            data = (cfg.get("data") or {}).get("name") if isinstance(cfg.get("data"), dict) else None
            where = f" on {data}" if data else ""
            if r["experiment"] == "train":
                return f"train {cfg.get('model') or self.path.resolve().name}{where}"
            pair = run_pair(self)
            return f"{run_method(self)}: {pair[0]} → {pair[1]}{where}"
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
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Html) else esc(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
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


SPEED_PREFIXES = ("latency_", "throughput_", "x_faster_")
"""Deployment columns shown in the speed table; the others go into the size-and-accuracy table."""


def _check_cell(value: Any) -> Html:
    """``latency_check`` spelled out: green ``ok`` or the red reason, so an unreliable number is seen."""
    if value is None:
        return Html("–")
    text = str(value)
    return Html(f'<span class="ok">ok</span>' if text == "ok" else f'<span class="flag">⚠ {esc(text)}</span>')


def _deployment_table(rows: dict[str, dict[str, Any]], cols, cls: str) -> str:
    """One of the deployment tables: a row per model (marked ⚠ when its timing is unreliable)."""
    def name(n: str, row: dict[str, Any]) -> Any:
        bad = str(row.get("latency_check", "ok")) != "ok" and cls == "speed"
        return Html(f'{esc(n)} <span class="flag">⚠</span>') if bad else n

    def cell(key: str, f, row: dict[str, Any]) -> Any:
        return _check_cell(row.get(key)) if key == "latency_check" else f(row.get(key))

    return html_table(["model", *(h for h, _, _ in cols)],
                      ([name(n, row), *(cell(k, f, row) for _, k, f in cols)] for n, row in rows.items()),
                      f"deployment {cls}")


def deployment_section(table: dict[str, Any]) -> str:
    """The deployment table written by :func:`kdistill.outputs.deploy.write_deployment`, with its notes.

    Split in two so that it fits a page without sideways scrolling: size and accuracy (with the ratios
    to the teacher), then speed (latencies, throughput, × faster, the timings' spread and trust).
    """

    rows = table.get("rows")
    if not isinstance(rows, dict) or not rows:
        return ""
    try:
        cols = deployment_columns(table)
        notes = deployment_notes(table)
    except (KeyError, TypeError, ValueError, AttributeError):  # a hand-edited table: show it raw
        return "<h3>Deployment (CPU)</h3><pre>" + esc(json.dumps(table, indent=2, default=str)) + "</pre>"
    rows = {n: r if isinstance(r, dict) else {} for n, r in rows.items()}
    speed = [c for c in cols if c[1].startswith(SPEED_PREFIXES)]
    size = [c for c in cols if c not in speed]
    parts = ["<h3>Deployment (CPU)</h3>"]
    if size:
        parts.append("<h4>Size and accuracy</h4>" + _deployment_table(rows, size, "size"))
    if speed:
        parts.append("<h4>Speed</h4>" + _deployment_table(rows, speed, "speed"))
    return "".join(parts) + '<ul class="note">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"

# ---------------------------------------------------------------------------------- summary and cost


def _deployment(run: Run) -> dict[str, Any]:
    dep = (run.results or {}).get("deployment")
    return dep if isinstance(dep, dict) and isinstance(dep.get("rows"), dict) else {}


def run_method(run: Run) -> str:
    """The distillation method of a run: its results' ``method`` entries, else its config's ``method.name``."""
    named = [m["method"] for m in _models(run).values() if isinstance(m.get("method"), str)]
    if named:
        return named[0]
    method = run.settings.get("method")
    return str(method.get("name")) if isinstance(method, dict) and method.get("name") else "–"


def _spec(row: Any, fallback: str) -> str:
    return str(row.get("spec")) if isinstance(row, dict) and row.get("spec") else fallback


def run_pair(run: Run) -> tuple[str, str]:
    """``(teacher, student)`` as model specs where the run records them, else their roles."""
    dep, cfg = _deployment(run), run.settings
    rows = dep.get("rows", {})
    teacher = _spec(rows.get(dep.get("teacher")), str(cfg.get("teacher_model") or "teacher"))
    students = [n for n in rows if n != dep.get("teacher")]
    student = _spec(rows.get(students[0]) if students else None, str(cfg.get("model") or "student"))
    return teacher, student


def _batches(runs: Sequence[Run]) -> list[int]:
    found = {int(k.rsplit("_b", 1)[1]) for run in runs for row in _deployment(run).get("rows", {}).values()
             if isinstance(row, dict) for k in row if k.startswith("x_faster_b") and k.rsplit("_b", 1)[1].isdigit()}
    return sorted(found)


def _summary_rows(run: Run, link: Any, batches: Sequence[int]) -> list[list[Any]]:
    """One row per student of the run's deployment table, else one per model of its ``results.json``."""

    dep, method = _deployment(run), run_method(run)
    rows, teacher = dep.get("rows", {}), dep.get("teacher")
    t = rows.get(teacher) if isinstance(rows.get(teacher), dict) else {}
    out = []
    for name, row in rows.items():
        if name == teacher or not isinstance(row, dict):
            continue
        pair = f"{_spec(t, str(teacher or '–'))} → {_spec(row, name)}"
        out.append([link, method, pair, _num(4)(row.get("accuracy")), _num(4)(t.get("accuracy")), _num(3)(row.get("accuracy_kept")), _times(row.get("x_smaller")),
                    *(_times(row.get(f"x_faster_b{b}")) for b in batches), _check_cell(row.get("latency_check"))])
    if out:
        return out
    for role, m in (_models(run) or {"–": {}}).items():
        acc = m.get("test_accuracy")
        out.append([link, str(m.get("method") or method), str(m.get("spec") or role),
                    _cell(acc) if acc is not None else "–", "–", "–", "–", *("–" for _ in batches), "–"])
    return out


def summary_section(runs: Sequence[Run], anchors: Sequence[str]) -> str:
    """A row per run (per student): method, teacher → student, accuracy, accuracy kept, × smaller, × faster."""
    batches = _batches(runs)
    rows = []
    for run, anchor in zip(runs, anchors):
        name = run.path.resolve().name
        link = Html(f'<a href="#{esc(anchor)}">{esc(name)}</a>') if len(runs) > 1 else name
        rows += _summary_rows(run, link, batches)
    header = ["run", "method", "teacher → student", "accuracy", "teacher accuracy", "accuracy kept", "× smaller",
              *(f"× faster b{b}" for b in batches), "timing"]
    return "<h2>Summary</h2>" + html_table(header, rows, "summary")


def cost_points(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Every model of the runs' deployment tables as a point: label, params, torch latency, accuracy.

    A teacher measured by several runs (same spec, size and accuracy) is one point.
    """
    points, seen = [], set()
    for run in runs:
        dep = _deployment(run)
        batch = min((int(b) for b in dep.get("settings", {}).get("latency_batches", []) or []), default=1)
        for name, row in dep.get("rows", {}).items():
            if not isinstance(row, dict) or not isinstance(row.get("accuracy"), (int, float)):
                continue
            is_teacher = name == dep.get("teacher")
            key = (is_teacher, row.get("spec"), row.get("params"), round(float(row["accuracy"]), 6))
            if is_teacher and key in seen:
                continue
            seen.add(key)
            who = "teacher" if is_teacher else f"{run_method(run)}"
            points.append({"label": f"{who} {_spec(row, name)}", "teacher": is_teacher, "params": row.get("params"),
                           "latency": row.get(f"latency_ms_torch_b{batch}"), "batch": batch,
                           "accuracy": float(row["accuracy"]),
                           "unreliable": _timing_unreliable(row, f"torch_b{batch}")})
    return points


def _timing_unreliable(row: dict[str, Any], timing: str) -> bool:
    """Whether the row's ``timing`` (``torch_b1``) was marked unreliable (the row's check when no per-timing stats)."""
    stats = row.get("latency_stats")
    if isinstance(stats, dict) and isinstance(stats.get(timing), dict):
        return bool(stats[timing].get("unreliable"))
    return str(row.get("latency_check", "ok")) != "ok"


LABEL_CHARS = 32
"""Longest point label on the cost plot: a long spec (``hf:bert,vocab_size=...``) would otherwise widen the
figure's text so far that ``tight_layout`` shrinks the axes to a sliver."""


def short_label(label: str, limit: int = LABEL_CHARS) -> str:
    """``label`` cut to ``limit`` characters, ending in an ellipsis when cut (the summary table has it whole)."""
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _scatter(ax, points: Sequence[dict[str, Any]], key: str, xlabel: str) -> None:
    """Accuracy against ``key`` (a log axis when it spans more than 10x); teachers are squares, unreliable
    timings hollow."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    drawn = [pt for pt in points if isinstance(pt.get(key), (int, float)) and pt[key] > 0]
    for i, pt in enumerate(drawn):
        color = "tab:gray" if pt["teacher"] else f"C{i % 10}"
        hollow = key == "latency" and pt["unreliable"]
        ax.scatter(pt[key], pt["accuracy"], s=60, marker="s" if pt["teacher"] else "o",
                   facecolors="none" if hollow else color, edgecolors=color, linewidths=1.5, zorder=3)
        text = short_label(pt["label"]) + (" (unreliable)" if hollow else "")
        ax.annotate(text, (pt[key], pt["accuracy"]), fontsize=7,
                    xytext=(5, 4), textcoords="offset points")
    xs = [pt[key] for pt in drawn]
    if xs and max(xs) > 10 * min(xs):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        xlabel += ", log"
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
    ax.margins(x=0.3, y=0.12)
    ax.set(xlabel=xlabel, ylabel="test accuracy")
    ax.grid(True, alpha=0.3)


def cost_png(points: Sequence[dict[str, Any]]) -> bytes | None:
    """Accuracy versus parameters (left) and versus CPU latency (right) of every model, as PNG bytes."""
    import matplotlib.pyplot as plt

    if not any(isinstance(p.get("params"), (int, float)) for p in points):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    _scatter(left, points, "params", "parameters")
    _scatter(right, points, "latency", f"torch latency at batch {points[0]['batch']} (ms)")
    left.set_title("accuracy vs size", fontsize=10)
    right.set_title("accuracy vs CPU latency (hollow: unreliable timing)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def cost_section(runs: Sequence[Run]) -> str:
    """The accuracy-versus-cost plot of every model on the page (empty without deployment tables)."""
    png = cost_png(cost_points(runs))
    if png is None:
        return ""
    return "<h2>Accuracy versus cost</h2>" + _figure(png_data_uri(png), "every model on this page: "
                                                      "teachers square, students round; further left is cheaper")


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
    if run.config is not None:  # folded away: wanted to reproduce a run, not to read it
        parts.append("<details><summary>Config (config.yaml)</summary><pre>" + esc(run.config) + "</pre></details>")
    if run.environment is not None:
        env_rows = ([k, _cell(v)] for k, v in run.environment.items())
        parts.append("<details><summary>Environment (environment.json)</summary>"
                     + html_table(["key", "value"], env_rows, "environment") + "</details>")
    return "".join(parts) + "</section>"


def _models(run: Run) -> dict[str, dict[str, Any]]:
    """The run's ``models`` of ``results.json`` (roles whose entry is not a dict are left out)."""
    models = (run.results or {}).get("models")
    return {k: v for k, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else {}


def render(runs: Sequence[Run]) -> str:
    """The whole page for ``runs``: a summary row per run and the accuracy-versus-cost plot, then each run."""
    title = runs[0].title if len(runs) == 1 else f"{len(runs)} kdistill runs"
    anchors = [f"run-{i}" for i in range(len(runs))]
    body = [f"<h1>{esc(title)}</h1>", summary_section(runs, anchors), cost_section(runs)]
    body += [run_section(run, anchor, heading=len(runs) > 1) for run, anchor in zip(runs, anchors)]
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
