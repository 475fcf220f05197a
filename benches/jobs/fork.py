"""Fork job: a parent with a large numpy array forks repeatedly; each child
reads a sixteenth of the array and exits. Under a local limit below the
array's size this measures what a fork costs when most of the parent's
heap is out of it. Usage: fork.py MIB FORKS. Prints a digest of the array
(compare runs bit for bit), the median time of fork() itself and the job's
seconds."""
import hashlib
import os
import sys
import time

import numpy as np

mib, forks = int(sys.argv[1]), int(sys.argv[2])
t0 = time.perf_counter()
a = np.arange(mib * 131072, dtype=np.float64)
took = []
for k in range(forks):
    a[k::97] += 1.0  # the parent rewrites every page between forks
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if float(a[: a.size // 16].sum()) > 0 else 1)
    took.append(time.perf_counter() - t)
    _, status = os.waitpid(pid, 0)
    assert status == 0, f"child exited with {status}"
seconds = time.perf_counter() - t0
print(f"digest={hashlib.sha256(a.tobytes()).hexdigest()}")
print(f"fork_ms_median={1000 * sorted(took)[len(took) // 2]:.1f}")
print(f"seconds={seconds}")
