"""Top entries of a py-spy raw (collapsed) profile: `python -m bench.profile_top prof.txt [N]`."""

from __future__ import annotations

import re
import sys
from collections import Counter


def _short(frame: str) -> str:
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    parts = path.split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1:]
    return f"{func} ({'/'.join(parts[-2:])})"


def top(path: str, n: int = 15, main_only: bool = True) -> str:
    """Self and inclusive shares. main_only drops other threads' stacks: py-spy counts runner threads
    parked in SimpleQueue.get / Event.wait as active, which hides where the event loop's CPU goes."""
    own: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        c = int(count)
        if main_only and "Thread._bootstrap" in stack:
            continue
        total += c
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    out = [f"{total} samples{' (event-loop thread)' if main_only else ''}", "self %  | function"]
    out += [f"{100 * c / total:6.1f} | {f}" for f, c in own.most_common(n)]
    out += ["", "inclusive % | function"]
    out += [f"{100 * c / total:6.1f} | {f}" for f, c in incl.most_common(n + 10)]
    return "\n".join(out)


if __name__ == "__main__":
    print(top(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15))
