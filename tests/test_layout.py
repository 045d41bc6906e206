"""The layout promises: packages form layers, every DVC stage depends on all the code it runs, stage modules stay
thin and independent, and dvc.yaml writes where stages/paths.py says."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from stages import paths
from stages.cli import app
from tests.conftest import REPO

# Bottom to top: a package may import only those before it (docs/ARCHITECTURE.md draws this).
LAYERS = ["dmae", "dmae.util", "dmae.data", "dmae.models", "dmae.settings", "dmae.train", "dmae.smoothing",
          "dmae.defense", "dmae.report", "tools", "stages"]
PROJECT = ("dmae", "stages", "tools")
STAGE_SUPPORT = {"stages.common", "stages.paths", "stages.resolved", "stages.cli", "stages"}  # shared by stages


def module_file(module: str) -> Path | None:
    """The project file of a dotted module name (a package's __init__.py), or None outside the project."""
    if module.split(".")[0] not in PROJECT:
        return None
    base = REPO.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imports_of(path: Path) -> set[str]:
    """Project modules `path` imports at any depth of its code (a `from a import b` may import module a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if module_file(m)}


def with_parents(module: str) -> list[str]:
    """`a.b.c` -> a, a.b, a.b.c: importing a module runs every package above it first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(module: str) -> set[Path]:
    """Every project file that running `module` imports, transitively (itself and parent packages included)."""
    todo, seen = [module], set()
    while todo:
        for name in with_parents(todo.pop()):
            path = module_file(name)
            if path and path not in seen:
                seen.add(path)
                todo += imports_of(path)
    return seen


def layer(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts[:2]) if parts[0] == "dmae" and len(parts) > 1 else parts[0]


def stage_modules() -> dict[str, str]:
    """DVC stage name -> the module of the `dmae` command its cmd runs."""
    commands = {c.name: c.callback.__module__ for c in app.registered_commands}
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        words = stage["cmd"].split()
        if words[0] == "dmae":
            out[name] = commands[words[1]]
    return out


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    """The files (relative) that no dep names, as a file or as a folder above it."""
    rel = sorted(p.relative_to(REPO).as_posix() for p in files)
    return [f for f in rel if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)]


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_packages_import_only_lower_layers():
    wrong = []
    for path in [*REPO.glob("dmae/**/*.py"), *REPO.glob("tools/*.py"), *REPO.glob("stages/*.py")]:
        here = LAYERS.index(layer(path))
        for module in imports_of(path):
            there = layer(module_file(module))
            if LAYERS.index(there) > here:
                wrong.append(f"{path.relative_to(REPO)} imports {module} ({there} is above {layer(path)})")
    assert not wrong, "\n".join(wrong)


def test_no_stage_module_imports_another():
    stage_files = {p for p in REPO.glob("stages/*.py")} - {module_file(m) for m in STAGE_SUPPORT}
    wrong = [f"{p.name} imports {m}" for p in stage_files for m in imports_of(p)
             if m.startswith("stages") and m not in STAGE_SUPPORT]
    assert not wrong, wrong


def test_every_stage_depends_on_the_code_it_imports():
    stages, modules = dvc_stages(), stage_modules()
    assert {"prepare", "pretrain", "finetune", "certify", "report", "attack"} <= modules.keys()
    missing = {name: uncovered(closure(module), stages[name].get("deps", [])) for name, module in modules.items()}
    assert not any(missing.values()), {k: v for k, v in missing.items() if v}


def test_the_closure_check_fails_when_a_dep_is_removed():
    deps = dvc_stages()["certify"]["deps"]
    files = closure(stage_modules()["certify"])
    for dep in [d for d in deps if d.startswith(("dmae", "stages"))]:
        assert uncovered(files, [d for d in deps if d != dep]), f"removing {dep} goes unnoticed"


@pytest.mark.parametrize("sigma", [0.25, 1.0])
def test_dvc_yaml_writes_where_the_stages_do(sigma):
    stages = dvc_stages()
    item = {"${item.sigma}": str(sigma)}

    def outs(name: str) -> set[str]:
        found = set()
        for entry in stages[name].get("outs", []):
            text = entry if isinstance(entry, str) else next(iter(entry))
            for key, value in item.items():
                text = text.replace(key, value)
            found.add(text)
        return found

    assert paths.finetuned(sigma).as_posix() in outs("finetune")
    assert paths.certification(sigma).as_posix() in outs("certify")
    assert paths.PRETRAINED.as_posix() in outs("pretrain")
    assert paths.PREPARED.as_posix() in outs("prepare")
