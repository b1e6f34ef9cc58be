"""How fast the HE server's spool writes an input: buffered (into fresh page-cache pages) against direct
(``O_DIRECT`` from one reused page-aligned buffer, ``protocols.he.spool``), in the same process.

The HE server writes each counted input (32 MB at P = 1M) to its own new file while it parses and adds it; the
write is the input stage's critical path when it is slower than those (about 60 ms an input, docs/performance.md).

    python benchmarks/spool_write.py                  # 30 files of 32 MB in the system's temporary folder
    python benchmarks/spool_write.py --folder /dev/shm --files 10 --megabytes 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocols.he import spool  # noqa: E402


def rate(write, folder: Path, data: bytes, files: int) -> float:
    """GB/s of ``write(path, data)`` into ``files`` new files of ``folder``."""
    start = time.perf_counter()
    for index in range(files):
        write(folder / f"{write.__name__}-{index:04d}", data)
    return files * len(data) / (time.perf_counter() - start) / 1e9


def buffered(path: Path, data: bytes) -> None:
    with open(path, "xb") as file:
        file.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=tempfile.gettempdir(), help="where to write (default: the system's "
                        "temporary folder, where the HE server spools)")
    parser.add_argument("--files", type=int, default=30)
    parser.add_argument("--megabytes", type=int, default=32, help="size of each file (an HE input at P = 1M: 32)")
    args = parser.parse_args()
    data = os.urandom(args.megabytes << 20)
    folder = Path(tempfile.mkdtemp(prefix="spool-write-", dir=args.folder))
    inputs = spool.Spool(parent=folder)
    try:
        def spooled(path: Path, data: bytes) -> None:
            inputs.put(path.name, data)

        print(f"{args.files} files of {args.megabytes} MiB in {folder.parent} (load average before: "
              f"{os.getloadavg()[0]:.2f})")
        baseline = rate(buffered, folder, data, args.files)
        today = rate(spooled, folder, data, args.files)
        mode = "O_DIRECT" if inputs.writes_directly else "buffered: O_DIRECT refused here"
        print(f"buffered write   {baseline:.2f} GB/s")
        print(f"spool write      {today:.2f} GB/s  ({mode})   spool / buffered {today / baseline:.2f}")
    finally:
        inputs.clear()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
