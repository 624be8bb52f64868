"""images/podvm/provision.py, run as the builder VM runs it (a subprocess) against temporary roots."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from buildworld import assert_pod_vm_installed, make_payload, snapshot

ROOT = Path(__file__).resolve().parents[2]
PODVM = ROOT / "images" / "podvm"
SCRIPT = PODVM / "provision.py"


def provision(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def install(root: Path, payload: Path, wheel: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return provision("install", "--root", str(root), "--wheel", str(wheel), "--payload", str(payload), *extra)


def test_install_puts_agent_components_and_ordered_units_under_the_root(vm_root, payload, wheel):
    result = install(vm_root, payload, wheel)
    assert result.returncode == 0, result.stderr
    assert_pod_vm_installed(vm_root)
    steps = re.findall(r"^==> \[(\d)/7\] (.*)$", result.stdout, re.M)
    assert [n for n, _ in steps] == [str(i) for i in range(1, 8)]


def test_install_twice_gives_the_same_tree(vm_root, payload, wheel):
    assert install(vm_root, payload, wheel).returncode == 0
    first = snapshot(vm_root)
    second_run = install(vm_root, payload, wheel)
    assert second_run.returncode == 0, second_run.stderr
    assert snapshot(vm_root) == first
    assert "/usr/local/bin/kata-agent unchanged" in second_run.stdout


def test_install_over_an_older_install_replaces_stale_files(vm_root, payload, wheel, tmp_path):
    assert install(vm_root, payload, wheel).returncode == 0
    fresh = snapshot(vm_root)
    (vm_root / "opt/peerpod/lib/cloudadaptor/removed_module.py").write_text("stale\n")
    (vm_root / "etc/systemd/system/kata-agent.service").write_text("[Unit]\n")
    (vm_root / "usr/local/bin/kata-agent").chmod(0o600)
    assert install(vm_root, payload, wheel).returncode == 0
    assert snapshot(vm_root) == fresh


def test_system_steps_are_skipped_outside_the_real_root(vm_root, payload, wheel):
    result = install(vm_root, payload, wheel)
    assert "skipped: dnf install python3.11 python3.11-pip iproute only on the VM itself" in result.stdout
    assert "skipped: pip install -r requirements.txt" in result.stdout
    assert not (vm_root / "opt/peerpod/deps").exists()


def test_the_installed_components_are_the_wheel_and_import_from_the_install(vm_root, payload, wheel):
    assert install(vm_root, payload, wheel).returncode == 0
    lib = vm_root / "opt/peerpod/lib"
    found = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(lib)!r}); "
                            "import cloudadaptor.podvm.forwarder as f; print(f.__file__)"],
                           capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == str(lib / "cloudadaptor/podvm/forwarder.py"), found.stderr
    assert (lib / "cloudadaptor/podvm/forwarder.py").read_bytes() == (ROOT / "cloudadaptor/podvm/forwarder.py").read_bytes()


@pytest.mark.parametrize("member,mode", [("usr/local/bin/kata-agent", "w:xz"), ("opt/kata/bin/kata-agent", "w:bz2"),
                                         ("/usr/bin/kata-agent", "w")])
def test_payload_archives_in_the_accepted_layouts_and_compressions(vm_root, wheel, tmp_path, member, mode):
    payload = make_payload(tmp_path / "payload.tar", {member: b"\x7fELF agent"}, mode)
    result = install(vm_root, payload, wheel)
    assert result.returncode == 0, result.stderr
    assert (vm_root / "usr/local/bin/kata-agent").read_bytes() == b"\x7fELF agent"


def test_a_payload_without_the_agent_fails_the_first_step_and_installs_nothing(vm_root, wheel, tmp_path):
    payload = make_payload(tmp_path / "payload.tar.gz", {"./usr/bin/agent-protocol-forwarder": b"x"})
    result = install(vm_root, payload, wheel)
    assert result.returncode == 1
    assert "step 1/7 (checking the wheel and the payload archive) failed" in result.stderr
    assert "no kata-agent binary in the archive (expected one of usr/bin/kata-agent" in result.stderr
    assert list(vm_root.iterdir()) == []


def test_an_agent_that_is_a_link_is_refused(vm_root, wheel, tmp_path):
    import tarfile

    path = tmp_path / "payload.tar"
    with tarfile.open(path, "w") as archive:
        link = tarfile.TarInfo("usr/bin/kata-agent")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        archive.addfile(link)
    result = install(vm_root, path, wheel)
    assert result.returncode == 1 and "is not a regular file" in result.stderr


def test_something_that_is_not_an_archive_is_refused(vm_root, wheel, tmp_path):
    path = tmp_path / "payload.tar.gz"
    path.write_text("not a tar\n")
    result = install(vm_root, path, wheel)
    assert result.returncode == 1 and "is not a readable tar archive" in result.stderr


def test_a_wheel_that_is_not_ours_is_refused(vm_root, payload, tmp_path):
    import zipfile

    other = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("other/__init__.py", "")
    result = install(vm_root, payload, other)
    assert result.returncode == 1 and "does not hold the cloudadaptor package" in result.stderr


def test_seal_removes_build_files_host_keys_and_the_build_users_keys_under_the_root_only(vm_root, payload, wheel, tmp_path):
    assert install(vm_root, payload, wheel).returncode == 0
    workdir = tmp_path / "upload"
    workdir.mkdir()
    (workdir / "provision.py").write_text("")
    for path in ("etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub", "etc/ssh/sshd_config",
                 "home/ec2-user/.ssh/authorized_keys", "home/other/.ssh/authorized_keys"):
        (vm_root / path).parent.mkdir(parents=True, exist_ok=True)
        (vm_root / path).write_text("x\n")
    (vm_root / "etc/machine-id").write_text("0123456789abcdef\n")
    result = provision("seal", "--root", str(vm_root), "--cloud", "azure", "--user", "ec2-user", "--remove", str(workdir))
    assert result.returncode == 0, result.stderr
    assert not workdir.exists()
    assert not (vm_root / "etc/ssh/ssh_host_ed25519_key").exists() and (vm_root / "etc/ssh/sshd_config").exists()
    assert not (vm_root / "home/ec2-user/.ssh/authorized_keys").exists()
    assert (vm_root / "home/other/.ssh/authorized_keys").exists(), "only the build user's keys go"
    assert (vm_root / "etc/machine-id").read_text() == ""
    assert "waagent -deprovision+user only on the VM itself" in result.stdout
    assert_pod_vm_installed(vm_root)


def test_the_script_runs_on_the_base_images_python_3_9():
    source = SCRIPT.read_text()
    ast.parse(source, feature_version=(3, 9))  # raises SyntaxError on newer syntax
    tree = ast.parse(source)
    imports = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imports |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imports <= set(sys.stdlib_module_names) | {"__future__"}, "standard library only"


def test_requirements_match_the_project_dependencies():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {re.split(r"[<>=!~ ]", d, 1)[0].lower(): d.replace(" ", "") for d in declared}
    wanted = [line.strip() for line in (PODVM / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert wanted, "requirements.txt lists the pod VM's packages"
    for requirement in wanted:
        name = re.split(r"[<>=!~ ]", requirement, 1)[0].lower()
        assert pinned.get(name) == requirement, f"{requirement} differs from pyproject.toml ({pinned.get(name)})"


def test_the_pod_vm_entry_points_import_only_the_listed_requirements():
    code = ("import sys, cloudadaptor.cli as c; c.build_parser(); import cloudadaptor.podvm.forwarder, "
            "cloudadaptor.podnetwork.vmside, cloudadaptor.podvm.process_user_data; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names))))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split())
    # bcrypt: imported by cryptography when present, optional
    allowed = {"cloudadaptor", "google", "cryptography", "pyroute2", "yaml", "bcrypt"}
    third_party = {m for m in loaded if not m.startswith("_") and m not in ("cython_runtime",)}
    assert third_party <= allowed, f"the pod VM would miss: {sorted(third_party - allowed)}"
