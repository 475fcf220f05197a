"""The demo's main job: a numpy job whose arrays are several times the local
limit it runs under. Prints a digest of its results, so a run under dmem can
be compared with a plain run bit for bit."""
import hashlib
import sys
import time

import numpy as np

n = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
t0 = time.time()
rng = np.random.default_rng(2026)
a = rng.standard_normal((n, n))
b = rng.standard_normal((n, n))
c = a @ b
col_norms = np.linalg.norm(c, axis=0)
s = np.sort(c, axis=None)
arrays = (a.nbytes + b.nbytes + c.nbytes + s.nbytes) >> 20
print(f"arrays: {arrays} MiB (n={n})")
print(f"sha256(a@b) = {hashlib.sha256(c.tobytes()).hexdigest()}")
print(f"sum = {float(c.sum())!r}, max column norm = {float(col_norms.max())!r}, median = {float(s[len(s) // 2])!r}")
print(f"job time: {time.time() - t0:.2f} s", file=sys.stderr)
