//! Where a chunked response body ends, found without decoding it.
//!
//! The proxy copies an upstream's `Transfer-Encoding: chunked` body to the client byte for byte, as it arrives. It
//! still has to know where the message ends: that is where the response is complete for the client, and the upstream
//! connection can go back to the pool only once nothing of this response is left on it. [`ChunkedScanner`] follows
//! the framing of RFC 9112 §7.1 across reads, however they are split. Chunk data is skipped by its length without
//! being looked at, and nothing is allocated or copied.
//!
//! Wherever the grammar asks for CRLF (to end a chunk-size line, after chunk data, to end a trailer line and as the
//! final empty line), only CRLF is accepted, as hyper's decoder does: a bare LF or CR is an error, never a guess,
//! because a proxy and a client that disagree on where a message ends open the door to response smuggling. Chunk extensions and trailer fields are skipped, not parsed. Since no bytes are kept, the
//! limits are not about memory: a chunk-size line may hold 4096 bytes and the trailer section 16 KiB (hyper's limit
//! for trailers), so that an upstream cannot hold a connection with a line that never ends.

/// Longest chunk-size line accepted: digits, whitespace and extensions, without the line end.
const MAX_SIZE_LINE: usize = 4096;
/// Longest trailer section accepted: every byte after the last-chunk line, the final empty line included.
const MAX_TRAILERS: usize = 16 * 1024;

const MISSING_SIZE: &str = "chunk size missing";
const INVALID_SIZE: &str = "invalid byte in chunk-size line";
const SIZE_OVERFLOW: &str = "chunk size does not fit in 64 bits";
const LONG_SIZE_LINE: &str = "chunk-size line longer than 4096 bytes";
const BARE_CR: &str = "CR not followed by LF";
const BARE_LF: &str = "LF not preceded by CR";
const NO_DATA_END: &str = "chunk data not followed by CRLF";
const LONG_TRAILERS: &str = "trailer section longer than 16384 bytes";

/// Follows the framing of a chunked body across reads, without decoding it.
#[derive(Debug, Default)]
pub struct ChunkedScanner {
    state: State,
}

/// What a scan found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// Every byte given belongs to the body, and the body goes on.
    More,
    /// The body ends after the first `n` bytes given (any bytes after them are not part of this message).
    Done(usize),
}

/// The bytes are not a valid chunked body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid chunked body: {0}")]
pub struct ChunkedError(pub &'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Somewhere in the lines around the data, read byte by byte.
    Framing(Framing),
    /// Within chunk data, with this many bytes (never 0) to go.
    Data(u64),
    Done,
    Failed(&'static str),
}

impl Default for State {
    fn default() -> Self {
        State::Framing(Framing::SizeStart)
    }
}

/// A place in the framing. `line` counts the bytes of the chunk-size line so far, `total` those of the trailer
/// section, so that both can be capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    // At the start of a chunk-size line, where a hex digit must come.
    SizeStart,
    SizeDigits { size: u64, line: usize },
    // In whitespace after the digits: no digit may follow any more.
    SizeBws { size: u64, line: usize },
    Extensions { size: u64, line: usize },
    // After the CR that ends a chunk-size line.
    SizeLf { size: u64 },
    // Right after chunk data, where its line end belongs.
    DataEnd,
    // After the CR that follows chunk data.
    DataLf,
    // At the start of a trailer line or of the final empty line.
    TrailerStart { total: usize },
    Trailer { total: usize },
    // After the CR that ends a trailer line.
    TrailerLf { total: usize },
    // After the CR of the final empty line.
    EndLf { total: usize },
}

impl ChunkedScanner {
    /// A scanner at the start of a body.
    pub fn new() -> ChunkedScanner {
        ChunkedScanner::default()
    }

    /// Feeds the next bytes of the body.
    ///
    /// Once the body has ended, any later call answers `Done(0)`, since none of its bytes belong to the body; once
    /// the body has proved invalid, any later call returns the same error.
    pub fn scan(&mut self, input: &[u8]) -> Result<Scan, ChunkedError> {
        let mut rest = input;
        loop {
            match (self.state, rest.split_first()) {
                (State::Done, _) => return Ok(Scan::Done(input.len() - rest.len())),
                (State::Failed(reason), _) => return Err(ChunkedError(reason)),
                (_, None) => return Ok(Scan::More),
                (State::Data(remaining), Some(_)) => {
                    let take = usize::try_from(remaining).map_or(rest.len(), |remaining| remaining.min(rest.len()));
                    rest = &rest[take..];
                    self.state = match remaining - take as u64 {
                        0 => State::Framing(Framing::DataEnd),
                        left => State::Data(left),
                    };
                }
                (State::Framing(framing), Some((&byte, tail))) => {
                    rest = tail;
                    self.state = framing.next(byte).unwrap_or_else(State::Failed);
                }
            }
        }
    }
}

impl Framing {
    /// Where one more byte leads.
    fn next(self, byte: u8) -> Result<State, &'static str> {
        let framing = match self {
            Framing::SizeStart => match hex_digit(byte) {
                Some(digit) => Framing::SizeDigits { size: digit, line: 1 },
                None => return Err(MISSING_SIZE),
            },
            Framing::SizeDigits { size, line } => match hex_digit(byte) {
                Some(digit) => Framing::SizeDigits {
                    // Leading zeros are fine however many there are: only the value has to fit.
                    size: size.checked_mul(16).and_then(|size| size.checked_add(digit)).ok_or(SIZE_OVERFLOW)?,
                    line: count(line, MAX_SIZE_LINE, LONG_SIZE_LINE)?,
                },
                None => return after_size(size, line, byte),
            },
            Framing::SizeBws { size, line } => return after_size(size, line, byte),
            Framing::Extensions { size, line } => match byte {
                b'\r' => Framing::SizeLf { size },
                b'\n' => return Err(BARE_LF),
                _ => Framing::Extensions { size, line: count(line, MAX_SIZE_LINE, LONG_SIZE_LINE)? },
            },
            Framing::SizeLf { size } => match byte {
                b'\n' => return Ok(chunk_start(size)),
                _ => return Err(BARE_CR),
            },
            Framing::DataEnd => match byte {
                b'\r' => Framing::DataLf,
                b'\n' => return Err(BARE_LF),
                _ => return Err(NO_DATA_END),
            },
            Framing::DataLf => match byte {
                b'\n' => Framing::SizeStart,
                _ => return Err(BARE_CR),
            },
            Framing::TrailerStart { total } => {
                let total = count(total, MAX_TRAILERS, LONG_TRAILERS)?;
                match byte {
                    b'\r' => Framing::EndLf { total },
                    b'\n' => return Err(BARE_LF),
                    _ => Framing::Trailer { total },
                }
            }
            Framing::Trailer { total } => {
                let total = count(total, MAX_TRAILERS, LONG_TRAILERS)?;
                match byte {
                    b'\r' => Framing::TrailerLf { total },
                    b'\n' => return Err(BARE_LF),
                    _ => Framing::Trailer { total },
                }
            }
            Framing::TrailerLf { total } => {
                let total = count(total, MAX_TRAILERS, LONG_TRAILERS)?;
                match byte {
                    b'\n' => Framing::TrailerStart { total },
                    _ => return Err(BARE_CR),
                }
            }
            Framing::EndLf { total } => {
                count(total, MAX_TRAILERS, LONG_TRAILERS)?;
                match byte {
                    b'\n' => return Ok(State::Done),
                    _ => return Err(BARE_CR),
                }
            }
        };
        Ok(State::Framing(framing))
    }
}

/// Where a non-digit after the chunk size leads: optional whitespace (BWS), then extensions or the line end.
fn after_size(size: u64, line: usize, byte: u8) -> Result<State, &'static str> {
    let framing = match byte {
        b' ' | b'\t' => Framing::SizeBws { size, line: count(line, MAX_SIZE_LINE, LONG_SIZE_LINE)? },
        b';' => Framing::Extensions { size, line: count(line, MAX_SIZE_LINE, LONG_SIZE_LINE)? },
        b'\r' => Framing::SizeLf { size },
        b'\n' => return Err(BARE_LF),
        _ => return Err(INVALID_SIZE),
    };
    Ok(State::Framing(framing))
}

/// Where the end of a chunk-size line leads: into the data, or into the trailers after the last chunk.
fn chunk_start(size: u64) -> State {
    match size {
        0 => State::Framing(Framing::TrailerStart { total: 0 }),
        size => State::Data(size),
    }
}

fn hex_digit(byte: u8) -> Option<u64> {
    char::from(byte).to_digit(16).map(u64::from)
}

/// Counts one more byte against a cap.
fn count(len: usize, cap: usize, reason: &'static str) -> Result<usize, &'static str> {
    if len < cap {
        Ok(len + 1)
    } else {
        Err(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a whole sequence of pieces amounted to, with `Done` as an offset into their concatenation.
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        More,
        Done(usize),
        Failed(&'static str),
    }

    /// Feeds the pieces to one scanner, checking along the way that `Done` stays within its piece and that the end
    /// and errors are sticky.
    fn feed<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
        let mut scanner = ChunkedScanner::new();
        let mut offset = 0;
        for piece in pieces {
            match scanner.scan(piece) {
                Ok(Scan::More) => offset += piece.len(),
                Ok(Scan::Done(n)) => {
                    assert!(n <= piece.len(), "Done({n}) beyond a piece of {} bytes", piece.len());
                    assert_eq!(scanner.scan(b"0\r\n\r\n"), Ok(Scan::Done(0)));
                    return Outcome::Done(offset + n);
                }
                Err(ChunkedError(reason)) => {
                    assert_eq!(scanner.scan(b"0\r\n\r\n"), Err(ChunkedError(reason)));
                    return Outcome::Failed(reason);
                }
            }
        }
        Outcome::More
    }

    /// The outcome of `bytes`, checked to be the same whole, byte by byte, and cut in two at every point (at some
    /// 300 points for long inputs, which would take seconds otherwise).
    fn outcome(bytes: &[u8]) -> Outcome {
        let whole = feed([bytes]);
        assert_eq!(feed(bytes.chunks(1)), whole, "byte by byte: {:?}", bytes.escape_ascii().to_string());
        for cut in (0..=bytes.len()).step_by(bytes.len() / 300 + 1) {
            let (head, tail) = bytes.split_at(cut);
            assert_eq!(feed([head, tail]), whole, "cut at {cut}: {:?}", bytes.escape_ascii().to_string());
        }
        whole
    }

    /// Checks that `message` is one whole body, also when the next response follows it.
    fn assert_body(message: &[u8]) {
        assert_eq!(outcome(message), Outcome::Done(message.len()));
        let mut followed = message.to_vec();
        followed.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(outcome(&followed), Outcome::Done(message.len()));
    }

    fn assert_fails(bytes: &[u8], reason: &'static str) {
        assert_eq!(outcome(bytes), Outcome::Failed(reason), "{:?}", bytes.escape_ascii().to_string());
    }

    #[test]
    fn simple_bodies_end_after_the_final_empty_line() {
        assert_body(b"0\r\n\r\n");
        assert_body(b"5\r\nhello\r\n0\r\n\r\n");
        assert_body(b"5\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\n\r\n");
    }

    #[test]
    fn data_that_looks_like_framing_is_skipped_by_length() {
        for data in [&b"0\r\n\r\n"[..], b"\r\n\n\r\n0\r\n\r\n", b"\r\r\r", b"\n"] {
            assert_body(&[format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n0\r\n\r\n"].concat());
        }
    }

    #[test]
    fn an_unfinished_body_wants_more() {
        assert_eq!(ChunkedScanner::new().scan(b""), Ok(Scan::More));
        for prefix in
            [&b"5"[..], b"5\r", b"5\r\nhel", b"5\r\nhello\r\n", b"5;x=y", b"0\r\n", b"0\r\nA: b\r\n", b"0\r\n\r"]
        {
            assert_eq!(outcome(prefix), Outcome::More, "{:?}", prefix.escape_ascii().to_string());
        }
    }

    #[test]
    fn extensions_are_skipped() {
        assert_body(b"5;name=value\r\nhello\r\n0\r\n\r\n");
        assert_body(b"5;a;b=\"quoted; \\\" \\r\";c\r\nhello\r\n0;last=yes\r\n\r\n");
        assert_body(b"5;;;  ;\r\nhello\r\n0\r\n\r\n");
        assert_body(b"5;\x00\x7f\xff\r\nhello\r\n0\r\n\r\n");
    }

    #[test]
    fn whitespace_may_follow_the_size() {
        assert_body(b"5  \r\nhello\r\n0\t\r\n\r\n");
        assert_body(b"5 \t ;ext\r\nhello\r\n0 ;\r\n\r\n");
    }

    #[test]
    fn trailers_end_at_the_empty_line() {
        assert_body(b"0\r\nExpires: never\r\n\r\n");
        assert_body(b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nX-Other: \r\n  folded\r\n\r\n");
        // Trailer fields are not parsed, only split into lines.
        assert_body(b"0\r\nnot a field\r\n:\r\n\x00\xff\r\n\r\n");
    }

    #[test]
    fn sizes_are_hex_in_either_case_with_any_leading_zeros() {
        let mut message = b"A\r\n0123456789\r\nfF\r\n".to_vec();
        message.extend([b'x'; 255]);
        message.extend_from_slice(b"\r\n0005\r\nhello\r\n000\r\n\r\n");
        assert_body(&message);

        let mut zeros = vec![b'0'; 40];
        zeros.extend_from_slice(b"1\r\nx\r\n0\r\n\r\n");
        assert_body(&zeros);
    }

    #[test]
    fn a_bare_lf_ends_no_line() {
        for bytes in [
            &b"5\nhello"[..],
            b"5 \nhello",
            b"5;ext\nhello",
            b"5\r\nhello\n0\r\n\r\n",
            b"0\r\n\n",
            b"0\r\nA: b\nC: d\r\n\r\n",
        ] {
            assert_fails(bytes, BARE_LF);
        }
    }

    #[test]
    fn the_largest_size_is_skipped_without_reading_it() {
        let mut scanner = ChunkedScanner::new();
        assert_eq!(scanner.scan(b"0000ffffffffffffffff\r\n"), Ok(Scan::More));
        let data = vec![b'\r'; 1 << 20];
        for _ in 0..64 {
            assert_eq!(scanner.scan(&data), Ok(Scan::More));
        }
        assert_eq!(scanner.state, State::Data(u64::MAX - (64 << 20)));
    }

    #[test]
    fn a_finished_scanner_gives_no_further_bytes_to_the_body() {
        let mut scanner = ChunkedScanner::new();
        assert_eq!(scanner.scan(b"0\r\n\r"), Ok(Scan::More));
        assert_eq!(scanner.scan(b"\nHTTP/1.1"), Ok(Scan::Done(1)));
        assert_eq!(scanner.scan(b""), Ok(Scan::Done(0)));
        assert_eq!(scanner.scan(b"0\r\n\r\n"), Ok(Scan::Done(0)));
    }

    #[test]
    fn errors_are_sticky() {
        let mut scanner = ChunkedScanner::new();
        assert_eq!(scanner.scan(b"5\r\nhello"), Ok(Scan::More));
        assert_eq!(scanner.scan(b"!"), Err(ChunkedError(NO_DATA_END)));
        assert_eq!(scanner.scan(b"\r\n0\r\n\r\n"), Err(ChunkedError(NO_DATA_END)));
        assert_eq!(scanner.scan(b""), Err(ChunkedError(NO_DATA_END)));
        assert_eq!(ChunkedError(NO_DATA_END).to_string(), "invalid chunked body: chunk data not followed by CRLF");
    }

    #[test]
    fn a_size_must_be_hex_digits() {
        for bytes in
            [&b"\r\n"[..], b"\n", b";ext\r\n", b" 5\r\n", b"x\r\n", b"-1\r\n", b"+5\r\n", b"5\r\nhello\r\n\r\n"]
        {
            assert_fails(bytes, MISSING_SIZE);
        }
        for bytes in [&b"5x\r\n"[..], b"0x5\r\n", b"5 5\r\n", b"5 x\r\n", b"5,ext\r\n", b"5\x0b\r\n"] {
            assert_fails(bytes, INVALID_SIZE);
        }
    }

    #[test]
    fn a_size_must_fit_in_64_bits() {
        assert_eq!(outcome(b"ffffffffffffffff\r\n"), Outcome::More);
        assert_fails(b"10000000000000000\r\n", SIZE_OVERFLOW);
        assert_fails(b"fffffffffffffffff\r\n", SIZE_OVERFLOW);
        assert_fails(b"f0000000000000003\r\n", SIZE_OVERFLOW);
    }

    #[test]
    fn data_must_be_followed_by_a_line_end() {
        assert_fails(b"5\r\nhello!\r\n", NO_DATA_END);
        assert_fails(b"5\r\nhello0\r\n\r\n", NO_DATA_END);
        assert_fails(b"5\r\nhello \r\n", NO_DATA_END);
    }

    #[test]
    fn a_cr_must_be_followed_by_lf() {
        for bytes in
            [&b"5\r5"[..], b"5;ext\rhello", b"5\r\nhello\r0", b"5\r\nhello\r\r\n", b"0\r\nA: b\rc", b"0\r\n\r\r"]
        {
            assert_fails(bytes, BARE_CR);
        }
    }

    #[test]
    fn a_size_line_is_capped() {
        let line = |len: usize| {
            let mut bytes = b"5;".to_vec();
            bytes.resize(len, b'e');
            bytes.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
            bytes
        };
        assert_body(&line(MAX_SIZE_LINE));
        assert_fails(&line(MAX_SIZE_LINE + 1), LONG_SIZE_LINE);

        let mut zeros = vec![b'0'; MAX_SIZE_LINE];
        zeros.extend_from_slice(b"\r\n\r\n");
        assert_body(&zeros);
        zeros.insert(0, b'0');
        assert_fails(&zeros, LONG_SIZE_LINE);

        let mut spaces = b"5".to_vec();
        spaces.resize(MAX_SIZE_LINE + 1, b' ');
        spaces.extend_from_slice(b"\r\n");
        assert_fails(&spaces, LONG_SIZE_LINE);
    }

    #[test]
    fn the_trailer_section_is_capped() {
        // The cap counts every byte after the last-chunk line, the final empty line included.
        let trailers = |len: usize| {
            let mut bytes = b"0\r\nX: ".to_vec();
            bytes.resize(len + 3 - 4, b'v');
            bytes.extend_from_slice(b"\r\n\r\n");
            bytes
        };
        assert_eq!(trailers(MAX_TRAILERS).len(), 3 + MAX_TRAILERS);
        assert_eq!(feed([&trailers(MAX_TRAILERS)[..]]), Outcome::Done(3 + MAX_TRAILERS));
        assert_eq!(feed(trailers(MAX_TRAILERS + 1).chunks(1)), Outcome::Failed(LONG_TRAILERS));
        let many_lines = [&b"0\r\n"[..], &b"A: b\r\n".repeat(MAX_TRAILERS / 6 + 1), b"\r\n"].concat();
        assert_eq!(feed([&many_lines[..]]), Outcome::Failed(LONG_TRAILERS));
    }

    /// A tiny xorshift generator, so that the random tests are the same on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn one_in(&mut self, n: usize) -> bool {
            self.below(n) == 0
        }

        fn pick<'a>(&mut self, items: &[&'a [u8]]) -> &'a [u8] {
            items[self.below(items.len())]
        }

        fn bytes(&mut self, len: usize) -> impl Iterator<Item = u8> + '_ {
            (0..len).map(|_| self.next() as u8)
        }

        /// Cuts `bytes` into pieces of 1 to `max` bytes.
        fn split<'a>(&mut self, mut bytes: &'a [u8], max: usize) -> Vec<&'a [u8]> {
            let mut pieces = Vec::new();
            while !bytes.is_empty() {
                let (piece, rest) = bytes.split_at((1 + self.below(max)).min(bytes.len()));
                pieces.push(piece);
                bytes = rest;
            }
            pieces
        }

        fn line_end(&mut self) -> &'static [u8] {
            b"\r\n"
        }

        fn size_line(&mut self, size: usize, message: &mut Vec<u8>) {
            message.resize(message.len() + self.below(3), b'0');
            let hex = if self.one_in(2) { format!("{size:x}") } else { format!("{size:X}") };
            message.extend_from_slice(hex.as_bytes());
            message.extend_from_slice(self.pick(&[b"", b"", b" ", b"\t ", b";ext", b" ;a=b;c", b";q=\"x;y\""]));
            message.extend_from_slice(self.line_end());
        }

        /// A valid chunked body, as a server might send it.
        fn message(&mut self, large: bool) -> Vec<u8> {
            let mut message = Vec::new();
            for _ in 0..self.below(6) {
                let size = match self.below(10) {
                    0 if large => 100_000 + self.below(50_000),
                    0..=2 => 20 + self.below(3000),
                    _ => 1 + self.below(20),
                };
                self.size_line(size, &mut message);
                message.extend(self.bytes(size));
                message.extend_from_slice(self.line_end());
            }
            self.size_line(0, &mut message);
            for _ in 0..self.below(3) {
                message.extend_from_slice(self.pick(&[b"Expires: never", b"X-Sum: 1;2", b"a:", b"b: \t c"]));
                message.extend_from_slice(self.line_end());
            }
            message.extend_from_slice(self.line_end());
            message
        }
    }

    #[test]
    fn random_bodies_end_where_they_were_built_to_end() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..400 {
            let message = rng.message(true);
            let mut bytes = message.clone();
            let next_response = rng.below(20);
            bytes.extend(rng.bytes(next_response));
            let max = [1, 2, 7, 64, 4096, bytes.len()][rng.below(6)];
            if max == 1 && bytes.len() > 20_000 {
                continue;
            }
            let pieces = rng.split(&bytes, max);
            assert_eq!(feed(pieces), Outcome::Done(message.len()), "round {round}, pieces of up to {max} bytes");
        }
    }

    #[test]
    fn random_corruptions_fail_or_end_the_same_way_however_split() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut outcomes = [0; 3];
        for round in 0..3000 {
            let mut bytes = rng.message(false);
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(bytes.len());
                let byte = b"\r\n ;0fg\xff"[rng.below(8)];
                match rng.below(3) {
                    0 => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ => {
                        bytes.remove(at);
                    }
                }
            }
            let whole = feed([&bytes[..]]);
            if let Outcome::Done(n) = whole {
                assert!(n <= bytes.len());
            }
            assert_eq!(feed(bytes.chunks(1)), whole, "round {round}, byte by byte");
            assert_eq!(feed(rng.split(&bytes, 16)), whole, "round {round}, random pieces");
            outcomes[match whole {
                Outcome::More => 0,
                Outcome::Done(_) => 1,
                Outcome::Failed(_) => 2,
            }] += 1;
        }
        // The corruptions exercise every kind of outcome, not only the easy one.
        assert!(outcomes.iter().all(|&n| n >= 25), "outcomes (more, done, failed): {outcomes:?}");
    }
}
