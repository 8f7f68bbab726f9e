"""Listening sockets the supervisor binds before it forks.

A gear that serves TCP declares its listeners (``Gear.listeners``); the supervisor binds each
one here, once, before any process exists, and every replica inherits the socket through
``fork``. Nobody else can bind the port while the rack runs (no ``SO_REUSEPORT``: a stranger
cannot take a share of the connections), a busy port or an unresolvable host stops the start
with a clear message, and a restarted replica finds the socket still bound.
"""

from __future__ import annotations

import socket


class ListenerError(RuntimeError):
    """A listener cannot be bound; the message names host, port and the reason."""


def bind(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A bound, listening, non-blocking TCP socket on ``host:port`` (IPv4 or IPv6).

    Raises:
        ListenerError: the host does not resolve, or the address cannot be bound (in use,
            not local, no permission).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenerError(f"cannot resolve listen host: host={host!r}, port={port}, "
                            f"error={exc.strerror}") from None
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        # SO_REUSEADDR only lets us rebind over TIME_WAIT leftovers; it does not let another
        # socket share the port while this one listens
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen: host={host}, port={port}, "
                            f"error={exc.strerror}") from None
    return sock
