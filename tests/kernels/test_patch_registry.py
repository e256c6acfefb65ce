"""The registry puts the patch parts in an order from their declarations, and says what is wrong
when it cannot."""

import ast
import pathlib

import pytest

from sftop.kernels.patching import markers
from sftop.kernels.patching.part import Part, PartOrderError, resolve_order
from sftop.kernels.patching.parts import ORDER, REGISTERED

# the order the parts ran in before each declared its requirements (a fixed list then)
ORDER_BEFORE = (
    "rms_norm",
    "rope",
    "mlp",
    "lora",
    "attention_lora",
    "attention",
    "loss",
    "lean_recompute",
    "checkpoint_offload",
    "kept_projections",
    "cuda_graphs",
)
PATCHING = pathlib.Path(__file__).resolve().parents[2] / "sftop" / "kernels" / "patching"


def _noop(model, spec):
    return "fused"


def test_resolved_order_is_the_order_the_parts_always_ran_in():
    assert tuple(p.name for p in ORDER) == ORDER_BEFORE
    from sftop.kernels.patching import PARTS

    assert PARTS == ORDER_BEFORE


@pytest.mark.parametrize("arrange", [reversed, lambda parts: sorted(parts, key=lambda p: p.name)])
def test_any_registration_order_puts_every_part_after_what_it_requires(arrange):
    order = [p.name for p in resolve_order(tuple(arrange(REGISTERED)))]
    assert sorted(order) == sorted(ORDER_BEFORE)
    for part in REGISTERED:
        for required in part.requires:
            assert order.index(required) < order.index(part.name), (required, part.name)
    # the declarations that carry the order, not only the registration list
    assert order.index("lora") < order.index("attention_lora")
    assert order.index("loss") < order.index("cuda_graphs")
    assert max(
        order.index(p) for p in ("rope", "attention_lora", "lean_recompute", "checkpoint_offload")
    ) < order.index("kept_projections")


def test_a_missing_requirement_names_the_part_and_what_it_needs():
    parts = (Part("a", _noop), Part("b", _noop, requires=("a", "nowhere")))
    with pytest.raises(
        PartOrderError,
        match=r"patch part 'b' requires 'nowhere', which no registered part is "
        r"\(registered: a, b\)",
    ):
        resolve_order(parts)


def test_a_cycle_is_named():
    parts = (
        Part("free", _noop),
        Part("x", _noop, requires=("z",)),
        Part("y", _noop, requires=("x",)),
        Part("z", _noop, requires=("y",)),
        Part("after", _noop, requires=("x",)),
    )
    with pytest.raises(PartOrderError, match=r"in a cycle: x -> z -> y -> x$"):
        resolve_order(parts)


def test_a_part_registered_twice_or_an_undeclared_marker_is_refused():
    with pytest.raises(PartOrderError, match="'a' is registered twice"):
        resolve_order((Part("a", _noop), Part("a", _noop)))
    with pytest.raises(PartOrderError, match="'a' provides '_sftop_new'.*markers.py does not declare"):
        resolve_order((Part("a", _noop, provides=("_sftop_new",)),))


def test_every_part_is_one_module_holding_its_part():
    modules = sorted(p.stem for p in (PATCHING / "parts").glob("*.py") if p.stem != "__init__")
    assert modules == sorted(ORDER_BEFORE)
    assert [p.apply.__module__.rsplit(".", 1)[-1] for p in REGISTERED] == [p.name for p in REGISTERED]


def test_marker_names_live_only_in_the_marker_module():
    # any "_sftop_..." string in the patching code outside markers.py is a marker nobody declared
    strays = []
    for path in PATCHING.rglob("*.py"):
        if path.name == "markers.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_sftop_"):
                strays.append(f"{path.relative_to(PATCHING)}:{node.lineno} {node.value}")
    assert strays == []
    assert set(markers.MODULE_MARKERS) | set(markers.MODEL_MARKERS) <= markers.ALL
