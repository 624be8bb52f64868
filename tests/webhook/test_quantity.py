"""Kubernetes quantities parse exactly (no floats) and round up to whole vCPUs and MiB."""

from __future__ import annotations

from decimal import Decimal

import pytest

from cloudadaptor.webhook.quantity import QuantityError, mebibytes, parse_quantity, whole_cpus


@pytest.mark.parametrize("text, value", [
    ("500m", Decimal("0.5")), ("1.5", Decimal("1.5")), ("2", Decimal(2)), ("0.1", Decimal("0.1")),
    ("2Gi", Decimal(2 * 2**30)), ("512Mi", Decimal(512 * 2**20)), ("1G", Decimal(10**9)), ("1k", Decimal(1000)),
    ("1Ki", Decimal(1024)), ("1e3", Decimal(1000)), ("1E-3", Decimal("0.001")), ("100M", Decimal(10**8)),
    (".5", Decimal("0.5")), ("+2", Decimal(2)), ("250u", Decimal("0.00025")), (" 1Gi ", Decimal(2**30)),
    (2, Decimal(2)), (0.5, Decimal("0.5")),
])
def test_quantities_parse_to_base_units(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1.2.3", "Gi", "1 Gi", "1gi", "1KiB", "--1", "1e", True, None])
def test_garbage_is_not_a_quantity(text):
    with pytest.raises(QuantityError):
        parse_quantity(text)  # type: ignore[arg-type]


@pytest.mark.parametrize("cores, vcpus", [("500m", 1), ("1", 1), ("1001m", 2), ("1.5", 2), ("4", 4), ("0", 0)])
def test_cpu_rounds_up_to_whole_vcpus(cores, vcpus):
    assert whole_cpus(parse_quantity(cores)) == vcpus


@pytest.mark.parametrize("size, mib", [("512Mi", 512), ("2Gi", 2048), ("1G", 954), ("1", 1), ("1048577", 2), ("0", 0)])
def test_memory_rounds_up_to_mebibytes(size, mib):
    assert mebibytes(parse_quantity(size)) == mib
