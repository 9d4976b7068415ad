"""``vdit-sparse bench --e2e`` from a checkout: the code is vdit_sparse/bench/e2e.py.

    python scripts/bench_e2e.py --help
"""

import sys

from vdit_sparse.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
