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

from kdistill.cli import main
from kdistill.html_report import loss_keys, read_metrics, write_report

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


def make_run(root, name="hinton-mnist", sub_metrics=True):
    """A run directory as `kdistill run` leaves it (results, metrics, a plot, config, environment)."""
    root.mkdir(parents=True)
    deployment = {
        "rows": {"teacher": {"params": 1000, "size_bytes": 4200, "flops": 2000, "latency_ms_torch_b1": 0.5,
                             "throughput_torch_sps": 1e5, "accuracy": 0.99, "x_smaller": 1.0},
                 "student": {"params": 100, "size_bytes": 600, "flops": 200, "latency_ms_torch_b1": 0.1,
                             "throughput_torch_sps": 1e6, "accuracy": 0.98, "x_smaller": 10.0}},
        "teacher": "teacher", "machine": {"processor": "x86_64", "cpu_count": 2, "torch_threads": 1, "torch": "2"},
        "settings": {"latency_batches": [1], "repeats": 3, "budget_s": 1, "test_count": 10},
    }
    results = {"experiment": name, "profile": "quick", "wall_time_s": 12.5,
               "models": {"teacher": {"test_errors": 67, "test_accuracy": 0.9933, "params": 1000},
                          "distilled": {"test_errors": {"mean": 74.0, "std": 2.0, "values": [72.0, 76.0]},
                                        "test_accuracy": 0.9926}},
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
    assert len(srcs) == 3  # curves of metrics.jsonl and students/s1/metrics.jsonl, plus accuracy_vs_T.png
    assert "<h1>hinton-mnist (quick profile)</h1>" in text
    assert "Deployment (CPU)" in text and "<td>student</td>" in text and "10.00×" in text
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
    assert "hinton-mnist (quick profile)" in summary and "&lt;lambda-sweep&gt; (quick profile)" in summary
    assert summary.count("<td>distilled</td>") == 2
    assert "<lambda-sweep>" not in text
    path = write_report([a], tmp_path / "elsewhere" / "one.html")
    assert path.is_file() and "<h2>Summary</h2>" not in path.read_text()


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
    tables: document.querySelectorAll("table").length
  });
  document.body.appendChild(out);
});
</script>"""


def test_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (Debian package chromium)")
    run = make_run(tmp_path / "run")
    page = write_report([run])
    expected_tables = page.read_text().count("<table")
    probe = tmp_path / "probe.html"  # the report plus a test-only script reporting what the browser rendered
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND",  # any network fetch would fail, breaking an image
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="kdistill-check">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stdout[-2000:]
    check = json.loads(html.unescape(found.group(1)))
    assert check == {"images": 3, "loaded": 3, "tables": expected_tables}
