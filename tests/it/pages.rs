//! The docs' pages (README.md and docs/*.md) and their code blocks: shared by the unit
//! test that parses every command line they show and the tests that run their shell
//! blocks (`tests/it/docs.rs`).

use std::path::Path;

/// README.md and every page under docs/, each with its name, read now.
pub fn pages() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| format!("docs/{}", e.expect("entry").file_name().to_string_lossy()))
        .filter(|name| name.ends_with(".md"))
        .collect();
    names.sort();
    names.insert(0, "README.md".to_owned());
    names
        .into_iter()
        .map(|name| {
            let text = std::fs::read_to_string(root.join(&name)).expect("page");
            (name, text)
        })
        .collect()
}

/// A fenced code block of a page.
#[derive(Debug)]
pub struct CodeBlock {
    /// The page's line of its opening fence.
    pub line: usize,
    /// Its language, the first word after the opening fence: `sh`, `yaml`, or nothing.
    pub info: String,
    /// Its lines, continued lines (`\`) joined, comments and blank lines left out.
    pub lines: Vec<String>,
}

/// The code blocks of `page`, and its prose (the lines outside them, joined by spaces).
pub fn code_blocks(page: &str) -> (Vec<CodeBlock>, String) {
    let mut blocks = Vec::new();
    let mut prose = String::new();
    let mut current: Option<CodeBlock> = None;
    let mut pending = String::new();
    for (n, line) in page.lines().enumerate() {
        if let Some(info) = line.trim_start().strip_prefix("```") {
            match current.take() {
                Some(block) => blocks.push(block),
                None => {
                    current = Some(CodeBlock {
                        line: n + 1,
                        info: info
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned(),
                        lines: Vec::new(),
                    });
                }
            }
            continue;
        }
        let Some(block) = current.as_mut() else {
            prose.push_str(line);
            prose.push(' ');
            continue;
        };
        let code = uncommented(line);
        match code.strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(code);
                let joined = std::mem::take(&mut pending).trim().to_owned();
                if !joined.is_empty() && !joined.starts_with('#') {
                    block.lines.push(joined);
                }
            }
        }
    }
    (blocks, prose)
}

/// `line` without its shell comment: from the first ` #` outside quotes (a character
/// after `\` outside single quotes is taken as it is).
fn uncommented(line: &str) -> &str {
    let mut quote = None;
    let mut previous = ' ';
    let mut chars = line.char_indices();
    while let Some((i, c)) = chars.next() {
        match (quote, c) {
            (None | Some('"'), '\\') => {
                chars.next();
                previous = 'x';
                continue;
            }
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if previous.is_whitespace() => return line[..i].trim_end(),
            _ => {}
        }
        previous = c;
    }
    line.trim_end()
}
