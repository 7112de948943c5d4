//! The user-defined functions a server runs on a push.
//!
//! Built-ins cover every [`UpdaterSpec`] variant except `Custom`; user code
//! implements [`Updater`] and registers a [`Constructor`] in a [`Registry`].

use crate::spec::UpdaterSpec;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// What a server does with a push to one key. Implement it to add an updater;
/// register it in a [`Registry`] handed to the server.
pub trait Updater: Send + Sync + 'static {
    /// Floats of optimizer state kept per weight element (0 for none).
    fn state_len(&self) -> usize {
        0
    }

    /// Floats pushed per weight element (1 for a gradient; 2 for the
    /// proximal step, which takes the gradient and the curvature).
    fn push_len(&self) -> usize {
        1
    }

    /// Applies one key's push. `weights` has `dim` floats, `state` has
    /// `dim * state_len()` (element `i`'s state at `state[i * state_len()..]`),
    /// `push` has `dim * push_len()` (element `i`'s at `push[i * push_len()..]`).
    /// Pushed values are finite (the server checks before calling).
    fn apply(&self, weights: &mut [f32], state: &mut [f32], push: &[f32]);

    /// The built-in this updater is, if it is one. A store applies a
    /// built-in through its own type, so the per-key loop is compiled for
    /// it (no call through a pointer per key, and a 1-float row is one
    /// store, not a `memcpy`); any other updater is called per key.
    /// User updaters keep the default.
    fn builtin(&self) -> Option<Builtin> {
        None
    }
}

/// The built-in updaters by value (each is a few `Copy` floats), for
/// [`Updater::builtin`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Builtin {
    /// [`Assign`].
    Assign(Assign),
    /// [`Add`].
    Add(Add),
    /// [`Sgd`].
    Sgd(Sgd),
    /// [`AdaGrad`].
    AdaGrad(AdaGrad),
    /// [`Ftrl`].
    Ftrl(Ftrl),
    /// [`Prox`].
    Prox(Prox),
}

/// Largest [`Updater::push_len`] a registered updater may declare. Bounds the
/// per-key push width so a buggy user updater cannot make width arithmetic
/// overflow.
pub const MAX_PUSH_LEN: usize = 64;

/// Largest [`Updater::state_len`] a registered updater may declare. Bounds the
/// per-key slot a store allocates (at most `MAX_DIM * (1 + MAX_STATE_LEN)`
/// floats).
pub const MAX_STATE_LEN: usize = 64;

/// `w = v`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Assign;

impl Updater for Assign {
    fn builtin(&self) -> Option<Builtin> {
        Some(Builtin::Assign(*self))
    }

    #[inline]
    fn apply(&self, weights: &mut [f32], _state: &mut [f32], push: &[f32]) {
        // One float is a store; the loop alone would become a call to
        // `memcpy` per key.
        if let ([w], [v, ..]) = (&mut *weights, push) {
            *w = *v;
            return;
        }
        for (w, v) in weights.iter_mut().zip(push) {
            *w = *v;
        }
    }
}

/// `w += v`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Add;

impl Updater for Add {
    fn builtin(&self) -> Option<Builtin> {
        Some(Builtin::Add(*self))
    }

    fn apply(&self, weights: &mut [f32], _state: &mut [f32], push: &[f32]) {
        for (w, v) in weights.iter_mut().zip(push) {
            *w += *v;
        }
    }
}

/// Plain SGD: `w -= lr * g`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f32,
}

impl Updater for Sgd {
    fn builtin(&self) -> Option<Builtin> {
        Some(Builtin::Sgd(*self))
    }

    fn apply(&self, weights: &mut [f32], _state: &mut [f32], push: &[f32]) {
        for (w, g) in weights.iter_mut().zip(push) {
            *w -= self.lr * *g;
        }
    }
}

/// AdaGrad with one accumulator `n` per element:
/// `n += g^2; w -= lr * g / (sqrt(n) + eps)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaGrad {
    /// Learning rate.
    pub lr: f32,
    /// Added to the denominator for stability.
    pub eps: f32,
}

impl Updater for AdaGrad {
    fn builtin(&self) -> Option<Builtin> {
        Some(Builtin::AdaGrad(*self))
    }

    fn state_len(&self) -> usize {
        1
    }

    fn apply(&self, weights: &mut [f32], state: &mut [f32], push: &[f32]) {
        for ((w, n), g) in weights.iter_mut().zip(state.iter_mut()).zip(push) {
            *n += g * g;
            *w -= self.lr * g / (n.sqrt() + self.eps);
        }
    }
}

/// FTRL-Proximal (McMahan et al. 2013) with per-coordinate learning rates.
/// State per element is `[z, n]`; the weight is recomputed from them on every
/// push, so it is exactly zero whenever `|z| <= l1`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ftrl {
    /// Learning-rate scale.
    pub alpha: f32,
    /// Learning-rate smoothing.
    pub beta: f32,
    /// L1 regularization strength.
    pub l1: f32,
    /// L2 regularization strength.
    pub l2: f32,
}

impl Updater for Ftrl {
    fn builtin(&self) -> Option<Builtin> {
        Some(Builtin::Ftrl(*self))
    }

    fn state_len(&self) -> usize {
        2
    }

    fn apply(&self, weights: &mut [f32], state: &mut [f32], push: &[f32]) {
        for ((w, zn), g) in weights.iter_mut().zip(state.chunks_exact_mut(2)).zip(push) {
            let (z, n) = (zn[0], zn[1]);
            let n_new = n + g * g;
            let sigma = (n_new.sqrt() - n.sqrt()) / self.alpha;
            let z_new = z + g - sigma * *w;
            zn[0] = z_new;
            zn[1] = n_new;
            // z stays 0 while every gradient is 0, so the denominator (0 when
            // beta = l2 = n = 0) is only reached with n > 0.
            *w = if z_new.abs() <= self.l1 {
                0.0
            } else {
                -(z_new - z_new.signum() * self.l1)
                    / ((self.beta + n_new.sqrt()) / self.alpha + self.l2)
            };
        }
    }
}

/// The proximal L1/L2 step of delayed block proximal gradient. Each element's
/// push is `[g, h]` (gradient, diagonal curvature):
/// `d = h + eps; z = w - eta * g / d;
/// w = sign(z) * max(|z| - eta * l1 / d, 0) / (1 + eta * l2 / d)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prox {
    /// Step size.
    pub eta: f32,
    /// L1 regularization strength.
    pub l1: f32,
    /// L2 regularization strength.
    pub l2: f32,
    /// Floor added to the curvature.
    pub eps: f32,
}

impl Updater for Prox {
    fn builtin(&self) -> Option<Builtin> {
        Some(Builtin::Prox(*self))
    }

    fn push_len(&self) -> usize {
        2
    }

    fn apply(&self, weights: &mut [f32], _state: &mut [f32], push: &[f32]) {
        for (w, gh) in weights.iter_mut().zip(push.chunks_exact(2)) {
            let (g, h) = (gh[0], gh[1]);
            // Curvature of a convex loss is never negative; clamping keeps a
            // bad push from flipping the step or dividing by zero.
            let d = h.max(0.0) + self.eps;
            let z = *w - self.eta * g / d;
            let mag = z.abs() - self.eta * self.l1 / d;
            // Written as a branch so a thresholded weight is +0.0, not -0.0.
            *w = if mag > 0.0 {
                z.signum() * mag / (1.0 + self.eta * self.l2 / d)
            } else {
                0.0
            };
        }
    }
}

/// Why an updater could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpdaterError {
    /// A `Custom` updater whose name nobody registered on this server.
    #[error("updater {0:?} is not registered on this server")]
    Unknown(String),
    /// The user's constructor refused the parameters.
    #[error("updater {name:?}: {message}")]
    BadParams {
        /// Updater name.
        name: String,
        /// What the constructor said.
        message: String,
    },
}

/// A constructor of a user updater from its parameters.
pub type Constructor = Arc<dyn Fn(&[f32]) -> Result<Arc<dyn Updater>, String> + Send + Sync>;

/// Maps names of user updaters to their constructors. A value, not a global:
/// each server gets its own.
#[derive(Clone, Default)]
pub struct Registry {
    // Ordered so that listings (and Debug output) are deterministic.
    ctors: BTreeMap<String, Constructor>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.ctors.keys()).finish()
    }
}

impl Registry {
    /// An empty registry (built-ins need no registration).
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers a user updater under `name`, replacing any earlier one of
    /// that name.
    pub fn register(&mut self, name: &str, ctor: Constructor) {
        self.ctors.insert(name.to_string(), ctor);
    }

    /// Names of the registered user updaters, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.ctors.keys().map(String::as_str)
    }

    /// Builds the updater a spec names. Built-ins never fail; a `Custom` spec
    /// fails when its name is not registered, when the constructor refuses
    /// the parameters, or when the updater declares a `push_len` outside
    /// `1..=MAX_PUSH_LEN` or a `state_len` above [`MAX_STATE_LEN`].
    pub fn build(&self, spec: &UpdaterSpec) -> Result<Arc<dyn Updater>, UpdaterError> {
        let updater: Arc<dyn Updater> = match spec {
            UpdaterSpec::Assign => Arc::new(Assign),
            UpdaterSpec::Add => Arc::new(Add),
            UpdaterSpec::Sgd { lr } => Arc::new(Sgd { lr: *lr }),
            UpdaterSpec::AdaGrad { lr, eps } => Arc::new(AdaGrad { lr: *lr, eps: *eps }),
            UpdaterSpec::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => Arc::new(Ftrl {
                alpha: *alpha,
                beta: *beta,
                l1: *l1,
                l2: *l2,
            }),
            UpdaterSpec::Prox { eta, l1, l2, eps } => Arc::new(Prox {
                eta: *eta,
                l1: *l1,
                l2: *l2,
                eps: *eps,
            }),
            UpdaterSpec::Custom { name, params } => {
                let ctor = self
                    .ctors
                    .get(name)
                    .ok_or_else(|| UpdaterError::Unknown(name.clone()))?;
                let bad = |message: String| UpdaterError::BadParams {
                    name: name.clone(),
                    message,
                };
                let updater = ctor(params).map_err(bad)?;
                let (push_len, state_len) = (updater.push_len(), updater.state_len());
                if push_len == 0 || push_len > MAX_PUSH_LEN {
                    return Err(bad(format!(
                        "push_len {push_len} is out of range 1..={MAX_PUSH_LEN}"
                    )));
                }
                if state_len > MAX_STATE_LEN {
                    return Err(bad(format!(
                        "state_len {state_len} is above {MAX_STATE_LEN}"
                    )));
                }
                updater
            }
        };
        Ok(updater)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `u` once on fresh weights `w` with zero state.
    fn step(u: &dyn Updater, w: &mut [f32], state: &mut [f32], push: &[f32]) {
        assert_eq!(state.len(), w.len() * u.state_len());
        assert_eq!(push.len(), w.len() * u.push_len());
        u.apply(w, state, push);
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-6 * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn assign_add_sgd() {
        let mut w = [1.0, 2.0];
        step(&Assign, &mut w, &mut [], &[5.0, -3.0]);
        assert_eq!(w, [5.0, -3.0]);
        step(&Add, &mut w, &mut [], &[1.0, 1.5]);
        assert_eq!(w, [6.0, -1.5]);
        step(&Sgd { lr: 0.5 }, &mut w, &mut [], &[2.0, -1.0]);
        assert_eq!(w, [5.0, -1.0]);
    }

    #[test]
    fn adagrad_closed_form() {
        let u = AdaGrad { lr: 1.0, eps: 1.0 };
        let mut w = [0.0];
        let mut n = [0.0];
        // n = 9, w = -3 / (3 + 1)
        step(&u, &mut w, &mut n, &[3.0]);
        assert_eq!(n, [9.0]);
        assert_eq!(w, [-0.75]);
        // n = 9 + 16 = 25, w = -0.75 - 4 / (5 + 1)
        step(&u, &mut w, &mut n, &[4.0]);
        assert_eq!(n, [25.0]);
        assert!(close(w[0], -0.75 - 4.0 / 6.0));
    }

    #[test]
    fn ftrl_closed_form() {
        let u = Ftrl {
            alpha: 1.0,
            beta: 1.0,
            l1: 1.0,
            l2: 1.0,
        };
        let mut w = [0.0];
        let mut s = [0.0, 0.0];
        // sigma = (2 - 0) / 1 = 2; z = 2 - 2 * 0 = 2; n = 4;
        // w = -(2 - 1) / ((1 + 2) / 1 + 1) = -0.25
        step(&u, &mut w, &mut s, &[2.0]);
        assert_eq!(s, [2.0, 4.0]);
        assert_eq!(w, [-0.25]);
        // A zero gradient leaves z and n, hence w, unchanged.
        step(&u, &mut w, &mut s, &[0.0]);
        assert_eq!(s, [2.0, 4.0]);
        assert_eq!(w, [-0.25]);
        // From a nonzero starting weight (as with Uniform init): sigma = 3.
        let mut w = [1.0];
        let mut s = [0.0, 0.0];
        step(&u, &mut w, &mut s, &[3.0]);
        // z = 3 - 3 * 1 = 0 -> |z| <= l1 -> w = 0
        assert_eq!(s, [0.0, 9.0]);
        assert_eq!(w, [0.0]);
        // n = 9 + 16 = 25, sigma = (5 - 3) = 2, z = 0 + 4 - 2 * 0 = 4,
        // w = -(4 - 1) / ((1 + 5) + 1) = -3 / 7
        step(&u, &mut w, &mut s, &[4.0]);
        assert_eq!(s, [4.0, 25.0]);
        assert!(close(w[0], -3.0 / 7.0));
    }

    #[test]
    fn ftrl_large_l1_keeps_zero() {
        let u = Ftrl {
            alpha: 0.1,
            beta: 1.0,
            l1: 1e6,
            l2: 0.0,
        };
        let mut w = [0.0, 0.0];
        let mut s = [0.0; 4];
        for g in [1.0, -2.0, 3.0, 100.0, -50.0] {
            step(&u, &mut w, &mut s, &[g, -g]);
            assert_eq!(w, [0.0, 0.0]);
        }
    }

    #[test]
    fn prox_closed_form_and_threshold() {
        // l1 = l2 = 0, h = 1, eta = 1 (eps tiny): w - g.
        let u = Prox {
            eta: 1.0,
            l1: 0.0,
            l2: 0.0,
            eps: 1e-12,
        };
        let mut w = [1.0, -2.0];
        step(&u, &mut w, &mut [], &[0.5, 1.0, -1.0, 1.0]);
        assert!(close(w[0], 0.5) && close(w[1], -1.0), "{w:?}");

        // d = 1 + 1 = 2; z = 3 - 2 * 2 / 2 = 1; thr = 2 * 0.25 / 2 = 0.25;
        // w = 0.75 / (1 + 2 * 1 / 2) = 0.375
        let u = Prox {
            eta: 2.0,
            l1: 0.25,
            l2: 1.0,
            eps: 1.0,
        };
        let mut w = [3.0];
        step(&u, &mut w, &mut [], &[2.0, 1.0]);
        assert_eq!(w, [0.375]);
        // Negative side: z = -1 -> w = -0.375.
        let mut w = [-3.0];
        step(&u, &mut w, &mut [], &[-2.0, 1.0]);
        assert_eq!(w, [-0.375]);

        // Soft threshold: |z| = 0.2 < thr = 0.25 gives exactly zero.
        let mut w = [0.2, -0.2];
        step(&u, &mut w, &mut [], &[0.0, 1.0, 0.0, 1.0]);
        assert_eq!(w, [0.0, 0.0]);
        assert!(w.iter().all(|x| x.is_sign_positive()));
    }

    struct Scale(f32);

    impl Updater for Scale {
        fn apply(&self, weights: &mut [f32], _state: &mut [f32], push: &[f32]) {
            for (w, v) in weights.iter_mut().zip(push) {
                *w += self.0 * v;
            }
        }
    }

    fn scale_ctor() -> Constructor {
        Arc::new(|params: &[f32]| match params {
            [k] => Ok(Arc::new(Scale(*k)) as Arc<dyn Updater>),
            _ => Err(format!("want 1 parameter, got {}", params.len())),
        })
    }

    #[test]
    fn registry_builds_builtins_and_custom() {
        let mut reg = Registry::new();
        let u = reg.build(&UpdaterSpec::Prox {
            eta: 1.0,
            l1: 0.0,
            l2: 0.0,
            eps: 1.0,
        });
        assert_eq!(u.map(|u| (u.push_len(), u.state_len())).ok(), Some((2, 0)));
        let ftrl = UpdaterSpec::Ftrl {
            alpha: 1.0,
            beta: 1.0,
            l1: 0.0,
            l2: 0.0,
        };
        assert_eq!(reg.build(&ftrl).map(|u| u.state_len()).ok(), Some(2));

        reg.register("scale", scale_ctor());
        assert_eq!(reg.names().collect::<Vec<_>>(), ["scale"]);
        let spec = UpdaterSpec::Custom {
            name: "scale".into(),
            params: vec![3.0],
        };
        let u = reg.build(&spec).unwrap();
        let mut w = [1.0];
        u.apply(&mut w, &mut [], &[2.0]);
        assert_eq!(w, [7.0]);

        // A clone is an independent value carrying the same registrations.
        assert!(reg.clone().build(&spec).is_ok());
    }

    #[test]
    fn registry_errors() {
        let mut reg = Registry::new();
        let spec = UpdaterSpec::Custom {
            name: "scale".into(),
            params: vec![],
        };
        assert_eq!(
            reg.build(&spec).err(),
            Some(UpdaterError::Unknown("scale".into()))
        );
        reg.register("scale", scale_ctor());
        assert!(matches!(
            reg.build(&spec),
            Err(UpdaterError::BadParams { ref name, .. }) if name == "scale"
        ));

        struct Greedy;
        impl Updater for Greedy {
            fn state_len(&self) -> usize {
                usize::MAX
            }
            fn apply(&self, _: &mut [f32], _: &mut [f32], _: &[f32]) {}
        }
        reg.register("greedy", Arc::new(|_: &[f32]| Ok(Arc::new(Greedy) as _)));
        let greedy = UpdaterSpec::Custom {
            name: "greedy".into(),
            params: vec![],
        };
        assert!(matches!(
            reg.build(&greedy),
            Err(UpdaterError::BadParams { .. })
        ));
    }
}
