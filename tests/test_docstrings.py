"""Every public function, class, method and property of the library says, in a docstring, what it
is for (issue 14: a newcomer must be able to carry the project on).

Public: a name without a leading ``_``, defined at a module's top level (also under a top-level
``if``/``try``/``with``) in ``fastl2r/`` or ``kernels/``, or in the body of a public class (methods,
properties, nested classes).  ``__dunder__`` methods and functions nested in functions (closures,
helpers) are exempt; Triton ``@triton.jit`` kernels are functions like any other.
"""
import ast
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("fastl2r", "kernels")
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
BLOCKS = (ast.If, ast.Try, ast.With)


def top_level(body: list) -> Iterator[ast.AST]:
    """The definitions of a module or class body, including those under ``if``/``try``/``with``."""
    for node in body:
        if isinstance(node, DEFINITIONS):
            yield node
        elif isinstance(node, BLOCKS):
            for part in ("body", "orelse", "finalbody"):
                yield from top_level(getattr(node, part, []))
            for handler in getattr(node, "handlers", []):
                yield from top_level(handler.body)


def public_definitions(body: list, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """``(qualified name, node)`` of every public definition in ``body`` and in its public classes."""
    for node in top_level(body):
        if node.name.startswith("_"):
            continue
        name = prefix + node.name
        yield name, node
        if isinstance(node, ast.ClassDef):
            yield from public_definitions(node.body, name + ".")


def undocumented() -> list[str]:
    missing = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for name, node in public_definitions(tree.body):
                if not (ast.get_docstring(node) or "").strip():
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return missing


def test_the_walk_sees_methods_properties_and_kernels():
    found = {}
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            found.update(public_definitions(ast.parse(path.read_text()).body, f"{path.relative_to(ROOT)}:"))
    assert "fastl2r/meta/trainer.py:MetaTrainer.train" in found
    assert "fastl2r/models/resnet.py:ResNetGN.depth" in found           # a property
    assert "kernels/__init__.py:tanh" in found                          # a @triton.jit function
    assert not any(name.rpartition(".")[2].startswith("_") for name in found)


def test_every_public_definition_has_a_docstring():
    missing = undocumented()
    if missing:
        pytest.fail(f"{len(missing)} public definitions without a docstring:\n" + "\n".join(missing), pytrace=False)
