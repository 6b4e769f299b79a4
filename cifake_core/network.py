"""A quick reachability probe, so code paths that need the internet fail in seconds, not after retries.

Usage:
    if not host_reachable("huggingface.co"): ...
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
