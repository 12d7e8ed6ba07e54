"""The ``gpufaas`` command: a dispatcher over the subcommands the installed packages declare.

Each component declares its subcommands as entry points of the group ``gpufaas.commands``
(``pyproject.toml``): the name is the subcommand, the object a ``main(argv) -> int`` that parses
its own arguments. This module finds them through :mod:`importlib.metadata`, so ``core`` imports
no component, and a component's subcommand loads only that component::

    gpufaas [-v] <command> [args...]     # python -m gpufaas.core.cli works the same way

The composition root (``gpufaas up``, the gateway) lives in ``scheduler/``; the GPU manager's in
``gpu_manager/``; the operator's in ``operator/``; the tools over ``core`` in
:mod:`gpufaas.core.commands`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points

COMMAND_GROUP = "gpufaas.commands"

Command = Callable[[Sequence[str]], int]


def commands() -> dict[str, EntryPoint]:
    """The installed subcommands, by name."""
    return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}


def configure_logging(*, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: nothing per request on the hot path.
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _usage(found: dict[str, EntryPoint]) -> str:
    lines = ["usage: gpufaas [-v] <command> [args...]", "", "commands:"]
    for name in sorted(found):
        lines.append(f"  {name}")
    lines.append("")
    lines.append("`gpufaas <command> --help` describes each one.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    while args[:1] and args[0] in ("-v", "--verbose"):
        verbose = True
        args.pop(0)
    found = commands()
    if not args or args[0] in ("-h", "--help"):
        print(_usage(found), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    entry = found.get(name)
    if entry is None:
        print(f"gpufaas: unknown command {name!r}\n\n{_usage(found)}", file=sys.stderr)
        return 2
    configure_logging(verbose=verbose)
    command: Command = entry.load()
    try:
        return command(rest)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
