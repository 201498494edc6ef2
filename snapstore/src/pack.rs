//! A working-set pack: the chunks holding a snapshot's working set, in the order the working
//! set is prefetched, in one object (`packs/NAME`), so that a host restoring from an object
//! store fetches them with a few large ranged GETs instead of one GET per 64 KiB chunk (a
//! single-node RGW here serves ~1,200 GETs/s: 400 chunks one by one take longer than the
//! restore; docs/object-store.md).
//!
//! Layout (little-endian; docs/snapshot-store-format.md): a 20-byte header — magic `USPACK\0\0`,
//! version u16, reserved u16 (0), count u32, working u32 (the first `working` entries hold the
//! working set; the rest, the tail, are chunks next to them the set did not name) — then `count`
//! index entries of 36 bytes (chunk id, chunk-file length u32), then the chunk files back to
//! back in index order. Nothing in it is trusted: every chunk file is checked against its id, and
//! a reader uses only the chunks its manifest names.

use crate::chunk::MAX_CHUNK;
use crate::ChunkId;

/// The first bytes of a pack.
pub const MAGIC: [u8; 8] = *b"USPACK\0\0";
/// The version this code writes and reads.
pub const VERSION: u16 = 1;
/// Header bytes before the index.
pub const HEADER_LEN: usize = 20;
/// Bytes per index entry.
pub const ENTRY_LEN: usize = 36;

/// Why a pack could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum PackError {
    #[error("not a working-set pack (bad magic)")]
    BadMagic,
    #[error("pack version {0} is not supported (this build reads version {VERSION})")]
    BadVersion(u16),
    #[error("pack index entry {index}: a chunk file of {len} bytes is not possible")]
    BadLength { index: usize, len: u32 },
    #[error("pack header: {working} working-set entries of {count}")]
    BadWorking { working: u32, count: u32 },
    #[error("pack header and index: {have} bytes of {need} (truncated?)")]
    Truncated { have: usize, need: usize },
}

/// Where one chunk file of a pack is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    /// The chunk.
    pub id: ChunkId,
    /// Where its file starts in the pack.
    pub offset: u64,
    /// The file's length.
    pub len: u64,
}

/// Where each chunk file of a pack is.
#[derive(Debug, PartialEq, Eq)]
pub struct PackIndex {
    /// In pack order.
    pub entries: Vec<PackEntry>,
    /// How many of the first entries hold the working set (the rest is the tail).
    pub working: usize,
}

/// A pack of `files` (chunk id and chunk file), in the given order, the first `working` of them
/// the working set's.
pub fn encode(files: &[(ChunkId, Vec<u8>)], working: usize) -> Vec<u8> {
    let count = u32::try_from(files.len()).unwrap_or(u32::MAX);
    let working = u32::try_from(working.min(files.len())).unwrap_or(count);
    let mut pack =
        Vec::with_capacity(HEADER_LEN + files.len() * ENTRY_LEN + files.iter().map(|f| f.1.len()).sum::<usize>());
    pack.extend_from_slice(&MAGIC);
    pack.extend_from_slice(&VERSION.to_le_bytes());
    pack.extend_from_slice(&0u16.to_le_bytes());
    pack.extend_from_slice(&count.to_le_bytes());
    pack.extend_from_slice(&working.to_le_bytes());
    for (id, file) in files.iter().take(count as usize) {
        pack.extend_from_slice(&id.0);
        pack.extend_from_slice(&u32::try_from(file.len()).unwrap_or(u32::MAX).to_le_bytes());
    }
    for (_, file) in files.iter().take(count as usize) {
        pack.extend_from_slice(file);
    }
    pack
}

/// The bytes a pack's header and index take, from its first [`HEADER_LEN`] bytes.
pub fn index_len(head: &[u8]) -> Result<usize, PackError> {
    let head = head.get(..HEADER_LEN).ok_or(PackError::Truncated { have: head.len(), need: HEADER_LEN })?;
    if head[..8] != MAGIC {
        return Err(PackError::BadMagic);
    }
    let version = u16::from_le_bytes([head[8], head[9]]);
    if version != VERSION {
        return Err(PackError::BadVersion(version));
    }
    let count = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
    let working = u32::from_le_bytes([head[16], head[17], head[18], head[19]]);
    if working > count {
        return Err(PackError::BadWorking { working, count });
    }
    Ok(HEADER_LEN + (count as usize).saturating_mul(ENTRY_LEN))
}

/// The index of a pack from its first [`index_len`] bytes.
pub fn decode_index(head: &[u8]) -> Result<PackIndex, PackError> {
    let len = index_len(head)?;
    let index = head.get(HEADER_LEN..len).ok_or(PackError::Truncated { have: head.len(), need: len })?;
    let mut offset = len as u64;
    let mut entries = Vec::with_capacity(index.len() / ENTRY_LEN);
    for (i, entry) in index.chunks_exact(ENTRY_LEN).enumerate() {
        let mut id = [0u8; 32];
        id.copy_from_slice(&entry[..32]);
        let file_len = u32::from_le_bytes([entry[32], entry[33], entry[34], entry[35]]);
        if file_len as usize > MAX_CHUNK + crate::chunk::HEADER_LEN || (file_len as usize) < crate::chunk::HEADER_LEN {
            return Err(PackError::BadLength { index: i, len: file_len });
        }
        entries.push(PackEntry { id: ChunkId(id), offset, len: u64::from(file_len) });
        offset += u64::from(file_len);
    }
    let working = u32::from_le_bytes([head[16], head[17], head[18], head[19]]) as usize;
    Ok(PackIndex { entries, working })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk;
    use crate::Codec;

    #[test]
    fn a_pack_reads_back_its_chunks_in_order_and_refuses_damage() {
        let files: Vec<(ChunkId, Vec<u8>)> = (0u8..3)
            .map(|seed| {
                let bytes = vec![seed; 65536];
                let id = ChunkId::of(&bytes);
                (id, chunk::encode(&bytes, &id, Codec::Zstd))
            })
            .collect();
        let pack = encode(&files, 2);
        let index = decode_index(&pack[..index_len(&pack).expect("len")]).expect("index");
        assert_eq!((index.entries.len(), index.working), (3, 2));
        for (entry, (expected, file)) in index.entries.iter().zip(&files) {
            assert_eq!(&entry.id, expected);
            let range =
                usize::try_from(entry.offset).expect("offset")..usize::try_from(entry.offset + entry.len).expect("end");
            assert_eq!(&pack[range.clone()], &file[..]);
            assert!(chunk::decode(&pack[range], expected).is_ok());
        }
        assert_eq!(index_len(b"USPACK\0\0\x02\0\0\0\0\0\0\0\0\0\0\0"), Err(PackError::BadVersion(2)));
        assert_eq!(
            index_len(b"USPACK\0\0\x01\0\0\0\x01\0\0\0\x02\0\0\0"),
            Err(PackError::BadWorking { working: 2, count: 1 })
        );
        assert_eq!(index_len(b"not a pack, though long enough"), Err(PackError::BadMagic));
        assert_eq!(index_len(b"USPACK\0\0"), Err(PackError::Truncated { have: 8, need: HEADER_LEN }));
        let mut bad = pack.clone();
        bad[HEADER_LEN + 32..HEADER_LEN + 36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_index(&bad[..index_len(&bad).expect("len")]),
            Err(PackError::BadLength { index: 0, .. })
        ));
        assert_eq!(
            decode_index(&pack[..HEADER_LEN + 10]),
            Err(PackError::Truncated { have: HEADER_LEN + 10, need: HEADER_LEN + 3 * ENTRY_LEN }),
            "a short index is refused"
        );
    }
}
