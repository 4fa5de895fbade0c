"""The package's folders show its architecture, and imports run one way, down: a module imports only from its
own folder or from folders below it (the base modules at the top of capcli/ are below everything)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "capcli"
LAYERS = ["base", "steering", "data", "model", "training", "outputs", "jobs", "cli"]


def layer(module: str) -> str:
    """capcli.model.pipeline -> model; capcli.config -> base; capcli.jobs -> jobs; capcli -> base."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "base"


def imports(path: Path) -> set[str]:
    """The capcli modules a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("capcli"):
            found |= {f"{node.module}.{a.name}" if node.module == "capcli" else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("capcli")}
    return found


def test_imports_run_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("capcli", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        if module in ("capcli", "capcli.__main__"):
            continue  # the package's lazy public names and `python -m capcli` sit on top of everything
        for target in imports(path):
            if LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_every_folder_says_what_it_holds():
    for folder in sorted(p for p in PACKAGE.iterdir() if p.is_dir() and p.name not in ("__pycache__", "resources")):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc) > 80, f"capcli/{folder.name}/__init__.py needs a paragraph saying what it holds"
