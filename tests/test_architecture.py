"""The import rules of docs/architecture.md, checked on the source: every import of every module
of aofp_ext (also those inside functions), and the includes of csrc/kernels."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "aofp_ext"
PRUNING = ["aofp_ext.search", "aofp_ext.pricing", "aofp_ext.criteria", "aofp_ext.pruner",
           "aofp_ext.cli"]
OTHERS = "aofp_ext.*"  # every module of aofp_ext except the part itself

# part (module or package) -> what it must not import (prefixes; OTHERS: anything of aofp_ext)
RULES: dict[str, list[str]] = {
    "aofp_ext.ops": ["aofp_ext.graph", "aofp_ext.surgery", *PRUNING],
    "aofp_ext._loader": ["aofp_ext.graph", "aofp_ext.surgery", *PRUNING],
    "aofp_ext.graph": PRUNING,
    "aofp_ext.surgery": PRUNING,
    "aofp_ext.flops": PRUNING,
    "aofp_ext.models": [OTHERS],
    "aofp_ext.data": [OTHERS],
    "aofp_ext.distributed": [OTHERS],
    "aofp_ext.search": [OTHERS, "torch.nn", "torch.fx"],
    "aofp_ext.pricing": ["aofp_ext.criteria", "aofp_ext.pruner", "aofp_ext.cli"],
    "aofp_ext.criteria": ["aofp_ext.pruner", "aofp_ext.cli"],
    "aofp_ext.checkpoint": ["aofp_ext.pruner", "aofp_ext.cli"],
    "aofp_ext.pruner": ["aofp_ext.cli"],
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved; ``from X import name`` also
    counts as importing ``X.name`` (it may be a module)."""
    mod = module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def breaks(name: str, rule: str, part: str) -> bool:
    if rule == OTHERS:
        return name.startswith("aofp_ext.") and not (name == part or
                                                      name.startswith(part + "."))
    return name == rule or name.startswith(rule + ".")


MODULES = sorted(PKG.rglob("*.py"))


def test_every_part_is_found() -> None:
    names = {module_name(p) for p in MODULES}
    for part in RULES:
        assert part in names, f"{part} (a part of docs/architecture.md) not found"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_docs_architecture(path: Path) -> None:
    mod = module_name(path)
    got = imports(path)
    for part, rules in RULES.items():
        if mod == part or mod.startswith(part + "."):
            bad = sorted(n for n in got for r in rules if breaks(n, r, part))
            assert not bad, f"{mod} imports {bad}: docs/architecture.md forbids it for {part}"
    if not mod.startswith("aofp_ext.cli"):
        bad = sorted(n for n in got if n == "aofp_ext.cli" or n.startswith("aofp_ext.cli."))
        assert not bad, f"{mod} imports the command line ({bad})"


def test_imports_are_seen() -> None:
    """The checker itself: relative imports resolve, function-level imports count."""
    got = imports(PKG / "pruner" / "cut.py")
    assert {"aofp_ext.distributed", "aofp_ext.surgery", "aofp_ext.pruner.plan"} <= got
    got = imports(PKG / "cli" / "build.py")  # imports inside functions only
    assert {"aofp_ext.models", "aofp_ext.checkpoint", "aofp_ext.distributed"} <= got
    assert breaks("aofp_ext.ops", OTHERS, "aofp_ext.search")
    assert not breaks("aofp_ext.models.lenet", OTHERS, "aofp_ext.models")


def test_kernels_include_no_torch() -> None:
    files = [p for p in (ROOT / "csrc" / "kernels").iterdir() if p.is_file()]
    assert files
    include = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)
    for path in files:
        for header in include.findall(path.read_text()):
            assert not re.match(r"(torch|ATen|c10|pybind11)/", header), (
                f"{path.relative_to(ROOT)} includes {header}: csrc/kernels is torch-free")
