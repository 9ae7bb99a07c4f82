"""Kubernetes resource quantities: parsing (with the client library's parser), scaling and printing."""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation

from kubernetes.utils.quantity import parse_quantity

MI = 1 << 20
GI = 1 << 30

#: The same grammar as the CRD's patterns (kept here so tests can check one against the other).
MEMORY_PATTERN = r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[kMGTPE]|([eE][0-9]+))?$"
CPU_PATTERN = r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(m)?$"


class QuantityError(ValueError):
    """Not a quantity Kubernetes would accept."""


def parse_quantity_decimal(value: str | int | float) -> Decimal:
    try:
        return Decimal(parse_quantity(value))
    except (ValueError, InvalidOperation, TypeError) as error:
        raise QuantityError(f"{value!r} is not a valid quantity") from error


def parse_quantity_bytes(value: str | int | float) -> int:
    """A memory quantity in whole bytes (rounded up: a limit never shrinks by parsing)."""
    amount = parse_quantity_decimal(value)
    if amount <= 0:
        raise QuantityError(f"{value!r} must be positive")
    return math.ceil(amount)


def format_memory(size: int) -> str:
    """Bytes as the shortest exact binary quantity ("1536Mi", "2Gi"); sizes that are no whole number of Mi
    are rounded up to one so that limits read well in `kubectl get`."""
    mebibytes = math.ceil(size / MI)
    if mebibytes % 1024 == 0:
        return f"{mebibytes // 1024}Gi"
    return f"{mebibytes}Mi"


def scale_memory(size: int, factor: float, ceiling: int) -> int:
    """The next attempt's limit: ``size × factor`` rounded up to a whole Mi, never above ``ceiling``."""
    raised = math.ceil(size * factor / MI) * MI
    return min(raised, ceiling)
