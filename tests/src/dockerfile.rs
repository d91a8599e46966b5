//! deploy/Dockerfile read as data: its stages and what each sets. The deploy
//! tests check it against the repository, `cargo xtask image` takes the final
//! stage's user, entrypoint, command and files from it, and the container
//! tests compare the image built here with it: one description of the image.

/// One `COPY`: `from` is the stage it copies from (`--from=`), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub from: Option<String>,
    pub srcs: Vec<String>,
    pub dest: String,
}

/// One `FROM` and the instructions up to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stage {
    pub base: String,
    /// The `AS` name, empty when none.
    pub name: String,
    pub copies: Vec<Copy>,
    /// Every `RUN`'s arguments, joined.
    pub runs: String,
    pub user: Option<String>,
    /// As written: a JSON array in exec form.
    pub entrypoint: Option<String>,
    pub cmd: Option<String>,
}

impl Stage {
    /// The entrypoint in exec form, parsed.
    pub fn entrypoint_argv(&self) -> Result<Vec<String>, String> {
        exec_form("ENTRYPOINT", self.entrypoint.as_deref())
    }

    pub fn cmd_argv(&self) -> Result<Vec<String>, String> {
        exec_form("CMD", self.cmd.as_deref())
    }
}

fn exec_form(what: &str, v: Option<&str>) -> Result<Vec<String>, String> {
    let v = v.ok_or_else(|| format!("the final stage has no {what}"))?;
    serde_json::from_str(v)
        .map_err(|e| format!("{what} {v}: not the exec form (a JSON array): {e}"))
}

/// Parses a Dockerfile: instructions with continuation lines joined and
/// comments dropped. Instructions other than those a two-stage build uses
/// are refused, so nothing in it goes unchecked.
pub fn parse(text: &str) -> Result<Vec<Stage>, String> {
    let mut stages: Vec<Stage> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let t = line.trim();
        if pending.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(t);
        let (op, args) = pending.split_once(' ').unwrap_or((&pending, ""));
        instruction(&mut stages, &op.to_ascii_uppercase(), args.trim())?;
        pending.clear();
    }
    Ok(stages)
}

fn instruction(stages: &mut Vec<Stage>, op: &str, args: &str) -> Result<(), String> {
    if op == "FROM" {
        let w: Vec<&str> = args.split_whitespace().collect();
        let name = match w.as_slice() {
            [_, kw, name] if kw.eq_ignore_ascii_case("as") => name.to_string(),
            [_] => String::new(),
            _ => return Err(format!("FROM {args}: expected `FROM image [AS name]`")),
        };
        stages.push(Stage {
            base: w[0].to_string(),
            name,
            ..Stage::default()
        });
        return Ok(());
    }
    let Some(stage) = stages.last_mut() else {
        return Err(format!("{op} before any FROM"));
    };
    match op {
        "COPY" => {
            let w: Vec<&str> = args.split_whitespace().collect();
            let from = w
                .iter()
                .find_map(|a| a.strip_prefix("--from="))
                .map(str::to_string);
            let paths: Vec<String> = w
                .iter()
                .filter(|a| !a.starts_with("--"))
                .map(|a| a.to_string())
                .collect();
            let (dest, srcs) = paths
                .split_last()
                .ok_or_else(|| format!("COPY {args}: no destination"))?;
            stage.copies.push(Copy {
                from,
                srcs: srcs.to_vec(),
                dest: dest.clone(),
            });
        }
        "RUN" => stage.runs.push_str(args),
        "USER" => stage.user = Some(args.to_string()),
        "ENTRYPOINT" => stage.entrypoint = Some(args.to_string()),
        "CMD" => stage.cmd = Some(args.to_string()),
        "WORKDIR" | "ARG" | "ENV" | "LABEL" => {}
        other => return Err(format!("unexpected instruction {other}")),
    }
    Ok(())
}
