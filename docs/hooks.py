"""mkdocs hook: every public name, and every public method of a public class, has a docstring.

mkdocstrings renders a name without a docstring as a bare signature and says nothing, so ``mkdocs build
--strict`` would pass with holes in the API reference. This hook logs a warning for each one, which
``--strict`` turns into a failed build. It reads the sources statically (griffe), so torch is not imported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import griffe

log = logging.getLogger("mkdocs.plugins.genesis_docstrings")
ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "lightning_genesis_ckpt"
# Lightning's hooks and Callback methods that GenesisCheckpoint overrides: Lightning documents them, and the
# API reference leaves them out (the same list is in mkdocs.yml's ``filters``).
LIGHTNING_OVERRIDES = {"setup", "teardown", "state_dict", "load_state_dict"}


def public_names() -> dict[str, str]:
    """``{public name: defining module}``, from the package's lazy-export table (importing it is cheap)."""
    import lightning_genesis_ckpt

    exports: dict[str, str] = lightning_genesis_ckpt._EXPORTS
    return {name: PACKAGE + module for name, module in exports.items()}


def missing_docstrings() -> list[str]:
    """Dotted paths of the public objects that have no docstring."""
    package = griffe.load(PACKAGE, search_paths=[str(ROOT)], docstring_parser="google")
    missing = []
    for name, module in sorted(public_names().items()):
        obj = package[module.removeprefix(PACKAGE + ".")][name]
        if not obj.docstring:
            missing.append(f"{module}.{name}")
        if obj.is_class:
            for member_name, member in obj.all_members.items():  # with those inherited in the package
                if member_name.startswith(("_", "on_")) or member_name in LIGHTNING_OVERRIDES:
                    continue
                if member.is_function and not member.docstring:
                    missing.append(f"{module}.{name}.{member_name}")
    return missing


def missing_from_reference(page: Path) -> list[str]:
    """Public names that the API reference page does not render (``::: module.name``)."""
    text = page.read_text()
    return [
        f"{module}.{name}"
        for name, module in sorted(public_names().items())
        if f"::: {module}.{name}\n" not in text
    ]


def on_pre_build(config: Any) -> None:
    for path in missing_docstrings():
        log.warning(f"{path} has no docstring: the API reference would show a bare signature")
    for path in missing_from_reference(Path(config["docs_dir"]) / "reference" / "api.md"):
        log.warning(f"{path} is public but docs/reference/api.md does not show it: add '::: {path}'")
