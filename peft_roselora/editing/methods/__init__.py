"""The editing methods' registry: one backend class per method name (see :class:`EditBackend`), in the order
``METHODS`` lists them. A new method is a backend class and one :func:`register_method` call."""

from __future__ import annotations

from .adapter import AdaLoraBackend, AdapterBackend, LoraBackend, RoseLoraBackend
from .base import EditBackend, EditOutcome
from .ft_l import FtLBackend
from .locate import AlphaEditBackend, LocateBackend, MemitBackend


REGISTRY: dict[str, type[EditBackend]] = {}


def register_method(backend: type[EditBackend]) -> type[EditBackend]:
    """Add ``backend`` under its ``name``.

    Raises:
        ValueError: a name already registered.
    """
    if backend.name in REGISTRY:
        raise ValueError(f"method {backend.name!r} is already registered ({REGISTRY[backend.name].__name__})")
    REGISTRY[backend.name] = backend
    return backend


for _backend in (RoseLoraBackend, LoraBackend, AdaLoraBackend, FtLBackend, MemitBackend, AlphaEditBackend):
    register_method(_backend)


def methods_where(capability: str) -> tuple[str, ...]:
    """The registered methods whose backend has ``capability`` (a class attribute of :class:`EditBackend`)."""
    return tuple(name for name, backend in REGISTRY.items() if getattr(backend, capability))


__all__ = [
    "REGISTRY",
    "AdaLoraBackend",
    "AdapterBackend",
    "AlphaEditBackend",
    "EditBackend",
    "EditOutcome",
    "FtLBackend",
    "LocateBackend",
    "LoraBackend",
    "MemitBackend",
    "RoseLoraBackend",
    "methods_where",
    "register_method",
]
