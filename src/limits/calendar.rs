//! UTC calendar months and the time formats of rate-limit headers.
//!
//! Civil-date conversion is Howard Hinnant's `days_from_civil` / `civil_from_days`. Inputs
//! are at most `u64::MAX` ms (about 2.1e11 days), so the `i64` arithmetic below cannot
//! overflow; month numbers past `u32::MAX` (year ~357 million) saturate.

const MS_PER_SECOND: u64 = 1_000;
const MS_PER_MINUTE: u64 = 60 * MS_PER_SECOND;
const MS_PER_HOUR: u64 = 60 * MS_PER_MINUTE;
const MS_PER_DAY: u64 = 24 * MS_PER_HOUR;

/// (year, month 1..=12, day 1..=31) of a day counted from 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // March = 0
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days from 1970-01-01 to the first day of `month` (1..=12) of `year`.
fn days_from_civil(year: i64, month: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let shifted_month = (month + 9) % 12; // March = 0
    let day_of_year = (153 * shifted_month + 2) / 5;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn days_of(ms: u64) -> i64 {
    // u64::MAX / MS_PER_DAY fits in i64 with room to spare.
    i64::try_from(ms / MS_PER_DAY).unwrap_or(i64::MAX)
}

/// The UTC calendar month containing `now_ms`, as `year * 12 + (month - 1)`.
pub fn month_index(now_ms: u64) -> u32 {
    let (year, month, _) = civil_from_days(days_of(now_ms));
    u32::try_from(year * 12 + (month - 1)).unwrap_or(u32::MAX)
}

/// Ms since the epoch at which month `index` (see [`month_index`]) begins.
pub fn month_start_ms(index: u32) -> u64 {
    let year = i64::from(index / 12);
    let month = i64::from(index % 12) + 1;
    u64::try_from(days_from_civil(year, month))
        .unwrap_or(0)
        .saturating_mul(MS_PER_DAY)
}

/// Ms from `now_ms` until the next UTC calendar month begins (never 0).
pub fn ms_until_next_month(now_ms: u64) -> u64 {
    month_start_ms(month_index(now_ms).saturating_add(1)).saturating_sub(now_ms)
}

/// A duration as Go prints it, which is what OpenAI's `x-ratelimit-reset-*` headers use:
/// `0s`, `12ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn format_reset(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < MS_PER_SECOND {
        return format!("{ms}ms");
    }
    let hours = ms / MS_PER_HOUR;
    let minutes = ms % MS_PER_HOUR / MS_PER_MINUTE;
    let seconds = ms % MS_PER_MINUTE / MS_PER_SECOND;
    let millis = ms % MS_PER_SECOND;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    out.push_str(&seconds.to_string());
    if millis > 0 {
        // Go drops trailing zeros of the fraction: 1.5s, 1.05s, 1.005s.
        let fraction = format!("{millis:03}");
        out.push('.');
        out.push_str(fraction.trim_end_matches('0'));
    }
    out.push('s');
    out
}

/// RFC 3339 UTC timestamp at second precision (`2026-11-22T02:34:12Z`), as Anthropic's
/// `*-reset` headers use. Truncates to the second: for a reset instant, pass
/// `ms.saturating_add(999)` so a client waiting until it is not early.
pub fn rfc3339(ms_since_epoch: u64) -> String {
    let (year, month, day) = civil_from_days(days_of(ms_since_epoch));
    let ms_of_day = ms_since_epoch % MS_PER_DAY;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        ms_of_day / MS_PER_HOUR,
        ms_of_day % MS_PER_HOUR / MS_PER_MINUTE,
        ms_of_day % MS_PER_MINUTE / MS_PER_SECOND,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-01-31T23:59:59.999Z and neighbours, computed independently (date -u -d ... +%s).
    const JAN_31_2026_END: u64 = 1_769_903_999_999;
    const FEB_1_2026: u64 = 1_769_904_000_000;
    const DEC_31_2025_END: u64 = 1_767_225_599_999;
    const JAN_1_2026: u64 = 1_767_225_600_000;
    const MAR_1_2024: u64 = 1_709_251_200_000; // after a leap day
    const MAR_1_2100: u64 = 4_107_542_400_000; // 2100 is not a leap year

    #[test]
    fn month_index_at_month_edges() {
        assert_eq!(month_index(0), 1970 * 12);
        assert_eq!(month_index(JAN_31_2026_END), 2026 * 12);
        assert_eq!(month_index(FEB_1_2026), 2026 * 12 + 1);
        assert_eq!(month_index(DEC_31_2025_END), 2025 * 12 + 11);
        assert_eq!(month_index(JAN_1_2026), 2026 * 12);
        assert_eq!(month_index(MAR_1_2024 - 1), 2024 * 12 + 1);
        assert_eq!(month_index(MAR_1_2024), 2024 * 12 + 2);
        assert_eq!(month_index(MAR_1_2100 - 1), 2100 * 12 + 1);
        assert_eq!(month_index(MAR_1_2100), 2100 * 12 + 2);
    }

    #[test]
    fn month_start_inverts_month_index() {
        for start in [0, JAN_1_2026, FEB_1_2026, MAR_1_2024, MAR_1_2100] {
            assert_eq!(month_start_ms(month_index(start)), start);
        }
        // Every month from 1970 to 2400 starts right after the previous one ends.
        for index in 1970 * 12 + 1..2400 * 12 {
            let start = month_start_ms(index);
            assert_eq!(month_index(start), index);
            assert_eq!(month_index(start - 1), index - 1);
        }
    }

    #[test]
    fn ms_until_next_month_is_exact_on_edges() {
        assert_eq!(ms_until_next_month(JAN_31_2026_END), 1);
        assert_eq!(ms_until_next_month(FEB_1_2026), 28 * MS_PER_DAY);
        assert_eq!(ms_until_next_month(DEC_31_2025_END), 1);
        assert_eq!(ms_until_next_month(JAN_1_2026), 31 * MS_PER_DAY);
        assert_eq!(ms_until_next_month(MAR_1_2024 - 1), 1);
        assert_eq!(
            ms_until_next_month(MAR_1_2024 - 29 * MS_PER_DAY),
            29 * MS_PER_DAY
        );
        assert_eq!(
            ms_until_next_month(MAR_1_2100 - 28 * MS_PER_DAY),
            28 * MS_PER_DAY
        );
        // Far future: saturates without panicking.
        let _ = ms_until_next_month(u64::MAX);
        let _ = month_index(u64::MAX);
    }

    #[test]
    fn format_reset_like_go() {
        for (ms, text) in [
            (0, "0s"),
            (1, "1ms"),
            (12, "12ms"),
            (999, "999ms"),
            (1_000, "1s"),
            (1_001, "1.001s"),
            (1_050, "1.05s"),
            (1_500, "1.5s"),
            (59_999, "59.999s"),
            (60_000, "1m0s"),
            (360_000, "6m0s"),
            (3_600_000, "1h0m0s"),
            (3_723_000, "1h2m3s"),
            (90_061_500, "25h1m1.5s"),
            (u64::MAX, "5124095576030h25m51.615s"),
        ] {
            assert_eq!(format_reset(ms), text, "{ms}");
        }
    }

    #[test]
    fn rfc3339_edges() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(999), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(JAN_31_2026_END), "2026-01-31T23:59:59Z");
        assert_eq!(rfc3339(FEB_1_2026), "2026-02-01T00:00:00Z");
        assert_eq!(rfc3339(DEC_31_2025_END), "2025-12-31T23:59:59Z");
        assert_eq!(rfc3339(MAR_1_2024 - 1), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339(1_795_833_252_943), "2026-11-28T02:34:12Z");
        assert_eq!(rfc3339(253_402_300_799_000), "9999-12-31T23:59:59Z");
        let _ = rfc3339(u64::MAX);
    }
}
