//! The shim's settings, from `DMEM_*` environment variables (the flags of
//! `dmem run` set them for the program it starts).

use std::path::PathBuf;

use dmem_memnode::size::parse_size;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{var}={value:?}: {why}")]
    Bad {
        var: &'static str,
        value: String,
        why: String,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Pager socket (`DMEM_SOCKET`, else the pager's default path).
    pub socket: PathBuf,
    /// Local limit asked of the pager, bytes; 0 = the pager's default
    /// (`DMEM_LOCAL_LIMIT`).
    pub local_limit: u64,
    /// Allocations of at least this many bytes are managed (`DMEM_MIN_ALLOC`).
    pub min_alloc: usize,
    /// Managed address space reserved (`DMEM_ARENA`).
    pub arena: usize,
    /// Exit instead of running unmanaged when the pager cannot be reached
    /// (`DMEM_REQUIRE=1`).
    pub require: bool,
    /// Keep the preload for programs this one executes (`DMEM_INHERIT`,
    /// default 1).
    pub inherit: bool,
    /// A forked child pages its memory under a session of its own
    /// (`DMEM_FORK_MANAGED`, default 1); 0 runs it as plain memory.
    pub fork_managed: bool,
    /// `DMEM_DISABLE=1`: do nothing at all (glibc's malloc serves everything).
    pub disable: bool,
    /// Large anonymous `mmap`s come from the arena too (`DMEM_MMAP`,
    /// default 1).
    pub mmap: bool,
    /// Freed blocks kept for reuse, in bytes (`DMEM_KEEP_FREED`; at most an
    /// eighth of the local limit is used).
    pub keep_freed: u64,
}

/// Default threshold: glibc's own mmap threshold. Blocks this large are the
/// ones glibc would give their own mapping anyway; smaller ones share pages
/// with their neighbours in glibc's heap, where paging them would move
/// unrelated data too.
pub const DEFAULT_MIN_ALLOC: usize = 128 << 10;
/// Default reservation; address space only (MAP_NORESERVE), and the pager
/// keeps page state only for the parts that are used.
pub const DEFAULT_ARENA: usize = 64 << 30;
/// Default budget of freed blocks kept for reuse (see `warm`).
pub const DEFAULT_KEEP_FREED: u64 = 64 << 20;

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
        let flag = |var: &'static str, default: bool| -> Result<bool, ConfigError> {
            match std::env::var(var) {
                Err(_) => Ok(default),
                Ok(v) => match v.as_str() {
                    "1" | "yes" | "true" | "on" => Ok(true),
                    "0" | "no" | "false" | "off" | "" => Ok(false),
                    _ => Err(ConfigError::Bad {
                        var,
                        value: v,
                        why: "expected 1 or 0".into(),
                    }),
                },
            }
        };
        let size = |var: &'static str, default: u64| -> Result<u64, ConfigError> {
            match std::env::var(var) {
                Err(_) => Ok(default),
                Ok(v) => parse_size(&v).map_err(|e| ConfigError::Bad {
                    var,
                    value: v,
                    why: e.to_string(),
                }),
            }
        };
        let min_alloc = size("DMEM_MIN_ALLOC", DEFAULT_MIN_ALLOC as u64)?.max(4096) as usize;
        let arena = size("DMEM_ARENA", DEFAULT_ARENA as u64)?;
        if arena < 16 << 20 {
            return Err(ConfigError::Bad {
                var: "DMEM_ARENA",
                value: arena.to_string(),
                why: "the arena must be at least 16M".into(),
            });
        }
        Ok(Config {
            socket: dmem_pager::daemon::default_socket(),
            local_limit: size("DMEM_LOCAL_LIMIT", 0)?,
            min_alloc,
            arena: arena as usize,
            require: flag("DMEM_REQUIRE", false)?,
            inherit: flag("DMEM_INHERIT", true)?,
            fork_managed: flag("DMEM_FORK_MANAGED", true)?,
            disable: flag("DMEM_DISABLE", false)?,
            mmap: flag("DMEM_MMAP", true)?,
            keep_freed: size("DMEM_KEEP_FREED", DEFAULT_KEEP_FREED)?,
        })
    }
}
