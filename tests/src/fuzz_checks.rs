//! What the fuzz targets (`fuzz/`, `./x fuzz`) check on arbitrary input, one function per
//! parser. `tests/fuzz_corpus.rs` replays every committed corpus file through the same
//! functions in the normal test run, so an input that once crashed stays a regression test.
//!
//! Each parser must refuse bad input with an error, never panic, and what it accepts must hold
//! its invariants.

use prefetch::identity::SnapshotIdentity;
use prefetch::loading_set::LoadingSet;
use prefetch::plan::PlanConfig;
use prefetch::policy::{plan_for, PrefetchPolicy};
use uffd_server::addr::{FileOffset, HostAddr};
use uffd_server::memory::pieces::pieces;
use uffd_server::memory::regions::RegionMap;

/// The snapshot the working-set and loading-set inputs claim to belong to (the seeds are made
/// for it, so that mutations reach past the identity check).
pub const IDENTITY: SnapshotIdentity = SnapshotIdentity { len: 64 << 20, fingerprint: 0x5eed_f00d };
/// The memory-file stamp the loading-set seeds are bound to.
pub const STAMP: u64 = 0x57a3_9000;

/// A handshake payload: parsed, then validated against a memory file whose length also comes
/// from the input; an accepted region map maps every address it holds to a file offset
/// inside the file, and its pieces stay inside their regions.
pub fn handshake(data: &[u8]) {
    let Ok(regions) = uffd_server::vm::handshake::parse_regions(data) else { return };
    let file_len = u64::from(data.first().copied().unwrap_or(0)) << 20;
    let Ok(map) = RegionMap::new(regions, file_len) else { return };
    for region in map.regions() {
        let last = HostAddr(region.host.0 + region.size - 1);
        assert_eq!(map.find(region.host), Some(region));
        assert_eq!(map.find(last), Some(region));
        assert!(region.file_offset_of(last).0 < file_len);
    }
    let end = map.regions().iter().map(|r| r.file_offset.0 + r.size).max().unwrap_or(0).min(64 << 20);
    for piece in pieces(&map, FileOffset(0), FileOffset(end)) {
        let region = map.find(piece.host).expect("a piece lies in a region");
        assert!(piece.host.0 + piece.len <= region.host_end());
    }
}

/// A working-set file: decoded; what decodes re-encodes to itself and can be planned.
pub fn working_set(data: &[u8]) {
    let Ok(set) = prefetch::format::decode(data, &IDENTITY) else { return };
    let bytes = prefetch::format::encode(&set).expect("an accepted set encodes");
    assert_eq!(prefetch::format::decode(&bytes, &IDENTITY).expect("and decodes again"), set);
    let config = PlanConfig::default();
    for policy in [PrefetchPolicy::Reap, PrefetchPolicy::Union] {
        let plan = plan_for(&set, policy, 0.5, |page| page % 7 == 0, config);
        assert!(plan.deferred_from <= plan.batches.len());
    }
}

/// A loading-set file: opened, and every batch's bytes asked for (checked or dropped).
pub fn loading_set(data: &[u8]) {
    let Ok(loading_set) = LoadingSet::decode(data.to_vec(), IDENTITY, STAMP) else { return };
    let plan = loading_set.plan();
    assert!(plan.deferred_from <= plan.batches.len());
    for (index, batch) in plan.batches.iter().enumerate() {
        if let Some(bytes) = loading_set.data(index) {
            assert_eq!(bytes.len() as u64, batch.pages * 4096);
        }
    }
}

/// A snapshot manifest: decoded; what decodes re-encodes to the same bytes, and its chunks and
/// zero runs lie inside the memory file it describes.
pub fn manifest(data: &[u8]) {
    let Ok(manifest) = snapstore::manifest::Manifest::decode(data) else { return };
    assert_eq!(manifest.encode(), data, "an accepted manifest is its own encoding");
    let len = manifest.file_len();
    for index in 0..manifest.chunks.len() {
        let (start, end) = manifest.chunk_range(index);
        assert!(start < end && end <= len);
    }
    assert!(manifest.zero_pages() * 4096 <= len);
}

/// A chunk file, decoded as the chunk its header names: what decodes hashes to that name.
pub fn chunk(data: &[u8]) {
    let Ok(header) = snapstore::chunk::header(data) else { return };
    if let Ok(bytes) = snapstore::chunk::decode(data, &header.id) {
        assert_eq!(snapstore::ChunkId::of(&bytes), header.id);
        assert_eq!(bytes.len(), header.len);
    }
}

/// A working-set pack as a bucket serves it: its header and index read as the server's pack
/// fetch reads them (the index from the bytes the header asks for); an accepted index lays its
/// chunk files back to back right after itself, within the chunk-file bounds, and a chunk file
/// taken from the pack decodes only to the chunk its entry names.
pub fn pack(data: &[u8]) {
    use snapstore::pack::{decode_index, index_len};
    let Ok(len) = index_len(data) else { return };
    let Ok(index) = decode_index(data.get(..len).unwrap_or(data)) else { return };
    assert!(index.working <= index.entries.len());
    let mut offset = len as u64;
    for entry in &index.entries {
        assert_eq!(entry.offset, offset, "chunk files follow the index back to back");
        let chunk_file = snapstore::chunk::HEADER_LEN..=snapstore::chunk::MAX_CHUNK + snapstore::chunk::HEADER_LEN;
        assert!(usize::try_from(entry.len).is_ok_and(|len| chunk_file.contains(&len)));
        offset += entry.len;
        let (Ok(start), Ok(end)) = (usize::try_from(entry.offset), usize::try_from(offset)) else { continue };
        let Some(file) = data.get(start..end) else { continue };
        if let Ok(bytes) = snapstore::chunk::decode(file, &entry.id) {
            assert_eq!(snapstore::ChunkId::of(&bytes), entry.id);
        }
    }
}
