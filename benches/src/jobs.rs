//! `dmem-bench jobs`: real numpy jobs (GEMM, k-means) under `dmem run` at
//! local limits of a fraction of their footprint, against the same job run
//! plainly in the same sitting.
//!
//! The footprint is measured, not guessed: one run under dmem with no
//! effective limit, whose peak of local managed memory is the job's working
//! set as dmem sees it. Then rounds interleave the plain run and every
//! fraction (in alternating order, so machine noise hits them alike). Each
//! job times itself from after the interpreter's start to the end of its
//! work and prints a digest of its result; a digest that differs from the
//! plain run's fails the benchmark (dmem must never change a result).
//! Targets are reported, never asserted.

use std::path::{Path, PathBuf};
use std::process::Command;

use dmem_memnode::size::format_size;
use serde::Serialize;
use serde_json::Value;

use crate::stats::median;

/// Ratio targets by local fraction (percent): ≤ 1.3x at 50%, ≤ 2x at 25%.
const TARGETS: [(u32, f64); 2] = [(50, 1.3), (25, 2.0)];

const GEMM_PY: &str = include_str!("../jobs/gemm.py");
const KMEANS_PY: &str = include_str!("../jobs/kmeans.py");

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Write all figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Smaller jobs, one round: a smoke run of a few minutes.
    #[arg(long)]
    quick: bool,
    /// Rounds per contender (default 3, 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Local limits as percentages of the measured footprint.
    #[arg(long, value_delimiter = ',', default_value = "100,50,25")]
    fractions: Vec<u32>,
    /// GEMM matrix order (default 4096, 2048 with --quick).
    #[arg(long)]
    gemm_n: Option<usize>,
    /// k-means points, 16 float64 coordinates each (default 4M, 1M with
    /// --quick).
    #[arg(long)]
    kmeans_points: Option<usize>,
    /// Only these workloads (gemm, kmeans), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "gemm,kmeans")]
    only: Vec<String>,
    /// The dmem binary (default: next to this executable).
    #[arg(long)]
    dmem_bin: Option<PathBuf>,
    /// The Python interpreter with numpy.
    #[arg(long, default_value = "python3")]
    python: String,
}

struct Workload {
    name: String,
    script: PathBuf,
    args: Vec<String>,
}

/// One job run: its own time, its digest, and dmem's stats if under dmem.
struct RunResult {
    seconds: f64,
    digest: String,
    stats: Option<Value>,
}

#[derive(Serialize)]
struct Spread {
    median_s: f64,
    min_s: f64,
    max_s: f64,
    runs: Vec<f64>,
}

#[derive(Serialize)]
struct FractionReport {
    local_percent: u32,
    local_limit_bytes: u64,
    seconds: Spread,
    /// median dmem time / median plain time.
    slowdown: f64,
    target: Option<f64>,
    met: Option<bool>,
    /// dmem's figures of the last round (faults, bytes paged, latencies).
    last_stats: Option<Value>,
}

#[derive(Serialize)]
struct WorkloadReport {
    workload: String,
    footprint_bytes: u64,
    plain: Spread,
    fractions: Vec<FractionReport>,
}

pub fn run(a: Args) -> Result<(), String> {
    let dmem = crate::sibling_binary("dmem", a.dmem_bin.clone())?;
    let runs = a.runs.unwrap_or(if a.quick { 1 } else { 3 }).max(1);
    let dir = std::env::temp_dir().join(format!("dmem-bench-jobs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_in(&a, &dmem, runs, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(a: &Args, dmem: &Path, runs: usize, dir: &Path) -> Result<(), String> {
    let n = a.gemm_n.unwrap_or(if a.quick { 2048 } else { 4096 });
    let points = a
        .kmeans_points
        .unwrap_or(if a.quick { 1 << 20 } else { 4 << 20 });
    let mut workloads = Vec::new();
    for w in &a.only {
        let (script, text, args) = match w.as_str() {
            "gemm" => ("gemm.py", GEMM_PY, vec![n.to_string()]),
            "kmeans" => (
                "kmeans.py",
                KMEANS_PY,
                vec![points.to_string(), "16".into(), "8".into(), "5".into()],
            ),
            other => return Err(format!("unknown workload {other:?} (gemm, kmeans)")),
        };
        let path = dir.join(script);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        let name = match w.as_str() {
            "gemm" => format!("gemm n={n}"),
            _ => format!("kmeans {points}x16 k=8"),
        };
        workloads.push(Workload {
            name,
            script: path,
            args,
        });
    }
    let mut reports = Vec::new();
    for w in &workloads {
        reports.push(bench_workload(a, dmem, runs, dir, w)?);
    }
    print_table(&reports);
    if let Some(p) = &a.json {
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "benchmark": "jobs",
            "runs": runs,
            "workloads": reports,
        }))
        .map_err(|e| e.to_string())?;
        std::fs::write(p, text + "\n").map_err(|e| format!("{}: {e}", p.display()))?;
        eprintln!("figures written to {}", p.display());
    }
    Ok(())
}

fn bench_workload(
    a: &Args,
    dmem: &Path,
    runs: usize,
    dir: &Path,
    w: &Workload,
) -> Result<WorkloadReport, String> {
    eprintln!(
        "{}: measuring its footprint under dmem (no effective limit)",
        w.name
    );
    let probe = run_job(a, dmem, dir, w, Some(64 << 30))?;
    let footprint = probe
        .stats
        .as_ref()
        .and_then(|s| s["peak_resident_bytes"].as_u64())
        .filter(|&b| b > 0)
        .ok_or("the footprint run reported no peak_resident_bytes")?;
    eprintln!("{}: footprint {}", w.name, format_size(footprint));
    let limits: Vec<(u32, u64)> = a
        .fractions
        .iter()
        .map(|&p| (p, (footprint * p as u64 / 100).max(1 << 20)))
        .collect();
    let mut plain = Vec::new();
    let mut under: Vec<Vec<RunResult>> = limits.iter().map(|_| Vec::new()).collect();
    let mut digest: Option<String> = None;
    for round in 0..runs {
        // Alternate the order from round to round.
        let mut order: Vec<Option<usize>> = std::iter::once(None)
            .chain((0..limits.len()).map(Some))
            .collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for which in order {
            let limit = which.map(|i| limits[i].1);
            let r = run_job(a, dmem, dir, w, limit)?;
            let label = match which {
                None => "plain".to_string(),
                Some(i) => format!("{}% local", limits[i].0),
            };
            eprintln!(
                "{}: round {} {label}: {:.2} s",
                w.name,
                round + 1,
                r.seconds
            );
            match &digest {
                None => digest = Some(r.digest.clone()),
                Some(d) if *d != r.digest => {
                    return Err(format!(
                        "{}: the {label} run's result differs from the others \
                         (digest {} vs {d}): dmem changed a result",
                        w.name, r.digest
                    ))
                }
                Some(_) => {}
            }
            match which {
                None => plain.push(r),
                Some(i) => under[i].push(r),
            }
        }
    }
    if probe.digest != *digest.as_ref().expect("at least one round") {
        return Err(format!("{}: the footprint run's result differs", w.name));
    }
    let plain_spread = spread(&plain);
    let fractions = limits
        .iter()
        .zip(under)
        .map(|(&(pct, limit), rs)| {
            let s = spread(&rs);
            let slowdown = s.median_s / plain_spread.median_s;
            let target = TARGETS.iter().find(|t| t.0 == pct).map(|t| t.1);
            FractionReport {
                local_percent: pct,
                local_limit_bytes: limit,
                slowdown,
                target,
                met: target.map(|t| slowdown <= t),
                last_stats: rs.last().and_then(|r| r.stats.clone()),
                seconds: s,
            }
        })
        .collect();
    Ok(WorkloadReport {
        workload: w.name.clone(),
        footprint_bytes: footprint,
        plain: plain_spread,
        fractions,
    })
}

fn spread(rs: &[RunResult]) -> Spread {
    let v: Vec<f64> = rs.iter().map(|r| r.seconds).collect();
    Spread {
        median_s: median(&v),
        min_s: v.iter().copied().fold(f64::INFINITY, f64::min),
        max_s: v.iter().copied().fold(0.0, f64::max),
        runs: v,
    }
}

/// Runs the job plainly (`limit` None) or under `dmem run`.
fn run_job(
    a: &Args,
    dmem: &Path,
    dir: &Path,
    w: &Workload,
    limit: Option<u64>,
) -> Result<RunResult, String> {
    let stats_path = dir.join("stats.json");
    let _ = std::fs::remove_file(&stats_path);
    let mut cmd = match limit {
        None => Command::new(&a.python),
        Some(l) => {
            let mut c = Command::new(dmem);
            c.arg("run")
                .arg("--local-limit")
                .arg(l.to_string())
                .arg("--stats-json")
                .arg(&stats_path)
                .arg("--")
                .arg(&a.python);
            c
        }
    };
    cmd.arg(&w.script).args(&w.args);
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", w.name))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}{}",
            w.name,
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::to_owned)
            .ok_or_else(|| format!("{}: no {key} line in its output: {stdout}", w.name))
    };
    let seconds: f64 = field("seconds=")?
        .parse()
        .map_err(|e| format!("{}: bad seconds: {e}", w.name))?;
    let stats = match limit {
        None => None,
        Some(_) => {
            let text = std::fs::read_to_string(&stats_path)
                .map_err(|e| format!("{}: no --stats-json: {e}", w.name))?;
            Some(serde_json::from_str(&text).map_err(|e| format!("stats json: {e}"))?)
        }
    };
    Ok(RunResult {
        seconds,
        digest: field("digest=")?,
        stats,
    })
}

fn print_table(reports: &[WorkloadReport]) {
    println!(
        "{:<22} {:>6} {:>10} {:>10} {:>16} {:>9} {:>8}",
        "workload", "local", "limit", "plain s", "dmem s (min..max)", "slowdown", "target"
    );
    for r in reports {
        for f in &r.fractions {
            let target = match (f.target, f.met) {
                (Some(t), Some(true)) => format!("≤{t}x ok"),
                (Some(t), _) => format!("≤{t}x MISS"),
                _ => String::new(),
            };
            println!(
                "{:<22} {:>5}% {:>10} {:>10.2} {:>6.2} ({:.2}..{:.2}) {:>8.2}x {:>8}",
                r.workload,
                f.local_percent,
                format_size(f.local_limit_bytes),
                r.plain.median_s,
                f.seconds.median_s,
                f.seconds.min_s,
                f.seconds.max_s,
                f.slowdown,
                target
            );
        }
    }
}
