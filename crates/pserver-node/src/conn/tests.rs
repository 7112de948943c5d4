use super::*;
use std::time::Duration;

fn big_frame() -> Frame {
    let mut f = Frame::new(Header::new(Kind::Reply));
    f.vals = vec![1.0; OUTBOX_BYTES / 4 / 4].into();
    f
}

/// Limits with frames of at most `bytes`.
fn small(bytes: usize) -> Limits {
    Limits {
        max_frame: bytes,
        ..Limits::default()
    }
}

/// A request of `n` values.
fn request(n: usize) -> Frame {
    let mut f = Frame::new(Header::new(Kind::Push));
    f.vals = vec![1.0; n].into();
    f
}

/// Answers every frame on `stream` with a reply of `reply_vals(request)`
/// values, under `limits`.
fn answer<S>(stream: S, limits: Limits, reply_vals: fn(&Frame) -> usize)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, out) = split(stream, limits);
    tokio::spawn(async move {
        while let Some(Ok(f)) = reader.next().await {
            let mut r = Frame::new(Header {
                request_id: f.header.request_id,
                ..Header::new(Kind::Reply)
            });
            r.vals = vec![2.0; reply_vals(&f)].into();
            let _ = out.send(r).await;
        }
    });
}

#[tokio::test]
async fn a_frame_over_the_limit_is_refused_and_the_connection_goes_on() {
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    answer(theirs, Limits::default(), |_| 1);
    let (peer, _notices) = Peer::from_stream(ours, "them", small(1000));
    let e = tokio::time::timeout(Duration::from_secs(5), peer.request(request(1000)))
        .await
        .expect("refused at once, not left waiting")
        .unwrap_err();
    assert!(matches!(e, NodeError::Unsendable { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("them") && msg.contains("1000") && msg.contains("split"),
        "{msg}"
    );
    // Frames after it still go and are answered.
    let reply = tokio::time::timeout(Duration::from_secs(5), peer.request(request(10)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.vals, [2.0]);
}

#[tokio::test]
async fn a_reply_over_the_limit_fails_its_request_only() {
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    // The other side takes big frames; it answers a request of one
    // value with 5000, too many for this side's 4000-byte frames.
    answer(theirs, Limits::default(), |f| {
        if f.vals.len() == 1 { 5000 } else { 1 }
    });
    let (peer, _notices) = Peer::from_stream(ours, "them", small(4000));
    let reply = tokio::time::timeout(Duration::from_secs(5), peer.request(request(1)))
        .await
        .expect("the oversized reply ends the wait")
        .unwrap();
    let e = crate::proto::reply_control(&reply, "them").unwrap_err();
    assert!(
        matches!(
            &e,
            NodeError::Remote {
                code: ErrorCode::Limit,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("4000"), "{e}");
    // The connection is still in step: the next reply is read.
    let reply = tokio::time::timeout(Duration::from_secs(5), peer.request(request(2)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.vals, [2.0]);
    assert!(!peer.is_closed());
}

/// A stream whose reads never complete and whose writes fail: the
/// peer's socket broke in a way only writing notices.
struct BrokenWrites;

impl AsyncRead for BrokenWrites {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Pending
    }
}

impl AsyncWrite for BrokenWrites {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_failed_writer_fails_the_requests_waiting() {
    let (peer, _notices) = Peer::from_stream(BrokenWrites, "them", Limits::default());
    let e = tokio::time::timeout(Duration::from_secs(5), peer.request(request(1)))
        .await
        .expect("not left waiting for a reply to a frame that never left")
        .unwrap_err();
    assert!(matches!(e, NodeError::Closed(_)), "{e}");
    assert!(peer.is_closed());
}

#[tokio::test]
async fn a_peer_that_never_reads_holds_a_bounded_queue() {
    // The other end never reads: the writer blocks on its first frame.
    let (ours, _theirs) = tokio::io::duplex(1024);
    let (_reader, out) = split(ours, Limits::default());
    // Three quarter-budget frames fit (one being written, two queued)...
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(5), out.send(big_frame()))
            .await
            .expect("within the byte budget")
            .unwrap();
    }
    // ...a fourth would pass the budget: it waits, and cannot be forced in.
    assert!(!out.try_send(big_frame()));
    let waited = tokio::time::timeout(Duration::from_millis(300), out.send(big_frame())).await;
    assert!(waited.is_err(), "queued past the byte budget");
    // Small frames are bounded by count as before, and still go.
    assert!(out.try_send(Frame::new(Header::new(Kind::Reply))));
}

/// A listener whose accept fails with `error` every time, counting its
/// calls; `dropped` fires when the accept loop lets it go.
struct Failing {
    error: fn() -> std::io::Error,
    calls: Arc<std::sync::atomic::AtomicUsize>,
    _dropped: tokio::sync::oneshot::Sender<()>,
}

impl crate::net::Listener for Failing {
    fn accept(&mut self) -> crate::net::IoFuture<'_, (BoxStream, String)> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let e = (self.error)();
        Box::pin(async move { Err(e) })
    }
}

fn failing(
    error: fn() -> std::io::Error,
) -> (
    Failing,
    Arc<std::sync::atomic::AtomicUsize>,
    oneshot::Receiver<()>,
) {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (tx, rx) = oneshot::channel();
    let l = Failing {
        error,
        calls: Arc::clone(&calls),
        _dropped: tx,
    };
    (l, calls, rx)
}

#[tokio::test]
async fn a_stopped_listener_ends_the_accept_loop_quietly() {
    // Issue #16 (9): a one-line error of the CLI was followed by two
    // "accept failed ... the listener stopped" warnings, as the accept
    // loops of a node whose runtime was stopping kept asking a
    // handshaking listener whose task had ended.
    let serve = |_s: BoxStream, _p: String| async {};
    let (l, calls, gone) = failing(crate::net::ListenerStopped::error);
    accept_loop(
        Box::new(l),
        CancellationToken::new(),
        Limits::default(),
        serve,
    );
    tokio::time::timeout(Duration::from_secs(2), gone)
        .await
        .expect("the accept loop went on asking a stopped listener")
        .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Through a handshaking listener (the secret's, TLS) as well.
    let (inner, calls, _gone) = failing(crate::net::ListenerStopped::error);
    let mut outer = crate::net::handshaking(Box::new(inner), "test", Duration::from_secs(1), |s| {
        Box::pin(async move { Ok(s) })
    });
    let e = tokio::time::timeout(Duration::from_secs(2), outer.accept())
        .await
        .unwrap()
        .map(|_| ())
        .unwrap_err();
    assert!(crate::net::stopped(&e), "{e}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Any other failure is retried: the listener is still there.
    let (l, calls, mut gone) = failing(|| std::io::Error::other("out of descriptors"));
    let cancel = CancellationToken::new();
    accept_loop(Box::new(l), cancel.clone(), Limits::default(), serve);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(calls.load(Ordering::SeqCst) > 1);
    assert!(
        matches!(gone.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
        "a passing failure ended the loop"
    );
    cancel.cancel();
}

/// Frames with large values sections (written apart, from where they are)
/// and small ones, interleaved on one TCP connection, arrive whole and in
/// order, values bit for bit: the vectored writes keep the stream in step.
#[tokio::test]
async fn large_and_small_frames_interleave_over_tcp() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Echoes each request's values back in its reply.
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut reader, out) = split(stream, Limits::default());
        while let Some(Ok(f)) = reader.next().await {
            let mut r = Frame::new(Header {
                request_id: f.header.request_id,
                ..Header::new(Kind::Reply)
            });
            r.vals = f.vals;
            r.ctrl = f.ctrl;
            if out.send(r).await.is_err() {
                break;
            }
        }
    });
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (peer, _notices) = Peer::from_stream(stream, "echo", Limits::default());
    // One shared array cut into frames, as a worker cuts a dense push.
    let all: Vec<f32> = (0..1_000_000u32)
        .map(|i| f32::from_bits(i.wrapping_mul(2654435761)))
        .collect();
    let shared = pserver_wire::Vals::from(all.clone()).into_shared();
    let mut waits = Vec::new();
    let mut expect = Vec::new();
    for i in 0..40usize {
        let mut f = Frame::new(Header::new(Kind::Push));
        let range = if i % 3 == 0 {
            i..i + 7
        } else {
            i * 20_000..i * 20_000 + 17_000 + i
        };
        f.vals = shared.slice(range.clone());
        // An odd-sized control section after the values shifts every later
        // frame's alignment.
        f.ctrl = bytes::Bytes::from(vec![i as u8; i % 5]);
        expect.push((range, f.ctrl.clone()));
        waits.push(peer.send_request(f).await.unwrap());
    }
    for (wait, (range, ctrl)) in waits.into_iter().zip(expect) {
        let reply = tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("answered")
            .unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&reply.vals), bits(&all[range]));
        assert_eq!(reply.ctrl, ctrl);
    }
}

/// Frames of one sender arrive in the order sent, whether each was written
/// at once by the sender (the line idle) or queued behind a write the
/// stream had not taken whole (a small pipe, frames larger than it). On
/// two threads, so the writer task hands the writer back while the sender
/// runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_arrive_in_order_whether_written_at_once_or_queued() {
    let (ours, theirs) = tokio::io::duplex(4096);
    let (_reader, out) = split(ours, Limits::default());
    let (mut their_reader, _their_out) = split(theirs, Limits::default());
    let n = 3000u64;
    let sending = tokio::spawn(async move {
        for id in 1..=n {
            let mut f = request(if id % 3 == 0 { 3000 } else { 1 });
            f.header.request_id = id;
            out.send(f).await.unwrap();
            if id % 500 == 0 {
                // Let the line go idle now and then, so later frames take
                // the direct path again.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        out
    });
    let mut seen = Vec::new();
    while seen.len() < n as usize {
        let f = tokio::time::timeout(Duration::from_secs(10), their_reader.next())
            .await
            .expect("every frame arrives")
            .unwrap()
            .unwrap();
        let want = if f.header.request_id % 3 == 0 {
            3000
        } else {
            1
        };
        assert_eq!(f.vals.len(), want, "frame {} whole", f.header.request_id);
        seen.push(f.header.request_id);
    }
    assert_eq!(seen, (1..=n).collect::<Vec<_>>());
    // Once every sender is gone, the writer closes the stream: the peer
    // sees it end.
    drop(sending.await.unwrap());
    let end = tokio::time::timeout(Duration::from_secs(5), their_reader.next())
        .await
        .expect("the stream ends");
    assert!(end.is_none(), "nothing after the last frame");
}

/// `shutdown` closes the connection even while a frame is half written
/// (the peer not reading): the writer task ends and the reader side hears.
#[tokio::test]
async fn shutdown_ends_a_line_blocked_mid_frame() {
    let (ours, _theirs) = tokio::io::duplex(1024);
    let (_reader, out) = split(ours, Limits::default());
    out.send(request(10_000)).await.unwrap();
    out.send(request(10)).await.unwrap();
    out.shutdown();
    tokio::time::timeout(Duration::from_secs(5), out.writer_gone())
        .await
        .expect("the writer task ends");
    assert!(matches!(
        out.send(request(1)).await,
        Err(NodeError::Closed(_))
    ));
}

/// A line with no writer task, writing into a vector: what a sender's
/// direct write puts on the wire can be read back from it.
fn idle_line() -> Line<Vec<u8>> {
    Line {
        state: Mutex::new(LineState {
            queue: std::collections::VecDeque::new(),
            writer: Some(Writer::new(Vec::new(), Limits::default())),
            done: false,
            failed: false,
            corks: 0,
        }),
        wake: tokio::sync::Notify::new(),
    }
}

/// The direct path never passes the queue: with a frame queued for the
/// writer task (which has not run yet), the next frame queues behind it
/// instead of going out at once, though the writer is free.
#[tokio::test]
async fn a_sender_does_not_pass_frames_queued_before_it() {
    let line = idle_line();
    let budget = Arc::new(tokio::sync::Semaphore::new(OUTBOX_BYTES));
    let permit = || Arc::clone(&budget).try_acquire_owned().unwrap();
    let written = |line: &Line<Vec<u8>>| line.state().writer.as_ref().unwrap().inner.len();
    // The line is idle: the frame goes out at once, from the caller.
    assert!(line.put(request(1), permit()));
    let first = written(&line);
    assert!(first > 0);
    assert!(line.state().queue.is_empty());
    line.state().queue.push_back((request(2), permit()));
    assert!(line.put(request(3), permit()));
    assert_eq!(written(&line), first, "a frame passed the queue");
    let queued: Vec<usize> = line
        .state()
        .queue
        .iter()
        .map(|(f, _)| f.vals.len())
        .collect();
    assert_eq!(queued, [2, 3]);
}

/// Frames sent while a cork is held wait; when the last cork goes they
/// are written together, in order, from the caller (the line was idle).
#[tokio::test]
async fn corked_frames_wait_and_go_out_together() {
    let line = idle_line();
    let budget = Arc::new(tokio::sync::Semaphore::new(OUTBOX_BYTES));
    let permit = || Arc::clone(&budget).try_acquire_owned().unwrap();
    let written = |line: &Line<Vec<u8>>| line.state().writer.as_ref().unwrap().inner.clone();
    line.cork();
    line.cork();
    for n in [1, 2, 3] {
        assert!(line.put(request(n), permit()));
    }
    line.uncork();
    assert!(written(&line).is_empty(), "written while a cork is held");
    assert_eq!(line.state().queue.len(), 3);
    line.uncork();
    assert!(line.state().queue.is_empty());
    // The bytes are the three frames, in the order sent.
    let mut bytes = bytes::BytesMut::from(&written(&line)[..]);
    let mut codec = FrameCodec::new(Limits::default());
    let mut got = Vec::new();
    while let Some(f) = tokio_util::codec::Decoder::decode(&mut codec, &mut bytes).unwrap() {
        got.push(f.vals.len());
    }
    assert_eq!(got, [1, 2, 3]);
}

/// A cork holds back at most `CORKED_MAX` frames: the one that fills it
/// wakes the writer task, which writes them all (the cork still held).
#[tokio::test]
async fn a_cork_holds_back_a_bounded_run() {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (_reader, out) = split(ours, Limits::default());
    let (mut their_reader, _their_out) = split(theirs, Limits::default());
    let _cork = out.cork();
    for id in 1..=CORKED_MAX as u64 - 1 {
        let mut f = request(1);
        f.header.request_id = id;
        out.send(f).await.unwrap();
    }
    let early = tokio::time::timeout(Duration::from_millis(50), their_reader.next()).await;
    assert!(
        early.is_err(),
        "a frame left while the cork held fewer than its bound"
    );
    out.send(request(1)).await.unwrap();
    for id in 1..=CORKED_MAX as u64 {
        let f = tokio::time::timeout(Duration::from_secs(5), their_reader.next())
            .await
            .expect("the full cork's frames are written")
            .unwrap()
            .unwrap();
        assert_eq!(
            f.header.request_id,
            if id < CORKED_MAX as u64 { id } else { 0 }
        );
    }
}

/// A sender that must wait for room while a cork holds the frames that
/// take it does not wait forever: the frames go, and so does its own.
#[tokio::test]
async fn a_sender_waiting_for_room_is_not_stuck_behind_a_cork() {
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let (_reader, out) = split(ours, Limits::default());
    let (mut their_reader, _their_out) = split(theirs, Limits::default());
    let reading = tokio::spawn(async move {
        let mut n = 0;
        while let Some(Ok(_)) = their_reader.next().await {
            n += 1;
            if n == 3 {
                break;
            }
        }
        n
    });
    let _cork = out.cork();
    // Two frames of half the budget each take all of it; the third waits
    // for one of them to be written.
    let half = OUTBOX_BYTES / 2 / 4 - 64;
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), out.send(request(half)))
            .await
            .expect("room is made though a cork is held")
            .unwrap();
    }
    drop(_cork);
    let n = tokio::time::timeout(Duration::from_secs(10), reading)
        .await
        .expect("all three arrive")
        .unwrap();
    assert_eq!(n, 3);
}
