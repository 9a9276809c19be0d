//! The content of an epoch as both ends account for it: the digest and page count that
//! `EpochEnd` carries and the standby checks before committing.
//!
//! The digest is XXH3-128 over the epoch's content in the order it was sent: the frames are
//! already authenticated one by one (HMAC), so the digest's job is to prove the epoch
//! *complete and in order* as a whole (no frame lost across a reconnect, no content staged
//! twice), not to resist forgery, and a fast non-cryptographic hash is enough for that.
//! Inbound frames are not part of an epoch's content: they are logged under the epoch in which
//! the guest received them, whether or not an epoch is being staged (see
//! [`crate::standby::staging`]).

use twox_hash::XxHash3_128;

use crate::wire::{FrameError, FrameSink, Message, PageBatch, BATCH_PAGES};

/// Accumulates the digest of one epoch's content.
pub struct EpochDigest {
    hasher: XxHash3_128,
    pages: u64,
}

impl std::fmt::Debug for EpochDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochDigest")
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

const TAG_PAGE: u8 = 1;
const TAG_ZERO_PAGE: u8 = 2;
const TAG_STATE: u8 = 3;
const TAG_DISK: u8 = 4;

impl EpochDigest {
    /// The digest of epoch `epoch` of `term`, before any content.
    pub fn new(epoch: u64, term: u64) -> Self {
        let mut hasher = XxHash3_128::new();
        hasher.write(b"vmr epoch");
        hasher.write(&epoch.to_le_bytes());
        hasher.write(&term.to_le_bytes());
        Self { hasher, pages: 0 }
    }

    /// Page `page` with `contents` (`None`: all zeros).
    pub fn page(&mut self, page: u64, contents: Option<&[u8]>) {
        self.pages += 1;
        match contents {
            Some(data) => {
                self.hasher.write(&[TAG_PAGE]);
                self.hasher.write(&page.to_le_bytes());
                self.hasher.write(data);
            }
            None => {
                self.hasher.write(&[TAG_ZERO_PAGE]);
                self.hasher.write(&page.to_le_bytes());
            }
        }
    }

    /// The machine state.
    pub fn state(&mut self, state: &[u8]) {
        self.hasher.write(&[TAG_STATE]);
        self.hasher.write(&(state.len() as u64).to_le_bytes());
        self.hasher.write(state);
    }

    /// A disk write.
    pub fn disk_write(&mut self, disk: u32, offset: u64, bytes: &[u8]) {
        self.hasher.write(&[TAG_DISK]);
        self.hasher.write(&disk.to_le_bytes());
        self.hasher.write(&offset.to_le_bytes());
        self.hasher.write(&(bytes.len() as u64).to_le_bytes());
        self.hasher.write(bytes);
    }

    /// Pages accounted so far, zero pages included.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The digest of everything accounted so far.
    pub fn finish(&self) -> [u8; 16] {
        self.hasher.finish_128().to_le_bytes()
    }
}

/// Sends one epoch on a link, batching its pages and accounting its content, so that the
/// `EpochEnd` it finishes with matches what the standby will check.
pub struct EpochWriter<'a, S: FrameSink> {
    out: &'a mut S,
    epoch: u64,
    digest: EpochDigest,
    batch: PageBatch,
}

impl<'a, S: FrameSink> EpochWriter<'a, S> {
    /// Begins epoch `epoch` of `term` on `out` (one link, or several: [`crate::wire::Fanout`]).
    pub fn begin(out: &'a mut S, epoch: u64, term: u64) -> Result<Self, FrameError> {
        out.send(&Message::EpochBegin { epoch, term })?;
        let batch = out.take_batch();
        Ok(Self {
            out,
            epoch,
            digest: EpochDigest::new(epoch, term),
            batch,
        })
    }

    /// Adds page `page` (`contents`: one page), sending a batch when one is full.
    pub fn page(&mut self, page: u64, contents: &[u8]) -> Result<(), FrameError> {
        self.batch.push(page, contents);
        self.flush_full()
    }

    /// Adds page `page`, its contents written by `fill` straight into the batch.
    pub fn page_with(&mut self, page: u64, fill: impl FnOnce(&mut [u8])) -> Result<(), FrameError> {
        self.batch.push_with(page, fill);
        self.flush_full()
    }

    fn flush_full(&mut self) -> Result<(), FrameError> {
        if self.batch.len() >= BATCH_PAGES {
            self.send_batch()?;
        }
        Ok(())
    }

    fn send_batch(&mut self) -> Result<(), FrameError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        for (page, contents) in self.batch.iter() {
            self.digest.page(page, contents);
        }
        let msg = Message::Pages(std::mem::take(&mut self.batch));
        let sent = self.out.send(&msg);
        if let Message::Pages(mut batch) = msg {
            batch.clear();
            self.batch = batch;
        }
        sent
    }

    /// Sends the machine state.
    pub fn state(&mut self, state: Vec<u8>) -> Result<(), FrameError> {
        self.digest.state(&state);
        self.out.send(&Message::State(state))
    }

    /// Sends a disk write.
    pub fn disk_write(&mut self, disk: u32, offset: u64, bytes: Vec<u8>) -> Result<(), FrameError> {
        self.digest.disk_write(disk, offset, &bytes);
        self.out.send(&Message::DiskWrite {
            disk,
            offset,
            bytes,
        })
    }

    /// Sends the last pages and `EpochEnd`, and flushes; returns the pages sent and the digest.
    pub fn end(mut self) -> Result<(u64, [u8; 16]), FrameError> {
        self.send_batch()?;
        self.out.give_batch(std::mem::take(&mut self.batch));
        let (pages, digest) = (self.digest.pages(), self.digest.finish());
        self.out.send(&Message::EpochEnd {
            epoch: self.epoch,
            pages,
            digest,
        })?;
        self.out.flush()?;
        Ok((pages, digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_epoch_and_kind_all_matter() {
        let d = |f: &dyn Fn(&mut EpochDigest)| {
            let mut d = EpochDigest::new(1, 1);
            f(&mut d);
            d.finish()
        };
        let a = d(&|d| {
            d.page(1, Some(&[1; 8]));
            d.page(2, None);
        });
        let b = d(&|d| {
            d.page(2, None);
            d.page(1, Some(&[1; 8]));
        });
        assert_ne!(a, b);
        assert_ne!(d(&|d| d.state(b"ab")), d(&|d| d.disk_write(0, 0, b"ab")));
        assert_ne!(
            EpochDigest::new(1, 1).finish(),
            EpochDigest::new(2, 1).finish()
        );
        assert_ne!(
            EpochDigest::new(1, 1).finish(),
            EpochDigest::new(1, 2).finish()
        );
        let mut e = EpochDigest::new(1, 1);
        e.page(3, None);
        assert_eq!(e.pages(), 1);
    }
}
