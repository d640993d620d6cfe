"""Re-executes notebooks/quickstart.ipynb in place so that the committed copy carries its outputs.

Run it after editing the notebook: ``.venv/bin/python notebooks/execute.py``. Timing metadata is not
recorded, so a re-run changes only what the outputs themselves change.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent / "quickstart.ipynb"


def main() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with tempfile.TemporaryDirectory() as cwd:  # any file the notebook writes by mistake lands here
        NotebookClient(
            nb, timeout=300, kernel_name="python3", record_timing=False, resources={"metadata": {"path": cwd}}
        ).execute()
    nbformat.write(nb, NOTEBOOK)
    print(f"executed and saved {NOTEBOOK}")


if __name__ == "__main__":
    main()
