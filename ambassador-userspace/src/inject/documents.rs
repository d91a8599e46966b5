//! Splitting the input into YAML documents at their markers, as text, so
//! untouched documents pass through byte for byte.

/// One YAML document of the input, as text.
pub struct Document<'a> {
    /// The `---` line that opened it (empty for the first, unmarked one).
    pub marker: &'a str,
    pub body: &'a str,
    /// 1-based line of the body's first line in the input.
    pub line: usize,
}

/// A `---` line with nothing after it but a comment: a document marker that
/// carries no content of its own.
pub fn is_bare_marker(line: &str) -> Option<bool> {
    let rest = line.strip_prefix("---")?;
    let rest = rest.trim_end_matches(['\n', '\r']);
    if rest.is_empty()
        || rest.starts_with([' ', '\t']) && {
            let t = rest.trim_start();
            t.is_empty() || t.starts_with('#')
        }
    {
        Some(true)
    } else if rest.starts_with([' ', '\t']) {
        Some(false)
    } else {
        None
    }
}

/// Splits a YAML stream at its document markers. YAML forbids a `---` at the
/// start of a line inside any scalar, so the split is exact.
pub fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let (mut marker, mut start, mut start_line) = ("", 0, 1);
    let mut pos = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if let Some(bare) = is_bare_marker(line) {
            if pos > start || !marker.is_empty() || !docs.is_empty() {
                docs.push(Document {
                    marker,
                    body: &text[start..pos],
                    line: start_line,
                });
            }
            if bare {
                marker = &text[pos..pos + line.len()];
                start = pos + line.len();
                start_line = i + 2;
            } else {
                // `--- {kind: ...}`: the content starts on the marker line.
                marker = "";
                start = pos;
                start_line = i + 1;
            }
        }
        pos += line.len();
    }
    if pos > start || !marker.is_empty() || docs.is_empty() {
        docs.push(Document {
            marker,
            body: &text[start..],
            line: start_line,
        });
    }
    docs
}
