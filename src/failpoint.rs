//! Crash points for the crash tests. With the `failpoints` feature (on by default, off in the
//! packages), `RECORD_OFFLOAD_FAILPOINTS="after-complete:0.5,after-uploaded:0.2"` makes the
//! process kill itself with SIGKILL at those points with those probabilities, so tests can
//! stop it exactly in the windows that matter (between completing an upload and committing
//! it, between the commit and the unlink, ...). Without the variable nothing happens.

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    use rand::Rng;
    use std::sync::OnceLock;
    static POINTS: OnceLock<Vec<(String, f64)>> = OnceLock::new();
    let points = POINTS.get_or_init(|| {
        std::env::var("RECORD_OFFLOAD_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|p| {
                let (n, prob) = p.split_once(':')?;
                Some((n.trim().to_string(), prob.trim().parse().ok()?))
            })
            .collect()
    });
    for (n, prob) in points {
        if n == name && rand::rng().random_bool(prob.clamp(0.0, 1.0)) {
            tracing::warn!(point = name, "failpoint: killing the process");
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
        }
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
