"""The namespace VM's boot plan comes from the image's own units (local_boot)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from cloudadaptor.providers import local_boot

UNITS = local_boot.SOURCE_PODVM / local_boot.UNIT_SUBDIR


def test_the_plan_follows_the_images_enabled_units_and_their_preparation():
    plan = local_boot.load()
    assert [s.unit for s in plan] == [u for u, _ in local_boot.enabled_units(local_boot.SOURCE_PODVM)]
    assert [s.step for s in plan] == ["user_data", "podns", "claim", "pod_network", "agent", "forwarder"]
    agent = next(s for s in plan if s.unit == "kata-agent.service")
    assert agent.make_dirs == ("/run/kata-containers",)


def test_the_enabled_order_agrees_with_the_units_after_lines():
    plan = [s.unit for s in local_boot.load()]
    for position, step in enumerate(plan):
        unit_file = "netns@.service" if step.startswith("netns@") else step
        text = (UNITS / unit_file).read_text()
        for line in re.findall(r"^After=(.*)$", text, re.M):
            for before in line.split():
                if before in plan:
                    assert plan.index(before) < position, f"{step} is After={before} but boots before it"


def copy_podvm(tmp_path: Path) -> Path:
    target = tmp_path / "podvm"
    shutil.copytree(local_boot.SOURCE_PODVM, target)
    return target


def test_a_new_pre_step_in_a_unit_is_refused_not_skipped(tmp_path):
    podvm = copy_podvm(tmp_path)
    unit = podvm / local_boot.UNIT_SUBDIR / "kata-agent.service"
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nExecStartPre=/usr/bin/chmod 700 /run/x\n"))
    with pytest.raises(local_boot.BootPlanError, match=r"kata-agent.service line \d+: the namespace VM cannot imitate"):
        local_boot.load(podvm)


def test_a_new_unit_in_the_image_is_refused(tmp_path):
    podvm = copy_podvm(tmp_path)
    provision = podvm / "provision.py"
    provision.write_text(provision.read_text().replace(
        '    ("kata-agent.service", "kata-agent.service"),\n',
        '    ("kata-agent.service", "kata-agent.service"),\n    ("extra.service", "kata-agent.service"),\n'))
    with pytest.raises(local_boot.BootPlanError, match="enables extra.service, which the namespace VM does not know"):
        local_boot.load(podvm)


def test_instance_specifiers_are_expanded():
    assert local_boot.prepare_dirs("netns@podns.service", "ExecStartPre=-/bin/mkdir -p /run/%I /run/b\n") == (
        "/run/podns", "/run/b")


def test_a_plan_is_read_again_when_a_file_it_came_from_changes(tmp_path):
    podvm = copy_podvm(tmp_path)
    first = local_boot.load(podvm)
    assert local_boot.load(podvm) == first
    unit = podvm / local_boot.UNIT_SUBDIR / "kata-agent.service"
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nExecStartPre=/usr/bin/mkdir -p /run/extra\n"))
    agent = next(s for s in local_boot.load(podvm) if s.unit == "kata-agent.service")
    assert "/run/extra" in agent.make_dirs, "the edited unit is read, not the plan read before"
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nExecStartPre=/usr/bin/chmod 700 /run/x\n"))
    with pytest.raises(local_boot.BootPlanError, match="cannot imitate"):
        local_boot.load(podvm)
