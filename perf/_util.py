"""Helpers shared by the whole-rack benchmarks."""

from __future__ import annotations

import socket
import time

import psutil


def tree_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and all its descendants (0 if it is gone)."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def wait_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    """Block until ``host:port`` accepts TCP connections.

    Raises:
        RuntimeError: not listening after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)  # a listener has no readiness event to wait on
    raise RuntimeError(f"port {port} not listening after {timeout}s")
