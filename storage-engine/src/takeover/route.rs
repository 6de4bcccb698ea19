//! Host I/O on an engine that serves while the old primary still drains (phases Draining and
//! Merging). Reads resolve each 4 KiB block in the patent's order (claim 3, FIG. 10):
//! overlay → local data file (block not in `peer_pending`) → proxied read from the old primary.
//! Writes go to the overlay (S904) while the handed-off table is not durably empty, or while the
//! block still has overlay data; otherwise to the data file (S903). Every write goes through the
//! tracker first, so it is in this engine's own differential table (DAT2) before the host's ack.

use std::{collections::HashMap, io, sync::atomic::Ordering};

use bytes::Bytes;

use crate::{
    geometry::{blocks_of, BLOCK_SIZE, BS},
    meta::Phase,
    repl::tracker::Payload,
    volume::{HostError, Volume},
};

/// Where the newest content of one block is, as seen by a host read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Overlay,
    Local,
    Peer,
}

impl Volume {
    fn source_of(&self, st: &super::TakeoverState, b: u64) -> Source {
        if st.present(b) {
            Source::Overlay
        } else if st.pending(b) {
            Source::Peer
        } else {
            Source::Local
        }
    }

    /// Whether a host write to block `b` must go to the overlay.
    fn to_overlay(&self, st: &super::TakeoverState, b: u64) -> bool {
        st.present(b) || (self.areas.phase() == Phase::Draining && !st.pending_durably_empty())
    }

    /// A host read while a takeover is in progress.
    ///
    /// Invariant: each block's source is decided, and its local or overlay bytes read, under the
    /// block locks, so a merge chunk, a drained image or a read-repair of these blocks lands either
    /// wholly before the read or wholly after it, never between the choice and the bytes (a stale
    /// read). Test: `takeover::tests::a_read_racing_a_merge_chunk_never_returns_the_old_block`.
    pub(crate) async fn read_routed(&self, offset: u64, len: u32) -> Result<Vec<u8>, HostError> {
        let Some(r) = &self.repl else {
            return Err(HostError::Io(io::Error::other("takeover without a peer")));
        };
        let mut buf = vec![0u8; len as usize];
        let blocks = blocks_of(offset, u64::from(len));
        let peer: Vec<u64> = {
            let _locks = r.tracker.locks.lock(blocks.clone());
            self.store.read_at(&mut buf, offset)?;
            self.areas.seams.hit("route.read.local_read");
            let (overlay, peer): (Vec<u64>, Vec<u64>) = {
                let st = self.areas.state();
                let mut o = Vec::new();
                let mut p = Vec::new();
                for b in blocks {
                    match self.source_of(&st, b) {
                        Source::Overlay => o.push(b),
                        Source::Peer => p.push(b),
                        Source::Local => {}
                    }
                }
                (o, p)
            };
            let mut block = vec![0u8; BLOCK_SIZE as usize];
            for b in overlay {
                self.areas.overlay.read_at(&mut block, b * BS)?;
                patch(&mut buf, offset, b, &block);
            }
            peer
        };
        // The old primary is fenced: its content of these blocks is final, and a host write that
        // lands here meanwhile is concurrent with this read.
        if !peer.is_empty() {
            let got = self.proxy_read(&peer).await?;
            for (b, d) in peer.iter().zip(&got) {
                patch(&mut buf, offset, *b, d);
            }
        }
        Ok(buf)
    }

    /// Reads blocks from the old primary, then installs them locally where nothing newer exists
    /// (read-repair, failover.md A3): the old primary is fenced, so its content is final.
    pub(crate) async fn proxy_read(&self, blocks: &[u64]) -> Result<Vec<Bytes>, HostError> {
        let epoch = self.epoch();
        let started = std::time::Instant::now();
        let got = self.areas.proxy.read(self.name(), epoch, blocks).await;
        self.counters.instruments.proxied_read(started.elapsed());
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                self.areas.set_condition(
                    tandem_api::Reason::Degraded,
                    format!("Degraded: proxied read from the old primary failed: {e}"),
                );
                return Err(HostError::Proxy(e));
            }
        };
        self.install_proxied(blocks, &got);
        Ok(got)
    }

    /// Read-repair: writes blocks read from the fenced old primary into the data file where
    /// nothing newer exists here, and clears their `peer_pending` bits (stored later, after a
    /// data sync: `Areas::persist`).
    pub(crate) fn install_proxied(&self, blocks: &[u64], got: &[Bytes]) {
        let Some(r) = &self.repl else { return };
        for (b, d) in blocks.iter().zip(got) {
            let _g = r.tracker.locks.lock(*b..*b + 1);
            let install = {
                let st = self.areas.state();
                st.newer_on_peer(*b)
            };
            if install && self.store.write_at(d, *b * BS).is_ok() {
                let mut st = self.areas.state();
                st.clear_pending(*b);
            }
        }
    }

    /// A host write (or zeroing) while a takeover is in progress; returns its seq.
    pub(crate) async fn write_routed(
        &self,
        offset: u64,
        payload: Payload,
        keep_allocated: bool,
    ) -> Result<u64, HostError> {
        let Some(r) = &self.repl else {
            return Err(HostError::Io(io::Error::other("takeover without a peer")));
        };
        let len = payload_len(&payload);
        let blocks = blocks_of(offset, len);
        // Partial blocks headed for the overlay need the rest of the block; fetch those that live
        // on the old primary before taking the block locks (a proxied read may wait).
        let mut partial: Vec<u64> = vec![blocks.start, blocks.end.saturating_sub(1)];
        partial.dedup();
        partial.retain(|&b| !covers(offset, len, b));
        let fetch: Vec<u64> = {
            let st = self.areas.state();
            partial
                .into_iter()
                .filter(|&b| self.to_overlay(&st, b) && st.newer_on_peer(b))
                .collect()
        };
        let mut prefetched: HashMap<u64, Bytes> = HashMap::new();
        if !fetch.is_empty() {
            let got = self.proxy_read(&fetch).await?;
            prefetched.extend(fetch.into_iter().zip(got));
        }
        let seq = r.tracker.write(offset, payload.clone(), || {
            self.apply_routed(offset, &payload, keep_allocated, &prefetched)
        })?;
        Ok(seq)
    }

    /// Runs under the tracker's block locks: nothing else changes these blocks meanwhile.
    fn apply_routed(
        &self,
        offset: u64,
        payload: &Payload,
        keep_allocated: bool,
        prefetched: &HashMap<u64, Bytes>,
    ) -> io::Result<()> {
        let len = payload_len(payload);
        let blocks = blocks_of(offset, len);
        let dest: Vec<bool> = {
            let st = self.areas.state();
            blocks.clone().map(|b| self.to_overlay(&st, b)).collect()
        };
        self.areas.seams.hit("route.write.decided");
        let end = offset + len;
        let mut i = 0usize;
        while i < dest.len() {
            let mut j = i;
            while j < dest.len() && dest[j] == dest[i] {
                j += 1;
            }
            let (rb0, rb1) = (blocks.start + i as u64, blocks.start + j as u64);
            let s = offset.max(rb0 * BS);
            let e = end.min(rb1 * BS);
            if dest[i] {
                self.write_overlay_run(rb0, rb1, s, e, offset, payload, prefetched)?;
            } else {
                match payload {
                    Payload::Data(d) => self
                        .store
                        .write_at(&d[(s - offset) as usize..(e - offset) as usize], s)?,
                    Payload::Zero(_) if keep_allocated => self.store.zero_range(s, e - s)?,
                    Payload::Zero(_) => self.store.punch_hole(s, e - s)?,
                }
            }
            i = j;
        }
        Ok(())
    }

    /// Writes bytes [s, e) of the request into the overlay blocks [rb0, rb1), completing partial
    /// blocks from their current content.
    #[allow(clippy::too_many_arguments)]
    fn write_overlay_run(
        &self,
        rb0: u64,
        rb1: u64,
        s: u64,
        e: u64,
        offset: u64,
        payload: &Payload,
        prefetched: &HashMap<u64, Bytes>,
    ) -> io::Result<()> {
        let slice = |from: u64, to: u64| -> Option<&[u8]> {
            match payload {
                Payload::Data(d) => Some(&d[(from - offset) as usize..(to - offset) as usize]),
                Payload::Zero(_) => None,
            }
        };
        for b in rb0..rb1 {
            let (bs, be) = (b * BS, (b + 1) * BS);
            let (ws, we) = (s.max(bs), e.min(be));
            if ws == bs && we == be {
                continue;
            }
            // A partial block: start from its current content.
            let mut img = self.current_block(b, prefetched)?;
            match slice(ws, we) {
                Some(d) => img[(ws - bs) as usize..(we - bs) as usize].copy_from_slice(d),
                None => img[(ws - bs) as usize..(we - bs) as usize].fill(0),
            }
            self.areas.overlay.write_at(&img, bs)?;
        }
        // Whole blocks in one go.
        let f0 = s.div_ceil(BS);
        let f1 = e / BS;
        if f1 > f0 {
            match slice(f0 * BS, f1 * BS) {
                Some(d) => self.areas.overlay.write_at(d, f0 * BS)?,
                // Real zeros, not a hole: an allocated overlay block is how a restart finds a
                // write whose bit was not stored yet (`Areas::open`).
                None => self.areas.overlay.write_zeros(f0 * BS, (f1 - f0) * BS)?,
            }
        }
        let mut st = self.areas.state();
        st.set_present(rb0, rb1);
        Ok(())
    }

    /// The newest content of block `b` as this engine sees it (overlay, local, or prefetched
    /// from the peer). Called under the block's lock.
    fn current_block(&self, b: u64, prefetched: &HashMap<u64, Bytes>) -> io::Result<Vec<u8>> {
        let src = self.source_of(&self.areas.state(), b);
        let mut img = vec![0u8; BLOCK_SIZE as usize];
        match src {
            Source::Overlay => self.areas.overlay.read_at(&mut img, b * BS)?,
            Source::Local => self.store.read_at(&mut img, b * BS)?,
            Source::Peer => match prefetched.get(&b) {
                Some(d) => img.copy_from_slice(d),
                None => {
                    return Err(io::Error::other(format!(
                        "block {b} lives on the old primary and was not fetched"
                    )))
                }
            },
        }
        Ok(img)
    }

    /// This engine's own newest content of block `b`, for a peer (drain or proxied read): the
    /// overlay if it holds the block, else the data file. A block this engine is itself still
    /// waiting for is an error: the peer must never proxy back.
    pub fn read_own_block(&self, b: u64, buf: &mut [u8]) -> io::Result<()> {
        let src = self.source_of(&self.areas.state(), b);
        match src {
            Source::Overlay => self.areas.overlay.read_at(buf, b * BS),
            Source::Local => self.store.read_at(buf, b * BS),
            Source::Peer => Err(io::Error::other(format!(
                "block {b} is not held here (it is pending from the peer)"
            ))),
        }
    }

    /// Counters for status.
    pub fn proxied(&self) -> (u64, u64) {
        let p = &self.areas.proxy;
        (
            p.reads.load(Ordering::Relaxed),
            p.errors.load(Ordering::Relaxed),
        )
    }
}

fn payload_len(p: &Payload) -> u64 {
    match p {
        Payload::Data(d) => d.len() as u64,
        Payload::Zero(n) => *n,
    }
}

/// Whether [offset, offset+len) covers block `b` entirely.
fn covers(offset: u64, len: u64, b: u64) -> bool {
    offset <= b * BS && offset + len >= (b + 1) * BS
}

/// Copies the part of block `b` that overlaps the request [offset, offset + buf.len()) into `buf`.
fn patch(buf: &mut [u8], offset: u64, b: u64, block: &[u8]) {
    let (bs, be) = (b * BS, (b + 1) * BS);
    let end = offset + buf.len() as u64;
    let (s, e) = (offset.max(bs), end.min(be));
    if s >= e {
        return;
    }
    buf[(s - offset) as usize..(e - offset) as usize]
        .copy_from_slice(&block[(s - bs) as usize..(e - bs) as usize]);
}
