"""Pack a device call's result folder into one file, and unpack it here.

The GPU machine returns at most 8 files a call (the device tool's limits), so a call that runs
many benchmarks lost the JSONs past that (docs/benchmarks.md, 2026-12-03). Bundling at the end of
the command keeps everything in one file:

    # on the device, last in the command:
    python3 benchmarks/bundle_results.py pack $OUT
    # here, into benchmarks/results/<session>/:
    python3 benchmarks/bundle_results.py unpack /work/.device/N/bundle.json benchmarks/results/<session>
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BUNDLE = "bundle.json"


def pack(folder: Path) -> Path:
    """Every file under `folder` (JSON parsed, anything else as text) into folder/bundle.json; the
    originals are removed so that only the bundle comes back."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != BUNDLE):
        text = path.read_text(errors="replace")
        key = path.relative_to(folder).as_posix()
        try:
            files[key] = {"json": json.loads(text)} if path.suffix == ".json" else {"text": text}
        except json.JSONDecodeError:
            files[key] = {"text": text}  # a run killed while writing: keep what is there
    out = folder / BUNDLE
    out.write_text(json.dumps(files, indent=1))
    for key in files:
        (folder / key).unlink()
    return out


def unpack(bundle: Path, dest: Path, prefix: str = "") -> list[Path]:
    """Write a bundle's files under `dest`, the folder path flattened into the file name
    (a/session.log -> <prefix>a_session.log), as benchmarks/results/ keeps them."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for key, item in json.loads(bundle.read_text()).items():
        path = dest / (prefix + key.replace("/", "_"))
        path.write_text(json.dumps(item["json"], indent=1) + "\n" if "json" in item else item["text"])
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="bundle a result folder (on the device)")
    p.add_argument("folder", type=Path)
    u = sub.add_parser("unpack", help="restore a bundle's files (here)")
    u.add_argument("bundle", type=Path)
    u.add_argument("dest", type=Path)
    u.add_argument("--prefix", default="", help="prepended to every file name, e.g. call2")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        print(pack(args.folder))
    else:
        for path in unpack(args.bundle, args.dest, args.prefix):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
