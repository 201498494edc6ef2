//! One chunk as stored: a 48-byte header (magic, version, codec, lengths, id) and the stored
//! bytes. Decoding checks every header field and the id against the uncompressed bytes, so a
//! chunk that decodes is the chunk its name says (docs/snapshot-store-format.md).

use crate::{ChunkId, Codec};
use bytes::Bytes;
use xxhash_rust::xxh3::xxh3_128;

/// A chunk file's first four bytes.
pub const MAGIC: [u8; 4] = *b"USCK";
/// The chunk format this build writes and reads.
pub const VERSION: u16 = 1;
/// Bytes before the stored bytes.
pub const HEADER_LEN: usize = 48;
/// Bytes after the stored bytes in a disk cache's files ([`encode_checked`]).
pub const CHECK_LEN: usize = 16;
/// The largest chunk (uncompressed) the format allows.
pub const MAX_CHUNK: usize = 2 << 20;
/// zstd level for chunks at rest: level 3 is zstd's default, the knee of ratio against speed.
const ZSTD_LEVEL: i32 = 3;

/// Why stored bytes are not a good chunk.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    /// The header is wrong (magic, version, codec, lengths).
    #[error("bad chunk header: {0}")]
    Header(String),
    /// The stored bytes are shorter or longer than the header says (truncated?).
    #[error("stored length {actual} is not the {expected} bytes the header says (truncated?)")]
    Length {
        /// What the header says.
        expected: usize,
        /// What is there.
        actual: usize,
    },
    /// The stored bytes do not decompress to the header's length.
    #[error("the stored bytes do not decompress ({0})")]
    Decompress(String),
    /// The file could not be read.
    #[error("cannot read the chunk file: {0}")]
    Read(String),
    /// The file's header names another chunk (stored under the wrong name).
    #[error("the file holds chunk {named}, not {expected}")]
    Named {
        /// The name it is stored under.
        expected: ChunkId,
        /// The chunk its header names.
        named: ChunkId,
    },
    /// A disk cache's file whose content does not match the check written with it: damaged.
    #[error("the content does not match the check written with it (damaged on disk)")]
    Check,
    /// The bytes hash to another id: corrupt, or stored under the wrong name.
    #[error("content hashes to {actual}, not to its name {expected}")]
    Hash {
        /// The name.
        expected: ChunkId,
        /// What the bytes hash to.
        actual: ChunkId,
    },
}

/// `bytes` (at most [`MAX_CHUNK`]) stored with `codec`, header first; stored as they are when
/// compressing would not make them smaller. `id` is `ChunkId::of(bytes)`, which every caller
/// has already: hashing again would cost ~40 µs per 64 KiB here.
pub fn encode(bytes: &[u8], id: &ChunkId, codec: Codec) -> Vec<u8> {
    debug_assert_eq!(*id, ChunkId::of(bytes), "a chunk is encoded under its own id");
    let compressed = compress(bytes, codec);
    let (codec, stored) = match compressed {
        Some(stored) if stored.len() < bytes.len() => (codec, stored),
        _ => (Codec::None, bytes.to_vec()),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + stored.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(codec.tag());
    out.push(0);
    out.extend_from_slice(&u32_of(bytes.len()).to_le_bytes());
    out.extend_from_slice(&u32_of(stored.len()).to_le_bytes());
    out.extend_from_slice(&id.0);
    out.extend_from_slice(&stored);
    out
}

/// `bytes` compressed with `codec` (None for [`Codec::None`]).
pub fn compress(bytes: &[u8], codec: Codec) -> Option<Vec<u8>> {
    match codec {
        Codec::None => None,
        Codec::Lz4 => lz4::block::compress(bytes, None, false).ok(),
        Codec::Zstd => zstd::bulk::compress(bytes, ZSTD_LEVEL).ok(),
    }
}

/// `bytes` as one buffer that several owners share without a copy (the RAM pool, the disk
/// cache's writer), without spare capacity: RAM is accounted by length.
pub fn shared(bytes: Vec<u8>) -> Bytes {
    Bytes::from(bytes.into_boxed_slice())
}

/// Decompresses `stored` (written with `codec`) into `out`, which must be exactly the
/// uncompressed length.
pub fn decompress_into(codec: Codec, stored: &[u8], out: &mut [u8]) -> Result<(), ChunkError> {
    let written = match codec {
        Codec::None if stored.len() == out.len() => {
            out.copy_from_slice(stored);
            Ok(out.len())
        }
        Codec::None => Err("stored length differs".to_string()),
        Codec::Lz4 => i32::try_from(out.len()).map_err(|e| e.to_string()).and_then(|capacity| {
            lz4::block::decompress_to_buffer(stored, Some(capacity), out).map_err(|e| e.to_string())
        }),
        Codec::Zstd => with_zstd_decompressor(|d| d.decompress_to_buffer(stored, out)).map_err(|e| e.to_string()),
    }
    .map_err(ChunkError::Decompress)?;
    if written != out.len() {
        return Err(ChunkError::Decompress(format!("{written} bytes, not {}", out.len())));
    }
    Ok(())
}

/// Runs `decompress` with this thread's zstd context, made once rather than for every chunk
/// (with the next change, 0.94–0.98× the time of a 64 KiB decode here).
fn with_zstd_decompressor<R>(
    decompress: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<R>,
) -> std::io::Result<R> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|cell| {
        // A thread never re-enters here, so the context is free; one that is busy all the same
        // gets a context of its own rather than a panic.
        let Ok(mut slot) = cell.try_borrow_mut() else {
            return decompress(&mut zstd::bulk::Decompressor::new()?);
        };
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(decompressor) => decompress(decompressor),
            None => decompress(&mut zstd::bulk::Decompressor::new()?),
        }
    })
}

/// A chunk file's header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// How the bytes after the header are stored.
    pub codec: Codec,
    /// The chunk's length uncompressed.
    pub len: usize,
    /// The stored bytes' length.
    pub stored_len: usize,
    /// The id the header names.
    pub id: ChunkId,
}

/// The header of a chunk file, every field checked.
pub fn header(file: &[u8]) -> Result<Header, ChunkError> {
    let bad = |what: &str| ChunkError::Header(what.to_string());
    if file.len() < HEADER_LEN {
        return Err(ChunkError::Length { expected: HEADER_LEN, actual: file.len() });
    }
    if file[..4] != MAGIC {
        return Err(bad("not a chunk (magic)"));
    }
    let version = u16::from_le_bytes([file[4], file[5]]);
    if version != VERSION {
        return Err(ChunkError::Header(format!("version {version} (this build reads {VERSION})")));
    }
    let codec = Codec::from_tag(file[6]).ok_or_else(|| ChunkError::Header(format!("unknown codec {}", file[6])))?;
    if file[7] != 0 {
        return Err(bad("reserved byte is not zero"));
    }
    let len = usize_of(&file[8..12]);
    let stored_len = usize_of(&file[12..16]);
    if len == 0 || len > MAX_CHUNK {
        return Err(ChunkError::Header(format!("length {len} outside 1..={MAX_CHUNK}")));
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&file[16..48]);
    Ok(Header { codec, len, stored_len, id: ChunkId(id) })
}

/// The uncompressed bytes of chunk file `file`, which must be chunk `expected`.
pub fn decode(file: &[u8], expected: &ChunkId) -> Result<Vec<u8>, ChunkError> {
    let header = header(file)?;
    let stored = &file[HEADER_LEN..];
    if stored.len() != header.stored_len {
        return Err(ChunkError::Length { expected: header.stored_len, actual: stored.len() });
    }
    unpack(&header, std::borrow::Cow::Borrowed(stored), expected)
}

/// The uncompressed bytes of the chunk file `file` reads, which must be chunk `expected`. As
/// [`decode`], without holding the file in memory first: stored raw, its bytes are read
/// straight into the buffer returned (no second copy, half the fresh memory).
pub fn read(file: impl std::io::Read, expected: &ChunkId) -> Result<Vec<u8>, ChunkError> {
    let (header, stored, _) = read_parts(file, 0)?;
    unpack(&header, std::borrow::Cow::Owned(stored), expected)
}

/// As [`encode`], followed by the [`CHECK_LEN`]-byte XXH3-128 of `bytes`: a disk cache's own
/// files. Their bytes were checked against their id (BLAKE3) when they came in; on the way
/// back the check only has to catch damage on disk (bit rot, a torn or truncated write), and
/// costs ~4 µs per 64 KiB here against BLAKE3's ~40 µs: what decides whether reading a warm
/// cache keeps ahead of the VMs restoring from it.
pub fn encode_checked(bytes: &[u8], id: &ChunkId, codec: Codec) -> Vec<u8> {
    let mut file = encode(bytes, id, codec);
    file.extend_from_slice(&xxh3_128(bytes).to_le_bytes());
    file
}

/// The uncompressed bytes of a file [`encode_checked`] wrote, which must be chunk `expected`:
/// its header names it, and its content matches the check. A file without the check (a chunk
/// file as [`encode`] writes it) is checked against `expected` itself, as [`read`] does.
pub fn read_checked(file: impl std::io::Read, expected: &ChunkId) -> Result<Vec<u8>, ChunkError> {
    let (header, stored, check) = read_parts(file, CHECK_LEN)?;
    let Ok(check) = <[u8; CHECK_LEN]>::try_from(check.as_slice()) else {
        return unpack(&header, std::borrow::Cow::Owned(stored), expected);
    };
    if header.id != *expected {
        return Err(ChunkError::Named { expected: *expected, named: header.id });
    }
    let bytes = uncompressed(&header, std::borrow::Cow::Owned(stored))?;
    if xxh3_128(&bytes) != u128::from_le_bytes(check) {
        return Err(ChunkError::Check);
    }
    Ok(bytes)
}

/// Where the bytes of chunk `expected` lie in `file`, a disk cache's file that
/// [`encode_checked`] wrote uncompressed, checked as [`read_checked`] checks them; None when the
/// file holds them compressed, or has no check (an older cache's): read it with [`read_checked`].
pub fn raw_checked(file: &[u8], expected: &ChunkId) -> Result<Option<std::ops::Range<usize>>, ChunkError> {
    let header = header(file)?;
    if header.codec != Codec::None {
        return Ok(None);
    }
    if header.id != *expected {
        return Err(ChunkError::Named { expected: *expected, named: header.id });
    }
    let end = HEADER_LEN + header.len;
    if header.stored_len == header.len && file.len() == end {
        return Ok(None);
    }
    if header.stored_len != header.len || file.len() != end + CHECK_LEN {
        return Err(ChunkError::Length { expected: end + CHECK_LEN, actual: file.len() });
    }
    let mut check = [0u8; CHECK_LEN];
    check.copy_from_slice(&file[end..]);
    if xxh3_128(&file[HEADER_LEN..end]) != u128::from_le_bytes(check) {
        return Err(ChunkError::Check);
    }
    Ok(Some(HEADER_LEN..end))
}

/// A chunk file's header, its stored bytes, and what follows them: nothing, or exactly
/// `trailer` bytes.
fn read_parts(mut file: impl std::io::Read, trailer: usize) -> Result<(Header, Vec<u8>, Vec<u8>), ChunkError> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ChunkError::Read("it ends early (truncated?)".into()),
        _ => ChunkError::Read(e.to_string()),
    };
    let mut head = [0u8; HEADER_LEN];
    file.read_exact(&mut head).map_err(io)?;
    let header = header(&head)?;
    if header.stored_len > MAX_CHUNK + MAX_CHUNK / 8 {
        return Err(ChunkError::Header(format!("stored length {} is larger than any chunk", header.stored_len)));
    }
    let mut stored = vec![0u8; header.stored_len];
    file.read_exact(&mut stored).map_err(io)?;
    let mut rest = Vec::with_capacity(trailer + 1);
    std::io::Read::read_to_end(&mut file.take(trailer as u64 + 1), &mut rest).map_err(io)?;
    if !rest.is_empty() && rest.len() != trailer {
        return Err(ChunkError::Length { expected: header.stored_len, actual: header.stored_len + rest.len() });
    }
    Ok((header, stored, rest))
}

/// The uncompressed bytes of a chunk stored as `stored` under `header`, which must be chunk
/// `expected`; raw stored bytes are returned as they are when owned.
fn unpack(header: &Header, stored: std::borrow::Cow<'_, [u8]>, expected: &ChunkId) -> Result<Vec<u8>, ChunkError> {
    let bytes = uncompressed(header, stored)?;
    let actual = ChunkId::of(&bytes);
    if actual != *expected {
        return Err(ChunkError::Hash { expected: *expected, actual });
    }
    Ok(bytes)
}

/// The bytes `stored` holds under `header`, not checked.
fn uncompressed(header: &Header, stored: std::borrow::Cow<'_, [u8]>) -> Result<Vec<u8>, ChunkError> {
    if header.codec == Codec::None && stored.len() == header.len {
        return Ok(stored.into_owned());
    }
    if header.codec == Codec::Zstd {
        // Into fresh capacity: nothing is zeroed first only to be overwritten.
        let bytes = with_zstd_decompressor(|d| d.decompress(&stored, header.len))
            .map_err(|e| ChunkError::Decompress(e.to_string()))?;
        if bytes.len() != header.len {
            return Err(ChunkError::Decompress(format!("{} bytes, not {}", bytes.len(), header.len)));
        }
        return Ok(bytes);
    }
    let mut bytes = vec![0u8; header.len];
    decompress_into(header.codec, &stored, &mut bytes)?;
    Ok(bytes)
}

fn usize_of(bytes: &[u8]) -> usize {
    let mut word = [0u8; 4];
    word.copy_from_slice(bytes);
    crate::index(u64::from(u32::from_le_bytes(word)))
}

/// A chunk length as the header's u32 (chunks are at most [`MAX_CHUNK`]).
fn u32_of(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..65536u32).map(|i| u8::try_from(i % 251 / 7).unwrap_or(0)).collect()
    }

    #[test]
    fn every_codec_round_trips_and_checks_the_id() {
        let bytes = sample();
        let id = ChunkId::of(&bytes);
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
            let file = encode(&bytes, &ChunkId::of(&bytes), codec);
            assert_eq!(header(&file).map(|h| h.codec), Ok(codec), "compressible bytes stay compressed");
            assert_eq!(decode(&file, &id).as_deref(), Ok(bytes.as_slice()));
            let other = ChunkId::of(b"other");
            assert!(matches!(decode(&file, &other), Err(ChunkError::Hash { .. })));
        }
    }

    #[test]
    fn damage_is_named_never_returned() {
        let bytes = sample();
        let id = ChunkId::of(&bytes);
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
            let file = encode(&bytes, &ChunkId::of(&bytes), codec);
            let truncated = &file[..file.len() - 1];
            assert!(matches!(decode(truncated, &id), Err(ChunkError::Length { .. })), "{codec:?}");
            for at in [HEADER_LEN, HEADER_LEN + 7, file.len() - 1] {
                let mut flipped = file.clone();
                flipped[at] ^= 0x10;
                assert!(decode(&flipped, &id).is_err(), "{codec:?}: bit flip at {at} accepted");
            }
            let mut bad_codec = file.clone();
            bad_codec[6] = 9;
            assert!(matches!(decode(&bad_codec, &id), Err(ChunkError::Header(_))));
        }
        assert!(matches!(decode(b"USCK", &id), Err(ChunkError::Length { .. })));
    }

    #[test]
    fn a_zstd_chunk_whose_header_lies_about_its_length_is_refused_and_the_next_one_decodes() {
        let bytes = sample();
        let id = ChunkId::of(&bytes);
        let file = encode(&bytes, &id, Codec::Zstd);
        for claimed in [bytes.len() - 1, bytes.len() + 4096] {
            let mut lying = file.clone();
            lying[8..12].copy_from_slice(&u32_of(claimed).to_le_bytes());
            assert!(
                matches!(decode(&lying, &id), Err(ChunkError::Decompress(_))),
                "a header claiming {claimed} bytes was not refused"
            );
            // The thread's zstd context, reused, is not left broken by the failure.
            assert_eq!(decode(&file, &id).as_deref(), Ok(bytes.as_slice()));
        }
    }

    #[test]
    fn read_agrees_with_decode_on_good_and_damaged_files() {
        let bytes = sample();
        let id = ChunkId::of(&bytes);
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
            let file = encode(&bytes, &ChunkId::of(&bytes), codec);
            assert_eq!(read(&file[..], &id).as_deref(), Ok(bytes.as_slice()), "{codec:?}");
            assert!(matches!(read(&file[..file.len() - 1], &id), Err(ChunkError::Read(_))), "{codec:?}: truncated");
            let longer = [&file[..], b"x"].concat();
            assert!(matches!(read(&longer[..], &id), Err(ChunkError::Length { .. })), "{codec:?}: trailing byte");
            for at in [HEADER_LEN, file.len() - 1] {
                let mut flipped = file.clone();
                flipped[at] ^= 0x10;
                assert!(read(&flipped[..], &id).is_err(), "{codec:?}: bit flip at {at} accepted");
            }
        }
    }

    #[test]
    fn a_checked_file_round_trips_and_any_damage_is_refused() {
        let bytes = sample();
        let id = ChunkId::of(&bytes);
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
            let file = encode_checked(&bytes, &ChunkId::of(&bytes), codec);
            assert_eq!(file.len(), encode(&bytes, &ChunkId::of(&bytes), codec).len() + CHECK_LEN);
            assert_eq!(read_checked(&file[..], &id).as_deref(), Ok(bytes.as_slice()), "{codec:?}");
            let other = ChunkId::of(b"other");
            assert!(matches!(read_checked(&file[..], &other), Err(ChunkError::Named { .. })), "{codec:?}");
            // A flipped bit anywhere past the header: in the stored bytes or in the check.
            for at in [HEADER_LEN, HEADER_LEN + 7, file.len() - CHECK_LEN - 1, file.len() - 1] {
                let mut flipped = file.clone();
                flipped[at] ^= 0x10;
                assert!(read_checked(&flipped[..], &id).is_err(), "{codec:?}: bit flip at {at} accepted");
            }
            let mut flipped = file.clone();
            flipped[file.len() - 1] ^= 1;
            assert_eq!(read_checked(&flipped[..], &id), Err(ChunkError::Check), "{codec:?}");
            for cut in [1, CHECK_LEN - 1, CHECK_LEN + 1] {
                assert!(read_checked(&file[..file.len() - cut], &id).is_err(), "{codec:?}: cut by {cut}");
            }
            let longer = [&file[..], b"x"].concat();
            assert!(matches!(read_checked(&longer[..], &id), Err(ChunkError::Length { .. })), "{codec:?}");
            // A file without the check (an older cache) is checked against its id instead.
            let plain = encode(&bytes, &ChunkId::of(&bytes), codec);
            assert_eq!(read_checked(&plain[..], &id).as_deref(), Ok(bytes.as_slice()), "{codec:?}");
            assert!(matches!(read_checked(&plain[..], &other), Err(ChunkError::Hash { .. })), "{codec:?}");
        }
    }

    #[test]
    fn a_raw_checked_file_is_found_in_place_and_any_damage_is_refused() {
        let bytes = sample();
        let (id, other) = (ChunkId::of(&bytes), ChunkId::of(b"other"));
        let file = encode_checked(&bytes, &id, Codec::None);
        let range = raw_checked(&file, &id).expect("checked").expect("stored raw");
        assert_eq!(&file[range], bytes.as_slice());
        assert_eq!(raw_checked(&encode_checked(&bytes, &id, Codec::Lz4), &id), Ok(None), "compressed: read instead");
        assert!(matches!(raw_checked(&file, &other), Err(ChunkError::Named { .. })));
        for at in [HEADER_LEN, HEADER_LEN + 7, file.len() - CHECK_LEN - 1, file.len() - 1] {
            let mut flipped = file.clone();
            flipped[at] ^= 0x10;
            assert_eq!(raw_checked(&flipped, &id), Err(ChunkError::Check), "bit flip at {at} accepted");
        }
        for cut in [1, CHECK_LEN - 1, CHECK_LEN + 1, file.len() - HEADER_LEN] {
            assert!(
                matches!(raw_checked(&file[..file.len() - cut], &id), Err(ChunkError::Length { .. })),
                "cut by {cut}"
            );
        }
        let longer = [&file[..], b"x"].concat();
        assert!(matches!(raw_checked(&longer, &id), Err(ChunkError::Length { .. })));
        // Without the check (an older cache's file): left to `read_checked`, which hashes it.
        assert_eq!(raw_checked(&encode(&bytes, &id, Codec::None), &id), Ok(None));
    }

    #[test]
    fn incompressible_bytes_are_stored_raw() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[3]
            })
            .collect();
        assert_eq!(header(&encode(&noise, &ChunkId::of(&noise), Codec::Zstd)).map(|h| h.codec), Ok(Codec::None));
    }
}
