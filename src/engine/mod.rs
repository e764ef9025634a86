//! The executor: runs a [`Plan`] on tokio. Each scope's steps start as soon as the steps they
//! read have finished, so independent steps run concurrently; the blocking work of a step runs
//! on a blocking thread, bounded by the resource it needs. Every step writes into its own
//! directory of the run directory, and `summary.json` is rewritten after every step.

pub mod cache;
pub mod events;
mod summary;
pub use summary::path_from;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use cache::Decision;
use events::{Event, EventSink, Forward};
use summary::{StepSummary, Summary};

use crate::dsl::schema::{Artifact, Role, Value, ValueType};
use crate::nodes::context::{Context, Outcome, Output, StepError};
use crate::nodes::resources::Resources;
use crate::nodes::{Holds, Kind, loop_until};
use crate::plan::{Graph, Plan, PlannedStep, Source};
use crate::store as files;
use crate::store::meta::{KeyParts, Meta, StepStatus, file_identity};

/// How a run ended; the CLI maps it to an exit code.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    Ok,
    Failed(String),
    GateFailed(Vec<String>),
    Interrupted,
}

impl RunOutcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            RunOutcome::Ok => 0,
            RunOutcome::Failed(_) => 1,
            RunOutcome::GateFailed(_) => 3,
            RunOutcome::Interrupted => 130,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            RunOutcome::Ok => "ok",
            RunOutcome::Failed(_) => "failed",
            RunOutcome::GateFailed(_) => "gate-failed",
            RunOutcome::Interrupted => "interrupted",
        }
    }
}

pub struct RunOptions {
    pub run_dir: PathBuf,
    /// Reuse finished steps whose key matches and finish unfinished ones.
    pub resume: bool,
    /// Parallel sandbox workers.
    pub workers: usize,
    /// The step kinds the run may use: [`nodes::KINDS`].
    pub kinds: &'static [Kind],
}

/// What a step of a scope produced.
#[derive(Debug, Clone)]
enum Produced {
    Step(Output),
    /// A loop: each body step's output in the last iteration.
    Loop(BTreeMap<String, Output>),
    /// In a dry run: a step that would run, so its output is not known yet.
    Pending,
}

/// Why a scope stopped early.
#[derive(Debug)]
enum Stop {
    Failed(String),
    Interrupted,
}

/// Scopes run recursively (a loop runs its body's graph), so their futures are boxed.
type ScopeFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<BTreeMap<String, Produced>, Stop>> + Send>>;

/// Which graph of the plan: the top level, or the body of the loop at this top-level index.
#[derive(Debug, Clone, Copy)]
enum GraphRef {
    Top,
    Body(usize),
}

/// The scope a graph runs in.
#[derive(Clone)]
struct Scope {
    graph: GraphRef,
    /// The loop's name and the iteration, inside a loop.
    iteration: Option<(String, u32)>,
    /// Outputs of the previous iteration, for `prev.` references.
    previous: BTreeMap<String, Output>,
    /// Outputs of the top level, for references from a loop body.
    outer: Arc<BTreeMap<String, Produced>>,
    dir: PathBuf,
}

struct Engine {
    plan: Arc<Plan>,
    options: RunOptions,
    events: Arc<dyn EventSink>,
    /// Fires on Ctrl-C or SIGTERM: the run is interrupted.
    cancel: CancellationToken,
    /// Fires with `cancel`, or when a step fails: no step starts after that, and the steps
    /// running stop (their records so far kept for `--resume`), so that a failure is said at
    /// once and not after hours of another branch's work.
    halt: CancellationToken,
    sandbox: Arc<Semaphore>,
    training: Arc<Semaphore>,
    models: Mutex<BTreeMap<String, Arc<Semaphore>>>,
    /// The run's loaded models, sandbox and sandbox runtime, freed when the run ends.
    resources: Arc<Resources>,
    summary: Mutex<Summary>,
    gate_failures: Mutex<Vec<String>>,
    /// Set for `--dry-run`: the walk decides each step as a run would, runs nothing, writes
    /// nothing, and says here what it would do.
    dry: Option<Mutex<Vec<DryRunLine>>>,
}

/// Runs the plan to the end, or until a step fails or `cancel` fires.
pub async fn run(
    plan: Arc<Plan>,
    options: RunOptions,
    events: Arc<dyn EventSink>,
    cancel: CancellationToken,
) -> RunOutcome {
    if let Err(err) = std::fs::create_dir_all(&options.run_dir) {
        return RunOutcome::Failed(format!("cannot create run directory `{}`: {err}", options.run_dir.display()));
    }
    events.emit(&Event::RunStarted { workflow: plan.name.clone(), run_dir: options.run_dir.display().to_string() });
    let engine = Engine::new(plan, options, events.clone(), cancel, None);
    // From its start the directory holds a run (`running`), which `--resume` looks for.
    engine.write_summary(None);
    let result = engine.clone().run_graph(engine.top_scope()).await;
    let gate_failures = engine.gate_failures.lock().map(|g| g.clone()).unwrap_or_default();
    let outcome = match result {
        Err(Stop::Interrupted) => RunOutcome::Interrupted,
        Err(Stop::Failed(message)) => RunOutcome::Failed(message),
        Ok(_) if !gate_failures.is_empty() => RunOutcome::GateFailed(gate_failures),
        Ok(_) => RunOutcome::Ok,
    };
    engine.write_summary(Some(outcome.name()));
    events.emit(&Event::RunFinished {
        status: outcome.name().to_string(),
        exit_code: outcome.exit_code(),
        problems: vec![],
    });
    outcome
}

impl Engine {
    fn new(
        plan: Arc<Plan>,
        options: RunOptions,
        events: Arc<dyn EventSink>,
        cancel: CancellationToken,
        dry: Option<Mutex<Vec<DryRunLine>>>,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            summary: Mutex::new(Summary::new(&plan.name, &plan.file, &options.run_dir)),
            sandbox: Arc::new(Semaphore::new(options.workers.max(1))),
            training: Arc::new(Semaphore::new(1)),
            models: Mutex::new(BTreeMap::new()),
            resources: Arc::new(Resources::default()),
            gate_failures: Mutex::new(vec![]),
            plan,
            options,
            events,
            halt: cancel.child_token(),
            cancel,
            dry,
        })
    }

    fn top_scope(&self) -> Scope {
        Scope {
            graph: GraphRef::Top,
            iteration: None,
            previous: BTreeMap::new(),
            outer: Arc::new(BTreeMap::new()),
            dir: self.options.run_dir.clone(),
        }
    }

    /// In a dry run, notes what would happen to a step; says whether this is a dry run.
    fn would(&self, step: &str, iteration: Option<u32>, action: &'static str, reason: String) -> bool {
        let Some(lines) = &self.dry else { return false };
        if let Ok(mut lines) = lines.lock() {
            lines.push(DryRunLine { step: step.to_string(), iteration, action, reason });
        }
        true
    }

    fn graph(&self, graph: GraphRef) -> &Graph {
        match graph {
            GraphRef::Top => &self.plan.graph,
            // Body graphs exist for every loop the planner accepted.
            GraphRef::Body(i) => self.plan.graph.steps[i].body.as_ref().unwrap_or(&self.plan.graph),
        }
    }

    fn write_summary(&self, status: Option<&str>) {
        if self.dry.is_some() {
            return;
        }
        if let Ok(mut summary) = self.summary.lock() {
            if let Some(status) = status {
                summary.status = status.to_string();
            }
            // The summary is a report; failing to write it must not fail the run.
            let _ = files::write_json_atomic(&self.options.run_dir.join("summary.json"), &*summary);
        }
    }

    fn record(&self, scope: &Scope, step: &str, entry: StepSummary) {
        if let Ok(mut summary) = self.summary.lock() {
            summary.record(scope.iteration.as_ref().map(|(l, i)| (l.as_str(), *i)), step, entry);
        }
        self.write_summary(None);
    }

    /// Runs every step of a scope, each as soon as its dependencies are done.
    fn run_graph(self: Arc<Self>, scope: Scope) -> ScopeFuture {
        Box::pin(async move {
            let graph = self.graph(scope.graph);
            let count = graph.steps.len();
            let mut waiting: Vec<usize> = (0..count).map(|i| graph.dependencies(i).len()).collect();
            let mut started = vec![false; count];
            let mut finished = vec![false; count];
            let mut results: BTreeMap<String, Produced> = BTreeMap::new();
            let mut running = JoinSet::new();
            let mut stop: Option<Stop> = None;
            loop {
                if stop.is_none() && !self.halt.is_cancelled() {
                    // A dry run takes one step at a time, in plan order, so it reads in order.
                    let ready = graph.order.iter().copied().filter(|&i| !started[i] && waiting[i] == 0);
                    let ready: Vec<usize> = if self.dry.is_some() { ready.take(1).collect() } else { ready.collect() };
                    for i in ready {
                        started[i] = true;
                        let engine = self.clone();
                        let mut scope = scope.clone();
                        if matches!(scope.graph, GraphRef::Top) {
                            scope.outer = Arc::new(results.clone());
                        }
                        let results = results.clone();
                        running.spawn(async move {
                            let produced = engine.run_one(&scope, i, &results).await;
                            (i, produced)
                        });
                    }
                }
                let Some(joined) = running.join_next().await else {
                    break;
                };
                match joined {
                    Ok((i, Ok(produced))) => {
                        let name = graph.steps[i].name().to_string();
                        results.insert(name, produced);
                        finished[i] = true;
                        if matches!(scope.graph, GraphRef::Top) {
                            self.release_models(graph, &finished);
                        }
                        for dependent in graph.dag.neighbors(petgraph::graph::NodeIndex::new(i)) {
                            let j = graph.dag[dependent];
                            waiting[j] = waiting[j].saturating_sub(1);
                        }
                    }
                    Ok((_, Err(err))) => add_stop(&mut stop, err),
                    Err(join_error) => {
                        self.halt.cancel();
                        add_stop(&mut stop, Stop::Failed(format!("internal error: {join_error}")));
                    }
                }
            }
            if let Some(stop) = stop {
                return Err(stop);
            }
            if self.cancel.is_cancelled() || started.iter().any(|s| !s) {
                return Err(Stop::Interrupted);
            }
            Ok(results)
        })
    }

    /// Frees the models that no unfinished step of the run names (a loop names those of its
    /// body), so a workflow that moves from one model to another does not hold both.
    fn release_models(&self, graph: &Graph, finished: &[bool]) {
        let mut needed = BTreeSet::new();
        for (step, _) in graph.steps.iter().zip(finished).filter(|(_, done)| !**done) {
            let body = step.body.iter().flat_map(|body| &body.steps);
            needed.extend(std::iter::once(step).chain(body).filter_map(model_name));
        }
        for model in self.plan.models.keys().filter(|m| !needed.contains(m.as_str())) {
            self.resources.release(model);
        }
    }

    async fn run_one(
        self: Arc<Self>,
        scope: &Scope,
        index: usize,
        results: &BTreeMap<String, Produced>,
    ) -> Result<Produced, Stop> {
        let step = &self.graph(scope.graph).steps[index];
        if step.body.is_some() {
            return self.run_loop(scope, index).await;
        }
        let iteration = scope.iteration.as_ref().map(|(_, i)| *i);
        let mut inputs = BTreeMap::new();
        let mut waiting_for = vec![];
        for input in &step.inputs {
            let output = match &input.source {
                Source::Local(name) => match results.get(name) {
                    Some(Produced::Step(o)) => Some(o.clone()),
                    _ => None,
                },
                Source::Outer(name) => match scope.outer.get(name) {
                    Some(Produced::Step(o)) => Some(o.clone()),
                    _ => None,
                },
                Source::Prev(name) => scope.previous.get(name).cloned(),
                Source::InLoop { loop_name, step } => {
                    let holder = if matches!(scope.graph, GraphRef::Top) {
                        results.get(loop_name)
                    } else {
                        scope.outer.get(loop_name)
                    };
                    match holder {
                        Some(Produced::Loop(outputs)) => outputs.get(step).cloned(),
                        _ => None,
                    }
                }
            };
            match output {
                Some(o) => {
                    inputs.insert(input.property.clone(), o);
                }
                None if matches!(input.source, Source::Prev(_)) => {}
                // In a dry run, an input whose step would run first.
                None if self.dry.is_some() => waiting_for.push(format!("`{}`", input.source)),
                None => {
                    self.halt.cancel();
                    return Err(Stop::Failed(format!("`{}`: input `{}` has no output", step.name(), input.property)));
                }
            }
        }
        if !waiting_for.is_empty() {
            self.would(step.name(), iteration, "run", format!("{} will run first", waiting_for.join(", ")));
            return Ok(Produced::Pending);
        }
        let engine = self.clone();
        engine.run_step(scope, step, inputs).await
    }

    async fn run_loop(self: Arc<Self>, scope: &Scope, index: usize) -> Result<Produced, Stop> {
        let step = &self.plan.graph.steps[index];
        let name = step.name().to_string();
        // The checker gives `max-iterations` a value (its schema default when unset); at least one.
        let props = &step.declaration.props;
        let max = props.param(&loop_until::MAX_ITERATIONS).unwrap_or_default().max(1) as u32;
        let until = props.param(&loop_until::UNTIL).flatten();
        let mut previous = BTreeMap::new();
        for iteration in 1..=max {
            let body_scope = Scope {
                graph: GraphRef::Body(index),
                iteration: Some((name.clone(), iteration)),
                previous: previous.clone(),
                outer: scope.outer.clone(),
                dir: scope.dir.join(&name).join(format!("iteration-{iteration}")),
            };
            let outputs = match self.clone().run_graph(body_scope).await {
                Ok(outputs) => outputs,
                // The loop ends with its iteration, and says so (its summary said `running`).
                Err(stop) => {
                    let entry = match &stop {
                        Stop::Interrupted => StepSummary::interrupted(),
                        Stop::Failed(error) => StepSummary::failed(format!("iteration {iteration}: {error}")),
                    };
                    self.record(scope, &name, entry);
                    return Err(stop);
                }
            };
            let pending = outputs.values().any(|v| matches!(v, Produced::Pending));
            previous = outputs
                .into_iter()
                .filter_map(|(k, v)| match v {
                    Produced::Step(o) => Some((k, o)),
                    Produced::Loop(_) | Produced::Pending => None,
                })
                .collect();
            // A dry run follows a loop through the iterations on disk; after one that would run,
            // what comes next depends on results not known yet.
            if pending {
                if iteration < max {
                    let reason = format!("up to {} more iterations, until `until` holds", max - iteration);
                    self.would(&name, None, "then", reason);
                }
                break;
            }
            let stop = match &until {
                None => false,
                Some(expr) => {
                    let value_of =
                        |step: &str, metric: &str| previous.get(step).and_then(|o| o.metrics.get(metric).copied());
                    match until_holds_after(expr, iteration, &value_of) {
                        Some(holds) => holds,
                        // A dry run says what it can.
                        None if self.dry.is_some() => false,
                        // A step can leave a metric out (training on no examples has no loss); the
                        // loop goes on, as when `until` does not hold, and says why.
                        None => {
                            let missing: BTreeSet<String> = expr
                                .metrics()
                                .iter()
                                .filter_map(|m| {
                                    let step = m.step.as_deref()?;
                                    value_of(step, &m.metric)
                                        .is_none()
                                        .then(|| format!("`{step}` published no `{}`", m.metric))
                                })
                                .collect();
                            let message = format!(
                                "`until` is undecided after iteration {iteration}, so it does not hold: {}",
                                missing.into_iter().collect::<Vec<_>>().join(", ")
                            );
                            let outer = scope.iteration.as_ref().map(|(_, i)| *i);
                            self.events.emit(&Event::StepMessage { step: name.clone(), iteration: outer, message });
                            false
                        }
                    }
                }
            };
            self.events.emit(&Event::IterationFinished { step: name.clone(), iteration, stop });
            if stop {
                break;
            }
        }
        let entry = StepSummary::done(Default::default(), false);
        self.record(scope, &name, entry);
        Ok(Produced::Loop(previous))
    }

    /// Runs one step, or takes its output from an earlier run when its key matches.
    async fn run_step(
        self: Arc<Self>,
        scope: &Scope,
        step: &PlannedStep,
        inputs: BTreeMap<String, Output>,
    ) -> Result<Produced, Stop> {
        let name = step.name().to_string();
        let iteration = scope.iteration.as_ref().map(|(_, i)| *i);
        let dir = scope.dir.join(&name);
        let hashes = step
            .inputs
            .iter()
            .map(|i| (i.property.clone(), inputs.get(&i.property).map_or("none".to_string(), |o| o.hash.clone())))
            .collect();
        let parts = match key_parts(&self.plan, step, hashes) {
            Ok(parts) => parts,
            Err(e) if self.would(&name, iteration, "fail", e.clone()) => return Ok(Produced::Pending),
            Err(e) => return Err(self.fail(scope, &name, e)),
        };
        let decision =
            if self.options.resume { inspect(&dir, &parts) } else { Decision::Run(vec!["not run before".into()]) };
        if decision == Decision::Cached
            && let Some(meta) = Meta::read(&dir)
        {
            self.would(&name, iteration, "cached", "inputs and parameters unchanged".into());
            self.events.emit(&Event::StepCached { step: name.clone(), iteration, metrics: meta.metrics.clone() });
            self.note_gate(&name, iteration, meta.gate_failure.as_deref());
            self.record(scope, &name, StepSummary::done(meta.metrics.clone(), true));
            return Ok(Produced::Step(Output {
                artifact: artifact(step),
                dir,
                hash: meta.output_hash.unwrap_or_default(),
                metrics: meta.metrics,
            }));
        }
        let reason = match &decision {
            Decision::Finish => "finishing an unfinished run".to_string(),
            Decision::Run(reasons) => reasons.join("; "),
            Decision::Cached => String::new(),
        };
        if self.dry.is_some() {
            let (action, said) = match &decision {
                Decision::Finish => {
                    let kept =
                        std::fs::read_to_string(dir.join("output.jsonl.partial")).map_or(0, |t| t.lines().count());
                    ("finish", format!("an unfinished run left {kept} records, which are kept"))
                }
                _ => ("run", reason),
            };
            self.would(&name, iteration, action, said);
            return Ok(Produced::Pending);
        }
        // Spawned just before another step failed: it starts nothing.
        if self.halt.is_cancelled() {
            return Err(Stop::Interrupted);
        }
        if matches!(decision, Decision::Run(_)) && dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| self.fail(scope, &name, format!("cannot clear `{}`: {e}", dir.display())))?;
        }
        let started_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let mut meta = Meta {
            key: parts.key(),
            parts,
            status: StepStatus::Running,
            metrics: Default::default(),
            output_hash: None,
            gate_failure: None,
            error: None,
            started_at,
            finished_at: None,
            seconds: 0.0,
        };
        let write_meta = |meta: &Meta| files::write_json_atomic(&dir.join(files::META), meta);
        write_meta(&meta).map_err(|e| self.fail(scope, &name, format!("cannot write `{}`: {e}", dir.display())))?;
        self.events.emit(&Event::StepStarted { step: name.clone(), iteration, reason });
        self.record(scope, &name, StepSummary::running());

        let Some((kind, runner)) =
            self.options.kinds.iter().find(|k| k.spec.name == step.kind()).and_then(|k| Some((k, k.run?)))
        else {
            return Err(self.fail(scope, &name, format!("`{}` steps cannot run", step.kind())));
        };
        // A step waiting for a model or the sandbox while another fails stops there.
        let _permit = tokio::select! {
            permit = self.permit(kind, step) => permit,
            () = self.halt.cancelled() => {
                meta.status = StepStatus::Interrupted;
                let _ = write_meta(&meta);
                self.record(scope, &name, StepSummary::interrupted());
                return Err(Stop::Interrupted);
            }
        };
        let context = Context {
            step: name.clone(),
            iteration,
            props: step.declaration.props.clone(),
            model: model_name(step)
                .and_then(|name| Some((name.to_string(), self.plan.models.get(name)?.props.clone()))),
            seed: self.plan.seed,
            inputs,
            dir: dir.clone(),
            workers: self.options.workers,
            finish_partial: decision == Decision::Finish,
            cancel: self.halt.clone(),
            reporter: Arc::new(Forward(self.events.clone())),
            resources: self.resources.clone(),
        };
        let clock = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let mut context = context;
            runner(&mut context)
        })
        .await
        .unwrap_or_else(|e| Err(StepError::Failed(format!("internal error: {e}"))));
        meta.seconds = clock.elapsed().as_secs_f64();
        meta.finished_at = Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
        match result {
            Ok(Outcome { metrics, gate_failure }) => {
                let hash = files::hash_output(&dir)
                    .map_err(|e| self.fail(scope, &name, format!("cannot read output: {e}")))?;
                meta.status = StepStatus::Done;
                meta.metrics = metrics.clone();
                meta.output_hash = Some(hash.clone());
                meta.gate_failure = gate_failure.clone();
                write_meta(&meta)
                    .map_err(|e| self.fail(scope, &name, format!("cannot write `{}`: {e}", dir.display())))?;
                self.events.emit(&Event::StepFinished {
                    step: name.clone(),
                    iteration,
                    metrics: metrics.clone(),
                    seconds: meta.seconds,
                });
                self.note_gate(&name, iteration, gate_failure.as_deref());
                self.record(scope, &name, StepSummary::done(metrics.clone(), false));
                Ok(Produced::Step(Output { artifact: artifact(step), dir, hash, metrics }))
            }
            // A step that fails once Ctrl-C was pressed (a child process got the signal too) was
            // interrupted: `--resume` finishes it.
            Err(err) if matches!(err, StepError::Cancelled) || self.cancel.is_cancelled() => {
                meta.status = StepStatus::Interrupted;
                let _ = write_meta(&meta);
                self.record(scope, &name, StepSummary::interrupted());
                Err(Stop::Interrupted)
            }
            Err(err) => {
                meta.status = StepStatus::Failed;
                meta.error = Some(err.to_string());
                let _ = write_meta(&meta);
                Err(self.fail(scope, &name, err.to_string()))
            }
        }
    }

    fn fail(&self, scope: &Scope, step: &str, error: String) -> Stop {
        self.halt.cancel();
        let iteration = scope.iteration.as_ref().map(|(_, i)| *i);
        self.events.emit(&Event::StepFailed { step: step.to_string(), iteration, error: error.clone() });
        self.record(scope, step, StepSummary::failed(error.clone()));
        Stop::Failed(format!("step `{step}` failed: {error}"))
    }

    fn note_gate(&self, step: &str, iteration: Option<u32>, failure: Option<&str>) {
        if let Some(message) = failure {
            self.events.emit(&Event::GateFailed { step: step.to_string(), iteration, message: message.to_string() });
            // A gate in a loop may fail in several iterations: each says which.
            let at = iteration.map(|i| format!(" (iteration {i})")).unwrap_or_default();
            if let Ok(mut failures) = self.gate_failures.lock() {
                failures.push(format!("{step}{at}: {message}"));
            }
        }
    }

    /// Waits for the resource the step needs: one decode stream per model, sandbox workers up
    /// to the number of cores, training alone.
    async fn permit(&self, kind: &Kind, step: &PlannedStep) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let semaphore = match kind.holds {
            Holds::Nothing => return None,
            // An execute step runs programs on every worker, so it takes them all.
            Holds::Sandbox => {
                return self.sandbox.clone().acquire_many_owned(self.options.workers.max(1) as u32).await.ok();
            }
            Holds::Training => self.training.clone(),
            Holds::Model => {
                let model = model_name(step)?;
                let mut models = self.models.lock().ok()?;
                models.entry(model.to_string()).or_insert_with(|| Arc::new(Semaphore::new(1))).clone()
            }
        };
        semaphore.acquire_owned().await.ok()
    }
}

fn artifact(step: &PlannedStep) -> Artifact {
    match step.declaration.spec.role {
        Role::Step(artifact) => artifact,
        _ => Artifact::Tasks,
    }
}

/// What the step's directory says about running it again.
fn inspect(dir: &Path, parts: &KeyParts) -> Decision {
    let previous = Meta::read(dir);
    if previous.is_none() && dir.join(files::META).exists() {
        return Decision::Run(vec![format!("its {} cannot be read", files::META)]);
    }
    let output_hash = match &previous {
        Some(meta) if meta.status == StepStatus::Done => files::hash_output(dir).ok(),
        _ => None,
    };
    let has_partial = dir.join("output.jsonl.partial").exists();
    cache::decide(previous.as_ref(), parts, output_hash.as_deref(), has_partial)
}

/// The `model` a step names: the value of its property of type `Model`, if it has one.
fn model_name(step: &PlannedStep) -> Option<&str> {
    let declaration = &step.declaration;
    declaration.spec.properties.iter().filter(|p| p.ty == ValueType::Model).find_map(|p| {
        match declaration.props.get(p.name) {
            Some(Value::Model(name)) => Some(name.as_str()),
            _ => None,
        }
    })
}

/// The parts of a step's cache key, given the output hash of each input by property.
fn key_parts(plan: &Plan, step: &PlannedStep, inputs: BTreeMap<String, String>) -> Result<KeyParts, String> {
    let declaration = &step.declaration;
    let mut params = BTreeMap::new();
    let mut files = BTreeMap::new();
    for property in declaration.spec.properties {
        let Some(value) = declaration.props.get(property.name) else {
            continue;
        };
        if declaration.spec.unkeyed.contains(&property.name) {
            continue;
        }
        match (property.ty, value) {
            // A step's output enters through its hash.
            (_, Value::Reference(_)) => {}
            // The metric's step enters through its output hash; its name enters here.
            (ValueType::Metric, _) => {
                params.insert(property.name.to_string(), value.to_json());
            }
            (ValueType::Model, Value::Model(model)) => {
                // A model enters the key with its declaration (what can change outputs) and its
                // file's identity.
                let Some(model_declaration) = plan.models.get(model) else {
                    continue;
                };
                let unkeyed = model_declaration.spec.unkeyed;
                let settings: BTreeMap<_, _> = (model_declaration.props.0.iter())
                    .filter(|(k, _)| !unkeyed.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), keyed(plan, v)))
                    .collect();
                params.insert(property.name.to_string(), serde_json::json!({ "name": model, "settings": settings }));
                if let Some(path) = model_declaration.props.file("path") {
                    let identity =
                        file_identity(path).map_err(|e| format!("cannot read model `{}`: {e}", path.display()))?;
                    files.insert(format!("{}.path", property.name), identity);
                }
            }
            (ValueType::File | ValueType::Adapter, Value::File(path)) => {
                let identity = file_identity(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
                files.insert(property.name.to_string(), identity);
                params.insert(property.name.to_string(), keyed(plan, value));
            }
            _ => {
                params.insert(property.name.to_string(), value.to_json());
            }
        }
    }
    Ok(KeyParts { kind: declaration.spec.name.to_string(), params, inputs, files, seed: plan.seed })
}

/// A value as a key holds it: a file's path relative to the workflow's folder when it lies
/// there, so that a checkout with its run directories can move and stay cached.
fn keyed(plan: &Plan, value: &Value) -> serde_json::Value {
    match (value, plan.file.parent()) {
        (Value::File(path), Some(folder)) => match path.strip_prefix(folder) {
            Ok(relative) => serde_json::json!(relative.display().to_string()),
            Err(_) => value.to_json(),
        },
        _ => value.to_json(),
    }
}

/// One line of `--dry-run`: what would happen to a step, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct DryRunLine {
    pub step: String,
    pub iteration: Option<u32>,
    pub action: &'static str,
    pub reason: String,
}

/// Says, without running anything, what a run in `run_dir` would do with each step: the
/// executor's own walk, deciding each step as a run would. Loops are followed through the
/// iterations already on disk, as far as their results are known.
pub async fn dry_run(plan: Arc<Plan>, run_dir: &Path, resume: bool) -> Vec<DryRunLine> {
    let options = RunOptions { run_dir: run_dir.to_path_buf(), resume, workers: 1, kinds: &[] };
    let engine = Engine::new(
        plan,
        options,
        Arc::new(events::Collect::default()),
        CancellationToken::new(),
        Some(Mutex::default()),
    );
    // A dry run decides; a step it cannot decide is a line, not a stop.
    let _ = engine.clone().run_graph(engine.top_scope()).await;
    engine.dry.as_ref().and_then(|lines| lines.lock().ok().map(|l| l.clone())).unwrap_or_default()
}

/// Adds a step's stop to its scope's. Every failure is named, not the first alone: steps run
/// side by side. A step stopped because another failed is not the run's interruption.
fn add_stop(stop: &mut Option<Stop>, err: Stop) {
    match (stop, err) {
        (Some(Stop::Failed(first)), Stop::Failed(next)) => {
            first.push_str("; ");
            first.push_str(&next);
        }
        (Some(Stop::Failed(_)), Stop::Interrupted) => {}
        (stop, err) => *stop = Some(err),
    }
}

/// Evaluates a loop's `until` after `iteration`, with `metric_of(step, metric)` giving the
/// loop's step metrics.
fn until_holds_after(
    expr: &crate::dsl::expr::Expr,
    iteration: u32,
    metric_of: &dyn Fn(&str, &str) -> Option<f64>,
) -> Option<bool> {
    expr.evaluate(&|m| match &m.step {
        None => Some(f64::from(iteration)),
        Some(step) => metric_of(step, &m.metric),
    })
}

#[cfg(test)]
mod tests;
