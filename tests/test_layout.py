"""The positional contracts are written once (zenith_fused/layout.py); the other languages repeat
them, and these tests fail when they drift. Also: the boundaries between the package's parts."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from zenith_fused import layout
from zenith_fused.optimizer import ZenithFused

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _camel(name: str) -> str:
    """``MOMENTUM_BUFFER`` -> ``kMomentumBuffer`` (the C++ spelling)."""
    return "k" + "".join(part.capitalize() for part in name.lower().split("_"))


def _namespace_constants(text: str, namespace: str) -> dict[str, int]:
    body = re.search(rf"namespace {namespace} {{(.*?)}}", text, re.S)
    assert body, f"csrc/common.h has no namespace {namespace}"
    return {name: int(value) for name, value in re.findall(r"constexpr int (k\w+) = (\d+);", body.group(1))}


@pytest.mark.parametrize("namespace, names, count", [
    ("tensor_column", layout.TENSOR_COLUMN_NAMES, layout.TENSOR_COLUMNS),
    ("chunk_column", tuple(n.removeprefix("CHUNK_") for n in layout.CHUNK_COLUMN_NAMES), layout.CHUNK_COLUMNS),
    ("hyperparam", layout.HYPERPARAM_COLUMN_NAMES, layout.HYPERPARAM_COLUMNS),
    ("history_field", tuple(n.upper() for n in layout.HISTORY_FIELDS), len(layout.HISTORY_FIELDS)),
])
def test_common_h_repeats_the_layout(namespace, names, count):
    constants = _namespace_constants((CSRC / "common.h").read_text(), namespace)
    expected = {_camel(name): index for index, name in enumerate(names)}
    expected["kCount" if namespace == "history_field" else "kColumns"] = count
    assert constants == expected


def _struct_fields(text: str, struct: str) -> list[str]:
    body = re.search(rf"struct {struct} {{(.*?)}};", text, re.S)
    assert body, f"no struct {struct}"
    return re.findall(r"(\w+);", body.group(1))


def test_the_cpp_history_structs_list_the_fields_in_order():
    checks = _struct_fields((CSRC / "tensor_checks.h").read_text(), "History")
    assert checks[:2] == ["device", "window_size"]
    assert tuple(checks[2:]) == layout.HISTORY_FIELDS
    pointers = _struct_fields((CSRC / "cuda" / "launch_cuda.h").read_text(), "HistoryPointers")
    # The CUDA struct carries the window's length beside the window pointer.
    assert tuple(f for f in pointers if f != "window_size") == layout.HISTORY_FIELDS


def test_the_triton_constants_are_the_layout():
    pytest.importorskip("triton")
    from zenith_fused.triton_kernels import table

    names = (layout.TENSOR_COLUMN_NAMES + layout.CHUNK_COLUMN_NAMES + layout.HYPERPARAM_COLUMN_NAMES
             + ("TENSOR_COLUMNS", "CHUNK_COLUMNS", "HYPERPARAM_COLUMNS", "VECTOR_ALIGNMENT"))
    for name in names:
        assert getattr(table, name).value == getattr(layout, name), name


def test_the_history_dataclass_follows_the_layout():
    import dataclasses

    from zenith_fused.reference import ZenithHistory

    assert tuple(f.name for f in dataclasses.fields(ZenithHistory)) == layout.HISTORY_FIELDS


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_triton_kernels_import_nothing_private_from_the_package():
    offenders = []
    for path in _python_files("triton_kernels"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            for module in modules:
                parts = module.split(".")
                if parts[0] == "zenith_fused" and any(p.startswith("_") for p in parts[1:]):
                    offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert offenders == []


def test_no_module_but_the_optimizer_calls_its_underscore_methods():
    private_methods = {name for name, value in vars(ZenithFused).items()
                       if name.startswith("_") and not name.startswith("__") and callable(value)}
    assert "_plan_step" in private_methods  # the scan below looks for real names
    offenders = []
    for path in _python_files("zenith_fused", "triton_kernels", "bench"):
        if path.name == "optimizer.py" and path.parent.name == "zenith_fused":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in private_methods:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.func.attr}")
    assert offenders == []
