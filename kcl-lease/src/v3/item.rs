//! DynamoDB items in our own types: [`Value`] and [`Item`], and the [`Condition`]s a
//! conditional write of a coordinator state item can carry.
//!
//! The 3.x tables (`<app>-CoordinatorState`, `<app>-WorkerMetricStats`) hold items with
//! nested values (lists and maps), which the lease row model does not need. These types
//! let the row models, the in-memory store and the state machines speak DynamoDB's data
//! model without the AWS SDK (the SDK appears only in `v3::dynamo`, which converts).
//!
//! A number is kept as DynamoDB keeps it: its decimal text ([`Value::N`]), so what a Java
//! worker wrote is never reformatted by a read-modify-write of ours.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::LeaseError;

/// One attribute value, as DynamoDB models it.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub enum Value {
    /// `S`: a string.
    S(String),
    /// `N`: a number, as its decimal text.
    N(String),
    /// `B`: binary.
    B(Vec<u8>),
    /// `BOOL`.
    Bool(bool),
    /// `NULL`.
    Null,
    /// `L`: a list.
    L(Vec<Value>),
    /// `M`: a map.
    M(BTreeMap<String, Value>),
    /// `SS`: a string set.
    Ss(Vec<String>),
    /// `NS`: a number set, as decimal texts.
    Ns(Vec<String>),
}

/// One item: attribute name to value.
pub type Item = BTreeMap<String, Value>;

impl Value {
    /// A string value.
    pub fn s(value: impl Into<String>) -> Self {
        Value::S(value.into())
    }

    /// A number value from an integer.
    pub fn int(value: i64) -> Self {
        Value::N(value.to_string())
    }

    /// A number value from an unsigned integer.
    pub fn uint(value: u64) -> Self {
        Value::N(value.to_string())
    }

    /// A number value from a float: finite values in plain decimal notation (DynamoDB
    /// accepts no `NaN`, no infinity and no exponent above its range), rounded to 6
    /// decimals; a non-finite value is written as `-1` (the "no value" mark of the metric
    /// stats).
    pub fn float(value: f64) -> Self {
        if !value.is_finite() {
            return Value::N("-1".to_owned());
        }
        let rounded = (value * 1e6).round() / 1e6;
        let mut text = String::new();
        // `{}` on f64 never uses an exponent and prints the shortest exact text.
        let _ = write!(text, "{rounded}");
        if text == "-0" {
            text = "0".to_owned();
        }
        Value::N(text)
    }

    /// The string, if this is an `S`.
    pub fn as_s(&self) -> Option<&str> {
        match self {
            Value::S(s) => Some(s),
            _ => None,
        }
    }

    /// The number text, if this is an `N`.
    pub fn as_n(&self) -> Option<&str> {
        match self {
            Value::N(n) => Some(n),
            _ => None,
        }
    }

    /// The DynamoDB type name (`S`, `N`, `L`, ...), for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::S(_) => "S",
            Value::N(_) => "N",
            Value::B(_) => "B",
            Value::Bool(_) => "BOOL",
            Value::Null => "NULL",
            Value::L(_) => "L",
            Value::M(_) => "M",
            Value::Ss(_) => "SS",
            Value::Ns(_) => "NS",
        }
    }
}

/// A condition on the current item, evaluated atomically with a write (DynamoDB's
/// `ConditionExpression`). Only what the 3.x protocol needs.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub enum Condition {
    /// Always holds (an unconditional write).
    Always,
    /// `attribute_exists(name)`.
    Exists(String),
    /// `attribute_not_exists(name)`.
    NotExists(String),
    /// `name = value` (false when the attribute is absent).
    Equals(String, Value),
    /// Every condition holds.
    And(Vec<Condition>),
}

impl Condition {
    /// `attribute_exists(name)`.
    pub fn exists(name: &str) -> Self {
        Condition::Exists(name.to_owned())
    }

    /// `attribute_not_exists(name)`.
    pub fn not_exists(name: &str) -> Self {
        Condition::NotExists(name.to_owned())
    }

    /// `name = value`.
    pub fn equals(name: &str, value: Value) -> Self {
        Condition::Equals(name.to_owned(), value)
    }

    /// Whether the condition holds on `item` (`None`: no item with that key).
    pub fn holds(&self, item: Option<&Item>) -> bool {
        match self {
            Condition::Always => true,
            Condition::Exists(name) => item.is_some_and(|i| i.contains_key(name)),
            Condition::NotExists(name) => !item.is_some_and(|i| i.contains_key(name)),
            Condition::Equals(name, value) => {
                item.and_then(|i| i.get(name)).is_some_and(|v| v == value)
            }
            Condition::And(all) => all.iter().all(|c| c.holds(item)),
        }
    }
}

/// Reading typed attributes of an item, with errors that name the item and the attribute.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reader<'a> {
    /// What the item is, for errors (e.g. `WorkerMetricStats worker-1`).
    pub(crate) what: &'a str,
    pub(crate) item: &'a Item,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(what: &'a str, item: &'a Item) -> Self {
        Self { what, item }
    }

    pub(crate) fn malformed(&self, reason: impl Into<String>) -> LeaseError {
        malformed(self.what, reason)
    }

    /// A required `S`.
    pub(crate) fn s(&self, name: &str) -> Result<&'a str, LeaseError> {
        self.opt_s(name)?
            .ok_or_else(|| self.malformed(format!("{name} is missing")))
    }

    /// An optional `S` (absent or `NULL` is `None`).
    pub(crate) fn opt_s(&self, name: &str) -> Result<Option<&'a str>, LeaseError> {
        match self.item.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::S(s)) => Ok(Some(s)),
            Some(other) => {
                Err(self.malformed(format!("{name} is of type {}, not S", other.type_name())))
            }
        }
    }

    /// A required `N` holding an integer.
    pub(crate) fn int(&self, name: &str) -> Result<i64, LeaseError> {
        match self.item.get(name) {
            Some(Value::N(n)) => parse_int(n)
                .ok_or_else(|| self.malformed(format!("{name} = {n:?} is not an integer"))),
            Some(other) => {
                Err(self.malformed(format!("{name} is of type {}, not N", other.type_name())))
            }
            None => Err(self.malformed(format!("{name} is missing"))),
        }
    }

    /// An optional attribute of any type.
    pub(crate) fn get(&self, name: &str) -> Option<&'a Value> {
        self.item.get(name)
    }
}

/// The error of an item that cannot be read ([`LeaseError::MalformedLease`], whose
/// `lease_key` names the item).
pub(crate) fn malformed(what: &str, reason: impl Into<String>) -> LeaseError {
    LeaseError::MalformedLease {
        lease_key: what.to_owned(),
        reason: reason.into(),
    }
}

/// An integer from a DynamoDB number's text (`"12"`, `"12.0"`; not `"12.5"`).
pub(crate) fn parse_int(text: &str) -> Option<i64> {
    if let Ok(v) = text.trim().parse::<i64>() {
        return Some(v);
    }
    let f = text.trim().parse::<f64>().ok()?;
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
}

/// A float from a DynamoDB number's text.
pub(crate) fn parse_float(text: &str) -> Option<f64> {
    text.trim().parse::<f64>().ok().filter(|f| f.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_plain_decimals_rounded_to_six_places() {
        assert_eq!(Value::float(12.5), Value::N("12.5".into()));
        assert_eq!(Value::float(1.0 / 3.0), Value::N("0.333333".into()));
        assert_eq!(Value::float(100.0), Value::N("100".into()));
        assert_eq!(Value::float(-0.0000001), Value::N("0".into()));
        assert_eq!(Value::float(f64::NAN), Value::N("-1".into()));
        assert_eq!(Value::float(1e20), Value::N("100000000000000000000".into()));
    }

    #[test]
    fn conditions_are_evaluated_on_the_item() {
        let mut item = Item::new();
        item.insert("key".into(), Value::s("Leader"));
        item.insert("rvn".into(), Value::s("a"));
        assert!(Condition::exists("key").holds(Some(&item)));
        assert!(!Condition::exists("key").holds(None));
        assert!(Condition::not_exists("key").holds(None));
        assert!(!Condition::not_exists("key").holds(Some(&item)));
        assert!(Condition::not_exists("isReleased").holds(Some(&item)));
        assert!(Condition::equals("rvn", Value::s("a")).holds(Some(&item)));
        assert!(!Condition::equals("rvn", Value::s("b")).holds(Some(&item)));
        assert!(!Condition::equals("rvn", Value::N("1".into())).holds(Some(&item)));
        assert!(!Condition::equals("missing", Value::s("a")).holds(Some(&item)));
        let both = Condition::And(vec![
            Condition::exists("key"),
            Condition::equals("rvn", Value::s("a")),
        ]);
        assert!(both.holds(Some(&item)));
        assert!(!both.holds(None));
        assert!(Condition::Always.holds(None));
    }

    #[test]
    fn reader_names_the_item_and_attribute() {
        let mut item = Item::new();
        item.insert("n".into(), Value::N("7.0".into()));
        item.insert("x".into(), Value::N("7.5".into()));
        item.insert("s".into(), Value::int(3));
        let r = Reader::new("thing t", &item);
        assert_eq!(r.int("n").unwrap(), 7);
        let err = r.int("x").unwrap_err().to_string();
        assert!(err.contains("thing t") && err.contains("x"), "{err}");
        let err = r.s("s").unwrap_err().to_string();
        assert!(err.contains("not S"), "{err}");
        assert!(r.s("absent").unwrap_err().to_string().contains("missing"));
        assert_eq!(r.opt_s("absent").unwrap(), None);
        assert_eq!(parse_int("1e3"), Some(1000));
        assert_eq!(parse_float("abc"), None);
    }
}
