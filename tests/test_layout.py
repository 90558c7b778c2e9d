"""The front page stays a front page, its links and the docs' links resolve, and imports run
one way through the layers docs/layout.md describes."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("coatnet_scale", "dataprep", "monitoring", "launch")

# Longest prefix wins. Within a layer each component imports only itself (data ≠ dataprep).
LAYERS = {
    "coatnet_scale.storage": 0, "coatnet_scale.shard_format": 0, "coatnet_scale.batch": 0, "monitoring": 0,
    "coatnet_scale.config": 1,
    "coatnet_scale.models": 2,
    "coatnet_scale.data": 3, "dataprep": 3, "coatnet_scale.plan_checkpointing": 3,
    "coatnet_scale.plan": 4,
    "coatnet_scale.engine": 5,
    "coatnet_scale": 6, "coatnet_scale.models.__main__": 6, "coatnet_scale.data.__main__": 6,
    "launch": 7,
}


def component(module: str) -> str:
    return max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the project in a file, those inside functions too;
    `from package import module` names the module."""
    modules = {module_name(p) for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.append((node.lineno, name if name in modules else node.module))
    return sorted({(line, name) for line, name in found if name.split(".")[0] in PACKAGES})


def test_imports_run_one_way():
    wrong = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            importer = component(module_name(path))
            for line, imported in project_imports(path):
                target = component(imported)
                if LAYERS[target] > LAYERS[importer] or (LAYERS[target] == LAYERS[importer] and target != importer
                                                         and not target.startswith(importer + ".")
                                                         and not importer.startswith(target + ".")):
                    wrong.append(f"{path.relative_to(REPO)}:{line} ({importer}, layer {LAYERS[importer]}) imports "
                                 f"{imported} ({target}, layer {LAYERS[target]})")
    assert not wrong, "imports against the layers of docs/layout.md:\n" + "\n".join(wrong)


def test_the_layer_check_sees_a_wrong_import(tmp_path):
    """The walk finds imports inside functions and by `from package import module`."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from coatnet_scale import pretrain\n    import dataprep.prep\n")
    assert project_imports(sample) == [(2, "coatnet_scale.pretrain"), (3, "dataprep.prep")]
    assert component("coatnet_scale.pretrain") == "coatnet_scale" and LAYERS["coatnet_scale"] > LAYERS["dataprep"]


def test_readme_is_a_front_page():
    text = (REPO / "README.md").read_text()
    assert len(text) <= 12_000, f"README.md is {len(text):,} characters; reference belongs in docs/"
    for heading in ("## Quick start", "## On a cluster", "## Measured", "## Documentation"):
        assert heading in text
    linked = set(re.findall(r"\]\((docs/[^)#]+)", text))
    assert linked >= {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}, "every docs page is in the README's map"


def test_links_resolve():
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
        for named in re.findall(r"`((?:docs|benchmarks|launch|configs|monitoring|tests)/[\w./-]+\.\w+)`", page.read_text()):
            if not (REPO / named).exists():
                broken.append(f"{page.relative_to(REPO)}: `{named}`")
    assert not broken, "links to nothing:\n" + "\n".join(broken)
