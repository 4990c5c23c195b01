//! The module graph as a rule CI checks (STYLE.md "The graph is a rule CI checks").
//!
//! Owns: reading the allow-list table from `src/lib.rs`'s doc comment (section "Module graph"),
//! scanning every `src/**/*.rs` of the library for module edges and I/O, and failing on
//! * an edge the table does not allow (`use crate::a::b`, `crate::a::b::` paths in code,
//!   `super::`/`self::` and child-module paths resolved to the module they name);
//! * a **pure** module that uses I/O (`mio`, `std::fs`, `std::thread`, socket types, `libc`,
//!   `Instant::now`/`SystemTime::now`, `unsafe`) or imports a module that is not pure;
//! * an I/O module using a kind of I/O its row does not name;
//! * a cycle between top-level modules, or between the rows of the table.
//!
//! `#[cfg(test)]` items (test modules, test-only functions) and comments are ignored, as are
//! string literals. `src/main.rs` is its own crate (nothing can import it) and is not scanned.
//!
//! Must never: depend on the crate under test (it reads source text only), or need a tool
//! outside `cargo test`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A kind of I/O a row may name after `io:`.
const CAPS: &[(&str, &[&str])] = &[
    ("mio", &["mio::"]),
    ("fs", &["std::fs", "std::os::unix::fs"]),
    ("thread", &["std::thread"]),
    ("net", &["TcpStream", "TcpListener", "UdpSocket"]),
    ("clock", &["Instant::now", "SystemTime::now"]),
    ("libc", &["libc::"]),
    // `unsafe` blocks and `allow(unsafe_code)`.
    ("unsafe", &["unsafe"]),
];

/// One row of the table.
#[derive(Debug, Clone)]
struct Row {
    /// `None` for a pure module, else the I/O it may use.
    io: Option<BTreeSet<String>>,
    /// Rows this one may import (a row also allows the rows below it: `dns` allows `dns::wire`).
    may_use: BTreeSet<String>,
}

/// The allow-list: module path (`spool::format`) -> row.
#[derive(Debug, Default)]
struct Table {
    rows: BTreeMap<String, Row>,
    /// Edges allowed to close a cycle (the "cycle" note column), `from -> to` between rows.
    cycle_ok: BTreeSet<(String, String)>,
}

impl Table {
    /// Parses the markdown table under `# Module graph` in `//!` lines:
    /// `| module | pure / io: cap, cap | may use: a, b | notes |`. A note `allow-cycle: x` lets
    /// this row's edge to `x` close a cycle (for a cycle a TODO names).
    fn parse(lib_rs: &str) -> Result<Table, String> {
        let mut table = Table::default();
        let mut in_section = false;
        for line in lib_rs.lines() {
            let Some(doc) = line.trim_start().strip_prefix("//!") else { continue };
            let doc = doc.trim();
            if let Some(h) = doc.strip_prefix('#') {
                in_section = h.trim_start_matches('#').trim() == "Module graph";
                continue;
            }
            if !in_section || !doc.starts_with('|') {
                continue;
            }
            let cells: Vec<&str> = doc.trim_matches('|').split('|').map(str::trim).collect();
            if cells.len() < 3 || cells[0] == "module" || cells[0].starts_with('-') {
                continue;
            }
            let name = clean(cells[0]);
            let io = match cells[1] {
                "pure" => None,
                k => {
                    let caps = k.strip_prefix("io").ok_or_else(|| format!("{name}: kind {k:?} is not pure or io"))?;
                    let caps: BTreeSet<String> =
                        caps.trim_start_matches(':').split(',').map(clean).filter(|c| !c.is_empty()).collect();
                    for c in &caps {
                        if !CAPS.iter().any(|(n, _)| n == c) {
                            return Err(format!("{name}: unknown I/O kind {c:?}"));
                        }
                    }
                    Some(caps)
                }
            };
            let may_use = list(cells[2]);
            if let Some(notes) = cells.get(3) {
                // `allow-cycle: `a`, `b` (why)`: the backticked names right after the marker.
                if let Some(at) = notes.find("allow-cycle:") {
                    let mut rest = &notes[at + "allow-cycle:".len()..];
                    while let Some(r) = rest.trim_start().strip_prefix('`') {
                        let Some(end) = r.find('`') else { break };
                        table.cycle_ok.insert((name.clone(), r[..end].to_owned()));
                        rest = r[end + 1..].trim_start();
                        match rest.strip_prefix(',') {
                            Some(r) => rest = r,
                            None => break,
                        }
                    }
                }
            }
            if table.rows.insert(name.clone(), Row { io, may_use }).is_some() {
                return Err(format!("{name}: listed twice"));
            }
        }
        if table.rows.is_empty() {
            return Err("no `# Module graph` table found in src/lib.rs".into());
        }
        for (name, row) in &table.rows {
            for u in &row.may_use {
                if !table.rows.contains_key(u) {
                    return Err(format!("{name}: may use {u:?}, which is not a row"));
                }
            }
        }
        for (name, to) in &table.cycle_ok {
            if !table.rows[name].may_use.contains(to) {
                return Err(format!("{name}: allow-cycle {to:?} is not in its \"may use\""));
            }
        }
        Ok(table)
    }

    /// The row a module path falls in: the longest row that is the path or a parent of it.
    fn row_of(&self, module: &str) -> Option<&str> {
        let mut m = module;
        loop {
            if let Some((k, _)) = self.rows.get_key_value(m) {
                return Some(k);
            }
            m = &m[..m.rfind("::")?];
        }
    }

    /// True when `from` may import `to` (both rows). A module may always use the rows inside it
    /// and the rows it is inside (`super::SpoolError`); siblings and others must be listed.
    fn allows(&self, from: &str, to: &str) -> bool {
        from == to
            || is_under(to, from)
            || is_under(from, to)
            || self.rows[from].may_use.iter().any(|u| to == u || is_under(to, u))
    }
}

/// True when `m` is strictly inside module `parent`.
fn is_under(m: &str, parent: &str) -> bool {
    m.len() > parent.len() && m.starts_with(parent) && m[parent.len()..].starts_with("::")
}

fn clean(s: &str) -> String {
    s.trim().trim_matches('`').trim().to_owned()
}

fn list(s: &str) -> BTreeSet<String> {
    s.split(',').map(clean).filter(|c| !c.is_empty() && c != "-" && c != "—").collect()
}

/// One finding in a file: a line number and what was found.
#[derive(Debug)]
enum Fact {
    /// An edge to a module path (resolved, without `crate::`).
    Uses(String),
    /// A use of the I/O kind named.
    Io(&'static str),
    /// `pub use` makes `name` (a full path) stand for `target`.
    ReExport { name: String, target: String },
    /// `#[cfg(test)] mod name;`: the file module `name` (a full path) is test code.
    TestMod(String),
}

/// Blanks comments and the contents of string and char literals (keeping line breaks), so the
/// scan sees code only.
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if c == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) && !ident_before(b, i) {
            // Raw string r"..." / r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            out.resize(out.len() + (j + 1 - i), b' ');
            i = j + 1;
            while i < b.len() {
                if b[i] == b'"' && b[i + 1..].iter().take(hashes).filter(|&&h| h == b'#').count() == hashes {
                    out.resize(out.len() + 1 + hashes, b' ');
                    i += 1 + hashes;
                    break;
                }
                blank(&mut out, b[i]);
                i += 1;
            }
        } else if c == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    out.push(b' ');
                    i += 1;
                }
                if i < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): only the former is blanked.
            let end = if b.get(i + 1) == Some(&b'\\') {
                b.get(i + 3..).and_then(|r| r.iter().position(|&x| x == b'\'')).map(|p| i + 3 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                std::str::from_utf8(&b[i + 1..])
                    .ok()
                    .and_then(|s| s.chars().next())
                    .filter(|ch| ch.len_utf8() > 1 && b.get(i + 1 + ch.len_utf8()) == Some(&b'\''))
                    .map(|ch| i + 1 + ch.len_utf8())
            };
            match end {
                Some(e) => {
                    out.resize(out.len() + (e + 1 - i), b' ');
                    i = e + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    // Multi-byte characters outside literals were copied whole, so this is still UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

fn ident_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Scans one file of module `module` (`spool::segment`; `""` for the crate root) whose child
/// modules are `children`, returning (line, fact) pairs for code outside `#[cfg(test)]` items.
fn scan(module: &str, children: &BTreeSet<String>, src: &str) -> Vec<(usize, Fact)> {
    let code = strip(src);
    let b = code.as_bytes();
    let mut facts = Vec::new();
    // Inline `mod x { ... }` blocks: (name, brace depth inside).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    let newlines: Vec<usize> = code.match_indices('\n').map(|(k, _)| k).collect();
    let line_at = |i: usize| newlines.partition_point(|&k| k < i) + 1;
    let here_of = |inline: &[(String, usize)]| -> String {
        std::iter::once(module)
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .chain(inline.iter().map(|(n, _)| n.clone()))
            .collect::<Vec<_>>()
            .join("::")
    };
    while i < b.len() {
        let c = b[i];
        if c == b'#' && code[i..].starts_with("#[cfg(test)]") {
            let here = here_of(&inline);
            let end = skip_item(b, i + "#[cfg(test)]".len());
            // `#[cfg(test)] mod harness;` makes a whole file test code.
            let item: Vec<&str> = code[i + "#[cfg(test)]".len()..end].split_whitespace().collect();
            if let [.., "mod", name] = item[..] {
                if let Some(name) = name.strip_suffix(';') {
                    facts.push((
                        line_at(i),
                        Fact::TestMod(if here.is_empty() { name.into() } else { format!("{here}::{name}") }),
                    ));
                }
            }
            i = end;
            continue;
        }
        if c == b'{' {
            depth += 1;
            i += 1;
            continue;
        }
        if c == b'}' {
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
            depth = depth.saturating_sub(1);
            i += 1;
            continue;
        }
        if !is_ident(c) || ident_before(b, i) {
            i += 1;
            continue;
        }
        let word_end = i + b[i..].iter().take_while(|&&x| is_ident(x)).count();
        let word = &code[i..word_end];
        let here = here_of(&inline);
        if word == "mod" {
            // `mod name {` opens an inline module.
            let after = &code[word_end..];
            let rest = after.trim_start();
            let name_len = rest.bytes().take_while(|&x| is_ident(x)).count();
            if name_len > 0 && rest[name_len..].trim_start().starts_with('{') {
                let open = word_end + (after.len() - rest.len()) + name_len;
                let open = open + code[open..].find('{').unwrap_or(0);
                depth += 1;
                inline.push((rest[..name_len].to_owned(), depth));
                i = open + 1;
                continue;
            }
        }
        if word == "use" {
            let end = code[i..].find(';').map_or(b.len(), |p| i + p);
            let line = line_at(i);
            let before = code[..i].trim_end();
            let public = before.ends_with("pub")
                || (before.ends_with(')') && before[before.len().saturating_sub(24)..].contains("pub("));
            for (path, name) in expand_use(&code[word_end..end]) {
                if let Some(target) = classify(&path, &here, children, &inline, line, &mut facts) {
                    if public && name != "*" {
                        let name = if here.is_empty() { name } else { format!("{here}::{name}") };
                        facts.push((line, Fact::ReExport { name, target }));
                    }
                }
            }
            i = end + 1;
            continue;
        }
        // A path in code: ident(::ident)*.
        let mut j = word_end;
        while code[j..].starts_with("::") && b.get(j + 2).is_some_and(|&x| is_ident(x)) {
            j += 2;
            j += b[j..].iter().take_while(|&&x| is_ident(x)).count();
        }
        let path = &code[i..j];
        // `pub(in crate::spool)` limits visibility; it is not a use.
        if !code[..i].trim_end().ends_with("(in") {
            classify(path, &here, children, &inline, line_at(i), &mut facts);
        }
        i = j;
    }
    facts
}

/// Skips the item after a `#[cfg(test)]`: further attributes, then up to `;` or a balanced
/// `{...}`, whichever ends the item.
fn skip_item(b: &[u8], mut i: usize) -> usize {
    let mut brackets = 0i32;
    while i < b.len() {
        match b[i] {
            b'[' | b'(' => brackets += 1,
            b']' | b')' => brackets -= 1,
            b';' if brackets == 0 => return i + 1,
            b'{' if brackets == 0 => {
                let mut d = 0;
                while i < b.len() {
                    match b[i] {
                        b'{' => d += 1,
                        b'}' => {
                            d -= 1;
                            if d == 0 {
                                return i + 1;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
                return i;
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// Expands a use tree (`std::{fs, io::Write as W}`) into full paths and the names they bind
/// (`(std::fs, fs)`, `(std::io::Write, W)`).
fn expand_use(tree: &str) -> Vec<(String, String)> {
    let tree: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = Vec::new();
    expand_into("", tree.trim().trim_start_matches("::"), &mut out);
    out
}

fn expand_into(prefix: &str, tree: &str, out: &mut Vec<(String, String)>) {
    let join = |p: &str, s: &str| {
        if p.is_empty() {
            s.to_owned()
        } else if s.is_empty() {
            p.to_owned()
        } else {
            format!("{p}::{s}")
        }
    };
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim().trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let prefix = join(prefix, head);
        // Split on top-level commas.
        let (mut d, mut start) = (0, 0);
        for (k, ch) in inner.char_indices() {
            match ch {
                '{' => d += 1,
                '}' => d -= 1,
                ',' if d == 0 => {
                    expand_into(&prefix, &inner[start..k], out);
                    start = k + 1;
                }
                _ => {}
            }
        }
        expand_into(&prefix, &inner[start..], out);
    } else {
        let mut parts = tree.split(" as ");
        let item = parts.next().unwrap_or("").trim();
        if item.is_empty() {
            return;
        }
        let item = if item == "self" { "" } else { item };
        let path = join(prefix, item);
        let name = match parts.next() {
            Some(alias) => alias.trim().to_owned(),
            None => path.rsplit("::").next().unwrap_or("").to_owned(),
        };
        out.push((path, name));
    }
}

/// Records what `path` (seen in module `here`) names: I/O kinds, and a module edge when it
/// starts at `crate`, `super`, `self` or a child module (returned, resolved).
fn classify(
    path: &str,
    here: &str,
    children: &BTreeSet<String>,
    inline: &[(String, usize)],
    line: usize,
    facts: &mut Vec<(usize, Fact)>,
) -> Option<String> {
    for (cap, needles) in CAPS {
        // A needle matches at a path-segment start (not `my_mio::`).
        if needles.iter().any(|n| path.match_indices(n).any(|(k, _)| k == 0 || path[..k].ends_with("::"))) {
            facts.push((line, Fact::Io(cap)));
        }
    }
    let mut segs: Vec<&str> = path.split("::").collect();
    let mut base: Vec<String> = if here.is_empty() { vec![] } else { here.split("::").map(str::to_owned).collect() };
    match segs.first().copied() {
        Some("crate") if segs.len() > 1 => {
            base.clear();
            segs.remove(0);
        }
        Some("super") => {
            while segs.first() == Some(&"super") {
                segs.remove(0);
                base.pop();
            }
        }
        Some("self") => {
            segs.remove(0);
        }
        Some(first) if segs.len() > 1 && (children.contains(first) || inline.iter().any(|(n, _)| n == first)) => {}
        _ => return None,
    }
    // Keep the whole path: the checker resolves it to the longest known row.
    let mut full = base;
    full.extend(segs.iter().filter(|s| !s.is_empty() && **s != "*").map(|s| s.to_string()));
    let full = full.join("::");
    facts.push((line, Fact::Uses(full.clone())));
    Some(full)
}

/// Follows `pub use` re-exports: `spool::Pins` -> `spool::record::Pins`, so an import through a
/// parent's re-export counts as an edge to the module that defines the item.
fn resolve(reexports: &BTreeMap<String, String>, path: &str) -> String {
    let mut path = path.to_owned();
    // Bounded: a re-export chain is short, and a loop must not hang the check.
    for _ in 0..8 {
        let mut cut = path.len();
        let hit = loop {
            if let Some(t) = reexports.get(&path[..cut]) {
                break Some(format!("{t}{}", &path[cut..]));
            }
            match path[..cut].rfind("::") {
                Some(k) => cut = k,
                None => break None,
            }
        };
        match hit {
            Some(p) if p != path => path = p,
            _ => break,
        }
    }
    path
}

/// A source file: its module path and text.
struct File {
    /// Path shown in messages.
    name: String,
    /// Module path (`""` for `lib.rs`).
    module: String,
    text: String,
}

/// The module path of `src/<rel>`: `spool/mod.rs` -> `spool`, `spool/format.rs` -> `spool::format`.
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts.join("::")
}

/// Checks `files` against `table`; returns the violations, one per line of text.
fn check(table: &Table, files: &[File]) -> Vec<String> {
    let mut errors: Vec<String> = Vec::new();
    let modules: BTreeSet<&str> = files.iter().map(|f| f.module.as_str()).collect();
    // Row-level and top-level edges, with one example site each.
    let mut row_edges: BTreeMap<(String, String), String> = BTreeMap::new();
    let children_of = |module: &str| -> BTreeSet<String> {
        modules
            .iter()
            .filter(|m| is_under(m, module) && !m[module.len() + 2..].contains("::"))
            .map(|m| m[module.len() + 2..].to_owned())
            .collect()
    };
    let scans: Vec<Vec<(usize, Fact)>> =
        files.iter().map(|f| scan(&f.module, &children_of(&f.module), &f.text)).collect();
    let reexports: BTreeMap<String, String> = scans
        .iter()
        .flatten()
        .filter_map(|(_, fact)| match fact {
            Fact::ReExport { name, target } => Some((name.clone(), target.clone())),
            _ => None,
        })
        .collect();
    let test_mods: BTreeSet<String> = scans
        .iter()
        .flatten()
        .filter_map(|(_, fact)| match fact {
            Fact::TestMod(m) => Some(m.clone()),
            _ => None,
        })
        .collect();
    for (f, facts) in files.iter().zip(scans) {
        if test_mods.iter().any(|t| f.module == *t || is_under(&f.module, t)) {
            // Declared `#[cfg(test)] mod x;` by its parent: test code, like a `mod tests {}`.
            continue;
        }
        if f.module.is_empty() {
            // lib.rs declares modules and documents; it holds no code of its own.
            continue;
        }
        let Some(from) = table.row_of(&f.module) else {
            errors.push(format!("{}: module `{}` has no row in src/lib.rs's Module graph table", f.name, f.module));
            continue;
        };
        let row = &table.rows[from];
        for (line, fact) in facts {
            let site = format!("{}:{line}", f.name);
            match fact {
                Fact::Io(cap) => match &row.io {
                    None => errors.push(format!("{site}: pure module `{from}` uses I/O ({cap})")),
                    Some(caps) if !caps.contains(cap) => {
                        errors.push(format!("{site}: `{from}` uses {cap}, which its row does not allow"))
                    }
                    Some(_) => {}
                },
                Fact::ReExport { .. } | Fact::TestMod(_) => {}
                Fact::Uses(target) => {
                    let target = resolve(&reexports, &target);
                    let Some(to) = table.row_of(&target) else {
                        errors.push(format!("{site}: `crate::{target}` is in no row"));
                        continue;
                    };
                    if from == to {
                        continue;
                    }
                    if !table.allows(from, to) {
                        errors.push(format!("{site}: `{from}` may not use `{to}` (add it to the row's \"may use\")"));
                    }
                    if row.io.is_none() && table.rows[to].io.is_some() {
                        errors.push(format!("{site}: pure module `{from}` imports `{to}`, which is not pure"));
                    }
                    row_edges.entry((from.to_owned(), to.to_owned())).or_insert(site);
                }
            }
        }
    }
    // Cycles, among rows and among top-level modules; edges marked allow-cycle are left out, and
    // so is a row's use of a row it is inside (a child naming its parent's error type is
    // composition, not a layer going back up; the top-level check still sees every other edge).
    let kept: Vec<(&(String, String), &String)> = row_edges
        .iter()
        .filter(|((a, b), _)| !is_under(a, b) && !table.cycle_ok.contains(&(a.clone(), b.clone())))
        .collect();
    let rows: Vec<(String, String, String)> =
        kept.iter().map(|((a, b), s)| (a.clone(), b.clone(), (*s).clone())).collect();
    let top = |m: &str| m.split("::").next().unwrap_or("").to_owned();
    let tops: Vec<(String, String, String)> =
        kept.iter().filter(|((a, b), _)| top(a) != top(b)).map(|((a, b), s)| (top(a), top(b), (*s).clone())).collect();
    for (what, edges) in [("modules", &tops), ("rows", &rows)] {
        if let Some(cycle) = find_cycle(edges) {
            let mut msg = format!("cycle between {what}: ");
            for (a, b, site) in &cycle {
                let _ = write!(msg, "`{a}` -> `{b}` ({site}); ");
            }
            errors.push(msg.trim_end_matches("; ").to_owned());
        }
    }
    // One line per finding: a use statement naming three items of a module reports once.
    errors.dedup();
    errors
}

/// A cycle in the graph as its edges (with a site each), if there is one.
fn find_cycle(edges: &[(String, String, String)]) -> Option<Vec<(String, String, String)>> {
    let mut adj: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for (a, b, s) in edges {
        if a != b {
            adj.entry(a).or_default().push((b, s));
        }
    }
    // Iterative DFS with colours; the stack holds the path.
    let nodes: Vec<&str> = adj.keys().copied().collect();
    let mut colour: BTreeMap<&str, u8> = BTreeMap::new(); // 1 = on path, 2 = done
    for start in nodes {
        if colour.contains_key(start) {
            continue;
        }
        let mut path: Vec<(&str, usize, &str)> = vec![(start, 0, "")];
        colour.insert(start, 1);
        while let Some(&mut (node, ref mut next, _)) = path.last_mut() {
            let succ = adj.get(node).map_or(&[][..], |v| &v[..]);
            if *next < succ.len() {
                let (to, site) = succ[*next];
                *next += 1;
                match colour.get(to) {
                    Some(1) => {
                        let at = path.iter().position(|(n, _, _)| *n == to).unwrap_or(0);
                        let mut cycle: Vec<(String, String, String)> = path[at..]
                            .windows(2)
                            .map(|w| (w[0].0.to_owned(), w[1].0.to_owned(), w[1].2.to_owned()))
                            .collect();
                        cycle.push((node.to_owned(), to.to_owned(), site.to_owned()));
                        return Some(cycle);
                    }
                    Some(_) => {}
                    None => {
                        colour.insert(to, 1);
                        path.push((to, 0, site));
                    }
                }
            } else {
                colour.insert(node, 2);
                path.pop();
            }
        }
    }
    None
}

fn collect(dir: &Path, root: &Path, out: &mut Vec<File>) {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).expect("read src/").map(|e| e.expect("entry").path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, root, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let rel = p.strip_prefix(root).expect("under src/");
            if rel == Path::new("main.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&p).expect("read source");
            out.push(File { name: format!("src/{}", rel.display()), module: module_of(rel), text });
        }
    }
}

#[test]
fn the_real_tree_follows_the_table_in_lib_rs() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let table = Table::parse(&std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs")).expect("table");
    let mut files = Vec::new();
    collect(&src, &src, &mut files);
    let errors = check(&table, &files);
    assert!(errors.is_empty(), "module graph violations (the table is in src/lib.rs):\n{}", errors.join("\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "//! # Module graph
//! | module | kind | may use | notes |
//! |---|---|---|---|
//! | `a` | pure | `b` | |
//! | `b` | pure | | |
//! | `c` | io: mio, clock | `a`, `b`, `d` | |
//! | `d` | io: fs | `b` | |
//! | `d::pure` | pure | | |
//!
//! # Next section
//! | `x` | pure | | |
";

    fn file(module: &str, text: &str) -> File {
        File { name: format!("src/{}.rs", module.replace("::", "/")), module: module.into(), text: text.into() }
    }

    fn run(files: &[File]) -> Vec<String> {
        check(&Table::parse(TABLE).unwrap(), files)
    }

    fn base() -> Vec<File> {
        vec![
            file("a", "use crate::b::Thing;\nfn f() { let _ = super::b::other(); }\n"),
            file("b", "pub struct Thing;\n"),
            file("c", "use mio::Poll;\nuse crate::{a, d::Store};\nfn f() { let t = std::time::Instant::now(); }\n"),
            file("d", "use std::fs::File;\nuse crate::b::Thing;\nmod pure;\nfn f() { pure::g(); }\n"),
            file("d::pure", "pub fn g() {}\n"),
        ]
    }

    #[test]
    fn the_table_parses_only_its_section() {
        let t = Table::parse(TABLE).unwrap();
        assert_eq!(t.rows.keys().collect::<Vec<_>>(), ["a", "b", "c", "d", "d::pure"]);
        assert!(t.rows["a"].io.is_none() && t.rows["c"].io.as_ref().unwrap().contains("clock"));
        assert_eq!(t.row_of("d::pure::deep"), Some("d::pure"));
        assert_eq!(t.row_of("d::other"), Some("d"));
        assert!(Table::parse("//! # Module graph\n//! | a | io: disk | |\n").unwrap_err().contains("disk"));
        assert!(Table::parse("//! # Module graph\n//! | a | pure | `zz` |\n").unwrap_err().contains("zz"));
    }

    #[test]
    fn a_clean_tree_passes() {
        assert_eq!(run(&base()), Vec::<String>::new());
    }

    #[test]
    fn a_deliberate_cycle_fails() {
        let mut files = base();
        // c uses d; now d uses c: first the edge itself is refused...
        files[3] = file("d", "use crate::c::Loop;\n");
        let e = run(&files);
        assert!(e.iter().any(|m| m.contains("src/d.rs:1: `d` may not use `c`")), "{e:?}");
        // ...and with the edge allowed in the table, the cycle is still caught.
        let table = TABLE.replace("| `d` | io: fs | `b` | |", "| `d` | io: fs | `b`, `c` | |");
        let e = check(&Table::parse(&table).unwrap(), &files);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e.iter().all(|m| m.starts_with("cycle between ") && m.contains("`d` -> `c` (src/d.rs:1)")), "{e:?}");
        // An allow-cycle note (a known cycle with a TODO) lets it pass.
        let table = TABLE.replace(
            "| `d` | io: fs | `b` | |",
            "| `d` | io: fs | `b`, `c` | x; TODO(x): allow-cycle: `c` (why, `b`) |",
        );
        let parsed = Table::parse(&table).unwrap();
        assert_eq!(parsed.cycle_ok.iter().collect::<Vec<_>>(), [&("d".to_owned(), "c".to_owned())]);
        assert_eq!(check(&parsed, &files), Vec::<String>::new());
        // It must name an edge the row allows.
        let table = TABLE.replace("| `d` | io: fs | `b` | |", "| `d` | io: fs | `b` | allow-cycle: `c` |");
        assert!(Table::parse(&table).unwrap_err().contains("allow-cycle"));
    }

    #[test]
    fn a_pure_module_importing_mio_fails() {
        let mut files = base();
        files[0] = file("a", "use mio::net::TcpStream;\n");
        let e = run(&files);
        assert!(e.iter().any(|m| m.contains("pure module `a` uses I/O (mio)")), "{e:?}");
        assert!(e.iter().any(|m| m.contains("pure module `a` uses I/O (net)")), "{e:?}");
        // Grouped imports are expanded.
        files[0] = file("a", "use std::{io, fs::{self, File}};\n");
        let e = run(&files);
        assert!(e.iter().any(|m| m.contains("src/a.rs:1: pure module `a` uses I/O (fs)")), "{e:?}");
    }

    #[test]
    fn the_clock_in_a_pure_module_fails_outside_cfg_test_only() {
        let mut files = base();
        files[0] = file("a", "fn f() {\n    let now = Instant::now();\n}\n");
        let e = run(&files);
        assert!(e.iter().any(|m| m.contains("src/a.rs:2: pure module `a` uses I/O (clock)")), "{e:?}");
        let ok = "// Instant::now() in a comment\n/* SystemTime::now() */\nconst S: &str = \"Instant::now()\";\n\
                  #[cfg(test)]\nmod tests {\n    fn t() { let _ = std::time::Instant::now(); }\n}\n\
                  #[cfg(test)]\nfn helper() { let _ = SystemTime::now(); }\nfn after<'a>(x: &'a u8) -> char { 'x' }\n";
        files[0] = file("a", ok);
        assert_eq!(run(&files), Vec::<String>::new());
    }

    #[test]
    fn a_file_declared_cfg_test_is_exempt() {
        let mut files = base();
        files[1] = file("b", "pub struct Thing;\n#[cfg(test)]\nmod harness;\n");
        files.push(file("b::harness", "fn now() { let _ = std::time::Instant::now(); }\n"));
        assert_eq!(run(&files), Vec::<String>::new());
        files[1] = file("b", "pub struct Thing;\nmod harness;\n");
        let e = run(&files);
        assert!(e.iter().any(|m| m.contains("src/b/harness.rs:1: pure module `b` uses I/O (clock)")), "{e:?}");
    }

    #[test]
    fn a_pure_module_importing_an_io_module_fails() {
        let mut files = base();
        files.push(file("b::inner", "fn f() { let _ = super::super::d::Store::open(); }\n"));
        let e = run(&files);
        assert!(e.iter().any(|m| m.contains("src/b/inner.rs:1: `b` may not use `d`")), "{e:?}");
        assert!(e.iter().any(|m| m.contains("pure module `b` imports `d`, which is not pure")), "{e:?}");
    }

    #[test]
    fn an_import_through_a_re_export_counts_for_the_defining_module() {
        let mut files = base();
        // a (pure) takes `Plain` from d's re-export of its pure child: allowed as `d::pure`...
        files[3] = file("d", "use std::fs::File;\nmod pure;\npub use pure::{Plain, g as h};\n");
        let table = TABLE.replace("| `a` | pure | `b` |", "| `a` | pure | `b`, `d::pure` |");
        files[0] = file("a", "use crate::d::Plain;\nfn f() { crate::d::h(); }\n");
        assert_eq!(check(&Table::parse(&table).unwrap(), &files), Vec::<String>::new());
        // ...but an item d defines itself is an edge to d.
        files[0] = file("a", "use crate::d::Store;\n");
        let e = check(&Table::parse(&table).unwrap(), &files);
        assert!(e.iter().any(|m| m.contains("`a` may not use `d`")), "{e:?}");
        assert_eq!(resolve(&[("x::Y".to_owned(), "x::y::Y".to_owned())].into(), "x::Y::new"), "x::y::Y::new");
    }

    #[test]
    fn io_not_in_the_row_fails_and_unlisted_modules_fail() {
        let mut files = base();
        files[3] = file("d", "fn f() { std::thread::spawn(|| ()); }\n");
        files.push(file("e", "pub fn g() {}\n"));
        let e = run(&files);
        assert!(e.iter().any(|m| m.contains("`d` uses thread")), "{e:?}");
        assert!(e.iter().any(|m| m.contains("module `e` has no row")), "{e:?}");
    }

    #[test]
    fn use_trees_expand() {
        let paths = expand_use(" crate::{a::{self, X as Y}, b::*}, ");
        let want = [("crate::a", "a"), ("crate::a::X", "Y"), ("crate::b::*", "*")];
        assert_eq!(paths, want.map(|(p, n)| (p.to_owned(), n.to_owned())));
        assert_eq!(module_of(Path::new("spool/mod.rs")), "spool");
        assert_eq!(module_of(Path::new("net/outbound/conn.rs")), "net::outbound::conn");
    }
}
