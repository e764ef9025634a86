//! Step kinds that exist only in the crate's unit tests, to drive the executor through
//! concurrency, crashes and resumption without a model.

use std::collections::BTreeMap;
use std::sync::{Condvar, LazyLock, Mutex};
use std::time::Duration;

use super::{Holds, Kind, Reported, step};
use crate::dsl::schema::{Artifact, Input, KindSpec, Role, ValueType, params};
use crate::nodes::context::{Context, Outcome, StepError};

params! {
    /// An input whose hash enters the records.
    FROM: Option<Input> = unset("from", ValueType::Input(&[Artifact::Tasks]));
    /// How many records.
    RECORDS: i64 = optional("records", ValueType::at_least(0), "10");
    /// Barrier name.
    GROUP: String = optional("group", ValueType::Text, r#""g""#);
    /// Steps that must meet.
    PARTIES: i64 = optional("parties", ValueType::at_least(1), "2");
}

pub static BATCHES: KindSpec = KindSpec {
    name: "test-batches",
    role: Role::Step(Artifact::Tasks),
    doc: "Writes `records` records in batches of two, derived from the seed and its input.",
    properties: &[FROM.spec, RECORDS.spec],
    metrics: &["count", "mean-index"],
    at_least_one: &[],
    requires: &[],
    ordered: &[],
    distinct: &[],
    metrics_needing: &[],
    check_values: None,
    unkeyed: &[],
    example: "",
};

pub static BARRIER: KindSpec = KindSpec {
    name: "test-barrier",
    role: Role::Step(Artifact::Tasks),
    doc: "Waits until `parties` steps of the same `group` run at the same time; fails if alone, \
          stops when cancelled.",
    properties: &[GROUP.spec, PARTIES.spec],
    metrics: &[],
    at_least_one: &[],
    requires: &[],
    ordered: &[],
    distinct: &[],
    metrics_needing: &[],
    check_values: None,
    unkeyed: &[],
    example: "",
};

/// The language's kinds and the test-only ones, for the executor's tests.
pub static KINDS: LazyLock<Vec<Kind>> = LazyLock::new(|| {
    let test_kinds = [
        step(&BATCHES, batches, Holds::Nothing, Reported::Metrics),
        step(&BARRIER, barrier, Holds::Nothing, Reported::Metrics),
    ];
    super::KINDS.iter().copied().chain(test_kinds).collect()
});

/// Steps (by directory) told to stall after writing this many batches, as if the process were
/// killed there: they signal, then block until released, and write nothing more.
pub static STALL: Mutex<BTreeMap<std::path::PathBuf, usize>> = Mutex::new(BTreeMap::new());
pub static STALLED: (Mutex<Vec<std::path::PathBuf>>, Condvar) = (Mutex::new(Vec::new()), Condvar::new());
pub static RELEASED: (Mutex<Vec<std::path::PathBuf>>, Condvar) = (Mutex::new(Vec::new()), Condvar::new());

/// Waits until the step in `dir` has stalled.
pub fn wait_stalled(dir: &std::path::Path) {
    let (lock, signal) = &STALLED;
    let mut stalled = lock.lock().unwrap();
    while !stalled.iter().any(|d| d == dir) {
        stalled = signal.wait_timeout(stalled, Duration::from_secs(30)).unwrap().0;
    }
}

pub fn release_stalled(dir: &std::path::Path) {
    let (lock, signal) = &RELEASED;
    lock.lock().unwrap().push(dir.to_path_buf());
    signal.notify_all();
}

fn batches(ctx: &mut Context) -> Result<Outcome, StepError> {
    let total = ctx.get(&RECORDS)? as usize;
    let input = ctx.optional_input(&FROM).map_or("none".to_string(), |o| o.hash[..8].to_string());
    let stall_after = STALL.lock().unwrap().get(&ctx.dir).copied();
    let (mut writer, kept) = ctx.records()?;
    let records: Vec<serde_json::Value> = (0..total)
        .map(|i| serde_json::json!({ "index": i, "seed": ctx.seed, "input": input, "step": ctx.step }))
        .collect();
    for (written_batches, batch) in records.chunks(2).skip(kept.len() / 2).enumerate() {
        if stall_after == Some(written_batches) {
            let (lock, signal) = &STALLED;
            lock.lock().unwrap().push(ctx.dir.clone());
            signal.notify_all();
            let (released, wake) = &RELEASED;
            let mut done = released.lock().unwrap();
            while !done.contains(&ctx.dir) {
                done = wake.wait(done).unwrap();
            }
            ctx.check_cancelled()?;
            return Err(StepError::Failed("killed".into()));
        }
        ctx.check_cancelled()?;
        writer.append(batch)?;
    }
    writer.finish()?;
    let mut metrics: crate::store::meta::Metrics = [("count".to_string(), total as f64)].into();
    // Left out without records, as a training step leaves out its loss without examples.
    if total > 0 {
        metrics.insert("mean-index".to_string(), (total - 1) as f64 / 2.0);
    }
    Ok(Outcome { metrics, gate_failure: None })
}

static MEETINGS: (Mutex<BTreeMap<String, usize>>, Condvar) = (Mutex::new(BTreeMap::new()), Condvar::new());

fn barrier(ctx: &mut Context) -> Result<Outcome, StepError> {
    let group = ctx.get(&GROUP)?;
    let parties = ctx.get(&PARTIES)? as usize;
    let (lock, signal) = &MEETINGS;
    let mut arrived = lock.lock().unwrap();
    *arrived.entry(group.clone()).or_insert(0) += 1;
    signal.notify_all();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while arrived[&group] < parties {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(StepError::Failed(format!(
                "ran alone: {} of {parties} steps of `{group}` met",
                arrived[&group]
            )));
        }
        arrived = signal.wait_timeout(arrived, left.min(Duration::from_millis(50))).unwrap().0;
        ctx.check_cancelled()?;
    }
    let (writer, _) = ctx.records()?;
    writer.finish()?;
    Ok(Outcome::default())
}
