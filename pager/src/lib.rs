//! dmem pager and the `dmem` command-line tool.

pub mod ping;
