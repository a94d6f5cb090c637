//! Parsing and compiling: every validation names the field at fault.

use super::*;
use crate::auth::sha256_hex;
use crate::policy::ModelId;

pub(crate) fn env(name: &str) -> Option<String> {
    match name {
        "OPENAI_KEY" => Some("sk-provider-openai".into()),
        "ANTHROPIC_KEY" => Some("sk-ant-provider".into()),
        _ => None,
    }
}

fn base() -> serde_json::Value {
    serde_json::json!({
        "providers": [
            {"name": "openai", "api": "openai", "cluster": "openai", "path_prefix": "/v1",
             "authority": "api.openai.com", "api_key_env": "OPENAI_KEY"},
            {"name": "anthropic", "api": "anthropic", "cluster": "anthropic", "path_prefix": "/v1",
             "api_key_env": "ANTHROPIC_KEY"}
        ],
        "models": [
            {"name": "gpt-4.1", "providers": ["openai"], "price": {"input": 2.0, "cached_input": 0.5, "output": 8.0}},
            {"name": "claude-sonnet-4.5", "aliases": ["claude-sonnet", "claude-sonnet-4-5*"],
             "upstream_model": "claude-sonnet-4-5-20250929", "providers": ["anthropic"],
             "price": {"input": 3.0, "output": 15.0}}
        ],
        "tiers": {"gold": {"models": ["*"]}, "bronze": {"models": ["gpt-*"]}},
        "tenants": [
            {"id": "acme", "tier": "gold", "keys": [{"id": "main", "sha256": sha256_hex("sk-acme")}]}
        ]
    })
}

fn compile_value(v: &serde_json::Value) -> Result<Policy, ConfigError> {
    compile(v.to_string().as_bytes(), &env)
}

#[test]
fn base_config_compiles() {
    let p = compile_value(&base()).unwrap();
    assert_eq!(p.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    assert_eq!(p.tenants.len(), 1);
    assert_eq!(p.providers[0].credential.header(), "authorization");
    assert_eq!(
        p.providers[0].credential.value(),
        "Bearer sk-provider-openai"
    );
    assert_eq!(p.providers[1].credential.header(), "x-api-key");
    assert_eq!(
        p.catalog.models[0].price.cached_input_micro_usd_per_mtok,
        500_000
    );
    assert_eq!(
        p.catalog.models[1].price.cached_input_micro_usd_per_mtok,
        3_000_000
    );
}

#[test]
fn unknown_field_is_named_with_its_path() {
    let mut v = base();
    v["providers"][1]["clustr"] = "x".into();
    let e = compile_value(&v).unwrap_err();
    assert!(e.to_string().contains("clustr"), "{e}");
    assert!(e.path.starts_with("providers[1]"), "{}", e.path);
}

#[test]
fn secrets_cannot_be_written_into_the_configuration() {
    // Provider keys come only from the environment, tenant keys only as digests: a
    // key written inline is an unknown field, and the error does not echo its value.
    for (edit, field) in [
        (
            &(|v: &mut serde_json::Value| v["providers"][0]["api_key"] = "sk-inline-1".into())
                as &dyn Fn(&mut serde_json::Value),
            "api_key",
        ),
        (
            &|v: &mut serde_json::Value| v["tenants"][0]["keys"][0]["key"] = "sk-inline-1".into(),
            "key",
        ),
    ] {
        let mut v = base();
        edit(&mut v);
        let e = compile_value(&v).unwrap_err();
        assert!(
            e.to_string().contains(&format!("unknown field `{field}`")),
            "{e}"
        );
        assert!(!e.to_string().contains("sk-inline-1"), "{e}");
    }
    // A digest that is not one (a plaintext key pasted into `sha256`) is refused
    // without echoing it.
    let mut v = base();
    v["tenants"][0]["keys"][0]["sha256"] = "sk-inline-plaintext-key".into();
    let e = compile_value(&v).unwrap_err();
    assert!(e.path.ends_with("keys[0].sha256"), "{}", e.path);
    assert!(!e.to_string().contains("sk-inline-plaintext-key"), "{e}");
}

#[test]
fn unknown_top_level_field_is_named() {
    let mut v = base();
    v["tenant"] = serde_json::json!([]);
    let e = compile_value(&v).unwrap_err();
    assert!(e.to_string().contains("`tenant`"), "{e}");
}

#[test]
fn wrong_type_names_the_field() {
    let mut v = base();
    v["models"][0]["price"]["input"] = "two".into();
    let e = compile_value(&v).unwrap_err();
    assert_eq!(e.path, "models[0].price.input");
}

#[test]
fn semantic_errors_name_the_field() {
    type Mutation = fn(&mut serde_json::Value);
    let cases: Vec<(Mutation, &str)> = vec![
        (
            |v| v["tenants"][0]["tier"] = "platinum".into(),
            "tenants[0].tier",
        ),
        (
            |v| v["models"][0]["providers"][0] = "nope".into(),
            "models[0].providers[0]",
        ),
        (
            |v| v["tenants"][0]["keys"][0]["sha256"] = "abc".into(),
            "tenants[0].keys[0].sha256",
        ),
        (
            |v| v["tiers"]["bronze"]["models"][0] = "gtp-*".into(),
            "tiers.bronze.models[0]",
        ),
        (
            |v| v["providers"][0]["api_key_env"] = "MISSING".into(),
            "providers[0].api_key_env",
        ),
        (
            |v| v["providers"][0]["path_prefix"] = "v1/".into(),
            "providers[0].path_prefix",
        ),
        (
            |v| v["providers"][0]["authority"] = "a\r\nb".into(),
            "providers[0].authority",
        ),
        (
            |v| v["models"][1]["aliases"][0] = "gpt-4.1".into(),
            "models[1].aliases[0]",
        ),
        (
            |v| v["models"][0]["price"]["output"] = (-1.0).into(),
            "models[0].price.output",
        ),
        (|v| v["max_body_bytes"] = 0.into(), "max_body_bytes"),
        (
            |v| v["models"][0]["name"] = "gpt;x=1".into(),
            "models[0].name",
        ),
        (
            |v| v["tiers"]["gold"]["limits"] = serde_json::json!({"requests_per_minute": 0}),
            "tiers.gold.limits.requests_per_minute",
        ),
        (
            |v| v["tiers"]["gold"]["limits"] = serde_json::json!({"burst": 0.5}),
            "tiers.gold.limits.burst",
        ),
        (
            |v| v["tenants"][0]["limits"] = serde_json::json!({"monthly_budget_usd": -1}),
            "tenants[0].limits.monthly_budget_usd",
        ),
        (
            |v| v["tenants"][0]["model_limits"] = serde_json::json!({"gpt-5": {}}),
            "tenants[0].model_limits.gpt-5",
        ),
        (
            |v| v["tenants"][0]["limits"] = serde_json::json!({"rpm": 5}),
            "tenants[0].limits.rpm",
        ),
        (
            |v| v["tenants"][0]["keys"] = serde_json::json!([]),
            "tenants[0].keys",
        ),
    ];
    for (mutate, path) in cases {
        let mut v = base();
        mutate(&mut v);
        let e = compile_value(&v).unwrap_err();
        assert_eq!(e.path, path, "{e}");
    }
}

#[test]
fn tenant_limits_override_the_tier_field_by_field() {
    let mut v = base();
    v["tiers"]["gold"]["limits"] =
        serde_json::json!({"requests_per_minute": 100, "tokens_per_minute": 1000, "burst": 2.0});
    v["tenants"][0]["limits"] =
        serde_json::json!({"tokens_per_minute": 50, "monthly_budget_usd": 5.25});
    v["tenants"][0]["model_limits"] = serde_json::json!({"gpt-4.1": {"requests_per_minute": 3}});
    v["providers"][0]["limits"] = serde_json::json!({"requests_per_minute": 500});
    let p = compile_value(&v).unwrap();
    let l = &p.tenants[0].limits;
    assert_eq!(l.requests_per_minute, Some(100));
    assert_eq!(l.tokens_per_minute, Some(50));
    assert_eq!(l.burst_milli, 2000);
    assert_eq!(l.concurrent_requests, None);
    assert_eq!(l.monthly_budget_micro_usd, Some(5_250_000));
    assert_eq!(
        p.tenants[0].model_limits[&ModelId::new(0)].requests_per_minute,
        Some(3)
    );
    assert_eq!(p.providers[0].limits.requests_per_minute, Some(500));
    assert_eq!(p.default_max_output_tokens, DEFAULT_MAX_OUTPUT_TOKENS);
}

#[test]
fn duplicate_tenant_and_digest_are_refused() {
    let mut v = base();
    let t = v["tenants"][0].clone();
    v["tenants"].as_array_mut().unwrap().push(t);
    let e = compile_value(&v).unwrap_err();
    assert_eq!(e.path, "tenants[1].id");

    let mut v = base();
    let mut t = v["tenants"][0].clone();
    t["id"] = "other".into();
    v["tenants"].as_array_mut().unwrap().push(t);
    let e = compile_value(&v).unwrap_err();
    assert_eq!(e.path, "tenants[1].keys[0].sha256");
}

#[test]
fn provider_key_never_appears_in_debug_output() {
    let p = compile_value(&base()).unwrap();
    let dump = format!("{:?}", p.providers);
    assert!(!dump.contains("sk-provider-openai"), "{dump}");
}

#[test]
fn not_json_is_a_clear_error() {
    let e = compile(b"{not json", &env).unwrap_err();
    assert!(
        e.to_string().contains("invalid sluice configuration"),
        "{e}"
    );
}

#[test]
fn the_global_section_compiles_with_defaults() {
    let mut v = base();
    v["global"] = serde_json::json!({"cluster": "sluice_quota"});
    let g = compile_value(&v).unwrap().global.unwrap();
    assert_eq!(g.authority, "sluice_quota");
    assert_eq!(g.timeout_ms, 50);
    assert_eq!(g.on_engine_failure, crate::policy::OnEngineFailure::Deny);
    use crate::policy::LimitMeasure::*;
    assert!(g.tenant_measures.contains(MonthlyTokens));
    assert!(g.tenant_measures.contains(MonthlyBudget));
    assert!(!g.tenant_measures.contains(RequestsPerMinute));
    assert!(!g.provider_measures.contains(MonthlyBudget));
    assert!(compile_value(&base()).unwrap().global.is_none());
}

#[test]
fn global_errors_name_the_field() {
    let cases = [
        (
            serde_json::json!({"cluster": "q", "limits": ["rpm"]}),
            "global.limits[0]",
        ),
        (
            serde_json::json!({"cluster": "q", "provider_limits": ["monthly_tokens", "x"]}),
            "global.provider_limits[1]",
        ),
        (
            serde_json::json!({"cluster": "q", "on_engine_failure": "open"}),
            "global.on_engine_failure",
        ),
        (
            serde_json::json!({"cluster": "q", "timeout_ms": 0}),
            "global.timeout_ms",
        ),
        (
            serde_json::json!({"cluster": "q", "lease_ms": 10}),
            "global.lease_ms",
        ),
        (
            serde_json::json!({"cluster": "q", "settle_attempts": 0}),
            "global.settle_attempts",
        ),
        (serde_json::json!({"cluster": ""}), "global.cluster"),
        (
            serde_json::json!({"cluster": "q", "colour": 1}),
            "global.colour",
        ),
    ];
    for (global, path) in cases {
        let mut v = base();
        v["global"] = global.clone();
        let err = compile_value(&v).unwrap_err();
        assert_eq!(err.path, path, "{global}: {err}");
    }
}

#[test]
fn a_global_rate_beyond_exact_doubles_is_refused() {
    let mut v = base();
    v["tenants"][0]["limits"] =
        serde_json::json!({"tokens_per_minute": 1_000_000_000_000u64, "burst": 1000.0});
    v["global"] = serde_json::json!({"cluster": "q", "limits": ["tokens_per_minute"]});
    let err = compile_value(&v).unwrap_err();
    assert_eq!(err.path, "tenants[0].limits.tokens_per_minute", "{err}");
    // The same limit kept local is fine: shared data counts in integers.
    v["global"] = serde_json::json!({"cluster": "q", "limits": ["monthly_tokens"]});
    assert!(compile_value(&v).is_ok());
}
