#!/usr/bin/env python3
"""A kata-agent stand-in written from the wire facts alone (not our ttrpc, not the devagent).

    python thirdpartyagent.py --addr unix:///run/kata-containers/agent.sock
    kata-agent --config /etc/agent-config.toml   # as the image's kata-agent.service starts it

With ``--config`` it reads ``server_addr`` from the TOML agent configuration,
as the real kata-agent does; ``thirdpartypayload.py`` packs this very file as
the ``kata-agent`` of a pod VM image payload.

Like the real kata-agent it binds its socket and does NOT create the
socket's directory (the image's kata-agent.service makes it in
ExecStartPre). Every request is printed as ``thirdparty-agent: <service>/<method>
<payload hex>`` to stdout (the VM console). ``grpc.Health/Check`` answers
SERVING; every other method answers an empty message (google.protobuf.Empty).
Standard library only: ttrpc frames are a 10-byte big-endian header
(length, stream id, type, flags) and the envelope is hand-decoded protobuf.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import tomllib

HEADER = struct.Struct(">IIBB")
TYPE_REQUEST, TYPE_RESPONSE = 1, 2
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def fields(data: bytes) -> dict[int, bytes]:
    """The length-delimited fields of a protobuf message (others skipped)."""
    found: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 2:
            size, pos = _varint(data, pos)
            found[number] = data[pos:pos + size]
            pos += size
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire_type}")
    return found


def response(payload: bytes) -> bytes:
    """Response{payload=2} (success carries only the payload)."""
    return b"\x12" + _encode_varint(len(payload)) + payload


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            length, stream, kind, _ = HEADER.unpack(await reader.readexactly(HEADER.size))
            body = await reader.readexactly(length)
            if kind != TYPE_REQUEST:
                continue
            request = fields(body)
            service, method = request.get(1, b"").decode(), request.get(2, b"").decode()
            print(f"thirdparty-agent: {service}/{method} {request.get(3, b'').hex()}", flush=True)
            reply = response(SERVING if (service, method) == ("grpc.Health", "Check") else b"")
            writer.write(HEADER.pack(len(reply), stream, TYPE_RESPONSE, 0) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(path: str) -> None:
    server = await asyncio.start_unix_server(serve_connection, path)
    print(f"thirdparty-agent: serving on {path}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--addr", help="unix://PATH")
    where.add_argument("--config", help="TOML agent configuration holding server_addr (kata-agent's flag)")
    args = parser.parse_args()
    if args.config:
        with open(args.config, "rb") as f:
            args.addr = str(tomllib.load(f).get("server_addr", ""))
    address = args.addr
    if not address.startswith("unix://"):
        sys.exit(f"the agent address must be unix://PATH, not {address!r}")
    asyncio.run(main(address[len("unix://"):]))
