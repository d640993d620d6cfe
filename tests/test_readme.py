"""The README's API reference examples are tests: each python block runs as-is in a fresh directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## API reference"


def api_reference_examples() -> list[tuple[str, str]]:
    """``(subsection heading, code)`` of every python block in the API reference section."""
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else None]
    examples = []
    heading = SECTION
    for part in re.split(r"(?m)^(### .*)$", section):
        if part.startswith("### "):
            heading = part[4:].strip()
            continue
        for code in re.findall(r"```python\n(.*?)```", part, flags=re.S):
            examples.append((heading, code))
    return examples


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
        assert name in code, f"the README's API reference has no example using {name}"


@pytest.mark.parametrize(("heading", "code"), EXAMPLES, ids=[h for h, _ in EXAMPLES])
def test_readme_example_runs(
    heading: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md: {heading}", "exec"), {"__name__": "__readme__"})
