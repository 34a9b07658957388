"""The one rule between layers (../shared/DESIGN.md), checked on every import, module level or inside functions.

- core (``qcompiler/`` but the drivers, the face and the registry) imports neither rewrites nor backends;
- rewrites import no backend and no driver;
- backends import core only (not rewrites, drivers, the registry or another backend);
- nobody probes a backend with ``hasattr``: capabilities are flags.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FACE = {"cli.py", "demo.py", "__init__.py"}
"""The package's face: the CLI and the public API may import anything."""
REGISTRY = "registry.py"
"""The one core module that names the backends (by module path, imported on demand)."""


def _imports(files: list[pathlib.Path]) -> list[tuple[str, str]]:
    found = []
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [(str(file.relative_to(ROOT)), alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.append((str(file.relative_to(ROOT)), node.module))
    return found


def _core_files() -> list[pathlib.Path]:
    package = ROOT / "qcompiler"
    return [
        file
        for file in package.rglob("*.py")
        if not file.is_relative_to(package / "drivers") and not (file.parent == package and file.name in FACE)
    ]


def test_core_imports_neither_rewrites_nor_backends():
    """Core reaches a runtime only through a runner handed to it; the registry is the named exception."""
    imports = _imports([file for file in _core_files() if file.name != REGISTRY])
    assert len(imports) > 50, "too few imports found: the scan is broken"
    bad = [
        (f, m)
        for f, m in imports
        if m.startswith(("qcompiler.rewrites", "qcompiler.backends", "qcompiler.drivers"))
    ]
    assert bad == []


def test_core_runs_no_runtime_itself():
    """Only backends import onnxruntime (and OpenVINO, beyond its IR frontend's reader)."""
    imports = _imports(_core_files())
    bad = [
        (f, m)
        for f, m in imports
        if m.startswith("onnxruntime") or (m.startswith("openvino") and "frontends" not in f)
    ]
    assert bad == []


def test_rewrites_import_no_backend_driver_or_runtime():
    """rewrites/ stays runtime-independent: no backends, drivers, registry or runtime imports."""
    imports = _imports(list((ROOT / "rewrites").rglob("*.py")))
    assert imports, "no imports found: the scan is broken"
    bad = [
        (f, m)
        for f, m in imports
        if m.startswith(
            (
                "qcompiler.backends",
                "qcompiler.drivers",
                "qcompiler.registry",
                "backends",
                "onnxruntime",
                "openvino",
            )
        )
    ]
    assert bad == []


@pytest.mark.parametrize(
    "backend", sorted(p.name for p in (ROOT / "backends").iterdir() if p.is_dir() and p.name[0] != "_")
)
def test_backends_import_core_only(backend):
    """A backend reads the canonical form from core and never calls an algorithm, a driver or another backend."""
    imports = _imports(list((ROOT / "backends" / backend).rglob("*.py")))
    assert imports, "no imports found: the scan is broken"
    bad = [
        (f, m)
        for f, m in imports
        if m.startswith(("qcompiler.rewrites", "qcompiler.drivers", "qcompiler.registry"))
        or (m.startswith("qcompiler.backends") and not m.startswith(f"qcompiler.backends.{backend}"))
        or m in ("qcompiler", "qcompiler.cli", "qcompiler.demo")
    ]
    assert bad == []


def test_no_hasattr_probing_of_backends():
    """Backend capabilities are explicit flags (`Capabilities`), never `hasattr(backend, ...)`."""
    probes = []
    for folder in ("qcompiler", "rewrites", "backends", "benchmarks"):
        for file in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr" and node.args:
                    if "backend" in ast.unparse(node.args[0]).lower():
                        probes.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert probes == []


def test_every_registered_backend_implements_the_contract():
    """Each registry entry loads a `Backend` whose suffix and capabilities are set."""
    from qcompiler.backend import Backend, Capabilities
    from qcompiler.registry import _BACKENDS, backend_named

    for name in _BACKENDS:
        backend = backend_named(name)
        assert isinstance(backend, Backend) and backend.name == name
        assert backend.artifact_suffix.startswith(".") and isinstance(backend.capabilities, Capabilities)


def test_no_relative_imports_in_library_code():
    """Library code uses absolute imports only (as onnx_ir does)."""
    for folder in ("qcompiler", "rewrites", "backends", "models"):
        for file in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                assert not (isinstance(node, ast.ImportFrom) and node.level), f"{file}: relative import"
