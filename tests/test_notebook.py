"""The quickstart notebook runs from top to bottom and is committed without outputs."""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the dev extra (nbformat, nbclient)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs the dev extra (nbformat, nbclient)")

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), \
        "clear the notebook's outputs before committing it"


@pytest.mark.slow
def test_notebook_runs_and_shows_pictures():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError naming the cell if any cell fails
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 3, "expected the explanation grids (and the matplotlib figure) inline"
    text = "".join(out.get("text", "") for out in outputs)
    assert "tabby" in text and "espresso" in text, text
