"""Static checks that catch real mistakes: unused or undefined names, syntax, layers, types."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_no_mistakes():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a test dependency: pip install -e '.[test]'"
    paths = [p for p in ("cloudadaptor", "tests", "bench") if (ROOT / p).is_dir()]
    result = subprocess.run([ruff, "check", "--output-format", "concise", *paths],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_layers_hold():
    """pyproject's import-linter contracts: ttrpc knows no kata, the lifecycle no SDK, providers no netns."""
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint_imports, "import-linter is a test dependency: pip install -e '.[test]'"
    result = subprocess.run([lint_imports], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


# Strict typing where a wrong type costs most: the lifecycle, the provider protocol, the ttrpc package.
STRICT_PATHS = ("cloudadaptor/adaptor", "cloudadaptor/providers/base.py", "cloudadaptor/ttrpc")
# Test doubles checked against the protocols they stand in for (module-level annotated assignments).
FAKE_PATHS = ("tests/adaptor/conftest.py", "tests/fakes/lifecycle.py")


def _mypy(*args: str) -> subprocess.CompletedProcess[str]:
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    assert mypy, "mypy is a test dependency: pip install -e '.[test]'"
    return subprocess.run([mypy, "--no-error-summary", *args], cwd=ROOT, capture_output=True, text=True)


def test_types_hold_strictly_in_the_lifecycle_provider_protocol_and_ttrpc():
    result = _mypy("--strict", *STRICT_PATHS)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr


def test_fakes_satisfy_the_protocols_they_stand_in_for():
    result = _mypy(*FAKE_PATHS)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr
