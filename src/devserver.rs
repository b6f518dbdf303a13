//! A local S3-compatible server (s3s-fs: objects are plain files under a directory) for the
//! `demo` command, the tests and the benchmarks. It checks request signatures, so a client
//! with wrong credentials is refused as a real store would refuse it. Loopback only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Credentials of the local server.
pub const ACCESS_KEY: &str = "record-offload-dev";
pub const SECRET_KEY: &str = "record-offload-dev-secret";

/// A running server; stops when dropped.
pub struct DevServer {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    stop: CancellationToken,
}

impl DevServer {
    /// Serves `data_dir` (each sub-directory is a bucket) on `bind` (use port 0 for any).
    pub async fn start(data_dir: &Path, bind: SocketAddr) -> std::io::Result<DevServer> {
        if !bind.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the development server listens on loopback addresses only",
            ));
        }
        std::fs::create_dir_all(data_dir)?;
        let fs = s3s_fs::FileSystem::new(data_dir)
            .map_err(|e| std::io::Error::other(format!("s3s-fs: {e:?}")))?;
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let socket = tokio::select! {
                    _ = token.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(_) => continue,
                    },
                };
                let _ = socket.set_nodelay(true);
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = conn => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Ok(DevServer {
            addr,
            data_dir: data_dir.to_path_buf(),
            stop,
        })
    }

    /// Creates a bucket (a directory).
    pub fn create_bucket(&self, name: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(self.data_dir.join(name))
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where the server keeps an object's bytes.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.data_dir.join(bucket).join(key)
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
