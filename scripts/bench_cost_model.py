"""``vdit-sparse bench --cost-model`` from a checkout: the code is vdit_sparse/bench/cost_model.py.

    python scripts/bench_cost_model.py --help
"""

import sys

from vdit_sparse.bench.cost_model import main

if __name__ == "__main__":
    sys.exit(main())
