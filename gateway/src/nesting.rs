//! A bound on how deeply user expressions nest, checked on the text before it is parsed.
//!
//! The SQL parser bounds its own recursion (parentheses, subqueries: DataFusion's
//! `sql_parser.recursion_limit`, 50), but it reads a chain of operators (`1+1+…+1`, `a = 1 OR
//! a = 2 OR …`) in a loop and builds a tree as deep as the chain is long. Everything after it —
//! planning, optimisation, physical expressions, evaluation and even dropping the tree — recurses
//! once per level, with frames of kilobytes: a 64 KiB statement is 32,000 levels and would
//! overflow any thread's stack, which aborts the whole node. So the text is tokenised (a loop,
//! no recursion) and refused with `INVALID_ARGUMENT` when its operators could nest deeper than
//! [`MAX_EXPRESSION_DEPTH`]; the node's threads have stacks sized for that depth
//! ([`THREAD_STACK_BYTES`]).
//!
//! The estimate is an upper bound on the depth of every expression in the text: within one
//! comma-separated item, each operator may add a level, and each parenthesised group adds its
//! own depth plus one. Lists (`IN (…)`, arguments, `CASE` branches, select lists) do not nest.

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::error::{Error, Result};

/// Deepest operator nesting accepted in a statement or filter.
pub const MAX_EXPRESSION_DEPTH: usize = 256;

/// Stack of every thread that plans or evaluates user expressions (gRPC, REST, query threads):
/// room for [`MAX_EXPRESSION_DEPTH`] levels in an unoptimised build, with a wide margin in an
/// optimised one. Only the pages a thread touches are committed.
pub const THREAD_STACK_BYTES: usize = 32 * 1024 * 1024;

#[derive(Default)]
struct Group {
    /// Operators in the current item.
    ops: usize,
    /// Deepest group nested in the current item.
    inner: usize,
    /// Deepest finished item.
    best: usize,
}

impl Group {
    fn end_item(&mut self) {
        self.best = self.best.max(self.ops + self.inner);
        self.ops = 0;
        self.inner = 0;
    }

    fn depth(mut self) -> usize {
        self.end_item();
        self.best + 1
    }
}

/// Keywords that join expressions into a deeper one.
fn is_operator_keyword(k: Keyword) -> bool {
    matches!(
        k,
        Keyword::AND
            | Keyword::OR
            | Keyword::XOR
            | Keyword::NOT
            | Keyword::IS
            | Keyword::IN
            | Keyword::LIKE
            | Keyword::ILIKE
            | Keyword::SIMILAR
            | Keyword::BETWEEN
            | Keyword::COLLATE
            | Keyword::AT
            | Keyword::OVERLAPS
            | Keyword::REGEXP
            | Keyword::RLIKE
            | Keyword::MATCH
            | Keyword::DIV
    )
}

/// Keywords that start a new clause: expressions on either side are separate.
fn is_clause_keyword(k: Keyword) -> bool {
    matches!(
        k,
        Keyword::SELECT
            | Keyword::FROM
            | Keyword::WHERE
            | Keyword::GROUP
            | Keyword::HAVING
            | Keyword::ORDER
            | Keyword::LIMIT
            | Keyword::OFFSET
            | Keyword::UNION
            | Keyword::EXCEPT
            | Keyword::INTERSECT
            | Keyword::JOIN
            | Keyword::ON
            | Keyword::USING
            | Keyword::WINDOW
            | Keyword::QUALIFY
            | Keyword::WITH
            | Keyword::AS
            | Keyword::WHEN
            | Keyword::THEN
            | Keyword::ELSE
            | Keyword::END
    )
}

/// An upper bound on how deeply the expressions of `text` nest, or `None` if it does not
/// tokenise (the parser then says why).
pub fn depth(text: &str) -> Option<usize> {
    let tokens = Tokenizer::new(&GenericDialect {}, text).tokenize().ok()?;
    let mut stack: Vec<Group> = vec![Group::default()];
    let mut deepest = 0usize;
    for token in tokens {
        let top = stack.last_mut()?;
        match token {
            Token::LParen | Token::LBracket | Token::LBrace => stack.push(Group::default()),
            Token::RParen | Token::RBracket | Token::RBrace => {
                let inner = stack.pop().map(Group::depth).unwrap_or(0);
                deepest = deepest.max(inner);
                match stack.last_mut() {
                    Some(parent) => parent.inner = parent.inner.max(inner),
                    // More closing than opening brackets: the parser refuses it.
                    None => stack.push(Group::default()),
                }
            }
            Token::Comma | Token::SemiColon => top.end_item(),
            Token::Word(w) if is_clause_keyword(w.keyword) => top.end_item(),
            Token::Word(w) if is_operator_keyword(w.keyword) => top.ops += 1,
            Token::Word(_)
            | Token::Number(..)
            | Token::Whitespace(_)
            | Token::Period
            | Token::Placeholder(_)
            | Token::EOF => {}
            // Literals of every kind are one token.
            t if is_literal(&t) => {}
            // Every other symbol may be an infix, prefix or postfix operator.
            _ => top.ops += 1,
        }
        if let Some(top) = stack.last() {
            deepest = deepest.max(top.ops + top.inner + stack.len());
        }
    }
    while let Some(g) = stack.pop() {
        deepest = deepest.max(g.depth() + stack.len());
    }
    Some(deepest)
}

fn is_literal(t: &Token) -> bool {
    matches!(
        t,
        Token::Char(_)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedByteStringLiteral(_)
            | Token::TripleDoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedRawStringLiteral(_)
            | Token::DoubleQuotedRawStringLiteral(_)
            | Token::TripleSingleQuotedRawStringLiteral(_)
            | Token::TripleDoubleQuotedRawStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_)
    )
}

/// Refuses `text` (a statement or a filter, named by `what`) if its expressions could nest
/// deeper than [`MAX_EXPRESSION_DEPTH`].
pub fn check(text: &str, what: &str) -> Result<()> {
    match depth(text) {
        Some(d) if d > MAX_EXPRESSION_DEPTH => Err(Error::invalid(
            format!(
                "the {what} nests operators up to {d} levels deep, more than the {MAX_EXPRESSION_DEPTH} the server accepts"
            ),
            "write long chains of OR as IN lists, or split the expression",
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_count_and_lists_do_not() {
        let chain = |n: usize| vec!["1"; n].join(" + ");
        assert!(depth(&format!("SELECT {}", chain(10))).unwrap() >= 10);
        assert!(depth(&format!("SELECT {}", chain(300))).unwrap() > MAX_EXPRESSION_DEPTH);
        let ors = (0..300).map(|i| format!("a = {i}")).collect::<Vec<_>>().join(" OR ");
        assert!(check(&format!("SELECT * FROM t WHERE {ors}"), "statement").is_err());
        // The same 300 values as a list, in a select list, as arguments: shallow.
        let list = (0..3000).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
        let sql = format!("SELECT a + 1, b * 2, coalesce({list}) FROM t WHERE a IN ({list}) AND b > 1");
        assert!(depth(&sql).unwrap() < 10, "{}", depth(&sql).unwrap());
        let cases = (0..500)
            .map(|i| format!("WHEN a = {i} THEN {i}"))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(check(&format!("SELECT CASE {cases} END FROM t"), "statement").is_ok());
    }

    #[test]
    fn parentheses_add_their_depth() {
        let nested = |n: usize| format!("{}1{}", "(".repeat(n), ")".repeat(n));
        assert_eq!(depth(&nested(40)), Some(41));
        let group = |n: usize| format!("({})", vec!["1"; n].join("+"));
        assert!(depth(&format!("{} + {}", group(100), group(100))).unwrap() < MAX_EXPRESSION_DEPTH);
        assert!(depth(&format!("1 + {}", group(300))).unwrap() > MAX_EXPRESSION_DEPTH);
        let chained = (0..150).map(|_| group(2)).collect::<Vec<_>>().join(" + ");
        assert!(depth(&chained).unwrap() < MAX_EXPRESSION_DEPTH);
        let err = check(&format!("SELECT {}", vec!["1"; 32_000].join("+")), "statement").unwrap_err();
        assert_eq!(err.status(), crate::error::StatusClass::InvalidArgument);
        assert!(err.to_string().contains("256"), "{err}");
    }

    #[test]
    fn unbalanced_or_odd_text_does_not_panic() {
        for text in [")))", "(((", "'unterminated", "]]][[", "", ";;;", "$1 + $2"] {
            let _ = depth(text);
        }
    }
}
