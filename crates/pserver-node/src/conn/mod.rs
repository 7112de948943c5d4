//! Connections: an [`Outbox`] that writes at once when idle and otherwise
//! feeds a writer task, and a requester ([`Peer`]) that matches replies to
//! requests by id; [`accept_loop`] serves them.
//!
//! Generic over the byte stream so that simulations can run the same code on
//! simulated sockets.

use crate::error::NodeError;
use crate::net::{BoxStream, Listener, Net};
use futures_util::{SinkExt, StreamExt};
use pserver_wire::codec::CodecError;
use pserver_wire::{Control, ErrorCode, Frame, FrameCodec, Header, Kind, Limits};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

mod accept;
mod outbox;
mod peer;
mod writer;

pub use accept::{FIRST_FRAME_TIMEOUT, PRESSED_FIRST_FRAME_TIMEOUT, accept_loop};
#[cfg(test)]
use outbox::CORKED_MAX;
pub use outbox::{Cork, OUTBOX_BYTES, Outbox, Reader, split};
#[cfg(test)]
use outbox::{Line, LineState, Sending};
pub use peer::Peer;
#[cfg(test)]
use writer::Writer;

/// Locks a mutex, recovering the data if a panicking thread poisoned it:
/// the maps guarded here stay consistent between statements.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Listens on `addr` over `net`; the error names the address.
pub async fn bind(
    net: &Net,
    addr: &str,
) -> Result<(Box<dyn Listener>, std::net::SocketAddr), NodeError> {
    net.bind(addr).await.map_err(|os| NodeError::Bind {
        addr: addr.to_string(),
        os,
    })
}

#[cfg(test)]
mod tests;
