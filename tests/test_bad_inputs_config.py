"""Bad configs, by family: YAML bombs, YAML that a typed config reads ambiguously, and values too big to quote.

Each family is one parametrized test. CLI cases run ``kdistill train`` in this process and expect exit code 2,
one stderr line ``kdistill: error: ...`` naming the file (and line) or the ``--set`` item, no traceback, a short
message, and nothing written to ``--out``. Everything fails before any data is loaded or model built.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from kdistill import data
import kdistill.config.loader as config
from kdistill.cli.app import main
from kdistill.models import build_model

TRAIN = ["train", "--data", "digits", "--model", "mlp:8", "--epochs", "1", "--no-progress"]


def _laughs(levels: int = 9, width: int = 9) -> str:
    """A flow list of anchored lists, each holding ``width`` aliases of the one before: ~500 bytes that
    expand to ``width ** levels`` items (9 ** 9 = 387 million)."""
    parts = ["&a0 [" + ", ".join(["lol"] * width) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


DEEP = "[" * 50_000 + "]" * 50_000  # 100 KB of nested brackets


def _refused(argv: list[str], out: Path, capsys) -> str:
    """Run the CLI; assert it refused with one short line and wrote nothing; return the line."""
    capsys.readouterr()
    start = time.perf_counter()
    try:
        rc = main(argv + ["--out", str(out)])
    except SystemExit as exc:
        rc = exc.code
    took = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err[:2000]
    assert len(lines) == 1 and lines[0].startswith("kdistill: error: "), err[:2000]
    assert "Traceback" not in err
    assert len(lines[0]) < 600, lines[0][:2000]  # a value is quoted short, never expanded
    assert took < 10, took
    assert not out.exists() or not any(out.iterdir())
    return lines[0]


# ------------------------------------------------------------------------------------------ YAML bombs

BOMBS = [
    # (id, config file text or None, --set value or None, what the line must name)
    ("laughs-in-train", f"train:\n  epochs: 1\n  milestones: {_laughs()}\n", None, "train.milestones"),
    ("laughs-in-data", f"data:\n  name: digits\n  seed: {_laughs()}\n", None, "data.seed"),
    ("laughs-as-model", f"model: {_laughs()}\n", None, "model"),
    ("laughs-in-method", f"method:\n  name: kd\n  temperature: {_laughs()}\n", None, "method.temperature"),
    ("laughs-as-teacher", f"teacher: {_laughs()}\n", None, "teacher"),
    ("one-alias", "train: &t {epochs: 1}\nmethod: *t\n", None, "train"),
    ("brackets-100kb", f"train:\n  epochs: {DEEP}\n", None, "nested more than"),
    ("braces-100kb", "train: " + "{a: " * 30_000 + "1" + "}" * 30_000 + "\n", None, "nested more than"),
    ("set-laughs", None, f"train.milestones={_laughs()}", "anchors and aliases"),
    ("set-brackets-100kb", None, f"train.epochs={DEEP}", "nested more than"),
]


@pytest.mark.parametrize("text, override, match", [c[1:] for c in BOMBS], ids=[c[0] for c in BOMBS])
def test_yaml_bombs_are_refused_in_one_short_line(text, override, match, tmp_path, capsys):
    """Aliases would expand a 540-byte file to gigabytes (minutes, then a MemoryError quoting it all); deep
    nesting would be a RecursionError. Refused at once, naming the file and line or the --set item."""
    argv = list(TRAIN)
    if text is not None:
        cfg = tmp_path / "bomb.yaml"
        cfg.write_text(text)
        argv += ["--config", str(cfg)]
    if override is not None:
        argv += ["--set", override]
    line = _refused(argv, tmp_path / "out", capsys)
    assert match in line, line
    if text is not None:
        assert "bomb.yaml, line " in line, line
        assert "aliases" in line or "nested" in line, line
    else:
        assert line.startswith("kdistill: error: --set ")


# --------------------------------------------------------------------------- YAML a typed config refuses

TYPED = [
    # (id, config file text or None, --set value or None, texts the line must hold)
    ("two-train-sections", "train:\n  epochs: 3\ndata: digits\ntrain:\n  lr: 0.1\n", None,
     ["key 'train' appears twice", "lines 1 and 4"]),
    ("key-twice-in-train", "train:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n", None,
     ["train: key 'epochs' appears twice", "lines 2 and 4"]),
    ("key-twice-in-flow", "data: {name: digits, seed: 1, seed: 2}\n", None, ["data: key 'seed' appears twice"]),
    ("octal-epochs", "train:\n  epochs: 010\n", None, ["line 2", "train.epochs", "octal number 8", "as 10"]),
    ("sexagesimal-seed", "data:\n  name: digits\n  seed: 1:30\n", None, ["line 3", "data.seed", "base-60", "90"]),
    ("binary-epochs", "train: {epochs: 0b11}\n", None, ["train.epochs", "binary number 3"]),
    ("set-sexagesimal", None, "train.epochs=1:30", ["--set 'train.epochs=1:30'", "base-60 number 90"]),
    ("set-octal", None, "train.epochs=010", ["--set 'train.epochs=010'", "octal number 8"]),
    ("set-key-twice", None, "method={name: kd, name: ce}", ["key 'name' appears twice"]),
    ("set-alias", None, "train.milestones=[&m 1, *m]", ["anchors and aliases"]),
]


@pytest.mark.parametrize("text, override, needles", [c[1:] for c in TYPED], ids=[c[0] for c in TYPED])
def test_ambiguous_yaml_is_refused_naming_key_and_line(text, override, needles, tmp_path, capsys):
    """YAML 1.1 (PyYAML) reads 010 as 8 and 1:30 as 90, and a repeated key silently replaces the first:
    a typed config refuses each, in a file or in --set (both go through the same loader)."""
    argv = list(TRAIN)
    if text is not None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        argv += ["--config", str(cfg)]
    if override is not None:
        argv += ["--set", override]
    line = _refused(argv, tmp_path / "out", capsys)
    for needle in needles:
        assert needle in line, (needle, line)


def test_quoted_and_yaml_1_2_numbers_still_load(tmp_path):
    """What the refusals leave alone: quoted strings, 0x hex, plain decimals; and the config kdistill writes
    (shared values included) loads back: it is dumped without anchors."""
    p = tmp_path / "ok.yaml"
    p.write_text("train: {epochs: 10, seed: 0x10, augment: '010', device: \"1:30\"}\nmodel: mlp:010\n")
    assert config.load_yaml(p) == {"train": {"epochs": 10, "seed": 16, "augment": "010", "device": "1:30"},
                                   "model": "mlp:010"}
    shared = [1, 2]
    p.write_text(config.dump({"train": {"milestones": shared}, "method": {"layers": shared, "tag": "010"}}))
    assert config.load_yaml(p) == {"train": {"milestones": [1, 2]}, "method": {"layers": [1, 2], "tag": "010"}}
    assert config.apply_overrides({}, ["train.lr=0.1", "a.b='1:30'"]) == {"train": {"lr": 0.1}, "a": {"b": "1:30"}}


# ------------------------------------------------------------------------- values too big to quote whole

BIG_LIST = list(range(1_000_000))
BIG_TEXT = "x" * 100_000
LAUGHS = yaml.safe_load(_laughs(8))  # PyYAML's own reading: shared lists, 9 ** 8 items when expanded


def _train_config(**kw):
    from kdistill.engine import TrainConfig

    return TrainConfig(**kw)


def _train_from(values):
    from kdistill.engine import TrainConfig

    return TrainConfig.from_dict(values)


QUOTED = [
    ("train-field-list", lambda: _train_config(epochs=BIG_LIST), "train.epochs"),
    ("train-field-laughs", lambda: _train_config(optimizer=LAUGHS), "train.optimizer"),
    ("train-field-text", lambda: _train_config(device=BIG_TEXT), "train.device"),
    ("train-unknown-key", lambda: _train_from({BIG_TEXT: 1}), "unknown option"),
    ("data-option", lambda: data.load("synthetic", class_sep=BIG_LIST), "data.class_sep"),
    ("data-seed-laughs", lambda: data.load("digits", seed=LAUGHS), "data.seed"),
    ("set-big-item", lambda: config.apply_overrides({"train": 1}, [f"train.x={BIG_TEXT}"]), "is not a section"),
    ("set-100k-digit-int", lambda: config.apply_overrides({}, ["train.seed=" + "9" * 100_000]),
     "a number of 100,000 digits"),  # was int()'s "Exceeds the limit (4300 digits)", naming no field
    ("model-huge-spec", lambda: build_model("a" * 100_000, [4], 3), "unknown model"),  # was the spec twice: 200 kB
]


@pytest.mark.parametrize("call, match", [c[1:] for c in QUOTED], ids=[c[0] for c in QUOTED])
def test_error_messages_quote_values_short(call, match):
    """A huge or self-similar value is refused naming its field, quoted in a few hundred characters, fast:
    never repr()-ed whole (a million-item list would be a 7 MB message; shared lists a MemoryError)."""
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert match in message, message[:500]
    assert len(message) < 600, len(message)
    assert time.perf_counter() - start < 5



# ------------------------------------------------------------------------ values and files out of bounds

OUT_OF_BOUNDS = [
    # (id, config file bytes or None, --set value or None, texts the line must hold)
    ("set-batch-2**25", None, "train.batch_size=33554432", ["train.batch_size", "[1, 16,777,216]"]),
    ("set-views-10**6", None, "train.teacher_views=1000000", ["train.teacher_views", "[0, 10,000]"]),
    ("utf16-config", "train:\n  epochs: 1\n".encode("utf-16"), None, ["c.yaml is UTF-16", "save it as UTF-8"]),
    ("latin1-config", "# r\xe9glages\ntrain:\n  epochs: 1\n".encode("latin-1"), None,
     ["c.yaml is not UTF-8 text (byte 3", "save it as UTF-8"]),  # was "not valid YAML: UnicodeDecodeError"
]


@pytest.mark.parametrize("raw, override, needles", [c[1:] for c in OUT_OF_BOUNDS], ids=[c[0] for c in OUT_OF_BOUNDS])
def test_out_of_bounds_integers_and_non_utf8_configs_are_refused(raw, override, needles, tmp_path, capsys):
    """Integer settings have upper bounds (an epochs typo ran forever); a config saved as UTF-16 or Latin-1 is
    refused naming the file and the fix."""
    argv = ["train", "--data", "digits", "--model", "mlp:8", "--no-progress"]  # no --epochs: the file's is read
    if raw is not None:
        cfg = tmp_path / "c.yaml"
        cfg.write_bytes(raw)
        argv += ["--config", str(cfg)]
    if override is not None:
        argv += ["--set", override]
    line = _refused(argv, tmp_path / "out", capsys)
    for needle in needles:
        assert needle in line, (needle, line)


def test_epochs_beyond_a_million_are_refused_naming_the_field(tmp_path):
    """``epochs: 99999999999999999999999`` ran forever (checked on the typed section, so a regression fails
    here at once instead of hanging a CLI run)."""
    from kdistill.config.schema import train_section

    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 99999999999999999999999\n")
    with pytest.raises(ValueError, match=r"^train.epochs: must be an integer in \[1, 1,000,000\]"):
        train_section(config.load_yaml(p)["train"])


def test_utf8_configs_with_a_byte_order_mark_and_the_bounds_still_load(tmp_path):
    from kdistill.engine import TrainConfig

    p = tmp_path / "bom.yaml"
    p.write_bytes("\ufefftrain:\n  epochs: 3  # réglages\n".encode("utf-8"))
    assert config.load_yaml(p) == {"train": {"epochs": 3}}
    assert TrainConfig(epochs=10**6, batch_size=2**24, teacher_views=10**4, augment="flip").epochs == 10**6
