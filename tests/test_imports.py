"""Import structure: the prediction path needs no Lightning, and lvit's packages import each other without cycles.

The cycle check parses every module of ``src/lvit`` with :mod:`ast` (imports at module level and inside
functions alike) into a graph of modules, folds it into lvit's subpackages and top-level modules (``lvit.train``,
``lvit.evaluate``, ``lvit.artifacts`` ...), and fails on any cycle between them; at module level (what runs at import
time) no cycle between single modules is allowed either.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


# --------------------------------------------------------------------------------------------------
# The import graph


@functools.cache
def _modules() -> dict[str, tuple[Path, bool]]:
    """``{"lvit.x.y": (file, is_package)}`` for every module of the lvit package."""
    found = {}
    for path in sorted((SRC / "lvit").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _top_level_nodes(tree: ast.Module):
    """The statements that run at import time (not inside a def or lambda; inside if/try/with they do)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(module_level_only: bool = False) -> dict[str, set[str]]:
    """``{module: {lvit modules it imports}}``; ``from pkg import name`` counts as importing ``pkg.name`` when that
    is a module, else ``pkg``."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        tree = _parse(path)
        nodes = _top_level_nodes(tree) if module_level_only else ast.walk(tree)
        targets: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                for alias in node.names:
                    targets.add(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin)
        owners = (owner(t) for t in targets if t == "lvit" or t.startswith("lvit."))
        graph[name] = {t for t in owners if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Modules folded into lvit's subpackages and top-level modules (``lvit.train.semi.module`` -> ``lvit.train``);
    the root package ``lvit`` (only ``__version__``) is left out."""

    def unit(name: str) -> str:
        return ".".join(name.split(".")[:2])

    folded: dict[str, set[str]] = {}
    for a, targets in graph.items():
        for b in targets:
            if unit(a) != unit(b) and unit(b) != "lvit":
                folded.setdefault(unit(a), set()).add(unit(b))
    return folded


def _explain(graph: dict[str, set[str]], packages: list[str]) -> list[str]:
    """The module-level imports behind a package cycle, for the failure message."""
    units = set(packages)
    return [f"{a} -> {b}" for a, targets in sorted(graph.items()) for b in sorted(targets)
            if ".".join(a.split(".")[:2]) in units and ".".join(b.split(".")[:2]) in units
            and a.split(".")[:2] != b.split(".")[:2]]


def test_the_graph_sees_imports_at_every_level():
    """The parser is not vacuous: known edges are found, at module level and inside functions."""
    graph = import_graph()
    assert "lvit.artifacts.runs" in graph["lvit.inference.segmenter"]  # inside a method
    assert "lvit.models.pretrained" in graph["lvit.artifacts.runs"]  # at module level
    assert "lvit.inference" in import_graph(module_level_only=False)["lvit.commands.predict"]
    assert "lvit.inference" not in import_graph(module_level_only=True)["lvit.commands.predict"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_lvit_packages():
    graph = import_graph()
    folded = package_graph(graph)
    assert "lvit.artifacts" in folded["lvit.evaluate"] and "lvit.artifacts" in folded["lvit.train"]
    assert "lvit.train" not in folded.get("lvit.evaluate", set()), \
        "lvit.evaluate imports lvit.train: " + "; ".join(_explain(graph, ["lvit.evaluate", "lvit.train"]))
    found = cycles(folded)
    assert not found, "import cycles between lvit packages: " + " | ".join(
        " <-> ".join(c) + " (" + "; ".join(_explain(graph, c)) + ")" for c in found)


def test_no_import_cycle_at_import_time():
    found = cycles(import_graph(module_level_only=True))
    assert not found, f"module-level import cycles: {found}"


def test_no_import_cycle_between_modules_anywhere():
    """Counting imports inside functions too: no module reaches back to itself through others."""
    found = cycles(import_graph())
    assert not found, f"import cycles between modules: {found}"


# --------------------------------------------------------------------------------------------------
# The prediction path without Lightning


PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from PIL import Image

    base = Path(sys.argv[1])
    from lvit.models import LViTConfig, build_model
    from lvit.artifacts.runs import save_weights, write_run_config
    from lvit.text import get_text_encoder

    run = base / "run"
    (run / "checkpoints").mkdir(parents=True)
    encoder = get_text_encoder("learned", 6, texts=["left lung lower zone", "right lung upper zone"], dim=8)
    encoder.save(run / "vocab.json")
    config = LViTConfig(image_size=32, base_channels=8, text_dim=8, text_tokens=6, vit_heads=2)
    write_run_config(run, {"model_name": "lvit", "model": config.to_dict(),
                           "text_encoder": {**encoder.describe(), "spec": "learned:vocab.json"}})
    save_weights(run / "checkpoints" / "best.safetensors", build_model("lvit", config).eval(),
                 encoder.build_module(8, seed=0))
    image = base / "x.png"
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(image)

    from lvit.inference import Segmenter
    from lvit.artifacts.runs import load_run

    prob = Segmenter(run).predict(np.asarray(Image.open(image)), "left lung lower zone")
    load_run(run).model.save_pretrained(base / "folder")
    from lvit.commands.cli import main

    code = main(["predict", str(run), "--image", str(image), "--text", "left lung", "--out", str(base / "m.png")])
    print(json.dumps({"shape": list(prob.shape), "code": code,
                      "lightning": sorted(m for m in sys.modules if "lightning" in m.split(".")[0])}))
""")


def test_the_prediction_path_does_not_import_lightning(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [40, 40] and result["code"] == 0 and (tmp_path / "m.png").is_file()
    assert result["lightning"] == [], f"the prediction path imported {result['lightning'][:5]}"
    # ... and it would have seen it: Lightning is installed, and lvit.train.checkpoint imports it at module level.
    import importlib.util

    assert importlib.util.find_spec("lightning") is not None
    tree = ast.parse((SRC / "lvit" / "train" / "checkpoint.py").read_text(encoding="utf-8"))
    assert any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("lightning") for n in tree.body)
