//! Column-at-a-time kernels of the gate: the consent selection mask and generalisation.
//!
//! No kernel allocates per row: masks are built with `BooleanBuffer::collect_bool`, dictionary
//! columns are probed once per distinct value, and generalisation runs as Arrow `unary` kernels.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, PrimitiveArray, StringBuilder};
use arrow::buffer::BooleanBuffer;
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, Date32Type, Date64Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type,
    Int64Type, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};

use crate::classification::Generalisation;
use crate::consent::SubjectSet;
use crate::error::{Error, Result};

/// Builds the keep-mask for a subject column. A row is kept when its subject is non-null and
/// (`keep_members` ? member : not member). The result has no nulls, so `filter` never keeps an
/// unknown row.
pub fn consent_mask(col: &dyn Array, set: &SubjectSet, keep_members: bool) -> Result<BooleanArray> {
    let len = col.len();
    let nulls = col.logical_nulls();
    let valid = |i: usize| nulls.as_ref().is_none_or(|n| n.is_valid(i));
    let bits = match col.data_type() {
        DataType::Int64 => {
            let v = col.as_primitive::<Int64Type>().values();
            BooleanBuffer::collect_bool(len, |i| valid(i) && set.contains_i64(v[i]) == keep_members)
        }
        DataType::Int32 => {
            let v = col.as_primitive::<Int32Type>().values();
            BooleanBuffer::collect_bool(len, |i| valid(i) && set.contains_i64(i64::from(v[i])) == keep_members)
        }
        DataType::Utf8 => {
            let a = col.as_string::<i32>();
            BooleanBuffer::collect_bool(len, |i| valid(i) && set.contains_str(a.value(i)) == keep_members)
        }
        DataType::LargeUtf8 => {
            let a = col.as_string::<i64>();
            BooleanBuffer::collect_bool(len, |i| valid(i) && set.contains_str(a.value(i)) == keep_members)
        }
        DataType::Utf8View => {
            let a = col.as_string_view();
            BooleanBuffer::collect_bool(len, |i| valid(i) && set.contains_str(a.value(i)) == keep_members)
        }
        DataType::Dictionary(_, _) => {
            let dict = col.as_any_dictionary();
            // Decide each distinct value once, then map keys through the decisions.
            let per_value = consent_mask(dict.values().as_ref(), set, keep_members)?;
            let keys = arrow::compute::cast(dict.keys(), &DataType::UInt64)?;
            let keys = keys.as_primitive::<UInt64Type>().values();
            let pv = per_value.values();
            BooleanBuffer::collect_bool(len, |i| {
                valid(i) && (keys[i] as usize) < pv.len() && pv.value(keys[i] as usize)
            })
        }
        other => {
            return Err(Error::Unsupported {
                what: format!("subject column of type {other}"),
            });
        }
    };
    Ok(BooleanArray::new(bits, None))
}

/// Applies a generalisation rule, keeping the column's type.
pub fn generalise(col: &ArrayRef, rule: Generalisation) -> Result<ArrayRef> {
    match rule {
        Generalisation::Year | Generalisation::Month => truncate_temporal(col, rule == Generalisation::Year),
        Generalisation::Prefix(n) => prefix(col, usize::from(n)),
        Generalisation::Bucket(n) => bucket(col, n),
        Generalisation::Top(n) => top_code(col, n),
    }
}

/// Days since the epoch of the first day of the year or month containing `days`.
#[inline]
fn truncate_days(days: i64, to_year: bool) -> i64 {
    if to_year && let Some(start) = year_start_fast(days) {
        return start;
    }
    let (y, m, _) = civil_from_days(days);
    days_from_civil(y, if to_year { 1 } else { m }, 1)
}

/// Years covered by [`YEAR_STARTS`]: every date of birth, admission or event a dataset holds.
const FIRST_YEAR: i64 = 1600;
const YEARS: usize = 1001;

/// Days since the epoch of 1 January of `FIRST_YEAR + i`, built at compile time: with it,
/// truncation to the year is an estimate and one or two comparisons instead of the civil
/// calendar's chain of divisions (the bulk of a `generalise = "year"` column's cost).
const YEAR_STARTS: [i64; YEARS] = {
    let mut t = [0i64; YEARS];
    let mut i = 0;
    while i < YEARS {
        t[i] = days_from_civil(FIRST_YEAR + i as i64, 1, 1);
        i += 1;
    }
    t
};

/// 1 January of the year containing `days`, for days strictly inside the table; `None` outside.
#[inline]
fn year_start_fast(days: i64) -> Option<i64> {
    if days <= YEAR_STARTS[1] || days >= YEAR_STARTS[YEARS - 1] {
        return None;
    }
    // 400 Gregorian years are exactly 146,097 days, so this estimate is off by at most one year.
    let i = ((days - YEAR_STARTS[0]) * 400 / 146_097) as usize;
    let i = i.clamp(1, YEARS - 2);
    Some(if YEAR_STARTS[i + 1] <= days {
        YEAR_STARTS[i + 1]
    } else if YEAR_STARTS[i] <= days {
        YEAR_STARTS[i]
    } else {
        YEAR_STARTS[i - 1]
    })
}

// Howard Hinnant's civil calendar algorithms (proleptic Gregorian), exact for all i64 days in range.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

const fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn truncate_units<T: ArrowPrimitiveType<Native = i64>>(col: &ArrayRef, per_day: i64, to_year: bool) -> ArrayRef {
    let a = col.as_primitive::<T>();
    let out: PrimitiveArray<T> = a.unary(|v| truncate_days(v.div_euclid(per_day), to_year).saturating_mul(per_day));
    Arc::new(out.with_data_type(col.data_type().clone()))
}

fn truncate_temporal(col: &ArrayRef, to_year: bool) -> Result<ArrayRef> {
    const DAY_S: i64 = 86_400;
    Ok(match col.data_type() {
        DataType::Date32 => {
            let out: PrimitiveArray<Date32Type> = col
                .as_primitive::<Date32Type>()
                .unary(|d| truncate_days(i64::from(d), to_year) as i32);
            Arc::new(out)
        }
        DataType::Date64 => truncate_units::<Date64Type>(col, DAY_S * 1000, to_year),
        DataType::Timestamp(TimeUnit::Second, _) => truncate_units::<TimestampSecondType>(col, DAY_S, to_year),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            truncate_units::<TimestampMillisecondType>(col, DAY_S * 1_000, to_year)
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            truncate_units::<TimestampMicrosecondType>(col, DAY_S * 1_000_000, to_year)
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            truncate_units::<TimestampNanosecondType>(col, DAY_S * 1_000_000_000, to_year)
        }
        other => {
            return Err(Error::Unsupported {
                what: format!("date truncation of type {other}"),
            });
        }
    })
}

fn prefix(col: &ArrayRef, n: usize) -> Result<ArrayRef> {
    fn cut(s: &str, n: usize) -> &str {
        match s.char_indices().nth(n) {
            Some((i, _)) => &s[..i],
            None => s,
        }
    }
    let mut b = StringBuilder::with_capacity(col.len(), col.len() * n);
    match col.data_type() {
        DataType::Utf8 => col
            .as_string::<i32>()
            .iter()
            .for_each(|v| b.append_option(v.map(|s| cut(s, n)))),
        DataType::LargeUtf8 => col
            .as_string::<i64>()
            .iter()
            .for_each(|v| b.append_option(v.map(|s| cut(s, n)))),
        DataType::Utf8View => col
            .as_string_view()
            .iter()
            .for_each(|v| b.append_option(v.map(|s| cut(s, n)))),
        other => {
            return Err(Error::Unsupported {
                what: format!("prefix of type {other}"),
            });
        }
    }
    let out: ArrayRef = Arc::new(b.finish());
    // Keep the declared type so the post-policy schema holds.
    Ok(arrow::compute::cast(&out, col.data_type())?)
}

fn bucket(col: &ArrayRef, n: u32) -> Result<ArrayRef> {
    let width = i128::from(n);
    numeric_map(
        col,
        "bucketing",
        |v| v.div_euclid(width) * width,
        |v| (v / f64::from(n)).floor() * f64::from(n),
    )
}

fn top_code(col: &ArrayRef, cap: i64) -> Result<ArrayRef> {
    numeric_map(
        col,
        "top-coding",
        |v| v.min(i128::from(cap)),
        |v| if v > cap as f64 { cap as f64 } else { v },
    )
}

/// Applies a rule to any integer or float column, keeping its type. Integer rules run in i128
/// and saturate back into the column's type, so no rule can overflow.
fn numeric_map(
    col: &ArrayRef,
    what: &str,
    int_rule: impl Fn(i128) -> i128,
    float_rule: impl Fn(f64) -> f64,
) -> Result<ArrayRef> {
    macro_rules! int {
        ($t:ty, $native:ty) => {{
            let out: PrimitiveArray<$t> = col.as_primitive::<$t>().unary(|v| {
                let r = int_rule(i128::from(v));
                <$native>::try_from(r).unwrap_or(if r < 0 { <$native>::MIN } else { <$native>::MAX })
            });
            Arc::new(out) as ArrayRef
        }};
    }
    Ok(match col.data_type() {
        DataType::Int8 => int!(Int8Type, i8),
        DataType::Int16 => int!(Int16Type, i16),
        DataType::Int32 => int!(Int32Type, i32),
        DataType::Int64 => int!(Int64Type, i64),
        DataType::UInt8 => int!(UInt8Type, u8),
        DataType::UInt16 => int!(UInt16Type, u16),
        DataType::UInt32 => int!(UInt32Type, u32),
        DataType::UInt64 => int!(UInt64Type, u64),
        DataType::Float32 => {
            let out: PrimitiveArray<Float32Type> = col
                .as_primitive::<Float32Type>()
                .unary(|v| float_rule(f64::from(v)) as f32);
            Arc::new(out)
        }
        DataType::Float64 => {
            let out: PrimitiveArray<Float64Type> = col.as_primitive::<Float64Type>().unary(&float_rule);
            Arc::new(out)
        }
        other => {
            return Err(Error::Unsupported {
                what: format!("{what} of type {other}"),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn year_table_equals_the_civil_calendar_for_every_day() {
        let exact = |d: i64| days_from_civil(civil_from_days(d).0, 1, 1);
        for d in YEAR_STARTS[0] - 2_000..YEAR_STARTS[YEARS - 1] + 2_000 {
            assert_eq!(truncate_days(d, true), exact(d), "day {d}");
        }
        for d in [i64::from(i32::MIN), i64::from(i32::MAX), -1, 0, 1] {
            assert_eq!(truncate_days(d, true), exact(d), "day {d}");
        }
    }
    use crate::classification::LegalBasis;
    use crate::consent::index::KeyKind;
    use crate::consent::{ConsentEvent, ConsentIndex};
    use crate::purpose::Purpose;
    use arrow::array::{
        Date32Array, DictionaryArray, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray,
    };

    fn set(kind: KeyKind, granted: &[&str]) -> Arc<SubjectSet> {
        let idx = ConsentIndex::new();
        let evs: Vec<_> = granted
            .iter()
            .map(|s| ConsentEvent::parse(s, "a", "granted", "2024-01-01T00:00:00Z").unwrap())
            .collect();
        idx.apply(evs.iter().enumerate().map(|(i, e)| (i as u64 + 1, "r", e)));
        idx.subject_set("r", &Purpose::parse("a").unwrap(), LegalBasis::Consent, kind)
            .set
    }

    #[test]
    fn masks_drop_nulls_and_non_members() {
        let s = set(KeyKind::Int, &["1", "3"]);
        let col = Int64Array::from(vec![Some(1), None, Some(2), Some(3)]);
        let m = consent_mask(&col, &s, true).unwrap();
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![Some(true), Some(false), Some(false), Some(true)]
        );
        let m = consent_mask(&col, &s, false).unwrap();
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![Some(false), Some(false), Some(true), Some(false)]
        );
        let s = set(KeyKind::Str, &["a", "é"]);
        let col = StringArray::from(vec![Some("a"), Some("b"), None, Some("é")]);
        assert_eq!(consent_mask(&col, &s, true).unwrap().true_count(), 2);
        let dict: DictionaryArray<Int32Type> = vec![Some("a"), None, Some("b"), Some("a")].into_iter().collect();
        let m = consent_mask(&dict, &s, true).unwrap();
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![Some(true), Some(false), Some(false), Some(true)]
        );
    }

    #[test]
    fn calendar_round_trips() {
        for d in [-800_000i64, -1, 0, 59, 60, 365, 11_016, 19_782, 2_000_000] {
            let (y, m, day) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, day), d);
        }
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn generalisations_keep_types() {
        // 2024-02-29 and 1969-12-31
        let dates: ArrayRef = Arc::new(Date32Array::from(vec![Some(19_782), Some(-1), None]));
        let y = generalise(&dates, Generalisation::Year).unwrap();
        assert_eq!(
            y.as_primitive::<Date32Type>().iter().collect::<Vec<_>>(),
            vec![Some(19_723), Some(-365), None]
        );
        let m = generalise(&dates, Generalisation::Month).unwrap();
        assert_eq!(m.as_primitive::<Date32Type>().value(0), 19_754);
        let ts: ArrayRef =
            Arc::new(TimestampMicrosecondArray::from(vec![19_782 * 86_400_000_000i64 + 5]).with_timezone("UTC"));
        let t = generalise(&ts, Generalisation::Year).unwrap();
        assert_eq!(t.data_type(), ts.data_type());
        assert_eq!(
            t.as_primitive::<TimestampMicrosecondType>().value(0),
            19_723 * 86_400_000_000
        );
        let s: ArrayRef = Arc::new(StringArray::from(vec![Some("75013"), Some("é1"), Some("7"), None]));
        let p = generalise(&s, Generalisation::Prefix(2)).unwrap();
        assert_eq!(
            p.as_string::<i32>().iter().collect::<Vec<_>>(),
            vec![Some("75"), Some("é1"), Some("7"), None]
        );
        let f: ArrayRef = Arc::new(Float64Array::from(vec![7.9, -0.5]));
        let b = generalise(&f, Generalisation::Bucket(5)).unwrap();
        assert_eq!(b.as_primitive::<Float64Type>().values().to_vec(), vec![5.0, -5.0]);
        let top = generalise(&f, Generalisation::Top(6)).unwrap();
        assert_eq!(top.as_primitive::<Float64Type>().values().to_vec(), vec![6.0, -0.5]);
        let i: ArrayRef = Arc::new(Int64Array::from(vec![i64::MIN, 14, -1]));
        let b = generalise(&i, Generalisation::Bucket(10)).unwrap();
        assert_eq!(b.as_primitive::<Int64Type>().values().to_vec(), vec![i64::MIN, 10, -10]);
    }
}
