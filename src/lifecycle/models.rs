//! `GET /v1/models` and `GET /v1/models/{id}`, answered by the gateway itself with only the
//! models the tenant may use: OpenAI's list format, or Anthropic's when the request carries
//! `anthropic-version`.

use super::forward::model_not_found;
use crate::auth::KeyOwner;
use crate::errors::{ApiFlavour, LocalReply};
use crate::policy::{Model, Policy};
use crate::routing::ModelsQuery;
use serde_json::json;

/// The answer to a models query.
pub(super) fn reply(
    policy: &Policy,
    owner: KeyOwner,
    query: &ModelsQuery,
    flavour: ApiFlavour,
) -> LocalReply {
    match query {
        ModelsQuery::List => model_list(policy, owner, flavour),
        ModelsQuery::Get(id) => match model_object(policy, owner, id, flavour) {
            Some(reply) => reply,
            None => model_not_found(id).reply(flavour),
        },
    }
}

fn model_list(policy: &Policy, owner: KeyOwner, flavour: ApiFlavour) -> LocalReply {
    let models: Vec<_> = policy.models_for(owner.tenant).collect();
    let body = match flavour {
        ApiFlavour::OpenAi => json!({
            "object": "list",
            "data": models.iter().map(|m| openai_model(policy, m)).collect::<Vec<_>>(),
        }),
        ApiFlavour::Anthropic => json!({
            "data": models.iter().map(|m| anthropic_model(m)).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": models.first().map(|m| m.name.as_str()),
            "last_id": models.last().map(|m| m.name.as_str()),
        }),
    };
    LocalReply::json(200, body.to_string())
}

fn model_object(
    policy: &Policy,
    owner: KeyOwner,
    requested: &str,
    flavour: ApiFlavour,
) -> Option<LocalReply> {
    let id = policy.catalog.resolve(requested)?;
    if !policy.may_use(owner.tenant, id) {
        return None;
    }
    let m = policy.model(id)?;
    let body = match flavour {
        ApiFlavour::OpenAi => openai_model(policy, m),
        ApiFlavour::Anthropic => anthropic_model(m),
    };
    Some(LocalReply::json(200, body.to_string()))
}

fn openai_model(policy: &Policy, m: &Model) -> serde_json::Value {
    let owner = m
        .deployments
        .first()
        .and_then(|d| policy.provider(d.provider))
        .map(|p| p.name.as_str())
        .unwrap_or("sluice");
    json!({"id": m.name, "object": "model", "created": 0, "owned_by": owner})
}

fn anthropic_model(m: &Model) -> serde_json::Value {
    json!({"type": "model", "id": m.name, "display_name": m.name, "created_at": "1970-01-01T00:00:00Z"})
}
