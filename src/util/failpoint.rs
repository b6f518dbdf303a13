//! Fault points for the crash and liveness tests. With the `failpoints` feature (on by
//! default, off in the packages), `RECORD_OFFLOAD_FAILPOINTS` lists points and what happens
//! there:
//!
//! - `NAME:P` — the process kills itself with SIGKILL at that point with probability P, so
//!   tests can stop it exactly in the windows that matter (between completing an upload and
//!   committing it, between the commit and the unlink, ...): `after-complete:0.5,after-uploaded:0.2`.
//! - `NAME:stall` — the stage that reaches the point freezes there (until shutdown), as a hung
//!   system call would freeze it: the liveness check must notice (`stall:intake` in the
//!   watchdog test).
//!
//! Without the variable nothing happens.

#[cfg(feature = "failpoints")]
mod imp {
    use std::sync::OnceLock;

    use rand::Rng;
    use tokio_util::sync::CancellationToken;

    enum Action {
        Kill(f64),
        Stall,
    }

    fn points() -> &'static [(String, Action)] {
        static POINTS: OnceLock<Vec<(String, Action)>> = OnceLock::new();
        POINTS.get_or_init(|| {
            std::env::var("RECORD_OFFLOAD_FAILPOINTS")
                .unwrap_or_default()
                .split(',')
                .filter_map(|p| {
                    let (n, what) = p.split_once(':')?;
                    let action = match what.trim() {
                        "stall" => Action::Stall,
                        prob => Action::Kill(prob.parse().ok()?),
                    };
                    Some((n.trim().to_string(), action))
                })
                .collect()
        })
    }

    pub fn hit(name: &str) {
        for (n, action) in points() {
            if let Action::Kill(prob) = action
                && n == name
                && rand::rng().random_bool(prob.clamp(0.0, 1.0))
            {
                tracing::warn!(point = name, "failpoint: killing the process");
                let _ = rustix::process::kill_process(
                    rustix::process::getpid(),
                    rustix::process::Signal::KILL,
                );
            }
        }
    }

    pub async fn stall(name: &str, cancel: &CancellationToken) {
        if points()
            .iter()
            .any(|(n, a)| n == name && matches!(a, Action::Stall))
        {
            tracing::warn!(point = name, "failpoint: stalling this stage");
            cancel.cancelled().await;
        }
    }
}

#[cfg(feature = "failpoints")]
pub use imp::{hit, stall};

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub async fn stall(_name: &str, _cancel: &tokio_util::sync::CancellationToken) {}
