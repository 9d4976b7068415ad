"""``vdit-sparse bench --kernels`` from a checkout: the code is vdit_sparse/bench/kernels.py.

    python scripts/bench_kernels.py --help
"""

import sys

from vdit_sparse.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
