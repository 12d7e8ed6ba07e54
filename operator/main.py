"""``gpufaas operator``: run the kopf operator with the gpufaas handlers.

Equivalent to ``kopf run --standalone -A -m gpufaas.operator.handlers``, plus an
early check of the ``GPUFAAS_*`` settings so a bad value fails at start with a
message naming the variable instead of inside kopf's startup.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpufaas operator", description="Run the InferenceFunction operator (kopf)."
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable, exact names); default: all namespaces",
    )
    parser.add_argument(
        "--liveness",
        default=None,
        metavar="URL",
        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true")
    return parser


def run_operator(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))

    from gpufaas.operator.settings import OperatorSettings, SettingsError

    try:
        OperatorSettings.from_env(os.environ)
    except SettingsError as e:
        print(f"gpufaas operator: {e}", file=sys.stderr)
        return 2

    import kopf

    import gpufaas.operator.handlers  # noqa: F401  (registers the handlers)

    log_format = {
        "plain": kopf.LogFormat.PLAIN,
        "full": kopf.LogFormat.FULL,
        "json": kopf.LogFormat.JSON,
    }
    kopf.configure(verbose=args.verbose, debug=args.debug, log_format=log_format[args.log_format])
    if not args.debug:
        # One INFO line per API request and per liveness probe otherwise.
        for noisy in ("httpx", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        kopf.run(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness,
        )
    except KeyboardInterrupt:
        return 130
    return 0
