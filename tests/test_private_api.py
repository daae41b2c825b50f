"""No third-party private internals (issue 14): push_service/ touches no private attribute of aiohttp, redis or
nats, so a minor upgrade of one cannot break the service silently.

Two checks on the source: a private attribute (`_name`) read or written on an object other than `self`/`cls`
must be one of ours and not a name those libraries use; and a class of ours that subclasses one of theirs uses
none of its base's private attributes through `self`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import aiohttp
import nats
import redis

ROOT = Path(__file__).resolve().parent.parent / "push_service"
THIRD_PARTY = (aiohttp, redis, nats)
# The namedtuple API is public under underscore names.
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}
PRIVATE = re.compile(r"\bself\.(_[A-Za-z]\w*)|[\"'](_[A-Za-z]\w*)[\"']|\bdef (_[A-Za-z]\w*)")


def private_names(paths: list[Path]) -> set[str]:
    """Private attribute names a body of source defines: `self._x`, `def _x`, and `"_x"` (slots)."""
    names: set[str] = set()
    for path in paths:
        for match in PRIVATE.finditer(path.read_text(errors="replace")):
            names.add(next(group for group in match.groups() if group))
    return names


def theirs() -> set[str]:
    return private_names([path for package in THIRD_PARTY for path in Path(package.__file__).parent.rglob("*.py")])


def our_modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_no_private_attribute_of_another_library_is_touched() -> None:
    ours, foreign = private_names(our_modules()), theirs()
    offences = []
    for path in our_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr in PUBLIC_UNDERSCORE:
                continue
            if node.attr not in ours or node.attr in foreign:
                offences.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not offences, "private attributes of others:\n" + "\n".join(offences)


def test_no_subclass_uses_its_third_party_base_s_private_attributes() -> None:
    offences = []
    for path in our_modules():
        if path.name == "__main__.py":  # runs the command line when imported
            continue
        module = importlib.import_module(".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
                                         .removesuffix(".__init__"))
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            bases = [base for base in cls.__mro__[1:]
                     if base.__module__.split(".")[0] in {package.__name__ for package in THIRD_PARTY}]
            if not bases:
                continue
            base_names = private_names([Path(inspect.getfile(base)) for base in bases])
            base_names |= {attr for base in bases for attr in dir(base) if attr.startswith("_")}
            used = {node.attr for node in ast.walk(ast.parse(inspect.getsource(cls)))
                    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in ("self", "cls") and node.attr.startswith("_")
                    and not node.attr.startswith("__")}
            if used & base_names:
                offences.append(f"{module.__name__}.{name}: {sorted(used & base_names)}")
    assert not offences, "subclasses using their base's private attributes:\n" + "\n".join(offences)
