//! Times on the wire: RFC 3339 text and Unix epoch numbers, read and written
//! without a way to panic.
//!
//! `humantime` formats only times between 1970 and the end of year 9999 and
//! panics outside them, and `SystemTime + Duration` panics on overflow. A
//! time read from a broker is whatever the other side wrote (a Node.js
//! service sending milliseconds where seconds belong reads as the year
//! 58901), so every conversion here is checked: a time that cannot be
//! represented is `None`, and the caller keeps the raw value as a plain
//! header instead.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last representable second: 9999-12-31T23:59:59Z, as seconds since the epoch.
const MAX_SECS: u64 = 253_402_300_799;

/// An AMQP `timestamp` (or any epoch number) at or above this is taken as
/// milliseconds: as seconds it would be past the year 5138, as milliseconds
/// it is after March 1973.
const MILLIS_FROM: u64 = 100_000_000_000;

/// Whether `time` can be written as RFC 3339 (1970 up to the end of 9999).
pub fn is_representable(time: SystemTime) -> bool {
    time.duration_since(UNIX_EPOCH)
        .is_ok_and(|since| since.as_secs() <= MAX_SECS)
}

/// `time` as RFC 3339 in UTC to the microsecond, or `None` when it is
/// before 1970 or after 9999.
pub fn format_rfc3339(time: SystemTime) -> Option<String> {
    is_representable(time).then(|| humantime::format_rfc3339_micros(time).to_string())
}

/// The time now as RFC 3339 (for failure headers).
pub fn now_rfc3339() -> String {
    format_rfc3339(SystemTime::now()).unwrap_or_default()
}

/// Parses RFC 3339 (`Z` or no zone, as written by [`format_rfc3339`], or an
/// offset such as `+02:00`); `None` when it is not such a time.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let time = match text.get(19..).and_then(|tail| tail.rfind(['+', '-'])) {
        Some(at) => with_offset(text, 19 + at)?,
        None => humantime::parse_rfc3339_weak(text).ok()?,
    };
    Some(time).filter(|t| is_representable(*t))
}

/// `2024-05-01T10:00:00.123+02:00`: what `Date.toISOString()` does not write
/// but many other clients do. humantime reads only `Z` (and ignores an
/// offset rather than applying it), so the offset at `at` is split off and
/// applied here.
fn with_offset(text: &str, at: usize) -> Option<SystemTime> {
    let (head, sign, offset) = (&text[..at], &text[at..=at], &text[at + 1..]);
    let (hours, minutes) = offset.split_once(':')?;
    let (hours, minutes): (u64, u64) = (hours.parse().ok()?, minutes.parse().ok()?);
    if hours > 23 || minutes > 59 {
        return None;
    }
    let local = humantime::parse_rfc3339_weak(head).ok()?;
    let shift = Duration::from_secs(hours * 3600 + minutes * 60);
    if sign == "+" {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    }
}

/// Seconds since the Unix epoch, when representable.
pub fn from_unix_secs(secs: u64) -> Option<SystemTime> {
    (secs <= MAX_SECS).then(|| UNIX_EPOCH + Duration::from_secs(secs))
}

/// Milliseconds since the Unix epoch, when representable.
pub fn from_unix_millis(millis: u64) -> Option<SystemTime> {
    let time = UNIX_EPOCH.checked_add(Duration::from_millis(millis))?;
    Some(time).filter(|t| is_representable(*t))
}

/// An epoch number whose unit the writer chose: seconds (the AMQP spec,
/// Tidings) or milliseconds (`Date.now()` in Node.js, most JVM clients).
/// Values that only make sense as milliseconds are read as such.
pub fn from_unix_secs_or_millis(value: u64) -> Option<SystemTime> {
    if value >= MILLIS_FROM {
        from_unix_millis(value)
    } else {
        from_unix_secs(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_times_are_none_not_panics() {
        let far = UNIX_EPOCH + Duration::from_secs(MAX_SECS + 1);
        assert_eq!(format_rfc3339(far), None);
        assert_eq!(format_rfc3339(UNIX_EPOCH - Duration::from_secs(1)), None);
        assert!(format_rfc3339(UNIX_EPOCH + Duration::from_secs(MAX_SECS)).is_some());
        assert_eq!(from_unix_secs(u64::MAX), None);
        assert_eq!(from_unix_millis(u64::MAX), None);
        assert_eq!(parse_rfc3339("not a time"), None);
        assert_eq!(parse_rfc3339(""), None);
        assert_eq!(parse_rfc3339("2024-05-01T10:00:00+99:00"), None);
    }

    #[test]
    fn milliseconds_are_told_from_seconds() {
        let secs = 1_700_000_000;
        let expected = UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(from_unix_secs_or_millis(secs), Some(expected));
        assert_eq!(from_unix_secs_or_millis(secs * 1000), Some(expected));
        assert_eq!(
            from_unix_secs_or_millis(secs * 1000 + 5),
            Some(expected + Duration::from_millis(5))
        );
    }

    #[test]
    fn round_trip_and_offsets() {
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(parse_rfc3339(&format_rfc3339(t).unwrap()), Some(t));
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.123456Z"),
            parse_rfc3339("2023-11-15T00:13:20.123456+02:00")
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20Z"),
            parse_rfc3339("2023-11-14T21:13:20-01:00")
        );
    }
}
