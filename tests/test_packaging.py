"""Packaging: the installed product holds no test double (the wheel is built and its file list
checked); one version everywhere; the license; the extras that keep each image to the SDKs it
uses; Containerfiles with a pinned base and a slim final stage."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import cloudadaptor

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONTAINERFILES = (ROOT / "deploy" / "Containerfile", ROOT / "deploy" / "image-jobs" / "Containerfile")
PRODUCT_EXTRAS = ("aws", "azure", "kubernetes", "imagebuild")


def test_wheel_ships_no_fake_and_no_testing_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("cloudadaptor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.endswith(".dist-info/licenses/LICENSE")], "the wheel carries the license text"
    modules = [n for n in names if n.endswith(".py")]
    assert "cloudadaptor/dev/demo.py" in modules, "the demo's development tools must stay installable"
    assert not [n for n in modules if n.startswith("cloudadaptor/testing/")], "cloudadaptor.testing must not ship"
    fakes = [n for n in modules if Path(n).stem in {"armserver", "armstate", "armimages", "kubeapi", "sshserver"}]
    assert fakes == [], f"test doubles in the wheel: {fakes}"
    for name in modules:
        text = zipfile.ZipFile(wheel).read(name).decode()
        assert "class FakeArm" not in text and "KubeApiServer" not in text and "FakeSshHost" not in text, name


# --------------------------------------------------------------------- version


def test_the_version_has_one_source_and_the_image_tags_follow_it():
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cloudadaptor.__version__"}
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", cloudadaptor.__version__)
    tagged = 0
    for kustomization in sorted((ROOT / "deploy").rglob("kustomization.yaml")):
        for image in yaml.safe_load(kustomization.read_text()).get("images") or []:
            assert image.get("newTag") == cloudadaptor.__version__, f"{kustomization}: {image}"
            assert "newName" not in image, f"{kustomization}: no registry in the repository; operators set newName"
            tagged += 1
    assert tagged >= 3, "the adaptor image and both image Jobs"


def test_the_changelog_keeps_a_changelog_and_its_newest_release_is_the_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$", text, re.MULTILINE)
    assert "## [Unreleased]" in text and text.index("## [Unreleased]") < text.index(f"## [{releases[0][0]}]")
    assert releases[0][0] == cloudadaptor.__version__, "the newest release in CHANGELOG.md is __version__"
    sections = set(re.findall(r"^### (\w+)$", text, re.MULTILINE))
    assert sections <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, sections


# --------------------------------------------------------------------- license


def test_the_license_file_is_the_declared_license():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text
    for containerfile in CONTAINERFILES:
        assert 'org.opencontainers.image.licenses="Apache-2.0"' in containerfile.read_text(), containerfile


# ---------------------------------------------------------------------- extras


def requirements(extra: str | None = None) -> list[Requirement]:
    entries = PYPROJECT["project"]["dependencies"] if extra is None else PYPROJECT["project"]["optional-dependencies"][extra]
    return [Requirement(entry) for entry in entries]


def closure(names: set[str]) -> set[str]:
    """The distributions ``names`` pull in when installed (their own requirements, recursively)."""
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for entry in requires:
            req = Requirement(entry)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def allowed_distributions(extras: tuple[str, ...]) -> set[str]:
    direct = {r.name for r in requirements()} | {r.name for extra in extras for r in requirements(extra)}
    return closure(direct)


# Which extras a module may need when imported; every other module must import with the base install.
AREAS = (
    ("cloudadaptor.providers.aws", ("aws",)),
    ("cloudadaptor.providers.azure", ("azure",)),
    ("cloudadaptor.k8s", ("kubernetes",)),
    ("cloudadaptor.webhook", ("kubernetes",)),
    ("cloudadaptor.imagebuild.aws", ("imagebuild", "aws")),
    ("cloudadaptor.imagebuild.azure", ("imagebuild", "azure")),
    ("cloudadaptor.imagebuild.azure_gallery", ("imagebuild", "azure")),
    ("cloudadaptor.imagebuild.configmap", ("kubernetes",)),
    ("cloudadaptor.imagebuild", ("imagebuild",)),
    ("cloudadaptor.protocols.generate", None),  # `make protos`: a development tool from the test extra
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_time_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported: module level, outside functions and TYPE_CHECKING blocks."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def third_party_at_import(module: str, modules: dict[str, Path]) -> set[str]:
    """Top-level names of the non-stdlib, non-cloudadaptor packages importing ``module`` loads."""
    seen: set[str] = set()
    todo = [module]
    external: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in import_time_imports(modules[name]):
            top = imported.split(".")[0]
            if top == "cloudadaptor":
                parts = imported.split(".")
                # Importing a.b.c runs a/__init__, a/b/__init__ and a/b/c.
                todo.extend(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules)
            elif top not in sys.stdlib_module_names and top != "__future__":
                external.add(top)
    return external


def area(module: str) -> tuple[str, ...] | None:
    for prefix, extras in AREAS:
        if module == prefix or module.startswith(prefix + "."):
            return extras
    return ()


def test_each_module_imports_only_what_its_extra_installs():
    modules = {module_name(p): p for p in (ROOT / "cloudadaptor").rglob("*.py")}
    providers = importlib.metadata.packages_distributions()
    problems = []
    for module in sorted(modules):
        extras = area(module)
        if extras is None:
            continue
        allowed = allowed_distributions(extras)
        for top in sorted(third_party_at_import(module, modules)):
            dists = {canonicalize_name(d) for d in providers.get(top, [])}
            assert dists, f"{module} imports {top}, which no installed distribution provides"
            if not dists & allowed:
                problems.append(f"{module} imports {top} ({', '.join(sorted(dists))}) at import time; "
                                f"allowed: base{''.join('+' + e for e in extras)}")
    assert problems == [], "\n".join(problems)


def test_the_base_install_is_what_serve_on_the_local_provider_and_the_pod_vm_need():
    base = {canonicalize_name(r.name) for r in requirements()}
    # prometheus-client: the daemon's /metrics, /healthz and /startup endpoint, served by every `serve`
    # (over the standard library's HTTP server: aiohttp, the webhook's and Kubernetes client's, is not base);
    # uvloop: the event loop of serve, the pod VM forwarder and the namespace VM's init.
    assert base == {"protobuf", "grpcio", "grpcio-health-checking", "cryptography", "pyroute2", "pyyaml",
                    "prometheus-client", "uvloop"}
    for extra in PRODUCT_EXTRAS:
        assert requirements(extra), extra
    sdks = {"aws": {"boto3", "botocore"}, "azure": {"azure-identity", "azure-mgmt-core", "azure-mgmt-compute", "azure-mgmt-network"},
            "kubernetes": {"kubernetes-asyncio", "aiohttp"}, "imagebuild": {"paramiko"}}
    for extra, names in sdks.items():
        assert {canonicalize_name(r.name) for r in requirements(extra)} == names, extra
    (own,) = [r for r in requirements("test") if canonicalize_name(r.name) == "cloudadaptor"]
    assert own.extras == set(PRODUCT_EXTRAS), "the test extra pulls every product extra"


def test_the_pod_vm_requirements_are_base_dependencies_with_the_same_bounds():
    base = {canonicalize_name(r.name): r.specifier for r in requirements()}
    lines = (ROOT / "images" / "podvm" / "requirements.txt").read_text().splitlines()
    for line in (line.strip() for line in lines):
        if line and not line.startswith("#"):
            req = Requirement(line)
            assert base.get(canonicalize_name(req.name)) == req.specifier, f"images/podvm/requirements.txt: {line}"


# --------------------------------------------------------------- Containerfiles


def stages(containerfile: Path) -> tuple[dict[str, str], list[list[str]]]:
    """(ARG defaults before the first FROM, the instruction lines of each stage)."""
    text = re.sub(r"\\\n\s*", " ", containerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    args: dict[str, str] = {}
    result: list[list[str]] = []
    for line in lines:
        if line.startswith("FROM "):
            result.append([])
        if not result:
            if line.startswith("ARG ") and "=" in line:
                key, value = line[4:].split("=", 1)
                args[key] = value
            continue
        result[-1].append(line)
    return args, result


def image_ref(from_line: str, args: dict[str, str]) -> str:
    ref = from_line.split()[1]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref)


@pytest.mark.parametrize("containerfile", CONTAINERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_containerfile_has_a_pinned_base_and_a_slim_final_stage(containerfile):
    args, all_stages = stages(containerfile)
    assert len(all_stages) >= 2, "a build stage and a final stage"
    for stage in all_stages:
        ref = image_ref(stage[0], args)
        first = ref.split("/")[0]
        assert "/" not in ref or not ("." in first or ":" in first or first == "localhost"), f"{ref}: no registry host names"
        assert "@sha256:" in ref or re.search(r":\d+\.\d+\.\d+[-\w.]*$", ref), f"{ref}: pin an exact version or a digest"
    final = all_stages[-1]
    body = " ".join(final)
    for tool in ("pip install", "pip wheel", "apt-get", "dnf ", "gcc"):
        assert tool not in body, f"the final stage runs {tool!r}: build in the first stage"
    assert any(line.startswith("COPY --from=") for line in final), "the final stage takes the build's result"
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1] not in ("0", "root"), "the image must not default to root"
    for line in (line for s in all_stages for line in s if line.startswith("COPY ") and "--from" not in line):
        for name in [token for token in line.split()[1:-1] if not token.startswith("--")]:
            assert (ROOT / name).exists(), f"{containerfile.name} copies {name}, which does not exist"


def extras_of(containerfile: Path) -> set[str]:
    _, all_stages = stages(containerfile)
    (line,) = [line for line in all_stages[0] if line.startswith("ARG EXTRAS=")]
    return set(line.split("=", 1)[1].split(","))


def test_each_image_carries_only_the_sdks_it_uses():
    adaptor, builder = (extras_of(c) for c in CONTAINERFILES)
    assert adaptor == {"aws", "azure", "kubernetes"}, "serve, the controller and the webhook: no SSH client"
    assert builder == {"aws", "azure", "kubernetes", "imagebuild"}, "the builder: SSH and --update-configmap"
    assert adaptor | builder <= set(PYPROJECT["project"]["optional-dependencies"])
    assert (ROOT / "deploy" / "Containerfile").read_text().rstrip().endswith('CMD ["cloud-api-adaptor", "serve"]')


BLOCK_SDK = "import sys\nfor name in sys.argv[1].split(','): sys.modules[name] = None  # as if not installed\n" \
            "from cloudadaptor.cli import main\nsys.exit(main(sys.argv[2:]))"


@pytest.mark.parametrize("provider,sdks", [("aws", "boto3,botocore"), ("azure", "azure")])
def test_a_provider_whose_extra_is_missing_is_one_clear_line(provider, sdks, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CLOUD_PROVIDER": provider, "STATE_DIR": str(tmp_path),
           "SOCKET": str(tmp_path / "hypervisor.sock"), "PODS_DIR": str(tmp_path / "pods")}
    for command in (["serve"], ["config", "check"]):
        result = subprocess.run([sys.executable, "-c", BLOCK_SDK, sdks, *command], env=env, capture_output=True, text=True,
                                timeout=60)
        output = result.stdout + result.stderr
        assert result.returncode in (1, 2), f"{command}: exit {result.returncode}\n{output}"
        assert f"pip install 'cloudadaptor[{provider}]'" in output and "Traceback" not in output, output
    # serve keeps its own log (STATE_DIR/adaptor.log, for `diagnose`) from the start; nothing else may exist.
    assert [p.name for p in tmp_path.iterdir() if p.name != "adaptor.log"] == [], "nothing was started"
