//! Every committed fuzz input, replayed through the checks the fuzz targets run
//! (`e2e::fuzz_checks`): the corpora (`fuzz/corpus/TARGET/`, minimised by `./x fuzz`) and the
//! inputs that once crashed a parser (`fuzz/regressions/TARGET/`, kept apart so that
//! minimising never drops them), in every CI run.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus: Vec<_> = std::fs::read_dir(fuzz.join("corpus").join(target))
        .expect("the committed corpus")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(corpus.len() >= 10, "{target}: only {} corpus inputs", corpus.len());
    let regressions = std::fs::read_dir(fuzz.join("regressions").join(target)).into_iter().flatten();
    for input in corpus.into_iter().chain(regressions.map(|e| e.expect("entry").path())) {
        check(&std::fs::read(&input).expect("read input"));
    }
}

#[test]
fn handshake_corpus() {
    replay("handshake", e2e::fuzz_checks::handshake);
}

#[test]
fn working_set_corpus() {
    replay("working_set", e2e::fuzz_checks::working_set);
}

#[test]
fn loading_set_corpus() {
    replay("loading_set", e2e::fuzz_checks::loading_set);
}

#[test]
fn manifest_corpus() {
    replay("manifest", e2e::fuzz_checks::manifest);
}

#[test]
fn chunk_corpus() {
    replay("chunk", e2e::fuzz_checks::chunk);
}

#[test]
fn pack_corpus() {
    replay("pack", e2e::fuzz_checks::pack);
}
