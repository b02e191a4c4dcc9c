//! `berthctl admin …`: operator commands, authenticated with the admin token. `keys create`
//! prints a project's new API key — the only time it is shown anywhere.

use super::{id, CommandError, Ctx};
use crate::args::{AdminCommand, KeysCommand};
use crate::output::{cell, detail, Table};
use serde_json::{json, Value};

const PATH: &str = "/v1/admin/api_keys";
const KEY_FIELDS: &[&str] = &["key_id", "project", "name", "created_at", "revoked_at"];

pub async fn execute(ctx: &Ctx, c: AdminCommand) -> Result<u8, CommandError> {
    let AdminCommand::Keys(c) = c;
    match c {
        KeysCommand::Create { project, name } => {
            let mut body = json!({ "project": project });
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            let a = ctx.client.post(PATH, Some(&body)).await?;
            ctx.show(&a, created);
        }
        KeysCommand::List { project } => {
            let path = match project {
                Some(p) => format!("{PATH}?project={}", id("project", &p)?),
                None => PATH.to_owned(),
            };
            let a = ctx.client.get(&path).await?;
            ctx.show(&a, keys_table);
        }
        KeysCommand::Revoke { key_id } => {
            let a = ctx
                .client
                .delete(&format!("{PATH}/{}", id("API key", &key_id)?))
                .await?;
            ctx.show(&a, |v| detail(&v["api_key"], KEY_FIELDS));
        }
    }
    Ok(0)
}

/// The new key's record, then the key itself on a line of its own, then how to use it.
fn created(v: &Value) -> String {
    let key = v["key"].as_str().unwrap_or("-");
    let mut text = detail(&v["api_key"], KEY_FIELDS);
    text.push_str(&format!(
        "\nAPI key (shown only now; Berth keeps only its hash):\n{key}\n\n\
         Use it as the bearer token of the project: BERTH_TOKEN=<key> berthctl runners list\n\
         or: curl -H \"Authorization: Bearer <key>\" $BERTH_URL/v1/runners\n"
    ));
    text
}

fn keys_table(v: &Value) -> String {
    let mut t = Table::new(&["KEY ID", "PROJECT", "NAME", "CREATED", "REVOKED"]);
    for k in v["api_keys"].as_array().into_iter().flatten() {
        t.row(KEY_FIELDS.iter().map(|f| cell(&k[*f])).collect());
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_key_is_printed_once_on_its_own_line() {
        let key = format!("berth_{}_{}", "a".repeat(16), "b".repeat(64));
        let text = created(&json!({
            "api_key": {"key_id": "a".repeat(16), "project": "alpha", "name": "ci",
                        "created_at": "2026-11-25T15:00:00Z", "revoked_at": null},
            "key": key,
        }));
        assert!(text.lines().any(|l| l == key), "{text}");
        assert_eq!(text.matches(&key).count(), 1, "printed once: {text}");
        assert!(text.contains("project"));
        assert!(text.contains("alpha"));
    }

    #[test]
    fn the_key_table_never_has_a_secret_column() {
        let text = keys_table(&json!({"api_keys": [
            {"key_id": "k1", "project": "alpha", "name": "", "created_at": "t", "revoked_at": null}
        ]}));
        assert!(text.starts_with("KEY ID"));
        let row: Vec<&str> = text
            .lines()
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .collect();
        assert_eq!(row, ["k1", "alpha", "-", "t", "-"]);
    }
}
