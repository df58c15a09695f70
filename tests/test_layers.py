"""The package's shape: layers import only downwards, the notebook layers work without Lightning,
and only the CLI parses arguments."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lens"

LAYERS = ["config", "core", "artifacts", "data", "interventions", "analysis", "report", "runs", "training", "cli"]
"""Bottom to top: a module may import its own layer and the ones before it, never a later one."""
NO_LIGHTNING = ["core", "artifacts", "data", "interventions", "analysis", "report", "runs"]


def layer_of(module: str) -> str | None:
    """``lens.core.arch`` -> ``core``; ``lens.config`` -> ``config``; None for the ``lens`` facade."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lens" else None


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path) -> set[str]:
    """Every ``lens...`` module a file imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name == "lens" or name.startswith("lens.")}


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    for path in package_files():
        name = module_name(path)
        if name in ("lens", "lens.__main__"):
            continue
        assert layer_of(name) in LAYERS, f"{name} is in no layer of {LAYERS}: add it to one (and to this list)"


def test_lower_layers_never_import_higher_ones():
    bad = []
    for path in package_files():
        importer = layer_of(module_name(path))
        if importer is None or module_name(path) == "lens.__main__":
            continue
        for imported in imported_modules(path):
            target = layer_of(imported)
            if target is None:
                bad.append(f"{module_name(path)} imports the facade {imported!r}; import the module itself")
            elif LAYERS.index(target) > LAYERS.index(importer):
                bad.append(f"{module_name(path)} ({importer}) imports {imported} ({target})")
    assert bad == []


def test_only_the_cli_parses_arguments():
    for path in package_files():
        if layer_of(module_name(path)) == "cli":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imports = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imports |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert "argparse" not in imports, f"{path} parses arguments: that is the CLI's job"
        assert "sys.argv" not in path.read_text(encoding="utf-8"), f"{path} reads sys.argv"


BLOCK_LIGHTNING = """
import importlib.abc, sys
class NoLightning(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
            raise ImportError(f"{name} is blocked: these layers must work without Lightning")
sys.meta_path.insert(0, NoLightning())
"""


def run_without_lightning(code: str, tmp_path: Path) -> None:
    script = tmp_path / "notebook.py"
    script.write_text(BLOCK_LIGHTNING + textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # conftest's tiny models
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_notebook_layers_import_without_lightning(tmp_path):
    modules = [module_name(p) for p in package_files() if layer_of(module_name(p)) in NO_LIGHTNING]
    assert len(modules) > 20
    run_without_lightning("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules), tmp_path)


def test_a_notebook_session_without_lightning(tmp_path):
    """Load, read through a lens, steer, save and reload, draw: everything a notebook does."""
    run_without_lightning(
        f"""
        import torch
        from conftest import make_model, make_tokenizer
        from lens import capture_residuals, load_lens, save_lens, TunedLens, Unembed
        from lens.analysis.picture import build_picture
        from lens.interventions import ActAdd
        from lens.report.html import write_html
        from lens.report.plots import plot_token_heatmaps

        model, tok = make_model("llama"), make_tokenizer()
        lens = TunedLens.for_model(model)
        save_lens(lens, {str(tmp_path / "lens")!r}, model)
        lens = load_lens({str(tmp_path / "lens")!r}, model)
        residuals, logits = capture_residuals(model, tok("The server starts", return_tensors="pt").input_ids)
        assert Unembed(model)(lens.translate(residuals)).shape[0] == lens.n_layers + 1
        steer = ActAdd(model, tok, [("Love", "Hate")], layer=1, coefficient=4.0)
        picture = build_picture(model, tok, "Love and hate, anger and calm.", lens, lambda: steer)
        plot_token_heatmaps(picture, {str(tmp_path / "heat.png")!r})
        write_html(picture, {str(tmp_path / "page.html")!r})
        assert "lightning" not in sys.modules
        """,
        tmp_path,
    )
    assert (tmp_path / "heat.png").stat().st_size > 0 and (tmp_path / "page.html").stat().st_size > 0
