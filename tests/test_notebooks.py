"""The notebooks run top to bottom against a small real-model store, and fail on any error.

Each notebook has a cell tagged `parameters` (STORE = "../store_data", ...); the test inserts a
cell after it that sets STORE to a private copy of the 160-row real store with a small SAE (see
the `analytics_store` fixture of tests/conftest.py), as papermill would, and executes with nbclient in the
notebooks/ folder. Committed notebooks carry no outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, params: dict):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, cell)
    # Raises CellExecutionError (with the cell and traceback) on the first failing cell.
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def _text(nb) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", ""))
            out.extend(str(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(out)


@pytest.mark.parametrize("name", ["store_tour.ipynb", "feature_metadata_correlations.ipynb"])
def test_committed_without_outputs(name):
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_store_tour_runs(analytics_store, copy_store):
    nb = execute("store_tour.ipynb", {"STORE": str(copy_store(analytics_store))})
    text = _text(nb)
    assert "hidden/layer_17" in text and "eval AUROC for 'math'" in text and "content tokens, mean norm" in text


@pytest.mark.slow
def test_feature_metadata_correlations_runs(analytics_store, copy_store):
    from store.core import Store

    store = copy_store(analytics_store)
    nb = execute("feature_metadata_correlations.ipynb", {"STORE": str(store)})
    text = _text(nb)
    assert "Category is everywhere" in text and "best `math` feature" in text
    assert sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])) >= 3
    # The notebook computed the associations into the catalog, where SQL sees them.
    n = Store(store).query("SELECT count(*) AS n FROM feature_metadata_assoc WHERE stat = 'auroc'").column(0)[0]
    assert n.as_py() > 0
