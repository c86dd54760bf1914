//! Plain-text tables for people reading the CLI's stdout (`keys list`,
//! `keys audit`, `usage`): a header row, then each column padded to its
//! widest cell, two spaces apart. One writer, so every table lines up the
//! same way; `--json` is what scripts should parse.

use std::io::{self, Write};

/// How a column's cells sit in their width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// Writes `header` and `rows`, aligned per `align` (one per column; a row
/// shorter than the header leaves its last columns empty). Cells must hold
/// no control characters (callers pass free text through [`printable`]).
/// Lines carry no trailing spaces.
pub fn write(out: &mut impl Write, header: &[&str], rows: &[Vec<String>], align: &[Align]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            let cell = row.get(i).map_or("", String::as_str);
            // `format!`'s padding counts chars, as the widths above do.
            match align.get(i).copied().unwrap_or(Align::Left) {
                Align::Left => line.push_str(&format!("{cell:<width$}  ")),
                Align::Right => line.push_str(&format!("{cell:>width$}  ")),
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// Free text (labels, audit details, actor names) with control characters
/// replaced: a stray escape sequence or newline must not reach the
/// operator's terminal or break the table.
pub fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_under_their_header() {
        let rows = vec![
            vec!["a".to_owned(), "1".to_owned(), "x".to_owned()],
            vec!["longer".to_owned(), "1000".to_owned(), String::new()],
        ];
        let mut out = Vec::new();
        write(&mut out, &["NAME", "N", "NOTE"], &rows, &[Align::Left, Align::Right, Align::Left]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, "NAME       N  NOTE\na          1  x\nlonger  1000\n");
        assert_eq!(printable("a\u{1b}[31mb\n"), "a?[31mb?");
    }
}
