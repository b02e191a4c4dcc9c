//! `berthctl admin …`: operator commands, authenticated with the admin token. `keys create`
//! prints a project's new API key — the only time it is shown anywhere.

use super::{id, CommandError, Ctx};
use crate::args::{AdminCommand, AdminNodesCommand, KeysCommand, TokenCommand};
use crate::output::{cell, detail, Table};
use serde_json::{json, Value};

const PATH: &str = "/v1/admin/api_keys";
const KEY_FIELDS: &[&str] = &["key_id", "project", "name", "created_at", "revoked_at"];

pub async fn execute(ctx: &Ctx, c: AdminCommand) -> Result<u8, CommandError> {
    let c = match c {
        AdminCommand::Keys(c) => c,
        AdminCommand::Nodes(c) => return nodes(ctx, c).await,
        AdminCommand::Tls(c) => return tls(c),
    };
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

/// `admin tls …`: offline (also reached before any API configuration is read, see `main`).
pub fn tls(c: crate::args::TlsCommand) -> Result<u8, CommandError> {
    let crate::args::TlsCommand::Init { dir, hosts, force } = c;
    let written =
        super::tls::init(&dir, &hosts, force).map_err(|e| CommandError::Input(e.to_string()))?;
    let mut text: String = written
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    text.push_str(&format!(
        "\nSchedulers: --tls-cert {0}/scheduler.pem --tls-key {0}/scheduler.key\n\
         API and agents: --tls-ca {0}/ca.pem, with https:// scheduler URLs naming one of: {1}\n",
        dir.display(),
        hosts.join(", ")
    ));
    super::out(&text);
    Ok(0)
}

const TOKENS: &str = "/v1/admin/registration_tokens";
const TOKEN_FIELDS: &[&str] = &[
    "token_id",
    "region",
    "name",
    "single_use",
    "uses",
    "created_at",
    "expires_at",
    "revoked_at",
];

async fn nodes(ctx: &Ctx, c: AdminNodesCommand) -> Result<u8, CommandError> {
    match c {
        AdminNodesCommand::Token(TokenCommand::Create {
            region,
            name,
            expires_in,
            single_use,
        }) => {
            let mut body = json!({ "region": region, "single_use": single_use });
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(s) = expires_in {
                body["expires_in_seconds"] = json!(s);
            }
            let a = ctx.client.post(TOKENS, Some(&body)).await?;
            ctx.show(&a, created_token);
        }
        AdminNodesCommand::Token(TokenCommand::List) => {
            let a = ctx.client.get(TOKENS).await?;
            ctx.show(&a, tokens_table);
        }
        AdminNodesCommand::Token(TokenCommand::Revoke { token_id }) => {
            let a = ctx
                .client
                .delete(&format!(
                    "{TOKENS}/{}",
                    id("registration token", &token_id)?
                ))
                .await?;
            ctx.show(&a, |v| detail(&v["registration_token"], TOKEN_FIELDS));
        }
        AdminNodesCommand::Revoke { id: node } => {
            let a = ctx
                .client
                .post(&format!("/v1/nodes/{}/revoke", id("node", &node)?), None)
                .await?;
            ctx.show(&a, |v| detail(&v["node"], crate::output::NODE_FIELDS));
        }
    }
    Ok(0)
}

/// The new token's record, then the token on a line of its own, then how a node uses it.
fn created_token(v: &Value) -> String {
    let token = v["token"].as_str().unwrap_or("-");
    let region = v["registration_token"]["region"]
        .as_str()
        .unwrap_or("REGION");
    let mut text = detail(&v["registration_token"], TOKEN_FIELDS);
    text.push_str(&format!(
        "\nRegistration token (shown only now; Berth keeps only its hash):\n{token}\n\n\
         On the new node (package berth-node-agent installed), put it in a file only root can\n\
         read and join:\n\
         berth-node-agent join --url SCHEDULER_URL --region {region} --token-file FILE\n\
         (or start the agent with --registration-token-file FILE). The agent exchanges it once\n\
         for the node's own credential (kept in its state directory).\n"
    ));
    text
}

fn tokens_table(v: &Value) -> String {
    let mut t = Table::new(&[
        "TOKEN ID",
        "REGION",
        "NAME",
        "SINGLE USE",
        "USES",
        "CREATED",
        "EXPIRES",
        "REVOKED",
    ]);
    for k in v["registration_tokens"].as_array().into_iter().flatten() {
        t.row(TOKEN_FIELDS.iter().map(|f| cell(&k[*f])).collect());
    }
    t.render()
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
    fn a_created_registration_token_is_printed_once_with_how_to_use_it() {
        let token = format!("berthreg_{}_{}", "a".repeat(16), "b".repeat(64));
        let text = created_token(&json!({
            "registration_token": {"token_id": "a".repeat(16), "region": "fra", "name": "",
                "single_use": true, "uses": 0, "created_at": "t", "expires_at": "u",
                "revoked_at": null},
            "token": token,
        }));
        assert!(text.lines().any(|l| l == token), "{text}");
        assert_eq!(text.matches(&token).count(), 1, "{text}");
        assert!(text.contains("--region fra"), "{text}");
        assert!(text.contains("--registration-token-file"), "{text}");
    }

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
