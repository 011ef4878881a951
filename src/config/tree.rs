//! The config text as a tree that keeps positions: every key and every value with the
//! byte range it is written at, so that a problem can be reported at its own line and
//! column, and reading can go on after it (serde's derive stops at the first error and
//! knows no positions of the keys it checks). The tree is built from `toml_edit`'s
//! parsed document, the parser the `toml` crate itself uses.

use std::ops::Range;

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

/// Parses the text into the tree, every key and value with its position as
/// `toml_edit` (the parser under the `toml` crate) records it.
pub(super) fn parse(text: &str) -> Result<Node, toml_edit::TomlError> {
    let document = toml_edit::ImDocument::parse(text)?;
    Ok(table(document.as_table()))
}

fn span(range: Option<Span>) -> Span {
    range.unwrap_or(NO_SPAN)
}

fn item(item: &toml_edit::Item) -> Node {
    use toml_edit::Item;
    match item {
        Item::Value(v) => value(v),
        Item::Table(t) => table(t),
        Item::ArrayOfTables(tables) => Node {
            span: span(tables.span()),
            value: Value::Array(tables.iter().map(table).collect()),
        },
        Item::None => Node::bare(Value::Table(Vec::new())),
    }
}

fn table(t: &toml_edit::Table) -> Node {
    let entries = t
        .iter()
        .map(|(key, node)| Entry {
            key: key.to_string(),
            key_span: span(t.key(key).and_then(toml_edit::Key::span)),
            node: item(node),
        })
        .collect();
    Node {
        span: span(t.span()),
        value: Value::Table(entries),
    }
}

fn value(v: &toml_edit::Value) -> Node {
    use toml_edit::Value as V;
    let value = match v {
        V::String(s) => Value::String(s.value().clone()),
        V::Integer(n) => Value::Integer(*n.value()),
        V::Float(n) => Value::Float(*n.value()),
        V::Boolean(b) => Value::Boolean(*b.value()),
        V::Datetime(d) => Value::Datetime(d.value().to_string()),
        V::Array(items) => Value::Array(items.iter().map(value).collect()),
        V::InlineTable(t) => Value::Table(
            t.iter()
                .map(|(key, node)| Entry {
                    key: key.to_string(),
                    key_span: span(t.key(key).and_then(toml_edit::Key::span)),
                    node: value(node),
                })
                .collect(),
        ),
    };
    Node {
        span: span(v.span()),
        value,
    }
}
