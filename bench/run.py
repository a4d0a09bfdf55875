"""Run the curvature benchmark: ``python bench/run.py [--quick] [--workloads ...] [--out F]``.

The same as ``curvlib bench``; the harness lives in :mod:`curvlib.benchmark` so that the
console command works from an installed package. Options beyond the command's:
``--repeats N`` (timed repeats per row), ``--device cuda``, ``--quiet``.
See docs/performance.md for the table of the latest run and how to read it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from curvlib.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
