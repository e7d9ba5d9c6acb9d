"""The method registry: the facts each method states, and that nothing outside it compares method names."""

import ast
from pathlib import Path

import pytest

from tlq_vllm.calibrate.cli import build_parser
from tlq_vllm.calibrate.config import CalibrationConfig, ConfigError
from tlq_vllm.calibrate.methods import METHOD_NAMES, METHODS, MODALITY, TOKEN, UNIFORM, get_method
from tlq_vllm.calibrate.planner import plan_from_path

PACKAGE = Path(__file__).resolve().parents[1] / "tlq_vllm"


def test_facts_per_method():
    assert [(m.name, m.solver, m.token_weights) for m in METHODS.values()] == [
        ("rtn", "rtn", UNIFORM), ("gptq", "gptq", UNIFORM), ("mbq", "gptq", MODALITY),
        ("tlq", "gptq", TOKEN), ("smoothquant", "rtn", UNIFORM)]
    assert [m.name for m in METHODS.values() if m.needs_gradients] == ["mbq", "tlq"]
    assert not get_method("rtn").needs_data(None) and get_method("rtn").needs_data(0.5)  # RTN + SmoothQuant
    assert all(m.needs_data(m.smoothquant_alpha) for m in METHODS.values() if m.name != "rtn")
    with pytest.raises(ValueError, match="choose one of rtn, gptq, mbq, tlq, smoothquant"):
        get_method("awq")


def test_config_cli_and_planner_read_the_registry():
    assert build_parser()._option_string_actions["--method"].choices == METHOD_NAMES
    assert CalibrationConfig(method="smoothquant", scheme="W8A8").validate().smoothquant_alpha == 0.5
    assert CalibrationConfig(method="gptq", scheme="W8A8").validate().smoothquant_alpha is None
    with pytest.raises(ConfigError, match="unknown method 'awq'"):
        CalibrationConfig(method="awq").validate()
    gradients = {name: "importance backward" in {s.stage for s in plan_from_path("qwen2-vl-2b",
                                                                               CalibrationConfig(method=name)).stages
                                                 if not s.skipped}
                 for name in METHOD_NAMES}
    assert gradients == {name: m.needs_gradients for name, m in METHODS.items()}


def method_name_comparisons(tree: ast.AST) -> list[int]:
    """Lines comparing a method (an operand whose code says `method`) with a method name (==, !=, in,
    not in a literal holding one). The solver's "rtn" is a solver name, not a method's."""
    def names_in(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in METHOD_NAMES
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return any(names_in(e) for e in node.elts)
        return False

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(names_in(c) for c in operands) and any("method" in ast.unparse(c) for c in operands):
                found.append(node.lineno)
    return found


def test_no_method_name_comparison_outside_the_registry():
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "methods.py" or "vllm_plugin" in path.parts:  # the plugin's "tlq" is vLLM's method name
            continue
        lines = method_name_comparisons(ast.parse(path.read_text()))
        if lines:
            found[str(path.relative_to(PACKAGE))] = lines
    assert not found, f"method names compared outside tlq_vllm/calibrate/methods.py: {found}"


def test_the_check_finds_a_comparison():
    assert method_name_comparisons(ast.parse('if config.method == "tlq":\n    pass')) == [1]
    assert method_name_comparisons(ast.parse('x = s["method"] in ("rtn", "smoothquant")')) == [1]
    assert method_name_comparisons(ast.parse('x = options.solver == "rtn"')) == []
