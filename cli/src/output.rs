//! Human output: aligned tables for lists, `key: value` blocks for one record. Both take the
//! API's JSON, so a field the API renames shows up as `-` rather than breaking the CLI.

use serde_json::Value;

/// Columns separated by two spaces, each as wide as its widest cell; no trailing spaces.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: vec![],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().take(columns).enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map_or("", String::as_str);
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                let pad = width.saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// One JSON value as a cell: `-` for null or missing, lists joined with `, `.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.replace(['\n', '\r', '\t'], " "),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_owned(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) if a.is_empty() => "-".to_owned(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(", "),
        Value::Object(_) => v.to_string(),
    }
}

/// `key: value` lines for one record: `order` first, then any field the API added since, keys
/// aligned. Fields the record lacks are left out.
pub fn detail(record: &Value, order: &[&str]) -> String {
    let Some(fields) = record.as_object() else {
        return format!("{}\n", cell(record));
    };
    let mut keys: Vec<&str> = order
        .iter()
        .copied()
        .filter(|k| fields.contains_key(*k))
        .collect();
    let mut rest: Vec<&str> = fields
        .keys()
        .map(String::as_str)
        .filter(|k| !order.contains(k))
        .collect();
    rest.sort_unstable();
    keys.extend(rest);
    let width = keys.iter().map(|k| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for k in keys {
        let value = match k {
            "env_variables" => env_cell(&record[k]),
            "image_pull" => pull_summary(&record[k]).unwrap_or_else(|| cell(&record[k])),
            _ => cell(&record[k]),
        };
        out.push_str(&format!("{:width$}  {value}\n", format!("{k}:")));
    }
    out
}

/// A run's `image_pull` for people: `12.3/40.0 MiB (2/5 layers)`.
pub fn pull_summary(pull: &Value) -> Option<String> {
    let done = pull["bytes_done"].as_u64()?;
    let total = pull["bytes_total"].as_u64()?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Some(format!(
        "{:.1}/{:.1} MiB ({}/{} layers)",
        mib(done),
        mib(total),
        pull["layers_done"].as_u64().unwrap_or(0),
        pull["layers_total"].as_u64().unwrap_or(0)
    ))
}

fn env_cell(v: &Value) -> String {
    let vars: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| format!("{}={}", cell(&e["env_key"]), cell(&e["env_val"])))
        .collect();
    if vars.is_empty() {
        "-".to_owned()
    } else {
        vars.join(" ")
    }
}

fn items<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v[key].as_array().into_iter().flatten()
}

/// `image_name:image_tag`, or `name@sha256:…` for a digest.
pub fn image(r: &Value) -> String {
    let name = cell(&r["image_name"]);
    match r["image_tag"].as_str() {
        Some(t) if t.starts_with("sha256:") => format!("{name}@{t}"),
        Some(t) if !t.is_empty() => format!("{name}:{t}"),
        _ => name,
    }
}

/// The command a runner or run executes: its shell command, else its argv.
fn command(r: &Value, shell_field: &str) -> String {
    match (&r[shell_field], &r["argv"]) {
        (Value::String(s), _) if !s.is_empty() => s.clone(),
        (_, Value::Array(a)) if !a.is_empty() => cell(&r["argv"]).replace(", ", " "),
        _ => "-".to_owned(),
    }
}

pub const RUNNER_FIELDS: &[&str] = &[
    "id",
    "name",
    "image_name",
    "image_tag",
    "run_command",
    "argv",
    "entrypoint",
    "timeout_seconds",
    "region",
    "instance_type",
    "env_variables",
    "container_registry_id",
    "max_concurrent_runs",
    "retry_policy",
    "notify_url",
    "notify_secret_set",
    "isolation",
    "warmup_status",
    "warm_node_id",
    "warmed_at",
    "warmup_error",
    "created_at",
    "updated_at",
];

pub const RUN_FIELDS: &[&str] = &[
    "id",
    "runner_id",
    "status",
    "exit_code",
    "error_code",
    "error_message",
    "pending_reason",
    "queue_position",
    "command",
    "argv",
    "entrypoint",
    "image",
    "image_digest",
    "image_pull",
    "node_id",
    "region",
    "instance_type",
    "timeout_seconds",
    "created_at",
    "started_at",
    "completed_at",
    "duration_seconds",
    "attempt",
    "previous_attempt_id",
    "next_attempt_id",
    "retry_cause",
    "retry_at",
    "final_attempt",
    "ephemeral",
    "notification",
    "isolation",
    "runtime",
];

pub const SCHEDULE_FIELDS: &[&str] = &[
    "id",
    "runner_id",
    "cron",
    "timezone",
    "paused",
    "next_fire_at",
    "overlap",
    "catch_up",
    "jitter_seconds",
    "run",
    "fired",
    "skipped",
    "last_fire_at",
    "last_run_id",
    "last_skip_reason",
    "created_at",
    "updated_at",
];

/// `GET /v1/runners/{id}/schedules` as a table.
pub fn schedules_table(v: &Value) -> String {
    let mut t = Table::new(&[
        "ID",
        "CRON",
        "TIMEZONE",
        "PAUSED",
        "NEXT FIRE",
        "OVERLAP",
        "FIRED",
        "SKIPPED",
    ]);
    for s in items(v, "schedules") {
        t.row(vec![
            cell(&s["id"]),
            cell(&s["cron"]),
            cell(&s["timezone"]),
            cell(&s["paused"]),
            cell(&s["next_fire_at"]),
            cell(&s["overlap"]),
            cell(&s["fired"]),
            cell(&s["skipped"]),
        ]);
    }
    t.render()
}

pub const NODE_FIELDS: &[&str] = &[
    "id",
    "region",
    "status",
    "draining",
    "total_memory_mib",
    "free_memory_mib",
    "cpus",
    "max_concurrent_runs",
    "running_runs",
    "cached_images",
    "runtimes",
    "last_heartbeat_age_seconds",
];

/// What `nodes remove` did, from the node as it was last seen (`{"node": …}`).
pub fn removed_node(v: &Value) -> String {
    let n = &v["node"];
    let mut text = format!(
        "removed node {} ({}, region {}): its credentials are revoked and it is no longer \
         listed; it can join again only by enrolling with a new registration token\n",
        cell(&n["id"]),
        cell(&n["status"]),
        cell(&n["region"]),
    );
    let runs: Vec<&str> = n["running_runs"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !runs.is_empty() {
        text.push_str(&format!(
            "{} taken back (not started: queued again; started: ended node_lost):\n",
            if runs.len() == 1 {
                "its run was".to_owned()
            } else {
                format!("its {} runs were", runs.len())
            }
        ));
        for run in runs {
            text.push_str(&format!("  {run}\n"));
        }
    }
    text
}

pub const REGISTRY_FIELDS: &[&str] = &["id", "name", "host", "username", "created_at"];

pub fn runners_table(v: &Value) -> String {
    let mut t = Table::new(&[
        "ID", "NAME", "IMAGE", "COMMAND", "REGION", "TYPE", "TIMEOUT", "WARMUP",
    ]);
    for r in items(v, "runners") {
        t.row(vec![
            cell(&r["id"]),
            cell(&r["name"]),
            image(r),
            command(r, "run_command"),
            cell(&r["region"]),
            cell(&r["instance_type"]),
            format!("{}s", cell(&r["timeout_seconds"])),
            cell(&r["warmup_status"]),
        ]);
    }
    t.render()
}

pub fn runs_table(v: &Value) -> String {
    let mut t = Table::new(&[
        "ID", "STATUS", "EXIT", "NODE", "CREATED", "DURATION", "REASON",
    ]);
    for r in items(v, "runs") {
        let reason = match r["status"].as_str() {
            Some("pending") => cell(&r["pending_reason"]),
            _ => cell(&r["error_code"]),
        };
        let duration = match &r["duration_seconds"] {
            Value::Null => "-".to_owned(),
            d => format!("{}s", cell(d)),
        };
        t.row(vec![
            cell(&r["id"]),
            cell(&r["status"]),
            cell(&r["exit_code"]),
            cell(&r["node_id"]),
            cell(&r["created_at"]),
            duration,
            reason,
        ]);
    }
    t.render()
}

/// Runs that have not ended, across runners: the queue first (by region and position), then
/// what runs.
pub fn active_runs_table(v: &Value) -> String {
    let mut t = Table::new(&[
        "ID", "RUNNER", "REGION", "STATUS", "POSITION", "NODE", "CREATED", "REASON",
    ]);
    let mut runs: Vec<&Value> = items(v, "runs").collect();
    runs.sort_by_key(|r| {
        (
            r["status"].as_str() != Some("pending"),
            r["region"].as_str().unwrap_or_default().to_owned(),
            r["queue_position"].as_u64().unwrap_or(u64::MAX),
        )
    });
    for r in runs {
        t.row(vec![
            cell(&r["id"]),
            cell(&r["runner_id"]),
            cell(&r["region"]),
            cell(&r["status"]),
            cell(&r["queue_position"]),
            cell(&r["node_id"]),
            cell(&r["created_at"]),
            cell(&r["pending_reason"]),
        ]);
    }
    t.render()
}

pub fn nodes_table(v: &Value) -> String {
    let mut t = Table::new(&[
        "ID",
        "REGION",
        "STATUS",
        "DRAINING",
        "FREE/TOTAL MiB",
        "CPUS",
        "RUNS",
        "RUNTIMES",
        "HEARTBEAT",
    ]);
    for n in items(v, "nodes") {
        let runtimes = n["runtimes"].as_array().map_or("-".to_owned(), |r| {
            r.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        });
        let runs = n["running_runs"].as_array().map_or(0, Vec::len);
        let heartbeat = n["last_heartbeat_age_seconds"]
            .as_f64()
            .map_or("-".to_owned(), |s| format!("{s:.1}s ago"));
        t.row(vec![
            cell(&n["id"]),
            cell(&n["region"]),
            cell(&n["status"]),
            cell(&n["draining"]),
            format!(
                "{}/{}",
                cell(&n["free_memory_mib"]),
                cell(&n["total_memory_mib"])
            ),
            cell(&n["cpus"]),
            format!("{runs}/{}", cell(&n["max_concurrent_runs"])),
            runtimes,
            heartbeat,
        ]);
    }
    t.render()
}

pub fn registries_table(v: &Value) -> String {
    let mut t = Table::new(&["ID", "NAME", "HOST", "USERNAME", "CREATED"]);
    for r in items(v, "container_registries") {
        t.row(REGISTRY_FIELDS.iter().map(|f| cell(&r[*f])).collect());
    }
    t.render()
}

pub fn instance_types_table(v: &Value) -> String {
    let mut t = Table::new(&["SLUG", "CPUS", "MEMORY MiB", "USD/SECOND"]);
    for it in items(v, "instance_types") {
        let cpus = it["cpu_millis"]
            .as_f64()
            .map_or("-".to_owned(), |m| format!("{}", m / 1000.0));
        t.row(vec![
            cell(&it["slug"]),
            cpus,
            cell(&it["memory_mib"]),
            it["price_per_second_usd"]
                .as_f64()
                .map_or("-".to_owned(), |p| format!("{p:.6}")),
        ]);
    }
    t.render()
}

pub fn usage_table(v: &Value) -> String {
    let mut t = Table::new(&["KEY", "RUNS", "BILLED SECONDS", "COST USD"]);
    let usd = |c: &Value| c.as_f64().map_or("-".to_owned(), |c| format!("{c:.6}"));
    for u in items(v, "usage") {
        t.row(vec![
            cell(&u["key"]),
            cell(&u["runs"]),
            cell(&u["billed_seconds"]),
            usd(&u["cost_usd"]),
        ]);
    }
    let total = &v["total"];
    t.row(vec![
        "TOTAL".to_owned(),
        String::new(),
        cell(&total["billed_seconds"]),
        usd(&total["cost_usd"]),
    ]);
    t.render()
}

pub fn regions_table(v: &Value) -> String {
    let mut t = Table::new(&["SLUG"]);
    for r in items(v, "regions") {
        t.row(vec![cell(&r["slug"])]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_rows_and_total() {
        let v = json!({"usage": [{"key": "standard-s", "runs": 2, "billed_seconds": 5, "cost_usd": 0.00002}],
                       "total": {"billed_seconds": 5, "cost_usd": 0.00002}});
        let out = usage_table(&v);
        assert!(
            out.contains("standard-s") && out.contains("0.000020") && out.contains("TOTAL"),
            "{out}"
        );
    }

    #[test]
    fn columns_align_and_lines_have_no_trailing_spaces() {
        let mut t = Table::new(&["ID", "NAME", "X"]);
        t.row(vec!["1".into(), "längerer".into(), "".into()]);
        t.row(vec!["22".into(), "b".into(), "z".into()]);
        assert_eq!(
            t.render(),
            "ID  NAME      X\n1   längerer\n22  b         z\n"
        );
    }

    #[test]
    fn an_empty_table_is_its_header() {
        assert_eq!(Table::new(&["A", "B"]).render(), "A  B\n");
    }

    #[test]
    fn cells() {
        assert_eq!(cell(&json!(null)), "-");
        assert_eq!(cell(&json!("")), "-");
        assert_eq!(cell(&json!("a\nb")), "a b");
        assert_eq!(cell(&json!(true)), "yes");
        assert_eq!(cell(&json!(7)), "7");
        assert_eq!(cell(&json!(["a", "b"])), "a, b");
    }

    #[test]
    fn runners_and_nodes() {
        let runners = json!({"runners": [{
            "id": "r1", "name": "hello", "image_name": "busybox", "image_tag": "latest",
            "run_command": null, "argv": ["sh", "-c", "echo hi"], "region": "fra",
            "instance_type": "standard-s", "timeout_seconds": 60, "warmup_status": null
        }]});
        assert_eq!(
            runners_table(&runners),
            "ID  NAME   IMAGE           COMMAND        REGION  TYPE        TIMEOUT  WARMUP\n\
             r1  hello  busybox:latest  sh -c echo hi  fra     standard-s  60s      -\n"
        );
        let nodes = json!({"nodes": [{
            "id": "n1", "region": "fra", "status": "ready", "draining": false,
            "total_memory_mib": 4096, "free_memory_mib": 3072, "cpus": 2,
            "max_concurrent_runs": 8, "running_runs": ["x"], "last_heartbeat_age_seconds": 0.5,
            "runtimes": ["runc", "runsc"]
        }]});
        let out = nodes_table(&nodes);
        assert!(
            out.lines().nth(1).is_some_and(|l| l.starts_with(
                "n1  fra     ready   no        3072/4096       2     1/8   runc,runsc  0.5s ago"
            )),
            "{out}"
        );
    }

    #[test]
    fn a_removed_node_says_what_happened_to_it_and_its_runs() {
        let idle = json!({"node": {"id": "fra-2", "region": "fra", "status": "lost",
                                   "running_runs": []}});
        assert_eq!(
            removed_node(&idle),
            "removed node fra-2 (lost, region fra): its credentials are revoked and it is no \
             longer listed; it can join again only by enrolling with a new registration token\n"
        );
        let forced = json!({"node": {"id": "fra-2", "region": "fra", "status": "ready",
                                     "running_runs": ["r1", "r2"]}});
        let out = removed_node(&forced);
        assert!(
            out.ends_with(
                "its 2 runs were taken back (not started: queued again; started: ended \
                 node_lost):\n  r1\n  r2\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn details_align_keys_and_keep_new_fields() {
        let r = json!({"status": "failed", "id": "a", "zeta": 1, "beta": null,
                       "env_variables": [{"env_key": "K", "env_val": "v"}]});
        assert_eq!(
            detail(&r, &["id", "status", "env_variables", "absent"]),
            "id:             a\nstatus:         failed\nenv_variables:  K=v\nbeta:           -\nzeta:           1\n"
        );
    }

    #[test]
    fn digests_show_with_at() {
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            image(&json!({"image_name": "busybox", "image_tag": digest})),
            format!("busybox@{digest}")
        );
    }
}
