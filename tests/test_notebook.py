"""notebooks/quickstart.ipynb executes top to bottom in smoke mode (nbclient, a real kernel)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("RL_REASON_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("RL_REASON_NOTEBOOK_DIR", str(tmp_path / "runs"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "smoke mode" in text
    assert "accuracy" in text and "process" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the demo's curves and the ablation's inline plot
    # Both arms ran in the notebook's run directory and shared one cached base model.
    summaries = list((tmp_path / "runs").glob("*/summary.json"))
    assert len(summaries) == 2
    # One base model, its lock file, and no unfinished pretraining left behind.
    entries = sorted(p.name for p in (tmp_path / "runs" / "base").iterdir())
    models = [name for name in entries if not name.startswith(".")]
    assert len(models) == 1 and entries == sorted([models[0], f".{models[0]}.lock"])
