//! A scrape as plain data, and its text in the Prometheus exposition format.
//!
//! A node turns what it counts into a [`Scrape`] (families of samples) when
//! asked, and [`Scrape::render`] writes it through the `prometheus-client`
//! crate's encoder, which names every family (`pserver_` prefix, unit
//! suffix, `_total` for counters), writes its `# HELP` and `# TYPE` lines
//! and escapes label values. Keeping the figures as data first lets the
//! figures of several nodes of one process be merged under a `node` label
//! ([`Scrape::merge`]) and lets tests check them without parsing text.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of the text [`Scrape::render`] writes (format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// What a family measures in, which its name ends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricUnit {
    /// A count of things: no suffix beyond the name itself.
    None,
    /// Bytes (`_bytes`).
    Bytes,
    /// Seconds (`_seconds`).
    Seconds,
    /// A fraction in [0, 1] (`_ratio`).
    Ratio,
}

/// How a family's value behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (its name gets `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations counted into buckets.
    Histogram,
}

/// One sample's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A whole number (counters, most gauges).
    Int(u64),
    /// A real number.
    Float(f64),
    /// A histogram: per bucket its upper bound and the observations in it
    /// (not cumulative), their sum, and their count.
    Histogram {
        /// `(upper bound, observations in this bucket)`, bounds ascending.
        buckets: Vec<(f64, u64)>,
        /// Sum of the observations.
        sum: f64,
        /// How many.
        count: u64,
    },
}

/// One sample: its labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Label names and values.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: Value,
}

/// A metric family: one name, many labelled samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    /// The name after `pserver_` and before the unit and `_total`.
    pub name: &'static str,
    /// What it means.
    pub help: &'static str,
    /// Its unit.
    pub unit: MetricUnit,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// Its samples.
    pub samples: Vec<Sample>,
}

impl Family {
    /// An empty family.
    pub fn new(
        name: &'static str,
        help: &'static str,
        unit: MetricUnit,
        kind: MetricKind,
    ) -> Family {
        Family {
            name,
            help,
            unit,
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a sample.
    pub fn push(&mut self, labels: Vec<(&'static str, String)>, value: Value) -> &mut Family {
        self.samples.push(Sample { labels, value });
        self
    }

    /// This family with one unlabelled sample.
    pub fn with(mut self, value: Value) -> Family {
        self.push(Vec::new(), value);
        self
    }
}

/// Every family a node exports at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    /// The families, each name once.
    pub families: Vec<Family>,
}

impl Scrape {
    /// Adds a family (its samples join an existing family of the same name).
    pub fn add(&mut self, family: Family) {
        match self.families.iter_mut().find(|f| f.name == family.name) {
            Some(f) => f.samples.extend(family.samples),
            None => self.families.push(family),
        }
    }

    /// The scrapes of several nodes of one process as one: every sample
    /// gets a `node` label (the name given with its scrape) and families
    /// of the same name are merged, so each name appears once, as the
    /// format requires.
    pub fn merge(parts: Vec<(String, Scrape)>) -> Scrape {
        let mut out = Scrape::default();
        for (node, scrape) in parts {
            for mut family in scrape.families {
                for s in &mut family.samples {
                    s.labels.insert(0, ("node", node.clone()));
                }
                out.add(family);
            }
        }
        out
    }

    /// The family named `name`, if any (for tests and the live view).
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The text exposition of this scrape.
    pub fn render(&self) -> String {
        let mut registry = Registry::with_prefix("pserver");
        registry.register_collector(Box::new(Encoded(self.clone())));
        let mut text = String::new();
        // Writing into a String cannot fail; the encoder's error type is fmt's.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
        text
    }
}

/// A scrape handed to the registry for one encoding.
#[derive(Debug)]
struct Encoded(Scrape);

impl Collector for Encoded {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0.families {
            let unit = match f.unit {
                MetricUnit::None => None,
                MetricUnit::Bytes => Some(Unit::Bytes),
                MetricUnit::Seconds => Some(Unit::Seconds),
                MetricUnit::Ratio => Some(Unit::Other("ratio".into())),
            };
            let kind = match f.kind {
                MetricKind::Counter => MetricType::Counter,
                MetricKind::Gauge => MetricType::Gauge,
                MetricKind::Histogram => MetricType::Histogram,
            };
            let mut metric = encoder.encode_descriptor(f.name, f.help, unit.as_ref(), kind)?;
            for s in &f.samples {
                let labels: Vec<(&str, &str)> =
                    s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let mut m = metric.encode_family(&labels)?;
                match (&s.value, f.kind) {
                    (Value::Int(v), MetricKind::Counter) => {
                        m.encode_counter::<NoLabelSet, _, f64>(v, None)?
                    }
                    (Value::Float(v), MetricKind::Counter) => {
                        m.encode_counter::<NoLabelSet, _, f64>(v, None)?
                    }
                    (Value::Int(v), _) => m.encode_gauge(v)?,
                    (Value::Float(v), _) => m.encode_gauge(v)?,
                    (
                        Value::Histogram {
                            buckets,
                            sum,
                            count,
                        },
                        _,
                    ) => m.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_prefix_units_and_totals() {
        let mut s = Scrape::default();
        let mut reqs = Family::new(
            "server_requests",
            "Requests.",
            MetricUnit::None,
            MetricKind::Counter,
        );
        reqs.push(
            vec![("table", "w\"x".into()), ("op", "push".into())],
            Value::Int(3),
        );
        s.add(reqs);
        s.add(
            Family::new(
                "server_stored",
                "Bytes stored.",
                MetricUnit::Bytes,
                MetricKind::Gauge,
            )
            .with(Value::Int(64)),
        );
        s.add(
            Family::new(
                "server_request_duration",
                "Latency.",
                MetricUnit::Seconds,
                MetricKind::Histogram,
            )
            .with(Value::Histogram {
                buckets: vec![(0.001, 2), (0.01, 1), (f64::INFINITY, 1)],
                sum: 0.5,
                count: 4,
            }),
        );
        let text = s.render();
        assert!(
            text.contains("# TYPE pserver_server_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("pserver_server_requests_total{table=\"w\\\"x\",op=\"push\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("pserver_server_stored_bytes 64\n"), "{text}");
        // Buckets are cumulative in the text.
        assert!(
            text.contains("pserver_server_request_duration_seconds_bucket{le=\"0.01\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("pserver_server_request_duration_seconds_bucket{le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("pserver_server_request_duration_seconds_count 4\n"),
            "{text}"
        );
    }

    #[test]
    fn merged_scrapes_name_each_family_once_with_a_node_label() {
        let one = |v| {
            let mut s = Scrape::default();
            s.add(
                Family::new("up", "Up.", MetricUnit::None, MetricKind::Gauge).with(Value::Int(v)),
            );
            s
        };
        let m = Scrape::merge(vec![
            ("server-1".into(), one(1)),
            ("server-2".into(), one(2)),
        ]);
        assert_eq!(m.families.len(), 1);
        let text = m.render();
        assert_eq!(text.matches("# TYPE pserver_up gauge").count(), 1, "{text}");
        assert!(text.contains("pserver_up{node=\"server-2\"} 2\n"), "{text}");
    }
}
