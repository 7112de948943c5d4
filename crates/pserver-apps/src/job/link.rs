//! The scheduler's link to one worker process: length-prefixed postcard
//! messages over a stream of the cluster's transport (so the cluster
//! secret and TLS guard it like every other connection).

use futures_util::{SinkExt, StreamExt};
use pserver_node::net::{BoxStream, Net};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::marker::PhantomData;
use tokio::io::{ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// Largest message either side accepts: messages carry settings, file
/// lists and per-step figures, never data.
pub const MAX_MESSAGE: usize = 16 << 20;

/// Why a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Dialing, reading or writing failed.
    #[error("link to {peer}: {os}")]
    Io {
        /// The other end.
        peer: String,
        /// What failed.
        os: std::io::Error,
    },
    /// A message could not be decoded.
    #[error("link to {peer}: bad message: {why}")]
    Bad {
        /// The other end.
        peer: String,
        /// What failed.
        why: String,
    },
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_MESSAGE)
        .new_codec()
}

/// The sending half: messages of type `S`.
pub struct Sender<S> {
    peer: String,
    out: FramedWrite<WriteHalf<BoxStream>, LengthDelimitedCodec>,
    _s: PhantomData<fn(S)>,
}

/// The receiving half: messages of type `R`.
pub struct Receiver<R> {
    peer: String,
    inp: FramedRead<ReadHalf<BoxStream>, LengthDelimitedCodec>,
    _r: PhantomData<fn() -> R>,
}

/// Splits a connected stream into a typed sender and receiver.
pub fn split<S: Serialize, R: DeserializeOwned>(
    stream: BoxStream,
    peer: &str,
) -> (Sender<S>, Receiver<R>) {
    let (r, w) = tokio::io::split(stream);
    (
        Sender {
            peer: peer.to_string(),
            out: FramedWrite::new(w, codec()),
            _s: PhantomData,
        },
        Receiver {
            peer: peer.to_string(),
            inp: FramedRead::new(r, codec()),
            _r: PhantomData,
        },
    )
}

/// Dials `addr` over `net` and splits the stream.
pub async fn dial<S: Serialize, R: DeserializeOwned>(
    net: &Net,
    addr: &str,
) -> Result<(Sender<S>, Receiver<R>), LinkError> {
    let stream = net.connect(addr).await.map_err(|source| LinkError::Io {
        peer: addr.to_string(),
        os: source,
    })?;
    Ok(split(stream, addr))
}

impl<S: Serialize> Sender<S> {
    /// Sends one message.
    pub async fn send(&mut self, msg: &S) -> Result<(), LinkError> {
        let bytes = postcard::to_allocvec(msg).map_err(|e| LinkError::Bad {
            peer: self.peer.clone(),
            why: e.to_string(),
        })?;
        self.out
            .send(bytes::Bytes::from(bytes))
            .await
            .map_err(|source| LinkError::Io {
                peer: self.peer.clone(),
                os: source,
            })
    }
}

impl<R: DeserializeOwned> Receiver<R> {
    /// The next message; `None` once the other end closed the link.
    pub async fn recv(&mut self) -> Option<Result<R, LinkError>> {
        let frame = match self.inp.next().await? {
            Ok(f) => f,
            Err(source) => {
                return Some(Err(LinkError::Io {
                    peer: self.peer.clone(),
                    os: source,
                }));
            }
        };
        Some(postcard::from_bytes(&frame).map_err(|e| LinkError::Bad {
            peer: self.peer.clone(),
            why: e.to_string(),
        }))
    }
}
