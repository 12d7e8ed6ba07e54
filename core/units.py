"""Byte quantities in Kubernetes notation (``4Gi``, ``512M``, ``1.5G``) and back."""

from __future__ import annotations

import re

_SUFFIXES = {
    "": 1,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKMGTPE]i?)?\s*$")


def parse_bytes(text: str | int) -> int:
    """Parse a byte quantity; raises ``ValueError`` with the offending text."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"byte quantity must not be negative: {text}")
        return text
    match = _QUANTITY.match(text)
    if match is None or (match.group(2) or "") not in _SUFFIXES:
        raise ValueError(f"not a byte quantity: {text!r} (expected e.g. 512Mi, 4Gi, 1000000)")
    number, suffix = match.group(1), match.group(2) or ""
    return int(float(number) * _SUFFIXES[suffix])


def format_bytes(n: int) -> str:
    """Human form with binary units: ``1536 -> '1.5Ki'``."""
    value = float(n)
    for unit in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(value) < 1024 or unit == "Ti":
            return f"{value:.0f}{unit}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
