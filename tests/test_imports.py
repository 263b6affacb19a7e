"""`import meshlib` loads the client stacks only when they are used."""

from __future__ import annotations

import subprocess
import sys

import pytest

import meshlib


def _loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout
    return set(out.split())


def test_serving_does_not_import_the_client_stacks() -> None:
    loaded = _loaded_after("import meshlib\nmeshlib.MeshMiddleware, meshlib.MeshWSGIMiddleware")
    assert not {"httpx", "requests", "urllib3", "httptools"} & loaded


def test_each_client_loads_only_its_stack() -> None:
    loaded = _loaded_after("import meshlib\nmeshlib.Session")
    assert "requests" in loaded
    assert not {"httpx", "httptools"} & loaded


@pytest.mark.parametrize("name", meshlib.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(meshlib, name) is not None
    assert name in dir(meshlib)


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Clinet'"):
        meshlib.Clinet  # type: ignore[attr-defined]  # noqa: B018


def test_instrument_stays_the_function_whatever_is_imported_first() -> None:
    """`meshlib.instrument` is a function and a module's name: importing the module first
    must not leave `meshlib.instrument` bound to the module."""
    probe = (
        "from meshlib.instrument import is_instrumented\n"
        "import meshlib, sys\n"
        "assert callable(meshlib.instrument) and callable(meshlib.uninstrument)\n"
        "assert not {'httpx', 'requests'} & set(sys.modules), 'instrument loads the stacks on use'\n"
        "meshlib.instrument(); assert is_instrumented(); meshlib.uninstrument()\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """Each package meshlib imports is one of its own dependencies (or extras), not one that
    happens to come with another: requests alone would accept urllib3 1.x, which lacks the
    names meshlib imports from urllib3 2."""
    import ast
    from importlib.metadata import packages_distributions, requires
    from pathlib import Path

    from packaging.requirements import Requirement

    def canonical(name: str) -> str:
        return name.lower().replace("_", "-").replace(".", "-")

    declared = {canonical(Requirement(r).name) for r in requires("meshlib-istio") or ()}
    imported: set[str] = set()
    for source in Path(meshlib.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"meshlib"}
    providers = packages_distributions()
    undeclared = {
        name: providers.get(name)
        for name in third_party
        if not {canonical(d) for d in providers.get(name, ())} & declared
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
