//! A content-addressed snapshot store: each snapshot memory file becomes a manifest (chunk
//! ranges → chunk ids, zero runs, the file's identity and region layout) plus chunks named by the
//! BLAKE3 hash of their bytes, each stored once however many snapshots hold it, compressed or
//! not (the codec recorded per chunk). The format is specified in
//! `docs/snapshot-store-format.md`; an object store holds the same files under the same names.

#![warn(missing_docs)]

pub mod bucket;
pub mod chunk;
pub mod disk_cache;
pub mod extents;
pub mod import;
pub mod maintain;
pub mod manifest;
pub mod pack;
pub mod push;
pub mod remote;
pub mod retry;
pub mod shared_set;
pub mod store;

use std::fmt;

/// A 4 KiB page: the unit of zero runs and of chunk sizes.
pub const PAGE: u64 = 4096;

/// A chunk's name: the BLAKE3 hash of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(bytes).as_bytes())
    }

    /// Lower-case hex, the chunk's file name.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The id a 64-character hex name spells, if it does.
    pub fn from_hex(hex: &str) -> Option<ChunkId> {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return None;
        }
        let mut id = [0u8; 32];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ChunkId(id))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.hex()[..16])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// How a chunk's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// As they are.
    None,
    /// LZ4 block format (fast to decompress: what RAM holds).
    Lz4,
    /// Zstandard frame, level 3 (smaller: what disks and object stores hold).
    Zstd,
}

impl Codec {
    /// The byte that names the codec in a chunk's header.
    pub fn tag(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Zstd => 2,
        }
    }

    /// The codec a header byte names.
    pub fn from_tag(tag: u8) -> Option<Codec> {
        match tag {
            0 => Some(Codec::None),
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// Whether every byte is zero (OR over 256-byte runs vectorises well).
pub fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(256).all(|run| run.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// A file offset or length as an index into memory: chunks are at most 2 MiB, and memory files
/// this process maps fit its address space.
pub(crate) fn index(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_hex() {
        let id = ChunkId::of(b"hello");
        assert_eq!(ChunkId::from_hex(&id.hex()), Some(id));
        assert_eq!(ChunkId::from_hex(&id.hex().to_uppercase()), None);
        assert_eq!(ChunkId::from_hex("abc"), None);
        assert_ne!(ChunkId::of(b"hello"), ChunkId::of(b"hellp"));
    }
}
