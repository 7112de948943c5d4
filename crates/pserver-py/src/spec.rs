//! A table's updater, consistency and initializer as Python gives them
//! (strings, numbers or small dicts) turned into `pserver_core`'s specs,
//! with the command line's names and defaults (`pserver kv create-table`).

use crate::error::BindError;
use pserver_core::{Consistency, Init, UpdaterSpec};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use std::collections::BTreeMap;

/// The updaters and the parameters each takes, with the command line's
/// defaults (crates/pserver/src/kv.rs).
const UPDATERS: &[(&str, &[(&str, f32)])] = &[
    ("assign", &[]),
    ("add", &[]),
    ("sgd", &[("lr", 0.1)]),
    ("adagrad", &[("lr", 0.1), ("eps", 1e-6)]),
    (
        "ftrl",
        &[("alpha", 0.1), ("beta", 1.0), ("l1", 0.0), ("l2", 0.0)],
    ),
    (
        "prox",
        &[("eta", 1.0), ("l1", 0.0), ("l2", 0.0), ("eps", 1e-6)],
    ),
];

/// Splits a spec given as a string (`"sgd"`) or a dict (`{"type":
/// "sgd", "lr": 0.05}`) into its name and parameters; `what` names the argument in
/// errors.
fn given(obj: &Bound<'_, PyAny>, what: &str) -> Result<(String, Vec<(String, f64)>), BindError> {
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok((s.to_string(), Vec::new()));
    }
    let Ok(d) = obj.cast::<PyDict>() else {
        return Err(BindError::Type(format!(
            "{what} must be a string or a dict with a \"type\" entry, not {}",
            type_name(obj)
        )));
    };
    let mut name = None;
    let mut params = Vec::new();
    for (k, v) in d.iter() {
        let key: String = k
            .extract()
            .map_err(|_| BindError::Type(format!("{what}: dict keys must be strings")))?;
        if key == "type" {
            let s: String = v
                .extract()
                .map_err(|_| BindError::Type(format!("{what}: \"type\" must be a string")))?;
            name = Some(s);
        } else {
            let x: f64 = v.extract().map_err(|_| {
                BindError::Type(format!(
                    "{what}: {key:?} must be a number, not {}",
                    type_name(&v)
                ))
            })?;
            params.push((key, x));
        }
    }
    let name = name.ok_or_else(|| {
        BindError::Value(format!("{what}: a dict needs a \"type\" entry naming it"))
    })?;
    Ok((name, params))
}

/// The Python type name of `obj`, for messages.
fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The updater `obj` names: `"assign"`, `"add"`, `"sgd"`, `"adagrad"`,
/// `"ftrl"`, `"prox"`, or a dict of one of those with its parameters.
pub fn updater(obj: &Bound<'_, PyAny>) -> Result<UpdaterSpec, BindError> {
    let (name, params) = given(obj, "updater")?;
    let Some((_, defaults)) = UPDATERS.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = UPDATERS.iter().map(|(n, _)| *n).collect();
        return Err(BindError::Value(format!(
            "updater {name:?} is not one of {}",
            names.join(", ")
        )));
    };
    let mut values: BTreeMap<&str, f32> = defaults.iter().copied().collect();
    for (key, x) in params {
        let Some(slot) = values.get_mut(key.as_str()) else {
            let known: Vec<&str> = defaults.iter().map(|(k, _)| *k).collect();
            return Err(BindError::Value(format!(
                "updater {name:?} takes no parameter {key:?} (it takes: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        };
        *slot = x as f32;
    }
    let v = |k: &str| values.get(k).copied().unwrap_or_default();
    Ok(match name.as_str() {
        "assign" => UpdaterSpec::Assign,
        "add" => UpdaterSpec::Add,
        "sgd" => UpdaterSpec::Sgd { lr: v("lr") },
        "adagrad" => UpdaterSpec::AdaGrad {
            lr: v("lr"),
            eps: v("eps"),
        },
        "ftrl" => UpdaterSpec::Ftrl {
            alpha: v("alpha"),
            beta: v("beta"),
            l1: v("l1"),
            l2: v("l2"),
        },
        _ => UpdaterSpec::Prox {
            eta: v("eta"),
            l1: v("l1"),
            l2: v("l2"),
            eps: v("eps"),
        },
    })
}

/// The consistency model `obj` names: `"sequential"`, `"eventual"`,
/// `"bounded:N"`, or the delay bound `N` as an int (0 is sequential).
pub fn consistency(obj: &Bound<'_, PyAny>) -> Result<Consistency, BindError> {
    let bounded = |tau: u64| {
        if tau == 0 {
            Consistency::Sequential
        } else {
            Consistency::Bounded(tau)
        }
    };
    if let Ok(s) = obj.cast::<PyString>() {
        let s = s.to_string();
        return match s.as_str() {
            "sequential" | "bsp" => Ok(Consistency::Sequential),
            "eventual" | "async" => Ok(Consistency::Eventual),
            _ => s
                .strip_prefix("bounded:")
                .and_then(|n| n.parse().ok())
                .map(bounded)
                .ok_or_else(|| {
                    BindError::Value(format!(
                        "consistency {s:?} is not \"sequential\", \"eventual\" or \"bounded:N\""
                    ))
                }),
        };
    }
    if obj.is_instance_of::<pyo3::types::PyBool>() {
        return Err(BindError::Type("consistency must not be a bool".into()));
    }
    if let Ok(tau) = obj.extract::<i64>() {
        return u64::try_from(tau).map(bounded).map_err(|_| {
            BindError::Value(format!("consistency: the delay bound {tau} is negative"))
        });
    }
    Err(BindError::Type(format!(
        "consistency must be a string or an int, not {}",
        type_name(obj)
    )))
}

/// The initializer `obj` names: `"zero"`, `"uniform:SCALE[:SEED]"`, or
/// `{"type": "uniform", "scale": S, "seed": N}`.
pub fn init(obj: &Bound<'_, PyAny>) -> Result<Init, BindError> {
    if let Ok(s) = obj.cast::<PyString>() {
        let s = s.to_string();
        if s == "zero" {
            return Ok(Init::Zero);
        }
        let bad = || {
            BindError::Value(format!(
                "init {s:?} is not \"zero\" or \"uniform:SCALE[:SEED]\""
            ))
        };
        let rest = s.strip_prefix("uniform:").ok_or_else(bad)?;
        let (scale, seed) = rest.split_once(':').unwrap_or((rest, "0"));
        let scale: f32 = scale.parse().map_err(|_| bad())?;
        let seed: u64 = seed.parse().map_err(|_| bad())?;
        return Ok(Init::Uniform { scale, seed });
    }
    let (name, params) = given(obj, "init")?;
    match name.as_str() {
        "zero" if params.is_empty() => Ok(Init::Zero),
        "uniform" => {
            let (mut scale, mut seed) = (None, 0u64);
            for (k, x) in params {
                match k.as_str() {
                    "scale" => scale = Some(x as f32),
                    "seed" if x >= 0.0 && x.fract() == 0.0 && x < u64::MAX as f64 => {
                        seed = x as u64
                    }
                    "seed" => {
                        return Err(BindError::Value(format!(
                            "init: seed {x} is not a non-negative integer"
                        )));
                    }
                    _ => {
                        return Err(BindError::Value(format!(
                            "init \"uniform\" takes scale and seed, not {k:?}"
                        )));
                    }
                }
            }
            let scale = scale
                .ok_or_else(|| BindError::Value("init \"uniform\" needs a \"scale\"".into()))?;
            Ok(Init::Uniform { scale, seed })
        }
        _ => Err(BindError::Value(format!(
            "init {name:?} is not \"zero\" or \"uniform\" (with no other entries for \"zero\")"
        ))),
    }
}
