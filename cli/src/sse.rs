//! A Server-Sent Events parser fed with the body's chunks as they arrive. Chunks split lines
//! (and UTF-8 characters) anywhere, so bytes are kept until a line is complete; a blank line
//! ends an event.

/// One event: its `event:` name (`message` when the server gave none), its `id:`, and its
/// `data:` lines joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of a line not yet ended.
    partial: Vec<u8>,
    event: Option<String>,
    id: Option<String>,
    data: Option<String>,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Feeds one chunk; returns the events it completed, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = vec![];
        self.partial.extend_from_slice(chunk);
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if let Some(e) = self.line(line) {
                events.push(e);
            }
        }
        events
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None; // a comment: the server's keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "id" => self.id = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {} // `retry:` and unknown fields
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        let id = self.id.take();
        let data = self.data.take()?;
        Some(SseEvent {
            event: event
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "message".to_owned()),
            id,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, id: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.to_owned(),
            id: id.map(str::to_owned),
            data: data.to_owned(),
        }
    }

    #[test]
    fn whole_events() {
        let mut p = SseParser::new();
        let got = p.feed(
            b"event: log\nid: 1\ndata: {\"msg\":\"a\"}\n\n:keep-alive\n\nevent:state\ndata:{}\n\n",
        );
        assert_eq!(
            got,
            vec![
                ev("log", Some("1"), "{\"msg\":\"a\"}"),
                ev("state", None, "{}")
            ]
        );
    }

    #[test]
    fn an_event_split_across_chunks_and_inside_a_character() {
        let text = "event: log\r\nid: 7\r\ndata: {\"msg\":\"grüße\"}\r\n\r\n".as_bytes();
        // Split everywhere, including between the two bytes of `ü`.
        for cut in 0..text.len() {
            let mut p = SseParser::new();
            let mut got = p.feed(&text[..cut]);
            got.extend(p.feed(&text[cut..]));
            assert_eq!(
                got,
                vec![ev("log", Some("7"), "{\"msg\":\"grüße\"}")],
                "cut {cut}"
            );
        }
        let mut p = SseParser::new();
        let mut got = vec![];
        for b in text {
            got.extend(p.feed(std::slice::from_ref(b)));
        }
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn multi_line_data_and_defaults() {
        let mut p = SseParser::new();
        let got = p.feed(b"data: a\ndata: b\nretry: 10\n\nevent: x\n\n");
        // The second block has no data, so it is not an event.
        assert_eq!(got, vec![ev("message", None, "a\nb")]);
    }

    #[test]
    fn an_unfinished_event_is_held_back() {
        let mut p = SseParser::new();
        assert!(p.feed(b"event: state\ndata: {}\n").is_empty());
        assert_eq!(p.feed(b"\n"), vec![ev("state", None, "{}")]);
    }
}
