"""The package layout is the architecture: each layer imports only what is below it."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT


def imported(path) -> set[str]:
    """Every module a file imports (absolute names; ``from . import x`` is not used in this project)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules(package: str) -> list:
    return sorted((ROOT / "compute" / package).glob("*.py"))


def test_the_library_knows_no_store_app_command_line_or_run():
    for path in modules("lib"):
        bad = {name for name in imported(path)
               if name.split(".")[0] in ("store", "streamlit", "argparse", "app")
               or name.startswith(("compute.run", "compute.stages", "compute.all", "compute.train"))}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_analysis_package_runs_without_torch():
    for path in modules("analysis"):
        module = f"compute.analysis.{path.stem}"
        code = f"import sys, {module}; print('torch' in sys.modules)"
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "False", f"{module} imports torch"


def test_no_model_imports_its_trainer_and_no_stage_imports_the_app():
    for path in sorted((ROOT / "compute" / "models").glob("*.py")):
        assert not {n for n in imported(path) if n.startswith("compute.train")}, path.name
    for path in modules("stages") + modules("run"):
        assert not {n for n in imported(path) if n.split(".")[0] in ("app", "streamlit")}, path.name


def test_every_stage_of_the_table_lives_in_the_stages_package():
    from compute.run import pipeline

    for stage in pipeline.stages():
        assert stage.run.__module__.startswith("compute.stages."), (stage.section, stage.run.__module__)
