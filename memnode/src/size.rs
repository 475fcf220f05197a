//! Human-friendly sizes for every dmem command line: `512M`, `4G`, `1.5G`,
//! `64K`, plain bytes. Units are binary (K = 1024).

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix (e.g. 512M, 1.5G)")]
    Invalid(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a size such as `1.5G` into bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let invalid = || SizeError::Invalid(s.to_string());
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(invalid()),
    };
    let num = num.trim();
    if num.is_empty() || num.starts_with('-') || num.starts_with('+') {
        return Err(invalid());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(1u64 << shift)
            .ok_or_else(|| SizeError::Overflow(s.to_string()));
    }
    let f: f64 = num.parse().map_err(|_| invalid())?;
    if !f.is_finite() || f < 0.0 {
        return Err(invalid());
    }
    let bytes = f * (1u64 << shift) as f64;
    if bytes >= u64::MAX as f64 {
        return Err(SizeError::Overflow(s.to_string()));
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes for people: `1.50 GiB`, `512.0 MiB`, `4096 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, unit) in UNITS {
        if bytes >= unit {
            return format!("{:.2} {name}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "G", "-1G", "1X", "abc", "1.2.3M", "NaN", "inf"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(3 << 29), "1.50 GiB");
        assert_eq!(format_size(100), "100 B");
    }
}
