"""Summarise py-spy raw profiles (`bench/e2e.py --profile DIR`): per thread, its share of the samples and the
functions with the most samples, self and inclusive.

    python bench/profile_summary.py DIR/32-worker-1234.txt [--top 25] [--rate 200]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

THREAD = re.compile(r"^thread \((?:0x)?[0-9a-f]+\)(?:: (?P<name>[^;]*))?")


def parse(path: Path) -> dict[str, Counter[tuple[str, ...]]]:
    """thread name -> stack (outermost first, thread frame dropped) -> samples."""
    stacks: dict[str, Counter[tuple[str, ...]]] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        match = THREAD.match(frames[0])
        name = (match.group("name") if match and match.group("name") else frames[0]).strip()
        stacks[name][tuple(frames[1:])] += int(count)
    return stacks


def short(frame: str) -> str:
    return re.sub(r" \((?:.*/)?(site-packages/)?([^/]+/[^/]+\.py):\d+\)", r" (\2)", frame)


def summarise(path: Path, top: int, rate: float, seconds: float | None) -> str:
    lines = [f"## {path.name}"]
    for name, stacks in sorted(parse(path).items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(stacks.values())
        share = f", {100 * total / rate / seconds:.0f} % of a core" if seconds else ""
        lines.append(f"\n### {name}: {total} samples{share}")
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        for stack, n in stacks.items():
            if stack:
                own[short(stack[-1])] += n
            for frame in {short(f) for f in stack}:
                inclusive[frame] += n
        lines.append("self:")
        lines += [f"  {100 * n / total:5.1f} %  {f}" for f, n in own.most_common(top)]
        lines.append("inclusive:")
        lines += [f"  {100 * n / total:5.1f} %  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--rate", type=float, default=200.0, help="py-spy's samples per second")
    ap.add_argument("--seconds", type=float, help="the recording's length, to print each thread's CPU share")
    args = ap.parse_args()
    for path in args.files:
        print(summarise(path, args.top, args.rate, args.seconds))


if __name__ == "__main__":
    main()
