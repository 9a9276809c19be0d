//! The replication wire protocol: the messages of an epoch stream and their authenticated
//! frames.
//!
//! Every message is one frame: a fixed 56-byte little-endian header, then the payload (the
//! message in postcard, compressed with zstd when that pays).
//!
//! ```text
//! offset size field
//!      0    4 magic "VMRE"
//!      4    1 flags (bit 0: payload compressed with zstd; other bits zero)
//!      5    3 reserved, zero
//!      8    8 sequence number: 0 for the first frame of each direction of a connection, then +1
//!     16    4 payload length on the wire
//!     20    4 payload length decoded
//!     24   32 HMAC-SHA256 under the shared key of
//!               direction (1 byte) | connection nonce (64 bytes) | bytes 0..24 | wire payload
//! ```
//!
//! Lengths are checked against the reader's limit before anything is allocated, the MAC before
//! anything is decompressed or decoded, the sequence number after the MAC: a frame replayed
//! from earlier in the connection, reordered, forged, cut short, or taken from another
//! connection or the other direction is refused, each with its own [`FrameError`].
//!
//! A connection opens with the challenge/response handshake of [`crate::auth`], which yields
//! the connection nonce; then the primary sends [`Message::Hello`] and the standby answers
//! [`Message::HelloAck`] or [`Message::Refuse`] (see [`crate::pairing`]). Epochs follow:
//! `EpochBegin`, any number of `Pages`, `State`, `DiskWrite`, then `EpochEnd`, answered by
//! `Ack` once the standby committed the epoch. `Inbound` frames and `Heartbeat`s may come at
//! any point.

use std::io::{self, BufReader, BufWriter, Read, Write};

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use vmm::vstate::memory::{is_zero, PAGE_SIZE};

use crate::compat::{Hello, HelloAck};

/// The first bytes of every frame.
pub const MAGIC: [u8; 4] = *b"VMRE";
/// Frame header length.
pub const HEADER_LEN: usize = 56;
/// Length of the authenticated part of the header (everything before the MAC).
const MAC_OFFSET: usize = 24;
/// Length of a frame MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Length of a connection nonce (the two handshake nonces).
pub const CONNECTION_NONCE_LEN: usize = 64;
/// Default largest payload accepted, on the wire or decoded (checked before allocating).
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 << 20;
/// Pages a sender puts in one batch (2 MiB).
pub const BATCH_PAGES: usize = 512;
/// Default zstd level: fast; guest memory compresses well even so.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Payloads shorter than this are never compressed.
const COMPRESS_MIN: usize = 256;
/// Frame flag: the payload is compressed with zstd.
pub const FLAG_ZSTD: u8 = 1;

type HmacSha256 = Hmac<Sha256>;

/// Why a frame cannot be sent or received. One variant per failing step.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed.
    #[error("replication stream I/O error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the stream between frames.
    #[error("the peer closed the replication stream")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the replication stream ended inside a frame")]
    Truncated,
    /// Not a vmr replication stream.
    #[error("not a vmr replication stream (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A payload larger than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The frame's MAC is wrong: forged, corrupted, or from another connection or direction.
    #[error("frame {seq} failed authentication (forged, corrupted or from another connection)")]
    BadMac {
        /// The sequence number the frame claims.
        seq: u64,
    },
    /// An authentic frame seen before in this connection.
    #[error("replayed frame: sequence {seq}, expected {expected}")]
    Replayed {
        /// The frame's sequence number.
        seq: u64,
        /// The one expected.
        expected: u64,
    },
    /// An authentic frame from later in the connection: frames in between are missing.
    #[error("frame out of order: sequence {seq}, expected {expected}")]
    OutOfOrder {
        /// The frame's sequence number.
        seq: u64,
        /// The one expected.
        expected: u64,
    },
    /// Flags or reserved bytes this build does not know.
    #[error("frame header has unknown flags {0:#04x}")]
    UnknownFlags(u8),
    /// zstd failed.
    #[error("zstd: {0}")]
    Zstd(io::Error),
    /// The payload decoded to another size than announced.
    #[error("payload decoded to {found} bytes, {expected} announced")]
    SizeMismatch {
        /// Announced.
        expected: u32,
        /// Found.
        found: usize,
    },
    /// The payload is not a message of this protocol.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A message too large for one frame.
    #[error("message of {len} bytes does not fit in a frame")]
    MessageTooLarge {
        /// Its encoded length.
        len: usize,
    },
}

/// Which way a frame travels; part of every MAC, so a frame cannot be reflected back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Primary to standby.
    ToStandby = 1,
    /// Standby to primary.
    ToPrimary = 2,
}

/// What authenticates the frames of one direction of one connection.
#[derive(Clone)]
pub struct FrameAuth {
    /// HMAC keyed with the shared key, already fed the direction and connection nonce.
    base: HmacSha256,
}

impl std::fmt::Debug for FrameAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameAuth(..)")
    }
}

impl FrameAuth {
    /// Frames of `direction` under `key` in the connection of `nonce`.
    pub fn new(key: &[u8], nonce: &[u8; CONNECTION_NONCE_LEN], direction: Direction) -> Self {
        let mut base = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        base.update(&[direction as u8]);
        base.update(nonce);
        Self { base }
    }

    fn mac(&self, header: &[u8], payload: &[u8]) -> HmacSha256 {
        let mut mac = self.base.clone();
        mac.update(header);
        mac.update(payload);
        mac
    }
}

/// Guest pages: (page number, contents), an all-zero page carried by its number only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageBatch {
    /// `page << 1 | 1` for an all-zero page, `page << 1` for a page whose contents follow in
    /// `data` (in order).
    index: Vec<u64>,
    /// The non-zero pages, one after the other.
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

impl PageBatch {
    /// An empty batch with room for `pages` pages.
    pub fn with_capacity(pages: usize) -> Self {
        Self {
            index: Vec::with_capacity(pages),
            data: Vec::with_capacity(pages * PAGE_SIZE),
        }
    }

    /// Pages in the batch, zero pages included.
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
    }

    /// Adds page `page` (`contents` is one page); an all-zero page goes by its number only.
    pub fn push(&mut self, page: u64, contents: &[u8]) {
        self.push_with(page, |buf| buf.copy_from_slice(contents));
    }

    /// Adds page `page`, its contents written by `fill` straight into the batch; an all-zero
    /// page goes by its number only.
    pub fn push_with(&mut self, page: u64, fill: impl FnOnce(&mut [u8])) {
        assert!(page < 1 << 63, "page number {page} out of range");
        let start = self.data.len();
        self.data.resize(start + PAGE_SIZE, 0);
        fill(&mut self.data[start..]);
        if is_zero(&self.data[start..]) {
            self.data.truncate(start);
            self.index.push(page << 1 | 1);
        } else {
            self.index.push(page << 1);
        }
    }

    /// (page, contents; `None` for a zero page), in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Option<&[u8]>)> + '_ {
        let mut pages = self.data.chunks_exact(PAGE_SIZE);
        self.index.iter().map(move |&i| {
            if i & 1 != 0 {
                (i >> 1, None)
            } else {
                (i >> 1, pages.next())
            }
        })
    }

    /// Checks that the data holds exactly the non-zero pages the index names.
    pub fn validate(&self) -> Result<(), String> {
        let full = self.index.iter().filter(|&&i| i & 1 == 0).count();
        match full.checked_mul(PAGE_SIZE) {
            Some(n) if n == self.data.len() => Ok(()),
            _ => Err(format!(
                "page batch: {} bytes of data for {full} non-zero pages",
                self.data.len()
            )),
        }
    }
}

/// A message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// The primary opens the stream: what the VM needs of a standby.
    Hello(Hello),
    /// The standby can hold the VM.
    HelloAck(HelloAck),
    /// The peer refuses the pairing or gives up the stream, and why (one line).
    Refuse {
        /// Why.
        reason: String,
    },
    /// Epoch `epoch` of the primary in `term` starts.
    EpochBegin {
        /// Which.
        epoch: u64,
        /// The primary's term (fencing token).
        term: u64,
    },
    /// Guest pages of the open epoch.
    Pages(PageBatch),
    /// The vmm's encoded vCPU and device state at the end of the open epoch (opaque here).
    State(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A write the guest made to disk `disk` during the open epoch.
    DiskWrite {
        /// Which disk (index in the Hello's list).
        disk: u32,
        /// Byte offset in the image.
        offset: u64,
        /// What was written.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// A frame the primary delivered to the guest during `epoch`, for replay on failover.
    Inbound {
        /// The epoch in which the guest received it.
        epoch: u64,
        /// Which network device.
        net: u32,
        /// The Ethernet frame.
        #[serde(with = "serde_bytes")]
        frame: Vec<u8>,
    },
    /// Everything of `epoch` has been sent.
    EpochEnd {
        /// Which.
        epoch: u64,
        /// Pages sent in the epoch, zero pages included.
        pages: u64,
        /// [`crate::epoch::EpochDigest`] of the epoch's content.
        digest: [u8; 16],
    },
    /// The standby committed `epoch`.
    Ack {
        /// Which.
        epoch: u64,
    },
    /// The link is alive though idle.
    Heartbeat {
        /// The sender's term.
        term: u64,
        /// The last epoch the sender sent (primary) or committed (standby).
        epoch: u64,
    },
    /// The initial synchronisation converged: the output of every epoch up to `through` left
    /// the primary without waiting for this standby (the VM was not protected yet); from the
    /// next epoch on, output waits for its acks. A takeover needs `through` committed.
    Protected {
        /// The last epoch whose output was released without this standby's ack.
        through: u64,
    },
    /// A planned switch-over: the primary stopped its VM at `epoch`, which this standby
    /// committed, and will not run it again: take it over from there.
    Handover {
        /// The last epoch, committed.
        epoch: u64,
    },
    /// This (fresh) standby joins a VM protected already (protocol 1.2): `Pages` outside any
    /// epoch follow, a copy of guest memory taken while the guest runs, written straight into
    /// the standby's memory; then its first epoch, of whatever number, which carries every page
    /// written since the copy began.
    Join,
    /// A copy of disk `disk` follows, for a joining standby (protocol 1.3): the standby
    /// zeroes its image, then takes `DiskWrite`s outside any epoch straight into it (the
    /// image's data, read while the guest runs, then the writes the guest made meanwhile)
    /// until its first epoch.
    DiskSync {
        /// Which disk (index in the Hello's list).
        disk: u32,
    },
}

impl Message {
    /// The message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::HelloAck(_) => "HelloAck",
            Message::Refuse { .. } => "Refuse",
            Message::EpochBegin { .. } => "EpochBegin",
            Message::Pages(_) => "Pages",
            Message::State(_) => "State",
            Message::DiskWrite { .. } => "DiskWrite",
            Message::Inbound { .. } => "Inbound",
            Message::EpochEnd { .. } => "EpochEnd",
            Message::Ack { .. } => "Ack",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::Protected { .. } => "Protected",
            Message::Handover { .. } => "Handover",
            Message::Join => "Join",
            Message::DiskSync { .. } => "DiskSync",
        }
    }

    /// The message as a frame payload (before compression).
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        // Room for the bulk of the message up front: no regrowing (and copying) of megabytes.
        let bulk = match self {
            Message::Pages(b) => b.data.len() + b.index.len() * 10,
            Message::State(s) => s.len(),
            Message::DiskWrite { bytes, .. } => bytes.len(),
            Message::Inbound { frame, .. } => frame.len(),
            _ => 0,
        };
        let mut out = Vec::with_capacity(bulk + 64);
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// [`Message::encode`] into `out` (emptied first; its room is kept from one message to the
    /// next).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        out.clear();
        // `to_io` writes each byte string with one copy (`to_extend` goes byte by byte).
        postcard::to_io(self, out)
            .map(drop)
            .map_err(|e| FrameError::Malformed(e.to_string()))
    }

    /// Decodes a frame payload (after decompression), checking the message's own
    /// consistency; trailing bytes are refused.
    pub fn decode(payload: &[u8]) -> Result<Self, FrameError> {
        let (msg, rest): (Message, _) =
            postcard::take_from_bytes(payload).map_err(|e| FrameError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(FrameError::Malformed(format!(
                "{} trailing bytes after {}",
                rest.len(),
                msg.name()
            )));
        }
        if let Message::Pages(batch) = &msg {
            batch.validate().map_err(FrameError::Malformed)?;
        }
        Ok(msg)
    }
}

/// The header of a frame carrying `wire` (`raw_len` bytes once decoded), authenticated with
/// `auth`. Public for the fuzz targets, which must get past the MAC to reach the decoders.
pub fn frame_header(
    auth: &FrameAuth,
    seq: u64,
    flags: u8,
    wire: &[u8],
    raw_len: u32,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = flags;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&(wire.len() as u32).to_le_bytes());
    h[20..24].copy_from_slice(&raw_len.to_le_bytes());
    let tag = auth.mac(&h[..MAC_OFFSET], wire).finalize().into_bytes();
    h[MAC_OFFSET..].copy_from_slice(&tag);
    h
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

/// Encodes messages into frame payloads (postcard, then zstd when that pays), keeping its
/// buffers from one message to the next (no fresh megabytes, and their page faults, per
/// frame). A [`FrameWriter`] has one; [`Fanout`] shares one between several links, so that a
/// message sent to every standby is encoded and compressed once.
pub struct FrameEncoder {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    max_payload: u32,
    payload: Vec<u8>,
    compressed: Vec<u8>,
    /// A batch of pages for the next [`crate::epoch::EpochWriter`], its room kept likewise.
    spare_batch: Option<PageBatch>,
}

/// A message as [`FrameEncoder::encode`] made it: what goes on the wire after the header.
#[derive(Debug, Clone, Copy)]
pub struct Encoded<'a> {
    flags: u8,
    wire: &'a [u8],
    raw_len: u32,
}

impl FrameEncoder {
    /// An encoder compressing at `zstd_level` (or not at all).
    pub fn new(zstd_level: Option<i32>) -> Self {
        Self {
            compressor: zstd_level.and_then(|l| zstd::bulk::Compressor::new(l).ok()),
            max_payload: DEFAULT_MAX_PAYLOAD,
            payload: Vec::new(),
            compressed: Vec::new(),
            spare_batch: None,
        }
    }

    /// Encodes `msg`, compressed if that makes it shorter.
    pub fn encode(&mut self, msg: &Message) -> Result<Encoded<'_>, FrameError> {
        msg.encode_into(&mut self.payload)?;
        let payload = &self.payload;
        if payload.len() > self.max_payload as usize {
            return Err(FrameError::MessageTooLarge { len: payload.len() });
        }
        let compressed = match &mut self.compressor {
            Some(c) if payload.len() >= COMPRESS_MIN => {
                let z = &mut self.compressed;
                z.clear();
                z.reserve(zstd::zstd_safe::compress_bound(payload.len()));
                c.compress_to_buffer(payload, z).is_ok() && z.len() < payload.len()
            }
            _ => false,
        };
        let (flags, wire): (u8, &[u8]) = if compressed {
            (FLAG_ZSTD, &self.compressed)
        } else {
            (0, payload)
        };
        Ok(Encoded {
            flags,
            wire,
            raw_len: payload.len() as u32,
        })
    }

    /// A batch of pages to fill, empty: the one given back last, or a new one.
    fn take_batch(&mut self) -> PageBatch {
        self.spare_batch
            .take()
            .unwrap_or_else(|| PageBatch::with_capacity(BATCH_PAGES))
    }

    /// Keeps `batch`'s room for the next [`FrameEncoder::take_batch`].
    fn give_batch(&mut self, mut batch: PageBatch) {
        batch.clear();
        self.spare_batch = Some(batch);
    }
}

/// Where an epoch's messages go: one link ([`FrameWriter`]) or several at once ([`Fanout`]).
pub trait FrameSink {
    /// Sends `msg` (buffered until [`FrameSink::flush`]).
    fn send(&mut self, msg: &Message) -> Result<(), FrameError>;
    /// Pushes buffered frames out.
    fn flush(&mut self) -> Result<(), FrameError>;
    /// A batch of pages to fill, empty, its room kept from an earlier batch.
    fn take_batch(&mut self) -> PageBatch;
    /// Gives a batch's room back for the next [`FrameSink::take_batch`].
    fn give_batch(&mut self, batch: PageBatch);
}

/// Sends authenticated frames on one direction of a connection.
pub struct FrameWriter<W: Write> {
    link: LinkOut<W>,
    encoder: FrameEncoder,
}

/// The per-link part of a [`FrameWriter`]: the stream, the key and the sequence numbers.
struct LinkOut<W: Write> {
    out: BufWriter<W>,
    auth: FrameAuth,
    seq: u64,
    bytes_sent: u64,
}

impl<W: Write> LinkOut<W> {
    /// Writes one frame: the header (the next sequence number, the MAC) and the encoded
    /// payload.
    fn write(&mut self, e: Encoded<'_>) -> Result<(), FrameError> {
        let h = frame_header(&self.auth, self.seq, e.flags, e.wire, e.raw_len);
        self.out.write_all(&h)?;
        self.out.write_all(e.wire)?;
        self.seq += 1;
        self.bytes_sent += (HEADER_LEN + e.wire.len()) as u64;
        Ok(())
    }
}

impl<W: Write> FrameWriter<W> {
    /// A writer authenticating with `auth`, compressing at `zstd_level` (or not at all).
    pub fn new(out: W, auth: FrameAuth, zstd_level: Option<i32>) -> Self {
        Self {
            link: LinkOut {
                out: BufWriter::with_capacity(1 << 20, out),
                auth,
                seq: 0,
                bytes_sent: 0,
            },
            encoder: FrameEncoder::new(zstd_level),
        }
    }

    /// Bytes written so far, headers included.
    pub fn bytes_sent(&self) -> u64 {
        self.link.bytes_sent
    }

    /// The sequence number of the next frame.
    pub fn next_seq(&self) -> u64 {
        self.link.seq
    }

    /// Sends `msg` (buffered: [`FrameWriter::flush`] pushes it out).
    pub fn send(&mut self, msg: &Message) -> Result<(), FrameError> {
        self.link.write(self.encoder.encode(msg)?)
    }

    /// Sends a message another encoder made (buffered), with this link's sequence number and
    /// MAC.
    pub fn send_encoded(&mut self, encoded: Encoded<'_>) -> Result<(), FrameError> {
        self.link.write(encoded)
    }

    /// Pushes buffered frames to the stream.
    pub fn flush(&mut self) -> Result<(), FrameError> {
        self.link.out.flush().map_err(Into::into)
    }

    /// Sends `msg` and flushes.
    pub fn send_now(&mut self, msg: &Message) -> Result<(), FrameError> {
        self.send(msg)?;
        self.flush()
    }

    /// The stream, after a flush.
    pub fn into_inner(self) -> Result<W, FrameError> {
        self.link
            .out
            .into_inner()
            .map_err(|e| FrameError::Io(e.into_error()))
    }
}

impl<W: Write> FrameSink for FrameWriter<W> {
    fn send(&mut self, msg: &Message) -> Result<(), FrameError> {
        FrameWriter::send(self, msg)
    }

    fn flush(&mut self) -> Result<(), FrameError> {
        FrameWriter::flush(self)
    }

    fn take_batch(&mut self) -> PageBatch {
        self.encoder.take_batch()
    }

    fn give_batch(&mut self, batch: PageBatch) {
        self.encoder.give_batch(batch)
    }
}

/// The same messages to several links, each encoded and compressed once (only the header, with
/// each link's sequence number and MAC, is made per link). A link whose write fails is left
/// out from then on and its error kept ([`Fanout::finish`]); the others go on. Sending fails
/// only when the message cannot be encoded, or when no link is left.
pub struct Fanout<'a, W: Write> {
    encoder: &'a mut FrameEncoder,
    links: Vec<(&'a mut FrameWriter<W>, Option<FrameError>)>,
}

impl<'a, W: Write> Fanout<'a, W> {
    /// A fan-out over `links`, encoding with `encoder`.
    pub fn new(
        encoder: &'a mut FrameEncoder,
        links: impl IntoIterator<Item = &'a mut FrameWriter<W>>,
    ) -> Self {
        Self {
            encoder,
            links: links.into_iter().map(|w| (w, None)).collect(),
        }
    }

    /// Each link's outcome, in the order given: `None` if everything reached its stream.
    pub fn finish(self) -> Vec<Option<FrameError>> {
        self.links.into_iter().map(|(_, e)| e).collect()
    }
}

/// Applies `f` to every link of a [`Fanout`] still writing; fails when none is left.
fn each_link<W: Write>(
    links: &mut [(&mut FrameWriter<W>, Option<FrameError>)],
    mut f: impl FnMut(&mut FrameWriter<W>) -> Result<(), FrameError>,
) -> Result<(), FrameError> {
    let mut left = 0;
    for (w, failed) in links.iter_mut().filter(|(_, e)| e.is_none()) {
        match f(w) {
            Ok(()) => left += 1,
            Err(e) => *failed = Some(e),
        }
    }
    if left == 0 && !links.is_empty() {
        return Err(FrameError::Io(io::Error::other(
            "every link of the fan-out failed",
        )));
    }
    Ok(())
}

impl<W: Write> FrameSink for Fanout<'_, W> {
    fn send(&mut self, msg: &Message) -> Result<(), FrameError> {
        let encoded = self.encoder.encode(msg)?;
        each_link(&mut self.links, |w| w.send_encoded(encoded))
    }

    fn flush(&mut self) -> Result<(), FrameError> {
        each_link(&mut self.links, FrameWriter::flush)
    }

    fn take_batch(&mut self) -> PageBatch {
        self.encoder.take_batch()
    }

    fn give_batch(&mut self, batch: PageBatch) {
        self.encoder.give_batch(batch)
    }
}

/// The buffer of a [`FrameReader`].
const READ_BUFFER: usize = 64 << 10;

/// Receives authenticated frames from one direction of a connection.
pub struct FrameReader<R: Read> {
    input: BufReader<R>,
    auth: FrameAuth,
    expected: u64,
    max_payload: u32,
    decompressor: zstd::bulk::Decompressor<'static>,
    /// The last frame as it came and its payload: their room is kept from one frame to the
    /// next.
    wire: Vec<u8>,
    payload: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    /// A reader checking frames against `auth`, accepting payloads up to
    /// [`DEFAULT_MAX_PAYLOAD`].
    pub fn new(input: R, auth: FrameAuth) -> Self {
        Self {
            input: BufReader::with_capacity(READ_BUFFER, input),
            auth,
            expected: 0,
            max_payload: DEFAULT_MAX_PAYLOAD,
            decompressor: zstd::bulk::Decompressor::new().expect("zstd decompression context"),
            wire: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// Refuses payloads larger than `max` bytes, on the wire or decoded.
    pub fn set_max_payload(&mut self, max: u32) {
        self.max_payload = max;
    }

    /// The sequence number the next frame must carry.
    pub fn expected_seq(&self) -> u64 {
        self.expected
    }

    /// The next message.
    pub fn recv(&mut self) -> Result<Message, FrameError> {
        self.recv_payload()?;
        Message::decode(&self.payload)
    }

    /// Reads the next frame's payload, authenticated, in sequence and decompressed, into
    /// `self.payload`.
    fn recv_payload(&mut self) -> Result<(), FrameError> {
        let mut h = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.input.read(&mut h[got..]) {
                Ok(0) if got == 0 => return Err(FrameError::Closed),
                Ok(0) => return Err(FrameError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if h[0..4] != MAGIC {
            return Err(FrameError::BadMagic(h[0..4].try_into().expect("4 bytes")));
        }
        let seq = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let wire_len = le32(&h[16..20]);
        let raw_len = le32(&h[20..24]);
        for len in [wire_len, raw_len] {
            if len > self.max_payload {
                return Err(FrameError::TooLarge {
                    len,
                    max: self.max_payload,
                });
            }
        }
        let wire = &mut self.wire;
        wire.clear();
        wire.resize(wire_len as usize, 0);
        self.input.read_exact(wire).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                FrameError::Truncated
            } else {
                FrameError::Io(e)
            }
        })?;
        self.auth
            .mac(&h[..MAC_OFFSET], wire)
            .verify_slice(&h[MAC_OFFSET..])
            .map_err(|_| FrameError::BadMac { seq })?;
        if seq != self.expected {
            let expected = self.expected;
            return Err(if seq < expected {
                FrameError::Replayed { seq, expected }
            } else {
                FrameError::OutOfOrder { seq, expected }
            });
        }
        self.expected += 1;
        let flags = h[4];
        if flags & !FLAG_ZSTD != 0 || h[5..8] != [0, 0, 0] {
            return Err(FrameError::UnknownFlags(flags));
        }
        if flags & FLAG_ZSTD == 0 {
            if wire_len != raw_len {
                return Err(FrameError::SizeMismatch {
                    expected: raw_len,
                    found: wire.len(),
                });
            }
            std::mem::swap(&mut self.wire, &mut self.payload);
            return Ok(());
        }
        // The room bounds the output (it never grows): a frame cannot decompress to more
        // than announced, or than the largest payload before it, which is refused below.
        let payload = &mut self.payload;
        payload.clear();
        payload.reserve(raw_len as usize);
        let room = payload.capacity();
        self.decompressor
            .decompress_to_buffer(&self.wire, payload)
            .map_err(FrameError::Zstd)?;
        if payload.len() != raw_len as usize {
            return Err(FrameError::SizeMismatch {
                expected: raw_len,
                found: payload.len(),
            });
        }
        debug_assert!(payload.capacity() == room, "the output never grows");
        Ok(())
    }

    /// The stream (buffered input not yet read is lost).
    pub fn into_inner(self) -> R {
        self.input.into_inner()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::compat::tests::{hello, profile};
    use crate::compat::PROTOCOL;
    use proptest::prelude::*;

    pub(crate) const NONCE: [u8; CONNECTION_NONCE_LEN] = [7; CONNECTION_NONCE_LEN];
    pub(crate) const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    pub(crate) fn page(seed: u8) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
            .collect()
    }

    pub(crate) fn writer() -> FrameWriter<Vec<u8>> {
        FrameWriter::new(
            Vec::new(),
            FrameAuth::new(KEY, &NONCE, Direction::ToStandby),
            Some(DEFAULT_ZSTD_LEVEL),
        )
    }

    pub(crate) fn reader(bytes: &[u8]) -> FrameReader<&[u8]> {
        FrameReader::new(bytes, FrameAuth::new(KEY, &NONCE, Direction::ToStandby))
    }

    pub(crate) fn frames(msgs: &[Message]) -> Vec<u8> {
        let mut w = writer();
        for m in msgs {
            w.send(m).unwrap();
        }
        w.into_inner().unwrap()
    }

    /// Every message of the protocol, once.
    pub(crate) fn every_message() -> Vec<Message> {
        let mut batch = PageBatch::default();
        batch.push(3, &page(5));
        batch.push(9, &[0; PAGE_SIZE]);
        batch.push(4, &page(1));
        vec![
            Message::Hello(hello()),
            Message::HelloAck(HelloAck {
                protocol: PROTOCOL,
                committed_epoch: 4,
                committed_term: 2,
                profile: profile(),
            }),
            Message::Refuse {
                reason: "memory size differs".into(),
            },
            Message::EpochBegin { epoch: 1, term: 2 },
            Message::Pages(batch),
            Message::State(vec![1, 2, 3, 4]),
            Message::DiskWrite {
                disk: 0,
                offset: 512,
                bytes: vec![9; 1024],
            },
            Message::Inbound {
                epoch: 2,
                net: 0,
                frame: vec![0xff; 60],
            },
            Message::EpochEnd {
                epoch: 1,
                pages: 3,
                digest: [8; 16],
            },
            Message::Ack { epoch: 1 },
            Message::Heartbeat { term: 2, epoch: 1 },
        ]
    }

    #[test]
    fn every_message_round_trips_compressed_or_not() {
        for level in [None, Some(1), Some(3)] {
            let mut w = FrameWriter::new(
                Vec::new(),
                FrameAuth::new(KEY, &NONCE, Direction::ToStandby),
                level,
            );
            for m in every_message() {
                w.send(&m).unwrap();
            }
            let bytes = w.into_inner().unwrap();
            let mut r = reader(&bytes);
            for m in every_message() {
                assert_eq!(r.recv().unwrap(), m);
            }
            assert!(matches!(r.recv(), Err(FrameError::Closed)));
        }
    }

    /// A stream that keeps `room` bytes, then fails.
    struct Failing {
        room: usize,
        kept: Vec<u8>,
    }

    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "link down"));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.kept.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn failing(room: usize) -> FrameWriter<Failing> {
        FrameWriter::new(
            Failing {
                room,
                kept: Vec::new(),
            },
            FrameAuth::new(KEY, &NONCE, Direction::ToStandby),
            Some(DEFAULT_ZSTD_LEVEL),
        )
    }

    #[test]
    fn a_fanout_sends_each_link_the_same_messages_under_its_own_mac() {
        let other = [9; CONNECTION_NONCE_LEN];
        let mut a = writer();
        let mut b = FrameWriter::new(
            Vec::new(),
            FrameAuth::new(KEY, &other, Direction::ToStandby),
            Some(DEFAULT_ZSTD_LEVEL),
        );
        // Each link's sequence numbers go on from where that link was.
        b.send(&Message::Heartbeat { term: 1, epoch: 0 }).unwrap();
        let msgs = every_message();
        let mut encoder = FrameEncoder::new(Some(DEFAULT_ZSTD_LEVEL));
        let mut fanout = Fanout::new(&mut encoder, [&mut a, &mut b]);
        for m in &msgs {
            FrameSink::send(&mut fanout, m).unwrap();
        }
        FrameSink::flush(&mut fanout).unwrap();
        assert!(fanout.finish().iter().all(Option::is_none));

        let bytes = a.into_inner().unwrap();
        let mut r = reader(&bytes);
        for m in &msgs {
            assert_eq!(&r.recv().unwrap(), m);
        }
        let bytes = b.into_inner().unwrap();
        let mut r = FrameReader::new(
            &bytes[..],
            FrameAuth::new(KEY, &other, Direction::ToStandby),
        );
        assert_eq!(r.recv().unwrap(), Message::Heartbeat { term: 1, epoch: 0 });
        for m in &msgs {
            assert_eq!(&r.recv().unwrap(), m);
        }
        // Frames of one link do not pass on the other.
        assert!(reader(&bytes).recv().is_err());
    }

    #[test]
    fn a_failing_link_leaves_the_fanout_and_the_others_go_on() {
        let (mut good, mut bad) = (failing(usize::MAX), failing(100));
        let mut msgs = every_message();
        // More than the writers buffer: the failing link fails in a send, not only in a flush.
        msgs.push(Message::State(
            (0..4u32 << 20)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ));
        msgs.push(Message::Ack { epoch: 5 });
        let mut encoder = FrameEncoder::new(Some(DEFAULT_ZSTD_LEVEL));
        let mut both = Fanout::new(&mut encoder, [&mut good, &mut bad]);
        for m in &msgs {
            FrameSink::send(&mut both, m).unwrap();
        }
        FrameSink::flush(&mut both).unwrap();
        let outcome = both.finish();
        assert!(outcome[0].is_none(), "{outcome:?}");
        assert!(matches!(outcome[1], Some(FrameError::Io(_))), "{outcome:?}");
        let bytes = good.into_inner().unwrap().kept;
        let mut r = reader(&bytes);
        for m in &msgs {
            assert_eq!(&r.recv().unwrap(), m);
        }

        // With no link left, the fan-out itself fails.
        let mut lone = failing(100);
        let mut only = Fanout::new(&mut encoder, [&mut lone]);
        let sent = msgs.iter().try_for_each(|m| FrameSink::send(&mut only, m));
        assert!(sent.and_then(|()| FrameSink::flush(&mut only)).is_err());
    }

    #[test]
    fn zero_pages_travel_as_numbers_only() {
        let mut b = PageBatch::default();
        b.push(5, &[0u8; PAGE_SIZE]);
        assert!(Message::Pages(b.clone()).encode().unwrap().len() < 8);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![(5, None)]);
    }

    #[test]
    fn a_truncated_stream_is_refused() {
        let bytes = frames(&every_message());
        for len in 1..bytes.len() {
            let mut r = reader(&bytes[..len]);
            let err = loop {
                if let Err(e) = r.recv() {
                    break e;
                }
            };
            assert!(
                matches!(err, FrameError::Truncated | FrameError::Closed),
                "cut at {len}: {err}"
            );
        }
        let mut r = reader(&bytes[..HEADER_LEN + 1]);
        assert!(matches!(r.recv(), Err(FrameError::Truncated)));
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let bytes = frames(&[Message::State(b"state of the machine".to_vec())]);
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let result = reader(&b).recv();
            assert!(result.is_err(), "bit {bit} went unnoticed: {result:?}");
        }
        // A flipped payload byte is an authentication failure.
        let mut b = bytes.clone();
        b[HEADER_LEN + 2] ^= 0x10;
        assert!(matches!(
            reader(&b).recv(),
            Err(FrameError::BadMac { seq: 0 })
        ));
    }

    #[test]
    fn a_replayed_frame_is_refused() {
        let one = frames(&[Message::Ack { epoch: 1 }]);
        let mut twice = one.clone();
        twice.extend_from_slice(&one);
        let mut r = reader(&twice);
        assert_eq!(r.recv().unwrap(), Message::Ack { epoch: 1 });
        assert!(matches!(
            r.recv(),
            Err(FrameError::Replayed {
                seq: 0,
                expected: 1
            })
        ));
    }

    /// Splits a stream of frames into its frames.
    pub(crate) fn split(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = le32(&bytes[at + 16..at + 20]) as usize;
            out.push(bytes[at..at + HEADER_LEN + len].to_vec());
            at += HEADER_LEN + len;
        }
        out
    }

    #[test]
    fn reordered_and_dropped_frames_are_refused() {
        let f = split(&frames(&[
            Message::Ack { epoch: 1 },
            Message::Ack { epoch: 2 },
            Message::Ack { epoch: 3 },
        ]));
        let swapped = [&f[1][..], &f[0][..]].concat();
        assert!(matches!(
            reader(&swapped).recv(),
            Err(FrameError::OutOfOrder {
                seq: 1,
                expected: 0
            })
        ));
        let dropped = [&f[0][..], &f[2][..]].concat();
        let mut r = reader(&dropped);
        r.recv().unwrap();
        assert!(matches!(r.recv(), Err(FrameError::OutOfOrder { .. })));
    }

    #[test]
    fn frames_without_the_right_mac_are_refused() {
        let msg = [Message::Ack { epoch: 1 }];
        // Another key.
        let mut w = FrameWriter::new(
            Vec::new(),
            FrameAuth::new(
                b"another key, another key, another",
                &NONCE,
                Direction::ToStandby,
            ),
            None,
        );
        w.send(&msg[0]).unwrap();
        let forged = w.into_inner().unwrap();
        assert!(matches!(
            reader(&forged).recv(),
            Err(FrameError::BadMac { .. })
        ));
        // Another connection.
        let mut w = FrameWriter::new(
            Vec::new(),
            FrameAuth::new(KEY, &[8; CONNECTION_NONCE_LEN], Direction::ToStandby),
            None,
        );
        w.send(&msg[0]).unwrap();
        let other = w.into_inner().unwrap();
        assert!(matches!(
            reader(&other).recv(),
            Err(FrameError::BadMac { .. })
        ));
        // Reflected: the other direction.
        let mut w = FrameWriter::new(
            Vec::new(),
            FrameAuth::new(KEY, &NONCE, Direction::ToPrimary),
            None,
        );
        w.send(&msg[0]).unwrap();
        let reflected = w.into_inner().unwrap();
        assert!(matches!(
            reader(&reflected).recv(),
            Err(FrameError::BadMac { .. })
        ));
        // A zeroed MAC.
        let mut zeroed = frames(&msg);
        zeroed[MAC_OFFSET..HEADER_LEN].fill(0);
        assert!(matches!(
            reader(&zeroed).recv(),
            Err(FrameError::BadMac { .. })
        ));
    }

    #[test]
    fn absurd_lengths_are_refused_before_allocating() {
        let mut b = frames(&[Message::Ack { epoch: 1 }]);
        b[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            reader(&b).recv(),
            Err(FrameError::TooLarge { len: u32::MAX, .. })
        ));
        let mut b = frames(&[Message::Ack { epoch: 1 }]);
        b[20..24].copy_from_slice(&(DEFAULT_MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            reader(&b).recv(),
            Err(FrameError::TooLarge { .. })
        ));
        let mut b = frames(&[Message::Ack { epoch: 1 }]);
        b[0] = b'X';
        assert!(matches!(reader(&b).recv(), Err(FrameError::BadMagic(_))));
        let mut r = reader(&[]);
        r.set_max_payload(1);
        assert!(matches!(r.recv(), Err(FrameError::Closed)));
    }

    #[test]
    fn inconsistent_page_batches_and_trailing_bytes_are_malformed() {
        let bad = Message::Pages(PageBatch {
            index: vec![2],
            data: vec![1; 10],
        });
        let payload = bad.encode().unwrap();
        assert!(matches!(
            Message::decode(&payload),
            Err(FrameError::Malformed(_))
        ));
        let mut payload = Message::Ack { epoch: 1 }.encode().unwrap();
        payload.push(0);
        assert!(matches!(
            Message::decode(&payload),
            Err(FrameError::Malformed(_))
        ));
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..2048);
        prop_oneof![
            (any::<u64>(), any::<u64>())
                .prop_map(|(epoch, term)| Message::EpochBegin { epoch, term }),
            proptest::collection::vec((0u64..1 << 40, any::<u8>(), any::<bool>()), 0..8).prop_map(
                |pages| {
                    let mut b = PageBatch::default();
                    for (p, seed, zero) in pages {
                        if zero {
                            b.push(p, &[0; PAGE_SIZE]);
                        } else {
                            b.push(p, &page(seed | 1));
                        }
                    }
                    Message::Pages(b)
                }
            ),
            bytes().prop_map(Message::State),
            (any::<u32>(), any::<u64>(), bytes()).prop_map(|(disk, offset, bytes)| {
                Message::DiskWrite {
                    disk,
                    offset,
                    bytes,
                }
            }),
            (any::<u64>(), any::<u32>(), bytes())
                .prop_map(|(epoch, net, frame)| Message::Inbound { epoch, net, frame }),
            (any::<u64>(), any::<u64>(), any::<[u8; 16]>()).prop_map(|(epoch, pages, digest)| {
                Message::EpochEnd {
                    epoch,
                    pages,
                    digest,
                }
            }),
            any::<u64>().prop_map(|epoch| Message::Ack { epoch }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(term, epoch)| Message::Heartbeat { term, epoch }),
            any::<u64>().prop_map(|through| Message::Protected { through }),
            any::<u64>().prop_map(|epoch| Message::Handover { epoch }),
            Just(Message::Join),
            any::<u32>().prop_map(|disk| Message::DiskSync { disk }),
            ".{0,80}".prop_map(|reason| Message::Refuse { reason }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn any_message_sequence_round_trips(msgs in proptest::collection::vec(arb_message(), 0..12)) {
            let bytes = frames(&msgs);
            let mut r = reader(&bytes);
            for m in &msgs {
                prop_assert_eq!(&r.recv().unwrap(), m);
            }
            prop_assert!(matches!(r.recv(), Err(FrameError::Closed)));
        }

        #[test]
        fn a_corrupted_byte_is_always_refused(
            msgs in proptest::collection::vec(arb_message(), 1..6),
            at in any::<proptest::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut bytes = frames(&msgs);
            let i = at.index(bytes.len());
            bytes[i] ^= flip;
            let mut r = reader(&bytes);
            let mut ok = 0;
            let err = loop {
                match r.recv() {
                    Ok(m) => { prop_assert_eq!(&m, &msgs[ok]); ok += 1; }
                    Err(e) => break e,
                }
            };
            prop_assert!(ok < msgs.len(), "corruption at {} unnoticed", i);
            prop_assert!(!matches!(err, FrameError::Closed), "{}", err);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = reader(&bytes).recv();
            let _ = Message::decode(&bytes);
        }
    }
}
