//! Byte counts for people: the short binary-unit strings (`10Gi`,
//! `1.5Ti`, `12.5Mi/s`) that status fields carry next to their exact byte
//! counts, for printer columns. Every string is also a valid Kubernetes
//! quantity (rates aside, which add `/s`).

const UNITS: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];

/// `bytes` in the largest binary unit it reaches, with at most one decimal
/// (rounded down, so a nearly full disk never shows as full): `0`, `512`,
/// `4Ki`, `1.5Gi`, `10Ti`. Negative counts show as `0`.
pub fn format_bytes(bytes: i64) -> String {
    if bytes < 1024 {
        return bytes.max(0).to_string();
    }
    let bytes = bytes as u128;
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u128 << (10 * (unit + 2)) {
        unit += 1;
    }
    let scale = 1u128 << (10 * (unit + 1));
    let tenths = bytes * 10 / scale;
    if tenths.is_multiple_of(10) {
        format!("{}{}", tenths / 10, UNITS[unit])
    } else {
        format!("{}.{}{}", tenths / 10, tenths % 10, UNITS[unit])
    }
}

/// A rate in bytes per second, as `format_bytes` per second: `12.5Mi/s`.
pub fn format_rate(bytes_per_second: i64) -> String {
    format!("{}/s", format_bytes(bytes_per_second))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_take_the_largest_unit_they_reach_with_one_decimal_rounded_down() {
        assert_eq!(format_bytes(-5), "0");
        assert_eq!(format_bytes(0), "0");
        assert_eq!(format_bytes(1023), "1023");
        assert_eq!(format_bytes(1024), "1Ki");
        assert_eq!(format_bytes(1536), "1.5Ki");
        assert_eq!(format_bytes(64 << 20), "64Mi");
        assert_eq!(format_bytes((10 << 30) - 1), "9.9Gi");
        assert_eq!(format_bytes(3 << 39), "1.5Ti");
        assert_eq!(format_bytes(1 << 50), "1Pi");
        assert_eq!(format_bytes(i64::MAX), "7.9Ei");
    }

    #[test]
    fn rates_are_per_second() {
        assert_eq!(format_rate(25 << 19), "12.5Mi/s");
        assert_eq!(format_rate(0), "0/s");
    }
}
