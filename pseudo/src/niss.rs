//! The NISS (Belgian national register / BIS number): parsed once, never printable.

use std::fmt;

/// A valid NISS. `Debug` is redacted; there is no `Display` and no `Serialize`: the digits come
/// out only through [`Niss::expose_digits`], which the pseudonymiser alone calls.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Niss([u8; 11]);

/// Why a text is not a NISS. Messages never echo the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NissError {
    /// Not 11 digits (after removing `.`, `-` and spaces).
    #[error("a NISS has 11 digits")]
    Format,
    /// The modulo-97 check digits do not match.
    #[error("the NISS check digits do not match")]
    Checksum,
    /// Month or day out of range (months 00–12, +20 or +40 for BIS numbers; days 00–31).
    #[error("the NISS birth date part is out of range")]
    Date,
}

impl Niss {
    /// Parses `XXXXXXXXXXX` or `XX.XX.XX-XXX.XX`: 11 digits whose last two are
    /// 97 − (first nine mod 97), or for people born from 2000 97 − ((2 000 000 000 + first nine)
    /// mod 97).
    ///
    /// # Errors
    /// [`NissError`] when it is not a valid NISS.
    pub fn parse(input: &str) -> Result<Niss, NissError> {
        let mut digits = [0u8; 11];
        let mut n = 0;
        for c in input.bytes() {
            match c {
                b'0'..=b'9' => {
                    if n == 11 {
                        return Err(NissError::Format);
                    }
                    digits[n] = c;
                    n += 1;
                }
                b'.' | b'-' | b' ' => {}
                _ => return Err(NissError::Format),
            }
        }
        if n != 11 {
            return Err(NissError::Format);
        }
        let num = |range: std::ops::Range<usize>| {
            digits[range]
                .iter()
                .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'))
        };
        let month = num(2..4);
        let day = num(4..6);
        if !matches!(month, 0..=12 | 20..=32 | 40..=52) || day > 31 {
            return Err(NissError::Date);
        }
        let first9 = num(0..9);
        let check = num(9..11);
        let before_2000 = 97 - first9 % 97;
        let from_2000 = 97 - (2_000_000_000 + first9) % 97;
        if check != before_2000 && check != from_2000 {
            return Err(NissError::Checksum);
        }
        Ok(Niss(digits))
    }

    /// The 11 ASCII digits. The only way out of this type: call it only to pseudonymise.
    pub fn expose_digits(&self) -> &str {
        // Only ASCII digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Debug for Niss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Niss(<redacted>)")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid NISS from its first nine digits.
    pub(crate) fn with_check(first9: &str, born_2000: bool) -> String {
        let n: u64 = first9.parse().unwrap();
        let check = if born_2000 {
            97 - (2_000_000_000 + n) % 97
        } else {
            97 - n % 97
        };
        format!("{first9}{check:02}")
    }

    #[test]
    fn accepts_valid_numbers_in_both_centuries_and_bis() {
        for (first9, y2k) in [
            ("850730033", false),
            ("010101001", true),
            ("852730033", false), // BIS +20
            ("854730033", false), // BIS +40
            ("850000033", false), // unknown month and day
        ] {
            let n = with_check(first9, y2k);
            assert!(Niss::parse(&n).is_ok(), "{first9}");
        }
    }

    #[test]
    fn accepts_the_formatted_form() {
        let n = with_check("850730033", false);
        let f = format!(
            "{}.{}.{}-{}.{}",
            &n[0..2],
            &n[2..4],
            &n[4..6],
            &n[6..9],
            &n[9..]
        );
        assert_eq!(Niss::parse(&f).unwrap(), Niss::parse(&n).unwrap());
    }

    #[test]
    fn rejects_bad_numbers() {
        let n = with_check("850730033", false);
        let mut wrong = n.clone();
        wrong.replace_range(10..11, if n.ends_with('0') { "1" } else { "0" });
        assert_eq!(Niss::parse(&wrong), Err(NissError::Checksum));
        assert_eq!(Niss::parse("8507300332"), Err(NissError::Format));
        assert_eq!(Niss::parse("850730033281"), Err(NissError::Format));
        assert_eq!(Niss::parse("85O73003328"), Err(NissError::Format));
        assert_eq!(
            Niss::parse(&with_check("851330033", false)),
            Err(NissError::Date)
        );
        assert_eq!(
            Niss::parse(&with_check("850732033", false)),
            Err(NissError::Date)
        );
        // the 2000 rule does not validate a number whose check uses the other rule wrongly
        let y2k = with_check("010101001", true);
        assert!(Niss::parse(&y2k).is_ok());
    }

    #[test]
    fn debug_never_shows_digits() {
        let n = Niss::parse(&with_check("850730033", false)).unwrap();
        let shown = format!("{n:?}");
        assert!(!shown.chars().any(|c| c.is_ascii_digit()), "{shown}");
    }

    #[test]
    fn the_2000_rule_alone_is_enough() {
        // born 2001-02-03, serial 004: the pre-2000 check digits would differ
        let n = with_check("010203004", true);
        let pre2000 = with_check("010203004", false);
        assert_ne!(n, pre2000);
        assert!(Niss::parse(&n).is_ok());
        assert!(Niss::parse(&pre2000).is_ok());
        assert_eq!(Niss::parse(&n).unwrap().expose_digits(), n);
        // BIS numbers of the 2000s
        assert!(Niss::parse(&with_check("012203004", true)).is_ok());
        assert!(Niss::parse(&with_check("014203004", true)).is_ok());
        assert_eq!(
            Niss::parse(&with_check("015303004", true)),
            Err(NissError::Date)
        );
    }

    #[test]
    fn separators_are_lenient_and_errors_echo_nothing() {
        let n = with_check("850730033", false);
        let spaced = format!(
            "{} {} {} {} {}",
            &n[0..2],
            &n[2..4],
            &n[4..6],
            &n[6..9],
            &n[9..]
        );
        assert!(Niss::parse(&spaced).is_ok());
        assert!(Niss::parse(&format!(" {n} ")).is_ok());
        assert_eq!(Niss::parse(""), Err(NissError::Format));
        assert_eq!(Niss::parse("８５0730033"), Err(NissError::Format));
        let mut wrong = n.clone();
        wrong.replace_range(10..11, if n.ends_with('0') { "1" } else { "0" });
        let e = Niss::parse(&wrong).unwrap_err();
        assert!(!e.to_string().contains(&wrong[..4]), "{e}");
    }

    #[test]
    fn the_smals_readme_examples_parse() {
        for n in ["00000000097", "00000000196", "00000000295"] {
            assert_eq!(Niss::parse(n).unwrap().expose_digits(), n);
        }
    }
}
