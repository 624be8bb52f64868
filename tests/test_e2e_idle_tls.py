"""An idle daemon *process* holds no ``cryptography`` (issue 16: idle RSS); its first pod loads it and starts.

`cloud-api-adaptor serve` runs as a real child process on the local provider
(private namespace, like ``test_e2e_restart``). Whether the daemon loaded
``cryptography`` is read from outside, in its memory map: the library's
native part (``cryptography/hazmat/bindings/_rust``) is mapped once any of
x509, keys or hashes is imported.
"""

from __future__ import annotations

import asyncio

from cloudadaptor.protocols import health_pb2
from cloudadaptor.dev.shim import ShimEmulator, start_pod, stop_pod
from test_e2e_restart import ServeProcess, serve_process  # noqa: F401 - the fixture


def _mapped_cryptography(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return any("cryptography/hazmat/bindings" in line for line in maps)


async def test_an_idle_daemon_loads_cryptography_only_for_its_first_pod(serve_process, make_pod_netns):  # noqa: F811
    proc: ServeProcess = serve_process()
    await proc.start()
    assert proc.process is not None
    tls_dir = proc.root / "tls"
    ca_pem, client_pem = (tls_dir / "ca.pem").read_text(), (tls_dir / "client.pem").read_text()
    assert not _mapped_cryptography(proc.process.pid), "the idle daemon loaded cryptography (its CA was made by a child)"
    proc.kill()  # the next start finds the CA and client certificate and keeps them
    await proc.start()
    assert (tls_dir / "ca.pem").read_text() == ca_pem and (tls_dir / "client.pem").read_text() == client_pem
    assert not _mapped_cryptography(proc.process.pid), "the restarted idle daemon loaded cryptography"
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.90/24", "198.51.100.1")
    shim = ShimEmulator(proc.socket)
    run, _, _ = await start_pod(shim, "lazy-tls", "tls", pod.path)  # mutual TLS to the VM's agent: the pod starts
    try:
        assert _mapped_cryptography(proc.process.pid), "the VM certificate was signed in the daemon"
        assert await run.session.health_check() == health_pb2.HealthCheckResponse.SERVING, "the agent answers over mutual TLS"
    finally:
        await stop_pod(shim, run)
