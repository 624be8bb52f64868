"""The installed product holds no test double: the wheel is built and its file list checked."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_no_fake_and_no_testing_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("cloudadaptor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = [n for n in names if n.endswith(".py")]
    assert "cloudadaptor/dev/demo.py" in modules, "the demo's development tools must stay installable"
    assert not [n for n in modules if n.startswith("cloudadaptor/testing/")], "cloudadaptor.testing must not ship"
    fakes = [n for n in modules if Path(n).stem in {"armserver", "armstate", "armimages", "kubeapi", "sshserver"}]
    assert fakes == [], f"test doubles in the wheel: {fakes}"
    for name in modules:
        text = zipfile.ZipFile(wheel).read(name).decode()
        assert "class FakeArm" not in text and "KubeApiServer" not in text and "FakeSshHost" not in text, name
