"""containerd's ttrpc over asyncio streams. Knows nothing of kata.

``Server`` and ``Client`` speak unary calls exactly as containerd's reference
implementation does; ``relay`` copies frames between two connections.
"""

from cloudadaptor.ttrpc.client import Client
from cloudadaptor.ttrpc.errors import Code, ConnectionClosed, TtrpcError
from cloudadaptor.ttrpc.framing import MAX_MESSAGE_LENGTH
from cloudadaptor.ttrpc.relay import relay
from cloudadaptor.ttrpc.server import CallContext, Handler, Server, unary

__all__ = [
    "CallContext",
    "Client",
    "Code",
    "ConnectionClosed",
    "Handler",
    "MAX_MESSAGE_LENGTH",
    "Server",
    "TtrpcError",
    "relay",
    "unary",
]
