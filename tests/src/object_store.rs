//! A real S3 object store for the tests: Ceph's RADOS Gateway on loopback (`scripts/rgw`).
//!
//! `./x test` starts one for the whole run and exports its `AWS_*` variables; tests use it
//! through [`require_s3`], each in buckets of its own. A test that stops the gateway starts a
//! cluster of its own ([`OwnRgw`]) so that no other test sees the outage.

use snapstore::bucket::{Bucket, S3Address, S3Config};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Fails loudly when no object store is configured or it does not answer (no silent skips).
pub fn require_s3() -> S3Config {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
    assert!(
        !endpoint.is_empty(),
        "these tests need an S3 object store: run them through `./x test` (it starts Ceph RGW), or \
         `scripts/rgw start DIR && source DIR/env` first"
    );
    let config = S3Config::from_env().unwrap_or_else(|e| panic!("S3 configuration: {e}"));
    let answer = Command::new("curl").args(["-sf", "-o", "/dev/null", &endpoint]).status();
    assert!(answer.is_ok_and(|s| s.success()), "the object store at {endpoint} does not answer");
    config
}

/// A bucket of its own for `test` (created), at `s3://BUCKET/fleet`.
pub fn test_bucket(config: &S3Config, test: &str) -> Bucket {
    let name = format!("t-{}-{test}", std::process::id());
    let bucket = Bucket::new(config, S3Address { bucket: name, prefix: "fleet".into() }).expect("bucket");
    bucket.create_if_missing().unwrap_or_else(|e| panic!("create bucket: {e}"));
    bucket
}

fn rgw_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rgw")
}

/// A Ceph cluster of this test's own, stopped when dropped.
pub struct OwnRgw {
    dir: tempfile::TempDir,
    /// Its `AWS_*` variables, for the servers and commands of the test.
    pub env: Vec<(String, String)>,
}

impl OwnRgw {
    /// Starts one (~2 s).
    pub fn start() -> OwnRgw {
        let dir = tempfile::tempdir().expect("temp dir");
        let out =
            Command::new(rgw_script()).arg("start").arg(dir.path().join("rgw")).output().expect("run scripts/rgw");
        assert!(out.status.success(), "scripts/rgw start failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OwnRgw { dir, env }
    }

    /// Its configuration, as a server started with [`OwnRgw::env`] reads it.
    pub fn config(&self) -> S3Config {
        let lookup = |name: &str| self.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        S3Config::from_lookup(lookup).expect("S3 configuration")
    }

    fn script(&self, verb: &str) {
        let out =
            Command::new(rgw_script()).arg(verb).arg(self.dir.path().join("rgw")).output().expect("run scripts/rgw");
        assert!(out.status.success(), "scripts/rgw {verb} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Stops its gateway (the objects stay in the OSD).
    pub fn stop_gateway(&self) {
        self.script("stop-gateway");
    }

    /// Starts its gateway again.
    pub fn start_gateway(&self) {
        self.script("start-gateway");
    }

    /// The variables as `(&str, &str)` pairs for [`crate::server_process::ServerProcess::start_with_env`].
    pub fn env_pairs(&self) -> Vec<(&str, &str)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }
}

impl Drop for OwnRgw {
    fn drop(&mut self) {
        let _ = Command::new(rgw_script()).arg("stop").arg(self.dir.path().join("rgw")).output();
    }
}
