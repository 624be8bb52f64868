"""Static checks that catch real mistakes: unused or undefined names, syntax."""

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
