"""An independent ttrpc client, written from docs/ARCHITECTURE.md ("Wire facts") with struct and a hand
protobuf encoder (none of our ttrpc or generated code), drives the real daemon:
Version, CreateVM, StartVM, Health.Check through the returned agent socket, StopVM.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import struct
import tempfile
from pathlib import Path


from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.config import load_settings

_serial = itertools.count(1)


# --- minimal protobuf wire encoding (varint, length-delimited) --------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _decode(data: bytes) -> dict[int, list]:
    fields: dict[int, list] = {}
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 2:
            length, i = _read_varint(data, i)
            value, i = data[i:i + length], i + length
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, i


class RawTtrpcClient:
    """One unix connection; unary calls with odd, increasing stream ids."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(120)
        self.sock.connect(path)
        self.stream_id = 1

    def call(self, service: str, method: str, payload: bytes, timeout_nano: int = 0) -> tuple[int, str, bytes]:
        request = _field_bytes(1, service.encode()) + _field_bytes(2, method.encode()) + _field_bytes(3, payload)
        if timeout_nano:
            request += _field_varint(4, timeout_nano)
        stream_id, self.stream_id = self.stream_id, self.stream_id + 2
        self.sock.sendall(struct.pack(">IIBB", len(request), stream_id, 1, 0) + request)
        length, got_stream, frame_type, _flags = struct.unpack(">IIBB", self._read(10))
        assert (got_stream, frame_type) == (stream_id, 2), f"expected a response on stream {stream_id}"
        response = _decode(self._read(length))
        status = _decode(response[1][0]) if 1 in response else {}
        code = status.get(1, [0])[0]
        message = status.get(2, [b""])[0].decode()
        return code, message, response.get(2, [b""])[0]

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def _hypervisor_call(path: str, method: str, payload: bytes, timeout_nano: int = 0) -> tuple[int, str, bytes]:
    client = RawTtrpcClient(path)  # the shim opens a connection per call
    try:
        return client.call("hypervisor.Hypervisor", method, payload, timeout_nano)
    finally:
        client.close()


def _shim_session(hv_socket: str, netns_path: str) -> dict[str, object]:
    seen: dict[str, object] = {}
    sandbox = "ab" * 32
    code, _, payload = _hypervisor_call(hv_socket, "Version", _field_bytes(1, b"0.0.1"))
    seen["version"] = (code, _decode(payload).get(1, [b""])[0].decode())
    annotations = {"io.kubernetes.cri.sandbox-name": "raw", "io.kubernetes.cri.sandbox-namespace": "wire",
                   "io.katacontainers.config.hypervisor.default_memory": "2048"}
    entries = b"".join(_field_bytes(2, _field_bytes(1, k.encode()) + _field_bytes(2, v.encode())) for k, v in annotations.items())
    code, message, payload = _hypervisor_call(
        hv_socket, "CreateVM", _field_bytes(1, sandbox.encode()) + entries + _field_bytes(3, netns_path.encode()))
    assert code == 0, message
    agent_socket = _decode(payload)[1][0].decode()
    seen["agent_socket"] = agent_socket
    code, message, _ = _hypervisor_call(hv_socket, "StartVM", _field_bytes(1, sandbox.encode()), timeout_nano=600 * 10**9)
    seen["start"] = (code, message)
    agent = RawTtrpcClient(agent_socket)
    try:
        code, message, payload = agent.call("grpc.Health", "Check", b"")
        seen["health"] = (code, _decode(payload).get(1, [0])[0])
    finally:
        agent.close()
    code, message, _ = _hypervisor_call(hv_socket, "StopVM", _field_bytes(1, sandbox.encode()))
    seen["stop"] = (code, message)
    code, message, _ = _hypervisor_call(hv_socket, "StartVM", _field_bytes(1, b"no-such-sandbox"))
    seen["start_unknown"] = code
    code, message, _ = _hypervisor_call(hv_socket, "CreateVM", _field_bytes(1, b"../../etc") + _field_bytes(3, netns_path.encode()))
    seen["create_traversal"] = (code, message)
    return seen


async def test_independent_client_drives_the_daemon(private_ns, make_pod_netns):
    n = next(_serial) + 40
    root = Path(tempfile.mkdtemp(prefix="wire-", dir="/run"))
    settings = load_settings({
        "CLOUD_PROVIDER": "local", "STATE_DIR": str(root), "SOCKET": str(root / "hv.sock"), "PODS_DIR": str(root / "pods"),
        "LOCAL_CLOUD_BRIDGE": f"ppwire{n}", "LOCAL_CLOUD_CIDR": "203.0.113.192/26", "PROXY_TIMEOUT": "20s",
    })
    daemon = Daemon(settings)
    await daemon.start()
    try:
        pod = await asyncio.to_thread(make_pod_netns, "198.51.100.50/24", "198.51.100.1")
        seen = await asyncio.to_thread(_shim_session, str(settings.socket), pod.path)
    finally:
        await daemon.close()
        from pyroute2 import IPRoute

        def drop_bridge() -> None:
            with IPRoute() as ipr:
                for index in ipr.link_lookup(ifname=f"ppwire{n}"):
                    ipr.link("del", index=index)

        await asyncio.to_thread(drop_bridge)
        shutil.rmtree(root, ignore_errors=True)
    assert seen["version"][0] == 0 and seen["version"][1], seen
    assert str(seen["agent_socket"]).endswith("/agent.ttrpc")
    assert seen["start"] == (0, ""), seen
    assert seen["health"] == (0, 1), "Health.Check through the agent socket answers SERVING"
    assert seen["stop"] == (0, ""), seen
    assert seen["start_unknown"] == 5, "StartVM of an unknown id is NOT_FOUND"
    assert seen["create_traversal"][0] == 3 and ".." in seen["create_traversal"][1]
    assert not os.path.exists(str(seen["agent_socket"]))
