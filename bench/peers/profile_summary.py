"""Summarise a ``py-spy record --format raw`` profile: where a system's CPU time goes.

Usage::

    python bench/peers/profile_summary.py bench/out/peers/profile-gpufaas-minilm-warm-loaded.txt

Per process (py-spy's ``--subprocesses`` puts ``process PID:"cmdline"`` first in each
stack): its share of the samples, the functions with the most *self* samples (where
the CPU is), and the functions with the most *inclusive* samples (what the time is
spent under). Idle threads are not sampled (py-spy's default), so shares are of busy
CPU time.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME_PATH = re.compile(r"\((?:.*/)?(site-packages/)?([^()]*)\)$")


def _process_name(frame: str) -> str:
    command = frame.split(":", 1)[1].strip('"') if ":" in frame else frame
    for marker, name in (
        ("gpufaas.core.cli gpu-manager", "gpufaas manager"),
        ("gpufaas.core.cli up", "gpufaas gateway"),
        ("tritonserver", "tritonserver"),
        ("triton_python_backend_stub", "triton stub"),
        ("triton_app.py", "pytriton app"),
        ("ray::", "ray " + command.split()[0]),
        ("ray_app.py", "ray driver"),
    ):
        if marker in command:
            return name
    return command.split()[0][-40:] if command else "?"


def _short(frame: str) -> str:
    """``function (path:line)`` without the line and with short paths."""
    match = re.match(r"^(.*) \((.*):\d+\)$", frame)
    if not match:
        return frame
    name, path = match.groups()
    path = path.split("site-packages/")[-1]
    return f"{name} ({path})"


def summarize(path: Path, *, top: int = 12) -> str:
    per_process: Counter[str] = Counter()
    self_time: dict[str, Counter[str]] = {}
    inclusive: dict[str, Counter[str]] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # with --subprocesses a child's stack starts with its parents' process frames
        processes = [f for f in frames if f.startswith("process ")]
        process = _process_name(processes[-1]) if processes else "?"
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        total += count
        per_process[process] += count
        if frames:
            self_time.setdefault(process, Counter())[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            inclusive.setdefault(process, Counter())[frame] += count
    if total == 0:
        return f"{path}: no samples"
    lines = [f"{path.name}: {total} busy samples"]
    for process, count in per_process.most_common():
        lines.append(f"\n{process}: {count} samples ({100 * count / total:.0f}% of busy time)")
        lines.append("  self:")
        for frame, n in self_time.get(process, Counter()).most_common(top):
            lines.append(f"    {100 * n / count:5.1f}%  {frame}")
        lines.append("  inclusive:")
        skip = ("<module>", "_run_module_as_main", "_run_code", "run (asyncio", "Runner.run")
        shown = 0
        for frame, n in inclusive.get(process, Counter()).most_common():
            if frame.startswith(skip) or "base_events.py" in frame or "events.py" in frame:
                continue
            lines.append(f"    {100 * n / count:5.1f}%  {frame}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    for path in args.profiles:
        print(summarize(path, top=args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
