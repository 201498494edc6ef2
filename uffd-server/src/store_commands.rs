//! The binary's chunk-store commands: `import` and `store stats|gc|verify` (part of `main.rs`,
//! not of the library).

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use snapstore::import::{import, ImportOptions};
use snapstore::maintain::{self, Usage};
use snapstore::manifest::Region;
use snapstore::store::Store;
use snapstore::Codec;
use std::path::PathBuf;

/// `--codec`: how chunks are stored.
#[derive(Clone, Copy, ValueEnum)]
pub enum CodecArg {
    /// As they are.
    None,
    /// LZ4: fastest to decompress.
    Lz4,
    /// zstd level 3: smallest (docs/snapshot-store-format.md).
    Zstd,
}

impl From<CodecArg> for Codec {
    fn from(arg: CodecArg) -> Self {
        match arg {
            CodecArg::None => Codec::None,
            CodecArg::Lz4 => Codec::Lz4,
            CodecArg::Zstd => Codec::Zstd,
        }
    }
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The store's directory (created if missing).
    #[arg(long)]
    store: PathBuf,
    /// The snapshot's name in the store (replaces one of that name).
    #[arg(long)]
    name: String,
    /// Bytes per chunk: a power of two, 4K..2M (docs/snapshot-store-format.md says why 64K).
    #[arg(long, default_value = "64K", value_parser = crate::parse_bytes)]
    chunk_size: u64,
    /// How new chunks are stored.
    #[arg(long, value_enum, default_value = "zstd")]
    codec: CodecArg,
    /// A guest region of the snapshot as FILE_OFFSET:SIZE:GUEST_ADDR (hex with 0x, or decimal);
    /// repeatable. Recorded in the manifest.
    #[arg(long = "region", value_parser = parse_region)]
    regions: Vec<Region>,
    /// The Firecracker memory file.
    memfile: PathBuf,
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Bytes per snapshot and in all: logical, non-zero, unique (deduplicated), stored (compressed).
    Stats {
        #[arg(long)]
        store: PathBuf,
    },
    /// Remove chunks no manifest names (and temp files of killed imports).
    Gc {
        #[arg(long)]
        store: PathBuf,
    },
    /// Re-read every manifest and re-hash every chunk they name; exit 1 on any problem.
    Verify {
        #[arg(long)]
        store: PathBuf,
    },
}

pub fn run_import(args: &ImportArgs) -> Result<()> {
    let store = Store::create(&args.store)?;
    let chunk_size = u32::try_from(args.chunk_size).with_context(|| format!("--chunk-size {}", args.chunk_size))?;
    let options = ImportOptions { chunk_size, codec: args.codec.into(), regions: args.regions.clone() };
    let report = import(&store, &args.name, &args.memfile, &options)
        .with_context(|| format!("cannot import {} as `{}`", args.memfile.display(), args.name))?;
    println!(
        "imported {} as `{}`: {} chunks ({} zero), {} new, {} bytes written",
        args.memfile.display(),
        args.name,
        report.chunks,
        report.zero_chunks,
        report.new_chunks,
        report.bytes_written
    );
    Ok(())
}

pub fn run_store(command: &StoreCommand) -> Result<()> {
    match command {
        StoreCommand::Stats { store } => {
            let stats = maintain::stats(&Store::open(store)?)?;
            println!(
                "{:<24} {:>12} {:>12} {:>12} {:>12} {:>8}",
                "snapshot", "logical", "data", "unique", "stored", "chunks"
            );
            for (name, usage) in &stats.snapshots {
                print_usage(name, usage);
            }
            print_usage("(store: each chunk once)", &stats.total);
            let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
            println!(
                "dedup {:.2}x (data / unique), compression {:.2}x (unique / stored)",
                ratio(stats.total.data, stats.total.unique),
                ratio(stats.total.unique, stats.total.stored)
            );
            Ok(())
        }
        StoreCommand::Gc { store } => {
            let collected = maintain::gc(&Store::open(store)?)?;
            println!(
                "removed {} unreferenced chunks ({} bytes) and {} temp files",
                collected.chunks, collected.bytes, collected.temp_files
            );
            Ok(())
        }
        StoreCommand::Verify { store } => {
            let verified = maintain::verify(&Store::open(store)?)?;
            for problem in &verified.problems {
                eprintln!("{problem}");
            }
            println!(
                "{} manifests, {} chunks checked, {} problems",
                verified.manifests,
                verified.chunks,
                verified.problems.len()
            );
            if !verified.problems.is_empty() {
                bail!("store {} has {} problems", store.display(), verified.problems.len());
            }
            Ok(())
        }
    }
}

fn print_usage(name: &str, usage: &Usage) {
    println!(
        "{name:<24} {:>12} {:>12} {:>12} {:>12} {:>8}",
        usage.logical, usage.data, usage.unique, usage.stored, usage.chunks
    );
}

/// `FILE_OFFSET:SIZE:GUEST_ADDR`.
fn parse_region(s: &str) -> Result<Region, String> {
    let number = |v: &str| {
        let v = v.trim();
        let parsed = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        };
        parsed.map_err(|_| format!("`{v}` is not a number"))
    };
    let parts: Vec<&str> = s.split(':').collect();
    let [file_offset, size, guest_addr] = parts[..] else {
        return Err(format!("`{s}`: expected FILE_OFFSET:SIZE:GUEST_ADDR"));
    };
    Ok(Region { file_offset: number(file_offset)?, size: number(size)?, guest_addr: number(guest_addr)? })
}
