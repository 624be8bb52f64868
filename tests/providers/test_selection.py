"""Instance type selection table (docs/ARCHITECTURE.md, "Configuration")."""

import pytest

from cloudadaptor.providers.selection import InstanceTypeInfo, SelectionError, select_instance_type

CATALOG = {t.name: t for t in [
    InstanceTypeInfo("t3.small", 2, 2048),
    InstanceTypeInfo("t3.medium", 2, 4096),
    InstanceTypeInfo("c5.xlarge", 4, 8192),
    InstanceTypeInfo("m5.xlarge", 4, 16384),
    InstanceTypeInfo("g4dn.xlarge", 4, 16384, gpus=1),
]}
ALLOWED = list(CATALOG)


@pytest.mark.parametrize("requested, vcpus, memory, gpus, default, allowed, expected", [
    ("m5.xlarge", 1, 512, 0, "t3.medium", ALLOWED, "m5.xlarge"),          # annotation wins
    (None, 1, 2048, 0, "t3.medium", ALLOWED, "t3.small"),                  # smallest that fits
    (None, 2, 3000, 0, "t3.medium", ALLOWED, "t3.medium"),                 # memory decides
    (None, 3, 1024, 0, "t3.medium", ALLOWED, "c5.xlarge"),                 # vCPU decides
    (None, 4, 9000, 0, None, ALLOWED, "m5.xlarge"),                        # m5 before the GPU type
    (None, 1, 1024, 1, None, ALLOWED, "g4dn.xlarge"),                      # GPUs
    (None, None, None, 0, "t3.medium", ALLOWED, "t3.medium"),              # nothing asked: default
    (None, 1, 2048, 0, "t3.medium", [], "t3.medium"),                      # no allow-list: default
    ("anything.big", None, None, 0, "t3.medium", [], "anything.big"),      # no allow-list: annotation
])
def test_selection_table(requested, vcpus, memory, gpus, default, allowed, expected):
    assert select_instance_type(requested=requested, vcpus=vcpus, memory_mib=memory, gpus=gpus,
                                default=default, allowed=allowed, catalog=CATALOG) == expected


def test_annotation_outside_allow_list_is_refused():
    with pytest.raises(SelectionError, match="not in PODVM_INSTANCE_TYPES"):
        select_instance_type(requested="x1.32xlarge", vcpus=None, memory_mib=None, default=None, allowed=["t3.small"], catalog=CATALOG)


def test_nothing_fits_names_the_request():
    with pytest.raises(SelectionError, match="64 vCPU, 1024 MiB"):
        select_instance_type(requested=None, vcpus=64, memory_mib=1024, default="t3.small", allowed=ALLOWED, catalog=CATALOG)
