"""Run the benchmarks: ``python -m benchmarks [b1 b2 b3 b4 b5 b6 b7]``.

Default b1 b2 b4 b6 b5 (b3 too when RELION is installed); b7 (auto-local refine against
global searches only) runs only when named.

Results go to ``benchmarks/results/*.json`` and ``*.md``.
"""

from __future__ import annotations

import shutil
import sys
import time


def main(argv: list[str]) -> int:
    wanted = argv or ["b1", "b2", "b4", "b6"] + (["b3"] if shutil.which("relion_refine_mpi") else []) + ["b5"]
    t0 = time.perf_counter()
    for name in wanted:
        t = time.perf_counter()
        if name == "b1":
            from benchmarks.b1_methods import main as run
        elif name == "b2":
            from benchmarks.b2_scaling import main as run
        elif name == "b4":
            from benchmarks.b4_roofline import main as run
        elif name == "b3":
            from benchmarks.b3_relion import main as run
        elif name == "b5":
            from benchmarks.b5_realsize import main as run
        elif name == "b6":
            from benchmarks.b6_reconstruct import main as run
        elif name == "b7":
            from benchmarks.b7_autolocal import main as run
        else:
            print(f"unknown benchmark {name!r}; use b1 b2 b3 b4 b5 b6 b7")
            return 2
        print(f"== {name} ==")
        print(run())
        print(f"({time.perf_counter() - t:.0f} s)")
    print(f"benchmarks done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
