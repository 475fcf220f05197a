"""k-means job of the benchmark suite (benches/suite/bench.py) (Lloyd's iterations over a large array,
in the manner of the far-memory papers' Python k-means): `points` points of
`dims` float64 coordinates, `k` clusters, fixed iterations. Prints the time of
the job itself and a digest of the final centroids and labels."""
import hashlib
import sys
import time

import numpy as np

points, dims, k, iters = (int(x) for x in sys.argv[1:5])
t0 = time.perf_counter()
rng = np.random.default_rng(2026)
x = rng.standard_normal((points, dims))
centroids = x[rng.choice(points, k, replace=False)].copy()
sq = (x * x).sum(axis=1)
for _ in range(iters):
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, without an n x k x d temporary.
    d = sq[:, None] - 2.0 * (x @ centroids.T) + (centroids * centroids).sum(axis=1)[None, :]
    labels = d.argmin(axis=1)
    counts = np.bincount(labels, minlength=k)
    for j in range(k):
        if counts[j]:
            centroids[j] = x[labels == j].mean(axis=0)
seconds = time.perf_counter() - t0
h = hashlib.sha256(centroids.tobytes())
h.update(labels.tobytes())
print(f"digest={h.hexdigest()}")
print(f"seconds={seconds}")
