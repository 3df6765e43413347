//! An incremental Server-Sent Events parser (WHATWG rules): fed the bytes of
//! a stream in whatever pieces the network delivers, it reports each complete
//! event with its byte offset in the stream, copying only what spans a chunk
//! boundary.

/// One dispatched event. `data` has the `data:` lines joined by `\n`.
#[derive(Debug, PartialEq, Eq)]
pub struct SseEvent<'a> {
    pub event: &'a [u8],
    pub data: &'a [u8],
    /// Stream offset just past the blank line that ended the event.
    pub end: u64,
}

#[derive(Debug, Default)]
pub struct SseParser {
    /// A line that began in an earlier chunk.
    partial_line: Vec<u8>,
    data: Vec<u8>,
    event: Vec<u8>,
    has_data: bool,
    /// The previous chunk ended in `\r`; a leading `\n` now belongs to it.
    after_cr: bool,
    /// Bytes consumed so far.
    offset: u64,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Consumes `chunk`, calling `on_event` for every event it completes.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        let base = self.offset;
        self.offset += chunk.len() as u64;
        let mut pos = 0;
        if self.after_cr {
            self.after_cr = false;
            if chunk.first() == Some(&b'\n') {
                pos = 1;
            }
        }
        while pos < chunk.len() {
            let Some(found) = memchr::memchr2(b'\n', b'\r', &chunk[pos..]) else {
                self.partial_line.extend_from_slice(&chunk[pos..]);
                return;
            };
            let line_end = pos + found;
            let mut next = line_end + 1;
            if chunk[line_end] == b'\r' {
                if next == chunk.len() {
                    self.after_cr = true;
                } else if chunk[next] == b'\n' {
                    next += 1;
                }
            }
            let end = base + next as u64;
            if self.partial_line.is_empty() {
                self.line(&chunk[pos..line_end], end, &mut on_event);
            } else {
                let mut line = std::mem::take(&mut self.partial_line);
                line.extend_from_slice(&chunk[pos..line_end]);
                self.line(&line, end, &mut on_event);
                line.clear();
                self.partial_line = line;
            }
            pos = next;
        }
    }

    fn line(&mut self, line: &[u8], end: u64, on_event: &mut impl FnMut(SseEvent<'_>)) {
        if line.is_empty() {
            if self.has_data {
                // The spec drops the final newline appended after each data line.
                let data = &self.data[..self.data.len() - 1];
                on_event(SseEvent {
                    event: &self.event,
                    data,
                    end,
                });
            }
            self.data.clear();
            self.event.clear();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<(String, String, u64)> {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, |e| {
                out.push((
                    String::from_utf8_lossy(e.event).into_owned(),
                    String::from_utf8_lossy(e.data).into_owned(),
                    e.end,
                ))
            });
        }
        out
    }

    #[test]
    fn whole_events_in_one_chunk() {
        let got = events(&[b"event: a\ndata: 1\n\ndata: 2\n\n"]);
        assert_eq!(
            got,
            vec![("a".into(), "1".into(), 18), ("".into(), "2".into(), 27)]
        );
    }

    #[test]
    fn any_split_gives_the_same_events() {
        let stream: &[u8] = b"event: message_start\r\ndata: {\"a\":1}   \r\n\r\n: comment\ndata: x\ndata: y\n\ndata:z\r\r";
        let whole = events(&[stream]);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0].1, "{\"a\":1}   ");
        assert_eq!(whole[1].1, "x\ny");
        assert_eq!(whole[2].1, "z");
        // A "\r\n" split across chunks ends the event at the "\r"; the
        // "\n" then counts toward the next event, so compare offsets apart.
        let content = |e: Vec<(String, String, u64)>| {
            e.into_iter().map(|(a, b, _)| (a, b)).collect::<Vec<_>>()
        };
        for split in 1..stream.len() {
            let (a, b) = stream.split_at(split);
            let got = events(&[a, b]);
            assert_eq!(content(got), content(whole.clone()), "split at {split}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(content(events(&bytes)), content(whole));
    }

    #[test]
    fn event_without_data_is_not_dispatched() {
        assert!(events(&[b"event: ping\n\n"]).is_empty());
        assert_eq!(events(&[b"data\n\n"]), vec![("".into(), "".into(), 6)]);
    }

    #[test]
    fn unfinished_event_is_held() {
        let mut parser = SseParser::new();
        let mut n = 0;
        parser.feed(b"data: 1\n", |_| n += 1);
        assert_eq!(n, 0);
        parser.feed(b"\n", |_| n += 1);
        assert_eq!(n, 1);
        assert_eq!(parser.offset(), 9);
    }
}
