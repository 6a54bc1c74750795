"""`kvtier inspect`: summarize and verify the objects of a disk tier directory."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from kvtier.codec.framing import HEADER_SIZE, check_payload, parse_header
from kvtier.errors import CorruptObjectError
from kvtier.report import format_table
from kvtier.storage.files import SUFFIX
from kvtier.units import format_size


def verify_file(path: Path) -> int:
    """Check one object file's header and payload checksum; return its token count."""
    data = path.read_bytes()
    header = parse_header(data)
    if path.stem != header.key.digest.hex() or path.parent.parent.name != header.key.namespace.hex():
        raise CorruptObjectError(f"file name does not match the key in its header ({header.key})")
    check_payload(header, memoryview(data)[HEADER_SIZE:])
    return header.num_tokens


def inspect_disk(root: str, verify: bool = False, delete_corrupt: bool = False) -> int:
    """Print per-namespace counts; with `verify`, check every object. Exit code 1 if any is corrupt."""
    base = Path(root).expanduser()
    if not base.is_dir():
        print(f"{base}: not a directory")
        return 2
    files = sorted(base.glob(f"*/*/*{SUFFIX}"))
    objects: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for path in files:
        ns = path.parent.parent.name
        objects[ns] += 1
        sizes[ns] += path.stat().st_size
    rows = [[ns, objects[ns], format_size(sizes[ns])] for ns in sorted(objects)]
    print(format_table(["namespace", "objects", "bytes"], rows) if rows else f"{base}: no objects")
    if not verify:
        return 0
    bad = 0
    for path in tqdm(files, desc="verify", unit="obj", disable=len(files) < 16):
        try:
            verify_file(path)
        except (CorruptObjectError, OSError) as exc:
            bad += 1
            print(f"CORRUPT {path}: {exc}")
            if delete_corrupt:
                os.unlink(path)
    print(f"verified {len(files)} objects: {len(files) - bad} good, {bad} corrupt")
    return 1 if bad else 0
