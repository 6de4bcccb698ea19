use std::{collections::BTreeSet, path::Path, sync::Arc};

use bytes::Bytes;

use super::*;
use crate::error::EngineError;
use crate::{
    meta::Role,
    pb::{self, replication_message::Body},
    seam::power::Cut,
    takeover::tests::{base_config, block_on},
    volume::{Volume, VolumeConfig},
};

fn sample() -> Manifest {
    Manifest {
        volume: "v".into(),
        old_epoch: 1,
        new_epoch: 2,
        block_size: BS,
        blocks: vec![3, 7, 900],
        bytes: 3 * BS,
        created_unix_ms: 1_700_000_000_000,
        complete: false,
    }
}

#[test]
fn a_manifest_round_trips_and_a_damaged_one_is_refused() {
    let size = 1024 * BS;
    let m = sample();
    let text = manifest::encode(&m);
    assert_eq!(manifest::decode(&text, "v", size).unwrap(), m);
    // Every field a user reads is there by name.
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    for k in [
        "volume",
        "old_epoch",
        "new_epoch",
        "block_size",
        "blocks",
        "bytes",
        "created_unix_ms",
        "created",
        "complete",
    ] {
        assert!(v.get(k).is_some(), "{k} missing from {v}");
    }
    assert_eq!(
        v["created"], "2023-11-14T22:13:20Z",
        "created_unix_ms for people"
    );
    // A manifest written before `created` existed still reads.
    let mut old = v.clone();
    old.as_object_mut().unwrap().remove("created");
    assert_eq!(
        manifest::decode(&serde_json::to_vec(&old).unwrap(), "v", size).unwrap(),
        m
    );
    let bad = |change: fn(&mut Manifest)| {
        let mut m = sample();
        change(&mut m);
        manifest::decode(&manifest::encode(&m), "v", size).is_err()
    };
    assert!(bad(|m| m.volume = "w".into()));
    assert!(bad(|m| m.block_size = 512));
    assert!(bad(|m| m.new_epoch = m.old_epoch));
    assert!(bad(|m| m.blocks = vec![7, 3]));
    assert!(bad(|m| m.blocks = vec![3, 3]));
    assert!(bad(|m| m.blocks.push(1024)));
    assert!(bad(|m| m.bytes += 1));
    assert!(manifest::decode(&text[..text.len() / 2], "v", size).is_err());
    let without_complete = String::from_utf8(text.clone())
        .unwrap()
        .replace("\"complete\": false", "\"other\": false");
    assert!(manifest::decode(without_complete.as_bytes(), "v", size).is_err());
}

/// A manifest that does not decode stops the engine at open, and stays as it was.
#[test]
fn a_damaged_manifest_is_an_error_at_open_and_is_left_alone() {
    let d = tempfile::tempdir().unwrap();
    let size = 64 * BS;
    let l = Losses::open(d.path(), "v", size).unwrap();
    let mut table = Bitmap::new(64);
    table.set(5);
    let s = l.begin(1, 2, &table).unwrap().unwrap();
    drop(l);
    assert!(Losses::open(d.path(), "v", size).unwrap().armed());
    let path = s.dir.join(MANIFEST);
    std::fs::write(&path, b"{\"volume\": \"v\", \"old_ep").unwrap();
    let err = Losses::open(d.path(), "v", size).err().unwrap();
    assert!(err.contains("manifest"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"{\"volume\": \"v\", \"old_ep"
    );
    // An unfinished export without its set of blocks to compare is damaged too.
    std::fs::write(
        &path,
        manifest::encode(&{
            let mut m = sample();
            m.blocks.clear();
            m.bytes = 0;
            m
        }),
    )
    .unwrap();
    std::fs::remove_file(s.dir.join(UNCHECKED)).unwrap();
    assert!(Losses::open(d.path(), "v", size).is_err());
}

const OLD: u8 = 0x11;
const NEW: u8 = 0x22;
/// Blocks of the returned table: 10 the new primary had (same bytes), 11 and 12 it lacked.
const HAD: u64 = 10;
const LACKED: [u64; 2] = [11, 12];

fn image(b: u64, byte: u8) -> pb::ReplicationMessage {
    let data = Bytes::from(vec![byte; BS as usize]);
    pb::ReplicationMessage {
        volume: "v".into(),
        epoch: 2,
        body: Some(Body::Block(pb::BlockImage {
            block: b,
            generation: 0,
            crc32c: crc32c::crc32c(&data),
            data,
            lazy: true,
        })),
    }
}

fn primary_config(dir: &Path) -> VolumeConfig {
    VolumeConfig {
        initial_role: Role::Primary,
        ..base_config(dir)
    }
}

/// A primary at epoch 1 with blocks 10..13 written and unsent, stepped down to epoch 2.
fn stepped_down(dir: &Path) -> Arc<Volume> {
    let v = Volume::open(&primary_config(dir)).unwrap();
    let mut table = Bitmap::new(v.size() / BS);
    for b in [HAD, LACKED[0], LACKED[1]] {
        v.store.write_at(&[OLD; BS as usize], b * BS).unwrap();
        table.set(b);
    }
    v.store.sync().unwrap();
    v.repl
        .as_ref()
        .unwrap()
        .tracker
        .mark_pending(&table)
        .unwrap();
    block_on(v.step_down(2)).unwrap();
    assert_eq!((v.role(), v.epoch()), (Role::Secondary, 2));
    v
}

fn batch() -> Vec<pb::ReplicationMessage> {
    vec![
        image(HAD, OLD),
        image(LACKED[0], NEW),
        image(LACKED[1], NEW),
    ]
}

fn block(path: &Path, b: u64) -> Vec<u8> {
    let all = std::fs::read(path).unwrap();
    all[(b * BS) as usize..((b + 1) * BS) as usize].to_vec()
}

/// What is on disk keeps every lost block: its old content is still in the data file, or the
/// manifest lists it and `blocks.img` holds it. A block the new primary had is never listed.
fn violations(v: &Volume, when: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let Some(s) = v.losses.latest() else {
        return vec![format!("{when}: no export")];
    };
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(s.dir.join(MANIFEST)).unwrap()).unwrap();
    let listed: BTreeSet<u64> = m.blocks.iter().copied().collect();
    for b in LACKED {
        let mut data = vec![0u8; BS as usize];
        v.read_local(&mut data, b * BS).unwrap();
        let kept = listed.contains(&b) && block(&s.dir.join(IMG), b) == vec![OLD; BS as usize];
        if data != vec![OLD; BS as usize] && !kept {
            bad.push(format!("{when}: block {b} overwritten and not exported"));
        }
    }
    if listed.contains(&HAD) {
        bad.push(format!(
            "{when}: block {HAD} listed though the new primary had it"
        ));
    }
    bad
}

/// Invariant (`Losses::check`): a lost block's old content is durable in the export before the
/// data file is overwritten. The apply and its sync stop at every file operation in turn, once as
/// a power cut (writes no fdatasync covered are gone) and once as a process crash (the page cache
/// keeps them); after each restart nothing lost is gone, and applying again completes the export
/// with exactly the blocks the new primary lacked.
#[test]
fn an_export_is_durable_before_the_block_it_keeps_is_overwritten() {
    for power_loss in [true, false] {
        let mut k = 0;
        loop {
            let d = tempfile::tempdir().unwrap();
            let v = stepped_down(d.path());
            let cut = Cut::after(d.path(), k);
            let r = v.apply_batch(batch()).map(|_| ());
            let r = r.and_then(|()| v.make_durable().map(|_| ()).map_err(EngineError::io));
            let tripped = cut.tripped();
            drop(cut);
            if !tripped {
                r.unwrap();
                assert!(k >= 3, "the apply did only {k} file operations");
                break;
            }
            if power_loss {
                v.store.lose_unsynced();
            }
            drop(v);
            let v = Volume::open(&primary_config(d.path())).unwrap();
            let when = format!("stopped at operation {k} (power loss: {power_loss})");
            let bad = violations(&v, &when);
            assert!(bad.is_empty(), "{bad:?}");
            // Resumed: the images come again and the export ends exact.
            v.apply_batch(batch()).unwrap();
            v.make_durable().unwrap();
            let s = v.losses.latest().unwrap();
            let m: Manifest =
                serde_json::from_slice(&std::fs::read(s.dir.join(MANIFEST)).unwrap()).unwrap();
            assert_eq!(m.blocks, LACKED.to_vec(), "{when}");
            for b in LACKED {
                assert_eq!(block(&s.dir.join(IMG), b), vec![OLD; BS as usize]);
            }
            assert!(violations(&v, "after resuming").is_empty());
            k += 1;
        }
    }
}

/// The first touch decides: a record over a whole block compares like an image, a partial one
/// counts as lost, a block outside the table is never compared; the end of the resync exports
/// what was never sent and completes the export.
#[test]
fn records_and_unsent_blocks_are_decided_too() {
    let d = tempfile::tempdir().unwrap();
    let v = stepped_down(d.path());
    let rec = |seq: u64, offset: u64, data: Vec<u8>| pb::ReplicationMessage {
        volume: "v".into(),
        epoch: 2,
        body: Some(Body::Write(pb::WriteRecord {
            seq,
            timestamp_us: 0,
            offset,
            crc32c: crc32c::crc32c(&data),
            data: data.into(),
            zero_length: 0,
        })),
    };
    let done = |consistent_seq: u64| pb::ReplicationMessage {
        volume: "v".into(),
        epoch: 2,
        body: Some(Body::ResyncDone(pb::ResyncDone {
            consistent_seq,
            full: false,
            next_seq: 1,
        })),
    };
    // 10: the same bytes (had); 11: half rewritten (unknown, lost); 40: not in the table.
    v.apply_batch(vec![
        rec(1, HAD * BS, vec![OLD; BS as usize]),
        rec(2, LACKED[0] * BS, vec![NEW; BS as usize / 2]),
        rec(3, 40 * BS, vec![NEW; BS as usize]),
    ])
    .unwrap();
    assert_eq!(v.losses.latest().unwrap().blocks, 1);
    // Block 12 never came: the resync ends and it is exported as it is.
    v.apply_batch(vec![done(3)]).unwrap();
    let s = v.losses.latest().unwrap();
    assert!(s.complete, "{s:?}");
    assert_eq!(s.blocks, 2);
    assert_eq!(v.losses.finished(), Some((2, 2)));
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(s.dir.join(MANIFEST)).unwrap()).unwrap();
    assert_eq!(m.blocks, LACKED.to_vec());
    assert!(m.complete);
    assert!(!s.dir.join(UNCHECKED).exists());
    assert!(v
        .areas
        .events()
        .iter()
        .any(|e| e.contains("LossesExported blocks=2")));
    // Reopened, it stays complete and says the same.
    drop(v);
    let v = Volume::open(&primary_config(d.path())).unwrap();
    assert_eq!(v.losses.finished(), Some((2, 2)));
}
