"""A warm-pool VM's claim step (podvm/claim.py) against the adaptor's claim client (adaptor/pool.py),
with real TLS on loopback: one claim over mTLS writes the pod config; anyone else is refused."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import pytest

from cloudadaptor import podconfig
from cloudadaptor.adaptor import podvmdata
from cloudadaptor.adaptor.pool import ClaimFailed, MtlsClaimer
from cloudadaptor.adaptor.poolstore import PoolState, PoolVm
from cloudadaptor.config import Settings
from cloudadaptor.podvm import claim
from cloudadaptor.tls import AdaptorTls
from cloudadaptor.ttrpc.client import Client
from cloudadaptor.ttrpc.errors import Code, ConnectionClosed, TtrpcError
from cloudadaptor.userdata import APF_CONFIG_PATH
from cloudadaptor.wire import CLAIM_METHOD, CLAIM_SERVICE

POD_INTERFACE = podconfig.PodInterface(name="eth0", mac="02:00:00:00:00:0a", mtu=1450, addresses=("198.51.100.10/24",))

POOL_NAME = "podvm-pool-0a1b2c3d"


def pool_config(tls: AdaptorTls) -> podconfig.ForwarderConfig:
    return podconfig.ForwarderConfig(sandbox_id="", pod_name="", pod_namespace="", tls=tls.mint_vm_material(POOL_NAME))


def pod_user_data(tls: AdaptorTls, vm_name: str = "podvm-web-aaaaaaaa") -> str:
    network = podconfig.PodNetworkConfig(POD_INTERFACE, "192.0.2.1", 555000, 9000)
    config = podconfig.ForwarderConfig(sandbox_id="a" * 64, pod_name="web", pod_namespace="prod",
                                       tls=tls.mint_vm_material(vm_name), network=network)
    return podvmdata.render(config.to_json(), None, b'{"auths":{}}', None, "prod/web")


@pytest.fixture
def adaptor_tls(tmp_path: Path) -> AdaptorTls:
    tls = AdaptorTls.from_settings(Settings(state_dir=tmp_path / "adaptor"))
    assert tls is not None
    return tls


class PoolVmUnderTest:
    """The claim step of one pool VM, serving on 127.0.0.1 in this loop."""

    def __init__(self, config: podconfig.ForwarderConfig, root: Path) -> None:
        self.config, self.root = config, root

    async def __aenter__(self) -> PoolVmUnderTest:
        port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(claim.wait_for_claim(self.config, self.root, "127.0.0.1", 0, port))
        self.port = await asyncio.wait_for(port, 5)
        self.vm = PoolVm(POOL_NAME, PoolState.READY, "i-pool", ("127.0.0.1",))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_a_claim_writes_the_pod_config_and_ends_the_step(adaptor_tls, tmp_path):
    user_data = pod_user_data(adaptor_tls)
    async with PoolVmUnderTest(pool_config(adaptor_tls), tmp_path / "vm") as vm:
        claimer = MtlsClaimer(adaptor_tls, vm.port)
        await claimer.probe(vm.vm)  # readiness: an mTLS handshake, no claim
        assert not vm.task.done()
        await claimer.claim(vm.vm, user_data)
        await asyncio.wait_for(vm.task, 5)  # claimed: the step returns, the port is free for the forwarder
    written = json.loads((tmp_path / "vm" / APF_CONFIG_PATH.lstrip("/")).read_text())
    assert written["pod_name"] == "web" and written["network"]["vni"] == 555000
    assert (tmp_path / "vm/run/peerpod/auth.json").read_text() == '{"auths":{}}'


async def test_a_client_without_the_adaptors_certificate_is_refused(adaptor_tls, tmp_path):
    stranger_tls = AdaptorTls.from_settings(Settings(state_dir=tmp_path / "stranger"))  # another CA
    assert stranger_tls is not None
    async with PoolVmUnderTest(pool_config(adaptor_tls), tmp_path / "vm") as vm:
        no_cert = ssl.create_default_context()
        no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
        for context in (no_cert, stranger_tls.client_context()):
            with pytest.raises((ssl.SSLError, ConnectionClosed, TtrpcError, OSError)):
                client = await Client.connect_tcp("127.0.0.1", vm.port, ssl=context, server_hostname=POOL_NAME)
                try:
                    await client.call(CLAIM_SERVICE, CLAIM_METHOD, pod_user_data(adaptor_tls).encode(), timeout=5)
                finally:
                    await client.close()
        with pytest.raises(ClaimFailed):
            await MtlsClaimer(stranger_tls, vm.port).claim(vm.vm, pod_user_data(stranger_tls))
        assert not vm.task.done(), "the VM must stay unclaimed"
        assert not (tmp_path / "vm" / APF_CONFIG_PATH.lstrip("/")).exists()
        await MtlsClaimer(adaptor_tls, vm.port).claim(vm.vm, pod_user_data(adaptor_tls))  # the adaptor still can
        await asyncio.wait_for(vm.task, 5)


async def test_a_payload_that_is_not_a_pod_config_is_refused_and_the_vm_stays_unclaimed(adaptor_tls, tmp_path):
    async with PoolVmUnderTest(pool_config(adaptor_tls), tmp_path / "vm") as vm:
        client = await Client.connect_tcp("127.0.0.1", vm.port, ssl=adaptor_tls.client_context(), server_hostname=POOL_NAME)
        try:
            for payload, words in [(b"\xff\xfe", "not a pod config"), (b"#cloud-config\n{}\n", "no /run/peerpod/apf.json"),
                                   (podvmdata.render(pool_config(adaptor_tls).to_json(), None, None, None, "x").encode(),
                                    "no pod network")]:
                with pytest.raises(TtrpcError) as err:
                    await client.call(CLAIM_SERVICE, CLAIM_METHOD, payload, timeout=5)
                assert err.value.code == Code.INVALID_ARGUMENT and words in err.value.message, err.value.message
        finally:
            await client.close()
        assert not vm.task.done()
        assert not (tmp_path / "vm" / APF_CONFIG_PATH.lstrip("/")).exists()


async def test_a_second_claim_is_refused(adaptor_tls, tmp_path):
    receiver = claim.ClaimReceiver(tmp_path / "vm")
    await receiver.handle(pod_user_data(adaptor_tls).encode(), None)  # type: ignore[arg-type]
    with pytest.raises(TtrpcError) as err:
        await receiver.handle(pod_user_data(adaptor_tls, "podvm-other-bbbbbbbb").encode(), None)  # type: ignore[arg-type]
    assert err.value.code == Code.FAILED_PRECONDITION and "already claimed" in err.value.message
    written = json.loads((tmp_path / "vm" / APF_CONFIG_PATH.lstrip("/")).read_text())
    assert written["pod_name"] == "web"


def test_a_vm_booted_for_a_pod_does_not_wait(adaptor_tls, tmp_path):
    apf = tmp_path / "apf.json"
    entries = pod_user_data(adaptor_tls)
    from cloudadaptor import userdata
    apf.write_text([e for e in userdata.parse_entries(entries) if e.path == APF_CONFIG_PATH][0].content)
    parser = claim.build_parser(__import__("argparse").ArgumentParser())
    assert claim.run(parser.parse_args(["--config", str(apf), "--root", str(tmp_path / "vm")])) == 0
    assert not claim.is_pool_vm(podconfig.ForwarderConfig.from_json(apf.read_text()))
    assert claim.is_pool_vm(pool_config(adaptor_tls))
    (tmp_path / "bad.json").write_text("{")
    assert claim.run(parser.parse_args(["--config", str(tmp_path / "bad.json")])) == 2
