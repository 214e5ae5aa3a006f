"""Checks shared by the experiment tests (imported by name: pytest puts this folder on sys.path)."""

import numpy as np
from PIL import Image


def check_deployment(results, out, names):
    """The run ends with a deployment table: ``names`` (teacher first) in order, each measured."""
    table = results["deployment"]
    assert list(table["rows"]) == names and table["teacher"] == names[0]
    for name, row in table["rows"].items():
        assert {"params", "accuracy"} <= set(row), name
    assert "<!-- kdistill:deployment -->" in (out / "results.md").read_text()
    return table["rows"]


def check_png(path, inches, dpi=110):
    """A whole PNG (Pillow decodes every pixel: a truncated file fails) of the figure saved: ``inches`` (w, h) at
    the report's ``dpi``, give or take what ``bbox_inches="tight"`` trims or adds (0.79-1.16x measured), and
    not a blank canvas."""
    with Image.open(path) as im:
        assert im.format == "PNG", path
        im.load()
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    h, w = pixels.shape[:2]
    for got, want in ((w, inches[0] * dpi), (h, inches[1] * dpi)):
        assert 0.7 * want <= got <= 1.25 * want, f"{path.name}: {w}x{h} px for a {inches[0]:g}x{inches[1]:g} in figure"
    assert pixels.std() > 5, f"{path.name}: a blank canvas"


def check_wall_time(results, elapsed_s, parts_s=()):
    """``wall_time_s`` (rounded to 0.01 s) is the run's own time: no more than the ``elapsed_s`` the test measured
    around the whole call, no less than the work done inside it (``parts_s``: e.g. each fit's wall time)."""
    wall = results["wall_time_s"]
    assert 0 < wall <= elapsed_s + 0.01 and wall >= sum(parts_s) - 0.01, (wall, elapsed_s, sum(parts_s))
