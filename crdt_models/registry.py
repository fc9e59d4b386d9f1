"""Every domain the server knows. Adding a domain = one module + one line below."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from crdt_models import activity, attendance, helpdesk, work_orders
from crdt_models.schema import DomainModel

_MODELS: Mapping[str, DomainModel] = MappingProxyType(
    {
        model.name: model
        for model in (
            activity.MODEL,
            attendance.MODEL,
            helpdesk.MODEL,
            work_orders.MODEL,
        )
    }
)


class UnknownDomain(KeyError):
    """No model has this name (a client error: the URL names an unknown domain)."""


def get_model(name: str) -> DomainModel:
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownDomain(name) from None


def domains() -> tuple[str, ...]:
    """The domain names, sorted."""
    return tuple(sorted(_MODELS))
