//! Emulated hosts for experiments between processes: one Linux network
//! namespace per host, each joined to this (the root) namespace by a veth
//! pair with an `htb` rate cap on both ends, so a host's upload and
//! download are each limited like a network card's.
//!
//! Latency: this kernel may have no `tc netem`, so every process that
//! takes connections gets a `pserver relay` in the root namespace in front
//! of it, holding every chunk `delay_ms` each way, and the cluster map
//! gives the relay's address (`--advertise`). Every connection between two
//! hosts therefore crosses two rate-capped links and one delay, each way:
//! a round trip costs twice the delay more than over loopback.
//!
//! Host `i` is namespace `pserver-PID-hI` with address `10.214.I.2`; its
//! pair's root end is `10.214.I.1`, where its relays listen. Everything
//! made here is removed when the value is dropped (processes first, then
//! the namespaces, which take their veth pairs with them), and namespaces
//! left by an earlier run that was killed are removed when a new one starts.

use crate::bench::procs::{Procs, child_log};
use anyhow::{Context, Result, bail};
use std::process::{Command, Stdio};

/// Most hosts: one /30 of 10.214.0.0/16 each.
pub const MAX_HOSTS: usize = 250;

/// What every host's link does.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    /// Delay each way of every connection between hosts, in milliseconds.
    pub delay_ms: u64,
    /// Rate cap of each host's link, each direction, in Mbit/s.
    pub rate_mbit: u64,
}

/// The emulated hosts, and the processes started on them.
pub struct Hosts {
    /// Namespaces made so far (all of them, once `create` returns).
    made: Vec<String>,
    link: Link,
    /// Dropped before the namespaces are removed (see `Drop`).
    procs: Procs,
}

/// The prefix of every namespace this module makes.
const PREFIX: &str = "pserver-";

/// Runs `program ARGS`; an error says which command failed and why.
fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Namespaces named `pserver-PID-h...` whose process `PID` is gone: left
/// by a run that was killed before it could clean up.
fn stale_namespaces(listing: &str, alive: impl Fn(u32) -> bool) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| {
            name.strip_prefix(PREFIX)
                .and_then(|rest| rest.split_once("-h"))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
                .is_some_and(|pid| !alive(pid))
        })
        .map(str::to_string)
        .collect()
}

impl Hosts {
    /// Makes `n` hosts with `link`. Needs root and iproute2 (`ip netns`,
    /// veth, `tc` with `htb`); without them the error says so.
    pub fn create(n: usize, link: Link) -> Result<Hosts> {
        if n == 0 || n > MAX_HOSTS {
            bail!("emulated hosts: between 1 and {MAX_HOSTS}, not {n}");
        }
        if link.rate_mbit == 0 {
            bail!("--rate-mbit must be at least 1");
        }
        let listing = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .context("--netns needs iproute2's `ip`, which could not be run")?;
        for name in stale_namespaces(&String::from_utf8_lossy(&listing.stdout), |pid| {
            std::path::Path::new(&format!("/proc/{pid}")).exists()
        }) {
            let _ = sh("ip", &["netns", "del", &name]);
        }
        let mut hosts = Hosts {
            made: Vec::new(),
            link,
            procs: Procs::new(&[]),
        };
        for i in 0..n {
            hosts
                .make(i)
                .with_context(|| format!("making emulated host {i}"))
                .context(
                    "--netns needs root and iproute2 (network namespaces, veth pairs, tc htb)",
                )?;
        }
        Ok(hosts)
    }

    /// The security flags every process started from now on gets.
    pub fn set_child_args(&mut self, extra: &[String]) {
        self.procs.set_extra(extra);
    }

    /// The namespace of host `i`.
    pub fn netns(&self, i: usize) -> String {
        format!("{PREFIX}{}-h{i}", std::process::id())
    }

    /// Host `i`'s own address (inside its namespace).
    pub fn inner_ip(i: usize) -> String {
        format!("10.214.{i}.2")
    }

    /// The root end of host `i`'s link, where its relays listen: the
    /// address others reach it at.
    pub fn outer_ip(i: usize) -> String {
        format!("10.214.{i}.1")
    }

    /// Makes host `i`: its namespace, loopback, veth pair, addresses,
    /// default route and rate caps.
    fn make(&mut self, i: usize) -> Result<()> {
        let ns = self.netns(i);
        sh("ip", &["netns", "add", &ns])?;
        self.made.push(ns.clone());
        let pid = std::process::id();
        let (outer, inner) = (format!("ps{pid}x{i}a"), format!("ps{pid}x{i}b"));
        sh(
            "ip",
            &[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &ns,
            ],
        )?;
        let (o, n) = (
            format!("{}/30", Hosts::outer_ip(i)),
            format!("{}/30", Hosts::inner_ip(i)),
        );
        sh("ip", &["addr", "add", &o, "dev", &outer])?;
        sh("ip", &["link", "set", &outer, "up"])?;
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        sh("ip", &["-n", &ns, "addr", "add", &n, "dev", &inner])?;
        sh("ip", &["-n", &ns, "link", "set", &inner, "up"])?;
        sh(
            "ip",
            &[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &Hosts::outer_ip(i),
            ],
        )?;
        let rate = format!("{}mbit", self.link.rate_mbit);
        // Both ends: the root end's egress is the host's download.
        for (netns, dev) in [(None, outer.as_str()), (Some(ns.as_str()), inner.as_str())] {
            let tc = |args: &[&str]| match netns {
                Some(ns) => {
                    let mut all = vec!["netns", "exec", ns, "tc"];
                    all.extend_from_slice(args);
                    sh("ip", &all)
                }
                None => sh("tc", args),
            };
            tc(&[
                "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1",
            ])?;
            tc(&[
                "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", &rate,
                "ceil", &rate,
            ])?;
        }
        Ok(())
    }

    /// Starts `pserver ROLE ARGS` on host `host`, listening on its own
    /// address at `port`, with a relay in front of it; the role's flags
    /// name where it listens (`--listen`) and what the map gives for it
    /// (`--advertise`, for roles that take it). Returns the relay's
    /// address, the one to dial.
    pub fn start_behind_relay(
        &mut self,
        host: usize,
        port: u16,
        role: &str,
        args: &[&str],
        advertise: bool,
    ) -> Result<String> {
        let inner = format!("{}:{port}", Hosts::inner_ip(host));
        let outer = format!("{}:{port}", Hosts::outer_ip(host));
        // The relay first: the address is in the map as soon as the node
        // registers, and a peer that dials it before the relay listens
        // would be refused.
        let delay = self.link.delay_ms.to_string();
        self.procs.start(&[
            "relay",
            "--listen",
            &outer,
            "--to",
            &inner,
            "--delay-ms",
            &delay,
            "--for-secs",
            "86400",
            "--max-connections",
            "4096",
        ])?;
        let mut all = vec![role, "--listen", &inner];
        if advertise {
            all.extend_from_slice(&["--advertise", &outer]);
        }
        all.extend_from_slice(args);
        let ns = self.netns(host);
        self.procs
            .start_in(Some(&ns), &all)
            .with_context(|| format!("starting the {role} on host {host}"))?;
        Ok(outer)
    }

    /// Runs `pserver ARGS` on host `host` to the end (with the security
    /// flags); returns its standard output, or an error with the end of
    /// its standard error.
    pub fn run(&self, host: usize, args: &[String]) -> Result<String> {
        let exe = std::env::current_exe().context("finding the pserver binary")?;
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns(host)])
            .arg(exe)
            .args(args)
            .args(self.procs.extra())
            .env("RUST_LOG", child_log().unwrap_or_else(|| "error".into()))
            .stdin(Stdio::null())
            .output()
            .context("running pserver in a namespace")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "pserver {} on host {host} failed ({}): {}",
                args.first().map_or("", String::as_str),
                out.status,
                tail.join(" / ")
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Adds to `err` which started process has exited, and how.
    pub fn explain(&mut self, err: anyhow::Error) -> anyhow::Error {
        self.procs.explain(err)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Processes first: a namespace with a process in it lingers.
        self.procs = Procs::new(&[]);
        for ns in self.made.drain(..).rev() {
            let _ = sh("ip", &["netns", "del", &ns]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_namespaces_of_dead_runs_are_stale() {
        let listing = "pserver-100-h0 (id: 3)\npserver-100-h1\npserver-200-h0\n\
                       other-100-h0\npserver-x-h0\npserver-300\n";
        let stale = stale_namespaces(listing, |pid| pid == 200);
        assert_eq!(stale, vec!["pserver-100-h0", "pserver-100-h1"]);
        assert!(stale_namespaces("", |_| false).is_empty());
    }

    #[test]
    fn addresses_are_one_slash_30_per_host() {
        assert_eq!(Hosts::inner_ip(0), "10.214.0.2");
        assert_eq!(Hosts::outer_ip(7), "10.214.7.1");
    }

    #[test]
    fn bad_sizes_are_refused_before_anything_is_made() {
        let link = Link {
            delay_ms: 1,
            rate_mbit: 100,
        };
        assert!(Hosts::create(0, link).is_err());
        assert!(Hosts::create(MAX_HOSTS + 1, link).is_err());
        let e = Hosts::create(
            1,
            Link {
                rate_mbit: 0,
                ..link
            },
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("--rate-mbit"), "{e}");
    }
}
