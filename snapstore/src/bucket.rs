//! A store in an S3 bucket: the same files as a store directory, under the same relative names
//! (`PREFIX/chunks/XX/ID`, `PREFIX/manifests/NAME`, …), read and written over plain S3 requests.
//!
//! Requests are presigned by `rusty-s3` (no I/O of its own) and sent by `ureq` (blocking,
//! keep-alive connection pools): the server's fault and prefetch threads are plain threads, and a
//! GET costs one signature and one request on a pooled connection. Each call here is one request;
//! [`retry`] repeats transient failures with backoff until a deadline.
//!
//! Endpoint, credentials and region come from the usual AWS variables and files (see
//! [`S3Config::from_env`]).

pub use crate::retry::{retry, RetryPolicy};
use std::borrow::Cow;
use std::io::Read;
use std::time::Duration;

/// How long a presigned URL stays valid: it is used at once.
const SIGNED_FOR: Duration = Duration::from_secs(300);
/// The largest object read: a chunk file (2 MiB of data at most, plus its header) or a manifest.
const MAX_OBJECT: u64 = 1 << 30;

/// Why a bucket request failed.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum BucketError {
    #[error("`{0}` is not an s3://BUCKET[/PREFIX] address")]
    BadAddress(String),
    #[error("S3 configuration: {0}")]
    Config(String),
    #[error("{method} s3://{bucket}/{key}: {reason}")]
    Transport { method: &'static str, bucket: String, key: String, reason: String },
    #[error("{method} s3://{bucket}/{key}: HTTP {status}{detail}")]
    Status { method: &'static str, bucket: String, key: String, status: u16, detail: String },
    #[error("s3://{bucket}/{key}: {reason}")]
    BadObject { bucket: String, key: String, reason: String },
}

impl BucketError {
    /// Whether trying again may succeed: the endpoint was unreachable, slow or overloaded.
    pub fn is_transient(&self) -> bool {
        match self {
            BucketError::Transport { .. } => true,
            BucketError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }
}

/// An `s3://BUCKET/PREFIX` address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Address {
    /// The bucket.
    pub bucket: String,
    /// Key prefix, without leading or trailing `/` (may be empty).
    pub prefix: String,
}

impl S3Address {
    /// Parses `s3://BUCKET[/PREFIX]`.
    pub fn parse(text: &str) -> Result<S3Address, BucketError> {
        let bad = || BucketError::BadAddress(text.into());
        let rest = text.strip_prefix("s3://").ok_or_else(bad)?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !valid_bucket || prefix.split('/').any(|part| part == "." || part == "..") {
            return Err(bad());
        }
        Ok(S3Address { bucket: bucket.into(), prefix: prefix.trim_matches('/').into() })
    }

    /// The key of `relative` (a store-relative path such as `chunks/ab/ab…`) under the prefix.
    pub fn key(&self, relative: &str) -> String {
        if self.prefix.is_empty() {
            relative.into()
        } else {
            format!("{}/{relative}", self.prefix)
        }
    }
}

impl std::fmt::Display for S3Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// Where S3 is and who we are to it.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`; else AWS's regional endpoint.
    pub endpoint: String,
    /// `AWS_REGION` or `AWS_DEFAULT_REGION`; else `us-east-1`.
    pub region: String,
    /// Path-style addressing (`ENDPOINT/BUCKET/KEY`): on for a configured endpoint (on-premise
    /// stores such as Ceph RGW or MinIO), off for AWS.
    pub path_style: bool,
    access_key: String,
    secret_key: String,
    session_token: Option<String>,
    /// Per request: connecting, and the whole request.
    pub connect_timeout: Duration,
    /// Per request, from the first byte sent to the last byte read.
    pub request_timeout: Duration,
}

impl S3Config {
    /// From the environment as the AWS tools read it: `AWS_ENDPOINT_URL(_S3)`, `AWS_REGION`
    /// (`AWS_DEFAULT_REGION`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`;
    /// without keys in the environment, the `AWS_PROFILE` (or `default`) section of the shared
    /// credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`).
    pub fn from_env() -> Result<S3Config, BucketError> {
        S3Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`S3Config::from_env`], with the variables looked up by `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<S3Config, BucketError> {
        let var = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let region = var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")).unwrap_or_else(|| "us-east-1".into());
        let configured = var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL"));
        let path_style = configured.is_some();
        let endpoint = configured.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let (access_key, secret_key, session_token) = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(key), Some(secret)) => (key, secret, var("AWS_SESSION_TOKEN")),
            _ => {
                let path = var("AWS_SHARED_CREDENTIALS_FILE")
                    .map(std::path::PathBuf::from)
                    .or_else(|| var("HOME").map(|home| std::path::Path::new(&home).join(".aws/credentials")));
                credentials_file(path, &var("AWS_PROFILE").unwrap_or_else(|| "default".into()))?
            }
        };
        Ok(S3Config {
            endpoint,
            region,
            path_style,
            access_key,
            secret_key,
            session_token,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
        })
    }
}

/// Keys from the shared credentials file's section `profile`.
fn credentials_file(
    path: Option<std::path::PathBuf>,
    profile: &str,
) -> Result<(String, String, Option<String>), BucketError> {
    let missing = || {
        BucketError::Config(
            "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give the profile a \
             section in the shared credentials file"
                .into(),
        )
    };
    let text = path.and_then(|path| std::fs::read_to_string(path).ok()).ok_or_else(missing)?;
    let (mut section, mut key, mut secret, mut token) = (String::new(), None, None, None);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().into();
        } else if let (true, Some((name, value))) = (section == profile, line.split_once('=')) {
            let value = Some(value.trim().to_string());
            match name.trim() {
                "aws_access_key_id" => key = value,
                "aws_secret_access_key" => secret = value,
                "aws_session_token" => token = value,
                _ => {}
            }
        }
    }
    Ok((key.ok_or_else(missing)?, secret.ok_or_else(missing)?, token))
}

/// Which connections a request uses: demand faults never wait for a connection behind
/// prefetch traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// A vCPU waits for it.
    Demand,
    /// Fetched ahead of need, or by a command.
    Background,
}

/// One bucket and prefix, with a connection pool per [`Lane`].
pub struct Bucket {
    address: S3Address,
    s3: rusty_s3::Bucket,
    credentials: rusty_s3::Credentials,
    demand: ureq::Agent,
    background: ureq::Agent,
}

impl Bucket {
    /// The bucket at `address`, reached as `config` says (no request is made yet).
    pub fn new(config: &S3Config, address: S3Address) -> Result<Bucket, BucketError> {
        let endpoint =
            config.endpoint.parse().map_err(|e| BucketError::Config(format!("endpoint `{}`: {e}", config.endpoint)))?;
        let style = if config.path_style { rusty_s3::UrlStyle::Path } else { rusty_s3::UrlStyle::VirtualHost };
        let s3 = rusty_s3::Bucket::new(endpoint, style, address.bucket.clone(), config.region.clone())
            .map_err(|e| BucketError::Config(format!("bucket `{}` at {}: {e}", address.bucket, config.endpoint)))?;
        let credentials = match &config.session_token {
            Some(token) => rusty_s3::Credentials::new_with_token(&config.access_key, &config.secret_key, token),
            None => rusty_s3::Credentials::new(&config.access_key, &config.secret_key),
        };
        let agent = || -> ureq::Agent {
            ureq::Agent::config_builder()
                .timeout_connect(Some(config.connect_timeout))
                .timeout_global(Some(config.request_timeout))
                .http_status_as_error(false)
                .max_idle_connections_per_host(64)
                .build()
                .into()
        };
        Ok(Bucket { address, s3, credentials, demand: agent(), background: agent() })
    }

    /// Where it is.
    pub fn address(&self) -> &S3Address {
        &self.address
    }

    fn agent(&self, lane: Lane) -> &ureq::Agent {
        match lane {
            Lane::Demand => &self.demand,
            Lane::Background => &self.background,
        }
    }

    fn transport(&self, method: &'static str, key: &str) -> impl FnOnce(ureq::Error) -> BucketError + '_ {
        let key = key.to_string();
        move |e| BucketError::Transport { method, bucket: self.address.bucket.clone(), key, reason: e.to_string() }
    }

    fn status(&self, method: &'static str, key: &str, response: &mut ureq::http::Response<ureq::Body>) -> BucketError {
        // S3 explains itself in a small XML body (<Code>…</Code>): keep its code.
        let body = response.body_mut().with_config().limit(4096).read_to_string().unwrap_or_default();
        let detail = body
            .split_once("<Code>")
            .and_then(|(_, rest)| rest.split_once("</Code>"))
            .map(|(code, _)| format!(" ({code})"))
            .unwrap_or_default();
        BucketError::Status {
            method,
            bucket: self.address.bucket.clone(),
            key: key.into(),
            status: response.status().as_u16(),
            detail,
        }
    }

    /// The object at `relative` under the prefix; None if there is none.
    pub fn get(&self, relative: &str, lane: Lane) -> Result<Option<Vec<u8>>, BucketError> {
        self.get_range(relative, None, lane)
    }

    /// Bytes `[start, end)` of the object at `relative` (fewer if it ends before), or all of it
    /// when `range` is None; None if there is no such object.
    pub fn get_range(
        &self,
        relative: &str,
        range: Option<(u64, u64)>,
        lane: Lane,
    ) -> Result<Option<Vec<u8>>, BucketError> {
        let key = self.address.key(relative);
        let url = rusty_s3::S3Action::sign(&self.s3.get_object(Some(&self.credentials), &key), SIGNED_FOR);
        let mut request = self.agent(lane).get(url.as_str());
        if let Some((start, end)) = range.filter(|(start, end)| end > start) {
            request = request.header("Range", format!("bytes={start}-{}", end - 1));
        }
        let mut response = request.call().map_err(self.transport("GET", &key))?;
        match response.status().as_u16() {
            200 | 206 => {}
            404 => return Ok(None),
            416 => return Ok(Some(Vec::new())), // the range starts past the end
            _ => return Err(self.status("GET", &key, &mut response)),
        }
        let mut bytes = Vec::new();
        response.body_mut().as_reader().take(MAX_OBJECT + 1).read_to_end(&mut bytes).map_err(|e| {
            BucketError::Transport {
                method: "GET",
                bucket: self.address.bucket.clone(),
                key: key.clone(),
                reason: e.to_string(),
            }
        })?;
        if bytes.len() as u64 > MAX_OBJECT {
            let reason = format!("larger than {MAX_OBJECT} bytes: not an object of a snapshot store");
            return Err(BucketError::BadObject { bucket: self.address.bucket.clone(), key, reason });
        }
        Ok(Some(bytes))
    }

    /// Whether an object is at `relative`.
    pub fn exists(&self, relative: &str) -> Result<bool, BucketError> {
        let key = self.address.key(relative);
        let url = rusty_s3::S3Action::sign(&self.s3.head_object(Some(&self.credentials), &key), SIGNED_FOR);
        let mut response = self.background.head(url.as_str()).call().map_err(self.transport("HEAD", &key))?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(self.status("HEAD", &key, &mut response)),
        }
    }

    /// Stores `bytes` at `relative` (S3 makes a PUT atomic: readers see the old object or the
    /// new one, whole).
    pub fn put(&self, relative: &str, bytes: &[u8]) -> Result<(), BucketError> {
        let key = self.address.key(relative);
        let url = rusty_s3::S3Action::sign(&self.s3.put_object(Some(&self.credentials), &key), SIGNED_FOR);
        let mut response = self.background.put(url.as_str()).send(bytes).map_err(self.transport("PUT", &key))?;
        match response.status().as_u16() {
            200 => Ok(()),
            _ => Err(self.status("PUT", &key, &mut response)),
        }
    }

    /// Deletes the object at `relative` (no error if there is none).
    pub fn delete(&self, relative: &str) -> Result<(), BucketError> {
        let key = self.address.key(relative);
        let url = rusty_s3::S3Action::sign(&self.s3.delete_object(Some(&self.credentials), &key), SIGNED_FOR);
        let mut response = self.background.delete(url.as_str()).call().map_err(self.transport("DELETE", &key))?;
        match response.status().as_u16() {
            200 | 204 | 404 => Ok(()),
            _ => Err(self.status("DELETE", &key, &mut response)),
        }
    }

    /// Every key under `relative` (a store-relative directory such as `manifests/`), relative
    /// to the prefix, with its size.
    pub fn list(&self, relative: &str) -> Result<Vec<(String, u64)>, BucketError> {
        let full = self.address.key(relative);
        let strip = if self.address.prefix.is_empty() { 0 } else { self.address.prefix.len() + 1 };
        let (mut keys, mut token) = (Vec::new(), None::<String>);
        loop {
            let mut action = self.s3.list_objects_v2(Some(&self.credentials));
            action.with_prefix(Cow::Borrowed(full.as_str()));
            if let Some(token) = &token {
                action.with_continuation_token(token.clone());
            }
            let url = rusty_s3::S3Action::sign(&action, SIGNED_FOR);
            let mut response = self.background.get(url.as_str()).call().map_err(self.transport("LIST", &full))?;
            if response.status().as_u16() != 200 {
                return Err(self.status("LIST", &full, &mut response));
            }
            let text = response
                .body_mut()
                .with_config()
                .limit(MAX_OBJECT)
                .read_to_string()
                .map_err(self.transport("LIST", &full))?;
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&text).map_err(|e| BucketError::BadObject {
                bucket: self.address.bucket.clone(),
                key: full.clone(),
                reason: format!("listing: {e}"),
            })?;
            keys.extend(
                page.contents.into_iter().filter_map(|c| Some((c.key.get(strip..)?.to_string(), c.size.unwrap_or(0)))),
            );
            match page.next_continuation_token {
                Some(next) => token = Some(next),
                None => return Ok(keys),
            }
        }
    }

    /// Creates the bucket unless it exists (tests and first pushes to a new store).
    pub fn create_if_missing(&self) -> Result<(), BucketError> {
        let action = self.s3.create_bucket(&self.credentials);
        let url = rusty_s3::S3Action::sign(&action, SIGNED_FOR);
        let body = action.body();
        let mut response =
            self.background.put(url.as_str()).send(body.as_bytes()).map_err(self.transport("PUT", ""))?;
        match response.status().as_u16() {
            200 => Ok(()),
            409 => Ok(()), // BucketAlreadyOwnedByYou
            _ => Err(self.status("CREATE BUCKET", "", &mut response)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_name_keys() {
        let address = S3Address::parse("s3://snapshots/fleet/a/").expect("valid");
        assert_eq!((address.bucket.as_str(), address.prefix.as_str()), ("snapshots", "fleet/a"));
        assert_eq!(address.key("manifests/x"), "fleet/a/manifests/x");
        assert_eq!(S3Address::parse("s3://snapshots").expect("valid").key("chunks/ab/c"), "chunks/ab/c");
        for bad in ["snapshots/x", "s3://", "s3://UPPER/x", "s3://ok-bucket/../x", "s3://a/x"] {
            assert!(S3Address::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn configuration_comes_from_the_variables_then_the_credentials_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("credentials");
        std::fs::write(&file, "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n[ci]\naws_access_key_id=C\naws_secret_access_key=CS\n")
            .expect("write");
        let vars = |pairs: &'static [(&'static str, &'static str)], file: std::path::PathBuf| {
            move |name: &str| match name {
                "AWS_SHARED_CREDENTIALS_FILE" => file.to_str().map(str::to_string),
                _ => pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()),
            }
        };
        let from_env = S3Config::from_lookup(vars(
            &[("AWS_ENDPOINT_URL", "http://127.0.0.1:9"), ("AWS_ACCESS_KEY_ID", "K"), ("AWS_SECRET_ACCESS_KEY", "S")],
            file.clone(),
        ))
        .expect("config");
        assert_eq!((from_env.access_key.as_str(), from_env.region.as_str()), ("K", "us-east-1"));
        assert!(from_env.path_style, "a configured endpoint is addressed path-style");
        let profiled = S3Config::from_lookup(vars(&[("AWS_PROFILE", "ci"), ("AWS_REGION", "eu-west-1")], file.clone()))
            .expect("config");
        assert_eq!((profiled.access_key.as_str(), profiled.secret_key.as_str()), ("C", "CS"));
        assert_eq!(profiled.endpoint, "https://s3.eu-west-1.amazonaws.com");
        assert!(!profiled.path_style);
        assert!(S3Config::from_lookup(vars(&[("AWS_PROFILE", "none")], file)).is_err(), "no keys: an error");
    }
}
