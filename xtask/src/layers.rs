//! The userspace crate's module graph must have no cycle: no module imports
//! from a module that imports it (issue "one way down the stack"). Checked
//! by a test of this crate, which `cargo xtask test` runs, so it stays true.
//!
//! Nodes are modules (`http`, `http::upstream`, ...), one per file; an edge
//! A -> B is a path in A's file that names B or something in it
//! (`crate::b::..`, `super::..`, `self::b::..`, or a child `b::..` that A
//! declares). Paths inside `#[cfg(test)]` modules are not counted: a test
//! may use anything.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// The module graph of the crate whose `src` is `src`.
pub fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let files = rust_files(src);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let me = module_of(src, f);
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let text = without_tests(&text);
        for path in paths(&text) {
            // A child naming its parent (or an ancestor) is an edge too.
            if let Some(target) = resolve(&me, &path, &modules)
                && target != me
            {
                edges.entry(me.clone()).or_default().insert(target);
            }
        }
        edges.entry(me).or_default();
    }
    edges
}

/// Every cycle's modules, one list per cycle found (empty: none).
pub fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Tarjan's strongly connected components: a component of more than one
    // module is a circle of imports.
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g: graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// `src/http/upstream.rs` -> `http::upstream`; `src/http/mod.rs` -> `http`;
/// `lib.rs` and `main.rs` are the roots `crate` and `main`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap_or(file).with_extension("");
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [one] if one == "lib" => "crate".into(),
        [one] if one == "main" => "main".into(),
        [.., last] if last == "mod" => parts[..parts.len() - 1].join("::"),
        _ => parts.join("::"),
    }
}

/// The text with every `#[cfg(test)]` item (the `mod tests { .. }` block
/// that follows it) cut out.
fn without_tests(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let Some(open) = after.find('{') else {
            return out;
        };
        // A one-line item (`#[cfg(test)] use ...;`) ends at its `;`.
        if let Some(semi) = after.find(';')
            && semi < open
        {
            rest = &after[semi + 1..];
            continue;
        }
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Every path in the text that starts with `crate::`, `super::` or
/// `self::`, or with a plain name followed by `::` (a child module's), as
/// its segments; `use a::{b, c::d}` groups give one path per leaf.
fn paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let code = blank_literals(text);
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let boundary = i == 0 || !bytes[i - 1].is_ascii_alphanumeric() && bytes[i - 1] != b'_';
        if boundary && (c.is_ascii_alphabetic() || c == b'_') {
            let start = i;
            let mut segs = Vec::new();
            let mut j = i;
            loop {
                let s = j;
                while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
                    j += 1;
                }
                segs.push(code[s..j].to_string());
                if code[j..].starts_with("::") && j + 2 < bytes.len() {
                    let n = bytes[j + 2];
                    if n.is_ascii_alphabetic() || n == b'_' {
                        j += 2;
                        continue;
                    }
                    if n == b'{' {
                        // A group: each leaf's path, prefixed.
                        let close = matching(&code, j + 2);
                        for leaf in split_group(&code[j + 3..close]) {
                            let mut p = segs.clone();
                            p.extend(leaf.split("::").map(|s| s.trim().to_string()));
                            out.push(p);
                        }
                        j = close;
                    }
                }
                break;
            }
            if segs.len() > 1 {
                out.push(segs);
            }
            i = j.max(start + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// The text with comments and the insides of string and char literals
/// blanked (a `::` in a message is no path).
fn blank_literals(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                out.push('"');
                let mut escaped = false;
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                    }
                    if !escaped && c == '"' {
                        break;
                    }
                    escaped = !escaped && c == '\\';
                }
                out.push('"');
            }
            // A char literal ('"', '{', '\''); a lifetime ('a) is left as it is.
            '\'' => {
                let mut ahead = chars.clone();
                let literal = matches!(
                    (ahead.next(), ahead.next()),
                    (Some('\\'), _) | (Some(_), Some('\''))
                );
                out.push('\'');
                if literal {
                    let mut escaped = false;
                    for c in chars.by_ref() {
                        if !escaped && c == '\'' {
                            break;
                        }
                        escaped = !escaped && c == '\\';
                    }
                    out.push('\'');
                }
            }
            _ => out.push(c),
        }
    }
    out
}

fn matching(code: &str, open: usize) -> usize {
    let mut depth = 0;
    for (i, c) in code[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + i;
                }
            }
            _ => {}
        }
    }
    code.len()
}

/// `a, b::{c, d}, e as f` -> `a`, `b::c`, `b::d`, `e`.
fn split_group(group: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    let push = |cur: &mut String, out: &mut Vec<String>| {
        let item = cur.split(" as ").next().unwrap_or("").trim().to_string();
        if let Some((prefix, inner)) = item.split_once("::{") {
            let inner = inner.trim_end_matches('}');
            for leaf in split_group(inner) {
                out.push(format!("{prefix}::{leaf}"));
            }
        } else if !item.is_empty() && item != "self" {
            out.push(item);
        }
        cur.clear();
    };
    for c in group.chars() {
        match c {
            '{' => {
                depth += 1;
                cur.push(c);
            }
            '}' => {
                depth -= 1;
                cur.push(c);
            }
            ',' if depth == 0 => push(&mut cur, &mut out),
            _ => cur.push(c),
        }
    }
    push(&mut cur, &mut out);
    out
}

/// The module a path names, from inside `me`: the longest module prefix.
fn resolve(me: &str, path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    let mut abs: Vec<String> = match path.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        Some("super") => {
            let mut base: Vec<String> = if me == "crate" {
                Vec::new()
            } else {
                me.split("::").map(str::to_string).collect()
            };
            let mut p = path;
            while p.first().map(String::as_str) == Some("super") {
                base.pop();
                p = &p[1..];
            }
            base.extend(p.iter().cloned());
            return longest(base, modules);
        }
        Some("self") => {
            let mut base: Vec<String> = if me == "crate" {
                Vec::new()
            } else {
                me.split("::").map(str::to_string).collect()
            };
            base.extend(path[1..].iter().cloned());
            return longest(base, modules);
        }
        Some(first) => {
            // A child module declared here (`upstream::X` in `http`).
            let child = if me == "crate" {
                first.to_string()
            } else {
                format!("{me}::{first}")
            };
            if !modules.contains(&child) {
                return None;
            }
            let mut base: Vec<String> = if me == "crate" {
                Vec::new()
            } else {
                me.split("::").map(str::to_string).collect()
            };
            base.extend(path.iter().cloned());
            return longest(base, modules);
        }
        None => return None,
    };
    abs.extend(path[1..].iter().cloned());
    longest(abs, modules)
}

fn longest(mut segs: Vec<String>, modules: &BTreeSet<String>) -> Option<String> {
    while !segs.is_empty() {
        let m = segs.join("::");
        if modules.contains(&m) {
            return Some(m);
        }
        segs.pop();
    }
    None
}

/// Past this, a file says at its top why it is long (a line starting
/// `//! Long:`), and a function is split into steps.
pub const LONG_FILE: usize = 600;
pub const LONG_FN: usize = 120;

/// A file and its lines.
type LongFile = (String, usize);
/// A file, a function in it and its lines.
type LongFn = (String, String, usize);

/// Files over [`LONG_FILE`] with no reason given, and functions over
/// [`LONG_FN`] outside tests.
pub fn too_long(src: &Path) -> (Vec<LongFile>, Vec<LongFn>) {
    let (mut files, mut fns) = (Vec::new(), Vec::new());
    for f in rust_files(src) {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let name = f.strip_prefix(src).unwrap_or(&f).display().to_string();
        let lines = text.lines().count();
        if lines > LONG_FILE && !text.lines().any(|l| l.starts_with("//! Long:")) {
            files.push((name.clone(), lines));
        }
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        for (func, n) in functions(&without_tests(&text)) {
            if n > LONG_FN {
                fns.push((name.clone(), func, n));
            }
        }
    }
    (files, fns)
}

/// Each `fn` with a body in the text, with its length in lines.
fn functions(text: &str) -> Vec<(String, usize)> {
    let code = blank_literals(text);
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(name) = fn_name(lines[i]) else {
            i += 1;
            continue;
        };
        let (mut depth, mut opened, mut j) = (0i32, false, i);
        'scan: while j < lines.len() {
            for c in lines[j].chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened => break 'scan,
                    _ => {}
                }
                if opened && depth == 0 {
                    break 'scan;
                }
            }
            j += 1;
        }
        if opened {
            out.push((name, j - i + 1));
            i = j + 1;
        } else {
            i += 1;
        }
    }
    out
}

fn fn_name(line: &str) -> Option<String> {
    let t = line.trim_start();
    let t = t
        .strip_prefix("pub(crate) ")
        .or_else(|| t.strip_prefix("pub(super) "))
        .or_else(|| t.strip_prefix("pub "))
        .unwrap_or(t);
    let t = t.strip_prefix("async ").unwrap_or(t);
    let rest = t.strip_prefix("fn ")?;
    let end = rest.find(|c: char| !c.is_alphanumeric() && c != '_')?;
    Some(rest[..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_or_function_of_the_userspace_crate_is_too_long_to_read() {
        let src = crate::root().join("ambassador-userspace/src");
        let (files, fns) = too_long(&src);
        assert!(
            files.is_empty() && fns.is_empty(),
            "files over {LONG_FILE} lines without a `//! Long:` reason: {files:?}; \
             functions over {LONG_FN} lines: {fns:?}"
        );
        assert_eq!(
            functions("fn a() {\n    x;\n}\nfn b();\n"),
            [("a".to_string(), 3)]
        );
    }

    #[test]
    fn paths_are_found_in_uses_groups_and_code() {
        let p = paths("use crate::{a::b, c::{d, e as f}};\nfn x() { super::g::h(); http::y(); }\n");
        let flat: Vec<String> = p.iter().map(|s| s.join("::")).collect();
        for want in [
            "crate::a::b",
            "crate::c::d",
            "crate::c::e",
            "super::g::h",
            "http::y",
        ] {
            assert!(flat.contains(&want.to_string()), "{want} in {flat:?}");
        }
        assert!(!without_tests("a\n#[cfg(test)]\nmod tests { crate::x::y }\nb").contains("x::y"));
    }

    #[test]
    fn char_literals_do_not_open_strings_or_blocks() {
        let text = "fn f<'a>(x: &'a str) {\n    let q = ['\"', '{', '\\''];\n}\nfn g() {\n}\n";
        assert_eq!(
            functions(text),
            vec![("f".to_string(), 3), ("g".to_string(), 2)]
        );
    }

    #[test]
    fn a_circle_is_found() {
        let mut g = BTreeMap::new();
        g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
        g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
        g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
        assert_eq!(cycles(&g), vec![vec!["a".to_string(), "b".to_string()]]);
    }

    #[test]
    fn the_userspace_crate_has_no_import_circle() {
        let src = crate::root().join("ambassador-userspace/src");
        let g = graph(&src);
        assert!(g.len() > 20, "{g:?}");
        let found = cycles(&g);
        assert!(
            found.is_empty(),
            "modules that import each other (directly or round a circle): {found:#?}"
        );
    }
}
