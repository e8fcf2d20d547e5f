"""The layering rule: backbone knowledge lives in ``m4v_convert/backbones/``, reached from
everywhere else only through the backbone registry.

Walks the source of ``cli.py`` and every ``m4v_convert`` module outside ``backbones/`` with
``ast`` and lists each place that

- imports a backbone module other than the registry (``import`` statements anywhere, including
  function-local ones, relative imports resolved);
- compares a value with a backbone family's name (``x == "wan"``, ``x in ("pyramidflow", ...)``)
  or defaults a parameter to one (``job="wan"``);
- defines a backbone's own function or class (a top-level name with ``wan`` or ``pyramidflow`` as
  a word; ``cli.py``'s commands are named after the backbones they run and are not counted).

``KNOWN`` is what is left of the violations the rule found when it was written (41); each refactoring
step removed entries.
The test fails both on a new violation and on a listed one that is gone (so the list only shrinks
and always says what is left).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "m4v_convert"
REGISTRY = "m4v_convert.backbones.registry"

# (file, what): what is "imports <module>", "names <family>" (a comparison or a default) or
# "defines <name>".
KNOWN: set[tuple[str, str]] = set()

BACKBONE_WORD = re.compile(r"(^|_)(wan|pyramidflow)(_|$)")


def family_names() -> set[str]:
    """The backbone families the shipped recipes name (``backbone:``)."""
    names = set()
    for path in (ROOT / "recipes").glob("*.yaml"):
        backbone = (yaml.safe_load(path.read_text()) or {}).get("backbone")
        if backbone:
            names.add(backbone)
    return names


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def checked_files() -> list[Path]:
    files = [ROOT / "cli.py"]
    files += [p for p in sorted(PACKAGE.rglob("*.py")) if "backbones" not in p.relative_to(PACKAGE).parts[:1]]
    return files


def imported_modules(tree: ast.AST, path: Path) -> set[str]:
    """Every module an ``import`` in ``tree`` names (``from a import b`` counts ``a`` and ``a.b``,
    since ``b`` may be a submodule)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def is_backbone_module(name: str) -> bool:
    return name.startswith("m4v_convert.backbones.") and name != REGISTRY and not name.startswith(REGISTRY + ".")


def backbone_imports(tree: ast.AST, path: Path) -> set[str]:
    names = {n for n in imported_modules(tree, path) if is_backbone_module(n)}
    # ``from m4v_convert.backbones.wan.model import M4VWan...`` also yields ``...wan.M4VWan...``: keep
    # the module, i.e. the shortest name each import statement gave
    return {n for n in names if not any(n.startswith(m + ".") for m in names)}


def compared_names(tree: ast.AST, families: set[str]) -> set[str]:
    """Family names a comparison tests for, or a parameter defaults to (``job: str = "wan"``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arguments):
            found.update(d.value for d in [*node.defaults, *node.kw_defaults]
                         if isinstance(d, ast.Constant) and d.value in families)
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            for value in values:
                if isinstance(value, ast.Constant) and value.value in families:
                    found.add(value.value)
    return found


def is_cli_command(node: ast.AST) -> bool:
    return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"
               for d in getattr(node, "decorator_list", []))


def backbone_definitions(tree: ast.Module) -> set[str]:
    return {node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and BACKBONE_WORD.search(node.name.lower()) and not is_cli_command(node)}


def violations() -> set[tuple[str, str]]:
    families = family_names()
    found = set()
    for path in checked_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(ROOT).as_posix()
        found.update((rel, f"imports {m}") for m in backbone_imports(tree, path))
        found.update((rel, f"names {n!r}") for n in compared_names(tree, families))
        found.update((rel, f"defines {n}") for n in backbone_definitions(tree))
    return found


def test_the_walker_sees_each_kind_of_violation(tmp_path):
    """The detectors on a hand-written module: a relative import of a backbone, a local import,
    a name comparison inside a tuple, a name as a default, a backbone-named function; the registry import is allowed."""
    source = (
        "from m4v_convert.backbones.registry import get\n"
        "from ..backbones.wan import M4VWanTransformer3DModel\n"
        "def run(rec):\n"
        "    from m4v_convert.backbones.pyramidflow import loader\n"
        "    return rec.backbone in ('pyramidflow', 'other')\n"
        "def wan_helper(kind='generic'):\n"
        "    return 'wan'\n"
    )
    path = PACKAGE / "flops" / "example.py"  # only its place in the package matters
    tree = ast.parse(source)
    assert backbone_imports(tree, path) == {"m4v_convert.backbones.wan", "m4v_convert.backbones.pyramidflow"}
    assert compared_names(tree, {"wan", "pyramidflow", "generic"}) == {"pyramidflow", "generic"}
    assert backbone_definitions(tree) == {"wan_helper"}
    assert family_names() >= {"wan", "pyramidflow", "generic"}


def test_backbone_knowledge_stays_in_backbones():
    found = violations()
    new = sorted(found - KNOWN)
    gone = sorted(KNOWN - found)
    assert not new, ("backbone knowledge outside m4v_convert/backbones/ (reach a backbone through "
                     f"{REGISTRY}):\n" + "\n".join(f"  {f}: {w}" for f, w in new))
    assert not gone, "fixed, so remove from KNOWN in tests/test_layering.py:\n" + "\n".join(
        f"  {f}: {w}" for f, w in gone)
