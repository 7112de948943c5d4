//! How a request travels: sliced by partition, each slice sent to its
//! primary and retried on its own (redirects re-sliced with the newer map,
//! passing refusals after a growing pause, lost ones as retries), key lists
//! replaced by references where the server holds them, and the replies
//! merged in key order.

use super::*;

mod pieces;
mod scan;

#[cfg(test)]
use pieces::{FRAME_SLACK, SEND_FRAME_BYTES};
use pieces::{cut, keys_per_frame};

/// A piece of a request still to be done.
#[derive(Clone, Debug)]
struct Item {
    range: KeyRange,
    /// Offset of the item's first key in the request (key list index, or
    /// key minus the request range's begin for dense requests).
    first: usize,
    /// Keys in the item.
    count: usize,
    /// Sent before: it may have been applied, so a resend is a retry.
    sent: bool,
    /// Transient failures so far (sets the pause before the next try).
    tries: u32,
}

/// A push's ticket for the next ([`order::Ticket`]), shared by the parts
/// of its first round: once the last part is dropped (its frame queued,
/// or failed), the ticket is, which lets the next push go (with the corks
/// held for it).
#[derive(Clone)]
struct Queued(Arc<Mutex<order::Ticket>>);

impl Queued {
    /// Holds a cork for the next push.
    fn hold(&self, cork: crate::conn::Cork) {
        lock(&self.0).hold(cork);
    }

    /// Awaits `f`, letting the held corks go first unless it is ready at
    /// once ([`order::ready_or_release`]).
    async fn ready<F: Future>(queued: &Option<Queued>, f: F) -> F::Output {
        match queued {
            Some(q) => order::ready_or_release(f, || lock(&q.0).release()).await,
            None => f.await,
        }
    }
}

/// A slice on its way: it ends with its result, or with none after a
/// pause (then it is sliced again with the current map).
type SliceFuture<'a> =
    Pin<Box<dyn Future<Output = (Item, Option<Result<SliceResult, NodeError>>)> + Send + 'a>>;

/// Waits before a slice goes again (2 ms doubling to 200 ms), then hands it
/// back with no result: the caller refreshes the map and resends it.
async fn pause<E>(item: Item) -> (Item, Option<Result<SliceResult, E>>) {
    let ms = (2u64 << item.tries.min(7)).min(200);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    (item, None)
}

enum SliceResult {
    Done {
        keys: Vec<u64>,
        /// As the reply carried them: read in place from its read buffer
        /// when large, so the one copy is into the request's answer.
        vals: pserver_wire::Vals,
        applied: u64,
        duplicate: u64,
    },
    Redirect(ClusterMap),
    /// Not done, nothing changed: send again after a pause. Says why, for
    /// the request's timeout.
    Again(String),
    /// The connection failed, or the server refused it after it may have
    /// applied it: resent as a retry.
    Lost,
    /// The server no longer holds the key list a reference named; it did
    /// nothing, and the slice goes again at once with its keys.
    Miss,
}

impl Inner {
    pub(super) fn install(&self, map: ClusterMap) {
        let mut cur = lock(&self.map);
        if map.epoch > cur.epoch {
            // Requests in flight to a server now declared dead fail at once
            // and are resent to the range's new primary, even when the dead
            // server's socket stays open (frozen, or cut off) and would
            // never answer. So do those to the earlier process of a server
            // that came back under its id (`joined` differs, and maybe the
            // address): the next request dials the new one.
            let mut servers = lock(&self.servers);
            servers.retain(|id, link| {
                let current = map.node(*id).is_some_and(|n| link.is_to(n));
                if !current {
                    link.peer.close();
                }
                current
            });
            drop(servers);
            *cur = Arc::new(map);
        }
    }

    pub(super) async fn refresh(&self) -> Result<Arc<ClusterMap>, NodeError> {
        let reply = self
            .manager()
            .request(control_request(self.id, 0, &Control::GetMap))
            .await?;
        match reply_control(&reply, self.manager().label())? {
            Control::Map(map) => {
                self.install(map);
                Ok(lock(&self.map).clone())
            }
            other => Err(NodeError::Protocol {
                peer: self.manager().label().to_string(),
                what: format!("expected Map, got {other:?}"),
            }),
        }
    }

    pub(super) async fn table(&self, name: &str) -> Result<TableSpec, NodeError> {
        if let Some(t) = lock(&self.map).table(name) {
            return Ok(t.clone());
        }
        let map = self.refresh().await?;
        map.table(name)
            .cloned()
            .ok_or_else(|| NodeError::UnknownTable(name.to_string()))
    }

    /// The link to server `node`, dialed if there is none open to the
    /// process the map gives that id (its address and `joined`). The
    /// installed map says which, not `map` (the request's, which may be
    /// older): a link to a process of the id that the map has replaced is
    /// never used nor kept.
    pub(super) async fn link(&self, node: NodeId, map: &ClusterMap) -> Result<Link, NodeError> {
        let unknown = || NodeError::Protocol {
            peer: "map".into(),
            what: format!("partition names unknown node {node}"),
        };
        let now = lock(&self.map).clone();
        let info = now
            .node(node)
            .or_else(|| map.node(node))
            .ok_or_else(unknown)?;
        if let Some(l) = lock(&self.servers).get(&node) {
            if !l.peer.is_closed() && l.is_to(info) {
                return Ok(l.clone());
            }
        }
        let (peer, _notices) = Peer::connect_via(&self.net, &info.addr, self.limits).await?;
        let mut servers = lock(&self.servers);
        match servers.get(&node) {
            // Slices sent at once race to connect; the first link stays, so
            // that what each slice learns about the server's key cache lands
            // in the one set every later slice reads.
            Some(l) if !l.peer.is_closed() && l.is_to(info) => Ok(l.clone()),
            _ => {
                let link = Link {
                    peer,
                    known: Arc::default(),
                    mirrors: Arc::default(),
                    addr: info.addr.clone(),
                    joined: info.joined,
                };
                if let Some(old) = servers.insert(node, link.clone()) {
                    old.peer.close();
                }
                Ok(link)
            }
        }
    }

    /// Runs a request to its end: its result, or [`NodeError::Timeout`]
    /// once the worker's timeout has passed since it started, whatever it
    /// was waiting for (the push before it, room among the clocks in
    /// flight, the manager, a connection, a reply, a pause between retries).
    ///
    /// `spare` is a vector the answer of a pull or push-pull may be written
    /// into (its memory reused; see [`Worker::send_into`]), or an empty one.
    pub(super) async fn execute(
        self: Arc<Self>,
        req: Request,
        order: Option<order::Place>,
        spare: Vec<f32>,
    ) -> Result<Outcome, NodeError> {
        let deadline = Instant::now() + self.timeout;
        let what = format!("{:?} on table {:?}", req.op, req.table);
        let secs = self.timeout.as_secs();
        let last = Mutex::new(None);
        match tokio::time::timeout_at(
            deadline,
            self.clone().run(req, order, deadline, &last, spare),
        )
        .await
        {
            Ok(done) => done,
            // Dropping the request's future drops its slices' waits; a
            // reply that still comes finds no one waiting and is dropped.
            Err(_) => Err(NodeError::Timeout {
                what,
                secs,
                last: lock(&last).take(),
            }),
        }
    }

    /// The request itself; [`Inner::execute`] bounds it by `deadline`.
    /// `last` keeps the last passing refusal, which a timeout reports.
    async fn run(
        self: Arc<Self>,
        mut req: Request,
        order: Option<order::Place>,
        deadline: Instant,
        last: &Mutex<Option<String>>,
        spare: Vec<f32>,
    ) -> Result<Outcome, NodeError> {
        // Wait for the push before this one to have queued its frames (it
        // hands on the corks it held for this one); the ticket lets the next
        // go once this one has queued its own (a failure before that drops
        // it, which also lets the next go). Corks are held only while this
        // push does not wait: each wait below that is not over at once lets
        // them go first.
        let mut ticket = None;
        if let Some(place) = order {
            let mut t = place.ticket;
            if let Some(before) = place.before {
                if let Ok(corks) = before.await {
                    t.inherit(corks);
                }
            }
            ticket = Some(t);
        }
        // Pushes complete out of order: keep the clocks in flight within
        // the window the servers remember, so that a slice resent late is
        // still recognised as applied or not.
        let _in_flight = if req.op != Op::Pull {
            let clock = req
                .clock
                .unwrap_or_else(|| self.clock.load(Ordering::SeqCst));
            let enter = tokio::time::timeout_at(deadline, self.in_flight.enter(clock));
            let entered = match &mut ticket {
                Some(t) => t.ready(enter).await,
                None => enter.await,
            };
            match entered {
                Ok(place) => Some(place),
                Err(_) => {
                    return Err(NodeError::Timeout {
                        what: format!("room for clock {clock} among the pushes in flight"),
                        secs: self.timeout.as_secs(),
                        last: None,
                    });
                }
            }
        } else {
            None
        };
        let spec = match &mut ticket {
            Some(t) => t.ready(self.table(&req.table)).await?,
            None => self.table(&req.table).await?,
        };
        let dim = spec.dim as usize;
        let clock = req
            .clock
            .unwrap_or_else(|| self.clock.load(Ordering::SeqCst));
        let (range, n, dense) = match &req.keys {
            Keys::List(keys) => {
                if let Some(i) = keys.windows(2).position(|w| w[0] >= w[1]) {
                    return Err(NodeError::BadRequest(format!(
                        "keys must be sorted and unique; position {} is not",
                        i + 1
                    )));
                }
                if keys.last() == Some(&KEY_END) {
                    return Err(NodeError::BadRequest(format!("key {KEY_END} is reserved")));
                }
                (KeyRange::ALL, keys.len(), false)
            }
            Keys::Range(r) => {
                if r.is_empty() {
                    return Err(NodeError::BadRequest(format!("range {r} is empty")));
                }
                if r.len() > self.limits.max_keys as u64 {
                    return Err(NodeError::BadRequest(format!(
                        "range {r} has more than {} keys",
                        self.limits.max_keys
                    )));
                }
                (*r, r.len() as usize, true)
            }
        };
        let pushes = req.op != Op::Pull;
        let width = if !pushes || n == 0 {
            0
        } else if !req.vals.len().is_multiple_of(n) || req.vals.is_empty() {
            return Err(NodeError::BadRequest(format!(
                "{} values do not divide evenly over {n} keys",
                req.vals.len()
            )));
        } else {
            req.vals.len() / n
        };
        if !pushes && !req.vals.is_empty() {
            return Err(NodeError::BadRequest("a pull carries no values".into()));
        }
        let keys: &[u64] = match &req.keys {
            Keys::List(k) => k,
            Keys::Range(_) => &[],
        };
        // The pushed values as shared bytes (no copy): each frame carries
        // a slice of them, written to the socket from where they are.
        // A push's array comes back into `returned` once every frame of it
        // is written, for the caller to use again (`Outcome::pushed`).
        let returned = pushes.then(pserver_wire::vals::Return::default);
        let vals = match &returned {
            Some(slot) => pserver_wire::Vals::lent(std::mem::take(&mut req.vals), slot.clone()),
            None => pserver_wire::Vals::new(),
        };
        let kind = match req.op {
            Op::Push => Kind::Push,
            Op::Pull => Kind::Pull,
            Op::PushPull => Kind::PushPull,
        };
        let ctrl = match (req.op, req.consistency) {
            (Op::Pull, Some(c)) => Control::Consistency(c).to_bytes().into(),
            _ => bytes::Bytes::new(),
        };
        // A pull's values are laid out when its first reply comes: a reply
        // that answers the whole request becomes them as it is (no second
        // buffer of the request's size to zero, fault in and copy into).
        let mut out = Outcome::default();
        let whole = n * dim;
        // A caller's spare vector of the answer's length is written over in
        // place: every value of it is one some reply carries (the pieces
        // cover the request), so it need not be zeroed first, and its pages
        // are already the process's (no faults, no zeroing by the kernel).
        let mut spare = (req.op != Op::Push && whole > 0).then_some(spare);
        // Every slice goes and retries on its own: a slice held by a server
        // (an aggregating table acknowledges a push once every worker's push
        // of the clock is in) must not hold back the resend of another slice
        // of the same request, which that very sum may be waiting for.
        let mut queue = vec![Item {
            range,
            first: 0,
            count: n,
            sent: false,
            tries: 0,
        }];
        // Each frame, and the reply it asks for, must fit the frame limit:
        // slices with more keys than that go as several frames.
        // A filtered reply may carry every value and its presence bits too:
        // counting one more value a key covers them (a bit is needed).
        let bits = usize::from(
            req.op == Op::Pull && lock(&self.filters).values.significant_pull.is_some(),
        );
        let per_frame = keys_per_frame(&self.limits, dense, width, dim + bits, req.op, ctrl.len());
        let mut in_flight: FuturesUnordered<SliceFuture<'_>> = FuturesUnordered::new();
        // A clock refusal (duplicate, too old) of a slice that carries no
        // key, kept while slices with keys are out: the caller pushed
        // nothing to its range, so an error naming it would point away from
        // the keys (issue #16, 9). A push records its clock over every slice,
        // so a slice with keys meets the same refusal where they are.
        let mut keyless_refusal: Option<NodeError> = None;
        loop {
            // Connections that get several frames this round: corked until
            // every frame of the round is queued, so each goes out in one
            // write, not one syscall a frame.
            let mut corks = Vec::new();
            if !queue.is_empty() {
                let mut per_server: HashMap<NodeId, usize> = HashMap::new();
                let map = lock(&self.map).clone();
                // The first round's frames count down to the ticket. A push
                // made after this one and on its way gets the corks of this
                // one's connections (see `order`).
                let countdown = ticket.take().map(|t| Queued(Arc::new(Mutex::new(t))));
                let hand_on = countdown.as_ref().is_some_and(|q| lock(&q.0).followed());
                for item in std::mem::take(&mut queue) {
                    let item_keys = if dense {
                        &[][..]
                    } else {
                        &keys[item.first..item.first + item.count]
                    };
                    let slices = map.slice(item.range, item_keys);
                    if slices.is_empty() {
                        // The map names no live server; fail now unless the
                        // manager already knows better (asked with no cork
                        // held: an answer may take long).
                        if let Some(q) = &countdown {
                            lock(&q.0).release();
                        }
                        if self.refresh().await?.partitions.is_empty() {
                            return Err(NodeError::NoServer(item.range));
                        }
                        in_flight.push(Box::pin(pause(item)));
                        continue;
                    }
                    let pieces = slices.into_iter().flat_map(|s| {
                        let (first, count) = if dense {
                            (
                                (s.range.begin - range.begin) as usize,
                                s.range.len() as usize,
                            )
                        } else {
                            (item.first + s.keys.start, s.keys.len())
                        };
                        let listed = (!dense).then_some(keys);
                        cut(s.range, first, count, per_frame, listed)
                            .into_iter()
                            .map(move |(r, first, count)| (s.partition, r, first, count))
                    });
                    for (partition, piece, first, count) in pieces {
                        // A pull needs no message where it has no keys (a
                        // push does: its empty slices advance range clocks).
                        if req.op == Op::Pull && !dense && count == 0 {
                            continue;
                        }
                        let sub = Item {
                            range: piece,
                            first,
                            count,
                            sent: item.sent,
                            tries: item.tries,
                        };
                        let server = map.partitions[partition].primary;
                        let sent_there = per_server.entry(server).or_default();
                        *sent_there += 1;
                        if *sent_there == 1 && hand_on {
                            if let (Some(q), Some(link)) =
                                (&countdown, lock(&self.servers).get(&server))
                            {
                                q.hold(link.peer.cork());
                            }
                        }
                        if *sent_there == 2 {
                            if let Some(link) = lock(&self.servers).get(&server) {
                                corks.push(link.peer.cork());
                            }
                        }
                        let mut h = Header::new(kind);
                        h.flags = if dense { FLAG_DENSE } else { 0 }
                            | if sub.sent { FLAG_RETRY } else { 0 };
                        h.sender = self.id;
                        h.table = spec.id;
                        h.epoch = map.epoch;
                        h.clock = clock;
                        h.range = sub.range;
                        let frame = Frame {
                            header: h,
                            keys: if dense {
                                Vec::new()
                            } else {
                                keys[sub.first..sub.first + sub.count].to_vec()
                            },
                            vals: vals.slice(sub.first * width..(sub.first + sub.count) * width),
                            ctrl: ctrl.clone(),
                            packed: None,
                        };
                        let this = self.clone();
                        let map = map.clone();
                        let queued = countdown.clone();
                        in_flight.push(Box::pin(async move {
                            let r = this.send_slice(server, &map, frame, queued).await;
                            (sub, Some(r))
                        }));
                    }
                }
            }
            let mut corks = Some(corks);
            let next = std::future::poll_fn(|cx| {
                let polled = in_flight.poll_next_unpin(cx);
                // The first poll queued every new frame: let them go.
                corks.take();
                polled
            })
            .await;
            let Some((mut item, step)) = next else {
                if let Some(e) = keyless_refusal {
                    return Err(e);
                }
                // Every slice is in; a pull whose slices all had no keys
                // still answers with its (empty or zero) values.
                if req.op != Op::Push && out.vals.len() != whole {
                    out.vals = vec![0.0; whole];
                }
                drop(vals);
                if let Some(v) = returned.as_ref().and_then(|slot| lock(slot).take()) {
                    out.pushed = v;
                }
                return Ok(out);
            };
            let Some(res) = step else {
                // Back from a pause: the map may have moved on without
                // telling us (a server died).
                let _ = self.refresh().await;
                queue.push(item);
                continue;
            };
            let again = |mut item: Item, in_flight: &mut FuturesUnordered<_>| {
                self.traffic.retries.fetch_add(1, Ordering::Relaxed);
                item.tries += 1;
                in_flight.push(Box::pin(pause(item)) as Pin<Box<dyn Future<Output = _> + Send>>);
            };
            let res = match res {
                Err(e) if !dense && n > 0 && item.count == 0 && is_clock_refusal(&e) => {
                    keyless_refusal.get_or_insert(e);
                    continue;
                }
                r => r?,
            };
            match res {
                SliceResult::Done {
                    vals,
                    keys: _,
                    applied,
                    duplicate,
                } => {
                    out.applied += applied;
                    out.duplicate += duplicate;
                    if req.op != Op::Push {
                        if vals.len() != item.count * dim {
                            return Err(NodeError::Protocol {
                                peer: format!("server for {}", item.range),
                                what: format!(
                                    "{} values for {} keys of dim {dim}",
                                    vals.len(),
                                    item.count
                                ),
                            });
                        }
                        let fits = spare.as_ref().is_some_and(|v| v.capacity() >= whole);
                        if out.vals.is_empty() && vals.len() == whole && !fits {
                            out.vals = vals.into_vec();
                        } else {
                            if out.vals.len() != whole {
                                out.vals = match spare.take() {
                                    Some(mut v) if v.capacity() >= whole => {
                                        // Zeroed only where it is shorter.
                                        v.resize(whole, 0.0);
                                        v
                                    }
                                    _ => pserver_core::rows::zeroed(whole),
                                };
                            }
                            vals.copy_to(
                                &mut out.vals[item.first * dim..(item.first + item.count) * dim],
                            );
                        }
                    }
                    continue;
                }
                SliceResult::Redirect(map) => {
                    self.install(map);
                    self.traffic.retries.fetch_add(1, Ordering::Relaxed);
                    queue.push(item);
                }
                SliceResult::Again(why) => {
                    *lock(last) = Some(why);
                    again(item, &mut in_flight);
                }
                // Not a retry: the refused reference changed nothing, so
                // `item.sent` stays as it was.
                SliceResult::Miss => {
                    self.traffic.retries.fetch_add(1, Ordering::Relaxed);
                    queue.push(item);
                }
                SliceResult::Lost => {
                    *lock(last) = Some(format!(
                        "the connection to the server of {} failed or it lost the range",
                        item.range
                    ));
                    item.sent = true;
                    again(item, &mut in_flight);
                }
            }
        }
    }

    /// True when `frame`'s key list should be cached: caching is on and the
    /// frame is a data request with a long enough key list.
    fn caches(&self, frame: &Frame) -> bool {
        let h = &frame.header;
        lock(&self.filters)
            .cache_keys_from
            .is_some_and(|min| frame.keys.len() >= min)
            && matches!(h.kind, Kind::Push | Kind::Pull | Kind::PushPull)
            && h.flags & (FLAG_DENSE | FLAG_SCAN | FLAG_KEYREF) == 0
    }

    /// When the significantly-modified filter is on and `frame` is a pull
    /// (not a scan) of a table `map` knows: flags it, puts the threshold,
    /// what `link`'s mirror holds and the pull's own consistency in its
    /// control section, and returns the pull's keys and the table's width,
    /// which its reply is completed with.
    fn ask_significant(
        &self,
        frame: &mut Frame,
        link: &Link,
        map: &ClusterMap,
    ) -> Option<(Vec<u64>, usize)> {
        let threshold = lock(&self.filters).values.significant_pull?;
        let h = frame.header;
        if h.kind != Kind::Pull || h.flags & FLAG_SCAN != 0 {
            return None;
        }
        let dim = map.table_by_id(h.table)?.dim as usize;
        let consistency = if frame.ctrl.is_empty() {
            None
        } else {
            match frame.control_msg() {
                Ok(Control::Consistency(c)) => Some(c),
                _ => return None,
            }
        };
        let basis = lock(&link.mirrors)
            .get(&h.table)
            .and_then(pserver_core::significant::Mirror::basis);
        frame.ctrl = Control::SignificantPull {
            threshold,
            basis,
            consistency,
        }
        .to_bytes()
        .into();
        frame.header.flags |= FLAG_SIGNIFICANT;
        let keys = if h.dense() {
            (h.range.begin..h.range.end).collect()
        } else {
            frame.keys.clone()
        };
        Some((keys, dim))
    }

    /// Sends one slice and reads its reply. `queued` is dropped once the
    /// frame is queued on its connection (or could not be), which is what
    /// the next push waits for.
    async fn send_slice(
        &self,
        server: NodeId,
        map: &ClusterMap,
        frame: Frame,
        queued: Option<Queued>,
    ) -> Result<SliceResult, NodeError> {
        let link = match Queued::ready(&queued, self.link(server, map)).await {
            Ok(l) => l,
            Err(e) if e.is_transient() => return Ok(SliceResult::Again(e.to_string())),
            Err(e) => return Err(e),
        };
        let peer = &link.peer;
        let table = frame.header.table;
        let mut frame = frame;
        // The significantly-modified filter: the request says what this
        // connection's mirror holds; the reply is completed from it. The
        // keys are kept before key caching may replace them by a reference.
        let significant = self.ask_significant(&mut frame, &link, map);
        // Key caching: the list's hash, and whether a reference replaced it.
        let mut cached = None;
        if self.caches(&frame) {
            let hash = key_list_hash(&frame.keys);
            let count = frame.keys.len() as u64;
            if lock(&link.known).contains(table, hash) {
                frame.keys = vec![hash, count];
                frame.header.flags |= FLAG_KEYREF;
                cached = Some((hash, Some(count)));
            } else {
                frame.header.flags |= FLAG_CACHE_KEYS;
                cached = Some((hash, None));
            }
        }
        let compression = lock(&self.filters).compression;
        if let Some(packing) = compression {
            if matches!(frame.header.kind, Kind::Pull | Kind::PushPull) {
                frame.header.flags |= FLAG_PACK_REPLY;
            }
            let saved = frame.pack(packing);
            self.traffic.bytes_saved.fetch_add(saved, Ordering::Relaxed);
        }
        self.traffic.requests.fetch_add(1, Ordering::Relaxed);
        self.traffic
            .bytes_sent
            .fetch_add(frame.encoded_len() as u64 + 4, Ordering::Relaxed);
        let reply = match Queued::ready(&queued, peer.send_request(frame)).await {
            Ok(pending) => {
                drop(queued);
                // A server that refused the connection (at its limit of
                // connections) answers with why, not merely closed.
                pending.await.ok().or_else(|| peer.refusal())
            }
            // Never left, and would not the next time either.
            Err(e @ NodeError::Unsendable { .. }) => return Err(e),
            Err(_) => None,
        };
        let Some(reply) = reply else {
            lock(&self.servers).remove(&server);
            return Ok(SliceResult::Lost);
        };
        self.traffic
            .bytes_received
            .fetch_add(reply.encoded_len() as u64 + 4, Ordering::Relaxed);
        let mut reply = reply;
        if let Some(p) = &reply.packed {
            let saved = (p.count as usize * 4).saturating_sub(p.bytes.len());
            self.traffic
                .bytes_saved_received
                .fetch_add(saved as u64, Ordering::Relaxed);
        }
        reply.unpack().map_err(|e| NodeError::Protocol {
            peer: peer.label().to_string(),
            what: e.to_string(),
        })?;
        match cached {
            Some((hash, Some(_))) if is_key_cache_miss(&reply) => {
                // Evicted, or the server restarted. It did nothing, so the
                // slice is resent, in full now that the hash is forgotten.
                lock(&link.known).forget(table, hash);
                return Ok(SliceResult::Miss);
            }
            Some((_, Some(count))) => {
                let saved = (count * 8).saturating_sub(16);
                self.traffic.bytes_saved.fetch_add(saved, Ordering::Relaxed);
            }
            Some((hash, None))
                if reply.header.kind == Kind::Reply
                    && reply.header.flags & FLAG_CACHE_KEYS != 0 =>
            {
                // The server says it kept the list.
                lock(&link.known).learn(table, hash);
            }
            _ => {}
        }
        match reply.header.kind {
            Kind::Redirect => match reply.control_msg() {
                Ok(Control::Map(m)) => Ok(SliceResult::Redirect(m)),
                _ => Err(NodeError::Protocol {
                    peer: peer.label().to_string(),
                    what: "redirect without a map".into(),
                }),
            },
            Kind::Error => match reply_control(&reply, peer.label()) {
                Err(
                    e @ NodeError::Remote {
                        code: ErrorCode::EpochAhead,
                        ..
                    },
                ) => Ok(SliceResult::Again(e.to_string())),
                // Possibly applied there before its chain refused it (the
                // server lost the range meanwhile): resent as a retry, so a
                // new primary that has it counts it as done.
                Err(NodeError::Remote {
                    code: ErrorCode::NotOwner,
                    ..
                }) => Ok(SliceResult::Lost),
                Err(e) => Err(e),
                Ok(_) => Err(NodeError::Protocol {
                    peer: peer.label().to_string(),
                    what: "error frame without an error".into(),
                }),
            },
            Kind::Reply if reply.header.flags & FLAG_SIGNIFICANT != 0 => {
                let Some((keys, dim)) = &significant else {
                    return Err(NodeError::Protocol {
                        peer: peer.label().to_string(),
                        what: "a filtered reply to a pull that did not ask for one".into(),
                    });
                };
                let Ok(Control::Significant(stamp)) = reply.control_msg() else {
                    return Err(NodeError::Protocol {
                        peer: peer.label().to_string(),
                        what: "a filtered reply without its stamp".into(),
                    });
                };
                let full = (keys.len() * dim * 4) as u64;
                let sent = (reply.vals.len() * 4 + reply.ctrl.len()) as u64;
                match filters::complete(&link.mirrors, table, *dim, keys, &stamp, &reply.vals) {
                    Ok(Some(vals)) => {
                        self.traffic
                            .significant_saved_received
                            .fetch_add(full.saturating_sub(sent), Ordering::Relaxed);
                        Ok(SliceResult::Done {
                            keys: Vec::new(),
                            vals: vals.into(),
                            applied: 0,
                            duplicate: 0,
                        })
                    }
                    // Nothing applied; asked again at once.
                    Ok(None) => Ok(SliceResult::Miss),
                    Err(e) => Err(NodeError::Protocol {
                        peer: peer.label().to_string(),
                        what: e.to_string(),
                    }),
                }
            }
            Kind::Reply => {
                let (applied, duplicate) = if reply.ctrl.is_empty() {
                    (0, 0)
                } else {
                    match reply.control_msg() {
                        Ok(Control::PushAck { applied, duplicate }) => (applied, duplicate),
                        _ => (0, 0),
                    }
                };
                Ok(SliceResult::Done {
                    keys: reply.keys,
                    vals: reply.vals,
                    applied,
                    duplicate,
                })
            }
            other => Err(NodeError::Protocol {
                peer: peer.label().to_string(),
                what: format!("{other:?} frame as a reply"),
            }),
        }
    }
}

/// True when `reply` refuses a key reference the server does not hold.
fn is_key_cache_miss(reply: &Frame) -> bool {
    reply.header.kind == Kind::Error
        && matches!(
            reply.control_msg(),
            Ok(Control::Error {
                code: ErrorCode::KeyCacheMiss,
                ..
            })
        )
}

/// Whether `e` is a server's refusal of a push's clock: already recorded
/// there ([`ErrorCode::Duplicate`]) or too far below the sender's latest
/// ([`ErrorCode::TooOld`]).
fn is_clock_refusal(e: &NodeError) -> bool {
    matches!(
        e,
        NodeError::Remote {
            code: ErrorCode::Duplicate | ErrorCode::TooOld,
            ..
        }
    )
}

#[cfg(test)]
mod tests;
