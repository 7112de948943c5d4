//! What a table is: its name, value width, initializer, updater and consistency
//! model. Specs are created by the manager and travel inside the cluster map.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest value width a table may have.
pub const MAX_DIM: u32 = 4096;

/// Longest table name.
pub const MAX_TABLE_NAME: usize = 128;

/// How a key that was never pushed reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Init {
    /// Every element reads as zero.
    Zero,
    /// Uniform in `[-scale, scale)`, derived from `(seed, key, element)` so that
    /// every replica and every restart agrees without storing the value.
    Uniform {
        /// Half-width of the interval.
        scale: f32,
        /// Seed mixed with the key.
        seed: u64,
    },
}

/// The user-defined function a server runs on a push, with its hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum UpdaterSpec {
    /// `w = v`.
    Assign,
    /// `w += v`.
    Add,
    /// `w -= lr * g`.
    Sgd {
        /// Learning rate.
        lr: f32,
    },
    /// AdaGrad: `n += g^2; w -= lr * g / (sqrt(n) + eps)`.
    AdaGrad {
        /// Learning rate.
        lr: f32,
        /// Added to the denominator for stability.
        eps: f32,
    },
    /// FTRL-Proximal (McMahan et al. 2013), per-coordinate learning rates.
    Ftrl {
        /// Learning-rate scale.
        alpha: f32,
        /// Learning-rate smoothing.
        beta: f32,
        /// L1 regularization strength.
        l1: f32,
        /// L2 regularization strength.
        l2: f32,
    },
    /// The proximal step of delayed block proximal gradient: a push carries the
    /// gradient `g` and the diagonal curvature `h` for each element;
    /// `z = w - eta * g / (h + eps)`, then soft-threshold by `eta * l1 / (h + eps)`
    /// and shrink by `1 + eta * l2 / (h + eps)`.
    Prox {
        /// Step size.
        eta: f32,
        /// L1 regularization strength.
        l1: f32,
        /// L2 regularization strength.
        l2: f32,
        /// Floor added to the curvature.
        eps: f32,
    },
    /// An updater registered by user code under `name` (see
    /// [`crate::updater::Registry`]), with its own parameters.
    Custom {
        /// Name the server's registry knows it by.
        name: String,
        /// Parameters handed to the user's constructor.
        params: Vec<f32>,
    },
}

impl UpdaterSpec {
    /// Short name, as used on the command line.
    pub fn name(&self) -> &str {
        match self {
            UpdaterSpec::Assign => "assign",
            UpdaterSpec::Add => "add",
            UpdaterSpec::Sgd { .. } => "sgd",
            UpdaterSpec::AdaGrad { .. } => "adagrad",
            UpdaterSpec::Ftrl { .. } => "ftrl",
            UpdaterSpec::Prox { .. } => "prox",
            UpdaterSpec::Custom { name, .. } => name,
        }
    }
}

/// How far a worker may run ahead of the slowest worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// `tau = 0`: a pull at clock `t` waits until every live worker pushed `t`.
    Sequential,
    /// A pull at clock `t` waits until every live worker pushed `t - tau`.
    Bounded(u64),
    /// Nothing waits.
    Eventual,
}

impl Consistency {
    /// The delay bound, `None` for eventual consistency.
    pub fn tau(&self) -> Option<u64> {
        match self {
            Consistency::Sequential => Some(0),
            Consistency::Bounded(tau) => Some(*tau),
            Consistency::Eventual => None,
        }
    }

    /// The clock every live worker must have pushed before a pull at `clock`
    /// may be answered; `None` when the pull need not wait.
    pub fn required_clock(&self, clock: u64) -> Option<u64> {
        let tau = self.tau()?;
        let need = clock.checked_sub(tau)?;
        (need > 0).then_some(need)
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Consistency::Sequential => write!(f, "sequential"),
            Consistency::Bounded(tau) => write!(f, "bounded({tau})"),
            Consistency::Eventual => write!(f, "eventual"),
        }
    }
}

/// A table as the manager knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableSpec {
    /// Id assigned by the manager; requests name tables by id.
    pub id: u32,
    /// Name users give the table.
    pub name: String,
    /// Floats per key (1 for a linear model, 16-256 for an embedding).
    pub dim: u32,
    /// How unpushed keys read.
    pub init: Init,
    /// What the server does with a push.
    pub updater: UpdaterSpec,
    /// The table's default consistency model (a call may override it).
    pub consistency: Consistency,
    /// Sum the pushes of every live worker for a clock and run the updater
    /// once on the sum (the paper's aggregation; what the proximal step of
    /// block proximal gradient needs). Pushes from clients apply at once.
    pub aggregate: bool,
    /// The training job the table belongs to: its consistency, aggregation
    /// and barriers count the live workers of that job's group only
    /// ([`crate::map::Group`]); `None` is the default group.
    #[serde(default)]
    pub job: Option<String>,
}

/// Whether `name` may name a job: the rule of table names.
pub fn valid_job_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TABLE_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Why a table spec was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    /// The job name breaks the rule of table names.
    #[error("job name {0:?} is invalid: use 1-128 letters, digits, '_', '-' or '.'")]
    BadJob(String),
    /// The name is empty, too long, or has characters other than
    /// letters, digits, `_`, `-` and `.`.
    #[error("table name {0:?} is invalid: use 1-128 letters, digits, '_', '-' or '.'")]
    BadName(String),
    /// The width is zero or above [`MAX_DIM`].
    #[error("table {name:?}: dim {dim} is out of range 1..={MAX_DIM}")]
    BadDim {
        /// Table name.
        name: String,
        /// Width asked for.
        dim: u32,
    },
    /// A hyper-parameter is not finite or out of its range.
    #[error("table {name:?}: updater {updater}: {what}")]
    BadParam {
        /// Table name.
        name: String,
        /// Updater name.
        updater: String,
        /// What is wrong.
        what: String,
    },
}

impl TableSpec {
    /// The worker group the table counts.
    pub fn group(&self) -> crate::map::Group {
        crate::map::Group::of_table(self.job.as_deref())
    }

    /// Checks the name, width and hyper-parameters.
    pub fn validate(&self) -> Result<(), SpecError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_TABLE_NAME
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !name_ok {
            return Err(SpecError::BadName(self.name.clone()));
        }
        if let Some(job) = &self.job {
            if !valid_job_name(job) {
                return Err(SpecError::BadJob(job.clone()));
            }
        }
        if self.dim == 0 || self.dim > MAX_DIM {
            return Err(SpecError::BadDim {
                name: self.name.clone(),
                dim: self.dim,
            });
        }
        let bad = |what: &str| SpecError::BadParam {
            name: self.name.clone(),
            updater: self.updater.name().to_string(),
            what: what.to_string(),
        };
        let pos = |x: f32| x.is_finite() && x > 0.0;
        let nonneg = |x: f32| x.is_finite() && x >= 0.0;
        match &self.updater {
            UpdaterSpec::Assign | UpdaterSpec::Add => {}
            UpdaterSpec::Sgd { lr } => {
                if !pos(*lr) {
                    return Err(bad("lr must be finite and > 0"));
                }
            }
            UpdaterSpec::AdaGrad { lr, eps } => {
                if !pos(*lr) || !pos(*eps) {
                    return Err(bad("lr and eps must be finite and > 0"));
                }
            }
            UpdaterSpec::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => {
                if !pos(*alpha) || !nonneg(*beta) || !nonneg(*l1) || !nonneg(*l2) {
                    return Err(bad("alpha must be > 0; beta, l1, l2 >= 0"));
                }
            }
            UpdaterSpec::Prox { eta, l1, l2, eps } => {
                if !pos(*eta) || !nonneg(*l1) || !nonneg(*l2) || !pos(*eps) {
                    return Err(bad("eta and eps must be > 0; l1, l2 >= 0"));
                }
            }
            UpdaterSpec::Custom { params, .. } => {
                if params.iter().any(|p| !p.is_finite()) {
                    return Err(bad("parameters must be finite"));
                }
            }
        }
        if let Init::Uniform { scale, .. } = self.init {
            if !nonneg(scale) {
                return Err(bad("init scale must be finite and >= 0"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dim: u32, updater: UpdaterSpec) -> TableSpec {
        TableSpec {
            id: 0,
            name: name.into(),
            dim,
            init: Init::Zero,
            updater,
            consistency: Consistency::Eventual,
            aggregate: false,
            job: None,
        }
    }

    #[test]
    fn validation() {
        assert!(spec("w", 1, UpdaterSpec::Add).validate().is_ok());
        assert!(matches!(
            spec("", 1, UpdaterSpec::Add).validate(),
            Err(SpecError::BadName(_))
        ));
        assert!(matches!(
            spec("a b", 1, UpdaterSpec::Add).validate(),
            Err(SpecError::BadName(_))
        ));
        assert!(matches!(
            spec("w", 0, UpdaterSpec::Add).validate(),
            Err(SpecError::BadDim { .. })
        ));
        assert!(matches!(
            spec("w", 1, UpdaterSpec::Sgd { lr: f32::NAN }).validate(),
            Err(SpecError::BadParam { .. })
        ));
    }

    #[test]
    fn required_clock() {
        assert_eq!(Consistency::Sequential.required_clock(3), Some(3));
        assert_eq!(Consistency::Bounded(2).required_clock(3), Some(1));
        assert_eq!(Consistency::Bounded(5).required_clock(3), None);
        assert_eq!(Consistency::Eventual.required_clock(3), None);
        assert_eq!(Consistency::Sequential.required_clock(0), None);
    }
}
