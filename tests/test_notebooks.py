"""Execute every notebook top to bottom; any cell that raises fails the test. Notebooks are stored without outputs."""
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    stored = json.loads(path.read_text())
    assert not any(c.get("outputs") for c in stored["cells"] if c["cell_type"] == "code"), \
        f"{path.name} is committed with outputs: clear them (jupyter nbconvert --clear-output --inplace)"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
