"""The layering of the dalg packages, read from the import statements of every module (issue 13 item 6).

- ``dalg.models`` holds nn.Modules: it imports no other dalg package but ``dalg.utils``, and no Hydra,
  matplotlib or Lightning;
- ``dalg.data`` does not import ``dalg.models``;
- ``dalg.retrieval`` does not import ``dalg.models`` or ``dalg.lit``;
- ``dalg.utils`` is the ground floor: it imports no other dalg package;
- none of these four imports ``dalg.tools`` (the tools behind the entry points stand above them).

Every import counts, at the top of a module or inside a function, so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass(frozen=True)
class Rule:
    package: str  # the rule applies to this package and its submodules
    forbidden: tuple[str, ...]  # imported modules (and their submodules) it may not import
    allowed: tuple[str, ...] = ()  # exceptions inside a forbidden prefix

    def breaks(self, imported: str) -> bool:
        if imported == "dalg":  # the bare root package (``from dalg import x`` is judged by dalg.x)
            return False
        inside = lambda prefixes: any(imported == p or imported.startswith(p + ".") for p in prefixes)  # noqa: E731
        return inside(self.forbidden) and not inside(self.allowed)


RULES = (
    Rule(
        "dalg.models",
        ("dalg", "hydra", "matplotlib", "pytorch_lightning", "lightning"),
        allowed=("dalg.models", "dalg.utils"),
    ),
    Rule("dalg.data", ("dalg.models", "dalg.tools")),
    Rule("dalg.retrieval", ("dalg.models", "dalg.lit", "dalg.tools")),
    Rule("dalg.utils", ("dalg",), allowed=("dalg.utils",)),
)

# Violations the owners of these modules have still to remove; each entry must still be a violation (the list
# only shrinks): dalg.utils.config_checks checks a whole training config, data and model (it belongs above them).
KNOWN = {
    ("dalg.utils.config_checks", "dalg.models.pretrained"),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(module imported, line) for every import statement; relative imports resolved against ``module``;
    ``from pkg import name`` also yields ``pkg.name`` (a submodule, or an attribute: either is a dependency)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno))
            out += [(f"{target}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*"]
    return out


def violations(root: Path, rules: tuple[Rule, ...] = RULES) -> list[tuple[str, str, str]]:
    """(module, imported module, 'file:line') for every import that breaks a rule, over all modules in ``root``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        applicable = [r for r in rules if module == r.package or module.startswith(r.package + ".")]
        if not applicable:
            continue
        seen = set()
        for imported, line in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            for rule in applicable:
                if rule.breaks(imported):
                    # `from dalg.data import x` yields dalg.data and dalg.data.x: report the statement once
                    key = (module, line)
                    if key not in seen:
                        seen.add(key)
                        found.append((module, imported, f"{path.relative_to(root)}:{line}"))
    return found


def test_dalg_keeps_its_layering() -> None:
    found = violations(SRC)
    new = [f"{m} imports {i} ({where})" for m, i, where in found if (m, i) not in KNOWN]
    assert not new, "layering broken (see this file's docstring):\n" + "\n".join(new)
    stale = KNOWN - {(m, i) for m, i, _ in found}
    assert not stale, f"no longer violations, remove them from KNOWN: {sorted(stale)}"


def _write(root: Path, module: str, source: str) -> None:
    path = root / Path(*module.split("."))
    path = path / "__init__.py" if source.startswith("#pkg") else path.with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)


def test_checker_finds_every_kind_of_bad_import(tmp_path: Path) -> None:
    for pkg in ("dalg", "dalg.models", "dalg.data", "dalg.retrieval", "dalg.utils", "dalg.lit"):
        _write(tmp_path, pkg, "#pkg\n")
    _write(
        tmp_path,
        "dalg.models.bad",
        "import torch\n"
        "from dalg.data.transforms import EvalTransform\n"  # absolute from-import
        "import hydra.utils\n"  # a forbidden third-party package
        "from ..lit import module\n"  # relative, two levels
        "from dalg import retrieval\n"  # a package imported as a name
        "def f():\n"
        "    import matplotlib.pyplot\n"  # lazy, inside a function
        "from dalg.models.fusion import Fusion\n"  # allowed: its own package
        "from dalg.utils.atomic import write_text_atomic\n"  # allowed: the ground floor
        "from . import fusion\n",  # allowed: relative, own package
    )
    _write(tmp_path, "dalg.data.bad", "from dalg.models.composer import DALG\n")
    _write(tmp_path, "dalg.retrieval.bad", "import dalg.lit.module\nfrom dalg.utils import atomic\n")
    _write(tmp_path, "dalg.utils.bad", "from dalg.data import transforms\n")
    _write(tmp_path, "dalg.lit.fine", "from dalg.models.composer import DALG\nimport hydra\n")
    found = {(m, i) for m, i, _ in violations(tmp_path)}
    assert found == {
        ("dalg.models.bad", "dalg.data.transforms"),
        ("dalg.models.bad", "hydra.utils"),
        ("dalg.models.bad", "dalg.lit"),
        ("dalg.models.bad", "dalg.retrieval"),
        ("dalg.models.bad", "matplotlib.pyplot"),
        ("dalg.data.bad", "dalg.models.composer"),
        ("dalg.retrieval.bad", "dalg.lit.module"),
        ("dalg.utils.bad", "dalg.data"),
    }
    where = {m: w for m, i, w in violations(tmp_path) if i == "matplotlib.pyplot"}
    assert where["dalg.models.bad"] == "dalg/models/bad.py:7"


@pytest.mark.parametrize(
    "module, is_package, line, expected",
    [
        ("dalg.models.fusion", False, "from .heads import MarginHead", "dalg.models.heads"),
        ("dalg.models", True, "from .heads import MarginHead", "dalg.models.heads"),
        ("dalg.models.fusion", False, "from ..data import transforms", "dalg.data"),
    ],
)
def test_relative_imports_resolve(module: str, is_package: bool, line: str, expected: str) -> None:
    assert imported_modules(line, module, is_package)[0][0] == expected
