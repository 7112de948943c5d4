//! Scans: every stored key of a range, read from each server that holds
//! part of it, merged in key order.

use super::*;

impl Inner {
    /// Reads every stored key of `range`, within the worker's timeout as
    /// [`Inner::execute`] does.
    pub(in crate::worker) async fn scan(
        self: Arc<Self>,
        table: String,
        range: KeyRange,
    ) -> Result<(Vec<u64>, Vec<f32>), NodeError> {
        let deadline = Instant::now() + self.timeout;
        let secs = self.timeout.as_secs();
        let what = format!("scan of table {table:?}");
        match tokio::time::timeout_at(deadline, self.scan_all(table, range)).await {
            Ok(done) => done,
            Err(_) => Err(NodeError::Timeout {
                what,
                secs,
                last: None,
            }),
        }
    }

    async fn scan_all(
        self: Arc<Self>,
        table: String,
        range: KeyRange,
    ) -> Result<(Vec<u64>, Vec<f32>), NodeError> {
        let spec = self.table(&table).await?;
        let mut todo = vec![range];
        let mut parts: Vec<(u64, Vec<u64>, Vec<f32>)> = Vec::new();
        while !todo.is_empty() {
            let map = lock(&self.map).clone();
            let mut subs = Vec::new();
            for r in &todo {
                let slices = map.slice(*r, &[]);
                if slices.is_empty() && self.refresh().await?.partitions.is_empty() {
                    return Err(NodeError::NoServer(*r));
                }
                for s in slices {
                    subs.push((s.range, map.partitions[s.partition].primary));
                }
            }
            let sends = subs.iter().map(|&(r, server)| {
                let mut h = Header::new(Kind::Pull);
                h.flags = FLAG_SCAN;
                h.sender = self.id;
                h.table = spec.id;
                h.epoch = map.epoch;
                h.range = r;
                let map = map.clone();
                let this = self.clone();
                async move { this.send_slice(server, &map, Frame::new(h), None).await }
            });
            let results = join_all(sends).await;
            todo = Vec::new();
            for ((r, _), res) in subs.into_iter().zip(results) {
                match res? {
                    SliceResult::Done { keys, vals, .. } => {
                        if vals.len() != keys.len() * spec.dim as usize
                            || keys.iter().any(|k| !r.contains(*k))
                        {
                            return Err(NodeError::Protocol {
                                peer: format!("server for {r}"),
                                what: "scan reply does not match its range".into(),
                            });
                        }
                        parts.push((r.begin, keys, vals.into_vec()));
                    }
                    SliceResult::Redirect(m) => {
                        self.install(m);
                        todo.push(r);
                    }
                    SliceResult::Again(_) | SliceResult::Lost | SliceResult::Miss => todo.push(r),
                }
            }
            if !todo.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let _ = self.refresh().await;
            }
        }
        parts.sort_unstable_by_key(|p| p.0);
        let mut keys = Vec::new();
        let mut vals = Vec::new();
        for (_, k, v) in parts {
            keys.extend(k);
            vals.extend(v);
        }
        Ok((keys, vals))
    }
}
