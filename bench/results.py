"""What every bench script shares: the run's header (date, commit, machine) and appending its
table to bench/RESULTS.md, in the format the file already uses:

    ## bench/<script>.py — 2026-12-02 17:40 UTC — d87a3d8 + uncommitted changes — 2 cores, 23 GiB, Python 3.10.13

    ```
    <the table, as printed>
    ```

"+ uncommitted changes" is added when `git status --porcelain` lists a change under connector/
or bench/ (what the figures depend on), RESULTS.md itself aside. Appends take an exclusive lock on the file, so two
benchmarks finishing at once do not interleave.
"""

import fcntl
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def commit() -> str:
    """The short commit, with "+ uncommitted changes" when connector/ or bench/ differ from it."""
    head = _git("rev-parse", "--short", "HEAD").strip() or "unknown commit"
    changed = [line[3:] for line in _git("status", "--porcelain").splitlines() if len(line) > 3]
    if any(path.strip('"').startswith(("connector/", "bench/")) and path.strip('"') != "bench/RESULTS.md"
           for path in changed):
        head += " + uncommitted changes"
    return head


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def machine() -> str:
    """e.g. "2 cores, 23 GiB, Python 3.10.13"."""
    return f"{os.cpu_count()} cores, {int(memory_gib())} GiB, Python {platform.python_version()}"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min)"


def header(script: str, when: Optional[float] = None) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))
    return f"## bench/{script} — {stamp} — {commit()} — {machine()}"


def append(script: str, table: str, note: str = "") -> str:
    """Append `table` (verbatim, in a code block) under this run's header; `note` goes after it
    as plain text. Returns the header line."""
    title = header(script)
    block = f"\n{title}\n\n```\n{table.rstrip()}\n```\n" + (f"\n{note.rstrip()}\n" if note else "")
    with open(RESULTS, "a", encoding="utf-8") as results:
        fcntl.flock(results, fcntl.LOCK_EX)
        try:
            results.write(block)
        finally:
            fcntl.flock(results, fcntl.LOCK_UN)
    return title
