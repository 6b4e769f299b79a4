"""A quick reachability probe, so code paths that need the internet fail in seconds, not after retries; and a
free local port for the servers and process groups that tests and benchmarks start.

Usage:
    if not host_reachable("huggingface.co"): ...
    port = free_port()
"""

from __future__ import annotations

import socket

PROBE_TIMEOUT_SECONDS = 3.0


def host_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_SECONDS) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds (DNS included)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
