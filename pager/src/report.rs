//! `dmem stats`: asks a pager for its figures and prints them.

use std::path::Path;

use serde_json::Value;

use crate::app::{connect_pager, request, AppError};
use crate::wire::{self, Msg};

/// The pager's stats JSON.
pub fn fetch_stats(socket: &Path) -> Result<Value, AppError> {
    let fd = connect_pager(socket)?;
    match request(&fd, &wire::encode(&Msg::StatsRequest))? {
        Msg::Stats(text) => {
            serde_json::from_str(&text).map_err(|e| AppError::Protocol(e.to_string()))
        }
        other => Err(AppError::Protocol(format!("unexpected reply {other:?}"))),
    }
}

fn mib(v: &Value) -> String {
    format!("{:.1} MiB", v.as_f64().unwrap_or(0.0) / (1 << 20) as f64)
}

fn block(out: &mut String, title: &str, v: &Value) {
    use std::fmt::Write;
    let f = &v["faults"];
    let _ = writeln!(out, "{title}");
    let _ = writeln!(
        out,
        "  faults      zero {}  cache {}  remote {}  write-protect {}  throttled {}",
        f["zero"], f["cache"], f["remote"], f["write_protect"], f["throttled"]
    );
    let l = &v["fault_latency_us"];
    let fl = &v["fetch_latency_us"];
    let _ = writeln!(
        out,
        "  latency us  fault p50 {} p99 {} p999 {}   fetch p50 {} p99 {} p999 {}",
        l["p50"], l["p99"], l["p999"], fl["p50"], fl["p99"], fl["p999"]
    );
    let _ = writeln!(
        out,
        "  traffic     fetched {}  written back {}  evictions {}  clean drops {}",
        mib(&v["bytes_fetched"]),
        mib(&v["bytes_written_back"]),
        v["evictions"],
        v["clean_drops"]
    );
    let _ = writeln!(
        out,
        "  prefetch    issued {}  hits {}  waste {}   peak local {}  limit exceeded {}",
        v["prefetch_issued"],
        v["prefetch_hits"],
        v["prefetch_waste"],
        mib(&v["peak_resident_bytes"]),
        v["limit_exceeded"]
    );
    let fork = &v["fork"];
    if fork["adopted_pages"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            out,
            "  fork        pages adopted by forked children {}  sharing the parent's copies {}  \
             out of the parent at the fork {}",
            fork["adopted_pages"], fork["shared_pages"], fork["out_pages"]
        );
    }
}

/// A human-readable rendering of the stats JSON.
pub fn human(v: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let p = &v["pager"];
    let _ = writeln!(
        out,
        "pager {}: {} app(s), block {} B, cache {} ({} free)",
        p["socket"].as_str().unwrap_or("?"),
        p["apps"],
        p["block_bytes"],
        mib(&p["cache_bytes"]),
        mib(&p["cache_free_bytes"])
    );
    for n in v["memnodes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "memnode {} via {}: leased {}, reconnects {}",
            n["addr"].as_str().unwrap_or("?"),
            n["transport"].as_str().unwrap_or("?"),
            mib(&n["leased_bytes"]),
            n["reconnects"]
        );
    }
    for a in v["apps"].as_array().into_iter().flatten() {
        let title = format!(
            "app pid {} (session {}): resident {}, cache {}, remote {} pages, limit {}",
            a["pid"],
            a["session"],
            mib(&a["resident_bytes"]),
            mib(&a["cache_bytes"]),
            a["remote_pages"],
            mib(&a["local_limit_bytes"])
        );
        block(&mut out, &title, a);
    }
    block(
        &mut out,
        "total (all apps, including ended ones)",
        &v["total"],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fork_line_shows_only_after_a_child_adopted_pages() {
        let mut v = serde_json::json!({"fork": {"adopted_pages": 0, "shared_pages": 0}});
        let mut out = String::new();
        block(&mut out, "app", &v);
        assert!(!out.contains("fork"), "{out}");
        v["fork"] = serde_json::json!({"adopted_pages": 12, "shared_pages": 5, "out_pages": 3});
        out.clear();
        block(&mut out, "app", &v);
        assert!(out.contains("adopted by forked children 12"), "{out}");
        assert!(out.contains("copies 5"), "{out}");
        assert!(out.contains("at the fork 3"), "{out}");
    }
}
