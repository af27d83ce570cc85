"""Every notebook in notebooks/ runs top to bottom (tiny preset) in a kernel of this interpreter.

The notebooks need only the ``test`` extra: NetKet and kfac-jax rows are skipped when absent.
"""

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from benchmarks.notebooks import execute, notebook_paths

PATHS = notebook_paths()


def test_notebooks_exist():
    assert {p.name for p in PATHS} >= {"quickstart.ipynb", "sr_benchmark.ipynb", "kfac.ipynb"}


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_executes(path):
    nb = execute(path, preset="tiny", timeout=600)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
