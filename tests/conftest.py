"""Test-wide settings.

One intra-op thread: the tiny models in the tests are latency-bound, and on a shared 2-core CI machine
several torch threads fight each other (10-50x swings were measured). Set before torch is imported.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
