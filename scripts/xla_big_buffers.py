"""Lists the large allocations in XLA buffer-assignment dumps (--xla_dump_to=DIR).

    python scripts/xla_big_buffers.py DIR [--min-gib 1]

For each *buffer-assignment.txt: every allocation of at least --min-gib, with its kind
(parameter, temp, live-out) and the first values assigned to it, to name the buffer behind an
out-of-memory error that a program's memory analysis does not explain.
"""

from __future__ import annotations

import argparse
import glob
import os
import re


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump_dir")
    ap.add_argument("--min-gib", type=float, default=1.0)
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.dump_dir, "*buffer-assignment.txt")))
    print(f"{len(files)} buffer-assignment files under {args.dump_dir}")
    for path in files:
        lines = open(path).read().splitlines()
        hits = []
        for i, line in enumerate(lines):
            m = re.match(r"allocation (\d+): size (\d+)(.*)", line)
            if m and int(m.group(2)) >= args.min_gib * (1 << 30):
                values = [v.strip()[:160] for v in lines[i + 1 : i + 4] if v.startswith(" ")]
                hits.append((int(m.group(2)), m.group(3).strip()[:160], values))
        if hits:
            print(f"== {os.path.basename(path)}")
            for size, kind, values in hits:
                print(f"  {size / (1 << 30):7.2f} GiB {kind}")
                for v in values:
                    print(f"      {v}")


if __name__ == "__main__":
    main()
