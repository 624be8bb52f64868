"""containerd's ttrpc over asyncio streams. Knows nothing of kata."""

from cloudadaptor.ttrpc.errors import Code, ConnectionClosed, TtrpcError
from cloudadaptor.ttrpc.framing import MAX_MESSAGE_LENGTH

__all__ = ["Code", "ConnectionClosed", "TtrpcError", "MAX_MESSAGE_LENGTH"]
