//! The wire protocol of live migration, built for continuous replication to reuse: framed,
//! versioned, checksummed messages, their payloads compressed with zstd when that pays.
//!
//! Every message is one frame: a fixed 32-byte little-endian header, then the payload.
//!
//! ```text
//! offset size field
//!      0    4 magic "VMRW"
//!      4    1 protocol major version
//!      5    1 protocol minor version
//!      6    1 message kind
//!      7    1 flags (bit 0: payload compressed with zstd)
//!      8    8 sequence / epoch number
//!     16    4 payload length on the wire
//!     20    4 payload length uncompressed
//!     24    4 checksum of the uncompressed payload: the low 32 bits of its XXH64 (seed 0),
//!               as zstd's frame checksum
//!     28    4 CRC32 of bytes 0..28
//! ```
//!
//! A stream carries `Hello`, then any number of `Pages` and `State`, then `Commit`, answered
//! by `Ack` (or `Error`) in the other direction. `Sync` may come in between: the receiver
//! answers `Ack` with its number once it has applied everything sent before it. Replication
//! sends one such epoch after the other on the same stream, numbered by the sequence field.

use std::io::{self, BufReader, BufWriter, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::version::FormatVersion;
use crate::vstate::memory::{is_zero, PAGE_SIZE};

/// The first bytes of every frame.
pub const MAGIC: [u8; 4] = *b"VMRW";
/// The protocol this build speaks. A peer of the same major version and any minor is
/// understood (see [`crate::version`]); another major is refused.
///
/// 2: payloads checksummed with XXH64 rather than CRC32, which without carry-less multiply,
/// emulated, cost 5x a copy of the page. 3.0: the version is `major.minor` (header bytes 4
/// and 5, and `Hello::protocol`); 2 was one 16-bit number, read whole. 3.1: the machine's
/// state ends with the devices' additions (`vmm::devices::DevicesState`): virtio-net's pending
/// announce.
pub const PROTOCOL_VERSION: FormatVersion = FormatVersion::new(3, 1);
// The frame header holds each part of the version in one byte.
const _: () = assert!((PROTOCOL_VERSION.major | PROTOCOL_VERSION.minor) >> 8 == 0);
/// Frame header length.
pub const HEADER_LEN: usize = 32;
/// Default largest payload accepted (checked before anything is allocated).
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 << 20;
/// Pages a sender puts in one batch (2 MiB).
pub const BATCH_PAGES: usize = 512;
/// Default zstd level: fast; guest memory compresses well even so.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Bit of a page index in a batch marking an all-zero page (no data follows).
const ZERO_PAGE: u64 = 1 << 63;
const FLAG_ZSTD: u8 = 1;
/// The message kind of `Pages`.
const PAGES_KIND: u8 = 2;

/// Why a frame or message cannot be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the stream between frames.
    #[error("the peer closed the stream")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame")]
    Truncated,
    /// Not a vmr stream.
    #[error("not a vmr migration stream (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// The header is corrupt.
    #[error("corrupt frame header (checksum mismatch)")]
    HeaderChecksum,
    /// The peer speaks a protocol of another major version.
    #[error(
        "the peer speaks protocol version {found}, this vmr speaks {PROTOCOL_VERSION} (only \
         {}.x is understood)",
        PROTOCOL_VERSION.major
    )]
    Version {
        /// The peer's version.
        found: FormatVersion,
    },
    /// A message kind this build does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// A payload larger than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The payload does not match its checksum.
    #[error("corrupt frame payload (checksum mismatch)")]
    PayloadChecksum,
    /// zstd failed.
    #[error("zstd: {0}")]
    Zstd(io::Error),
    /// The payload decompressed to another size than announced.
    #[error("payload decompressed to {found} bytes, {expected} announced")]
    SizeMismatch {
        /// Announced.
        expected: u32,
        /// Found.
        found: usize,
    },
    /// A payload does not encode or decode.
    #[error("malformed payload: {0}")]
    Payload(String),
    /// A page batch names a page beyond guest memory.
    #[error("page {page} is outside guest memory ({pages} pages)")]
    PageOutOfRange {
        /// The page.
        page: u64,
        /// Pages of guest memory.
        pages: u64,
    },
}

/// Why the stream was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    /// A one-time move of the VM.
    Migration,
    /// Continuous epochs to a standby.
    Replication,
}

/// The first message of a stream: what the VM needs of its destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's protocol version.
    pub protocol: FormatVersion,
    /// Why.
    pub purpose: Purpose,
    /// Guest RAM.
    pub mem_bytes: u64,
    /// Page size of the page batches.
    pub page_size: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// The VM's TSC frequency, where known.
    pub tsc_khz: Option<u32>,
    /// The VM's configuration (opaque here).
    pub config: Vec<u8>,
}

impl Hello {
    /// A hello of this protocol version.
    pub fn new(purpose: Purpose, mem_bytes: u64, vcpus: u8, config: Vec<u8>) -> Self {
        Self {
            protocol: PROTOCOL_VERSION,
            purpose,
            mem_bytes,
            page_size: PAGE_SIZE as u32,
            vcpus,
            tsc_khz: None,
            config,
        }
    }
}

/// Guest pages: (page number, contents), an all-zero page carried by its number only.
#[derive(Debug, Clone, Default)]
pub struct PageBatch {
    /// Page numbers, [`ZERO_PAGE`] set for a zero page.
    index: Vec<u64>,
    /// The non-zero pages, in order, from `data_start` on (a received batch keeps its whole
    /// payload rather than copy the pages out of it).
    data: Vec<u8>,
    data_start: usize,
}

impl PartialEq for PageBatch {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index && self.pages_data() == other.pages_data()
    }
}

impl Eq for PageBatch {}

impl PageBatch {
    /// An empty batch with room for `pages` pages.
    pub fn with_capacity(pages: usize) -> Self {
        Self {
            index: Vec::with_capacity(pages),
            data: Vec::with_capacity(pages * PAGE_SIZE),
            data_start: 0,
        }
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Empties the batch, keeping its room.
    pub fn clear(&mut self) {
        self.index.clear();
        self.data.clear();
        self.data_start = 0;
    }

    /// Adds page `page`.
    pub fn push(&mut self, page: u64, contents: &[u8]) {
        self.push_with(page, false, |buf| buf.copy_from_slice(contents));
    }

    /// Adds page `page`, its contents written by `fill` straight into the batch; an all-zero
    /// page goes by its number only, or not at all if `skip_zero`. Whether it was added.
    pub fn push_with(&mut self, page: u64, skip_zero: bool, fill: impl FnOnce(&mut [u8])) -> bool {
        let start = self.data.len();
        self.data.resize(start + PAGE_SIZE, 0);
        fill(&mut self.data[start..]);
        if !is_zero(&self.data[start..]) {
            self.index.push(page);
            return true;
        }
        self.data.truncate(start);
        if !skip_zero {
            self.index.push(page | ZERO_PAGE);
        }
        !skip_zero
    }

    fn pages_data(&self) -> &[u8] {
        &self.data[self.data_start..]
    }

    /// (page, contents; `None` for a zero page), in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Option<&[u8]>)> + '_ {
        let mut pages = self.pages_data().chunks_exact(PAGE_SIZE);
        self.index.iter().map(move |&i| {
            if i & ZERO_PAGE != 0 {
                (i & !ZERO_PAGE, None)
            } else {
                (i, pages.next())
            }
        })
    }

    /// The payload in two parts, sent one after the other: the count and index, then the
    /// pages (not copied).
    fn encode_parts(&self) -> (Vec<u8>, &[u8]) {
        let mut head = Vec::with_capacity(4 + self.index.len() * 8);
        head.extend_from_slice(&(self.index.len() as u32).to_le_bytes());
        for i in &self.index {
            head.extend_from_slice(&i.to_le_bytes());
        }
        (head, self.pages_data())
    }

    #[cfg(test)]
    fn encode(&self) -> Vec<u8> {
        let (head, pages) = self.encode_parts();
        [&head[..], pages].concat()
    }

    /// Decodes a batch from its payload (kept, pages and all), checking every page number
    /// against `max_pages`.
    pub fn decode(payload: Vec<u8>, max_pages: u64) -> Result<Self, WireError> {
        let bad = |what: &str| WireError::Payload(format!("page batch: {what}"));
        let count = payload
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or_else(|| bad("no count"))?;
        let index_end = count
            .checked_mul(8)
            .and_then(|n| n.checked_add(4))
            .filter(|&end| end <= payload.len())
            .ok_or_else(|| bad("index longer than the payload"))?;
        let index: Vec<u64> = payload[4..index_end]
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        for &i in &index {
            let page = i & !ZERO_PAGE;
            if page >= max_pages {
                return Err(WireError::PageOutOfRange {
                    page,
                    pages: max_pages,
                });
            }
        }
        let full = index.iter().filter(|&&i| i & ZERO_PAGE == 0).count();
        if payload.len() - index_end != full * PAGE_SIZE {
            return Err(bad("data does not match the index"));
        }
        Ok(Self {
            index,
            data: payload,
            data_start: index_end,
        })
    }
}

/// A message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Opens a stream.
    Hello(Hello),
    /// Guest pages.
    Pages(PageBatch),
    /// The serialized machine state (opaque here).
    State(Vec<u8>),
    /// Everything of epoch / transfer `seq` has been sent: apply it.
    Commit {
        /// Which.
        seq: u64,
    },
    /// Answer with `Ack { seq }` once everything before this is applied (a barrier: the
    /// sender learns how far behind the receiver is).
    Sync {
        /// Which.
        seq: u64,
    },
    /// `seq` is applied (`0` answers `Hello`).
    Ack {
        /// Which.
        seq: u64,
    },
    /// The peer gives up, and why.
    Error(String),
    /// A clean end of the stream.
    Bye,
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello(_) => 1,
            Message::Pages(_) => PAGES_KIND,
            Message::State(_) => 3,
            Message::Commit { .. } => 4,
            Message::Ack { .. } => 5,
            Message::Error(_) => 6,
            Message::Bye => 7,
            Message::Sync { .. } => 8,
        }
    }
}

/// Encodes a serde value as a payload (postcard).
pub fn encode_payload<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    postcard::to_stdvec(value).map_err(|e| WireError::Payload(e.to_string()))
}

/// Decodes a payload made by [`encode_payload`].
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    postcard::from_bytes(payload).map_err(|e| WireError::Payload(e.to_string()))
}

/// Sends messages on a stream.
pub struct MessageWriter<W: Write> {
    out: BufWriter<W>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    bytes_sent: u64,
}

impl<W: Write> MessageWriter<W> {
    /// A writer compressing at [`DEFAULT_ZSTD_LEVEL`].
    pub fn new(out: W) -> Self {
        Self::with_compression(out, Some(DEFAULT_ZSTD_LEVEL))
    }

    /// A writer compressing at `level`, or not at all.
    pub fn with_compression(out: W, level: Option<i32>) -> Self {
        Self {
            out: BufWriter::with_capacity(1 << 20, out),
            compressor: level.and_then(|l| zstd::bulk::Compressor::new(l).ok()),
            bytes_sent: 0,
        }
    }

    /// Bytes written so far, headers included.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Sends `msg` (buffered: [`MessageWriter::flush`] pushes it out).
    pub fn send(&mut self, msg: &Message) -> Result<(), WireError> {
        let kind = msg.kind();
        match msg {
            Message::Hello(h) => self.send_frame(kind, 0, &[&encode_payload(h)?[..]]),
            Message::Pages(batch) => self.send_pages(batch),
            Message::State(state) => self.send_frame(kind, 0, &[&state[..]]),
            Message::Commit { seq } | Message::Ack { seq } | Message::Sync { seq } => {
                self.send_frame(kind, *seq, &[])
            }
            Message::Error(reason) => self.send_frame(kind, 0, &[reason.as_bytes()]),
            Message::Bye => self.send_frame(kind, 0, &[]),
        }
    }

    /// Sends a `Pages` message of `batch`, which the caller keeps (to fill again).
    pub fn send_pages(&mut self, batch: &PageBatch) -> Result<(), WireError> {
        let (head, pages) = batch.encode_parts();
        self.send_frame(PAGES_KIND, 0, &[&head, pages])
    }

    /// Sends one frame whose payload is `parts`, one after the other.
    fn send_frame(&mut self, kind: u8, seq: u64, parts: &[&[u8]]) -> Result<(), WireError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let checksum = payload_checksum(parts);
        let compressed = match &mut self.compressor {
            Some(c) if len >= 256 => c.compress(&parts.concat()).ok().filter(|z| z.len() < len),
            _ => None,
        };
        let (flags, wire_len) = match &compressed {
            Some(z) => (FLAG_ZSTD, z.len()),
            None => (0, len),
        };
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = PROTOCOL_VERSION.major as u8;
        h[5] = PROTOCOL_VERSION.minor as u8;
        h[6] = kind;
        h[7] = flags;
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        h[16..20].copy_from_slice(&(wire_len as u32).to_le_bytes());
        h[20..24].copy_from_slice(&(len as u32).to_le_bytes());
        h[24..28].copy_from_slice(&checksum.to_le_bytes());
        let crc = crc32fast::hash(&h[..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        self.out.write_all(&h)?;
        match &compressed {
            Some(z) => self.out.write_all(z)?,
            None => {
                for part in parts {
                    self.out.write_all(part)?;
                }
            }
        }
        self.bytes_sent += (HEADER_LEN + wire_len) as u64;
        Ok(())
    }

    /// Pushes buffered frames to the stream.
    pub fn flush(&mut self) -> Result<(), WireError> {
        self.out.flush().map_err(Into::into)
    }
}

/// The buffer of a [`MessageReader`].
const READ_BUFFER: usize = 64 << 10;

/// Receives messages from a stream.
pub struct MessageReader<R: Read> {
    input: BufReader<R>,
    max_payload: u32,
    max_pages: u64,
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

impl<R: Read> MessageReader<R> {
    /// A reader accepting payloads up to [`DEFAULT_MAX_PAYLOAD`].
    pub fn new(input: R) -> Self {
        Self {
            // Headers come out of the buffer; a payload bigger than it is read straight
            // into its own buffer.
            input: BufReader::with_capacity(READ_BUFFER, input),
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_pages: u64::MAX,
        }
    }

    /// Refuses page batches naming pages at or beyond `pages` (guest memory size).
    pub fn set_max_pages(&mut self, pages: u64) {
        self.max_pages = pages;
    }

    /// The next message.
    pub fn recv(&mut self) -> Result<Message, WireError> {
        let (kind, seq, payload) = self.recv_frame()?;
        Ok(match kind {
            1 => Message::Hello(decode_payload(&payload)?),
            PAGES_KIND => Message::Pages(PageBatch::decode(payload, self.max_pages)?),
            3 => Message::State(payload),
            4 => Message::Commit { seq },
            5 => Message::Ack { seq },
            6 => Message::Error(String::from_utf8_lossy(&payload).into_owned()),
            7 => Message::Bye,
            8 => Message::Sync { seq },
            other => return Err(WireError::UnknownKind(other)),
        })
    }

    fn recv_frame(&mut self) -> Result<(u8, u64, Vec<u8>), WireError> {
        let mut h = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.input.read(&mut h[got..]) {
                Ok(0) if got == 0 => return Err(WireError::Closed),
                Ok(0) => return Err(WireError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if h[0..4] != MAGIC {
            return Err(WireError::BadMagic(h[0..4].try_into().expect("4 bytes")));
        }
        if crc32fast::hash(&h[..28]) != le32(&h[28..32]) {
            return Err(WireError::HeaderChecksum);
        }
        let version = FormatVersion::new(h[4].into(), h[5].into());
        if !PROTOCOL_VERSION.reads(version) {
            return Err(WireError::Version { found: version });
        }
        let (kind, flags) = (h[6], h[7]);
        let seq = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let wire_len = le32(&h[16..20]);
        let raw_len = le32(&h[20..24]);
        for len in [wire_len, raw_len] {
            if len > self.max_payload {
                return Err(WireError::TooLarge {
                    len,
                    max: self.max_payload,
                });
            }
        }
        let mut body = vec![0u8; wire_len as usize];
        self.input.read_exact(&mut body).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                WireError::Truncated
            } else {
                e.into()
            }
        })?;
        let payload = if flags & FLAG_ZSTD != 0 {
            let out = zstd::bulk::decompress(&body, raw_len as usize).map_err(WireError::Zstd)?;
            if out.len() != raw_len as usize {
                return Err(WireError::SizeMismatch {
                    expected: raw_len,
                    found: out.len(),
                });
            }
            out
        } else {
            if wire_len != raw_len {
                return Err(WireError::SizeMismatch {
                    expected: raw_len,
                    found: body.len(),
                });
            }
            body
        };
        if payload_checksum(&[&payload]) != le32(&h[24..28]) {
            return Err(WireError::PayloadChecksum);
        }
        Ok((kind, seq, payload))
    }
}

/// The checksum of a payload sent in `parts`: the low 32 bits of its XXH64.
fn payload_checksum(parts: &[&[u8]]) -> u32 {
    use std::hash::Hasher as _;
    let mut hasher = twox_hash::XxHash64::with_seed(0);
    parts.iter().for_each(|p| hasher.write(p));
    hasher.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        let mut p = vec![fill; PAGE_SIZE];
        p[7] = fill.wrapping_add(1);
        p
    }

    fn messages() -> Vec<Message> {
        let mut batch = PageBatch::default();
        batch.push(3, &page(1));
        batch.push(9, &[0u8; PAGE_SIZE]);
        batch.push(10, &page(200));
        vec![
            Message::Hello(Hello::new(Purpose::Migration, 64 << 20, 2, vec![1, 2, 3])),
            Message::Pages(batch),
            Message::State((0..5000u32).map(|i| (i % 7) as u8).collect()),
            Message::Commit { seq: 41 },
            Message::Sync { seq: 42 },
            Message::Ack { seq: 41 },
            Message::Error("no room here".into()),
            Message::Bye,
        ]
    }

    fn encode_all(level: Option<i32>) -> Vec<u8> {
        let mut w = MessageWriter::with_compression(Vec::new(), level);
        for m in messages() {
            w.send(&m).unwrap();
        }
        w.flush().unwrap();
        w.out.into_inner().unwrap()
    }

    #[test]
    fn every_message_round_trips_compressed_or_not() {
        for level in [None, Some(1), Some(3)] {
            let bytes = encode_all(level);
            let mut r = MessageReader::new(&bytes[..]);
            for m in messages() {
                assert_eq!(r.recv().unwrap(), m);
            }
            assert!(matches!(r.recv(), Err(WireError::Closed)));
        }
        assert!(
            encode_all(Some(1)).len() < encode_all(None).len(),
            "pages compress"
        );
    }

    #[test]
    fn zero_pages_travel_as_numbers_only() {
        let mut b = PageBatch::default();
        b.push(5, &[0u8; PAGE_SIZE]);
        assert_eq!(b.encode().len(), 4 + 8);
        let back = PageBatch::decode(b.encode(), 10).unwrap();
        assert_eq!(back.iter().collect::<Vec<_>>(), vec![(5, None)]);
    }

    #[test]
    fn truncation_anywhere_is_detected() {
        let bytes = encode_all(Some(1));
        for len in 1..bytes.len() {
            let mut r = MessageReader::new(&bytes[..len]);
            let mut result = Ok(Message::Bye);
            while result.is_ok() {
                result = r.recv();
            }
            let err = result.unwrap_err();
            assert!(
                matches!(err, WireError::Truncated | WireError::Closed),
                "cut at {len}: {err}"
            );
        }
    }

    #[test]
    fn every_bit_flip_of_a_frame_is_detected() {
        let mut w = MessageWriter::with_compression(Vec::new(), None);
        w.send(&Message::State(b"state of the machine".to_vec()))
            .unwrap();
        w.flush().unwrap();
        let bytes = w.out.into_inner().unwrap();
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let result = MessageReader::new(&b[..]).recv();
            assert!(result.is_err(), "bit {bit} went unnoticed: {result:?}");
        }
    }

    #[test]
    fn bad_magic_future_versions_and_huge_frames_are_refused() {
        let good = encode_all(None);
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(
            MessageReader::new(&b[..]).recv(),
            Err(WireError::BadMagic(_))
        ));

        let with_header = |edit: &dyn Fn(&mut [u8])| {
            let mut b = good.clone();
            edit(&mut b[..HEADER_LEN]);
            let crc = crc32fast::hash(&b[..28]);
            b[28..32].copy_from_slice(&crc.to_le_bytes());
            MessageReader::new(&b[..]).recv()
        };
        let future = PROTOCOL_VERSION.major as u8 + 1;
        let err = with_header(&|h| h[4] = future).unwrap_err();
        assert!(
            err.to_string().contains(&format!("version {future}.")),
            "{err}"
        );
        let err = with_header(&|h| h[16..20].copy_from_slice(&u32::MAX.to_le_bytes())).unwrap_err();
        assert!(matches!(err, WireError::TooLarge { .. }), "{err}");
        let err = with_header(&|h| h[6] = 99).unwrap_err();
        assert!(
            matches!(err, WireError::UnknownKind(99) | WireError::Payload(_)),
            "{err}"
        );
    }

    #[test]
    fn pages_beyond_guest_memory_are_refused() {
        let mut b = PageBatch::default();
        b.push(100, &page(3));
        assert!(matches!(
            PageBatch::decode(b.encode(), 100),
            Err(WireError::PageOutOfRange {
                page: 100,
                pages: 100
            })
        ));
        let mut payload = b.encode();
        payload.truncate(payload.len() - 1);
        assert!(PageBatch::decode(payload, 1000).is_err());
    }

    #[test]
    fn pages_are_filled_in_place_and_zero_pages_skipped_on_request() {
        let mut b = PageBatch::with_capacity(4);
        assert!(b.push_with(1, true, |buf| buf.copy_from_slice(&page(9))));
        assert!(!b.push_with(2, true, |_| {}));
        assert!(b.push_with(3, false, |_| {}));
        let sent = PageBatch::decode(b.encode(), 10).unwrap();
        assert_eq!(sent, b);
        let pages: Vec<_> = sent
            .iter()
            .map(|(p, d)| (p, d.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(pages, vec![(1, Some(page(9))), (3, None)]);
        b.clear();
        assert!(b.is_empty() && b.encode().len() == 4);
    }

    #[test]
    fn a_peer_hanging_up_mid_stream_is_an_error_not_a_hang() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = std::thread::spawn(move || {
            let s = std::net::TcpStream::connect(addr).unwrap();
            let mut w = MessageWriter::new(s);
            w.send(&Message::Commit { seq: 7 }).unwrap();
            w.flush().unwrap();
            // Half a frame, then gone.
            let bytes = encode_all(None);
            let mut s = w.out.into_inner().unwrap();
            s.write_all(&bytes[..HEADER_LEN + 3]).unwrap();
        });
        let (s, _) = listener.accept().unwrap();
        let mut r = MessageReader::new(s);
        assert_eq!(r.recv().unwrap(), Message::Commit { seq: 7 });
        sender.join().unwrap();
        assert!(matches!(r.recv(), Err(WireError::Truncated)));
    }

    /// Re-encodes the first frame of `good` with header bytes 4 and 5 (major, minor) set.
    fn with_version(good: &[u8], major: u8, minor: u8) -> Vec<u8> {
        let mut b = good.to_vec();
        b[4] = major;
        b[5] = minor;
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn a_peer_of_the_same_major_and_another_minor_version_is_understood() {
        let good = encode_all(None);
        let (major, minor) = (good[4], good[5]);
        for other_minor in [minor.wrapping_add(1), minor.wrapping_add(7)] {
            let b = with_version(&good, major, other_minor);
            let mut r = MessageReader::new(&b[..]);
            let first = r.recv();
            assert!(
                first.is_ok(),
                "version {major}.{other_minor} refused: {first:?}"
            );
        }
        let older = with_version(&good, major - 1, 0);
        let err = MessageReader::new(&older[..]).recv().unwrap_err();
        let reason = err.to_string();
        assert!(
            reason.contains(&format!("{}.0", major - 1))
                && reason.contains(&format!("{major}.{minor}"))
                && !reason.contains('\n'),
            "{reason}"
        );
    }

    #[test]
    fn a_hello_of_a_newer_minor_version_with_more_fields_decodes() {
        #[derive(Serialize)]
        struct NewerHello {
            hello: Hello,
            added_by_a_minor: Vec<u64>,
        }
        let hello = Hello::new(Purpose::Migration, 64 << 20, 2, b"config".to_vec());
        let newer = NewerHello {
            hello: Hello {
                protocol: FormatVersion::new(PROTOCOL_VERSION.major, PROTOCOL_VERSION.minor + 1),
                ..hello.clone()
            },
            added_by_a_minor: vec![1, 2, 3],
        };
        let decoded: Hello = decode_payload(&encode_payload(&newer).unwrap()).unwrap();
        assert_eq!(decoded.config, hello.config);
        assert!(PROTOCOL_VERSION.reads(decoded.protocol));
    }
}
