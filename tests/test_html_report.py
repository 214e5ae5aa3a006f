"""`kdistill report`: one self-contained HTML page with tables, embedded curves and plots, escaped text."""

import base64
import html
import json
import re
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from kdistill.cli.app import main
from kdistill.outputs.html import loss_keys, read_metrics, short_label, write_report

IMG_SRC = re.compile(r'<img[^>]*\ssrc="([^"]*)"')
EXTERNAL = re.compile(r"""(?:src|href|action|poster|srcset)\s*=\s*["']?\s*(?:https?:)?//""", re.I)


def _png(path, title="plot"):
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [1, 0])
    ax.set_title(title)
    fig.savefig(path, format="png", dpi=50)
    plt.close(fig)


def _metrics(path, epochs=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"epoch": e, "step": 10 * e, "lr": 0.1, "train_loss": 1.0 / e, "loss_kd": 0.6 / e, "loss_ce": 0.4 / e,
             "val_accuracy": 0.5 + 0.1 * e, "val_errors": 10 - e, "time_s": e} for e in range(1, epochs + 1)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")


def _row(spec, params, ms, accuracy, teacher=None, check="ok"):
    """A deployment row with every column `kdistill distill` writes (torch and onnx at batches 1 and 256)."""
    row = {"spec": spec, "params": params, "size_bytes": 4 * params + 300, "flops": 2 * params,
           "latency_ms_torch_b1": ms, "latency_ms_torch_b256": 40 * ms, "throughput_torch_sps": 256e3 / (40 * ms),
           "latency_ms_onnx_b1": ms / 2, "latency_ms_onnx_b256": 20 * ms, "throughput_onnx_sps": 256e3 / (20 * ms),
           "accuracy": accuracy, "errors": round((1 - accuracy) * 1000), "nll": 0.05, "ece": 0.01,
           "teacher_agreement": 0.99, "latency_spread_pct": 7.0, "latency_repeats": 15, "latency_check": check}
    t = teacher or row
    row.update({"x_smaller": t["params"] / params, "x_fewer_flops": t["flops"] / row["flops"],
                "x_faster_b1": t["latency_ms_torch_b1"] / ms, "x_faster_b256": t["latency_ms_torch_b256"] / (40 * ms),
                "accuracy_kept": accuracy / t["accuracy"]})
    return row


def make_run(root, name="hinton-mnist", sub_metrics=True, student_check="ok"):
    """A run directory as `kdistill run` leaves it (results, metrics, a plot, config, environment)."""
    root.mkdir(parents=True)
    teacher = _row("mlp:1200,1200", 1000, 0.5, 0.99)
    deployment = {
        "rows": {"teacher": teacher, "student": _row("mlp:30", 100, 0.1, 0.98, teacher, student_check)},
        "teacher": "teacher", "machine": {"processor": "x86_64", "cpu_count": 2, "torch_threads": 1, "torch": "2"},
        "settings": {"latency_batches": [1, 256], "repeats": 15, "budget_s": 1, "test_count": 10, "retries": 2,
                     "spread_limit": 0.25, "load_margin": 0.5},
    }
    results = {"experiment": name, "profile": "quick", "wall_time_s": 12.5,
               "models": {"teacher": {"test_errors": 67, "test_accuracy": 0.9933, "params": 1000},
                          "distilled": {"test_errors": {"mean": 74.0, "std": 2.0, "values": [72.0, 76.0]},
                                        "test_accuracy": 0.9926, "method": "kd"}},
               "temperature": 20.0, "validation_errors_by_alpha": {"0.5": 76}, "deployment": deployment}
    (root / "results.json").write_text(json.dumps(results))
    (root / "config.yaml").write_text("experiment: hinton-mnist\nnote: <script>alert('x')</script> & more\n")
    (root / "environment.json").write_text(json.dumps({"torch": "2.13.0", "cpu_count": 2}))
    _metrics(root / "metrics.jsonl")
    if sub_metrics:
        _metrics(root / "students" / "s1" / "metrics.jsonl")
    _png(root / "accuracy_vs_T.png")
    return root


def _check_self_contained(text):
    assert not EXTERNAL.search(text), EXTERNAL.search(text).group(0)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    srcs = IMG_SRC.findall(text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1]).startswith(b"\x89PNG")
    return srcs


def test_one_run_report_via_cli(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    out = json.loads(capsys.readouterr().out)
    page = run / "report.html"
    assert out["report"] == str(page) and page.is_file()
    text = page.read_text()
    srcs = _check_self_contained(text)
    assert len(srcs) == 4  # accuracy vs cost, curves of metrics.jsonl and students/s1/metrics.jsonl, accuracy_vs_T.png
    assert "<h1>hinton-mnist (quick profile)</h1>" in text
    assert "Deployment (CPU)" in text and "<td>student</td>" in text and "10.00×" in text
    assert "<h4>Size and accuracy</h4>" in text and "<h4>Speed</h4>" in text  # the wide table split in two
    summary = text.split("<h2>Summary</h2>", 1)[1].split("<h2>", 1)[0]
    assert ("<td>kd</td><td>mlp:1200,1200 → mlp:30</td><td>0.9800</td><td>0.9900</td><td>0.990</td>"
            "<td>10.00×</td><td>5.00×</td><td>5.00×</td>") in summary
    assert "<h2>Accuracy versus cost</h2>" in text
    assert "<details><summary>Config (config.yaml)</summary>" in text  # raw config and environment folded
    assert "<td>distilled</td>" in text and "74.00 ± 2.00 (n=2)" in text and "<td>0.9933</td>" in text
    assert "accuracy_vs_T.png" in text and "students/s1/metrics.jsonl" in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in text and "<script" not in text
    assert "Environment" in text and "2.13.0" in text and "validation_errors_by_alpha" in text
    assert text.count("<table") >= 4


def test_loss_terms_are_found_by_name(tmp_path):
    _metrics(tmp_path / "metrics.jsonl")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 3  # the broken last line is skipped
    assert loss_keys(rows) == ["train_loss", "loss_kd", "loss_ce"]


def test_two_runs_side_by_side(tmp_path, monkeypatch, capsys):
    a = make_run(tmp_path / "a", "hinton-mnist")
    b = make_run(tmp_path / "b", "<lambda-sweep>", sub_metrics=False)
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(a), str(b)]) == 0
    text = (tmp_path / "report.html").read_text()
    _check_self_contained(text)
    assert "<h2>Summary</h2>" in text and text.count('<section class="run"') == 2
    summary = text.split("<h2>Summary</h2>", 1)[1].split("<section", 1)[0]
    assert '<a href="#run-0">a</a>' in summary and '<a href="#run-1">b</a>' in summary  # a row per run, linked
    assert summary.count("<td>mlp:1200,1200 → mlp:30</td>") == 2 and summary.count("<td>kd</td>") == 2
    assert '<h2>hinton-mnist (quick profile)</h2>' in text and "<h2>&lt;lambda-sweep&gt; (quick profile)</h2>" in text
    assert "<lambda-sweep>" not in text
    path = write_report([a], tmp_path / "elsewhere" / "one.html")
    assert path.is_file() and text.count('<section class="run"') == 2


def test_unreliable_timing_is_flagged_on_the_page(tmp_path):
    run = make_run(tmp_path / "run", student_check="unreliable: load 3.1 on 2 cores (torch b1)")
    text = write_report([run]).read_text()
    flag = '<span class="flag">⚠ unreliable: load 3.1 on 2 cores (torch b1)</span>'
    summary = text.split("<h2>Summary</h2>", 1)[1].split("<h2>", 1)[0]
    speed = text.split("<h4>Speed</h4>", 1)[1].split("</table>", 1)[0]
    assert flag in summary and flag in speed and 'student <span class="flag">⚠</span>' in speed
    assert '<span class="ok">ok</span>' in speed  # the teacher's timing passed
    assert "`student`: latency unreliable: load 3.1 on 2 cores (torch b1)" in text  # and in the notes


def test_cli_run_is_titled_by_method_and_models(tmp_path):
    run = make_run(tmp_path / "run")
    results = json.loads((run / "results.json").read_text())
    results.update({"experiment": "distill", "profile": "cli"})
    (run / "results.json").write_text(json.dumps(results))
    (run / "config.yaml").write_text("data:\n  name: digits\nmethod:\n  name: dkd\nmodel: mlp:30\n")
    text = write_report([run]).read_text()
    assert "<h1>kd: mlp:1200,1200 → mlp:30 on digits</h1>" in text  # results' method first, then the config's


def test_bad_run_directories_are_clear_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no results.json" in capsys.readouterr().err


CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var out = document.createElement("pre");
  out.id = "kdistill-check";
  out.textContent = JSON.stringify({
    images: imgs.length,
    loaded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    tables: document.querySelectorAll("table").length,
    overflowing: Array.prototype.slice.call(document.querySelectorAll("div.wide")).filter(function (d) {
      return d.scrollWidth > d.clientWidth + 1;
    }).map(function (d) { return d.firstChild.className; }),
    page_wider_than_window: document.documentElement.scrollWidth > window.innerWidth
  });
  document.body.appendChild(out);
});
</script>"""


def test_report_renders_in_headless_chromium(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_report([run])
    expected_tables = page.read_text().count("<table")
    check = _rendered(page, tmp_path)
    # Every table fits a 1280 px window: the deployment table (14 columns at two batch sizes) is split in two.
    assert check == {"images": 4, "loaded": 4, "tables": expected_tables, "overflowing": [],
                     "page_wider_than_window": False}


def test_a_long_model_spec_still_fits_the_window(tmp_path):
    """A transformers spec has no spaces (`hf:bert,vocab_size=...`): its summary cell wraps instead of pushing
    the summary table past 1280 px, and the cost plot's label is cut (issue 26)."""
    long_spec = "hf:bert,vocab_size=100,hidden_size=8,num_hidden_layers=1,num_attention_heads=2,intermediate_size=16"
    runs = [make_run(tmp_path / "a", sub_metrics=False), make_run(tmp_path / "b", sub_metrics=False)]
    results = json.loads((runs[1] / "results.json").read_text())
    results["deployment"]["rows"]["student"]["spec"] = long_spec
    (runs[1] / "results.json").write_text(json.dumps(results))
    page = write_report(runs, tmp_path / "report.html")
    assert long_spec in page.read_text()  # whole in the table
    check = _rendered(page, tmp_path)
    assert check["overflowing"] == [] and check["page_wider_than_window"] is False
    assert short_label(long_spec) == long_spec[:31] + "…" and short_label("kd mlp:30") == "kd mlp:30"


def _rendered(page, tmp_path):
    """What headless chromium rendered of ``page`` in a 1280 px window (CHECK_SCRIPT's record)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (Debian package chromium)")
    probe = tmp_path / "probe.html"  # the report plus a test-only script reporting what the browser rendered
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND",  # any network fetch would fail, breaking an image
           "--window-size=1280,2000", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="kdistill-check">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stdout[-2000:]
    return json.loads(html.unescape(found.group(1)))
