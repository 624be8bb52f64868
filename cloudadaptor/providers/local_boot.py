"""The namespace VM's boot plan, read from the pod VM image's own units.

The image boots with systemd from ``images/podvm/files/etc/systemd/system``;
``images/podvm/provision.py`` enables ``ENABLED_UNITS`` in boot order. The
namespace VM (``local_vm``) has no systemd, so it reads the same two sources
instead of keeping a copy of them: the order is ``ENABLED_UNITS``, and each
unit's ``ExecStartPre=`` preparation (``mkdir -p DIR``, what creates
``/run/kata-containers`` for the agent) is done before that unit's step.
A unit the namespace VM does not know, or an ``ExecStartPre=`` it cannot
imitate, is an error at launch: image and namespace VM cannot drift apart
silently again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

SOURCE_PODVM = Path(__file__).resolve().parents[2] / "images" / "podvm"
SHIPPED_PODVM = Path("/usr/share/cloud-api-adaptor/images/podvm")
UNIT_SUBDIR = "files/etc/systemd/system"

# What the namespace VM runs for each enabled unit of the image (local_vminit.VmInit methods).
STEP_OF_UNIT = {
    "process-user-data.service": "user_data",
    "peerpod-claim.service": "claim",
    "netns@podns.service": "podns",
    "peerpod-network.service": "pod_network",
    "kata-agent.service": "agent",
    "agent-protocol-forwarder.service": "forwarder",
}
_MKDIR = re.compile(r"^(?:/usr)?/bin/mkdir$")


class BootPlanError(Exception):
    """The image's units cannot be booted by the namespace VM; the message says which unit and line."""


@dataclass(frozen=True)
class BootStep:
    unit: str  # e.g. kata-agent.service
    step: str  # a key of STEP_OF_UNIT's values
    make_dirs: tuple[str, ...] = ()  # from ExecStartPre=mkdir -p


def find_podvm_dir(requested: Path | None = None) -> Path:
    """images/podvm (``requested``, else the checkout's, else the shipped copy); BootPlanError if none."""
    candidates = [requested] if requested is not None else [SOURCE_PODVM, SHIPPED_PODVM]
    for candidate in candidates:
        if (candidate / "provision.py").is_file() and (candidate / UNIT_SUBDIR).is_dir():
            return candidate
    raise BootPlanError(f"pod VM files (provision.py, {UNIT_SUBDIR}) not found in "
                        f"{', '.join(str(c) for c in candidates)}")


def enabled_units(podvm_dir: Path) -> list[tuple[str, str]]:
    """provision.py's ENABLED_UNITS: (unit, unit file) in boot order."""
    spec = importlib.util.spec_from_file_location("podvm_provision_units", podvm_dir / "provision.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [(str(unit), str(unit_file)) for unit, unit_file in module.ENABLED_UNITS]


def _instance(unit: str) -> str:
    """``netns@podns.service`` -> ``podns`` (systemd's %i/%I); empty for a plain unit."""
    name = unit.rsplit(".", 1)[0]
    return name.split("@", 1)[1] if "@" in name else ""


def prepare_dirs(unit: str, text: str) -> tuple[str, ...]:
    """The directories a unit's ``ExecStartPre=mkdir -p`` lines make; BootPlanError for any other pre-step."""
    dirs: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith("ExecStartPre="):
            continue
        command = line.split("=", 1)[1].lstrip("-@:+!").replace("%I", _instance(unit)).replace("%i", _instance(unit))
        words = shlex.split(command)
        if len(words) < 3 or not _MKDIR.match(words[0]) or words[1] != "-p":
            raise BootPlanError(f"{unit} line {number}: the namespace VM cannot imitate {line!r} "
                                "(only ExecStartPre=/usr/bin/mkdir -p DIR...); teach local_vm this step")
        dirs += words[2:]
    return tuple(dirs)


# images/podvm directory -> (its files, their stamps when read, the plan read from them). Reading runs
# provision.py (importing what it imports): ~10 ms of CPU per VM launch. The local provider's fork
# server loads the plan before each launch, so every launcher starts with it; a plan is used only
# while none of the files it came from changed (inode, size, mtime), else read again.
_LOADED: dict[Path, tuple[list[Path], list[tuple[int, int, int]], list[BootStep]]] = {}


def _stamps(files: list[Path]) -> list[tuple[int, int, int]]:
    stamps = []
    for path in files:
        st = os.stat(path)
        stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return stamps


def load(podvm_dir: Path | None = None) -> list[BootStep]:
    """The boot plan: one step per enabled unit, in the image's order (see the module docstring)."""
    podvm_dir = find_podvm_dir(podvm_dir)
    loaded = _LOADED.get(podvm_dir)
    if loaded is not None:
        files, stamps, plan = loaded
        with contextlib.suppress(OSError):
            if _stamps(files) == stamps:
                return list(plan)
    provision = podvm_dir / "provision.py"
    stamps = _stamps([provision])  # each file's stamp is taken before it is read
    units = enabled_units(podvm_dir)
    unit_files = [podvm_dir / UNIT_SUBDIR / unit_file for _, unit_file in units]
    with contextlib.suppress(OSError):  # a missing unit is _read_plan's to report
        stamps += _stamps(unit_files)
    plan = _read_plan(podvm_dir, units)
    _LOADED[podvm_dir] = ([provision, *unit_files], stamps, plan)
    return list(plan)


def _read_plan(podvm_dir: Path, units: list[tuple[str, str]]) -> list[BootStep]:
    plan = []
    for unit, unit_file in units:
        step = STEP_OF_UNIT.get(unit)
        if step is None:
            raise BootPlanError(f"the image enables {unit}, which the namespace VM does not know; "
                                "add it to local_boot.STEP_OF_UNIT and local_vm")
        try:
            text = (podvm_dir / UNIT_SUBDIR / unit_file).read_text()
        except OSError as exc:
            raise BootPlanError(f"cannot read unit {unit_file}: {exc}") from None
        plan.append(BootStep(unit, step, prepare_dirs(unit, text)))
    missing = set(STEP_OF_UNIT) - {s.unit for s in plan}
    if missing:
        raise BootPlanError(f"the image no longer enables {', '.join(sorted(missing))}; update local_boot.STEP_OF_UNIT")
    return plan
