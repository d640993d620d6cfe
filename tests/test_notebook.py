"""notebooks/quickstart.ipynb is committed with its outputs (the plot shows on GitHub), and it still runs.

The test re-executes it (so it cannot rot), with the kernel's temp directory pointed at a fresh folder, and
checks that the plot is shown inline and that the notebook removes the checkpoint directory it made. After an
edit, refresh the committed outputs with ``.venv/bin/python notebooks/execute.py``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def stdout_text(nb: nbformat.NotebookNode) -> str:
    return "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.get("name") == "stdout"
    )


def has_inline_png(nb: nbformat.NotebookNode) -> bool:
    return any(
        "image/png" in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def check_story(text: str) -> None:
    assert "fit stopped: simulated preemption" in text
    assert "resumed from interrupt_checkpoint.pth" in text
    assert "finished at epoch 8" in text
    assert "epochs: [0, 1, 2, 3, 4, 5, 6, 7]" in text
    assert "removed the checkpoint directory" in text


def test_committed_notebook_has_its_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells), "run notebooks/execute.py"
    assert has_inline_png(nb), "the committed notebook shows no plot: run notebooks/execute.py"
    check_story(stdout_text(nb))


@pytest.mark.timeout(600)
def test_notebook_executes_shows_the_plot_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    # After the notebook's own cells: where did it put the checkpoints? (tempfile reads TMPDIR.)
    nb.cells.append(nbformat.v4.new_code_cell("print('CKPT_DIR=' + CKPT_DIR)"))
    system_tmp = tmp_path / "tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    work = tmp_path / "cwd"
    work.mkdir()
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    ).execute()

    text = stdout_text(nb)
    check_story(text)
    assert has_inline_png(nb), "the metric plot is not displayed inline"
    ckpt_dir = Path(text.split("CKPT_DIR=")[1].split()[0])
    assert ckpt_dir.parent == system_tmp, ckpt_dir
    assert not ckpt_dir.exists(), f"the notebook left {ckpt_dir} behind"
    assert list(system_tmp.glob("genesis-quickstart-*")) == []
    assert list(work.iterdir()) == [], "the notebook wrote into its working directory"
