//! A snapshot's manifest: which chunk holds each chunk-sized range of the memory file, which
//! pages are zero, the file's identity and the region layout it was taken with. Little-endian,
//! versioned, ending in a BLAKE3 checksum of everything before it (docs/snapshot-store-format.md).
//! Decoding trusts no count: each is checked against the bytes that are left before anything
//! is allocated for it.

use crate::{ChunkId, PAGE};
use prefetch::identity::SnapshotIdentity;

/// A manifest's first eight bytes.
pub const MAGIC: [u8; 8] = *b"USMANIF\0";
/// The manifest format this build writes and reads.
pub const VERSION: u32 = 1;
/// Smallest and largest chunk size.
pub const CHUNK_SIZES: std::ops::RangeInclusive<u32> = 4096..=(2 << 20);

/// One guest memory region as the snapshot's VMM laid it out in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Where the region starts in the memory file.
    pub file_offset: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Its guest physical address.
    pub guest_addr: u64,
}

/// A snapshot in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Bytes per chunk (a power of two in [`CHUNK_SIZES`]); the last chunk may be shorter.
    pub chunk_size: u32,
    /// The memory file's identity: its length and fingerprint (working sets are bound to it).
    pub identity: SnapshotIdentity,
    /// The guest regions, if the importer was told them (empty: unknown).
    pub regions: Vec<Region>,
    /// All-zero pages as `(first page, page count)` runs, in order, not touching.
    pub zero_runs: Vec<(u64, u64)>,
    /// Chunk `i` covers bytes `[i * chunk_size, (i + 1) * chunk_size)` of the file; `None`: all
    /// zeros, nothing stored.
    pub chunks: Vec<Option<ChunkId>>,
}

/// Why bytes are not a manifest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// Not a manifest of a version this build reads.
    #[error("not a snapshot manifest ({0})")]
    NotManifest(String),
    /// The checksum does not match: damaged or truncated.
    #[error("checksum mismatch: the manifest is damaged or truncated")]
    Checksum,
    /// A field is out of its range.
    #[error("invalid field: {0}")]
    Invalid(String),
}

impl Manifest {
    /// The memory file's length.
    pub fn file_len(&self) -> u64 {
        self.identity.len
    }

    /// The file range chunk `index` covers.
    pub fn chunk_range(&self, index: usize) -> (u64, u64) {
        let start = index as u64 * u64::from(self.chunk_size);
        (start, (start + u64::from(self.chunk_size)).min(self.file_len()))
    }

    /// Pages that are all zero.
    pub fn zero_pages(&self) -> u64 {
        self.zero_runs.iter().map(|&(_, count)| count).sum()
    }

    /// The manifest as bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 24 * self.regions.len() + 32 * self.chunks.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        for word in [self.identity.len, self.identity.fingerprint, self.regions.len() as u64] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        for region in &self.regions {
            for word in [region.file_offset, region.size, region.guest_addr] {
                out.extend_from_slice(&word.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.zero_runs.len() as u64).to_le_bytes());
        for &(first, count) in &self.zero_runs {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for chunk in &self.chunks {
            out.extend_from_slice(&chunk.map_or([0; 32], |id| id.0));
        }
        let checksum = blake3::hash(&out);
        out.extend_from_slice(checksum.as_bytes());
        out
    }

    /// The manifest `bytes` hold, every field checked.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() < MAGIC.len() + 4 || bytes[..8] != MAGIC {
            return Err(ManifestError::NotManifest("magic".into()));
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != VERSION {
            return Err(ManifestError::NotManifest(format!("version {version}, this build reads {VERSION}")));
        }
        let Some(body_len) = bytes.len().checked_sub(32) else { return Err(ManifestError::Checksum) };
        if blake3::hash(&bytes[..body_len]).as_bytes() != &bytes[body_len..] {
            return Err(ManifestError::Checksum);
        }
        let mut reader = Reader { bytes: &bytes[..body_len], at: 12 };
        let manifest = reader.manifest()?;
        if reader.at != body_len {
            return Err(ManifestError::Invalid(format!("{} bytes after the chunk list", body_len - reader.at)));
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks the fields against each other.
    fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |what: String| Err(ManifestError::Invalid(what));
        let (len, chunk_size) = (self.file_len(), self.chunk_size);
        if !CHUNK_SIZES.contains(&chunk_size) || !chunk_size.is_power_of_two() {
            return invalid(format!("chunk size {chunk_size} is not a power of two in 4 KiB..=2 MiB"));
        }
        if len == 0 || len % PAGE != 0 {
            return invalid(format!("file length {len} is not a positive multiple of 4096"));
        }
        if self.chunks.len() as u64 != len.div_ceil(u64::from(chunk_size)) {
            return invalid(format!("{} chunks for {len} bytes of {chunk_size}-byte chunks", self.chunks.len()));
        }
        let pages = len / PAGE;
        let mut next_free = 0;
        for &(first, count) in &self.zero_runs {
            if count == 0 || first < next_free || first.checked_add(count).is_none_or(|end| end > pages) {
                return invalid(format!("zero run {first}+{count} is empty, out of order or past page {pages}"));
            }
            next_free = first + count + 1;
        }
        for region in &self.regions {
            if region.file_offset.checked_add(region.size).is_none_or(|end| end > len) {
                return invalid(format!("region at {:#x}+{:#x} leaves the file", region.file_offset, region.size));
            }
        }
        Ok(())
    }
}

/// Reads the fields of a manifest body in order.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn manifest(&mut self) -> Result<Manifest, ManifestError> {
        let chunk_size = u32::try_from(self.word(4)?).unwrap_or(0);
        let identity = SnapshotIdentity { len: self.word(8)?, fingerprint: self.word(8)? };
        let regions =
            self.list(24, |r| Ok(Region { file_offset: r.word(8)?, size: r.word(8)?, guest_addr: r.word(8)? }))?;
        let zero_runs = self.list(16, |r| Ok((r.word(8)?, r.word(8)?)))?;
        let chunks = self.list(32, |r| {
            let id = r.take(32)?;
            Ok(if id.iter().all(|&b| b == 0) { None } else { Some(ChunkId(id.try_into().unwrap_or([0; 32]))) })
        })?;
        Ok(Manifest { chunk_size, identity, regions, zero_runs, chunks })
    }

    /// A u64 count, then that many entries of `entry_len` bytes each.
    fn list<T>(
        &mut self,
        entry_len: usize,
        mut entry: impl FnMut(&mut Self) -> Result<T, ManifestError>,
    ) -> Result<Vec<T>, ManifestError> {
        let count = self.word(8)?;
        let left = (self.bytes.len() - self.at) / entry_len;
        if count > left as u64 {
            return Err(ManifestError::Invalid(format!("a count of {count} entries, only {left} fit")));
        }
        (0..count).map(|_| entry(self)).collect()
    }

    fn take(&mut self, len: usize) -> Result<&[u8], ManifestError> {
        let end = self.at + len;
        let bytes = self.bytes.get(self.at..end).ok_or_else(|| ManifestError::Invalid("truncated field".into()))?;
        self.at = end;
        Ok(bytes)
    }

    /// A little-endian integer of `len` (4 or 8) bytes.
    fn word(&mut self, len: usize) -> Result<u64, ManifestError> {
        let mut word = [0u8; 8];
        word[..len].copy_from_slice(self.take(len)?);
        Ok(u64::from_le_bytes(word))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            chunk_size: 65536,
            identity: SnapshotIdentity { len: 5 * 65536, fingerprint: 42 },
            regions: vec![Region { file_offset: 0, size: 5 * 65536, guest_addr: 0 }],
            zero_runs: vec![(16, 32), (70, 2)],
            chunks: vec![Some(ChunkId::of(b"a")), None, None, Some(ChunkId::of(b"b")), Some(ChunkId::of(b"a"))],
        }
    }

    #[test]
    fn round_trips() {
        let manifest = sample();
        assert_eq!(Manifest::decode(&manifest.encode()), Ok(manifest));
    }

    #[test]
    fn damage_and_lies_are_refused() {
        let bytes = sample().encode();
        for at in [0, 9, 20, bytes.len() / 2, bytes.len() - 1] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 1;
            assert!(Manifest::decode(&flipped).is_err(), "a flip at {at} was accepted");
        }
        assert!(Manifest::decode(&bytes[..bytes.len() - 5]).is_err());
        let lies = [
            Manifest { chunk_size: 5000, ..sample() },
            Manifest { chunks: vec![None; 4], ..sample() },
            Manifest { zero_runs: vec![(16, 32), (40, 2)], ..sample() },
            Manifest { zero_runs: vec![(79, 2)], ..sample() },
            Manifest { regions: vec![Region { file_offset: 65536, size: 5 * 65536, guest_addr: 0 }], ..sample() },
        ];
        for lie in lies {
            let err = Manifest::decode(&lie.encode()).unwrap_err();
            assert!(matches!(err, ManifestError::Invalid(_)), "{lie:?}: {err}");
        }
    }

    #[test]
    fn a_hostile_count_allocates_nothing() {
        let mut body = sample().encode();
        body.truncate(body.len() - 32);
        // The region count (offset 32) claims 2^60 entries.
        body[32..40].copy_from_slice(&(1u64 << 60).to_le_bytes());
        body.extend_from_slice(blake3::hash(&body).as_bytes());
        assert!(matches!(Manifest::decode(&body), Err(ManifestError::Invalid(m)) if m.contains("only")));
    }
}
