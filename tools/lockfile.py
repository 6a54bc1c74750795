"""Write or compare the constraints files of constraints/ (the Makefile's pinned installs).

    python tools/lockfile.py --write constraints/main.txt .venv-lock/bin/python
        pin what that interpreter's environment holds (every distribution but torch, which TORCH
        picks, and editable installs such as kvtier itself)
    python tools/lockfile.py constraints/main.txt .venv-latest/bin/python
        print what differs between the file and that environment (drift); exit 0 either way

Standard library only: it runs under any of the virtualenvs.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys

UNPINNED = {"torch"}  # chosen by the Makefile's TORCH (the CPU wheel these machines carry)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(python: str) -> dict[str, str]:
    """name -> version of what `python`'s environment holds (pip freeze, editables left out)."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return pins(out)


def pins(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        match = PIN.match(line.strip())
        if match and normalize(match.group(1)) not in UNPINNED:
            found[normalize(match.group(1))] = match.group(2)
    return found


def write(path: str, python: str) -> None:
    versions = installed(python)
    header = [
        "# Pinned by `make lock` (tools/lockfile.py): the exact versions `make` installs under this file",
        "# (the Makefile names the requirements it constrains).",
        f"# Resolved {datetime.date.today()} with Python {platform.python_version()} on {platform.machine()};"
        " torch is not pinned here (the Makefile's TORCH).",
    ]
    lines = [f"{name}=={version}" for name, version in sorted(versions.items())]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(header + lines) + "\n")
    print(f"{path}: {len(lines)} pins")


def diff(path: str, python: str) -> None:
    with open(path, encoding="utf-8") as f:
        locked = pins(f.read())
    now = installed(python)
    rows = [(name, locked.get(name, "-"), now.get(name, "-")) for name in sorted(set(locked) | set(now))
            if locked.get(name) != now.get(name)]  # fmt: skip
    if not rows:
        print(f"no drift: the newest releases are the ones {path} pins")
        return
    width = max(len(name) for name, _, _ in rows)
    print(f"drift: {len(rows)} distributions differ from {path} (- = absent)")
    print(f"{'package':<{width}}  {'locked':<14}  newest")
    for name, old, new in rows:
        print(f"{name:<{width}}  {old:<14}  {new}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="write the file from the environment")
    parser.add_argument("file", help="constraints file")
    parser.add_argument("python", help="interpreter of the environment")
    args = parser.parse_args()
    if args.write:
        write(args.file, args.python)
    else:
        diff(args.file, args.python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
