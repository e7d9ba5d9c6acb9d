"""Dependencies point one way: the library never imports `tlq_vllm.testing`, and only the plugin and the
server import vLLM (the calibrator runs where vLLM is not installed)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tlq_vllm"
VLLM_USERS = ("vllm_plugin", "serve")


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def library_files():
    return [p for p in PACKAGE.rglob("*.py") if "testing" not in p.relative_to(PACKAGE).parts]


def test_library_never_imports_testing():
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if m.startswith("tlq_vllm.testing"))
                 for p in library_files()}
    assert not {k: v for k, v in offenders.items() if v}


def test_only_the_plugin_and_the_server_import_vllm():
    offenders = [str(p.relative_to(PACKAGE)) for p in library_files()
                 if p.relative_to(PACKAGE).parts[0] not in VLLM_USERS
                 and any(m == "vllm" or m.startswith("vllm.") for m in imported_modules(p))]
    assert not offenders


def test_the_import_reader_sees_function_local_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from tlq_vllm.testing import build_fixture\n    import vllm.config\n")
    assert imported_modules(source) == {"tlq_vllm.testing", "vllm.config"}
