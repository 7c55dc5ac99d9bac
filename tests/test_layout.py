"""The package layout: no import circles, old module paths still import, models found by the registry."""
import ast
import importlib
import os
import subprocess
import sys
import warnings

import pytest

import dagan_fast
from dagan_fast import _compat
from dagan_fast.models import registry

PACKAGE_DIR = os.path.dirname(dagan_fast.__file__)


def _modules():
    found = {}
    for folder, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
                found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return found


def _import_graph():
    """module -> the package modules it imports anywhere in its body (lazy imports inside functions too)."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    edges.add(candidate if candidate in modules else target)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[module] = {e for e in edges if e in modules and e != module}
    return graph


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_no_import_circles():
    graph = _import_graph()
    assert "dagan_fast.cli.convert" in graph and graph["dagan_fast.cli.convert"], "the graph missed imports"
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_top_level_holds_the_core_and_two_user_facing_subpackages():
    entries = {name[:-3] if name.endswith(".py") else name for name in os.listdir(PACKAGE_DIR)
               if not name.startswith(("_", ".")) and (name.endswith(".py") or
                                                        os.path.isfile(os.path.join(PACKAGE_DIR, name, "__init__.py")))}
    assert entries == {"ops", "models", "nn", "checkpoints", "streaming", "media", "cli"}


def test_old_module_paths_import_the_moved_module():
    # a fresh interpreter, so that each old path is imported for the first time
    code = (
        "import importlib, warnings\n"
        "from dagan_fast._compat import MOVED\n"
        "import dagan_fast\n"
        "for old, new in MOVED.items():\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        module = importlib.import_module(old)\n"
        "    assert module is importlib.import_module(new), (old, new)\n"
        "    assert module.__name__ == new and module.__spec__.name == new, old\n"
        "    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old\n"
        "    assert getattr(dagan_fast, old.rsplit('.', 1)[1]) is module, old\n"
        "print(len(MOVED))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          cwd=os.path.dirname(PACKAGE_DIR))
    assert done.stdout.strip() == str(len(_compat.MOVED))


def test_unknown_top_level_attribute_raises():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dagan_fast.nope  # noqa: B018


def test_registry_knows_every_model_class_and_names_them_in_errors():
    assert {"DaGAN", "DaGANpp", "FaceDepthNetwork"} <= set(registry.model_names())
    assert registry.model_class("DaGANpp") is dagan_fast.DaGANpp
    with pytest.raises(KeyError, match="DaGAN"):
        registry.model_class("FOMM")


def test_public_names_of_the_moved_modules_keep_working():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert importlib.import_module("dagan_fast.video").VideoReader is dagan_fast.media.video.VideoReader
    from dagan_fast.cli import CommandError, main
    from dagan_fast.streaming import Animator, KeypointSmoother

    assert Animator is dagan_fast.Animator and callable(main) and issubclass(CommandError, Exception)
    assert KeypointSmoother.__module__ == "dagan_fast.streaming.smoothing"
