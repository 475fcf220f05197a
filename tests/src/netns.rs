//! A private network namespace joined to the host by a veth pair, removed on
//! drop. Lets a test be a non-loopback client of a node on this machine.
//!
//! Addresses come from 10.201.0.0/16 and are only ever configured on the
//! veth pair created here; a /30 already present on the host is skipped.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Runs `ip ARGS`; returns stderr as the error.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub ns_if: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

impl Netns {
    /// Creates the namespace and the veth pair, both up, with a /30 on each
    /// end. `Err` carries the reason the environment cannot do it (the caller
    /// skips visibly).
    pub fn create() -> Result<Netns, String> {
        if !crate::is_root() {
            return Err("not running as root".into());
        }
        ip(&["-V"]).map_err(|e| format!("`ip` (iproute2) is not usable: {e}"))?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", pid % 1_000_000);
        let mut ns = Netns {
            name: format!("dmemtest{tag}"),
            host_if: format!("dmh{tag}"),
            ns_if: format!("dmn{tag}"),
            host_ip: Ipv4Addr::UNSPECIFIED,
            ns_ip: Ipv4Addr::UNSPECIFIED,
        };
        ip(&["netns", "add", &ns.name])
            .map_err(|e| format!("cannot create a network namespace: {e}"))?;
        // From here on, Drop cleans up whatever was created.
        let in_use = ip(&["-4", "-o", "addr", "show"]).unwrap_or_default();
        let start = pid.wrapping_add(n * 7) % 250;
        let third = (0..250)
            .map(|i| (start + i) % 250 + 1)
            .find(|x| !in_use.contains(&format!("10.201.{x}.")))
            .ok_or("no free 10.201.X.0/30 subnet on this host")?;
        ns.host_ip = Ipv4Addr::new(10, 201, third as u8, 1);
        ns.ns_ip = Ipv4Addr::new(10, 201, third as u8, 2);
        let host_cidr = format!("{}/30", ns.host_ip);
        let ns_cidr = format!("{}/30", ns.ns_ip);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ])?;
        ip(&["link", "set", &ns.ns_if, "netns", &ns.name])?;
        ip(&["addr", "add", &host_cidr, "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ns.exec_ip(&["addr", "add", &ns_cidr, "dev", &ns.ns_if])?;
        ns.exec_ip(&["link", "set", &ns.ns_if, "up"])?;
        ns.exec_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn exec_ip(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["netns", "exec", &self.name, "ip"];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Prefix that runs a command inside the namespace.
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its end of the veth pair, and with
        // it the host end; delete the host end too in case the move failed.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}
