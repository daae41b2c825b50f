"""One exception hierarchy (issue 15): every exception class push_service defines derives from
PushServiceError, no two share a name, and push_service/errors.py imports nothing of ours, so any module
can raise its families without an import cycle."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import push_service
from push_service.broker.memory import MemoryBroker
from push_service.errors import BrokerError, BrokerUnavailable, PushServiceError
from push_service.messages import Broadcast

PACKAGE = Path(push_service.__file__).resolve().parent


def our_modules() -> list[str]:
    # __main__ runs the command line on import.
    return sorted(info.name for info in pkgutil.walk_packages([str(PACKAGE)], "push_service.")
                  if not info.name.endswith("__main__"))


def our_exception_classes() -> list[type[BaseException]]:
    """Each exception class defined in push_service, once (re-exports are found under their home module)."""
    found: dict[str, type[BaseException]] = {}
    for name in our_modules():
        module = importlib.import_module(name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == name:
                found[f"{name}.{value.__qualname__}"] = value
    return list(found.values())


def test_every_module_is_found() -> None:
    modules = our_modules()
    # The walk reaches into subpackages: a regression to a flat walk would check a fraction of the code.
    assert {"push_service.errors", "push_service.broker.resp", "push_service.transports.frames",
            "push_service.protocol.message", "push_service.presence.base"} <= set(modules)


def test_every_exception_of_ours_derives_from_push_service_error() -> None:
    classes = our_exception_classes()
    assert len(classes) > 10  # the walk found the package's exceptions, not nothing
    strays = [f"{cls.__module__}.{cls.__qualname__}" for cls in classes if not issubclass(cls, PushServiceError)]
    assert not strays, "exceptions outside PushServiceError: " + ", ".join(strays)


def test_no_two_exception_classes_share_a_name() -> None:
    homes: dict[str, list[str]] = {}
    for cls in our_exception_classes():
        homes.setdefault(cls.__name__, []).append(cls.__module__)
    shared = {name: modules for name, modules in homes.items() if len(modules) > 1}
    assert not shared, f"exception names defined twice: {shared}"


def test_the_errors_module_imports_nothing_of_ours() -> None:
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name.startswith("push_service") or name.startswith(".")], imported


def test_a_publish_the_broker_cannot_take_is_a_broker_error():
    # The API answers 503 to BrokerUnavailable; an exception of another kind would be a 500.
    try:
        MemoryBroker().publish([Broadcast.of("room:1", "new_msg", {})])
    except BrokerUnavailable as error:
        assert isinstance(error, BrokerError) and "not started" in str(error)
    else:
        raise AssertionError("a broker that was not started took a publish")
