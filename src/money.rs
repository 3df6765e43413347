//! Exact money: US dollars as an integer count of attodollars (1e-18 USD).
//!
//! Price tables quote per-token prices such as `5.46875e-07` that need twelve
//! decimals, and a call's cost multiplies them by token counts; 18 decimals in
//! an `i128` hold every published price exactly and leave room for 10^20
//! dollars, which is also what a DuckDB `DECIMAL(38, 18)` column stores.

use std::fmt;
use std::ops::{Add, AddAssign, Sub, SubAssign};

/// Decimal places kept; matches the store's `DECIMAL(38, 18)`.
pub const SCALE: u32 = 18;
const ONE_USD: i128 = 1_000_000_000_000_000_000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd(i128);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseUsdError {
    #[error("`{0}` is not a decimal number (write it like 0.25 or 2.5e-06)")]
    NotANumber(String),
    #[error("`{0}` is out of range for a dollar amount")]
    OutOfRange(String),
}

impl Usd {
    pub const ZERO: Usd = Usd(0);

    pub const fn from_atto(atto: i128) -> Self {
        Usd(atto)
    }

    pub const fn atto(self) -> i128 {
        self.0
    }

    pub fn from_whole_dollars(dollars: i64) -> Self {
        Usd(dollars as i128 * ONE_USD)
    }

    /// Multiplies a per-unit price by a count, exactly.
    pub fn times(self, count: u64) -> Self {
        Usd(self.0.saturating_mul(count as i128))
    }

    /// An n-th of the amount, rounded toward zero.
    pub fn divided_by(self, n: u64) -> Self {
        Usd(self.0 / (n.max(1) as i128))
    }

    /// An amount of whole nano-dollars.
    pub fn from_nanos(nanos: i64) -> Self {
        Usd(nanos as i128 * 1_000_000_000)
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Whole nano-dollars, rounded toward zero; for metrics, not for the ledger.
    pub fn nanos(self) -> i64 {
        (self.0 / 1_000_000_000).clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }

    /// Parses decimal text (`0.25`, `2.5e-06`, `1E3`) without passing through
    /// binary floating point. Digits beyond 18 decimals are rounded half to
    /// even: price files carry float artefacts such as `5.0000000000000004e-08`.
    pub fn parse(text: &str) -> Result<Self, ParseUsdError> {
        let bad = || ParseUsdError::NotANumber(text.to_owned());
        let s = text.trim();
        let (negative, s) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        let (mantissa, exponent) = match s.find(['e', 'E']) {
            Some(i) => (&s[..i], s[i + 1..].parse::<i32>().map_err(|_| bad())?),
            None => (s, 0),
        };
        let (int_part, frac_part) = match mantissa.find('.') {
            Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
            None => (mantissa, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(bad());
        }
        if !int_part
            .bytes()
            .chain(frac_part.bytes())
            .all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        // All digits as one integer, with the decimal point `shift` places from
        // the right once the exponent is applied.
        let digits: String = int_part.chars().chain(frac_part.chars()).collect();
        let digits = digits.trim_start_matches('0');
        let shift = frac_part.len() as i64 - exponent as i64 - SCALE as i64;
        let range = || ParseUsdError::OutOfRange(text.to_owned());
        let atto = if digits.is_empty() {
            0
        } else if shift <= 0 {
            let base: i128 = digits.parse().map_err(|_| range())?;
            let factor = 10i128.checked_pow(u32::try_from(-shift).map_err(|_| range())?);
            factor.and_then(|f| base.checked_mul(f)).ok_or_else(range)?
        } else {
            let shift = shift as usize;
            if shift > digits.len() {
                // Everything is below 1e-18; round half-even of a value < 0.5 ulp
                // unless it is exactly the first dropped digit >= 5.
                round_half_even(
                    0,
                    &format!("{}{}", "0".repeat(shift - digits.len()), digits),
                )
            } else {
                let (kept, dropped) = digits.split_at(digits.len() - shift);
                let kept: i128 = if kept.is_empty() {
                    0
                } else {
                    kept.parse().map_err(|_| range())?
                };
                round_half_even(kept, dropped)
            }
        };
        Ok(Usd(if negative { -atto } else { atto }))
    }
}

fn round_half_even(kept: i128, dropped: &str) -> i128 {
    let mut bytes = dropped.bytes();
    let first = bytes.next().unwrap_or(b'0');
    let rest_nonzero = bytes.any(|b| b != b'0');
    match first {
        b'6'..=b'9' => kept + 1,
        b'5' if rest_nonzero || kept % 2 == 1 => kept + 1,
        _ => kept,
    }
}

/// An amount's decimal text (what `Display` writes) without a heap
/// allocation: every answer carries its cost in a header.
pub struct UsdText {
    bytes: [u8; Self::CAPACITY],
    len: usize,
}

impl UsdText {
    /// A sign, the 21 whole digits of i128::MIN / 10^18, a point and 18
    /// decimals.
    const CAPACITY: usize = 41;
}

impl fmt::Write for UsdText {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let end = self.len + text.len();
        self.bytes
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl std::ops::Deref for UsdText {
    type Target = str;

    fn deref(&self) -> &str {
        // Only whole `&str`s are ever copied in.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

impl Usd {
    /// The amount as `Display` writes it, on the stack.
    pub fn decimal(&self) -> UsdText {
        let mut text = UsdText {
            bytes: [0; UsdText::CAPACITY],
            len: 0,
        };
        // Cannot fail: CAPACITY holds the longest amount (tested).
        let _ = self.write_decimal(|piece| fmt::Write::write_str(&mut text, piece));
        text
    }

    /// Writes plain decimal dollars with trailing zeros trimmed (`0.00042`,
    /// `12`) piece by piece: shared by `Display` and `decimal`.
    fn write_decimal<E>(&self, mut put: impl FnMut(&str) -> Result<(), E>) -> Result<(), E> {
        let sign = if self.0 < 0 { "-" } else { "" };
        let magnitude = self.0.unsigned_abs();
        // Every call's cost is formatted: u64 arithmetic when it fits (any
        // amount under $18), and no string for the fraction.
        let (whole, frac) = match u64::try_from(magnitude) {
            Ok(small) => (u128::from(small / ONE_USD as u64), small % ONE_USD as u64),
            Err(_) => (
                magnitude / ONE_USD as u128,
                (magnitude % ONE_USD as u128) as u64,
            ),
        };
        // Digits by `itoa`: `write!` with a padded width was a tenth of a
        // microsecond per call's cost header.
        put(sign)?;
        put(itoa::Buffer::new().format(whole))?;
        if frac != 0 {
            // After the leading 1 of 10^18 + frac: the fraction's 18 digits,
            // its leading zeros kept, its trailing ones trimmed.
            let mut digits = itoa::Buffer::new();
            let padded = digits.format(ONE_USD as u64 + frac);
            put(".")?;
            put(padded[1..].trim_end_matches('0'))?;
        }
        Ok(())
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_decimal(|piece| f.write_str(piece))
    }
}

/// Money leaves Warden as its exact decimal string, never a float.
impl serde::Serialize for Usd {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl Add for Usd {
    type Output = Usd;
    fn add(self, rhs: Usd) -> Usd {
        Usd(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Usd {
    fn add_assign(&mut self, rhs: Usd) {
        self.0 = self.0.saturating_add(rhs.0);
    }
}

impl Sub for Usd {
    type Output = Usd;
    fn sub(self, rhs: Usd) -> Usd {
        Usd(self.0.saturating_sub(rhs.0))
    }
}

impl SubAssign for Usd {
    fn sub_assign(&mut self, rhs: Usd) {
        self.0 = self.0.saturating_sub(rhs.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scientific_and_plain_text_exactly() {
        assert_eq!(Usd::parse("2.5e-06").unwrap().atto(), 2_500_000_000_000);
        assert_eq!(Usd::parse("5.46875e-07").unwrap().atto(), 546_875_000_000);
        assert_eq!(Usd::parse("0.25").unwrap().atto(), 250_000_000_000_000_000);
        assert_eq!(Usd::parse("12").unwrap(), Usd::from_whole_dollars(12));
        assert_eq!(Usd::parse("1E3").unwrap(), Usd::from_whole_dollars(1000));
        assert_eq!(Usd::parse("0.0").unwrap(), Usd::ZERO);
        assert_eq!(
            Usd::parse("-1.5").unwrap().atto(),
            -1_500_000_000_000_000_000
        );
    }

    #[test]
    fn float_artefacts_round_to_eighteen_places() {
        assert_eq!(
            Usd::parse("5.0000000000000004e-08").unwrap().atto(),
            50_000_000_000
        );
        assert_eq!(
            Usd::parse("2.9999900000000002e-06").unwrap().atto(),
            2_999_990_000_000
        );
        // Exactly half an attodollar rounds to even.
        assert_eq!(Usd::parse("0.0000000000000000005").unwrap().atto(), 0);
        assert_eq!(Usd::parse("0.0000000000000000015").unwrap().atto(), 2);
        assert_eq!(Usd::parse("1e-30").unwrap().atto(), 0);
    }

    #[test]
    fn rejects_text_that_is_not_a_number() {
        for bad in ["", "abc", "1.2.3", "1e", "--1", "0x10", "."] {
            assert!(Usd::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(matches!(
            Usd::parse("1e40"),
            Err(ParseUsdError::OutOfRange(_))
        ));
    }

    #[test]
    fn displays_trimmed_decimal() {
        assert_eq!(Usd::parse("0.000420").unwrap().to_string(), "0.00042");
        assert_eq!(Usd::from_whole_dollars(3).to_string(), "3");
        assert_eq!(Usd::parse("-0.5").unwrap().to_string(), "-0.5");
        assert_eq!(Usd::from_atto(1).to_string(), "0.000000000000000001");
        // Past u64 (about $18.4) and far past it.
        assert_eq!(Usd::parse("18.5").unwrap().to_string(), "18.5");
        assert_eq!(
            Usd::parse("-123456789.000000000000000001")
                .unwrap()
                .to_string(),
            "-123456789.000000000000000001"
        );
        assert_eq!(
            Usd::parse("18.446744073709551615").unwrap().to_string(),
            "18.446744073709551615"
        );
        assert_eq!(Usd::from_atto(0).to_string(), "0");
        assert_eq!(Usd::parse("-7").unwrap().to_string(), "-7");
        assert_eq!(
            Usd::from_atto(i128::MIN).to_string(),
            "-170141183460469231731.687303715884105728"
        );
        assert_eq!(
            Usd::from_atto(i128::MAX).to_string(),
            "170141183460469231731.687303715884105727"
        );
    }

    #[test]
    fn decimal_text_is_what_display_writes_up_to_the_longest_amount() {
        for atto in [
            0,
            1,
            -7,
            42_000_000_000_000,
            i128::MIN,
            i128::MIN + 1,
            i128::MAX,
        ] {
            let amount = Usd::from_atto(atto);
            assert_eq!(&*amount.decimal(), amount.to_string());
        }
    }

    #[test]
    fn times_is_exact() {
        let price = Usd::parse("1.875e-05").unwrap();
        assert_eq!(price.times(3).to_string(), "0.00005625");
    }
}
