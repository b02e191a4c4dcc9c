//! [`FleetIndex`]: the fleet kept sorted for placement, so that one decision costs a few ordered
//! set look-ups instead of a pass over every node. See the module doc of [`super`] for why its
//! answers are exactly those of [`super::place`].

use super::{filter, rank_key, Demand, Filtered, FitPolicy, NodeState, NodeView, Unplaceable};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

/// A node the index was asked to change is not in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node {id} is not in the placement index")]
pub struct UnknownNode {
    pub id: String,
}

/// Position of a node in [`FleetIndex::slots`]; stable while the node stays in the index.
type Slot = u32;

/// A number per node id that sorts like the id (see [`FleetIndex::label_between`]), so that the
/// ordered sets compare integers, not strings.
type Label = u64;

/// Order of the open sets: free memory, then node id as its label (the policies' tie-break),
/// then the slot so that the node is found without a look-up. Labels are unique, so the slot
/// never decides.
type OpenKey = (u64, Label, Slot);

/// A small number per image reference held by some node (see [`FleetIndex::images`]).
type ImageId = u32;

/// Room left after the last label (or before the first) when ids arrive in order.
const LABEL_STEP: Label = 1 << 32;

/// Which filter stops a node whatever the demand (beyond its region), or `Open` if none does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Draining,
    NotReady,
    Lost,
    /// Ready but held for some run: only the reserved-for map can tell for which.
    Reserved,
    /// Ready, not reserved, at `max_runs`.
    NoSlot,
    /// Ready, not reserved, with a free slot: passes every filter that memory does not decide.
    Open,
}

fn class(node: &NodeView) -> Class {
    match node.status {
        NodeState::Draining => Class::Draining,
        NodeState::Disconnected => Class::NotReady,
        NodeState::Lost => Class::Lost,
        NodeState::Ready if node.reserved_for.is_some() => Class::Reserved,
        NodeState::Ready if node.runs >= node.max_runs => Class::NoSlot,
        NodeState::Ready => Class::Open,
    }
}

/// One pool's nodes (a region's nodes with gVisor, or those without), by class.
#[derive(Debug, Default)]
struct RegionIndex {
    nodes: usize,
    draining: usize,
    not_ready: usize,
    lost: usize,
    /// Ready and reserved for a run (whichever).
    ready_reserved: usize,
    /// Ready, not reserved, at `max_runs`.
    no_slot: usize,
    /// Class `Open`, by free memory then id.
    open: BTreeSet<OpenKey>,
    /// Class `Open` nodes holding each image (by [`ImageId`]), same order.
    open_by_image: Vec<BTreeSet<OpenKey>>,
    /// Run id → the nodes (of any status) reserved for it. Usually empty or tiny.
    reserved_for: BTreeMap<String, BTreeSet<Slot>>,
}

/// A region's nodes in two pools: `[without gVisor, with gVisor]` (indexed by
/// `NodeView::sandbox`). A sandboxed run looks only into the second (every node of the first
/// fails its runtime filter, whatever else holds); any other run looks into both and takes the
/// better of their answers.
type Pools = [RegionIndex; 2];

/// The pools a demand may be placed in.
fn pools_for<'p>(pools: &'p Pools, demand: &Demand) -> &'p [RegionIndex] {
    if demand.sandbox {
        &pools[1..]
    } else {
        &pools[..]
    }
}

impl RegionIndex {
    fn counter(&mut self, class: Class) -> Option<&mut usize> {
        match class {
            Class::Draining => Some(&mut self.draining),
            Class::NotReady => Some(&mut self.not_ready),
            Class::Lost => Some(&mut self.lost),
            Class::Reserved => Some(&mut self.ready_reserved),
            Class::NoSlot => Some(&mut self.no_slot),
            Class::Open => None,
        }
    }
}

#[derive(Debug)]
struct Entry {
    label: Label,
    /// `view.cached_images`, interned.
    images: Vec<ImageId>,
    view: NodeView,
}

/// An interned image reference and how many nodes hold it (freed at zero).
#[derive(Debug)]
struct Image {
    name: Arc<str>,
    holders: usize,
}

/// The fleet, indexed for placement: per region, the ready unreserved nodes with a free slot in
/// an ordered set by (free memory, id), the same per image they hold, the nodes reserved for
/// each run, and a counter per filter reason. Plain data: no I/O, no clock.
///
/// [`FleetIndex::place`] returns what [`super::place`] returns on the same nodes (ids are unique
/// here, as they are in the engine), in O(log n) plus the nodes reserved for the run. A change
/// to a node costs O((1 + images it holds) · log n).
#[derive(Debug, Default)]
pub struct FleetIndex {
    slots: Vec<Option<Entry>>,
    free_slots: Vec<Slot>,
    by_id: HashMap<Arc<str>, Slot>,
    /// Every id with its label, in id order: where a new id's label comes from.
    labels: BTreeMap<Arc<str>, Label>,
    regions: BTreeMap<String, Pools>,
    image_ids: HashMap<Arc<str>, ImageId>,
    /// Indexed by [`ImageId`]; `None` for ids free to reuse (listed in `free_image_ids`).
    images: Vec<Option<Image>>,
    free_image_ids: Vec<ImageId>,
}

impl FromIterator<NodeView> for FleetIndex {
    fn from_iter<I: IntoIterator<Item = NodeView>>(nodes: I) -> Self {
        let mut index = FleetIndex::new();
        for node in nodes {
            index.upsert(node);
        }
        index
    }
}

impl FleetIndex {
    pub fn new() -> Self {
        FleetIndex::default()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&NodeView> {
        let slot = *self.by_id.get(id)?;
        self.view(slot)
    }

    /// Every node, in no particular order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeView> {
        self.slots.iter().flatten().map(|e| &e.view)
    }

    /// Adds the node, or replaces the one with its id; returns the replaced one.
    pub fn upsert(&mut self, node: NodeView) -> Option<NodeView> {
        if let Some(&slot) = self.by_id.get(node.id.as_str()) {
            let mut old = None;
            self.update_slot(slot, |n| old = Some(std::mem::replace(n, node)));
            return old;
        }
        let id: Arc<str> = Arc::from(node.id.as_str());
        let label = match self.label_between(&id) {
            Some(label) => label,
            None => {
                self.relabel();
                self.label_between(&id).unwrap_or_default()
            }
        };
        let images = self.intern(&node.cached_images);
        let entry = Entry {
            label,
            images,
            view: node,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                if let Some(s) = self.slots.get_mut(slot as usize) {
                    *s = Some(entry);
                }
                slot
            }
            None => {
                // More than u32::MAX nodes is not a fleet this scheduler will see.
                let slot = Slot::try_from(self.slots.len()).unwrap_or(Slot::MAX);
                self.slots.push(Some(entry));
                slot
            }
        };
        self.labels.insert(id.clone(), label);
        self.by_id.insert(id, slot);
        self.index(slot);
        None
    }

    /// Forgets the node; returns it.
    pub fn remove(&mut self, id: &str) -> Option<NodeView> {
        let slot = self.by_id.remove(id)?;
        self.labels.remove(id);
        self.unindex(slot);
        let entry = self.slots.get_mut(slot as usize)?.take()?;
        self.free_slots.push(slot);
        self.release_images(&entry.images);
        Some(entry.view)
    }

    pub fn set_status(&mut self, id: &str, status: NodeState) -> Result<(), UnknownNode> {
        self.update(id, |n| n.status = status)
    }

    /// A run of `memory_mib` was leased to the node: it holds the memory and a slot.
    pub fn reserve(&mut self, id: &str, memory_mib: u64) -> Result<(), UnknownNode> {
        self.update(id, |n| {
            n.reserved_memory_mib = n.reserved_memory_mib.saturating_add(memory_mib);
            n.runs = n.runs.saturating_add(1);
        })
    }

    /// A run of `memory_mib` on the node ended or lost its lease: memory and slot are free again.
    pub fn release(&mut self, id: &str, memory_mib: u64) -> Result<(), UnknownNode> {
        self.update(id, |n| {
            n.reserved_memory_mib = n.reserved_memory_mib.saturating_sub(memory_mib);
            n.runs = n.runs.saturating_sub(1);
        })
    }

    /// Holds the node for `run_id` (or stops holding it, with `None`).
    pub fn set_reserved_for(
        &mut self,
        id: &str,
        run_id: Option<String>,
    ) -> Result<(), UnknownNode> {
        self.update(id, |n| n.reserved_for = run_id)
    }

    pub fn set_cached_images(
        &mut self,
        id: &str,
        images: Arc<BTreeSet<String>>,
    ) -> Result<(), UnknownNode> {
        self.update(id, |n| n.cached_images = images)
    }

    /// Picks the node for `demand`, or explains why none fits: the same answer as
    /// [`super::place`] on [`FleetIndex::nodes`].
    pub fn place(&self, demand: &Demand, policy: FitPolicy) -> Result<&NodeView, Unplaceable> {
        if let Some(pin) = demand.warm_pin.as_deref().and_then(|id| self.get(id)) {
            if filter(demand, pin).is_ok() {
                return Ok(pin);
            }
        }
        let Some(pools) = self.regions.get(demand.region.as_str()) else {
            return Err(self.unplaceable(demand, None));
        };
        let image = self.image_ids.get(demand.image.as_str()).copied();
        let mut best: Option<&NodeView> = None;
        for region in pools_for(pools, demand) {
            for node in self.reserved_for_run(region, demand) {
                if filter(demand, node).is_ok() {
                    best = Some(better(demand, policy, best, node));
                }
            }
            // An open node holding the image outranks every open node that does not, so the
            // general set is consulted only when no holder fits.
            let open = image
                .and_then(|image| region.open_by_image.get(image as usize))
                .and_then(|holders| pick(holders, demand.memory_mib, policy))
                .or_else(|| pick(&region.open, demand.memory_mib, policy));
            if let Some(node) = open.and_then(|&(_, _, slot)| self.view(slot)) {
                best = Some(better(demand, policy, best, node));
            }
        }
        best.ok_or_else(|| self.unplaceable(demand, Some(pools)))
    }

    fn reserved_for_run<'s>(
        &'s self,
        region: &'s RegionIndex,
        demand: &Demand,
    ) -> impl Iterator<Item = &'s NodeView> + 's {
        let slots = if region.reserved_for.is_empty() {
            None
        } else {
            region.reserved_for.get(demand.run_id.as_str())
        };
        slots
            .into_iter()
            .flatten()
            .filter_map(|&slot| self.view(slot))
    }

    /// Every node failed a filter: count them per reason, as the linear scan would.
    fn unplaceable(&self, demand: &Demand, pools: Option<&Pools>) -> Unplaceable {
        let mut filtered = BTreeMap::new();
        let mut add = |why: Filtered, count: usize| {
            if count > 0 {
                *filtered.entry(why).or_default() += count;
            }
        };
        let in_region = pools.map_or(0, |p| p.iter().map(|r| r.nodes).sum());
        add(Filtered::OtherRegion, self.len().saturating_sub(in_region));
        if demand.sandbox {
            add(Filtered::NoSandbox, pools.map_or(0, |p| p[0].nodes));
        }
        for region in pools.map(|p| pools_for(p, demand)).unwrap_or_default() {
            add(Filtered::NotReady, region.not_ready);
            add(Filtered::Draining, region.draining);
            add(Filtered::Lost, region.lost);
            // A ready node reserved for this very run is not "reserved for an older run": it
            // goes on to the slot and memory filters (a node that is not ready was counted
            // under its status, as the scan would).
            let mut reserved_for_other = region.ready_reserved;
            for node in self.reserved_for_run(region, demand) {
                if node.status == NodeState::Ready {
                    reserved_for_other = reserved_for_other.saturating_sub(1);
                    if let Err(why) = filter(demand, node) {
                        add(why, 1);
                    }
                }
            }
            add(Filtered::ReservedForOlderRun, reserved_for_other);
            add(Filtered::NoFreeSlot, region.no_slot);
            // No open node fits, or `place` would have found it.
            add(Filtered::NotEnoughMemory, region.open.len());
        }
        Unplaceable {
            region: demand.region.clone(),
            memory_mib: demand.memory_mib,
            filtered,
        }
    }

    fn view(&self, slot: Slot) -> Option<&NodeView> {
        self.slots
            .get(slot as usize)
            .and_then(Option::as_ref)
            .map(|e| &e.view)
    }

    /// Changes one node in place (its id must stay), keeping the index in step.
    fn update(&mut self, id: &str, change: impl FnOnce(&mut NodeView)) -> Result<(), UnknownNode> {
        let slot = *self
            .by_id
            .get(id)
            .ok_or_else(|| UnknownNode { id: id.to_owned() })?;
        self.update_slot(slot, change);
        Ok(())
    }

    fn update_slot(&mut self, slot: Slot, change: impl FnOnce(&mut NodeView)) {
        self.unindex(slot);
        let Some(entry) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let held = entry.view.cached_images.clone();
        change(&mut entry.view);
        if !Arc::ptr_eq(&held, &entry.view.cached_images) {
            let now = entry.view.cached_images.clone();
            let images = self.intern(&now);
            if let Some(entry) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) {
                let before = std::mem::replace(&mut entry.images, images);
                self.release_images(&before);
            }
        }
        self.index(slot);
    }

    /// A label strictly between those of the ids around `id`, or `None` if they are adjacent.
    fn label_between(&self, id: &str) -> Option<Label> {
        let below = self
            .labels
            .range::<str, _>((Bound::Unbounded, Bound::Excluded(id)))
            .next_back()
            .map(|(_, l)| *l);
        let above = self
            .labels
            .range::<str, _>((Bound::Excluded(id), Bound::Unbounded))
            .next()
            .map(|(_, l)| *l);
        let (low, high) = (below.unwrap_or(0), above.unwrap_or(Label::MAX));
        let room = high.checked_sub(low).filter(|r| *r >= 2)?;
        Some(match (below, above) {
            // Ids that arrive in order leave room for many more after them, or before them.
            (Some(_), None) => low + LABEL_STEP.min(room / 2),
            (None, Some(_)) => high - LABEL_STEP.min(room / 2),
            _ => low + room / 2,
        })
    }

    /// Spreads the labels evenly again (when a new id falls between two adjacent ones).
    fn relabel(&mut self) {
        let slots: Vec<Slot> = self
            .labels
            .keys()
            .filter_map(|id| self.by_id.get(id).copied())
            .collect();
        for &slot in &slots {
            self.unindex(slot);
        }
        let spacing = Label::MAX / (slots.len() as u64 + 2);
        for (i, &slot) in slots.iter().enumerate() {
            let label = spacing * (i as u64 + 1);
            if let Some(entry) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) {
                entry.label = label;
                if let Some(l) = self.labels.get_mut(entry.view.id.as_str()) {
                    *l = label;
                }
            }
        }
        for &slot in &slots {
            self.index(slot);
        }
    }

    /// The ids of `images`, counting one more holder of each.
    fn intern(&mut self, images: &BTreeSet<String>) -> Vec<ImageId> {
        images
            .iter()
            .map(|name| {
                if let Some(&id) = self.image_ids.get(name.as_str()) {
                    if let Some(image) = self.images.get_mut(id as usize).and_then(Option::as_mut) {
                        image.holders += 1;
                    }
                    return id;
                }
                let name: Arc<str> = Arc::from(name.as_str());
                let image = Some(Image {
                    name: name.clone(),
                    holders: 1,
                });
                let id = match self.free_image_ids.pop() {
                    Some(id) => {
                        if let Some(i) = self.images.get_mut(id as usize) {
                            *i = image;
                        }
                        id
                    }
                    None => {
                        self.images.push(image);
                        ImageId::try_from(self.images.len() - 1).unwrap_or(ImageId::MAX)
                    }
                };
                self.image_ids.insert(name, id);
                id
            })
            .collect()
    }

    /// One holder fewer of each image; an image nobody holds is forgotten.
    fn release_images(&mut self, ids: &[ImageId]) {
        for &id in ids {
            let Some(slot) = self.images.get_mut(id as usize) else {
                continue;
            };
            if let Some(image) = slot.as_mut() {
                image.holders = image.holders.saturating_sub(1);
                if image.holders == 0 {
                    self.image_ids.remove(&image.name);
                    *slot = None;
                    self.free_image_ids.push(id);
                }
            }
        }
    }

    /// Adds the node in `slot` to its region's counters and sets.
    fn index(&mut self, slot: Slot) {
        let Some(entry) = self.slots.get(slot as usize).and_then(Option::as_ref) else {
            return;
        };
        let node = &entry.view;
        if !self.regions.contains_key(node.region.as_str()) {
            self.regions.insert(node.region.clone(), Pools::default());
        }
        let Some(pools) = self.regions.get_mut(node.region.as_str()) else {
            return;
        };
        let region = &mut pools[usize::from(node.sandbox)];
        region.nodes += 1;
        if let Some(run_id) = &node.reserved_for {
            region
                .reserved_for
                .entry(run_id.clone())
                .or_default()
                .insert(slot);
        }
        let class = class(node);
        if let Some(counter) = region.counter(class) {
            *counter += 1;
            return;
        }
        let key = (node.free_memory_mib(), entry.label, slot);
        for &image in &entry.images {
            let image = image as usize;
            if region.open_by_image.len() <= image {
                region.open_by_image.resize_with(image + 1, BTreeSet::new);
            }
            if let Some(holders) = region.open_by_image.get_mut(image) {
                holders.insert(key);
            }
        }
        region.open.insert(key);
    }

    /// Takes the node in `slot` out of its region's counters and sets (before it changes).
    fn unindex(&mut self, slot: Slot) {
        let Some(entry) = self.slots.get(slot as usize).and_then(Option::as_ref) else {
            return;
        };
        let node = &entry.view;
        let Some(pools) = self.regions.get_mut(node.region.as_str()) else {
            return;
        };
        let region = &mut pools[usize::from(node.sandbox)];
        region.nodes = region.nodes.saturating_sub(1);
        if let Some(run_id) = &node.reserved_for {
            if let Some(slots) = region.reserved_for.get_mut(run_id.as_str()) {
                slots.remove(&slot);
                if slots.is_empty() {
                    region.reserved_for.remove(run_id.as_str());
                }
            }
        }
        let class = class(node);
        if let Some(counter) = region.counter(class) {
            *counter = counter.saturating_sub(1);
        } else {
            let key = (node.free_memory_mib(), entry.label, slot);
            for &image in &entry.images {
                if let Some(holders) = region.open_by_image.get_mut(image as usize) {
                    holders.remove(&key);
                }
            }
            region.open.remove(&key);
        }
        if pools.iter().all(|r| r.nodes == 0) {
            self.regions.remove(node.region.as_str());
        }
    }
}

/// The first key of `set` in the policy's order among nodes with at least `memory_mib` free:
/// for best fit the least free memory that suffices, for spread the most (if it suffices); then
/// the lowest id.
fn pick(set: &BTreeSet<OpenKey>, memory_mib: u64, policy: FitPolicy) -> Option<&OpenKey> {
    let from = match policy {
        FitPolicy::BestFit => memory_mib,
        FitPolicy::Spread => {
            let &(most_free, _, _) = set.last()?;
            if most_free < memory_mib {
                return None;
            }
            most_free
        }
    };
    set.range((Bound::Included((from, 0, 0)), Bound::Unbounded))
        .next()
}

/// `candidate` if it ranks before `best` (or there is none yet), else `best`.
fn better<'n>(
    demand: &Demand,
    policy: FitPolicy,
    best: Option<&'n NodeView>,
    candidate: &'n NodeView,
) -> &'n NodeView {
    match best {
        Some(b) if rank_key(demand, b, policy) <= rank_key(demand, candidate, policy) => b,
        _ => candidate,
    }
}

#[cfg(test)]
mod tests;
