use super::*;
use crate::auth::sha256_hex;
use crate::config::compile;
use crate::policy::ModelId;
use crate::shared::MemoryStore;
use serde_json::{json, Value};

fn env(name: &str) -> Option<String> {
    Some(format!("key-of-{}", name.to_lowercase()))
}

/// Two accounts of one provider (weights 3:1), a second provider at rank 1, and an
/// Anthropic deployment the OpenAI API never takes.
fn config() -> Value {
    json!({
        "providers": [
            {"name": "openai-a", "api": "openai", "cluster": "openai_a", "path_prefix": "/v1",
             "authority": "api.openai.com", "api_key_env": "OPENAI_A"},
            {"name": "openai-b", "api": "openai", "cluster": "openai_b", "fallback_cluster": "openai_b_fb",
             "path_prefix": "/v1",
             "authority": "api.openai.com", "api_key_env": "OPENAI_B",
             "headers": {"openai-organization": "org-b"}},
            {"name": "deepseek", "api": "openai", "cluster": "deepseek", "api_key_env": "DEEPSEEK"},
            {"name": "anthropic", "api": "anthropic", "cluster": "anthropic", "path_prefix": "/v1",
             "api_key_env": "ANTHROPIC"}
        ],
        "models": [
            {"name": "chat", "upstream_model": "gpt-4.1-mini", "price": {"input": 1, "output": 2},
             "deployments": [
                {"provider": "openai-a", "weight": 3},
                {"provider": "openai-b", "weight": 1},
                {"provider": "deepseek", "rank": 1, "upstream_model": "deepseek-chat",
                 "price": {"input": 0.5, "output": 1}},
                {"provider": "anthropic", "upstream_model": "claude-x"}
             ]},
            {"name": "plain", "providers": ["openai-a", "deepseek"], "price": {"input": 1}}
        ],
        "tiers": {"gold": {"models": ["*"]}},
        "tenants": [{"id": "acme", "tier": "gold", "keys": [{"id": "k", "sha256": sha256_hex("sk")}]}]
    })
}

fn policy() -> Policy {
    compile(config().to_string().as_bytes(), &env).unwrap()
}

fn chain_names(policy: &Policy, model: u32, random: u64, down: &[&str]) -> Vec<String> {
    let m = policy.model(ModelId::new(model)).unwrap();
    let available = |p: ProviderId| !down.contains(&policy.provider(p).unwrap().name.as_str());
    chain(
        m,
        &policy.providers,
        ApiFlavour::OpenAi,
        10,
        random,
        &available,
    )
    .into_iter()
    .map(|i| {
        policy
            .provider(m.deployments[i].provider)
            .unwrap()
            .name
            .clone()
    })
    .collect()
}

#[test]
fn a_chain_holds_the_api_s_deployments_by_rank() {
    let p = policy();
    for random in 0..50 {
        let chain = chain_names(&p, 0, random, &[]);
        assert_eq!(
            chain.len(),
            3,
            "the Anthropic deployment is not for this API"
        );
        assert!(chain[..2].contains(&"openai-a".to_string()));
        assert!(chain[..2].contains(&"openai-b".to_string()));
        assert_eq!(chain[2], "deepseek", "rank 1 comes after rank 0");
    }
}

#[test]
fn weights_spread_the_first_attempt() {
    let p = policy();
    // Consecutive seeds, as consecutive stream ids give.
    let first_a = (0..4000u64)
        .filter(|&r| chain_names(&p, 0, r, &[])[0] == "openai-a")
        .count();
    // 3:1, so 3000 of 4000 expected.
    assert!((2850..=3150).contains(&first_a), "{first_a}");
}

#[test]
fn unavailable_deployments_are_skipped_unless_all_are() {
    let p = policy();
    assert_eq!(
        chain_names(&p, 0, 1, &["openai-a"]),
        vec!["openai-b", "deepseek"]
    );
    assert_eq!(
        chain_names(&p, 0, 1, &["openai-a", "openai-b"]),
        vec!["deepseek"],
        "the next rank only when the whole rank is out"
    );
    let all = chain_names(&p, 0, 1, &["openai-a", "openai-b", "deepseek"]);
    assert_eq!(all.len(), 3, "nothing left: try them all anyway");
}

#[test]
fn providers_lists_never_fall_back_and_attempts_are_capped() {
    let p = policy();
    assert_eq!(chain_names(&p, 1, 5, &[]), vec!["openai-a"]);
    let m = p.model(ModelId::new(0)).unwrap();
    let capped = chain(m, &p.providers, ApiFlavour::OpenAi, 2, 9, &|_| true);
    assert_eq!(capped.len(), 2);
}

#[test]
fn the_configuration_is_strict_about_deployments() {
    let err = |edit: &dyn Fn(&mut Value)| {
        let mut c = config();
        edit(&mut c);
        compile(c.to_string().as_bytes(), &env)
            .unwrap_err()
            .to_string()
    };
    assert!(
        err(&|c| c["models"][1]["deployments"] = json!([{"provider": "deepseek"}]))
            .contains("`models[1].deployments`: give either `providers` or `deployments`")
    );
    assert!(
        err(&|c| c["models"][0]["deployments"][1]["provider"] = json!("openai-a"))
            .contains("`models[0].deployments[1].provider`: lists a provider twice")
    );
    assert!(
        err(&|c| c["models"][0]["deployments"][0]["weight"] = json!(0))
            .contains("models[0].deployments[0].weight")
    );
    assert!(
        err(&|c| c["models"][0]["deployments"][0]["zone"] = json!("eu"))
            .contains("unknown field `zone`")
    );
    assert!(err(&|c| c["fallback"] = json!({"max_attempts": 0})).contains("fallback.max_attempts"));
    assert!(err(&|c| c["fallback"] = json!({"statuses": [200]})).contains("fallback.statuses[0]"));
    assert!(err(&|c| c["fallback"] = json!({"retry_on": 2})).contains("unknown field `retry_on`"));
    assert!(err(&|c| c["fallback"] = json!({"retries": 6})).contains("fallback.retries"));
    assert!(err(&|c| c["providers"][0]["cluster"] = json!("a,b"))
        .contains("`providers[0].cluster`: must not contain `,`"));
    assert!(err(&|c| c["providers"][0]["fallback_cluster"] = json!(""))
        .contains("`providers[0].fallback_cluster`: must not be empty"));
}

#[test]
fn deployment_prices_default_to_the_model_s() {
    let p = policy();
    let m = p.model(ModelId::new(0)).unwrap();
    assert_eq!(m.deployments[0].price, m.price);
    assert_ne!(m.deployments[2].price, m.price);
    assert_eq!(m.deployments[2].upstream_name, "deepseek-chat");
    assert_eq!(m.deployments[0].upstream_name, "gpt-4.1-mini");
}

#[test]
fn health_follows_attempts() {
    let f = Fallback::default();
    let h = Health::default();
    let limited = h.after(
        AttemptEnd::Status {
            status: 429,
            retry_after_ms: Some(5_000),
        },
        &f,
        1_000,
    );
    assert_eq!(
        limited.until_ms, 6_000,
        "skipped for the provider's retry-after"
    );
    assert!(!limited.available(5_999) && limited.available(6_000));
    // Failures in a row cool it down at the threshold, then count again from 0.
    let mut h = Health::default();
    for _ in 0..2 {
        h = h.after(AttemptEnd::NoResponse, &f, 0);
        assert!(h.available(0));
    }
    h = h.after(
        AttemptEnd::Status {
            status: 503,
            retry_after_ms: None,
        },
        &f,
        100,
    );
    assert_eq!(
        h,
        Health {
            until_ms: 30_100,
            failures: 0
        }
    );
    // A success clears failures; a client error changes nothing.
    let failing = Health::default().after(AttemptEnd::NoResponse, &f, 0);
    assert_eq!(failing.failures, 1);
    let ok = AttemptEnd::Status {
        status: 200,
        retry_after_ms: None,
    };
    assert_eq!(failing.after(ok, &f, 0).failures, 0);
    let bad_request = AttemptEnd::Status {
        status: 400,
        retry_after_ms: None,
    };
    assert_eq!(failing.after(bad_request, &f, 0), failing);
    // A retry-after past the cap is capped.
    let long = Health::default().after(
        AttemptEnd::Status {
            status: 429,
            retry_after_ms: Some(u64::MAX),
        },
        &f,
        0,
    );
    assert_eq!(long.until_ms, f.retry_after_max_ms);
}

#[test]
fn health_is_shared_through_the_store() {
    let p = policy();
    let store = MemoryStore::default();
    let b = &p.providers[1];
    assert!(health(&store, b).available(0));
    let end = AttemptEnd::Status {
        status: 429,
        retry_after_ms: Some(2_000),
    };
    record(&store, b, end, &p.fallback, 10).unwrap();
    assert_eq!(health(&store, b).until_ms, 2_010);
    assert!(health(&store, &p.providers[0]).available(10), "per account");
    assert_eq!(Health::decode(Some(b"garbage")), Health::default());
    assert_eq!(
        Health::decode(Some(&health(&store, b).encode())),
        health(&store, b)
    );
}

fn plan(chain: Vec<usize>) -> Plan {
    Plan {
        model: ModelId::new(0),
        api: Api::ChatCompletions,
        query: "?x=1".into(),
        authority: "gateway.local".into(),
        chain,
        started_ms: 0,
        reservation: Default::default(),
        held: Vec::new(),
        attempts: Vec::new(),
    }
}

#[test]
fn a_later_attempt_is_rewritten_for_its_deployment_alone() {
    let p = policy();
    let plan = plan(vec![0, 1, 2]);
    assert_eq!(attempt_edits(&p, &plan, 1), None, "prepared by the routing");
    let b = attempt_edits(&p, &plan, 2).unwrap();
    for name in ["authorization", "openai-organization"] {
        assert!(
            b.remove.contains(&name.to_string()),
            "{name} of any account goes"
        );
    }
    let set =
        |e: &AttemptEdits, k: &str| e.set.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(
        b.cluster, "openai_b_fb",
        "attempts of a chain use the fallback cluster"
    );
    assert_eq!(set(&b, "authorization").unwrap(), "Bearer key-of-openai_b");
    assert_eq!(set(&b, "openai-organization").unwrap(), "org-b");
    assert_eq!(set(&b, ":path").unwrap(), "/v1/chat/completions?x=1");
    assert_eq!(b.model, None, "same model name as the first deployment");
    let d = attempt_edits(&p, &plan, 3).unwrap();
    assert_eq!(set(&d, "authorization").unwrap(), "Bearer key-of-deepseek");
    assert_eq!(set(&d, ":path").unwrap(), "/chat/completions?x=1");
    assert_eq!(set(&d, ":authority").unwrap(), "gateway.local");
    assert_eq!(set(&d, "openai-organization"), None);
    assert_eq!(d.model.as_deref(), Some("deepseek-chat"));
    // Past the chain, attempts stay on its last deployment.
    assert_eq!(attempt_edits(&p, &plan, 7), attempt_edits(&p, &plan, 3));
}

#[test]
fn the_served_attempt_is_the_last_with_a_response() {
    let mut plan = plan(vec![1, 0]);
    assert_eq!(plan.deployment_for(1), Some(1));
    assert_eq!(plan.deployment_for(0), Some(1));
    assert_eq!(plan.deployment_for(5), Some(0));
    plan.attempts.push(Attempt {
        deployment: 1,
        provider: ProviderId::new(1),
        status: 0,
        ms: 3,
    });
    assert_eq!(plan.served(), None);
    plan.attempts.push(Attempt {
        deployment: 0,
        provider: ProviderId::new(0),
        status: 200,
        ms: 9,
    });
    assert_eq!(plan.served().map(|a| a.deployment), Some(0));
}
