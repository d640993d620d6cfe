"""The package's shape: layers without cycles, storage behind an interface, small modules, a small namespace.

Layers, lowest first; a module may import from its own layer and the ones below, never above:

* ``core``: records, names, the manifest, policies: pure, no I/O;
* ``storage``: commit strategies, the lock, the transaction, reading, recovery, serialization;
* ``adapter``: the Lightning callback and what only it needs;
* ``api``: the Genesis-API facades (save/load, CheckpointManager, versions, import, export, tools); only
  ``export`` reaches into the adapter, lazily, for a LightningModule's own constructor rules;
* the package itself (``__init__``, ``__main__``) and the CLI.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_genesis_ckpt

PACKAGE = Path(lightning_genesis_ckpt.__file__).resolve().parent
LAYERS = {"core": 0, "storage": 1, "adapter": 2, "api": 3, "": 4}
# Modules of the standard library (and nothing else) the pure core may use: no files, no network, no torch.
CORE_MAY_IMPORT = {
    "__future__", "collections", "dataclasses", "datetime", "enum", "functools", "json", "math", "pickle", "re",
    "typing", "zlib",
}  # fmt: skip


def modules() -> dict[str, Path]:
    """Dotted name relative to the package (``storage.lock``) -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(parts)] = path
    return out


def layer(module: str) -> str:
    head = module.split(".")[0]
    return head if head in ("core", "storage", "adapter", "api") else ""


def package_imports(module: str, path: Path) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its body (functions included)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    known = modules()
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level:
            anchor = base[: len(base) - node.level + 1] if node.level > 1 else base
            prefix = [*anchor, *(node.module.split(".") if node.module else [])]
            targets = [".".join([*prefix, alias.name]) for alias in node.names] + [".".join(prefix)]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("lightning_genesis_ckpt")
        ):
            prefix = node.module.split(".")[1:]
            targets = [".".join([*prefix, alias.name]) for alias in node.names] + [".".join(prefix)]
        for target in targets:
            if target in known and target != module:
                found.add(target)
                break
    return found


def test_no_module_is_longer_than_400_lines() -> None:
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_modules_live_in_layers() -> None:
    top = {m for m in modules() if "." not in m and m not in ("core", "storage", "adapter", "api")}
    assert top == {"", "__main__", "cli"}, "everything but the entry points belongs to a layer"


def test_imports_only_point_down_and_have_no_cycle() -> None:
    graph = {m: package_imports(m, p) for m, p in modules().items()}
    upward = [
        f"{m} -> {t}" for m, targets in graph.items() for t in targets if LAYERS[layer(t)] > LAYERS[layer(m)]
    ]
    assert upward == []
    # A cycle is a path back to where it started; the graph is small enough for a depth-first search.
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt == path[0]:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in path and nxt > path[0]:
                visit(nxt, [*path, nxt])

    for start in graph:
        visit(start, [start])
    assert cycles == []


def test_the_core_does_no_io() -> None:
    for module, path in modules().items():
        if layer(module) != "core":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            assert set(names) <= CORE_MAY_IMPORT, f"{module} imports {names}"


def _our_private_names() -> set[str]:
    """Private methods and attributes that the package's own classes define."""
    names: set[str] = set()
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for item in ast.walk(node):
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith(
                        "_"
                    ):
                        names.add(item.name)
                    if (
                        isinstance(item, ast.Attribute)
                        and isinstance(item.value, ast.Name)
                        and item.value.id == "self"
                        and isinstance(getattr(item, "ctx", None), ast.Store)
                    ):
                        names.add(item.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_nothing_outside_the_storage_layer_reaches_into_a_store() -> None:
    """No filesystem handle or commit strategy outside ``storage``, and no module calls a private member of
    another object of ours (a store's, a reader's): every layer talks to the next through its public API."""
    ours = _our_private_names()
    offences = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if layer(module) != "storage" and node.attr in ("fs", "commit_strategy", "loc", "objects"):
                offences.append(f"{module}:{node.lineno} .{node.attr}")
            if node.attr in ours and owner not in ("self", "cls"):
                offences.append(f"{module}:{node.lineno} .{node.attr} of {owner or 'an expression'}")
    assert offences == []


PUBLIC = {
    "AnyOf", "BestN", "CheckpointCorruptError", "CheckpointManager", "CheckpointRecord", "CheckpointSaveError",
    "CheckpointStore", "EveryNSeconds", "EveryNSteps", "FabricCheckpointer", "FrozenBaseMismatchError", "GenesisCheckpoint", "GenesisCheckpointError", "KeepFor",
    "LatestN", "LoadReport", "ManifestError", "MonitorNotFoundError", "StoreLockedError",
    "UnsafeCheckpointError", "Version", "__version__", "export", "import_checkpoint", "list_versions", "load",
    "load_checkpoint", "load_state_dict_into", "load_version", "save", "save_checkpoint", "save_version",
    "tag_version", "validate_checkpoint",
}  # fmt: skip


def test_the_public_namespace_is_what_users_call() -> None:
    assert set(lightning_genesis_ckpt.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(lightning_genesis_ckpt, name) is not None


@pytest.mark.parametrize(
    "code",
    [
        "import lightning_genesis_ckpt, lightning_genesis_ckpt.cli",
        "from lightning_genesis_ckpt import CheckpointStore, CheckpointManager, save, load",
    ],
)
def test_the_store_and_the_cli_do_not_import_lightning(code: str) -> None:
    check = f"{code}; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
