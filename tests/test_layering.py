import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(folder: pathlib.Path) -> list[tuple[str, str]]:
    found = []
    for file in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [(file.name, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.append((file.name, node.module))
    return found


def test_rewrites_never_import_backends_or_runtimes():
    """rewrites/ stays runtime-independent: no backends, no onnxruntime/openvino imports."""
    imports = _imports(ROOT / "rewrites")
    assert imports, "no imports found: the scan is broken"
    bad = [
        (f, m)
        for f, m in imports
        if m.startswith(("qcompiler.backends", "backends", "onnxruntime", "openvino"))
    ]
    assert bad == []


def test_no_relative_imports_in_library_code():
    """Library code uses absolute imports only (as onnx_ir does)."""
    for folder in ("qcompiler", "rewrites", "backends", "models"):
        for file in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                assert not (isinstance(node, ast.ImportFrom) and node.level), f"{file}: relative import"
