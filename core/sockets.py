"""Listening sockets handed from a parent process to the server it starts.

``gpufaas up`` binds each child server's port itself and passes the listening socket down
(``--listen-fd``), so the port is held from the moment it is chosen: no other process can take
it before the child serves (the race a "free port" probe leaves open).
"""

from __future__ import annotations

import socket


def inherited_listener(fd: int) -> socket.socket:
    """The listening TCP socket at descriptor ``fd``, inherited from the parent; an OSError that
    says what is wrong when ``fd`` is no such socket (the descriptor is left open then)."""
    try:
        sock = socket.socket(fileno=fd)  # the family and type are read from the descriptor
    except OSError as e:  # not a socket, or not open
        raise OSError(f"descriptor {fd} is not a TCP socket ({e.strerror})") from None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            raise OSError(f"descriptor {fd} is not a TCP socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise OSError(f"the socket at descriptor {fd} is not listening")
    except OSError:
        sock.detach()  # not ours to close
        raise
    return sock
