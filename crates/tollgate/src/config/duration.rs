//! Durations as written in config: `500ms`, `30s`, `1m`, `1h30m`, `1d`.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    pub fn as_millis_u64(&self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Parse `1h30m`-style text: one or more `<integer><unit>` with units ms, s, m, h, d.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total_ms: u128 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(format!(
                "`{text}` is not a duration: expected a number at position {}",
                start + 1
            ));
        }
        let n: u128 = s[start..i]
            .parse()
            .map_err(|_| format!("`{text}`: number too large"))?;
        let ustart = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit_ms: u128 = match &s[ustart..i] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(format!(
                    "`{text}` is not a duration: a unit (ms, s, m, h, d) must follow {n}"
                ))
            }
            other => {
                return Err(format!(
                    "`{text}` is not a duration: unknown unit `{other}` (use ms, s, m, h, d)"
                ))
            }
        };
        total_ms = total_ms
            .checked_add(n.saturating_mul(unit_ms))
            .ok_or_else(|| format!("`{text}`: duration too large"))?;
    }
    let ms = u64::try_from(total_ms).map_err(|_| format!("`{text}`: duration too large"))?;
    Ok(Duration::from_millis(ms))
}

/// Print a duration the way OpenAI's reset headers do: `6m0s`, `1.5s`, `20ms`, `1h2m3s`.
pub fn format_reset(ms: u64) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(16);
    if ms < 1000 {
        let _ = write!(out, "{ms}ms");
        return out;
    }
    let h = ms / 3_600_000;
    let m = (ms % 3_600_000) / 60_000;
    let s_ms = ms % 60_000;
    if h > 0 {
        let _ = write!(out, "{h}h{m}m");
    } else if m > 0 {
        let _ = write!(out, "{m}m");
    }
    let _ = write!(out, "{}", s_ms / 1000);
    let frac = s_ms % 1000;
    if frac != 0 {
        // Milliseconds as a decimal fraction without trailing zeros: 1.5s, 1.05s, 1.005s.
        let digits = [frac / 100, frac / 10 % 10, frac % 10];
        let used = if frac.is_multiple_of(100) {
            1
        } else if frac.is_multiple_of(10) {
            2
        } else {
            3
        };
        out.push('.');
        for &d in &digits[..used] {
            out.extend(u32::try_from(d).ok().and_then(|d| char::from_digit(d, 10)));
        }
    }
    out.push('s');
    out
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ConfigDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 500ms, 30s, 1m, 1h30m or 1d")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse(v).map(ConfigDuration).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// The largest whole unit that writes `ms` exactly: `1m`, `24h` → `1d`, `1500ms`.
pub fn format_config(ms: u64) -> String {
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

impl Serialize for ConfigDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_config(self.as_millis_u64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        assert_eq!(parse("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse("1m").unwrap().as_secs(), 60);
        assert_eq!(parse("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse("1d").unwrap().as_secs(), 86400);
        assert_eq!(parse("1m30s250ms").unwrap().as_millis(), 90_250);
    }

    #[test]
    fn refuses_nonsense() {
        assert!(parse("").is_err());
        assert!(parse("10").unwrap_err().contains("unit"));
        assert!(parse("1w").unwrap_err().contains("unknown unit"));
        assert!(parse("m").is_err());
        assert!(parse("99999999999999999999999d").is_err());
    }

    #[test]
    fn config_text_round_trips() {
        for (ms, text) in [
            (60_000, "1m"),
            (86_400_000, "1d"),
            (5_400_000, "90m"),
            (1_500, "1500ms"),
            (0, "0ms"),
        ] {
            assert_eq!(format_config(ms), text);
            assert_eq!(parse(text).unwrap().as_millis() as u64, ms);
        }
    }

    #[test]
    fn formats_like_openai() {
        assert_eq!(format_reset(360_000), "6m0s");
        assert_eq!(format_reset(1_500), "1.5s");
        assert_eq!(format_reset(20), "20ms");
        assert_eq!(format_reset(3_723_000), "1h2m3s");
        assert_eq!(format_reset(1_050), "1.05s");
        assert_eq!(format_reset(61_005), "1m1.005s");
        // The same text as formatting the seconds as a float, for every millisecond of
        // the first two minutes and across hours and days.
        let by_float = |ms: u64| {
            if ms < 1000 {
                return format!("{ms}ms");
            }
            let (h, m, s_ms) = (ms / 3_600_000, (ms % 3_600_000) / 60_000, ms % 60_000);
            let t = format!("{:.3}", s_ms as f64 / 1000.0);
            let secs = format!("{}s", t.trim_end_matches('0').trim_end_matches('.'));
            match (h, m) {
                (0, 0) => secs,
                (0, m) => format!("{m}m{secs}"),
                (h, m) => format!("{h}h{m}m{secs}"),
            }
        };
        for ms in (0..120_000).chain((0..5_000).map(|i| i * 86_399_997 / 4_999)) {
            assert_eq!(format_reset(ms), by_float(ms), "{ms}");
        }
    }
}
