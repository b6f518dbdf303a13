//! The look-up server's sockets: every `lookup.listen` address bound before serving starts
//! (so the daemon learns the real ports of `:0` and a bad address fails the start), `unix:`
//! sockets with mode 0660, a stale socket file replaced and a live one refused, and the
//! socket file removed when the server stops.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;

use tokio::net::{TcpListener, UnixListener};

use crate::config::ListenAddr;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("lookup.listen {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("lookup.listen unix:{0}: another process is serving this socket")]
    InUse(PathBuf),
    #[error("cannot start the look-up server: {0}")]
    Thread(#[source] io::Error),
}

pub(super) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// Listeners bound and not yet serving (binding first lets the daemon learn the real ports,
/// e.g. of `127.0.0.1:0`, before it builds the resolver).
pub struct Bound {
    pub(super) listeners: Vec<Listener>,
    pub(super) addrs: Vec<ListenAddr>,
}

impl Bound {
    /// The addresses actually bound, in `lookup.listen` order.
    pub fn addrs(&self) -> &[ListenAddr] {
        &self.addrs
    }
}

/// Binds every address.
pub async fn bind(listen: &[ListenAddr]) -> Result<Bound, ServerError> {
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for l in listen {
        match l {
            ListenAddr::Tcp(a) => {
                let listener = TcpListener::bind(a)
                    .await
                    .map_err(|source| ServerError::Bind {
                        addr: a.to_string(),
                        source,
                    })?;
                let local = listener.local_addr().map_err(|source| ServerError::Bind {
                    addr: a.to_string(),
                    source,
                })?;
                addrs.push(ListenAddr::Tcp(local));
                listeners.push(Listener::Tcp(listener));
            }
            ListenAddr::Unix(path) => {
                let listener = bind_unix(path).await?;
                addrs.push(ListenAddr::Unix(path.clone()));
                listeners.push(Listener::Unix(listener, path.clone()));
            }
        }
    }
    Ok(Bound { listeners, addrs })
}

async fn bind_unix(path: &PathBuf) -> Result<UnixListener, ServerError> {
    let err = |source| ServerError::Bind {
        addr: format!("unix:{}", path.display()),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::InUse(path.clone()));
        }
        // Stale: left by a process that is gone.
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

pub(super) enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// Removes the socket file if it is still the one this listener created.
pub(super) fn remove_own_socket(listener: &UnixListener, path: &PathBuf) {
    let ours = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
        .is_some_and(|p| p == *path);
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
        && ours
        && meta.nlink() >= 1
    {
        let _ = std::fs::remove_file(path);
    }
}

pub(super) enum Conn {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

pub(super) async fn accept(listener: &Listener) -> io::Result<Conn> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Conn::Tcp(s, a)),
        Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
    }
}
