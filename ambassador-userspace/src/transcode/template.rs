//! `google.api.http` path templates (`/v1/{name=shelves/*}/books/{book_id}:publish`):
//! parsed once at load, matched per request, the variables' values
//! %-decoded. Grammar (google/api/http.proto): segments of literals, `*`
//! (one segment), `**` (the rest, last only) and `{field.path[=segments]}`,
//! then an optional `:verb`.

/// A template's segment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Literal(String),
    /// `*`: any one segment.
    One,
    /// `**`: every segment left (zero or more).
    Rest,
}

/// A variable: the field it sets and the segments it spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Var {
    pub field: Vec<String>,
    start: usize,
    /// Exclusive; spans to the path's end where the template ends in `**`.
    end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    segs: Vec<Seg>,
    verb: Option<String>,
    vars: Vec<Var>,
}

impl Template {
    pub fn parse(t: &str) -> Result<Template, String> {
        let bad = |why: &str| format!("path template `{t}`: {why}");
        let rest = t
            .strip_prefix('/')
            .ok_or_else(|| bad("must start with /"))?;
        // The verb is after the last segment: a `:` outside braces there.
        let (body, verb) = split_verb(rest);
        let mut segs = Vec::new();
        let mut vars = Vec::new();
        let mut chars = body;
        while !chars.is_empty() {
            if let Some(after) = chars.strip_prefix('{') {
                let close = after.find('}').ok_or_else(|| bad("an unclosed {"))?;
                let (name, pattern) = match after[..close].split_once('=') {
                    Some((n, p)) => (n, p),
                    None => (&after[..close], "*"),
                };
                let field: Vec<String> = name.split('.').map(str::to_string).collect();
                if field.iter().any(|f| !ident(f)) {
                    return Err(bad("a variable names no field"));
                }
                let start = segs.len();
                for p in pattern.split('/') {
                    segs.push(segment(p).ok_or_else(|| bad("a bad segment in a variable"))?);
                }
                vars.push(Var {
                    field,
                    start,
                    end: segs.len(),
                });
                chars = &after[close + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let s = &chars[..end];
                if s.contains(['{', '}']) {
                    return Err(bad("a variable must be a whole segment"));
                }
                segs.push(segment(s).ok_or_else(|| bad("an empty segment"))?);
                chars = &chars[end..];
            }
            chars = match chars.strip_prefix('/') {
                Some("") => return Err(bad("a trailing /")),
                Some(r) => r,
                None if chars.is_empty() => chars,
                None => return Err(bad("a variable must be a whole segment")),
            };
        }
        if let Some(i) = segs.iter().position(|s| *s == Seg::Rest)
            && i + 1 != segs.len()
        {
            return Err(bad("** only as the last segment"));
        }
        Ok(Template {
            source: t.to_string(),
            segs,
            verb: verb.map(str::to_string),
            vars,
        })
    }

    /// Literal segments: the more, the more specific (tried first).
    pub fn literals(&self) -> usize {
        self.segs
            .iter()
            .filter(|s| matches!(s, Seg::Literal(_)))
            .count()
    }

    /// The variables' values if `path` matches (without its query).
    pub fn matches(&self, path: &str) -> Option<Vec<(&Var, String)>> {
        let rest = path.strip_prefix('/')?;
        let rest = match &self.verb {
            Some(v) => rest.strip_suffix(v.as_str())?.strip_suffix(':')?,
            None => rest,
        };
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let open = self.segs.last() == Some(&Seg::Rest);
        let fixed = self.segs.len() - usize::from(open);
        if parts.len() < fixed || (!open && parts.len() != fixed) {
            return None;
        }
        for (s, p) in self.segs.iter().zip(&parts) {
            match s {
                Seg::Literal(l) if l != p => return None,
                Seg::One if p.is_empty() => return None,
                _ => {}
            }
        }
        let values = self
            .vars
            .iter()
            .map(|v| {
                let end = if open && v.end == self.segs.len() {
                    parts.len()
                } else {
                    v.end
                };
                let joined: Vec<String> = parts[v.start..end].iter().map(|p| decode(p)).collect();
                (v, joined.join("/"))
            })
            .collect();
        Some(values)
    }

    /// The fields its variables set.
    pub fn fields(&self) -> impl Iterator<Item = &[String]> {
        self.vars.iter().map(|v| v.field.as_slice())
    }
}

impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

/// The body and the `:verb` after the last segment (a `:` with no `/` or
/// `}` after it).
fn split_verb(rest: &str) -> (&str, Option<&str>) {
    match rest.rfind(':') {
        Some(i) if !rest[i..].contains(['/', '}']) => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    }
}

fn segment(s: &str) -> Option<Seg> {
    match s {
        "" => None,
        "*" => Some(Seg::One),
        "**" => Some(Seg::Rest),
        l => Some(Seg::Literal(l.to_string())),
    }
}

fn ident(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// `%XX` decoded; invalid escapes and non-UTF-8 kept as they came.
pub fn decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        match (b[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, ..) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        let t = Template::parse(t).unwrap();
        t.matches(path).map(|v| {
            v.into_iter()
                .map(|(var, val)| (var.field.join("."), val))
                .collect()
        })
    }

    fn pairs(p: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            p.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
    }

    #[test]
    fn matching_and_variables() {
        type Case<'a> = (&'a str, &'a str, Option<Vec<(String, String)>>);
        let cases: Vec<Case> = vec![
            ("/v1/books", "/v1/books", pairs(&[])),
            ("/v1/books", "/v1/books/1", None),
            ("/v1/books/{id}", "/v1/books/42", pairs(&[("id", "42")])),
            ("/v1/books/{id}", "/v1/books/", None),
            ("/v1/books/{id}", "/v1/books/a%20b", pairs(&[("id", "a b")])),
            (
                "/v1/{name=shelves/*/books/*}",
                "/v1/shelves/s1/books/b2",
                pairs(&[("name", "shelves/s1/books/b2")]),
            ),
            (
                "/v1/{name=shelves/*}/books",
                "/v1/shelves/s1/books",
                pairs(&[("name", "shelves/s1")]),
            ),
            ("/v1/{book.id}", "/v1/7", pairs(&[("book.id", "7")])),
            (
                "/files/{path=**}",
                "/files/a/b/c",
                pairs(&[("path", "a/b/c")]),
            ),
            ("/files/{path=**}", "/files", pairs(&[("path", "")])),
            (
                "/v1/books/{id}:publish",
                "/v1/books/9:publish",
                pairs(&[("id", "9")]),
            ),
            ("/v1/books/{id}:publish", "/v1/books/9", None),
            ("/v1/*/x", "/v1/anything/x", pairs(&[])),
        ];
        for (t, path, want) in cases {
            assert_eq!(vars(t, path), want, "{t} {path}");
        }
    }

    #[test]
    fn bad_templates_are_named() {
        for (t, why) in [
            ("v1/books", "must start with /"),
            ("/v1/{id", "unclosed"),
            ("/v1/**/x", "** only as the last"),
            ("/v1/{1id}", "names no field"),
            ("/v1//x", "empty segment"),
            ("/v1/x/", "trailing /"),
            ("/v1/a{id}", "whole segment"),
        ] {
            let e = Template::parse(t).unwrap_err();
            assert!(e.contains(why), "{t}: {e}");
        }
        assert_eq!(Template::parse("/v1/{a}/b/c").unwrap().literals(), 3);
    }
}
