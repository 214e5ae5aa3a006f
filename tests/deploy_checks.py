"""Checks shared by the experiment tests (imported by name: pytest puts this folder on sys.path)."""


def check_deployment(results, out, names):
    """The run ends with a deployment table: ``names`` (teacher first) in order, each measured."""
    table = results["deployment"]
    assert list(table["rows"]) == names and table["teacher"] == names[0]
    for name, row in table["rows"].items():
        assert {"params", "accuracy"} <= set(row), name
    assert "<!-- kdistill:deployment -->" in (out / "results.md").read_text()
    return table["rows"]
