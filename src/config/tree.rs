//! The config text as a tree that keeps positions: every key and every value with the
//! byte range it is written at, so that a problem can be reported at its own line and
//! column, and reading can go on after it (serde's derive stops at the first error and
//! knows no positions of the keys it checks).

use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// A byte range of the config text.
pub(super) type Span = Range<usize>;

/// Stands for "not known yet" until [`Node::fill_spans`] gives it the parent's position
/// (the parser knows no position of a table that is only implied by a dotted key).
pub(super) const NO_SPAN: Span = usize::MAX..usize::MAX;

/// A TOML value and where it is written.
#[derive(Debug)]
pub(super) struct Node {
    pub(super) span: Span,
    pub(super) value: Value,
}

#[derive(Debug)]
pub(super) enum Value {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Vec<Entry>),
}

/// A key of a table, where the key is written, and its value.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) key: String,
    pub(super) key_span: Span,
    pub(super) node: Node,
}

impl Node {
    fn bare(value: Value) -> Node {
        Node {
            span: NO_SPAN,
            value,
        }
    }

    /// Gives every node and key without a position its parent's.
    pub(super) fn fill_spans(&mut self, parent: &Span) {
        if self.span == NO_SPAN {
            self.span = parent.clone();
        }
        let own = self.span.clone();
        match &mut self.value {
            Value::Array(items) => items.iter_mut().for_each(|n| n.fill_spans(&own)),
            Value::Table(entries) => {
                for e in entries {
                    if e.key_span == NO_SPAN {
                        e.key_span = own.clone();
                    }
                    e.node.fill_spans(&e.key_span);
                }
            }
            _ => {}
        }
    }

    /// The value in words, for "..., not the string \"2\"".
    pub(super) fn describe(&self) -> String {
        match &self.value {
            Value::String(s) => format!("the string {s:?}"),
            Value::Integer(n) => format!("the number {n}"),
            Value::Float(n) => format!("the number {n:?}"),
            Value::Boolean(b) => format!("the value {b}"),
            Value::Datetime(d) => format!("the date {d}"),
            Value::Array(_) => "a list".into(),
            Value::Table(_) => "a table".into(),
        }
    }
}

// The toml crate hands a value's position to a type that asks for it under these names
// (the protocol of `toml::Spanned`, from the serde_spanned crate), and a date as a map
// with one private key. Asking for them directly lets one visitor take any value, with or
// without a position, dates included, where `Spanned<T>` would fail on a date or on a
// table that is only implied by a dotted key.
const SPANNED: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[SPANNED_START, SPANNED_END, SPANNED_VALUE];
const DATETIME_FIELD: &str = "$__toml_private_datetime";

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_struct(SPANNED, SPANNED_FIELDS, NodeVisitor)
    }
}

/// A value without asking for its position (the inside of a positioned value).
struct Bare;

impl<'de> DeserializeSeed<'de> for Bare {
    type Value = Node;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::bare(Value::Boolean(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::bare(Value::Integer(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        // TOML integers are i64; a larger one is at least too large for every key.
        Ok(Node::bare(Value::Integer(
            i64::try_from(v).unwrap_or(i64::MAX),
        )))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::bare(Value::Float(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::bare(Value::String(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(Node::bare(Value::String(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Node::bare(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let Some(first) = map.next_key::<Key>()? else {
            return Ok(Node::bare(Value::Table(Vec::new())));
        };
        // A key of the file always has a position; these private ones never do.
        if first.span.is_none() && first.text == SPANNED_START {
            let start: usize = map.next_value()?;
            let mut end = start;
            let mut node = None;
            while let Some(key) = map.next_key::<Key>()? {
                match key.text.as_str() {
                    SPANNED_END => end = map.next_value()?,
                    SPANNED_VALUE => node = Some(map.next_value_seed(Bare)?),
                    _ => {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                }
            }
            let mut node = node.ok_or_else(|| de::Error::missing_field(SPANNED_VALUE))?;
            node.span = start..end;
            return Ok(node);
        }
        if first.span.is_none() && first.text == DATETIME_FIELD {
            let text: String = map.next_value()?;
            while map.next_key::<de::IgnoredAny>()?.is_some() {
                map.next_value::<de::IgnoredAny>()?;
            }
            return Ok(Node::bare(Value::Datetime(text)));
        }
        let mut entries = Vec::new();
        let mut key = Some(first);
        while let Some(k) = key {
            let node: Node = map.next_value()?;
            entries.push(Entry {
                key: k.text,
                key_span: k.span.unwrap_or(NO_SPAN),
                node,
            });
            key = map.next_key()?;
        }
        Ok(Node::bare(Value::Table(entries)))
    }
}

/// A table's key with its position when the parser knows it.
struct Key {
    text: String,
    span: Option<Span>,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        deserializer.deserialize_struct(SPANNED, SPANNED_FIELDS, KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(Key {
            text: v.to_owned(),
            span: None,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Key, A::Error> {
        let (mut start, mut end, mut text) = (0, 0, None);
        while let Some(field) = map.next_key::<String>()? {
            match field.as_str() {
                SPANNED_START => start = map.next_value()?,
                SPANNED_END => end = map.next_value()?,
                SPANNED_VALUE => text = Some(map.next_value::<String>()?),
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(Key {
            text: text.ok_or_else(|| de::Error::missing_field(SPANNED_VALUE))?,
            span: Some(start..end),
        })
    }
}
