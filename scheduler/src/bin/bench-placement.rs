#![allow(clippy::print_stdout)]
//! `bench-placement`: the placement core on a simulated fleet, one core, no I/O.
//!
//! Runs arrive one by one (mixed instance types from the built-in catalogue, a skewed choice of images,
//! some with a warm pin) and are placed with [`FleetIndex::place`]; each placement is applied to
//! the index, and earlier runs finish whenever the fleet's leased memory passes the target
//! utilisation. Nodes now and then leave service for a while or are held for a run that is about
//! to arrive, so every class of filter is exercised. Each decision is timed on its own.
//!
//! A second, shorter phase continues the same simulation with a plain `Vec<NodeView>` kept in
//! step, and times the reference [`placement::place`] on it against the index on the same
//! decisions, checking that both give the same answer.
//!
//! Deterministic for a given `--seed`. The last line of output is one JSON object.
//! `docs/BENCHMARKS.md` has the command and the figures.

use anyhow::Context;
use berth_core::model::Catalog;
use berth_scheduler::placement::{
    self, Demand, FitPolicy, FleetIndex, NodeState, NodeView, Unplaceable,
};
use clap::Parser;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(about = "Benchmark the placement index on a simulated fleet")]
struct Args {
    /// Nodes in the fleet, spread evenly over the regions.
    #[arg(long, default_value_t = 10_000)]
    nodes: u32,
    /// Runs that arrive (each one placement decision).
    #[arg(long, default_value_t = 1_000_000)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Decisions timed with the reference linear scan, after the main phase.
    #[arg(long, default_value_t = 10_000)]
    reference_runs: usize,
    /// `best-fit` or `spread`.
    #[arg(long, default_value = "best-fit")]
    policy: String,
    /// Runs finish whenever leased memory passes this share of the fleet's memory.
    #[arg(long, default_value_t = 0.8)]
    utilisation: f64,
}

const REGIONS: [&str; 3] = ["fra", "ams", "lon"];
/// Node sizes (GiB) and their slot limits.
const NODE_SIZES: [(u64, u32); 4] = [(8, 16), (16, 32), (32, 48), (64, 64)];
const IMAGES: usize = 200;
/// Images a node keeps before it evicts one.
const NODE_IMAGE_CACHE: usize = 8;
const WARM_PIN_SHARE: f64 = 0.15;
/// Every this many runs one node leaves service (draining or disconnected) ...
const OUTAGE_EVERY: usize = 1_000;
/// ... for this many runs.
const OUTAGE_RUNS: usize = 10_000;
/// Every this many runs one node is held for the run arriving `HOLD_AHEAD` runs later.
const HOLD_EVERY: usize = 2_000;
const HOLD_AHEAD: usize = 100;

/// xorshift64*: small, fast and good enough to draw a workload.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that small seeds and zero give a good state.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        // The modulo bias is irrelevant at these sizes.
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An image index, popular ones (low indices) far more often.
    fn image(&mut self) -> usize {
        let u = self.unit();
        ((u * u * u) * IMAGES as f64) as usize
    }

    /// One of `sizes` (ascending): each half as likely as the one below it.
    fn memory_mib(&mut self, sizes: &[u64]) -> u64 {
        let total: u64 = (0..sizes.len()).map(|i| 1u64 << i).sum();
        let mut pick = self.next() % total.max(1);
        for (i, size) in sizes.iter().enumerate() {
            let weight = 1u64 << (sizes.len() - 1 - i);
            if pick < weight {
                return *size;
            }
            pick -= weight;
        }
        sizes.first().copied().unwrap_or(1024)
    }
}

#[derive(Debug, Default)]
struct Tally {
    placed: u64,
    unplaceable: u64,
    warm_pin_taken: u64,
    image_cached: u64,
    /// Index and reference disagreed (phase two only; must stay 0).
    mismatches: u64,
}

/// The simulated fleet and its workload. Every change goes to the index and, in phase two, to
/// the reference's `Vec<NodeView>` (indexed like `ids`).
struct Sim {
    rng: Rng,
    index: FleetIndex,
    mirror: Option<Vec<NodeView>>,
    ids: Vec<String>,
    by_id: HashMap<String, u32>,
    image_names: Vec<String>,
    /// Memory of each instance type of the built-in catalogue, ascending.
    memory_sizes: Vec<u64>,
    /// The node that last ran each image: a runner warmed there is pinned to it.
    image_home: Vec<Option<u32>>,
    /// Leased runs: node and memory.
    active: Vec<(u32, u64)>,
    used_mib: u64,
    target_mib: u64,
    /// Nodes out of service, with the run index at which they return.
    outages: VecDeque<(usize, u32)>,
    /// Nodes held for a run, with the run index after which the hold is lifted.
    holds: VecDeque<(usize, u32)>,
    /// Reused for every arrival, so that drawing a demand does not allocate.
    demand: Demand,
    tally: Tally,
}

impl Sim {
    fn new(args: &Args) -> Sim {
        let mut rng = Rng::new(args.seed);
        let image_names: Vec<String> = (0..IMAGES)
            .map(|k| format!("registry.example/team-{}/app-{k}:v{}", k % 17, k % 5))
            .collect();
        let mut memory_sizes: Vec<u64> = Catalog::default()
            .instance_types
            .iter()
            .map(|t| t.memory_mib)
            .collect();
        memory_sizes.sort_unstable();
        let mut index = FleetIndex::new();
        let mut ids = Vec::new();
        let mut by_id = HashMap::new();
        let mut total_mib = 0;
        for i in 0..args.nodes {
            let (gib, max_runs) = NODE_SIZES[rng.below(NODE_SIZES.len())];
            let id = format!("node-{i:05}");
            let cached: BTreeSet<String> = (0..rng.below(5))
                .map(|_| image_names[rng.image()].clone())
                .collect();
            total_mib += gib * 1024;
            index.upsert(NodeView {
                id: id.clone(),
                region: REGIONS[i as usize % REGIONS.len()].to_owned(),
                status: NodeState::Ready,
                total_memory_mib: gib * 1024,
                reserved_memory_mib: 0,
                sandbox_memory_mib: 0,
                max_runs,
                runs: 0,
                cached_images: Arc::new(cached),
                reserved_for: None,
                sandbox: false,
            });
            by_id.insert(id.clone(), i);
            ids.push(id);
        }
        Sim {
            rng,
            index,
            mirror: None,
            ids,
            by_id,
            image_names,
            memory_sizes,
            image_home: vec![None; IMAGES],
            active: Vec::new(),
            used_mib: 0,
            target_mib: (total_mib as f64 * args.utilisation) as u64,
            outages: VecDeque::new(),
            holds: VecDeque::new(),
            demand: Demand {
                run_id: String::new(),
                region: String::new(),
                memory_mib: 0,
                image: String::new(),
                warm_pin: None,
                sandbox: false,
            },
            tally: Tally::default(),
        }
    }

    fn mirror_node(&mut self, node: u32) -> Option<&mut NodeView> {
        self.mirror.as_mut()?.get_mut(node as usize)
    }

    fn set_status(&mut self, node: u32, status: NodeState) -> anyhow::Result<()> {
        self.index.set_status(&self.ids[node as usize], status)?;
        if let Some(n) = self.mirror_node(node) {
            n.status = status;
        }
        Ok(())
    }

    fn set_reserved_for(&mut self, node: u32, run_id: Option<String>) -> anyhow::Result<()> {
        if let Some(n) = self.mirror_node(node) {
            n.reserved_for.clone_from(&run_id);
        }
        self.index
            .set_reserved_for(&self.ids[node as usize], run_id)?;
        Ok(())
    }

    fn lease(&mut self, node: u32, memory_mib: u64) -> anyhow::Result<()> {
        self.index.reserve(&self.ids[node as usize], memory_mib)?;
        if let Some(n) = self.mirror_node(node) {
            n.reserved_memory_mib += memory_mib;
            n.runs += 1;
        }
        self.active.push((node, memory_mib));
        self.used_mib += memory_mib;
        Ok(())
    }

    /// A random leased run ends.
    fn finish_one(&mut self) -> anyhow::Result<()> {
        if self.active.is_empty() {
            return Ok(());
        }
        let (node, memory_mib) = self.active.swap_remove(self.rng.below(self.active.len()));
        self.index.release(&self.ids[node as usize], memory_mib)?;
        if let Some(n) = self.mirror_node(node) {
            n.reserved_memory_mib -= memory_mib;
            n.runs -= 1;
        }
        self.used_mib -= memory_mib;
        Ok(())
    }

    /// The node pulled `image` to start a run: it now holds it (evicting one if its cache is full).
    fn pull(&mut self, node: u32, image: usize) -> anyhow::Result<()> {
        let id = &self.ids[node as usize];
        let held = self
            .index
            .get(id)
            .with_context(|| format!("{id} left the index"))?
            .cached_images
            .clone();
        if held.contains(&self.image_names[image]) {
            return Ok(());
        }
        let mut images = (*held).clone();
        if images.len() >= NODE_IMAGE_CACHE {
            let evict = images.iter().nth(self.rng.below(images.len())).cloned();
            if let Some(evict) = evict {
                images.remove(&evict);
            }
        }
        images.insert(self.image_names[image].clone());
        let images = Arc::new(images);
        if let Some(n) = self.mirror_node(node) {
            n.cached_images = images.clone();
        }
        self.index
            .set_cached_images(&self.ids[node as usize], images)?;
        Ok(())
    }

    /// Outages and holds that start or end before run `i` arrives.
    fn churn(&mut self, i: usize) -> anyhow::Result<()> {
        while self.outages.front().is_some_and(|(due, _)| *due <= i) {
            if let Some((_, node)) = self.outages.pop_front() {
                self.set_status(node, NodeState::Ready)?;
            }
        }
        while self.holds.front().is_some_and(|(due, _)| *due <= i) {
            if let Some((_, node)) = self.holds.pop_front() {
                self.set_reserved_for(node, None)?;
            }
        }
        let is_free = |sim: &Sim, node: u32| {
            sim.index
                .get(&sim.ids[node as usize])
                .is_some_and(|n| n.status == NodeState::Ready && n.reserved_for.is_none())
        };
        if i.checked_rem(OUTAGE_EVERY) == Some(0) {
            let node = self.rng.below(self.ids.len()) as u32;
            if is_free(self, node) {
                let status = if self.rng.below(2) == 0 {
                    NodeState::Draining
                } else {
                    NodeState::Disconnected
                };
                self.set_status(node, status)?;
                self.outages.push_back((i + OUTAGE_RUNS, node));
            }
        }
        if i.checked_rem(HOLD_EVERY) == Some(0) {
            let node = self.rng.below(self.ids.len()) as u32;
            if is_free(self, node) {
                self.set_reserved_for(node, Some(format!("run-{}", i + HOLD_AHEAD)))?;
                self.holds.push_back((i + HOLD_AHEAD + 1, node));
            }
        }
        Ok(())
    }

    /// Draws run `i` into `self.demand`; returns its image.
    fn arrive(&mut self, i: usize) -> usize {
        use std::fmt::Write;
        let image = self.rng.image();
        let d = &mut self.demand;
        d.run_id.clear();
        let _ = write!(d.run_id, "run-{i}");
        d.region.clear();
        d.region.push_str(REGIONS[self.rng.below(REGIONS.len())]);
        d.memory_mib = self.rng.memory_mib(&self.memory_sizes);
        d.image.clone_from(&self.image_names[image]);
        d.warm_pin = None;
        if self.rng.unit() < WARM_PIN_SHARE {
            if let Some(home) = self.image_home[image] {
                d.warm_pin = Some(self.ids[home as usize].clone());
            }
        }
        image
    }

    /// Applies the outcome of a decision: lease, pull, remember the image's home.
    fn settle(&mut self, chosen: Option<u32>, image: usize) -> anyhow::Result<()> {
        let Some(node) = chosen else {
            self.tally.unplaceable += 1;
            return Ok(());
        };
        self.tally.placed += 1;
        let id = &self.ids[node as usize];
        if self.demand.warm_pin.as_deref() == Some(id.as_str()) {
            self.tally.warm_pin_taken += 1;
        }
        if self
            .index
            .get(id)
            .is_some_and(|n| n.cached_images.contains(&self.demand.image))
        {
            self.tally.image_cached += 1;
        }
        self.lease(node, self.demand.memory_mib)?;
        self.pull(node, image)?;
        self.image_home[image] = Some(node);
        Ok(())
    }

    /// Everything before the decision for run `i`.
    fn prepare(&mut self, i: usize) -> anyhow::Result<usize> {
        self.churn(i)?;
        while self.used_mib > self.target_mib {
            self.finish_one()?;
        }
        Ok(self.arrive(i))
    }

    fn node_of(&self, placed: Result<&NodeView, Unplaceable>) -> Option<u32> {
        placed
            .ok()
            .and_then(|n| self.by_id.get(n.id.as_str()).copied())
    }
}

/// Latencies in nanoseconds, sorted on demand.
struct Latencies(Vec<u64>);

impl Latencies {
    fn record(&mut self, d: Duration) {
        self.0.push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Nearest-rank percentile, in microseconds; the samples must be sorted.
    fn percentile_us(&self, q: f64) -> f64 {
        let n = self.0.len();
        if n == 0 {
            return 0.0;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.0[rank - 1] as f64 / 1000.0
    }

    fn sort(&mut self) {
        self.0.sort_unstable();
    }

    fn total(&self) -> Duration {
        Duration::from_nanos(self.0.iter().sum())
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let policy = FitPolicy::parse(&args.policy)
        .with_context(|| format!("--policy must be best-fit or spread, not {}", args.policy))?;
    anyhow::ensure!(args.nodes > 0, "--nodes must be at least 1");

    let built = Instant::now();
    let mut sim = Sim::new(&args);
    println!(
        "fleet: {} nodes in {} regions, built in {:.0} ms; {} runs, policy {}, seed {}",
        args.nodes,
        REGIONS.len(),
        built.elapsed().as_secs_f64() * 1e3,
        args.runs,
        args.policy,
        args.seed
    );

    // Phase one: the index alone.
    let mut latencies = Latencies(Vec::with_capacity(args.runs));
    let started = Instant::now();
    for i in 0..args.runs {
        let image = sim.prepare(i)?;
        let t = Instant::now();
        let placed = sim.index.place(&sim.demand, policy);
        latencies.record(t.elapsed());
        let chosen = sim.node_of(placed);
        sim.settle(chosen, image)?;
    }
    let wall = started.elapsed();
    let utilisation = sim.used_mib as f64 / (sim.target_mib as f64 / args.utilisation);
    let main_tally = std::mem::take(&mut sim.tally);
    latencies.sort();
    let in_place = latencies.total();
    let placements_per_sec = args.runs as f64 / in_place.as_secs_f64();
    let loop_runs_per_sec = args.runs as f64 / wall.as_secs_f64();
    let (p50, p99, p999) = (
        latencies.percentile_us(0.50),
        latencies.percentile_us(0.99),
        latencies.percentile_us(0.999),
    );
    let max = latencies.percentile_us(1.0);
    println!(
        "index: {} decisions ({} placed, {} unplaceable, {} on the warm pin, {} on a node \
         holding the image), {} runs leased at the end, memory {:.1}% leased",
        args.runs,
        main_tally.placed,
        main_tally.unplaceable,
        main_tally.warm_pin_taken,
        main_tally.image_cached,
        sim.active.len(),
        utilisation * 100.0
    );
    println!(
        "index: {:.0} decisions/s inside FleetIndex::place ({:.3} s), {:.0} runs/s for the \
         whole simulated loop ({:.3} s)",
        placements_per_sec,
        in_place.as_secs_f64(),
        loop_runs_per_sec,
        wall.as_secs_f64()
    );
    println!(
        "index latency: p50 {p50:.3} µs, p99 {p99:.3} µs, p99.9 {p999:.3} µs, max {max:.3} µs"
    );

    // Phase two: the same simulation continues, the reference scan beside the index.
    sim.mirror = Some(sim.index.nodes().cloned().collect());
    if let Some(mirror) = sim.mirror.as_mut() {
        mirror.sort_by(|a, b| a.id.cmp(&b.id));
    }
    let mut reference = Latencies(Vec::with_capacity(args.reference_runs));
    let mut beside = Latencies(Vec::with_capacity(args.reference_runs));
    for i in args.runs..args.runs + args.reference_runs {
        let image = sim.prepare(i)?;
        let mirror = sim.mirror.as_deref().unwrap_or_default();
        let t = Instant::now();
        let scanned = placement::place(&sim.demand, mirror, policy);
        reference.record(t.elapsed());
        let t = Instant::now();
        let indexed = sim.index.place(&sim.demand, policy);
        beside.record(t.elapsed());
        let same = match (&scanned, &indexed) {
            (Ok(a), Ok(b)) => a.id == b.id,
            (Err(a), Err(b)) => a == b,
            _ => false,
        };
        if !same {
            sim.tally.mismatches += 1;
        }
        let chosen = sim.node_of(indexed);
        sim.settle(chosen, image)?;
    }
    reference.sort();
    beside.sort();
    let reference_per_sec = args.reference_runs as f64 / reference.total().as_secs_f64();
    println!(
        "reference scan on {} decisions: p50 {:.3} µs, p99 {:.3} µs, {:.0} decisions/s; \
         index on the same decisions: p50 {:.3} µs, p99 {:.3} µs; {} disagreements",
        args.reference_runs,
        reference.percentile_us(0.50),
        reference.percentile_us(0.99),
        reference_per_sec,
        beside.percentile_us(0.50),
        beside.percentile_us(0.99),
        sim.tally.mismatches
    );
    let goal_met = placements_per_sec >= 500_000.0 && p99 <= 20.0;
    let report = serde_json::json!({
        "benchmark": "placement",
        "cpu": cpu_model(),
        "policy": args.policy,
        "seed": args.seed,
        "nodes": args.nodes,
        "regions": REGIONS.len(),
        "runs": args.runs,
        "placed": main_tally.placed,
        "unplaceable": main_tally.unplaceable,
        "warm_pin_taken": main_tally.warm_pin_taken,
        "image_cached": main_tally.image_cached,
        "placements_per_sec": placements_per_sec.round(),
        "loop_runs_per_sec": loop_runs_per_sec.round(),
        "p50_us": round(p50, 3),
        "p99_us": round(p99, 3),
        "p999_us": round(p999, 3),
        "max_us": round(max, 3),
        "reference_runs": args.reference_runs,
        "reference_p50_us": round(reference.percentile_us(0.50), 3),
        "reference_p99_us": round(reference.percentile_us(0.99), 3),
        "reference_per_sec": reference_per_sec.round(),
        "index_p99_us_same_decisions": round(beside.percentile_us(0.99), 3),
        "mismatches": sim.tally.mismatches,
        "goal_met": goal_met,
    });
    println!("{report}");
    anyhow::ensure!(
        sim.tally.mismatches == 0,
        "the index disagreed with the reference {} times",
        sim.tally.mismatches
    );
    Ok(())
}
