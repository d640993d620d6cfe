"""The README's promises are tests.

* The settings table lists every ``GenesisCheckpoint`` argument with its real default (checked against the
  signature), so it cannot fall behind the code.
* The Genesis API guide (``docs/genesis-api.md``, linked from the README) is runnable: each python block runs
  as-is in a fresh directory.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
API_GUIDE = ROOT / "docs" / "genesis-api.md"
SETTINGS = "## Settings"


def api_reference_examples() -> list[tuple[str, str]]:
    """``(section heading, code)`` of every python block in the Genesis API guide."""
    examples = []
    heading = API_GUIDE.name
    for part in re.split(r"(?m)^(## .*)$", API_GUIDE.read_text()):
        if part.startswith("## "):
            heading = part[3:].strip()
            continue
        for code in re.findall(r"```python\n(.*?)```", part, flags=re.S):
            examples.append((heading, code))
    return examples


def settings_table() -> dict[str, str]:
    """``{argument: default as written}`` from the README's settings table."""
    text = README.read_text()
    start = text.index(SETTINGS)
    end = text.find("\n## ", start + len(SETTINGS))
    rows = re.findall(r"(?m)^\| `(\w+)` \| (.+?) \|", text[start:end])
    return dict(rows)


def test_settings_table_matches_the_signature() -> None:
    from lightning_genesis_ckpt import GenesisCheckpoint

    params = {
        name: p
        for name, p in inspect.signature(GenesisCheckpoint.__init__).parameters.items()
        if name != "self"
    }
    table = settings_table()
    assert list(table) == list(params), "the README's settings table must list every argument, in order"
    for name, param in params.items():
        written = table[name].strip("`")
        if param.default is inspect.Parameter.empty:
            assert written == "required", name
        else:
            assert ast.literal_eval(written) == param.default, (
                f"{name}: README says {written}, default is {param.default!r}"
            )


EXAMPLES = api_reference_examples()
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


def test_every_public_name_has_an_example() -> None:
    code = "\n".join(c for _, c in EXAMPLES)
    for name in (
        "genesis.save(", "genesis.load(", "save_checkpoint(", "load_checkpoint(", 'serializer="dill"',
        "CheckpointManager(", "save_best_model(", "load_best_model(", "save_epoch_checkpoint(",
        "load_latest_checkpoint(", "save_interrupt_checkpoint(", "validate_checkpoint(",
        "load_state_dict_into(", "genesis.export(", "save_version(", "tag_version(", "list_versions(",
        "load_version(", "import_checkpoint(",
    ):  # fmt: skip
        assert name in code, f"docs/genesis-api.md has no example using {name}"


@pytest.mark.parametrize(("heading", "code"), EXAMPLES, ids=[h for h, _ in EXAMPLES])
def test_readme_example_runs(
    heading: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"docs/genesis-api.md: {heading}", "exec"), {"__name__": "__readme__"})
