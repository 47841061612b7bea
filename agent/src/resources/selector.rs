//! Calico's label selector syntax: `all()`, `has(k)`, `k == 'v'`, `k != 'v'`, `k in {'a','b'}`,
//! `k not in {...}`, `!`, `&&`, `||` and parentheses, evaluated over a label map.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A parsed selector, keeping the text the user wrote for display and round trips.
#[derive(Clone, PartialEq, Eq)]
pub struct Selector {
    source: String,
    expr: Expr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Expr {
    All,
    Has(String),
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// Why a selector could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {input:?} at character {position}: {message}")]
pub struct SelectorError {
    /// The selector as the user wrote it.
    pub input: String,
    /// 1-based character position of the problem.
    pub position: usize,
    /// What was expected there.
    pub message: String,
}

impl Selector {
    /// The selector that matches everything (`all()`), the default for an absent selector.
    pub fn all() -> Self {
        Self { source: "all()".into(), expr: Expr::All }
    }

    /// Parse `input`; an empty or blank string means `all()`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        if input.trim().is_empty() {
            return Ok(Self { source: input.to_string(), expr: Expr::All });
        }
        let mut parser = Parser { input, chars: input.char_indices().collect(), pos: 0 };
        let expr = parser.or()?;
        parser.skip_ws();
        if parser.pos < parser.chars.len() {
            return Err(parser.error("expected `&&`, `||` or the end of the selector"));
        }
        Ok(Self { source: input.to_string(), expr })
    }

    /// Whether the labels satisfy the selector.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.expr.eval(labels)
    }

    /// Whether this is `all()` (or empty), which matches everything.
    pub fn is_all(&self) -> bool {
        self.expr == Expr::All
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl Default for Selector {
    fn default() -> Self {
        Self::all()
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({:?})", self.source)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Selector::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Expr {
    fn eval(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Expr::All => true,
            Expr::Has(k) => labels.contains_key(k),
            Expr::Eq(k, v) => labels.get(k) == Some(v),
            // As in Calico, `k != 'v'` also matches when the label is absent.
            Expr::Ne(k, v) => labels.get(k) != Some(v),
            Expr::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Expr::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Expr::Not(e) => !e.eval(labels),
            Expr::And(a, b) => a.eval(labels) && b.eval(labels),
            Expr::Or(a, b) => a.eval(labels) || b.eval(labels),
        }
    }
}

struct Parser<'a> {
    input: &'a str,
    chars: Vec<(usize, char)>,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, message: &str) -> SelectorError {
        SelectorError { input: self.input.to_string(), position: self.pos + 1, message: message.to_string() }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).map(|&(_, c)| c)
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn rest(&self) -> &str {
        self.chars.get(self.pos).map_or("", |&(i, _)| &self.input[i..])
    }

    /// Consume `token` (after white space) if it is next.
    fn eat(&mut self, token: &str) -> bool {
        self.skip_ws();
        if self.rest().starts_with(token) {
            self.pos += token.chars().count();
            true
        } else {
            false
        }
    }

    /// Consume a keyword only when it is not the start of a longer identifier.
    fn eat_word(&mut self, word: &str) -> bool {
        self.skip_ws();
        let rest = self.rest();
        if rest.starts_with(word) && !rest[word.len()..].starts_with(is_label_char) {
            self.pos += word.chars().count();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &str) -> Result<(), SelectorError> {
        if self.eat(token) { Ok(()) } else { Err(self.error(&format!("expected `{token}`"))) }
    }

    fn or(&mut self) -> Result<Expr, SelectorError> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, SelectorError> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, SelectorError> {
        if self.eat("!") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let inner = self.or()?;
            self.expect(")")?;
            return Ok(inner);
        }
        if self.eat_word("all") {
            self.expect("(")?;
            self.expect(")")?;
            return Ok(Expr::All);
        }
        if self.eat_word("has") {
            self.expect("(")?;
            let key = self.label()?;
            self.expect(")")?;
            return Ok(Expr::Has(key));
        }
        let key = self.label()?;
        if self.eat("==") {
            Ok(Expr::Eq(key, self.string()?))
        } else if self.eat("!=") {
            Ok(Expr::Ne(key, self.string()?))
        } else if self.eat_word("in") {
            Ok(Expr::In(key, self.set()?))
        } else if self.eat_word("not") {
            if !self.eat_word("in") {
                return Err(self.error("expected `in` after `not`"));
            }
            Ok(Expr::NotIn(key, self.set()?))
        } else {
            Err(self.error(&format!("expected `==`, `!=`, `in` or `not in` after label `{key}`")))
        }
    }

    fn label(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let start = self.pos;
        while self.peek().is_some_and(is_label_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("expected a label name, `all()`, `has(...)`, `!` or `(`"));
        }
        Ok(self.chars[start..self.pos].iter().map(|&(_, c)| c).collect())
    }

    fn string(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let quote = match self.peek() {
            Some(q @ ('\'' | '"')) => q,
            _ => return Err(self.error("expected a quoted value such as 'web'")),
        };
        self.pos += 1;
        let start = self.pos;
        while self.peek().is_some_and(|c| c != quote) {
            self.pos += 1;
        }
        if self.peek().is_none() {
            return Err(self.error("unterminated quoted value"));
        }
        let value = self.chars[start..self.pos].iter().map(|&(_, c)| c).collect();
        self.pos += 1;
        Ok(value)
    }

    fn set(&mut self) -> Result<Vec<String>, SelectorError> {
        self.expect("{")?;
        let mut values = Vec::new();
        if self.eat("}") {
            return Ok(values);
        }
        loop {
            values.push(self.string()?);
            if self.eat("}") {
                return Ok(values);
            }
            self.expect(",")?;
        }
    }
}

fn is_label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn evaluates_calico_syntax() {
        let l = labels(&[("zone", "a"), ("tier", "web"), ("kubernetes.io/os", "linux")]);
        for (text, want) in [
            ("all()", true),
            ("", true),
            ("has(zone)", true),
            ("has(rack)", false),
            ("!has(rack)", true),
            ("zone == 'a'", true),
            ("zone == \"b\"", false),
            ("zone != 'b'", true),
            ("rack != 'b'", true),
            ("tier in {'web', 'db'}", true),
            ("tier in {}", false),
            ("tier not in {'web'}", false),
            ("rack not in {'x'}", true),
            ("zone == 'a' && tier == 'db'", false),
            ("zone == 'b' || tier == 'web'", true),
            ("!(zone == 'b' || tier == 'db') && kubernetes.io/os == 'linux'", true),
            ("zone == 'a' || zone == 'b' && tier == 'db'", true),
            ("(zone == 'a' || zone == 'b') && tier == 'db'", false),
            ("inside == 'x' || nothing == 'y'", false),
        ] {
            let sel = Selector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(sel.matches(&l), want, "{text}");
        }
    }

    #[test]
    fn reports_where_parsing_failed() {
        for (text, position, fragment) in [
            ("zone = 'a'", 6, "expected `==`"),
            ("zone == a", 9, "quoted value"),
            ("has(zone", 9, "expected `)`"),
            ("zone == 'a' &&", 15, "label name"),
            ("zone == 'a' zone", 13, "end of the selector"),
            ("zone in {'a' 'b'}", 14, "expected `,`"),
            ("zone == 'a", 11, "unterminated"),
            ("zone not {'a'}", 10, "expected `in`"),
        ] {
            let err = Selector::parse(text).expect_err(text);
            assert_eq!(err.position, position, "{text}: {err}");
            assert!(err.message.contains(fragment), "{text}: {err}");
        }
    }
}
