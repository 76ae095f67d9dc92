"""The example notebook (docs/examples/quickstart.ipynb) runs from top to bottom in a real Jupyter kernel.

The notebook is committed with its outputs, as a reader sees it on the site. This test runs a copy of it with
nbclient in a fresh folder (the kernel is ``python3``, ipykernel in this interpreter) and checks that no cell
fails and that each cell gives the kinds of output stored with it: a notebook whose stored outputs no longer
match what it does fails here. ``ZIMAGE_UPDATE_NOTEBOOK=1`` writes the fresh outputs back into the notebook
instead, less what went to stderr (docs/development.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "examples" / "quickstart.ipynb"
# read now: the tests' clean environment (conftest.py) removes ZIMAGE_* variables before each test
UPDATE = os.environ.get("ZIMAGE_UPDATE_NOTEBOOK") == "1"


def kinds(cell: Any) -> list[str]:
    """What a code cell shows: ``stdout``, ``error``, or the MIME types of a displayed value. Not stderr: what
    goes there (progress bars, the libraries' warnings) depends on the installation, and is not stored."""
    shown = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            if output["name"] == "stdout":
                shown.append("stdout")
        elif output["output_type"] == "error":
            shown.append("error")
        else:
            shown.append("+".join(sorted(output.get("data", {}))))
    return shown


def code_cells(notebook: Any) -> list[Any]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_notebook_is_committed_executed() -> None:
    stored = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(stored)
    cells = code_cells(stored)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), "run it top to bottom"
    assert not any("error" in kinds(cell) for cell in cells)
    assert any("image/png" in kind for cell in cells for kind in kinds(cell)), "it shows images"
    assert "text/markdown" in " ".join(kind for cell in cells for kind in kinds(cell)), "it shows a plan"
    assert not any(output.get("name") == "stderr" for cell in cells for output in cell.outputs)
    # nothing of the machine that ran it (its folders) in what is stored
    assert not re.search(r"(?<![\w.])/(tmp|home|root|work|usr|opt|Users)/", NOTEBOOK.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_the_notebook_runs_and_gives_the_outputs_stored_with_it(tmp_path: Path) -> None:
    stored = nbformat.read(NOTEBOOK, as_version=4)
    fresh = nbformat.read(NOTEBOOK, as_version=4)
    (tmp_path / "home").mkdir(exist_ok=True)  # HOME (tests/conftest.py), where IPython keeps its profile
    work = tmp_path / "work"
    work.mkdir()
    client = NotebookClient(fresh, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    assert sorted(path.name for path in work.glob("*.png")) == [f"lighthouse-{k}.png" for k in range(4)]
    if UPDATE:
        for cell in code_cells(fresh):
            cell.outputs = [out for out in cell.outputs if out.get("name") != "stderr"]
        nbformat.write(fresh, NOTEBOOK)
    else:
        assert [kinds(cell) for cell in code_cells(fresh)] == [kinds(cell) for cell in code_cells(stored)]
