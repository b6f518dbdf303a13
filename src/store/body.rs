//! Request bodies: a range of an open file read while it is sent, bytes in memory, or a body
//! streamed from elsewhere (copy-back relays another store's GET).

use std::fs::File;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use tokio::task::JoinHandle;

/// What a request that carries data sends.
#[derive(Debug)]
pub enum Body {
    /// A range of an open file, read while it is sent.
    File(FileRange),
    /// Bytes already in memory (small objects, read once for hashing and sending).
    Bytes(Bytes),
    /// A body of exactly `len` bytes produced while it is sent (copy-back: another store's
    /// GET, relayed); it cannot be sent twice.
    Stream { body: SdkBody, len: u64 },
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::File(r) => r.len,
            Body::Bytes(b) => b.len() as u64,
            Body::Stream { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn into_stream(self) -> ByteStream {
        match self {
            Body::File(r) => file_body(r),
            Body::Bytes(b) => ByteStream::from(b),
            Body::Stream { body, .. } => ByteStream::new(body),
        }
    }
}

/// A byte range of an open file, sent as a request body.
#[derive(Debug, Clone)]
pub struct FileRange {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u64,
    /// The shared bandwidth limit, if any: each chunk waits for its tokens.
    pub limit: Option<Arc<crate::util::throttle::Bandwidth>>,
}

pub(super) fn file_body(range: FileRange) -> ByteStream {
    ByteStream::new(SdkBody::from_body_1_x(FileRangeBody::new(range)))
}

/// Chunk size of bodies read from files.
const CHUNK: usize = 512 * 1024;

/// An HTTP body that reads a file range with positional reads on the blocking pool, one chunk
/// at a time: memory per request is one chunk, whatever the part size. A file that became
/// shorter than the range ends the body with an error (the file changed).
struct FileRangeBody {
    file: Arc<File>,
    pos: u64,
    end: u64,
    limit: Option<Arc<crate::util::throttle::Bandwidth>>,
    reading: Option<JoinHandle<std::io::Result<Vec<u8>>>>,
}

impl FileRangeBody {
    fn new(r: FileRange) -> Self {
        FileRangeBody {
            file: r.file,
            pos: r.offset,
            end: r.offset + r.len,
            limit: r.limit,
            reading: None,
        }
    }
}

impl http_body::Body for FileRangeBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if this.pos >= this.end {
            return Poll::Ready(None);
        }
        if this.reading.is_none() {
            let file = this.file.clone();
            let limit = this.limit.clone();
            let pos = this.pos;
            let n = (this.end - this.pos).min(CHUNK as u64) as usize;
            this.reading = Some(tokio::task::spawn_blocking(move || {
                if let Some(limit) = limit {
                    limit.wait_blocking(n as u64);
                }
                // Read into fresh, uninitialised capacity: no memset for bytes about to be
                // overwritten.
                let mut buf: Vec<u8> = Vec::with_capacity(n);
                while buf.len() < n {
                    let at = pos + buf.len() as u64;
                    let got =
                        rustix::io::pread(&*file, rustix::buffer::spare_capacity(&mut buf), at)
                            .map_err(std::io::Error::from)?;
                    if got == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "file became shorter while it was being sent",
                        ));
                    }
                }
                buf.truncate(n);
                Ok(buf)
            }));
        }
        let Some(handle) = this.reading.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(handle).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(res) => {
                this.reading = None;
                match res {
                    Ok(Ok(buf)) => {
                        this.pos += buf.len() as u64;
                        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(buf)))))
                    }
                    Ok(Err(e)) => {
                        this.pos = this.end;
                        Poll::Ready(Some(Err(e)))
                    }
                    Err(e) => {
                        this.pos = this.end;
                        Poll::Ready(Some(Err(std::io::Error::other(e.to_string()))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.end.saturating_sub(self.pos))
    }
}
