"""notebooks/quickstart.ipynb runs top to bottom on a CPU, as a new user (or Colab) would run it."""


import nbformat
from nbclient import NotebookClient

from tests.fresh_env import REPO, user_env

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs (Colab runs it fresh)"
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    # A new user's environment: no fake devices from tests/conftest.py; lca importable from this checkout.
    client.execute(env=user_env(PYTHONPATH=str(REPO)))
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "cpu 8 devices" in text, text
    errors = [float(line.split("=")[-1]) for line in text.splitlines() if "max |out - oracle|" in line]
    assert len(errors) == 2 and max(errors) < 1e-4, text
    assert "final loss" in text
    images = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.get("data", {})]
    assert images, "the loss plot was not drawn"
