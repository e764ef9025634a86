//! The `until` expression language: comparisons of metrics and numbers joined by `&&`, `||`
//! and `!`. `revised.count == 0 || iteration >= 3`.

use std::fmt;

/// A metric as named in an expression: `step.metric`, or `iteration` (step is `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricName {
    pub step: Option<String>,
    pub metric: String,
    /// Byte range within the expression text.
    pub offset: usize,
    pub len: usize,
}

impl fmt::Display for MetricName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.step {
            Some(step) => write!(f, "{step}.{}", self.metric),
            None => f.write_str(&self.metric),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Number(f64),
    Metric(MetricName),
}

impl Operand {
    fn metric(&self) -> Option<&MetricName> {
        match self {
            Operand::Metric(m) => Some(m),
            Operand::Number(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Compare(Operand, Comparison, Operand),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
}

/// A parse error: what went wrong and where in the expression text.
#[derive(Debug, Clone, PartialEq)]
pub struct ExprError {
    pub message: String,
    pub offset: usize,
    pub len: usize,
    /// What to do about it, where the general advice would not fit.
    pub help: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Number(f64),
    Name(String),
    Op(&'static str),
    Open,
    Close,
}

fn tokenize(text: &str) -> Result<Vec<(Token, usize, usize)>, ExprError> {
    let bytes = text.as_bytes();
    let mut tokens = vec![];
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let digit_at = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_digit);
        let number_at = |j: usize| digit_at(j) || (bytes.get(j) == Some(&b'.') && digit_at(j + 1));
        // A number: `3`, `0.5`, `.5`, `-0.01`, `1e-3` (no arithmetic, so `-` is only a sign).
        if number_at(i) || (c == b'-' && number_at(i + 1)) {
            i += 1;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                i += 1;
            }
            let sign = usize::from(matches!(bytes.get(i + 1), Some(b'-' | b'+')));
            if matches!(bytes.get(i), Some(b'e' | b'E')) && digit_at(i + 1 + sign) {
                i += 1 + sign;
                while digit_at(i) {
                    i += 1;
                }
            }
            let number = text[start..i].parse::<f64>().map_err(|_| ExprError {
                message: format!("`{}` is not a number", &text[start..i]),
                offset: start,
                len: i - start,
                help: None,
            })?;
            tokens.push((Token::Number(number), start, i - start));
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || b"_@.-".contains(&bytes[i])) {
                i += 1;
            }
            tokens.push((Token::Name(text[start..i].to_string()), start, i - start));
            continue;
        }
        let two = text.get(i..i + 2).unwrap_or("");
        let op = ["==", "!=", "<=", ">=", "&&", "||"].into_iter().find(|op| *op == two);
        if let Some(op) = op {
            tokens.push((Token::Op(op), start, 2));
            i += 2;
            continue;
        }
        let token = match c {
            b'<' => Token::Op("<"),
            b'>' => Token::Op(">"),
            b'!' => Token::Op("!"),
            b'(' => Token::Open,
            b')' => Token::Close,
            _ => {
                let len = text[i..].chars().next().map_or(1, char::len_utf8);
                return Err(ExprError {
                    message: format!("unexpected `{}`", &text[i..i + len]),
                    offset: i,
                    len,
                    help: None,
                });
            }
        };
        tokens.push((token, start, 1));
        i += 1;
    }
    Ok(tokens)
}

/// How deep `!` and parentheses may nest, and how many `&&` and `||` may join conditions: far
/// beyond any real condition, and well within the stack the recursive parser and evaluator need
/// (a chain of `&&` is a tree as deep as it is long).
const MAX_DEPTH: usize = 64;

struct Parser {
    tokens: Vec<(Token, usize, usize)>,
    position: usize,
    end: usize,
    depth: usize,
    joins: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.position).map(|t| &t.0)
    }

    fn here(&self) -> (usize, usize) {
        self.tokens.get(self.position).map_or((self.end, 0), |t| (t.1, t.2))
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, ExprError> {
        let (offset, len) = self.here();
        Err(ExprError { message: message.into(), offset, len, help: None })
    }

    fn or(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.and()?;
        while self.peek() == Some(&Token::Op("||")) {
            self.join()?;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.unary()?;
        while self.peek() == Some(&Token::Op("&&")) {
            self.join()?;
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    /// Steps over an `&&` or `||`, counting it.
    fn join(&mut self) -> Result<(), ExprError> {
        if self.joins == MAX_DEPTH {
            return self.error(format!("more than {MAX_DEPTH} `&&` and `||` join conditions here"));
        }
        self.joins += 1;
        self.position += 1;
        Ok(())
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        let negated = match self.peek() {
            Some(Token::Op("!")) => true,
            Some(Token::Open) => false,
            _ => return self.comparison(),
        };
        if self.depth == MAX_DEPTH {
            return self.error(format!("`!` and parentheses nest more than {MAX_DEPTH} deep here")).map_err(|e| {
                ExprError {
                    help: Some("take out pairs of `!` (`!!x` is `x`) and parentheses around a single condition"),
                    ..e
                }
            });
        }
        self.position += 1;
        self.depth += 1;
        let inner = if negated { self.unary().map(|e| Expr::Not(Box::new(e))) } else { self.parenthesised() };
        self.depth -= 1;
        inner
    }

    /// What follows an opening parenthesis.
    fn parenthesised(&mut self) -> Result<Expr, ExprError> {
        let inner = self.or()?;
        if self.peek() != Some(&Token::Close) {
            return self.error("expected `)`");
        }
        self.position += 1;
        Ok(inner)
    }

    fn comparison(&mut self) -> Result<Expr, ExprError> {
        let left = self.operand()?;
        let op = match self.peek() {
            Some(Token::Op("==")) => Comparison::Eq,
            Some(Token::Op("!=")) => Comparison::Ne,
            Some(Token::Op("<")) => Comparison::Lt,
            Some(Token::Op("<=")) => Comparison::Le,
            Some(Token::Op(">")) => Comparison::Gt,
            Some(Token::Op(">=")) => Comparison::Ge,
            _ => return self.error("expected a comparison (`==`, `!=`, `<`, `<=`, `>`, `>=`)"),
        };
        self.position += 1;
        let right = self.operand()?;
        Ok(Expr::Compare(left, op, right))
    }

    fn operand(&mut self) -> Result<Operand, ExprError> {
        let Some((token, offset, len)) = self.tokens.get(self.position).cloned() else {
            return self.error("expected a metric or a number");
        };
        self.position += 1;
        match token {
            Token::Number(n) => Ok(Operand::Number(n)),
            Token::Name(name) => {
                let metric = match name.rsplit_once('.') {
                    Some((step, metric)) if !step.is_empty() && !metric.is_empty() => {
                        MetricName { step: Some(step.to_string()), metric: metric.to_string(), offset, len }
                    }
                    None => MetricName { step: None, metric: name, offset, len },
                    Some(_) => {
                        return Err(ExprError {
                            message: format!("`{name}` is not a metric name"),
                            offset,
                            len,
                            help: None,
                        });
                    }
                };
                Ok(Operand::Metric(metric))
            }
            _ => Err(ExprError { message: "expected a metric or a number".into(), offset, len, help: None }),
        }
    }
}

impl Expr {
    pub fn parse(text: &str) -> Result<Expr, ExprError> {
        let tokens = tokenize(text)?;
        if tokens.is_empty() {
            return Err(ExprError {
                message: "the expression is empty".into(),
                offset: 0,
                len: text.len(),
                help: None,
            });
        }
        let mut parser = Parser { tokens, position: 0, end: text.len(), depth: 0, joins: 0 };
        let expr = parser.or()?;
        if parser.position < parser.tokens.len() {
            let (offset, len) = parser.here();
            return Err(match parser.peek() {
                Some(Token::Name(word)) if ["and", "or"].iter().any(|op| word.eq_ignore_ascii_case(op)) => ExprError {
                    message: format!("`{word}` is not an operator here"),
                    offset,
                    len,
                    help: Some("join conditions with `&&` (and) or `||` (or)"),
                },
                _ => ExprError { message: "unexpected text after the expression".into(), offset, len, help: None },
            });
        }
        Ok(expr)
    }

    /// Every metric the expression reads.
    pub fn metrics(&self) -> Vec<&MetricName> {
        self.comparisons().into_iter().flat_map(|(a, b)| [a, b]).filter_map(Operand::metric).collect()
    }

    /// Every metric compared with a number, with that number.
    pub fn metrics_against_numbers(&self) -> Vec<(&MetricName, f64)> {
        let pairs = self.comparisons().into_iter().flat_map(|(a, b)| [(a, b), (b, a)]);
        pairs
            .filter_map(|(a, b)| match (a, b) {
                (Operand::Metric(m), Operand::Number(n)) => Some((m, *n)),
                _ => None,
            })
            .collect()
    }

    /// The operands of every comparison.
    fn comparisons(&self) -> Vec<(&Operand, &Operand)> {
        match self {
            Expr::Compare(a, _, b) => vec![(a, b)],
            Expr::And(a, b) | Expr::Or(a, b) => [a.comparisons(), b.comparisons()].concat(),
            Expr::Not(a) => a.comparisons(),
        }
    }

    /// The expression's value, in Kleene's three-valued logic: `None` when it depends on a metric
    /// that has no value (a step can leave one out: training on no examples has no loss). What is
    /// decided without that metric stays decided: `a.x > 1 || b.y > 1` holds when `a.x` is 2.
    pub fn evaluate(&self, lookup: &dyn Fn(&MetricName) -> Option<f64>) -> Option<bool> {
        let value = |operand: &Operand| match operand {
            Operand::Number(n) => Some(*n),
            Operand::Metric(m) => lookup(m),
        };
        match self {
            Expr::Compare(a, op, b) => {
                let (a, b) = (value(a)?, value(b)?);
                Some(match op {
                    Comparison::Eq => a == b,
                    Comparison::Ne => a != b,
                    Comparison::Lt => a < b,
                    Comparison::Le => a <= b,
                    Comparison::Gt => a > b,
                    Comparison::Ge => a >= b,
                })
            }
            Expr::And(a, b) => match (a.evaluate(lookup), b.evaluate(lookup)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Expr::Or(a, b) => match (a.evaluate(lookup), b.evaluate(lookup)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Expr::Not(a) => a.evaluate(lookup).map(|holds| !holds),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(text: &str, values: &[(&str, f64)]) -> bool {
        let expr = Expr::parse(text).unwrap();
        expr.evaluate(&|m| values.iter().find(|(n, _)| *n == m.to_string()).map(|(_, v)| *v)).unwrap()
    }

    #[test]
    fn evaluates_comparisons_and_logic() {
        assert!(eval("revised.count == 0", &[("revised.count", 0.0)]));
        assert!(!eval("revised.count == 0", &[("revised.count", 3.0)]));
        assert!(eval("scores.pass@1 >= 0.5 && iteration < 3", &[("scores.pass@1", 0.5), ("iteration", 2.0)]));
        assert!(eval("!(a.x > 1) || b.pass-rate != 0", &[("a.x", 5.0), ("b.pass-rate", 0.2)]));
        assert!(!eval("!(a.x > 1) || b.pass-rate != 0", &[("a.x", 5.0), ("b.pass-rate", 0.0)]));
    }

    #[test]
    fn numbers_take_a_sign_an_exponent_and_a_bare_fraction() {
        assert!(eval("gain.delta > -0.01", &[("gain.delta", 0.0)]));
        assert!(!eval("gain.delta>-0.01", &[("gain.delta", -0.5)]));
        assert!(eval("tune.loss < 1e-3", &[("tune.loss", 0.0005)]));
        assert!(!eval("tune.loss < 1E-3", &[("tune.loss", 0.005)]));
        assert!(eval("a.x <= .5 && a.x >= -.5 && a.x == 2.5e-1", &[("a.x", 0.25)]));
        assert_eq!(Expr::parse("a.x > -b.y").unwrap_err().message, "unexpected `-`");
        assert_eq!(Expr::parse("a.x > 1.2.3").unwrap_err().message, "`1.2.3` is not a number");
    }

    #[test]
    fn names_metrics_with_offsets() {
        let expr = Expr::parse("iteration >= 2 || tune.loss < 0.1").unwrap();
        let metrics: Vec<_> = expr.metrics().iter().map(|m| (m.to_string(), m.offset, m.len)).collect();
        assert_eq!(metrics, vec![("iteration".into(), 0, 9), ("tune.loss".into(), 18, 9)]);
    }

    #[test]
    fn errors_point_at_the_problem() {
        let (deep, negations) = (format!("{}a.x > 1{}", "(".repeat(65), ")".repeat(65)), "!".repeat(20_000));
        let chain = vec!["a.x > 1"; 50_000].join(" && ");
        let cases = [
            ("", 0, "the expression is empty"),
            ("a.count", 7, "expected a comparison"),
            ("a.count == ", 11, "expected a metric or a number"),
            ("a.count = 0", 8, "unexpected `=`"),
            ("(a.x > 1", 8, "expected `)`"),
            ("a.x > 1 b.y", 8, "unexpected text after the expression"),
            ("a.x > 1 and b.y < 2", 8, "`and` is not an operator here"),
            // Nesting beyond the limit, which would otherwise overflow the stack.
            (deep.as_str(), 64, "`!` and parentheses nest more than 64"),
            (negations.as_str(), 64, "`!` and parentheses nest more than 64"),
            // A chain would be a tree as deep as it is long.
            (chain.as_str(), 64 * 11 + 8, "more than 64 `&&` and `||`"),
        ];
        for (text, offset, message) in cases {
            let err = Expr::parse(text).unwrap_err();
            assert_eq!(err.offset, offset, "{text}");
            assert!(err.message.starts_with(message), "{text}: {}", err.message);
        }
    }

    #[test]
    fn a_missing_metric_leaves_undecided_only_what_depends_on_it() {
        let with_a = |m: &MetricName| (m.to_string() == "a.x").then_some(2.0);
        let cases = [
            ("a.x == 0", Some(false)),
            ("b.y == 0", None),
            ("!(b.y == 0)", None),
            ("a.x > 1 || b.y > 1", Some(true)),
            ("a.x < 1 || b.y > 1", None),
            ("a.x < 1 && b.y > 1", Some(false)),
            ("a.x > 1 && b.y > 1", None),
            ("!(a.x < 1 && b.y > 1)", Some(true)),
        ];
        for (text, expected) in cases {
            assert_eq!(Expr::parse(text).unwrap().evaluate(&with_a), expected, "{text}");
        }
    }
}
