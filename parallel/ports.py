"""Free TCP ports for rendezvous (torch.distributed stores, test servers)."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (the OS picks it; a race with another process is possible but
    harmless where the caller retries or binds at once)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
