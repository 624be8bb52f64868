"""Provider plugins: a distribution installed at test time registers a provider
through the ``cloudadaptor.providers`` entry point, and the daemon starts a
pod through it with nothing but ``CLOUD_PROVIDER=toy``.

The distribution (tests/plugin_provider) is built and installed with pip into
a temporary ``--target`` directory put on ``sys.path`` (and on PYTHONPATH for
the subprocess), so the test venv is left as it was.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.config import ConfigError, check, load_settings
from cloudadaptor.dev.shim import ShimEmulator, start_pod, stop_pod
from cloudadaptor.providers import base
from links import delete_link

PLUGIN_SOURCE = Path(__file__).parent / "plugin_provider"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory):
    """The toy provider distribution, built and installed into its own directory."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "src"
    shutil.copytree(PLUGIN_SOURCE, source)  # the build writes into its source tree
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    assert list(site.glob("cloudadaptor_toycloud-*.dist-info")), "pip installed no distribution metadata"
    return site


@pytest.fixture
def installed(plugin_site: Path, monkeypatch: pytest.MonkeyPatch):
    """The toy provider is installed for this test (and for subprocesses); removed after."""
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugin_site), os.environ.get("PYTHONPATH")])))
    yield plugin_site
    for name in [m for m in sys.modules if m == "toycloud" or m.startswith("toycloud.")]:
        del sys.modules[name]


def test_without_the_distribution_toy_is_refused_and_the_installed_ones_are_listed():
    assert "toy" not in base.provider_names()
    with pytest.raises(ConfigError) as err:
        load_settings({"CLOUD_PROVIDER": "toy"})
    assert str(err.value) == 'CLOUD_PROVIDER="toy": expected one of: aws, azure, local', str(err.value)


def test_an_installed_plugin_is_a_provider_like_the_built_in_ones(installed):
    assert base.provider_names() == ["aws", "azure", "local", "toy"]
    assert "toycloud.provider" not in sys.modules, "listing providers imports none of them"
    rows, problems = check({"CLOUD_PROVIDER": "toy", "TOY_GREETING": "hi there"})
    assert ("TOY_GREETING", "hi there", "env") in rows and ("LOCAL_CLOUD_BRIDGE", "ppcloud0", "default") in rows
    assert [str(p) for p in problems] == ['TOY_GREETING="hi there": expected letters and digits only']
    _, problems = check({"CLOUD_PROVIDER": "nope"})
    assert str(problems[0]) == 'CLOUD_PROVIDER="nope": expected one of: aws, azure, local, toy'


def test_config_check_of_a_fresh_process_sees_the_plugin(installed):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_", "TOY_"))}
    done = subprocess.run(
        [sys.executable, "-m", "cloudadaptor.cli", "config", "check"],
        env={**env, "CLOUD_PROVIDER": "toy", "TOY_GREETING": "howdy"}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "TOY_GREETING" in done.stdout and "howdy" in done.stdout, done.stdout


async def test_the_daemon_starts_a_pod_through_the_plugin(installed, private_ns, make_pod_netns):
    root = Path(tempfile.mkdtemp(prefix="plugin-", dir="/run"))
    settings = load_settings({
        "CLOUD_PROVIDER": "toy", "TOY_GREETING": "howdy",
        "STATE_DIR": str(root), "SOCKET": str(root / "hv.sock"), "PODS_DIR": str(root / "pods"),
        "NODE_NAME": f"plugin-node-{os.getpid()}", "LOCAL_CLOUD_BRIDGE": f"pptoy{os.getpid() % 1000}",
        "LOCAL_CLOUD_CIDR": "203.0.113.192/26", "PROXY_TIMEOUT": "20s",
    })
    daemon = Daemon(settings)
    await daemon.start()
    try:
        assert type(daemon.provider).__module__ == "toycloud.provider"
        pod = await asyncio.to_thread(make_pod_netns, "198.51.100.60/24", "198.51.100.1")
        run, _, _ = await start_pod(ShimEmulator(str(settings.socket)), "toy-web", "plugins", pod.path)
        result = await run.exec(["echo", "through the toy cloud"])
        assert result.exit_code == 0 and result.stdout == b"through the toy cloud\n", result
        [vm] = await daemon.provider.list_owned({"toycloud/greeting": "howdy"})
        assert vm.id == daemon.lifecycle.store.get(run.sandbox_id).instance_id
        await stop_pod(ShimEmulator(str(settings.socket)), run)
        assert await daemon.provider.list_owned({}) == []
    finally:
        for sandbox in daemon.lifecycle.store.all():
            await daemon.lifecycle.stop(sandbox.id)
        await daemon.close()
        await asyncio.to_thread(delete_link, settings.provider_env["LOCAL_CLOUD_BRIDGE"])
        shutil.rmtree(root, ignore_errors=True)
