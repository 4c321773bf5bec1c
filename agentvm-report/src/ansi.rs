//! Terminal output as HTML: SGR colour and style sequences become styled
//! spans, every other escape sequence is dropped, and other control
//! characters are shown as visible `\xNN` markers. Text is escaped by maud.

use maud::{html, Markup};

/// A colour: one of the 16 palette entries (a CSS class) or an RGB value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    /// Palette index 0–15.
    Palette(u8),
    /// 24-bit colour.
    Rgb(u8, u8, u8),
}

/// The SGR state a run of text is drawn with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Style {
    /// Foreground.
    pub fg: Option<Color>,
    /// Background.
    pub bg: Option<Color>,
    /// Bold.
    pub bold: bool,
    /// Faint.
    pub dim: bool,
    /// Italic.
    pub italic: bool,
    /// Underlined.
    pub underline: bool,
}

impl Style {
    /// CSS classes (palette colours and attributes).
    fn classes(&self) -> String {
        let mut c = Vec::new();
        if let Some(Color::Palette(n)) = self.fg {
            c.push(format!("f{n}"));
        }
        if let Some(Color::Palette(n)) = self.bg {
            c.push(format!("b{n}"));
        }
        for (on, name) in [
            (self.bold, "bold"),
            (self.dim, "dim"),
            (self.italic, "italic"),
            (self.underline, "uline"),
        ] {
            if on {
                c.push(name.to_string());
            }
        }
        c.join(" ")
    }

    /// Inline CSS for RGB colours; built from numbers only.
    fn css(&self) -> String {
        let mut s = String::new();
        if let Some(Color::Rgb(r, g, b)) = self.fg {
            s.push_str(&format!("color:#{r:02x}{g:02x}{b:02x};"));
        }
        if let Some(Color::Rgb(r, g, b)) = self.bg {
            s.push_str(&format!("background:#{r:02x}{g:02x}{b:02x};"));
        }
        s
    }

    fn apply(&mut self, params: &[u16]) {
        let mut i = 0;
        if params.is_empty() {
            *self = Style::default();
        }
        while i < params.len() {
            let p = params[i];
            match p {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => {
                    self.bold = false;
                    self.dim = false;
                }
                23 => self.italic = false,
                24 => self.underline = false,
                30..=37 => self.fg = Some(Color::Palette((p - 30) as u8)),
                90..=97 => self.fg = Some(Color::Palette((p - 90 + 8) as u8)),
                40..=47 => self.bg = Some(Color::Palette((p - 40) as u8)),
                100..=107 => self.bg = Some(Color::Palette((p - 100 + 8) as u8)),
                39 => self.fg = None,
                49 => self.bg = None,
                38 | 48 => {
                    let (color, used) = extended_color(&params[i + 1..]);
                    if p == 38 {
                        self.fg = color;
                    } else {
                        self.bg = color;
                    }
                    i += used;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

/// `5;n` or `2;r;g;b` after a 38/48: the colour and how many parameters it used.
fn extended_color(rest: &[u16]) -> (Option<Color>, usize) {
    match rest {
        [5, n, ..] => {
            let n = (*n).min(255) as u8;
            (Some(xterm_256(n)), 2)
        }
        [2, r, g, b, ..] => (
            Some(Color::Rgb(
                (*r).min(255) as u8,
                (*g).min(255) as u8,
                (*b).min(255) as u8,
            )),
            4,
        ),
        _ => (None, rest.len()),
    }
}

/// The xterm 256-colour palette entry `n`.
fn xterm_256(n: u8) -> Color {
    match n {
        0..=15 => Color::Palette(n),
        16..=231 => {
            let n = n - 16;
            let level = |v: u8| if v == 0 { 0 } else { 55 + v * 40 };
            Color::Rgb(level(n / 36), level((n / 6) % 6), level(n % 6))
        }
        _ => {
            let v = 8 + (n - 232) * 10;
            Color::Rgb(v, v, v)
        }
    }
}

/// Text split into runs of one style, escape sequences removed.
pub fn parse(text: &str) -> Vec<(Style, String)> {
    let mut out: Vec<(Style, String)> = Vec::new();
    let mut style = Style::default();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    let flush = |out: &mut Vec<(Style, String)>, current: &mut String, style: Style| {
        if !current.is_empty() {
            out.push((style, std::mem::take(current)));
        }
    };
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            current.push(c);
            continue;
        }
        match chars.peek() {
            Some('[') => {
                chars.next();
                // CSI: parameters and intermediates, then one final byte in @..~.
                let mut body = String::new();
                let mut end = None;
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        end = Some(c);
                        break;
                    }
                    body.push(c);
                    if body.len() > 64 {
                        break;
                    }
                }
                if end == Some('m') {
                    let params: Vec<u16> = if body.is_empty() {
                        Vec::new()
                    } else {
                        body.split([';', ':'])
                            .map(|p| p.parse::<u16>().unwrap_or(0))
                            .collect()
                    };
                    let mut next = style;
                    next.apply(&params);
                    if next != style {
                        flush(&mut out, &mut current, style);
                        style = next;
                    }
                }
            }
            Some(']') => {
                // OSC: up to BEL or ESC \.
                chars.next();
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' {
                        if chars.peek() == Some(&'\\') {
                            chars.next();
                        }
                        break;
                    }
                }
            }
            Some(_) => {
                chars.next();
            }
            None => {}
        }
    }
    flush(&mut out, &mut current, style);
    out
}

/// Text with control characters (other than newline and tab) shown as
/// visible `\xNN` markers; carriage returns before a newline are dropped.
pub fn visible(text: &str) -> Markup {
    let mut pieces: Vec<(bool, String)> = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let control =
            (c.is_control() && c != '\n' && c != '\t') || c == '\u{2028}' || c == '\u{2029}';
        if c == '\r' && chars.peek() == Some(&'\n') {
            continue;
        }
        if control {
            pieces.push((true, format!("\\x{:02x}", c as u32)));
        } else {
            match pieces.last_mut() {
                Some((false, s)) => s.push(c),
                _ => pieces.push((false, c.to_string())),
            }
        }
    }
    html! {
        @for (control, piece) in &pieces {
            @if *control { span.ctl { (piece) } } @else { (piece) }
        }
    }
}

/// Terminal output as HTML (styled spans, visible control characters).
pub fn render(text: &str) -> Markup {
    html! {
        @for (style, run) in parse(text) {
            @if style == Style::default() {
                (visible(&run))
            } @else {
                @let css = style.css();
                @let classes = style.classes();
                span class=[(!classes.is_empty()).then_some(classes)] style=[(!css.is_empty()).then_some(css)] { (visible(&run)) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_become_classes_and_sequences_vanish() {
        let html = render("a\u{1b}[1;31mred\u{1b}[0m b\u{1b}[2K\u{1b}]0;title\u{7}c").into_string();
        assert_eq!(html, "a<span class=\"f1 bold\">red</span> bc");
    }

    #[test]
    fn extended_colours_are_inline_styles_from_numbers() {
        let html = render("\u{1b}[38;2;255;0;16mx\u{1b}[48;5;196my").into_string();
        assert_eq!(
            html,
            "<span style=\"color:#ff0010;\">x</span>\
             <span style=\"color:#ff0010;background:#ff0000;\">y</span>"
        );
    }

    #[test]
    fn markup_in_output_is_text() {
        let html = render("\u{1b}[32m<script>alert(1)</script>\u{1b}[m&").into_string();
        assert_eq!(
            html,
            "<span class=\"f2\">&lt;script&gt;alert(1)&lt;/script&gt;</span>&amp;"
        );
    }

    #[test]
    fn control_characters_are_visible() {
        let html = render("a\u{0}b\u{7}\r\nc\td\u{fffd}").into_string();
        assert_eq!(
            html,
            "a<span class=\"ctl\">\\x00</span>b<span class=\"ctl\">\\x07</span>\nc\td\u{fffd}"
        );
    }

    #[test]
    fn unterminated_sequences_do_not_panic() {
        for text in [
            "\u{1b}",
            "\u{1b}[",
            "\u{1b}[38;5",
            "\u{1b}]0;x",
            "x\u{1b}[99999999m",
        ] {
            let _ = render(text);
        }
        assert_eq!(render("\u{1b}[38;5mx").into_string(), "x");
    }
}
