"""Listening sockets: bound here, and handed from a parent process to the server it starts.

``gpufaas up`` binds each child server's port itself and passes the listening socket down
(``--listen-fd``), so the port is held from the moment it is chosen: no other process can take
it before the child serves (the race a "free port" probe leaves open).
"""

from __future__ import annotations

import socket


def listening_socket(host: str, port: int, *, shared: bool) -> socket.socket:
    """A TCP listening socket; ``shared``: SO_REUSEPORT, so that every replica on this machine
    binds the same port and the kernel spreads connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


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
