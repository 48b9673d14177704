//! A tiny HTTP/1.1 responder on tokio, for scrape and health endpoints: `GET` only, one
//! request per connection, every read and write bounded in time, at most 64 connections at
//! once. It listens only on the address it is given.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::ExportError;

/// Bound on reading a request and on writing its response.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head read.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;

/// A response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Response {
    /// 200 with a body of `content_type`.
    pub fn ok(content_type: &'static str, body: String) -> Self {
        Self {
            status: 200,
            content_type,
            body,
        }
    }

    /// A plain text response with `status`.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// A running responder; dropping it stops it.
#[derive(Debug)]
pub struct HttpServer {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// The address it listens on (the port chosen when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on `addr` and answers each `GET` with `handler(path)`.
pub async fn serve<F>(addr: SocketAddr, handler: F) -> Result<HttpServer, ExportError>
where
    F: Fn(&str) -> Response + Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ExportError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ExportError::Bind { addr, source })?;
    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                return;
            };
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                if let Err(e) = answer(stream, handler.as_ref()).await {
                    tracing::debug!(error = %e, "http request failed");
                }
                drop(permit);
            });
        }
    });
    Ok(HttpServer { local_addr, task })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

async fn answer<F>(mut stream: TcpStream, handler: &F) -> std::io::Result<()>
where
    F: Fn(&str) -> Response,
{
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(IO_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() >= MAX_REQUEST_BYTES {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    let response = match head {
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request read timed out",
            ));
        }
        Ok(Err(e)) => return Err(e),
        Ok(Ok(())) => {
            let text = String::from_utf8_lossy(&buf);
            let mut parts = text.lines().next().unwrap_or_default().split_whitespace();
            match (parts.next(), parts.next()) {
                (Some("GET"), Some(target)) => {
                    let path = target.split('?').next().unwrap_or(target);
                    handler(path)
                }
                (Some(_), Some(_)) => Response::text(405, "only GET\n"),
                _ => Response::text(400, "bad request\n"),
            }
        }
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(response.body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "response write timed out"))?
}

/// `GET http://addr/path` with a 5 s bound on the whole exchange: (status, body). For tests
/// and probes of these endpoints.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    tokio::time::timeout(IO_TIMEOUT, async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, body.to_owned()))
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "GET timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_get_and_refuses_the_rest() {
        let server = serve("127.0.0.1:0".parse().unwrap(), |path| match path {
            "/x" => Response::ok("text/plain", "hello".to_owned()),
            _ => Response::text(404, "no"),
        })
        .await
        .unwrap();
        let addr = server.local_addr();
        assert_eq!(
            get(addr, "/x?a=1").await.unwrap(),
            (200, "hello".to_owned())
        );
        assert_eq!(get(addr, "/y").await.unwrap().0, 404);
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /x HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    }
}
