"""Kubernetes resource quantities (``500m``, ``1.5``, ``2Gi``, ``512Mi``, ``1G``, ``1e3``) as exact decimals.

The grammar is the API server's: a signed decimal number, then a binary SI
suffix (Ki Mi Gi Ti Pi Ei), a decimal SI suffix (n u m "" k M G T P E) or a
decimal exponent (e3, E-2). ``parse_quantity`` returns the value in base
units (cores for CPU, bytes for memory) as a ``Decimal``, never a float.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
            "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
            "P": Decimal("1e15"), "E": Decimal("1e18")}
_QUANTITY = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?")
MIB = 2**20


class QuantityError(ValueError):
    """Not a Kubernetes quantity."""


def parse_quantity(text: str | int | float) -> Decimal:
    """``"500m"`` -> 0.5, ``"2Gi"`` -> 2147483648, ``"1G"`` -> 1000000000; raises ``QuantityError``."""
    if isinstance(text, bool):
        raise QuantityError(f"{text!r} is not a quantity")
    if isinstance(text, (int, float)):  # a YAML/JSON number where a string is expected
        text = repr(text) if isinstance(text, float) else str(text)
    match = _QUANTITY.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise QuantityError(f"{text!r} is not a quantity (expected e.g. 500m, 1.5, 2Gi, 512Mi, 1G)")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        value = Decimal(number)
        if suffix in _BINARY:
            return value * _BINARY[suffix]
        if suffix in _DECIMAL:
            return value * _DECIMAL[suffix]
        return value * (Decimal(10) ** int(suffix[1:]))
    except (ArithmeticError, ValueError):
        raise QuantityError(f"{text!r} is not a quantity") from None


def whole_cpus(cores: Decimal) -> int:
    """CPU cores rounded up to whole vCPUs: 0.5 -> 1, 1.5 -> 2, 2 -> 2."""
    return int(math.ceil(cores))


def mebibytes(size: Decimal) -> int:
    """Bytes rounded up to MiB: 512Mi -> 512, 1G -> 954."""
    return int(math.ceil(size / MIB))
