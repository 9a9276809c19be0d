//! The README as data, for the tests that hold it to the tree: its fenced blocks, inline code,
//! shell command lines, and the concrete commands each line stands for.

use std::path::PathBuf;

/// The README's text.
pub fn readme() -> String {
    std::fs::read_to_string(crate::repo_root().join("README.md")).expect("README.md is readable")
}

/// The repository's top-level entries (but `target/`), for telling a path from a word.
pub fn top_level() -> Vec<String> {
    let root: PathBuf = crate::repo_root();
    std::fs::read_dir(root)
        .expect("the repository root is readable")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "target")
        .collect()
}

/// The fenced code blocks of `text`, each as (info string, body).
pub fn code_blocks(text: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(info) = line.trim_start().strip_prefix("```") {
            match current.take() {
                Some(block) => blocks.push(block),
                None => current = Some((info.trim().to_string(), String::new())),
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    blocks
}

/// The inline code spans of `text` outside fenced blocks.
pub fn inline_spans(text: &str) -> Vec<String> {
    let mut spans = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let (Some(span), Some(_)) = (parts.next(), parts.next()) {
            spans.push(span.to_string());
        }
    }
    spans
}

/// The shell command lines of the `sh` blocks: continuations joined, comments dropped.
pub fn shell_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for (info, body) in code_blocks(text) {
        if info != "sh" {
            continue;
        }
        let mut joined = String::new();
        for line in body.lines() {
            let line = line.split(" #").next().unwrap_or("").trim_end();
            if let Some(head) = line.strip_suffix('\\') {
                joined.push_str(head);
                joined.push(' ');
            } else {
                joined.push_str(line);
                lines.push(std::mem::take(&mut joined).trim().to_string());
            }
        }
    }
    lines.retain(|l| !l.is_empty());
    lines
}

/// Every concrete command a README line stands for: `[...]` optional parts kept, each
/// alternative of `a | b` taken in turn.
pub fn expand(line: &str) -> Vec<Vec<String>> {
    let words = shlex::split(&line.replace(['[', ']'], "")).expect("README line splits as shell");
    let mut commands = vec![Vec::new()];
    let mut i = 0;
    while i < words.len() {
        if words.get(i + 1).map(String::as_str) == Some("|") {
            let (a, b) = (words[i].clone(), words[i + 2].clone());
            commands = commands
                .into_iter()
                .flat_map(|c| {
                    let mut ca = c.clone();
                    ca.push(a.clone());
                    let mut cb = c;
                    cb.push(b.clone());
                    [ca, cb]
                })
                .collect();
            i += 3;
        } else {
            for c in &mut commands {
                c.push(words[i].clone());
            }
            i += 1;
        }
    }
    commands
}
