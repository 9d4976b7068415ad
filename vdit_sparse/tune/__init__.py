"""``vdit-sparse tune``: per-layer settings that meet a quality target at the least predicted cost.

command.py runs it (flags, calibration runs, search, validation); calibrate.py records each layer's
error against its budget on dense runs; search.py picks per layer; cost.py predicts attention time;
report.py writes the HTML report.
"""

from .command import HELP, main

__all__ = ["HELP", "main"]
