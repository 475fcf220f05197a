#!/usr/bin/env python3
"""dmem's benchmark suite: how much slower is a job with X% of its memory
local, against having the RAM, and against what Linux already offers (swap
to zram, swap to a file) under the same limit?

Run through scripts/bench.sh (which builds and installs what is needed).

Contenders, for every workload and local fraction, interleaved in a fresh
random order each round so machine noise hits them alike:
  local      no limit at all (the baseline)
  dmem       `dmem run --local-limit L` with a memory node on loopback TCP
  dmem-veth  the memory node in its own network namespace over a veth pair
  zram       a cgroup-v1 memory limit with swap to zram only
  swapfile   the same limit with swap to a file only

L is a fraction of the job's footprint, measured as the peak of managed
memory in a dmem run without effective limit. A kernel contender's cgroup
limit is L plus the job's unmanaged memory (its plain peak RSS minus the
footprint: interpreter, libraries), so both page the same data.

Everything set up here (zram, swapfile, cgroup, namespace, memory node) is
torn down at the end, also on Ctrl-C or SIGTERM. Every run's result digest
must match the plain run's: a mismatch is reported and fails the suite.
"""
import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release"
SUITE = Path(__file__).resolve().parent
CG_ROOT = Path("/sys/fs/cgroup/memory")
NETNS = "dmem-bench"
VETH_HOST, VETH_NODE = "dmbench-h", "dmbench-n"
HOST_IP, NODE_IP, NODE_PORT = "10.213.7.1", "10.213.7.2", 7411
CONTENDERS = ["local", "dmem", "dmem-veth", "zram", "swapfile"]
KERNEL = ("zram", "swapfile")
MIB = 1 << 20


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*cmd, check=True, **kw):
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, **kw)


class Machine:
    """What the suite changes on the machine, undone by restore()."""

    def __init__(self, work: Path):
        self.work = work
        self.swaps = []  # devices/files we swapon'd
        self.zram = None
        self.swapfile = None
        self.cgroups = []
        self.netns = False
        self.memnode = None
        self.token = work / "token"

    # --- swap ---------------------------------------------------------
    def setup_swap(self, size: int):
        busy = sh("swapon", "--show=NAME", "--noheadings").stdout.split()
        if busy:
            raise SystemExit(f"swap is already on ({', '.join(busy)}): turn it off first, "
                             "the kernel contenders need to control it")
        if shutil.which("modprobe"):
            sh("modprobe", "zram", check=False)
        dev = None
        r = sh("zramctl", "--find", "--size", str(size), "--algorithm", "lz4", check=False)
        if r.returncode == 0:
            dev = r.stdout.strip()
        elif Path("/sys/block/zram0").exists():
            dev = "/dev/zram0"
            Path("/sys/block/zram0/reset").write_text("1")
            Path("/sys/block/zram0/disksize").write_text(str(size))
        if not dev:
            raise SystemExit("no zram device (modprobe zram failed)")
        self.zram = dev
        sh("mkswap", dev)
        self.swapfile = self.work / "swapfile"
        sh("fallocate", "-l", str(size), self.swapfile)
        os.chmod(self.swapfile, 0o600)
        sh("mkswap", self.swapfile)

    def swap_only(self, which):
        """Exactly one swap target on (None: none)."""
        want = {"zram": self.zram, "swapfile": str(self.swapfile) if self.swapfile else None}.get(which)
        for s in list(self.swaps):
            if s != want:
                sh("swapoff", s, check=False)
                self.swaps.remove(s)
        if want and want not in self.swaps:
            sh("swapon", want)
            self.swaps.append(want)

    # --- cgroup -------------------------------------------------------
    def cgroup(self, limit: int) -> Path:
        cg = CG_ROOT / f"dmem-bench-{os.getpid()}-{len(self.cgroups)}"
        cg.mkdir()
        self.cgroups.append(cg)
        (cg / "memory.swappiness").write_text("100")
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        return cg

    @staticmethod
    def oom_kills(cg: Path) -> int:
        """Processes of the group the OOM killer killed (cgroup v1)."""
        try:
            for line in (cg / "memory.oom_control").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def drop_cgroup(self, cg: Path):
        for _ in range(50):
            try:
                cg.rmdir()
                self.cgroups.remove(cg)
                return
            except OSError:
                time.sleep(0.1)

    # --- remote memory node --------------------------------------------
    def setup_veth_node(self, capacity: int):
        self.token.write_bytes(os.urandom(32).hex().encode())
        sh("ip", "netns", "add", NETNS)
        self.netns = True
        sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NODE)
        sh("ip", "link", "set", VETH_NODE, "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", VETH_HOST)
        sh("ip", "link", "set", VETH_HOST, "up")
        sh("ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{NODE_IP}/24", "dev", VETH_NODE)
        sh("ip", "netns", "exec", NETNS, "ip", "link", "set", VETH_NODE, "up")
        sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
        self.memnode = subprocess.Popen(
            ["ip", "netns", "exec", NETNS, str(BIN / "dmem-memnode"), "--listen",
             f"{NODE_IP}:{NODE_PORT}", "--capacity", str(capacity), "--token-file", str(self.token)],
            stdout=subprocess.DEVNULL, stderr=open(self.work / "memnode.log", "w"))
        for _ in range(100):
            try:
                socket.create_connection((NODE_IP, NODE_PORT), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the memory node in the namespace did not come up")

    def restore(self):
        if self.memnode:
            self.memnode.terminate()
            try:
                self.memnode.wait(5)
            except subprocess.TimeoutExpired:
                self.memnode.kill()
        if self.netns:
            sh("ip", "link", "del", VETH_HOST, check=False)
            sh("ip", "netns", "del", NETNS, check=False)
        for cg in list(self.cgroups):
            self.drop_cgroup(cg)
        for s in list(self.swaps):
            sh("swapoff", s, check=False)
        self.swaps.clear()
        if self.zram:
            sh("zramctl", "--reset", self.zram, check=False)
        if self.swapfile and self.swapfile.exists():
            self.swapfile.unlink()


# --- workloads -----------------------------------------------------------

def workloads(quick: bool, work: Path, gemm_sizes=None):
    memtouch = work / "memtouch"
    sh("cc", "-O2", "-o", memtouch, SUITE / "memtouch.c")
    heap = 256 if quick else 2048
    sort_mib = 16 if quick else 512
    sort_input = work / "sort-input.txt"
    rng = random.Random(2026)
    with open(sort_input, "w") as f:
        written = 0
        while written < sort_mib * MIB:
            line = "%016x %d\n" % (rng.getrandbits(64), rng.getrandbits(20))
            f.write(line)
            written += len(line)
    py = sys.executable
    w = [
        ("scan", [memtouch, "scan", heap, 3]),
        ("random 4K r/w", [memtouch, "rand", heap, 40000 if quick else 400000]),
    ]
    for n in (gemm_sizes or ([1536] if quick else [4096, 8192])):
        w.append((f"gemm n={n}", [py, ROOT / "benches/jobs/gemm.py", n]))
    w.append(("kmeans", [py, ROOT / "benches/jobs/kmeans.py", 1 << (18 if quick else 22), 16, 8, 5]))
    # GNU sort's buffer comes from malloc: the tool's own memory is paged.
    w.append(("sort", [SUITE / "timed.sh", "sort", "-S", f"{sort_mib * 2}M", "-T", work, sort_input]))
    return [(name, [str(c) for c in cmd]) for name, cmd in w]


def parse(out: str):
    vals = dict(l.split("=", 1) for l in out.splitlines() if "=" in l)
    return float(vals["seconds"]), vals["digest"].strip(), vals.get("rate")


def run_one(m: Machine, contender: str, cmd, limit: int, unmanaged: int, work: Path, timeout: int):
    """Returns (seconds, digest, rate, dmem stats or None), or None on a timeout."""
    stats_path = work / "stats.json"
    if stats_path.exists():
        stats_path.unlink()
    cg = None
    preexec = None
    full = list(cmd)
    if contender.startswith("dmem"):
        full = [str(BIN / "dmem"), "run", "--local-limit", str(limit), "--stats-json", str(stats_path)]
        if contender == "dmem-veth":
            full += ["--memnode", f"{NODE_IP}:{NODE_PORT}", "--token-file", str(m.token)]
        full += ["--"] + list(cmd)
    elif contender in KERNEL:
        m.swap_only(contender)
        cg = m.cgroup(limit + unmanaged)
        tasks = cg / "tasks"

        def preexec():
            tasks.write_text(str(os.getpid()))
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    finally:
        oom_kills = 0
        if cg:
            oom_kills = m.oom_kills(cg)
            m.drop_cgroup(cg)
    if proc.returncode != 0:
        if contender in KERNEL and (proc.returncode == -signal.SIGKILL or oom_kills):
            # The cgroup's OOM killer: Linux could not run the job at this
            # limit. A result for the table, not an error of the suite.
            return "oom"
        raise RuntimeError(f"{contender}: {' '.join(full)} failed ({proc.returncode}): {err[-2000:]}")
    seconds, digest, rate = parse(out)
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    return seconds, digest, rate, stats


def plain_run(cmd):
    """Runs `cmd` plainly in a fresh process; returns its stdout and the
    peak RSS (bytes) of that run alone."""
    probe = ("import resource, subprocess, sys\n"
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True)\n"
             "sys.stdout.write(r.stdout)\n"
             "print('maxrss=%d' % (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))\n")
    out = subprocess.run([sys.executable, "-c", probe] + list(cmd), capture_output=True, text=True,
                         check=True).stdout
    rss = int(next(l for l in out.splitlines() if l.startswith("maxrss=")).split("=")[1])
    return out, rss


def measure(args, m: Machine, work: Path):
    fractions = [int(x) for x in args.fractions.split(",")]
    contenders = [c for c in args.contenders.split(",") if c]
    results = []
    gemm = [int(n) for n in args.gemm.split(",") if n]
    for name, cmd in workloads(args.quick, work, gemm):
        if args.only and name.split()[0] not in args.only.split(","):
            continue
        log(f"{name}: measuring footprint and unmanaged memory")
        r = run_one(m, "dmem", cmd, 64 << 30, 0, work, args.timeout)
        footprint = r[3]["peak_resident_bytes"]
        plain_out, rss = plain_run(cmd)
        unmanaged = max(rss - footprint, 32 * MIB)
        ref_digest = parse(plain_out)[1]
        log(f"{name}: footprint {footprint / MIB:.1f} MiB, unmanaged ~{unmanaged / MIB:.1f} MiB")
        runs, fails = {}, {}
        for rnd in range(args.runs):
            plan = [("local", 100)] + [(c, f) for f in fractions for c in contenders if c != "local"]
            random.shuffle(plan)
            for contender, frac in plan:
                limit = max(footprint * frac // 100, 4 * MIB)
                res = run_one(m, contender, cmd, limit, unmanaged, work, args.timeout)
                key = (contender, frac)
                if res is None or res == "oom":
                    why = "killed by the OOM killer" if res else f"timed out after {args.timeout} s"
                    log(f"{name}: {contender} at {frac}% {why}")
                    runs.setdefault(key, []).append(None)
                    fails.setdefault(key, []).append("oom" if res else "timeout")
                    continue
                seconds, digest, rate, stats = res
                if digest != ref_digest:
                    raise RuntimeError(f"{name}: {contender} at {frac}% gave a different result "
                                       f"(digest {digest} vs {ref_digest})")
                log(f"{name}: round {rnd + 1} {contender:9} {frac:3}%: {seconds:.2f} s")
                runs.setdefault(key, []).append({"seconds": seconds, "rate": rate, "stats": stats})
        results.append(summarize(name, footprint, unmanaged, fractions, contenders, runs, fails))
    return results


def summarize(name, footprint, unmanaged, fractions, contenders, runs, fails):
    def spread(key):
        rs = runs.get(key, [])
        secs = [r["seconds"] for r in rs if r]
        if not secs or len(secs) < len(rs):
            return {"median_s": None, "runs": secs, "failed": fails.get(key, [])}
        return {"median_s": statistics.median(secs), "min_s": min(secs), "max_s": max(secs), "runs": secs}

    base = spread(("local", 100))
    rows = []
    for f in fractions:
        row = {"local_percent": f, "contenders": {}}
        for c in contenders:
            if c == "local":
                continue
            s = spread((c, f))
            if s["median_s"] and base["median_s"]:
                s["slowdown"] = s["median_s"] / base["median_s"]
            last = [r for r in runs.get((c, f), []) if r]
            if last and last[-1]["stats"]:
                st = last[-1]["stats"]
                s["dmem"] = {k: st.get(k) for k in ("faults", "fault_latency_us", "bytes_fetched",
                                                    "bytes_written_back", "evictions", "peak_resident_bytes")}
            row["contenders"][c] = s
        for d in ("dmem", "dmem-veth"):
            for k in KERNEL:
                a, b = row["contenders"].get(d, {}), row["contenders"].get(k, {})
                if a.get("median_s") and b.get("median_s"):
                    row[f"{d}_speedup_vs_{k}"] = b["median_s"] / a["median_s"]
        rows.append(row)
    return {"workload": name, "footprint_bytes": footprint, "unmanaged_bytes": unmanaged,
            "local": base, "fractions": rows}


def fault_latency(args, work: Path):
    path = work / "fault-latency.json"
    cmd = [str(BIN / "dmem-bench"), "fault-latency", "--json", str(path)] + (["--quick"] if args.quick else [])
    log("fault-latency microbenchmark")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(path.read_text())


def markdown(report):
    lines = [f"Benchmark suite, {report['date']}, {report['host']['cpus']} vCPUs, Linux "
             f"{report['host']['kernel']}, {report['runs']} round(s){' (--quick)' if report['quick'] else ''}. "
             "Median seconds (slowdown vs all-local); dmem speed-up vs zram / swapfile.", ""]
    cont = [c for c in report["contenders"] if c != "local"]
    kernel = [k for k in KERNEL if k in cont and "dmem" in cont]
    lines.append("| workload | local | all-local s | " + " | ".join(cont + [f"dmem vs {k}" for k in kernel]) + " |")
    lines.append("|---|---:|---:|" + "---:|" * (len(cont) + len(kernel)))
    for w in report["workloads"]:
        for row in w["fractions"]:
            cells = []
            for c in cont:
                s = row["contenders"].get(c, {})
                if s.get("median_s") is None:
                    cells.append("/".join(sorted(set(s.get("failed") or []))) or "–")
                else:
                    cells.append(f"{s['median_s']:.2f} ({s.get('slowdown', float('nan')):.2f}×)")
            sp = [row.get(f"dmem_speedup_vs_{k}") for k in kernel]
            base = w["local"].get("median_s")
            cells += [f"{x:.2f}×" if x else "–" for x in sp]
            lines.append(f"| {w['workload']} | {row['local_percent']}% | {base:.2f} | " + " | ".join(cells) + " |")
    fl = report.get("fault_latency")
    if fl:
        lines += ["", f"Fault latency (dmem-bench fault-latency): bare uffd p50 {fl['bare_uffd_p50_us']:.1f} µs, "
                  f"bare TCP p50 {fl['bare_tcp_p50_us']:.1f} µs, cache-tier fault p50/p99 "
                  f"{fl['cache_p50_us']:.1f}/{fl['cache_p99_us']:.1f} µs, memory-node fault p50/p99 "
                  f"{fl['remote_p50_us']:.1f}/{fl['remote_p99_us']:.1f} µs, sequential scan at 25% local "
                  f"{fl['seq_scan_gbps']:.2f} GB/s."]
    return "\n".join(lines) + "\n"


def plots(report, out: Path) -> bool:
    """Draws the figures; False (and a line) when matplotlib is missing,
    so that a run started without scripts/bench.sh keeps its results."""
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed (scripts/bench.sh installs it): no plots")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ws = report["workloads"]
    cols = min(3, max(1, len(ws)))
    rows = (len(ws) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, w in zip(axes.flat, ws):
        for c in report["contenders"]:
            if c == "local":
                continue
            xs, ys = [], []
            for row in w["fractions"]:
                s = row["contenders"].get(c, {})
                if s.get("slowdown"):
                    xs.append(row["local_percent"])
                    ys.append(s["slowdown"])
            if xs:
                ax.plot(xs, ys, marker="o", label=c)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(w["workload"])
        ax.set_xlabel("local memory, % of footprint")
        ax.set_ylabel("slowdown vs all-local")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ws):]:
        ax.axis("off")
    fig.suptitle(f"dmem vs kernel swap, {report['date']}")
    fig.tight_layout()
    fig.savefig(out / "slowdown.png", dpi=110)
    fl = report.get("fault_latency")
    if fl:
        fig, ax = plt.subplots(figsize=(6, 4))
        blk = fl["blocks"][0]
        for key, label in (("cache_cdf_us", "cache tier"), ("remote_cdf_us", "memory node (TCP)")):
            pts = blk.get(key) or []
            if pts:
                ax.plot([p[1] for p in pts], [p[0] for p in pts], label=label)
        ax.axvline(fl["bare_uffd_p50_us"], color="gray", ls="--", lw=0.8, label="bare uffd p50")
        ax.axvline(fl["bare_uffd_p50_us"] + fl["bare_tcp_p50_us"], color="gray", ls=":", lw=0.8,
                   label="uffd + TCP p50")
        ax.set_xscale("log")
        ax.set_xlabel("fault latency, µs")
        ax.set_ylabel("fraction of faults")
        ax.legend()
        ax.set_title("dmem 4 KiB read-fault latency CDF")
        fig.tight_layout()
        fig.savefig(out / "fault-latency-cdf.png", dpi=110)
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small workloads, one round (< 10 min)")
    p.add_argument("--runs", type=int, help="rounds (default 3, 1 with --quick)")
    p.add_argument("--fractions", default="100,75,50,25")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--only", default="", help="workloads by first word: scan,random,gemm,kmeans,sort")
    p.add_argument("--no-fault-latency", action="store_true")
    p.add_argument("--gemm", default="", help="GEMM sizes, e.g. 4096 (default 4096,8192; 1536 with --quick)")
    p.add_argument("--timeout", type=int, help="seconds per run before it counts as a timeout "
                   "(default 900, 120 with --quick)")
    p.add_argument("--out", default=str(ROOT / "bench-results" / "suite"))
    args = p.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.timeout = args.timeout or (120 if args.quick else 900)
    if os.geteuid() != 0:
        raise SystemExit("the suite sets up zram, swap, cgroups and namespaces: run it as root")
    if any(c in KERNEL for c in args.contenders.split(",")) and not CG_ROOT.exists():
        raise SystemExit(f"{CG_ROOT} missing: the kernel contenders need the cgroup-v1 memory controller")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(int(time.time()))
    work = Path(tempfile.mkdtemp(prefix="dmem-bench-suite-", dir="/var/tmp"))
    m = Machine(work)

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")
    signal.signal(signal.SIGTERM, on_signal)
    t0 = time.time()
    try:
        contenders = args.contenders.split(",")
        if any(c in KERNEL for c in contenders):
            m.setup_swap((4 << 30) if args.quick else (24 << 30) // 2)
        if "dmem-veth" in contenders:
            m.setup_veth_node(16 << 30)
        report = {
            "date": datetime.date.today().isoformat(),
            "host": {"cpus": os.cpu_count(), "kernel": platform.release()},
            "quick": args.quick, "runs": args.runs, "contenders": contenders,
        }
        report["workloads"] = measure(args, m, work)
        m.swap_only(None)
        if not args.no_fault_latency:
            report["fault_latency"] = fault_latency(args, work)
        report["seconds"] = time.time() - t0
    finally:
        m.restore()
        subprocess.run(["rm", "-rf", str(work)])
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "results.md").write_text(md)
    print(md)
    made = ["results.json", "results.md"]
    if plots(report, out):
        made += ["slowdown.png"] + (["fault-latency-cdf.png"] if "fault_latency" in report else [])
    log(f"done in {report['seconds']:.0f} s: {out}/ " + ", ".join(made))


if __name__ == "__main__":
    main()
