//! Writes the seed inputs of the fuzz corpora (`fuzz/corpus/TARGET/seed-*`): valid inputs of
//! each parser, so that the fuzzer's mutations start past the magic numbers and checksums.
//! `./x fuzz` runs it before fuzzing. Usage: fuzz_seeds CORPUS_DIR

use e2e::fuzz_checks::{IDENTITY, STAMP};
use prefetch::loading_set::LoadingSet;
use prefetch::plan::{Batch, BatchKind, Plan};
use prefetch::record::{Run, Touch};
use prefetch::working_set::{LearnedTouch, WorkingSet};
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let corpus = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: fuzz_seeds CORPUS_DIR"))?;
    let corpus = Path::new(&corpus);
    let write = |target: &str, name: String, bytes: &[u8]| -> anyhow::Result<()> {
        std::fs::create_dir_all(corpus.join(target))?;
        Ok(std::fs::write(corpus.join(target).join(format!("seed-{name}")), bytes)?)
    };
    let region = |addr: u64, size: u64, offset: u64, page: u64| serde_json::json!({"base_host_virt_addr": addr, "size": size, "offset": offset, "page_size": page, "page_size_kib": page});
    let handshakes = [
        serde_json::json!([region(0x7f00_0000_0000, 64 << 20, 0, 4096)]),
        serde_json::json!([
            region(0x7f00_0000_0000, 3 << 30, 0, 4096),
            region(0x7f10_0000_0000, 1 << 30, 3 << 30, 4096)
        ]),
        serde_json::json!([region(0x7f00_0020_0000, 8 << 20, 0, 2 << 20)]),
        serde_json::json!([{"base_host_virt_addr": 4096, "size": 8192, "offset": 0, "page_size_kib": 4096, "future": [1, 2]}]),
        serde_json::json!([]),
    ];
    for (i, json) in handshakes.iter().enumerate() {
        write("handshake", format!("{i}"), json.to_string().as_bytes())?;
    }
    for runs in 1..=5u64 {
        let mut set = WorkingSet::new(IDENTITY);
        for run in 0..runs {
            let touches = (0..64).map(|p| Touch { page: p * (run + 1) % 300, write: p % 3 == 0 }).collect();
            set.merge(&Run { touches });
        }
        set.learn(&[LearnedTouch { page: 999, rank: 5, write: true }]);
        write("working_set", format!("{runs}-runs"), &prefetch::format::encode(&set)?)?;
    }
    let dir = tempfile::tempdir()?;
    for batches in 1..=4u64 {
        let plan = Plan::background(
            (0..batches)
                .map(|b| Batch {
                    first_page: b * 40,
                    pages: 1 + b,
                    kind: if b == 2 { BatchKind::Zero } else { BatchKind::Copy },
                    priority: b as f64,
                })
                .collect(),
            Some(2.0),
        );
        let path = dir.path().join("ls");
        let read = |offset: u64, buf: &mut [u8]| {
            let start = vmm_shim::usize_of(offset);
            buf.iter_mut().enumerate().for_each(|(i, b)| *b = (start + i).to_le_bytes()[0]);
            Ok(())
        };
        LoadingSet::write(&path, IDENTITY, STAMP, &plan, read)?;
        write("loading_set", format!("{batches}-batches"), &std::fs::read(&path)?)?;
    }
    for chunks in 1..=5u64 {
        let chunk_size = 4096u32 << chunks;
        let ids = (0..chunks + 2).map(|c| (c % 3 != 1).then(|| snapstore::ChunkId::of(&c.to_le_bytes()))).collect();
        let manifest = snapstore::manifest::Manifest {
            chunk_size,
            identity: prefetch::identity::SnapshotIdentity {
                len: (chunks + 2) * u64::from(chunk_size),
                fingerprint: chunks,
            },
            regions: vec![snapstore::manifest::Region { file_offset: 0, size: u64::from(chunk_size), guest_addr: 0 }],
            zero_runs: (0..chunks).map(|c| (c * 40, 3 + c)).collect(),
            chunks: ids,
        };
        write("manifest", format!("{chunks}-chunks"), &manifest.encode())?;
    }
    for (i, codec) in [snapstore::Codec::None, snapstore::Codec::Lz4, snapstore::Codec::Zstd].into_iter().enumerate() {
        for size in [4096usize, 65536] {
            let bytes: Vec<u8> = (0..size).map(|b| (b / 7 % 251).to_le_bytes()[0]).collect();
            write(
                "chunk",
                format!("{i}-{size}"),
                &snapstore::chunk::encode(&bytes, &snapstore::ChunkId::of(&bytes), codec),
            )?;
        }
    }
    for chunks in 1..=4usize {
        let files: Vec<(snapstore::ChunkId, Vec<u8>)> = (0..chunks)
            .map(|c| {
                let bytes: Vec<u8> = (0..4096usize << c).map(|b| (b / (c + 3) % 251).to_le_bytes()[0]).collect();
                let id = snapstore::ChunkId::of(&bytes);
                let codec = [snapstore::Codec::Zstd, snapstore::Codec::Lz4, snapstore::Codec::None][c % 3];
                (id, snapstore::chunk::encode(&bytes, &id, codec))
            })
            .collect();
        write("pack", format!("{chunks}-chunks"), &snapstore::pack::encode(&files, chunks.div_ceil(2)))?;
    }
    Ok(())
}
