//! Placement: a pure function from one run's demand and a snapshot of the fleet to a node, or to
//! the reasons no node fits. No I/O, no clock: everything it needs is in its arguments.
//!
//! It is a pipeline of small filters, each with a named reason, then a ranking:
//! region → runtime (a sandboxed run needs a node with gVisor) → ready → not reserved for an
//! older run → free slot → free memory; then the warm pin
//! first, then nodes that already hold the image, then the fit policy (best fit: the node left
//! with the least free memory, keeping large holes for large runs; spread: the most free
//! memory), then node id for determinism.
//!
//! # Two implementations, one answer
//! [`place`] scans a snapshot: O(nodes) per decision. It is the reference, and the engine's
//! scheduling pass uses it on a fresh snapshot.
//!
//! [`FleetIndex`] keeps the same nodes between decisions and is told about every change (node
//! registered or removed, status, a run leased or ended, a reservation, cached images). Per
//! region it sorts each node into the first filter that stops it *whatever the demand*: not
//! ready (three counters, one per status), ready but reserved for some run (a counter, plus a map
//! from run id to those nodes), ready without a free slot (a counter), or *open* (ready,
//! unreserved, a free slot). Open nodes sit in an ordered set by (free memory, id), and again in
//! one such set per image they hold. (The sets hold a per-id integer label that sorts like the
//! id, respread when two labels leave no room between them, and images are interned to small
//! integers, so the sets compare integers only.) [`FleetIndex::place`] then gives the scan's
//! answer:
//!
//! - The warm pin is looked up by id and put through the same `filter`: the scan returns it
//!   as soon as it passes, before ranking anything.
//! - Otherwise the scan ranks the passing nodes by [`rank_key`] = (image missing, policy order,
//!   id). The passing nodes are the open nodes with enough free memory, plus the nodes reserved
//!   for this very run that pass `filter` (checked one by one; there are few). Among open
//!   nodes, a holder of the image outranks every non-holder, so the best is the first fitting
//!   key of the image's set if there is one, else of the general set: for best fit the first key
//!   at or above the demand, for spread the lowest id at the largest free memory (if that is
//!   enough). Both sets are ordered by exactly the policy's (memory, id) tie-break. The best open
//!   node and the reserved candidates are compared with [`rank_key`] itself.
//! - When nothing passes, every node of the region failed the filter its class names, except the
//!   ready nodes reserved for this run, which the scan sends on to the slot and memory filters:
//!   they are taken out of the "reserved" count and filtered one by one. Every open node failed on
//!   memory alone (none fitted), so "full" is the size of the open set; nodes of other regions
//!   are the fleet size minus the region's. Counts of zero are left out, as in the scan.
//!
//! The answers are equal for fleets with unique node ids (the index is keyed by id, as the
//! engine's fleet is). `placement/index/tests.rs` checks it with property tests over random
//! fleets and random sequences of changes; `bench-placement` measures both (see
//! `docs/BENCHMARKS.md`).

mod index;

/// A node's state is the fleet's word for it, one enum shared with the wire and the API.
pub use berth_core::codes::NodeState;
pub use index::{FleetIndex, UnknownNode};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

/// What the scheduler knows about a node at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub id: String,
    pub region: String,
    pub status: NodeState,
    pub total_memory_mib: u64,
    /// Memory held by runs leased to this node.
    pub reserved_memory_mib: u64,
    /// Memory held for ready sandboxes of warmed runners (no run's yet).
    pub sandbox_memory_mib: u64,
    pub max_runs: u32,
    /// Runs leased to this node (assigned or running).
    pub runs: u32,
    /// Image references the node holds (shared, the agent reports it rarely changes).
    pub cached_images: Arc<BTreeSet<String>>,
    /// Held for the run with this id, which has waited too long (see the queue policy).
    pub reserved_for: Option<String>,
    /// The node has gVisor (`runsc`) and can take sandboxed runs.
    pub sandbox: bool,
}

impl NodeView {
    pub fn free_memory_mib(&self) -> u64 {
        self.total_memory_mib
            .saturating_sub(self.reserved_memory_mib)
            .saturating_sub(self.sandbox_memory_mib)
    }
}

/// What one run needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// The run's id (a node reserved for this run accepts it).
    pub run_id: String,
    pub region: String,
    pub memory_mib: u64,
    pub image: String,
    /// Preferred node (set by warmup) while it has room.
    pub warm_pin: Option<String>,
    /// The run is sandboxed (gVisor): only nodes with `sandbox` take it.
    pub sandbox: bool,
}

/// How to choose among the nodes that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FitPolicy {
    /// Fill nodes up: the node left with the least free memory.
    #[default]
    BestFit,
    /// Balance load: the node with the most free memory.
    Spread,
}

impl FitPolicy {
    pub fn parse(s: &str) -> Option<FitPolicy> {
        match s {
            "best-fit" => Some(FitPolicy::BestFit),
            "spread" => Some(FitPolicy::Spread),
            _ => None,
        }
    }
}

/// Why a node was passed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Filtered {
    /// in another region (not counted in explanations)
    OtherRegion,
    /// without gVisor, for a sandboxed run
    NoSandbox,
    NotReady,
    Draining,
    Lost,
    ReservedForOlderRun,
    NoFreeSlot,
    NotEnoughMemory,
}

impl Filtered {
    pub fn label(self) -> &'static str {
        match self {
            Filtered::OtherRegion => "in another region",
            Filtered::NoSandbox => "without gVisor (runsc)",
            Filtered::NotReady => "not connected",
            Filtered::Draining => "draining",
            Filtered::Lost => "lost",
            Filtered::ReservedForOlderRun => "reserved for another run",
            Filtered::NoFreeSlot => "at max concurrent runs",
            Filtered::NotEnoughMemory => "full",
        }
    }
}

/// No node fits; says why, per reason, for `pending_reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaceable {
    pub region: String,
    pub memory_mib: u64,
    pub filtered: BTreeMap<Filtered, usize>,
}

impl fmt::Display for Unplaceable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let in_region: usize = self
            .filtered
            .iter()
            .filter(|(k, _)| **k != Filtered::OtherRegion)
            .map(|(_, v)| v)
            .sum();
        if in_region == 0 {
            return write!(f, "no node in {} is registered", self.region);
        }
        let without = self
            .filtered
            .get(&Filtered::NoSandbox)
            .copied()
            .unwrap_or(0);
        if without == in_region {
            return write!(
                f,
                "no node in {} can run sandboxed runs: none of its {without} has gVisor (runsc)",
                self.region
            );
        }
        write!(
            f,
            "no node in {} with {} MiB free: ",
            self.region, self.memory_mib
        )?;
        let parts: Vec<String> = self
            .filtered
            .iter()
            .filter(|(k, _)| **k != Filtered::OtherRegion)
            .map(|(k, v)| format!("{v} {}", k.label()))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// Whether `node` can take `demand` now, or the first filter that stops it.
pub fn filter(demand: &Demand, node: &NodeView) -> Result<(), Filtered> {
    if node.region != demand.region {
        return Err(Filtered::OtherRegion);
    }
    if demand.sandbox && !node.sandbox {
        return Err(Filtered::NoSandbox);
    }
    match node.status {
        NodeState::Ready => {}
        NodeState::Draining => return Err(Filtered::Draining),
        NodeState::Disconnected => return Err(Filtered::NotReady),
        NodeState::Lost => return Err(Filtered::Lost),
    }
    if node
        .reserved_for
        .as_deref()
        .is_some_and(|r| r != demand.run_id)
    {
        return Err(Filtered::ReservedForOlderRun);
    }
    if node.runs >= node.max_runs {
        return Err(Filtered::NoFreeSlot);
    }
    if node.free_memory_mib() < demand.memory_mib {
        return Err(Filtered::NotEnoughMemory);
    }
    Ok(())
}

/// Picks the node for `demand`, or explains why none fits.
pub fn place<'a>(
    demand: &Demand,
    nodes: &'a [NodeView],
    policy: FitPolicy,
) -> Result<&'a NodeView, Unplaceable> {
    let mut filtered: BTreeMap<Filtered, usize> = BTreeMap::new();
    let mut best: Option<(RankKey<'a>, &'a NodeView)> = None;
    for node in nodes {
        if let Err(why) = filter(demand, node) {
            *filtered.entry(why).or_default() += 1;
            continue;
        }
        if demand.warm_pin.as_deref() == Some(node.id.as_str()) {
            return Ok(node);
        }
        let key = rank_key(demand, node, policy);
        if best.as_ref().is_none_or(|(k, _)| key < *k) {
            best = Some((key, node));
        }
    }
    best.map(|(_, n)| n).ok_or(Unplaceable {
        region: demand.region.clone(),
        memory_mib: demand.memory_mib,
        filtered,
    })
}

/// Lower is better: image already on the node, then the policy's memory order, then id.
type RankKey<'a> = (bool, u64, &'a str);

pub fn rank_key<'a>(demand: &Demand, node: &'a NodeView, policy: FitPolicy) -> RankKey<'a> {
    let missing_image = !node.cached_images.contains(&demand.image);
    let free = node.free_memory_mib();
    let order = match policy {
        FitPolicy::BestFit => free,
        FitPolicy::Spread => u64::MAX - free,
    };
    (missing_image, order, node.id.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(id: &str, region: &str, total: u64, reserved: u64) -> NodeView {
        NodeView {
            id: id.into(),
            region: region.into(),
            status: NodeState::Ready,
            total_memory_mib: total,
            reserved_memory_mib: reserved,
            sandbox_memory_mib: 0,
            max_runs: 8,
            runs: 0,
            cached_images: Arc::default(),
            reserved_for: None,
            sandbox: false,
        }
    }

    fn demand(region: &str, mem: u64) -> Demand {
        Demand {
            run_id: "run".into(),
            region: region.into(),
            memory_mib: mem,
            image: "img".into(),
            warm_pin: None,
            sandbox: false,
        }
    }

    const BF: FitPolicy = FitPolicy::BestFit;

    #[test]
    fn stays_in_region() {
        let nodes = [node("a", "ams", 4096, 0), node("f", "fra", 4096, 0)];
        assert_eq!(
            place(&demand("ams", 1024), &nodes, BF).map(|n| n.id.as_str()),
            Ok("a")
        );
    }

    #[test]
    fn best_fit_prefers_the_fuller_node() {
        let nodes = [node("big", "fra", 8192, 0), node("small", "fra", 2048, 0)];
        assert_eq!(
            place(&demand("fra", 1024), &nodes, BF).map(|n| n.id.as_str()),
            Ok("small")
        );
    }

    #[test]
    fn warm_pin_wins_while_it_fits() {
        let nodes = [node("a", "fra", 2048, 0), node("b", "fra", 8192, 0)];
        let mut d = demand("fra", 1024);
        d.warm_pin = Some("b".into());
        assert_eq!(place(&d, &nodes, BF).map(|n| n.id.as_str()), Ok("b"));
        let nodes = [node("a", "fra", 2048, 0), node("b", "fra", 8192, 7680)];
        assert_eq!(
            place(&d, &nodes, BF).map(|n| n.id.as_str()),
            Ok("a"),
            "pin is full"
        );
    }

    #[test]
    fn explains_why_nothing_fits() {
        let mut draining = node("d", "fra", 8192, 0);
        draining.status = NodeState::Draining;
        let nodes = [
            node("a", "fra", 4096, 4096),
            node("b", "fra", 4096, 3072),
            draining,
            node("x", "ams", 8192, 0),
        ];
        let err = place(&demand("fra", 4096), &nodes, BF)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("no node in fra with 4096 MiB free: 1 draining, 2 full")
        );
        let err = place(&demand("lon", 1), &nodes, BF)
            .err()
            .map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("no node in lon is registered"));
    }

    #[test]
    fn a_node_holding_the_image_wins_over_a_better_fit() {
        let mut cached = node("cached", "fra", 8192, 0);
        cached.cached_images = Arc::new(["img".to_string()].into_iter().collect());
        let nodes = [node("tight", "fra", 2048, 0), cached];
        assert_eq!(
            place(&demand("fra", 1024), &nodes, BF).map(|n| n.id.as_str()),
            Ok("cached")
        );
    }

    #[test]
    fn spread_prefers_the_emptiest_node() {
        let nodes = [node("big", "fra", 8192, 0), node("small", "fra", 2048, 0)];
        let chosen = place(&demand("fra", 1024), &nodes, FitPolicy::Spread).map(|n| n.id.as_str());
        assert_eq!(chosen, Ok("big"));
    }

    #[test]
    fn a_reserved_node_takes_only_its_run() {
        let mut n = node("a", "fra", 8192, 0);
        n.reserved_for = Some("old".into());
        let err = place(&demand("fra", 1), std::slice::from_ref(&n), BF)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("no node in fra with 1 MiB free: 1 reserved for another run")
        );
        let old = Demand {
            run_id: "old".into(),
            ..demand("fra", 1)
        };
        assert!(place(&old, std::slice::from_ref(&n), BF).is_ok());
    }

    #[test]
    fn a_sandboxed_run_goes_only_to_a_node_with_gvisor() {
        let mut gvisor = node("gvisor", "fra", 8192, 0);
        gvisor.sandbox = true;
        let nodes = [node("tight", "fra", 2048, 0), gvisor.clone()];
        let sandboxed = Demand {
            sandbox: true,
            ..demand("fra", 1024)
        };
        assert_eq!(
            place(&sandboxed, &nodes, BF).map(|n| n.id.as_str()),
            Ok("gvisor")
        );
        // A container run may still go to the node with gVisor (here: the better fit wins).
        assert_eq!(
            place(&demand("fra", 1024), &nodes, BF).map(|n| n.id.as_str()),
            Ok("tight")
        );
        // A pin without gVisor is passed over.
        let pinned = Demand {
            warm_pin: Some("tight".into()),
            ..sandboxed.clone()
        };
        assert_eq!(
            place(&pinned, &nodes, BF).map(|n| n.id.as_str()),
            Ok("gvisor")
        );
        // The node with gVisor is full: the reason counts the others apart.
        gvisor.reserved_memory_mib = 8192;
        let nodes = [node("tight", "fra", 2048, 0), gvisor];
        assert_eq!(
            place(&sandboxed, &nodes, BF)
                .err()
                .map(|e| e.to_string())
                .as_deref(),
            Some("no node in fra with 1024 MiB free: 1 without gVisor (runsc), 1 full")
        );
        // No node of the region has it: the reason says so.
        let nodes = [node("a", "fra", 2048, 0), node("b", "fra", 4096, 0)];
        assert_eq!(
            place(&sandboxed, &nodes, BF)
                .err()
                .map(|e| e.to_string())
                .as_deref(),
            Some("no node in fra can run sandboxed runs: none of its 2 has gVisor (runsc)")
        );
    }

    #[test]
    fn slots_are_respected() {
        let mut n = node("a", "fra", 8192, 0);
        n.max_runs = 2;
        n.runs = 2;
        assert!(place(&demand("fra", 1), &[n], BF).is_err());
    }

    fn arb_node() -> impl Strategy<Value = NodeView> {
        (
            prop::sample::select(vec!["fra", "ams"]),
            0u64..8192,
            0u64..8192,
            (0u32..4, 0u32..4),
            (0u8..5, any::<bool>()),
            any::<bool>(),
            prop::option::weighted(0.1, prop::sample::select(vec!["run", "other"])),
        )
            .prop_map(
                |(
                    region,
                    total,
                    reserved,
                    (max_runs, runs),
                    (status, sandbox),
                    has_image,
                    reserved_for,
                )| {
                    NodeView {
                        id: String::new(),
                        region: region.to_owned(),
                        status: match status {
                            0 => NodeState::Draining,
                            1 => NodeState::Disconnected,
                            2 => NodeState::Lost,
                            _ => NodeState::Ready,
                        },
                        total_memory_mib: total,
                        reserved_memory_mib: reserved.min(total),
                        sandbox_memory_mib: 0,
                        max_runs,
                        runs,
                        cached_images: Arc::new(if has_image {
                            ["img".to_string()].into_iter().collect()
                        } else {
                            BTreeSet::new()
                        }),
                        reserved_for: reserved_for.map(str::to_owned),
                        sandbox,
                    }
                },
            )
    }

    /// A fleet with unique node ids.
    fn arb_fleet(size: std::ops::Range<usize>) -> impl Strategy<Value = Vec<NodeView>> {
        prop::collection::vec(arb_node(), size).prop_map(|mut nodes| {
            for (i, n) in nodes.iter_mut().enumerate() {
                n.id = format!("n{i}");
            }
            nodes
        })
    }

    proptest! {
        /// Whatever the fleet, a placement never leaves the region, never overcommits memory or
        /// slots, never picks a node that is not ready, and never sends a sandboxed run to a
        /// node without gVisor.
        #[test]
        fn never_overcommits_or_leaves_the_region(
            nodes in arb_fleet(0..12),
            region in prop::sample::select(vec!["fra", "ams", "lon"]),
            mem in 0u64..8192,
            sandbox in any::<bool>(),
        ) {
            let d = Demand { sandbox, ..demand(region, mem) };
            match place(&d, &nodes, BF) {
                Ok(n) => {
                    prop_assert!(n.sandbox || !sandbox, "a sandboxed run on a node without gVisor");
                    prop_assert_eq!(&n.region, region);
                    prop_assert_eq!(n.status, NodeState::Ready);
                    prop_assert!(n.free_memory_mib() >= mem);
                    prop_assert!(n.runs < n.max_runs);
                }
                Err(_) => {
                    prop_assert!(nodes.iter().all(|n| filter(&d, n).is_err()));
                }
            }
        }

        /// The pin is chosen whenever it passes the filters.
        #[test]
        fn prefers_the_pin_while_it_fits(
            nodes in arb_fleet(1..12),
            pick in 0usize..12,
            mem in 0u64..4096,
        ) {
            let pin = &nodes[pick % nodes.len()];
            let d = Demand { warm_pin: Some(pin.id.clone()), ..demand(&pin.region, mem) };
            if let Ok(chosen) = place(&d, &nodes, BF) {
                if nodes.iter().any(|n| n.id == pin.id && filter(&d, n).is_ok()) {
                    prop_assert_eq!(&chosen.id, &pin.id);
                }
            }
        }

        /// Repeatedly placing runs and reserving their memory never exceeds any node's total.
        #[test]
        fn sequential_placements_never_exceed_capacity(
            mut nodes in arb_fleet(1..8),
            demands in prop::collection::vec((prop::sample::select(vec!["fra", "ams"]), 1u64..3000), 1..40),
        ) {
            for (region, mem) in demands {
                let d = demand(region, mem);
                let Ok(chosen) = place(&d, &nodes, BF).map(|n| n.id.clone()) else { continue };
                if let Some(n) = nodes.iter_mut().find(|n| n.id == chosen) {
                    n.reserved_memory_mib += mem;
                    n.runs += 1;
                    prop_assert!(n.reserved_memory_mib <= n.total_memory_mib);
                    prop_assert!(n.runs <= n.max_runs);
                }
            }
        }
    }
}
