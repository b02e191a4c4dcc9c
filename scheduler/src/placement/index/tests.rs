use super::*;
use crate::placement::place;
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

fn images(names: &[&str]) -> Arc<BTreeSet<String>> {
    Arc::new(names.iter().map(|s| (*s).to_owned()).collect())
}

const BF: FitPolicy = FitPolicy::BestFit;

/// The index's answer, as ids, beside the scan's on the same nodes.
fn both(
    index: &FleetIndex,
    d: &Demand,
    policy: FitPolicy,
) -> (Result<String, Unplaceable>, Result<String, Unplaceable>) {
    let nodes: Vec<NodeView> = index.nodes().cloned().collect();
    (
        index.place(d, policy).map(|n| n.id.clone()),
        place(d, &nodes, policy).map(|n| n.id.clone()),
    )
}

/// One pool (a region's nodes with or without gVisor) as recomputed from its nodes: node count,
/// class counters (draining, not ready, lost, reserved, no slot) and the open nodes by (free
/// memory, id).
type ExpectedRegion<'a> = (usize, [usize; 5], BTreeSet<(u64, &'a str)>);

/// Recomputes every counter and set from the nodes and compares.
fn assert_consistent(index: &FleetIndex) {
    let mut expected: BTreeMap<(&str, bool), ExpectedRegion> = BTreeMap::new();
    let mut holders: BTreeMap<&str, usize> = BTreeMap::new();
    for n in index.nodes() {
        let (count, classes, open) = expected.entry((n.region.as_str(), n.sandbox)).or_default();
        *count += 1;
        match class(n) {
            Class::Draining => classes[0] += 1,
            Class::NotReady => classes[1] += 1,
            Class::Lost => classes[2] += 1,
            Class::Reserved => classes[3] += 1,
            Class::NoSlot => classes[4] += 1,
            Class::Open => {
                open.insert((n.free_memory_mib(), n.id.as_str()));
            }
        }
        for image in n.cached_images.iter() {
            *holders.entry(image.as_str()).or_default() += 1;
        }
    }
    // Interned images: exactly those some node holds, with the right holder counts.
    let interned: BTreeMap<&str, usize> = index
        .images
        .iter()
        .flatten()
        .map(|i| (&*i.name, i.holders))
        .collect();
    assert_eq!(interned, holders);
    for (name, id) in &index.image_ids {
        let image = index.images[*id as usize].as_ref().expect("live image id");
        assert_eq!(&image.name, name);
    }
    // Labels sort like ids.
    let labels: Vec<Label> = index.labels.values().copied().collect();
    assert!(labels.windows(2).all(|w| w[0] < w[1]), "{labels:?}");
    assert_eq!(index.labels.len(), index.len());
    let as_ids = |set: &BTreeSet<OpenKey>| -> Vec<(u64, String)> {
        set.iter()
            .map(|&(free, label, slot)| {
                let entry = index.slots[slot as usize].as_ref().expect("live slot");
                assert_eq!(entry.label, label);
                assert_eq!(index.labels[entry.view.id.as_str()], label);
                (free, entry.view.id.clone())
            })
            .collect()
    };
    let mut regions: Vec<&str> = expected.keys().map(|(r, _)| *r).collect();
    regions.dedup();
    assert_eq!(
        index.regions.keys().map(String::as_str).collect::<Vec<_>>(),
        regions
    );
    for (region, pools) in &index.regions {
        for (sandbox, pool) in [false, true].into_iter().zip(pools) {
            if !expected.contains_key(&(region.as_str(), sandbox)) {
                assert_eq!(pool.nodes, 0, "{region} {sandbox}");
                assert!(pool.open.is_empty() && pool.reserved_for.is_empty());
            }
        }
    }
    for (&(name, sandbox), (count, classes, open)) in &expected {
        let r = &index.regions[name][usize::from(sandbox)];
        assert_eq!(r.nodes, *count, "{name}");
        assert_eq!(
            [r.draining, r.not_ready, r.lost, r.ready_reserved, r.no_slot],
            *classes,
            "{name}"
        );
        let want: Vec<(u64, String)> = open.iter().map(|(f, id)| (*f, (*id).to_owned())).collect();
        assert_eq!(as_ids(&r.open), want, "{name}");
        for (image, set) in r.open_by_image.iter().enumerate() {
            let Some(Some(image)) = index.images.get(image) else {
                assert!(set.is_empty(), "{name}: a freed image id has holders");
                continue;
            };
            let want: Vec<(u64, String)> = want
                .iter()
                .filter(|(_, id)| {
                    index
                        .get(id)
                        .is_some_and(|n| n.cached_images.contains(&*image.name))
                })
                .cloned()
                .collect();
            assert_eq!(as_ids(set), want, "{name} {}", image.name);
        }
        for (run, slots) in &r.reserved_for {
            for slot in slots {
                let n = index.view(*slot).expect("reserved slot is live");
                assert_eq!(n.reserved_for.as_deref(), Some(run.as_str()));
            }
        }
    }
    for (id, slot) in &index.by_id {
        assert_eq!(index.view(*slot).map(|n| n.id.as_str()), Some(&**id));
    }
}

#[test]
fn answers_like_the_scan_on_the_reference_examples() {
    let mut draining = node("d", "fra", 8192, 0);
    draining.status = NodeState::Draining;
    let index: FleetIndex = [
        node("a", "fra", 4096, 4096),
        node("b", "fra", 4096, 3072),
        draining,
        node("x", "ams", 8192, 0),
    ]
    .into_iter()
    .collect();
    let err = index
        .place(&demand("fra", 4096), BF)
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("no node in fra with 4096 MiB free: 1 draining, 2 full")
    );
    let err = index
        .place(&demand("lon", 1), BF)
        .err()
        .map(|e| e.to_string());
    assert_eq!(err.as_deref(), Some("no node in lon is registered"));
    let (got, want) = both(&index, &demand("fra", 1024), BF);
    assert_eq!(got, want);
    assert_eq!(got.as_deref(), Ok("b"));
}

#[test]
fn follows_changes() {
    let mut index: FleetIndex = [node("big", "fra", 8192, 0), node("small", "fra", 2048, 0)]
        .into_iter()
        .collect();
    let d = demand("fra", 1024);
    assert_eq!(index.place(&d, BF).map(|n| n.id.as_str()), Ok("small"));
    assert_eq!(index.reserve("small", 1536), Ok(()));
    assert_eq!(index.place(&d, BF).map(|n| n.id.as_str()), Ok("big"));
    assert_eq!(index.set_cached_images("big", images(&["img"])), Ok(()));
    assert_eq!(index.release("small", 1536), Ok(()));
    assert_eq!(
        index.place(&d, BF).map(|n| n.id.as_str()),
        Ok("big"),
        "image wins"
    );
    assert_eq!(index.set_status("big", NodeState::Draining), Ok(()));
    assert_eq!(index.place(&d, BF).map(|n| n.id.as_str()), Ok("small"));
    assert_eq!(index.set_reserved_for("small", Some("old".into())), Ok(()));
    let err = index.place(&d, BF).err().map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("no node in fra with 1024 MiB free: 1 draining, 1 reserved for another run")
    );
    let old = Demand {
        run_id: "old".into(),
        ..d.clone()
    };
    assert_eq!(index.place(&old, BF).map(|n| n.id.as_str()), Ok("small"));
    assert_eq!(
        index.remove("small").map(|n| n.id),
        Some("small".to_owned())
    );
    assert_eq!(
        index.reserve("small", 1),
        Err(UnknownNode { id: "small".into() })
    );
    assert_eq!(index.len(), 1);
    assert_consistent(&index);
}

#[test]
fn sandboxed_runs_look_only_at_nodes_with_gvisor() {
    let mut gvisor = node("g", "fra", 8192, 0);
    gvisor.sandbox = true;
    let mut index: FleetIndex = [node("a", "fra", 2048, 0), gvisor, node("x", "ams", 8192, 0)]
        .into_iter()
        .collect();
    let sandboxed = Demand {
        sandbox: true,
        ..demand("fra", 1024)
    };
    let (got, want) = both(&index, &sandboxed, BF);
    assert_eq!(got, want);
    assert_eq!(got.as_deref(), Ok("g"));
    let (got, want) = both(&index, &demand("fra", 1024), BF);
    assert_eq!(got, want);
    assert_eq!(got.as_deref(), Ok("a"), "best fit across both pools");
    assert_eq!(index.reserve("g", 8000), Ok(()));
    let (got, want) = both(&index, &sandboxed, BF);
    assert_eq!(got, want);
    assert_eq!(
        got.err().map(|e| e.to_string()).as_deref(),
        Some("no node in fra with 1024 MiB free: 1 without gVisor (runsc), 1 full")
    );
    index.remove("g");
    assert_consistent(&index);
    let (got, want) = both(&index, &sandboxed, BF);
    assert_eq!(got, want);
    assert_eq!(
        got.err().map(|e| e.to_string()).as_deref(),
        Some("no node in fra can run sandboxed runs: none of its 1 has gVisor (runsc)")
    );
}

#[test]
fn spread_takes_the_lowest_id_among_the_emptiest() {
    let index: FleetIndex = [
        node("c", "fra", 8192, 0),
        node("b", "fra", 8192, 0),
        node("a", "fra", 2048, 0),
    ]
    .into_iter()
    .collect();
    let (got, want) = both(&index, &demand("fra", 1024), FitPolicy::Spread);
    assert_eq!(got, want);
    assert_eq!(got.as_deref(), Ok("b"));
}

#[test]
fn ids_that_leave_no_room_between_labels_are_relabelled() {
    // Each id sorts just below "b" and above all the earlier ones: every new label halves the
    // gap below "b", until there is none and the index spreads the labels again.
    let mut index = FleetIndex::new();
    index.upsert(node("a", "fra", 1024, 0));
    index.upsert(node("b", "fra", 1024, 0));
    let mut id = "a".to_owned();
    for i in 0..100u64 {
        id.push('\u{1}');
        index.upsert(node(&id, "fra", 1024 * (1 + i % 3), 0));
    }
    assert_consistent(&index);
    for mem in [0, 1024, 2048, 3072, 4096] {
        for policy in [FitPolicy::BestFit, FitPolicy::Spread] {
            let (got, want) = both(&index, &demand("fra", mem), policy);
            assert_eq!(got, want);
        }
    }
}

/// Ids `n0`..`n11`: the operations below pick nodes by number, some of which do not exist.
const IDS: usize = 12;
const RUNS: [&str; 3] = ["run", "other", "r2"];
const IMAGES: [&str; 3] = ["img", "alt", "big"];

/// Memory in coarse steps most of the time, so that ties on free memory are common.
fn arb_memory() -> impl Strategy<Value = u64> {
    prop_oneof![3 => (0u64..12).prop_map(|x| x * 1024), 1 => 0u64..12288]
}

fn arb_status() -> impl Strategy<Value = NodeState> {
    prop_oneof![
        4 => Just(NodeState::Ready),
        1 => Just(NodeState::Draining),
        1 => Just(NodeState::Disconnected),
        1 => Just(NodeState::Lost),
    ]
}

fn arb_images() -> impl Strategy<Value = Vec<&'static str>> {
    prop::sample::subsequence(IMAGES.to_vec(), 0..=IMAGES.len())
}

fn arb_node(id: usize) -> impl Strategy<Value = NodeView> {
    (
        prop::sample::select(vec!["fra", "ams"]),
        arb_memory(),
        arb_memory(),
        (0u32..4, 0u32..5),
        arb_status(),
        arb_images(),
        prop::option::weighted(0.15, prop::sample::select(RUNS.to_vec())),
        any::<bool>(),
    )
        .prop_map(
            move |(
                region,
                total,
                reserved,
                (max_runs, runs),
                status,
                imgs,
                reserved_for,
                sandbox,
            )| {
                NodeView {
                    id: format!("n{id}"),
                    region: region.to_owned(),
                    status,
                    total_memory_mib: total,
                    reserved_memory_mib: reserved,
                    sandbox_memory_mib: 0,
                    max_runs,
                    runs,
                    cached_images: images(&imgs),
                    reserved_for: reserved_for.map(str::to_owned),
                    sandbox,
                }
            },
        )
}

fn arb_fleet() -> impl Strategy<Value = Vec<NodeView>> {
    (0..IDS).prop_flat_map(|len| (0..len).map(arb_node).collect::<Vec<_>>())
}

#[derive(Debug, Clone)]
struct DemandSpec {
    region: &'static str,
    memory_mib: u64,
    run: &'static str,
    pin: Option<usize>,
    image: &'static str,
    policy: FitPolicy,
    sandbox: bool,
}

impl DemandSpec {
    fn demand(&self) -> Demand {
        Demand {
            run_id: self.run.to_owned(),
            region: self.region.to_owned(),
            memory_mib: self.memory_mib,
            image: self.image.to_owned(),
            warm_pin: self.pin.map(|k| format!("n{k}")),
            sandbox: self.sandbox,
        }
    }
}

fn arb_demand() -> impl Strategy<Value = DemandSpec> {
    (
        prop::sample::select(vec!["fra", "ams", "lon"]),
        arb_memory(),
        prop::sample::select(RUNS.to_vec()),
        prop::option::of(0..IDS),
        prop::sample::select(IMAGES.to_vec()),
        prop_oneof![Just(FitPolicy::BestFit), Just(FitPolicy::Spread)],
        prop::bool::weighted(0.3),
    )
        .prop_map(
            |(region, memory_mib, run, pin, image, policy, sandbox)| DemandSpec {
                region,
                memory_mib,
                run,
                pin,
                image,
                policy,
                sandbox,
            },
        )
}

#[derive(Debug, Clone)]
enum Op {
    /// Place a run and, if it fits, lease it.
    Place(DemandSpec),
    /// The `n`th leased run (modulo their number) ends.
    Finish(usize),
    SetStatus(usize, NodeState),
    ReserveFor(usize, Option<&'static str>),
    Cache(usize, Vec<&'static str>),
    Remove(usize),
    Upsert(NodeView),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => arb_demand().prop_map(Op::Place),
        3 => any::<usize>().prop_map(Op::Finish),
        1 => (0..IDS, arb_status()).prop_map(|(k, s)| Op::SetStatus(k, s)),
        1 => (0..IDS, prop::option::of(prop::sample::select(RUNS.to_vec())))
            .prop_map(|(k, r)| Op::ReserveFor(k, r)),
        1 => (0..IDS, arb_images()).prop_map(|(k, i)| Op::Cache(k, i)),
        1 => (0..IDS).prop_map(Op::Remove),
        1 => (0..IDS).prop_flat_map(arb_node).prop_map(Op::Upsert),
    ]
}

/// The scan's fleet, changed the way the index is told to change.
fn mirror_update(nodes: &mut [NodeView], id: &str, change: impl FnOnce(&mut NodeView)) -> bool {
    nodes.iter_mut().find(|n| n.id == id).map(change).is_some()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// After any sequence of changes, the index places every run exactly where the scan over
    /// the same nodes would, or fails with the same counts; and, like the scan, never leaves
    /// the region, never overcommits memory or slots, and takes the pin while it fits.
    #[test]
    fn index_answers_like_the_scan(
        fleet in arb_fleet(),
        ops in prop::collection::vec(arb_op(), 1..60),
    ) {
        let mut index: FleetIndex = fleet.iter().cloned().collect();
        let mut nodes = fleet;
        let mut leased: Vec<(String, u64)> = Vec::new();
        for op in ops {
            match op {
                Op::Place(spec) => {
                    let d = spec.demand();
                    let got = index.place(&d, spec.policy).map(|n| n.id.clone());
                    let want = place(&d, &nodes, spec.policy).map(|n| n.id.clone());
                    prop_assert_eq!(&got, &want, "{:?}", d);
                    if let Ok(id) = got {
                        let n = index.get(&id).expect("placed on a known node");
                        prop_assert_eq!(&n.region, &d.region);
                        prop_assert_eq!(n.status, NodeState::Ready);
                        prop_assert!(n.free_memory_mib() >= d.memory_mib);
                        prop_assert!(n.runs < n.max_runs);
                        let pin = d.warm_pin.as_deref().and_then(|p| index.get(p));
                        if let Some(pin) = pin.filter(|p| filter(&d, p).is_ok()) {
                            prop_assert_eq!(&pin.id, &id);
                        }
                        prop_assert_eq!(index.reserve(&id, d.memory_mib), Ok(()));
                        mirror_update(&mut nodes, &id, |n| {
                            n.reserved_memory_mib = n.reserved_memory_mib.saturating_add(d.memory_mib);
                            n.runs = n.runs.saturating_add(1);
                        });
                        leased.push((id, d.memory_mib));
                    }
                }
                Op::Finish(k) => {
                    if !leased.is_empty() {
                        let (id, mem) = leased.swap_remove(k % leased.len());
                        let known = mirror_update(&mut nodes, &id, |n| {
                            n.reserved_memory_mib = n.reserved_memory_mib.saturating_sub(mem);
                            n.runs = n.runs.saturating_sub(1);
                        });
                        prop_assert_eq!(index.release(&id, mem).is_ok(), known);
                    }
                }
                Op::SetStatus(k, status) => {
                    let id = format!("n{k}");
                    let known = mirror_update(&mut nodes, &id, |n| n.status = status);
                    prop_assert_eq!(index.set_status(&id, status).is_ok(), known);
                }
                Op::ReserveFor(k, run) => {
                    let id = format!("n{k}");
                    let run = run.map(str::to_owned);
                    let known = mirror_update(&mut nodes, &id, |n| n.reserved_for = run.clone());
                    prop_assert_eq!(index.set_reserved_for(&id, run).is_ok(), known);
                }
                Op::Cache(k, imgs) => {
                    let id = format!("n{k}");
                    let imgs = images(&imgs);
                    let known = mirror_update(&mut nodes, &id, |n| n.cached_images = imgs.clone());
                    prop_assert_eq!(index.set_cached_images(&id, imgs).is_ok(), known);
                }
                Op::Remove(k) => {
                    let id = format!("n{k}");
                    let before = nodes.len();
                    nodes.retain(|n| n.id != id);
                    prop_assert_eq!(index.remove(&id).is_some(), nodes.len() < before);
                }
                Op::Upsert(n) => {
                    let replaced = mirror_update(&mut nodes, &n.id.clone(), |old| *old = n.clone());
                    if !replaced {
                        nodes.push(n.clone());
                    }
                    prop_assert_eq!(index.upsert(n).is_some(), replaced);
                }
            }
            assert_consistent(&index);
            let mut held: Vec<&NodeView> = index.nodes().collect();
            held.sort_by(|a, b| a.id.cmp(&b.id));
            let mut want: Vec<&NodeView> = nodes.iter().collect();
            want.sort_by(|a, b| a.id.cmp(&b.id));
            prop_assert_eq!(held, want);
        }
        // A last look from every angle at the final fleet.
        for region in ["fra", "ams", "lon"] {
            for run in RUNS {
                for mem in [0, 1024, 4096, 8192] {
                    for policy in [FitPolicy::BestFit, FitPolicy::Spread] {
                        for sandbox in [false, true] {
                            let d = Demand { run_id: run.to_owned(), sandbox, ..demand(region, mem) };
                            let (got, want) = both(&index, &d, policy);
                            prop_assert_eq!(got, want);
                        }
                    }
                }
            }
        }
    }
}
