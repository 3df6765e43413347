//! Budget periods in UTC: where the current one began and when it ends.
//! Civil-date arithmetic (Hinnant's algorithms) keeps the crate free of a
//! calendar dependency for the four boundaries it needs.

use serde::{Deserialize, Serialize};

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_HOUR: i64 = 3_600 * MICROS_PER_SECOND;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
    /// ISO weeks: Monday 00:00 UTC.
    Week,
    Month,
    /// Never rolls over.
    Total,
}

impl Period {
    pub const ALL: [Period; 5] = [
        Period::Hour,
        Period::Day,
        Period::Week,
        Period::Month,
        Period::Total,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Total => "total",
        }
    }

    pub fn parse(text: &str) -> Option<Period> {
        Period::ALL.into_iter().find(|p| p.as_str() == text)
    }

    /// The start (Unix microseconds, UTC) of the period holding `now_us`.
    pub fn start_of(self, now_us: i64) -> i64 {
        match self {
            Period::Hour => now_us.div_euclid(MICROS_PER_HOUR) * MICROS_PER_HOUR,
            Period::Day => now_us.div_euclid(MICROS_PER_DAY) * MICROS_PER_DAY,
            Period::Week => {
                let days = now_us.div_euclid(MICROS_PER_DAY);
                // 1970-01-01 was a Thursday: Monday is 3 days before it.
                let monday = (days + 3).div_euclid(7) * 7 - 3;
                monday * MICROS_PER_DAY
            }
            Period::Month => {
                let (year, month, _) = civil_from_days(now_us.div_euclid(MICROS_PER_DAY));
                days_from_civil(year, month, 1) * MICROS_PER_DAY
            }
            Period::Total => i64::MIN,
        }
    }

    /// The start of the next period after the one beginning at `start_us`.
    pub fn end_of(self, start_us: i64) -> i64 {
        match self {
            Period::Hour => start_us + MICROS_PER_HOUR,
            Period::Day => start_us + MICROS_PER_DAY,
            Period::Week => start_us + 7 * MICROS_PER_DAY,
            Period::Month => {
                let (year, month, _) = civil_from_days(start_us.div_euclid(MICROS_PER_DAY));
                let (year, month) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                days_from_civil(year, month, 1) * MICROS_PER_DAY
            }
            Period::Total => i64::MAX,
        }
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A period start as RFC 3339 text, for operators; `None` for `total`.
pub fn format_utc(micros: i64) -> Option<String> {
    if micros == i64::MIN || micros == i64::MAX {
        return None;
    }
    let days = micros.div_euclid(MICROS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let seconds = micros.rem_euclid(MICROS_PER_DAY) / MICROS_PER_SECOND;
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(year: i64, month: u32, day: u32, hour: i64, minute: i64) -> i64 {
        days_from_civil(year, month, day) * MICROS_PER_DAY
            + hour * MICROS_PER_HOUR
            + minute * 60 * MICROS_PER_SECOND
    }

    #[test]
    fn civil_round_trip_over_four_centuries() {
        for days in (-200_000..200_000).step_by(37) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }

    #[test]
    fn period_starts_and_ends() {
        let now = at(2026, 11, 24, 15, 42); // a Tuesday
        assert_eq!(Period::Hour.start_of(now), at(2026, 11, 24, 15, 0));
        assert_eq!(Period::Day.start_of(now), at(2026, 11, 24, 0, 0));
        assert_eq!(Period::Week.start_of(now), at(2026, 11, 23, 0, 0));
        assert_eq!(Period::Month.start_of(now), at(2026, 11, 1, 0, 0));
        assert_eq!(
            Period::Month.end_of(at(2026, 12, 1, 0, 0)),
            at(2027, 1, 1, 0, 0)
        );
        assert_eq!(
            Period::Week.end_of(at(2026, 11, 23, 0, 0)),
            at(2026, 11, 30, 0, 0)
        );
        assert_eq!(Period::Total.start_of(now), i64::MIN);
        // A Monday is its own week's start.
        assert_eq!(
            Period::Week.start_of(at(2026, 11, 23, 0, 0)),
            at(2026, 11, 23, 0, 0)
        );
        assert_eq!(
            format_utc(at(2026, 11, 24, 15, 42)).unwrap(),
            "2026-11-24T15:42:00Z"
        );
    }
}
