"""The layering, read from the code's own imports (an AST walk of every module, imports inside
functions and under ``TYPE_CHECKING`` included):

    launch/ (CLI, launchers)  ->  pipeline/ (config, data, train, evaluate, registry)  ->  models/
    data_prep/ writes shards; pipeline/ reads them only through data_prep.shard_format
    (and prints through data_prep.console, the log lines and progress bars of every layer)

Nothing under pipeline/, models/ or data_prep/ imports launch/; models/ imports neither pipeline/
nor data_prep/; data_prep/ imports neither pipeline/ nor models/; every project import is spelled
``ssl_foundry.<layer>...``; and no two modules import each other, directly or around a loop (a
package's ``__init__`` counts: importing ``a.b.c`` runs ``a`` and ``a.b`` first).

Imports sit at the top of their modules. Inside a function only an optional dependency that may be
missing (``OPTIONAL``) or a module of ours that imports one at its top, each with a ``#`` comment
on its line or just above saying why.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = "ssl_foundry"
LAYERS = ("launch", "pipeline", "models", "data_prep")
FORBIDDEN = {("pipeline", "launch"), ("models", "launch"), ("data_prep", "launch"), ("models", "pipeline"),
             ("models", "data_prep"), ("data_prep", "pipeline"), ("data_prep", "models")}
# (importer, imported layer) -> the only modules the importer may use there.
ONLY_THROUGH = {("pipeline", "data_prep"): (f"{ROOT}.data_prep.shard_format", f"{ROOT}.data_prep.console")}
# Modules outside pyproject's base dependencies: the extras [video], [dali], [deepspeed] (pipeline/extras.py),
# scikit-image ([test]; `foundry prep photos`), TensorBoard (mlflow.tensorboard=true).
OPTIONAL = ("av", "nvidia.dali", "deepspeed", "skimage", "torch.utils.tensorboard")


def project_modules(root: Path) -> dict[str, Path]:
    """``ssl_foundry.pipeline.data.loader`` -> its file, for every module of the four layers."""
    modules = {}
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join((ROOT, *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return modules


def imports(path: Path) -> list[tuple[int, list[str]]]:
    """(line, dotted names) of every import statement: ``import a.b`` gives ``[a.b]``, ``from m import x, y``
    gives ``[m, m.x, m.y]`` (x and y may be modules)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, _names(node)))
    return found


def _names(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    module = "." * node.level + (node.module or "")
    return [module] + [f"{module}.{alias.name}" for alias in node.names]


def _layer(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == ROOT and parts[1] in LAYERS else None


def _executed(dotted: str, modules: dict[str, Path]) -> list[str]:
    """The project modules an import runs: the deepest one it names and the packages above it."""
    parts = dotted.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(2, len(parts) + 1)) if m in modules]


def layering_problems(root: Path) -> list[str]:
    modules = project_modules(root)
    problems = set()
    for module, path in modules.items():
        src = _layer(module)
        where = path.relative_to(root)
        for line, names in imports(path):
            if names[0].startswith(".") or names[0].split(".")[0] in LAYERS:
                problems.add(f"{where}:{line}: import {names[0]}: spell it absolute, {ROOT}.<layer>...")
                continue
            for dst in {_layer(name) for name in names} - {None, src}:
                if (src, dst) in FORBIDDEN:
                    problems.add(f"{where}:{line}: {src}/ must not import {dst}/ ({names[0]})")
                allowed = ONLY_THROUGH.get((src, dst))
                if allowed and any(_layer(n) == dst and n != f"{ROOT}.{dst}"
                                   and not any((n + ".").startswith(a + ".") for a in allowed) for n in names):
                    problems.add(f"{where}:{line}: {src}/ reads {dst}/ only through {' and '.join(allowed)} "
                                 f"({names[0]})")
    return sorted(problems)


def import_cycles(root: Path) -> list[list[str]]:
    """The strongly connected components of more than one module in the import graph (Tarjan)."""
    modules = project_modules(root)
    edges = {m: sorted({t for _, names in imports(p) for name in names for t in _executed(name, modules)} - {m})
             for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in modules:
        if v not in index:
            visit(v)
    return cycles


def _is_optional(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in OPTIONAL)


def _function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements inside functions (at any depth), in line order."""
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(node): node for function in functions for node in ast.walk(function)
              if isinstance(node, (ast.Import, ast.ImportFrom))}
    return sorted(inside.values(), key=lambda node: node.lineno)


def needs_optional(root: Path) -> set[str]:
    """Our modules that import an optional dependency when they are imported (themselves, or through
    another of ours)."""
    modules = project_modules(root)
    top = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        late = {id(node) for node in _function_imports(tree)}
        top[module] = [name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       and id(node) not in late for name in _names(node)]
    needing = {m for m, names in top.items() if any(_is_optional(name) for name in names)}
    while True:
        more = {m for m, names in top.items() if {t for n in names for t in _executed(n, modules)} & needing} - needing
        if not more:
            return needing
        needing |= more


def late_import_problems(root: Path) -> list[str]:
    """Imports inside functions of anything but an optional dependency (or one of our modules that
    needs one), and late imports without a comment saying why."""
    modules, needing = project_modules(root), needs_optional(root)
    problems = []
    for path in modules.values():
        text = path.read_text()
        lines = text.splitlines()
        for node in _function_imports(ast.parse(text, str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else _names(node)[:1]
            late = [n for n in names if not (_is_optional(n) or set(_executed(n, modules)) & needing)]
            where = f"{path.relative_to(root)}:{node.lineno}: import {(late or names)[0]}"
            if late:
                problems.append(f"{where} inside a function: import it at the top of the module (only the optional "
                                f"{', '.join(OPTIONAL)}, and modules of ours importing one, are imported late)")
                continue
            first = node.lineno  # a comment may head a run of late imports
            while first > 1 and lines[first - 2].lstrip().startswith(("import ", "from ")):
                first -= 1
            said = [lines[i - 1] for i in range(first - 1, node.end_lineno + 1) if i >= 1]
            if not any("#" in line for line in said):
                problems.append(f"{where} inside a function: say why in a comment on it or just above")
    return sorted(problems)


def test_the_repository_keeps_its_layers():
    modules = project_modules(REPO)
    assert {_layer(m) for m in modules} == set(LAYERS)
    assert f"{ROOT}.pipeline.config" in modules and f"{ROOT}.data_prep.shard_format" in modules
    assert layering_problems(REPO) == []
    assert import_cycles(REPO) == []
    assert late_import_problems(REPO) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A miniature of the four layers: empty packages plus ``files``."""
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "__init__.py").write_text("")
    for name in ("pipeline/config.py", "models/heads.py", "data_prep/shard_format.py", "data_prep/shards.py",
                 "launch/cli.py"):
        (tmp_path / name).write_text("")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_a_clean_miniature_passes(tmp_path):
    root = _tree(tmp_path, {
        "launch/commands.py": "from ssl_foundry.pipeline import config\nfrom ssl_foundry.data_prep.shards import x\n",
        "pipeline/trainer.py": "import ssl_foundry.models.heads\nfrom ssl_foundry.data_prep.shard_format import y\n",
        "data_prep/shards.py": "from ssl_foundry.data_prep import shard_format\n",
    })
    assert layering_problems(root) == [] and import_cycles(root) == [] and late_import_problems(root) == []


@pytest.mark.parametrize("name, text, problem", [
    ("pipeline/trainer.py", "from ssl_foundry.launch.cli import main\n", "pipeline/ must not import launch/"),
    ("pipeline/trainer.py", "def f():\n    import ssl_foundry.launch.cli\n", "pipeline/ must not import launch/"),
    ("pipeline/trainer.py", "import typing\nif typing.TYPE_CHECKING:\n    from ssl_foundry.launch import cli\n",
     "pipeline/ must not import launch/"),
    ("models/heads.py", "from ssl_foundry.pipeline import config\n", "models/ must not import pipeline/"),
    ("models/heads.py", "from ssl_foundry.data_prep.shard_format import x\n", "models/ must not import data_prep/"),
    ("data_prep/shards.py", "import ssl_foundry.models.heads\n", "data_prep/ must not import models/"),
    ("data_prep/shards.py", "from ssl_foundry.launch import cli\n", "data_prep/ must not import launch/"),
    ("pipeline/loader.py", "from ssl_foundry.data_prep.shards import read_manifest\n",
     "reads data_prep/ only through ssl_foundry.data_prep.shard_format"),
    ("pipeline/loader.py", "from pipeline.config import Config\n", "spell it absolute"),
    ("pipeline/loader.py", "from .config import Config\n", "spell it absolute"),
])
def test_a_forbidden_import_is_found(tmp_path, name, text, problem):
    problems = layering_problems(_tree(tmp_path, {name: text}))
    assert len(problems) == 1 and problem in problems[0] and problems[0].startswith(f"{name}:"), problems


@pytest.mark.parametrize("files, cycle", [
    ({"pipeline/a.py": "from ssl_foundry.pipeline.b import x\n",
      "pipeline/b.py": "def f():\n    from ssl_foundry.pipeline.a import y\n"},
     ["ssl_foundry.pipeline.a", "ssl_foundry.pipeline.b"]),
    ({"data_prep/shards.py": "from ssl_foundry.data_prep import index\n",
      "data_prep/index.py": "from ssl_foundry.data_prep.images import probe\n",
      "data_prep/images.py": "import ssl_foundry.data_prep.shards\n"},
     ["ssl_foundry.data_prep.images", "ssl_foundry.data_prep.index", "ssl_foundry.data_prep.shards"]),
    # a package whose __init__ imports a module that imports from the package
    ({"pipeline/augment/__init__.py": "from ssl_foundry.pipeline.augment.torch_ops import T\n",
      "pipeline/augment/torch_ops.py": "from ssl_foundry.pipeline.augment.spec import S\n",
      "pipeline/augment/spec.py": ""},
     ["ssl_foundry.pipeline.augment", "ssl_foundry.pipeline.augment.torch_ops"]),
])
def test_an_import_cycle_is_found(tmp_path, files, cycle):
    assert import_cycles(_tree(tmp_path, files)) == [cycle]



def test_late_imports_are_the_optional_ones_and_say_why(tmp_path):
    root = _tree(tmp_path, {
        "pipeline/data/dali_loader.py": "import torch\nfrom nvidia.dali import fn\n",
        "pipeline/data/loader.py": "import torch\n\n\ndef build():\n"
                                   "    from ssl_foundry.pipeline.data.dali_loader import Stream  # DALI: optional\n",
        "pipeline/data/video.py": "def decode():\n    import av  # optional: clips only\n",
        "pipeline/strategy.py": "def engine():\n    # optional: ZeRO only\n    import deepspeed\n"
                                "    from deepspeed.utils import x\n",
    })
    assert needs_optional(root) == {"ssl_foundry.pipeline.data.dali_loader"}
    assert late_import_problems(root) == []


@pytest.mark.parametrize("text, problem", [
    ("def f():\n    import torch\n", "import torch inside a function: import it at the top"),
    ("def f():\n    from ssl_foundry.pipeline import config  # late: faster\n",
     "import ssl_foundry.pipeline inside a function: import it at the top"),
    ("class A:\n    def f(self):\n        if True:\n            from torch import nn\n",
     "import torch inside a function: import it at the top"),
    ("def f():\n    import av\n", "import av inside a function: say why"),
    ("def f():\n    x = 1\n    from nvidia.dali import fn\n", "import nvidia.dali inside a function: say why"),
])
def test_a_late_import_is_found(tmp_path, text, problem):
    problems = late_import_problems(_tree(tmp_path, {"pipeline/trainer.py": text}))
    assert len(problems) == 1 and problem in problems[0] and problems[0].startswith("pipeline/trainer.py:"), problems
