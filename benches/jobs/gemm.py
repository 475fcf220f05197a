"""GEMM job of the benchmark suite (benches/suite/bench.py): C = A @ B on n x n float64 matrices.
Prints the time of the job itself (allocation, fill and product, not the
interpreter's start) and a digest of C, so runs can be compared bit for bit."""
import hashlib
import sys
import time

import numpy as np

n = int(sys.argv[1])
t0 = time.perf_counter()
rng = np.random.default_rng(2026)
a = rng.standard_normal((n, n))
b = rng.standard_normal((n, n))
c = a @ b
seconds = time.perf_counter() - t0
print(f"digest={hashlib.sha256(c.tobytes()).hexdigest()}")
print(f"seconds={seconds}")
