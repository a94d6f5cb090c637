//! A parsed configuration compiled into the immutable [`Policy`]: every cross-reference
//! resolved to a typed id, every value checked, names that reach headers and stat names
//! kept clean.

use super::{
    ConfigError, RawApi, RawCache, RawCacheStore, RawConfig, RawFallback, RawGlobal, RawKey,
    RawLimits, RawModel, RawPrice, RawProvider,
};
use crate::auth::{KeyDigest, KeyIndex};
use crate::cache::{CacheRule, CacheStore};
use crate::errors::ApiFlavour;
use crate::fallback::Fallback;
use crate::policy::{
    Credential, Deployment, GlobalLimits, KeyId, LimitMeasure, Limits, MeasureSet, Model,
    ModelCatalog, ModelId, OnEngineFailure, Policy, Price, Provider, ProviderId, QueueSpec,
    Queueing, Tenant, TenantId,
};
use crate::routing::Pattern;
use crate::shared::keys;
use std::collections::{HashMap, HashSet};

pub(super) fn policy(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Policy, ConfigError> {
    within(
        "max_body_bytes",
        raw.max_body_bytes,
        64 * 1024 * 1024,
        " (64 MiB)",
    )?;

    let providers = compile_providers(&raw.providers, env)?;
    let provider_ids: HashMap<&str, ProviderId> = raw
        .providers
        .iter()
        .enumerate()
        .filter_map(|(i, p)| Some((p.name.as_str(), ProviderId::from_index(i)?)))
        .collect();
    let catalog = compile_models(&raw.models, &provider_ids)?;

    require(
        !raw.tiers.is_empty(),
        "tiers",
        "at least one tier is required",
    )?;
    let mut allow_sets: Vec<Vec<bool>> = Vec::new();
    let mut tier_sets: HashMap<&str, usize> = HashMap::new();
    for (name, tier) in &raw.tiers {
        check_name(&format!("tiers.{name}"), name)?;
        compile_limits(&format!("tiers.{name}.limits"), &tier.limits)?;
        let weight = u64::from(tier.weight);
        within(format!("tiers.{name}.weight"), weight, 1000, "")?;
        let wait = tier.max_queue_wait_ms;
        within(
            format!("tiers.{name}.max_queue_wait_ms"),
            wait,
            600_000,
            " (10 minutes)",
        )?;
        let set = compile_allow_list(&format!("tiers.{name}.models"), &tier.models, &catalog)?;
        if let Some(cache) = &tier.cache {
            compile_cache(&format!("tiers.{name}.cache"), cache, &catalog)?;
        }
        tier_sets.insert(name.as_str(), allow_sets.len());
        allow_sets.push(set);
    }

    let mut tenants = Vec::with_capacity(raw.tenants.len());
    let mut keys = KeyIndex::default();
    let mut tenant_ids = HashSet::new();
    for (t, rt) in raw.tenants.iter().enumerate() {
        let at = format!("tenants[{t}]");
        let tenant = id_of(&at, TenantId::from_index(t))?;
        check_name(&format!("{at}.id"), &rt.id)?;
        if !tenant_ids.insert(rt.id.as_str()) {
            return Err(ConfigError::at(
                format!("{at}.id"),
                format!("duplicate tenant id `{}`", rt.id),
            ));
        }
        let Some(&tier_set) = tier_sets.get(rt.tier.as_str()) else {
            return Err(ConfigError::at(
                format!("{at}.tier"),
                format!("unknown tier `{}`", rt.tier),
            ));
        };
        let allow_set = match &rt.models {
            None => tier_set,
            Some(list) => {
                allow_sets.push(compile_allow_list(&format!("{at}.models"), list, &catalog)?);
                allow_sets.len() - 1
            }
        };
        let key_ids = compile_keys(&at, tenant, &rt.keys, &mut keys)?;
        let tier_limits = raw
            .tiers
            .get(&rt.tier)
            .map(|t| t.limits.clone())
            .unwrap_or_default();
        let limits = compile_limits(
            &format!("{at}.limits"),
            &tier_limits.overridden_by(&rt.limits),
        )?;
        let mut model_limits = HashMap::new();
        for (name, l) in &rt.model_limits {
            let here = format!("{at}.model_limits.{name}");
            let Some(&model) = catalog.exact.get(name.as_str()) else {
                return Err(ConfigError::at(here, format!("unknown model `{name}`")));
            };
            model_limits.insert(model, compile_limits(&here, l)?);
        }
        let Some(tier) = raw.tiers.get(&rt.tier) else {
            return Err(ConfigError::at(
                format!("{at}.tier"),
                format!("unknown tier `{}`", rt.tier),
            ));
        };
        let cache = match (&rt.cache, &tier.cache) {
            (Some(own), _) => Some(compile_cache(&format!("{at}.cache"), own, &catalog)?),
            (None, Some(tier_cache)) => Some(compile_cache(
                &format!("tiers.{}.cache", rt.tier),
                tier_cache,
                &catalog,
            )?),
            (None, None) => None,
        };
        let queue_length = u64::from(rt.max_queue_length);
        within(format!("{at}.max_queue_length"), queue_length, 4096, "")?;
        tenants.push(Tenant {
            id: rt.id.clone(),
            tier: rt.tier.clone(),
            key_ids,
            allow_set,
            limits,
            model_limits,
            queueing: Queueing {
                priority: tier.priority,
                weight: tier.weight,
                max_wait_ms: tier.max_queue_wait_ms,
                max_queue_length: rt.max_queue_length,
            },
            cache,
            anthropic_betas: tier
                .anthropic_betas
                .iter()
                .map(|b| Pattern::new(b))
                .collect(),
            clamp_output_to_budget: tier.clamp_output_to_budget,
            allowed_origins: compile_origins(
                &format!("{at}.allowed_origins"),
                &rt.allowed_origins,
            )?,
        });
    }

    let output_tokens = raw.default_max_output_tokens;
    within("default_max_output_tokens", output_tokens, 10_000_000, "")?;
    let global = raw.global.as_ref().map(compile_global).transpose()?;
    if let Some(global) = &global {
        check_global_rates(global, &tenants, &providers)?;
    }
    let cache_store = compile_cache_store(&raw.cache_store, global.is_some(), &tenants)?;
    let fallback = compile_fallback(&raw.fallback)?;
    Ok(Policy {
        max_body_bytes: raw.max_body_bytes,
        default_max_output_tokens: raw.default_max_output_tokens,
        providers,
        catalog,
        tenants,
        keys,
        allow_sets,
        global,
        cache_store,
        fallback,
    })
}

/// A `cache` section: every number in range, every model pattern matching a model.
fn compile_cache(at: &str, c: &RawCache, catalog: &ModelCatalog) -> Result<CacheRule, ConfigError> {
    within(format!("{at}.ttl_s"), c.ttl_s, 30 * 86_400, " (30 days)")?;
    within(
        format!("{at}.max_entry_bytes"),
        c.max_entry_bytes,
        16 * 1024 * 1024,
        " (16 MiB)",
    )?;
    within(format!("{at}.wait_ms"), c.wait_ms, 600_000, " (10 minutes)")?;
    let in_range = |v: f64, max: f64| v.is_finite() && (0.0..=max).contains(&v);
    require(
        in_range(c.max_temperature, 2.0),
        format!("{at}.max_temperature"),
        "must be between 0 and 2",
    )?;
    require(
        in_range(c.hit_price, 1.0),
        format!("{at}.hit_price"),
        "must be between 0 and 1 (the share of a miss's price a hit costs)",
    )?;
    let models = match &c.models {
        None => vec![true; catalog.models.len()],
        Some(list) => compile_allow_list(&format!("{at}.models"), list, catalog)?,
    };
    Ok(CacheRule {
        models,
        ttl_ms: c.ttl_s * 1000,
        max_entry_bytes: c.max_entry_bytes,
        max_temperature: c.max_temperature,
        // In range, so the product fits: at most 1,000,000.
        hit_price_ppm: (c.hit_price * 1_000_000.0).round() as u64,
        wait_ms: c.wait_ms,
    })
}

/// Where the cache lives; a local table's memory bound must stay reasonable.
fn compile_cache_store(
    s: &RawCacheStore,
    has_global: bool,
    tenants: &[Tenant],
) -> Result<CacheStore, ConfigError> {
    match s.engine.as_str() {
        "local" => {
            within("cache_store.slots", u64::from(s.slots), 1_000_000, "")?;
            let largest = tenants
                .iter()
                .filter_map(|t| t.cache.as_ref())
                .map(|c| c.max_entry_bytes)
                .max()
                .unwrap_or(0);
            let bound = u64::from(s.slots).saturating_mul(largest);
            require(
                bound <= 4 << 30,
                "cache_store.slots",
                "slots x the largest max_entry_bytes must stay within 4 GiB of shared data",
            )?;
            Ok(CacheStore::Local { slots: s.slots })
        }
        "global" => {
            require(
                has_global,
                "cache_store.engine",
                "`global` needs the `global` section (the quota service)",
            )?;
            within(
                "cache_store.tenant_max_bytes",
                s.tenant_max_bytes,
                1 << 40,
                " (1 TiB)",
            )?;
            Ok(CacheStore::Global {
                tenant_max_bytes: s.tenant_max_bytes,
            })
        }
        other => Err(ConfigError::at(
            "cache_store.engine",
            format!("unknown value `{other}`: expected `local` or `global`"),
        )),
    }
}

fn compile_global(g: &RawGlobal) -> Result<GlobalLimits, ConfigError> {
    let cluster_ok = |b: u8| b.is_ascii_graphic() && b != b'"';
    let rule = "1-256 printable ASCII characters without spaces or quotes";
    check_bytes("global.cluster", &g.cluster, 256, cluster_ok, rule)?;
    let authority = g.authority.clone().unwrap_or_else(|| g.cluster.clone());
    check_bytes("global.authority", &authority, 256, cluster_ok, rule)?;
    within("global.timeout_ms", g.timeout_ms, 10_000, " (10 s)")?;
    within("global.lease_ms", g.lease_ms, 3_600_000, " (1 hour)")?;
    require(
        g.lease_ms >= 1_000,
        "global.lease_ms",
        "must be at least 1000: the lease is renewed every third of it",
    )?;
    within(
        "global.settle_attempts",
        u64::from(g.settle_attempts),
        10,
        "",
    )?;
    let on_engine_failure = match g.on_engine_failure.as_str() {
        "deny" => OnEngineFailure::Deny,
        "local" => OnEngineFailure::Local,
        other => {
            return Err(ConfigError::at(
                "global.on_engine_failure",
                format!("unknown value `{other}`: expected `deny` or `local`"),
            ))
        }
    };
    Ok(GlobalLimits {
        cluster: g.cluster.clone(),
        authority,
        timeout_ms: g.timeout_ms,
        tenant_measures: measure_set("global.limits", &g.limits)?,
        provider_measures: measure_set("global.provider_limits", &g.provider_limits)?,
        on_engine_failure,
        lease_ms: g.lease_ms,
        settle_attempts: g.settle_attempts,
    })
}

/// Limit field names (`requests_per_minute`, ...) as a set; an unknown name is an error.
fn measure_set(at: &str, names: &[String]) -> Result<MeasureSet, ConfigError> {
    let mut set = MeasureSet::default();
    for (i, name) in names.iter().enumerate() {
        let Some(measure) = LimitMeasure::ALL
            .into_iter()
            .find(|m| m.config_name() == name)
        else {
            let known: Vec<&str> = LimitMeasure::ALL.iter().map(|m| m.config_name()).collect();
            return Err(ConfigError::at(
                format!("{at}[{i}]"),
                format!(
                    "unknown limit `{name}`: expected one of {}",
                    known.join(", ")
                ),
            ));
        };
        set = set.with(measure);
    }
    Ok(set)
}

/// Redis's scripts count a bucket in doubles, exact up to 2^53; the quota service takes
/// capacities up to 2^52 parts (`per_minute * burst * 60`), so that a level in debt stays
/// exact too. A global rate past that is refused here rather than at every request.
fn check_global_rates(
    global: &GlobalLimits,
    tenants: &[Tenant],
    providers: &[Provider],
) -> Result<(), ConfigError> {
    const EXACT: u128 = 1 << 52;
    let check = |at: String, l: &Limits, measures: MeasureSet| {
        let rates = [
            (LimitMeasure::RequestsPerMinute, l.requests_per_minute),
            (LimitMeasure::TokensPerMinute, l.tokens_per_minute),
        ];
        for (measure, rate) in rates {
            let Some(per_minute) = rate.filter(|_| measures.contains(measure)) else {
                continue;
            };
            let parts = u128::from(per_minute) * u128::from(l.burst_milli) * 60;
            require(
                parts <= EXACT,
                format!("{at}.{}", measure.config_name()),
                "is too large for a global limit: rate x burst must stay below 75,000,000,000,000 per minute",
            )?;
        }
        Ok(())
    };
    for (t, tenant) in tenants.iter().enumerate() {
        check(
            format!("tenants[{t}].limits"),
            &tenant.limits,
            global.tenant_measures,
        )?;
        for limits in tenant.model_limits.values() {
            check(
                format!("tenants[{t}].model_limits"),
                limits,
                global.tenant_measures,
            )?;
        }
    }
    for (p, provider) in providers.iter().enumerate() {
        check(
            format!("providers[{p}].limits"),
            &provider.limits,
            global.provider_measures,
        )?;
    }
    Ok(())
}

/// A tenant's keys into the key index; their ids (never the keys), by [`KeyId`].
fn compile_keys(
    at: &str,
    tenant: TenantId,
    raw: &[RawKey],
    keys: &mut KeyIndex,
) -> Result<Vec<String>, ConfigError> {
    let empty = "a tenant needs at least one key";
    each(&format!("{at}.keys"), raw, empty, |k, key| {
        check_name(&format!("{at}.keys[{k}].id"), &key.id)?;
        let digest = KeyDigest::from_hex(&key.sha256).ok_or_else(|| {
            ConfigError::at(
                format!("{at}.keys[{k}].sha256"),
                "must be 64 hex characters (the SHA-256 of the key; see `make key`)",
            )
        })?;
        let key_id = id_of(&format!("{at}.keys[{k}]"), KeyId::from_index(k))?;
        if !keys.insert(digest, tenant, key_id) {
            return Err(ConfigError::at(
                format!("{at}.keys[{k}].sha256"),
                "this key digest is already used by another key",
            ));
        }
        Ok(key.id.clone())
    })
}

fn compile_providers(
    raw: &[RawProvider],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Provider>, ConfigError> {
    let mut seen = HashSet::new();
    each(
        "providers",
        raw,
        "at least one provider is required",
        |i, p| {
            let at = format!("providers[{i}]");
            check_name(&format!("{at}.name"), &p.name)?;
            if !seen.insert(p.name.as_str()) {
                return Err(ConfigError::at(
                    format!("{at}.name"),
                    format!("duplicate provider `{}`", p.name),
                ));
            }
            for (field, cluster) in std::iter::once(("cluster", &p.cluster))
                .chain(p.fallback_cluster.iter().map(|c| ("fallback_cluster", c)))
            {
                let here = format!("{at}.{field}");
                check_header_value(&here, cluster)?;
                require(!cluster.is_empty(), &here, "must not be empty")?;
                // Attempts' clusters travel as one comma-separated header.
                require(!cluster.contains(','), &here, "must not contain `,`")?;
            }
            let prefix = &p.path_prefix;
            if !prefix.is_empty() && (!prefix.starts_with('/') || prefix.ends_with('/')) {
                return Err(ConfigError::at(
                    format!("{at}.path_prefix"),
                    "must be empty or start with `/` and not end with `/` (e.g. `/v1`)",
                ));
            }
            check_header_value(&format!("{at}.path_prefix"), prefix)?;
            if prefix.contains(['?', '#', ' ']) {
                return Err(ConfigError::at(
                    format!("{at}.path_prefix"),
                    "must be a plain path",
                ));
            }
            if let Some(a) = &p.authority {
                check_header_value(&format!("{at}.authority"), a)?;
                if a.is_empty() || a.contains(['/', ' ']) {
                    return Err(ConfigError::at(
                        format!("{at}.authority"),
                        "must be a host[:port]",
                    ));
                }
            }
            let api = match p.api {
                RawApi::Openai => ApiFlavour::OpenAi,
                RawApi::Anthropic => ApiFlavour::Anthropic,
            };
            let header = p
                .api_key_header
                .clone()
                .unwrap_or_else(|| match api {
                    ApiFlavour::OpenAi => "authorization".into(),
                    ApiFlavour::Anthropic => "x-api-key".into(),
                })
                .to_ascii_lowercase();
            if header.is_empty()
                || !header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(ConfigError::at(
                    format!("{at}.api_key_header"),
                    "must be a header name",
                ));
            }
            let Some(key) = env(&p.api_key_env).filter(|k| !k.is_empty()) else {
                return Err(ConfigError::at(
                format!("{at}.api_key_env"),
                format!(
                    "environment variable `{}` is not set for the VM (list it in vm_config.environment_variables.host_env_keys)",
                    p.api_key_env
                ),
            ));
            };
            if key.bytes().any(|b| b < 0x20 || b == 0x7f) {
                return Err(ConfigError::at(
                    format!("{at}.api_key_env"),
                    format!(
                        "environment variable `{}` holds control characters",
                        p.api_key_env
                    ),
                ));
            }
            let value = if header == "authorization" {
                format!("Bearer {key}")
            } else {
                key
            };
            let limits = compile_limits(&format!("{at}.limits"), &p.limits)?;
            if p.max_in_flight == Some(0) {
                return Err(ConfigError::at(
                    format!("{at}.max_in_flight"),
                    "must be at least 1 (leave it out for no cap)",
                ));
            }
            Ok(Provider {
                limits,
                queue: p.max_in_flight.map(|capacity| QueueSpec {
                    key: keys::queue(&p.name),
                    capacity,
                }),
                name: p.name.clone(),
                api,
                cluster: p.cluster.clone(),
                fallback_cluster: p.fallback_cluster.clone(),
                path_prefix: p.path_prefix.clone(),
                authority: p.authority.clone(),
                credential: Credential::new(header.clone(), value),
                headers: provider_headers(&at, &p.headers, &header)?,
            })
        },
    )
}

fn compile_models(
    raw: &[RawModel],
    provider_ids: &HashMap<&str, ProviderId>,
) -> Result<ModelCatalog, ConfigError> {
    require(!raw.is_empty(), "models", "at least one model is required")?;
    let mut catalog = ModelCatalog::default();
    for (i, m) in raw.iter().enumerate() {
        let at = format!("models[{i}]");
        let id = id_of(&at, ModelId::from_index(i))?;
        check_model_name(&format!("{at}.name"), &m.name)?;
        if m.name.contains('*') {
            return Err(ConfigError::at(
                format!("{at}.name"),
                "a model name cannot be a pattern; put patterns in `aliases`",
            ));
        }
        let upstream = m.upstream_model.clone().unwrap_or_else(|| m.name.clone());
        check_model_name(&format!("{at}.upstream_model"), &upstream)?;
        let price = compile_price(&format!("{at}.price"), &m.price)?;
        if let Some(max) = m.max_output_tokens {
            within(format!("{at}.max_output_tokens"), max, 10_000_000, "")?;
        }
        let (deployments, fallback) = compile_deployments(&at, m, provider_ids, &upstream, price)?;
        catalog.models.push(Model {
            name: m.name.clone(),
            upstream_name: upstream,
            deployments,
            fallback,
            price,
            max_output_tokens: m.max_output_tokens,
        });
        if catalog.exact.insert(m.name.clone(), id).is_some() {
            return Err(ConfigError::at(
                format!("{at}.name"),
                format!("`{}` is defined twice", m.name),
            ));
        }
        for (j, alias) in m.aliases.iter().enumerate() {
            let here = format!("{at}.aliases[{j}]");
            check_model_name(&here, alias)?;
            if alias.contains('*') {
                catalog.patterns.push((Pattern::new(alias), id));
            } else if catalog.exact.insert(alias.clone(), id).is_some() {
                return Err(ConfigError::at(
                    here,
                    format!("`{alias}` already names another model"),
                ));
            }
        }
    }
    // Aliases may be listed before the model they would shadow; check the end state.
    for (i, m) in raw.iter().enumerate() {
        for (j, alias) in m.aliases.iter().enumerate() {
            if let Some(&owner) = catalog.exact.get(alias) {
                if catalog.models.get(owner.index()).map(|o| o.name.as_str())
                    == Some(alias.as_str())
                {
                    return Err(ConfigError::at(
                        format!("models[{i}].aliases[{j}]"),
                        format!("`{alias}` is the name of a model"),
                    ));
                }
            }
        }
    }
    Ok(catalog)
}

/// A model's `providers` (one deployment each, no fallback) or `deployments`: exactly one
/// of them, every provider known, none twice.
fn compile_deployments(
    at: &str,
    m: &RawModel,
    provider_ids: &HashMap<&str, ProviderId>,
    upstream: &str,
    price: Price,
) -> Result<(Vec<Deployment>, bool), ConfigError> {
    let provider = |here: String, name: &str| {
        provider_ids
            .get(name)
            .copied()
            .ok_or_else(|| ConfigError::at(here, format!("unknown provider `{name}`")))
    };
    let unique = |here: String, list: &[ProviderId], id: ProviderId| {
        require(
            !list.contains(&id),
            here,
            "lists a provider twice (accounts of one provider are providers of their own)",
        )
    };
    match (m.providers.is_empty(), m.deployments.is_empty()) {
        (false, false) => Err(ConfigError::at(
            format!("{at}.deployments"),
            "give either `providers` or `deployments`, not both",
        )),
        (true, true) => Err(ConfigError::at(
            format!("{at}.providers"),
            "at least one provider is required (`providers` or `deployments`)",
        )),
        (false, true) => {
            let mut seen = Vec::new();
            let mut out = Vec::new();
            for (j, name) in m.providers.iter().enumerate() {
                let id = provider(format!("{at}.providers[{j}]"), name)?;
                unique(format!("{at}.providers[{j}]"), &seen, id)?;
                seen.push(id);
                out.push(Deployment {
                    provider: id,
                    upstream_name: upstream.to_string(),
                    weight: 1,
                    rank: u32::try_from(j).unwrap_or(u32::MAX),
                    price,
                });
            }
            Ok((out, false))
        }
        (true, false) => {
            let mut seen = Vec::new();
            let mut out = Vec::new();
            for (j, d) in m.deployments.iter().enumerate() {
                let here = format!("{at}.deployments[{j}]");
                let id = provider(format!("{here}.provider"), &d.provider)?;
                unique(format!("{here}.provider"), &seen, id)?;
                seen.push(id);
                let name = d
                    .upstream_model
                    .clone()
                    .unwrap_or_else(|| upstream.to_string());
                check_model_name(&format!("{here}.upstream_model"), &name)?;
                within(format!("{here}.weight"), u64::from(d.weight), 1_000_000, "")?;
                require(
                    d.rank <= 100,
                    format!("{here}.rank"),
                    "must be between 0 and 100",
                )?;
                let price = match &d.price {
                    Some(p) => compile_price(&format!("{here}.price"), p)?,
                    None => price,
                };
                out.push(Deployment {
                    provider: id,
                    upstream_name: name,
                    weight: d.weight,
                    rank: d.rank,
                    price,
                });
            }
            Ok((out, true))
        }
    }
}

/// The `fallback` section.
fn compile_fallback(f: &RawFallback) -> Result<Fallback, ConfigError> {
    require(
        (1..=10).contains(&f.max_attempts),
        "fallback.max_attempts",
        "must be between 1 and 10",
    )?;
    for (i, s) in f.statuses.iter().enumerate() {
        require(
            (400..=599).contains(s),
            format!("fallback.statuses[{i}]"),
            "must be an HTTP error status (400-599)",
        )?;
    }
    within(
        "fallback.failures_to_cool_down",
        u64::from(f.failures_to_cool_down),
        1000,
        "",
    )?;
    within(
        "fallback.cooldown_ms",
        f.cooldown_ms,
        86_400_000,
        " (a day)",
    )?;
    within(
        "fallback.retry_after_max_ms",
        f.retry_after_max_ms,
        86_400_000,
        " (a day)",
    )?;
    require(
        f.retries <= 5,
        "fallback.retries",
        "must be between 0 and 5",
    )?;
    Ok(Fallback {
        retries: f.retries,
        max_attempts: f.max_attempts,
        statuses: f.statuses.clone(),
        failures_to_cool_down: f.failures_to_cool_down,
        cooldown_ms: f.cooldown_ms,
        retry_after_max_ms: f.retry_after_max_ms,
        deployment_header: f.deployment_header,
    })
}

fn compile_limits(at: &str, l: &RawLimits) -> Result<Limits, ConfigError> {
    let budget = match l.monthly_budget_usd {
        None => None,
        Some(usd) if usd.is_finite() && usd > 0.0 && usd <= 1e9 => {
            Some((usd * 1_000_000.0).round() as u64)
        }
        Some(_) => {
            return Err(ConfigError::at(
                format!("{at}.monthly_budget_usd"),
                "must be a USD amount above 0 and at most 1e9",
            ))
        }
    };
    Ok(Limits {
        requests_per_minute: positive(&format!("{at}.requests_per_minute"), l.requests_per_minute)?,
        tokens_per_minute: positive(&format!("{at}.tokens_per_minute"), l.tokens_per_minute)?,
        burst_milli: burst_milli(&format!("{at}.burst"), l.burst)?,
        concurrent_requests: positive(&format!("{at}.concurrent_requests"), l.concurrent_requests)?,
        monthly_tokens: positive(&format!("{at}.monthly_tokens"), l.monthly_tokens)?,
        monthly_budget_micro_usd: budget,
    })
}

/// A limit of 0 would refuse everything: almost always a mistake, so it is refused.
fn positive(at: &str, v: Option<u64>) -> Result<Option<u64>, ConfigError> {
    match v {
        Some(0) => Err(ConfigError::at(
            at,
            "must be at least 1 (leave it out for no limit)",
        )),
        Some(n) if n > 1_000_000_000_000 => Err(ConfigError::at(at, "must be at most 1e12")),
        other => Ok(other),
    }
}

fn burst_milli(at: &str, burst: Option<f64>) -> Result<u64, ConfigError> {
    match burst {
        None => Ok(1000),
        Some(b) if b.is_finite() && (1.0..=1000.0).contains(&b) => Ok((b * 1000.0).round() as u64),
        Some(_) => Err(ConfigError::at(at, "must be between 1.0 and 1000.0")),
    }
}

fn compile_price(at: &str, p: &RawPrice) -> Result<Price, ConfigError> {
    let micro = |field: &str, usd: f64| -> Result<u64, ConfigError> {
        if !usd.is_finite() || !(0.0..=1_000_000.0).contains(&usd) {
            return Err(ConfigError::at(
                format!("{at}.{field}"),
                "must be a USD amount per million tokens between 0 and 1000000",
            ));
        }
        // Rounded to whole micro-USD per million tokens; exact for any price written in cents.
        Ok((usd * 1_000_000.0).round() as u64)
    };
    let input = micro("input", p.input)?;
    Ok(Price {
        input_micro_usd_per_mtok: input,
        cached_input_micro_usd_per_mtok: match p.cached_input {
            Some(c) => micro("cached_input", c)?,
            None => input,
        },
        cache_write_micro_usd_per_mtok: match p.cache_write {
            Some(c) => micro("cache_write", c)?,
            None => input,
        },
        output_micro_usd_per_mtok: micro("output", p.output)?,
    })
}

fn compile_allow_list(
    at: &str,
    patterns: &[String],
    catalog: &ModelCatalog,
) -> Result<Vec<bool>, ConfigError> {
    let mut allowed = vec![false; catalog.models.len()];
    for (i, p) in patterns.iter().enumerate() {
        let pattern = Pattern::new(p);
        let mut matched = false;
        for (m, model) in catalog.models.iter().enumerate() {
            if pattern.matches(&model.name) {
                if let Some(slot) = allowed.get_mut(m) {
                    *slot = true;
                }
                matched = true;
            }
        }
        if !matched {
            // A pattern that matches nothing is almost always a typo that silently denies.
            return Err(ConfigError::at(
                format!("{at}[{i}]"),
                format!("`{p}` matches no model"),
            ));
        }
    }
    Ok(allowed)
}

/// `Err` at `at` with `message` unless `ok`.
fn require(ok: bool, at: impl Into<String>, message: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::at(at, message))
    }
}

/// Compiles each item of a list that must not be empty (`empty` says so).
fn each<'a, T, U>(
    at: &str,
    items: &'a [T],
    empty: &str,
    mut compile: impl FnMut(usize, &'a T) -> Result<U, ConfigError>,
) -> Result<Vec<U>, ConfigError> {
    require(!items.is_empty(), at, empty)?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| compile(i, item))
        .collect()
}

/// `value` must be between 1 and `max`; `note` explains `max` in the message.
fn within(at: impl Into<String>, value: u64, max: u64, note: &str) -> Result<(), ConfigError> {
    let ok = (1..=max).contains(&value);
    require(ok, at, &format!("must be between 1 and {max}{note}"))
}

/// The id of entry `at`; a table past `u32::MAX` entries cannot be addressed.
fn id_of<T>(at: &str, id: Option<T>) -> Result<T, ConfigError> {
    id.ok_or_else(|| ConfigError::at(at, "too many entries (at most 4294967295)"))
}

/// `name` is 1 to `max_len` bytes, each allowed by `byte_ok`; else `rule` says why not.
fn check_bytes(
    at: &str,
    name: &str,
    max_len: usize,
    byte_ok: impl Fn(u8) -> bool,
    rule: &str,
) -> Result<(), ConfigError> {
    if !name.is_empty() && name.len() <= max_len && name.bytes().all(byte_ok) {
        Ok(())
    } else {
        Err(ConfigError::at(at, format!("`{name}` must be {rule}")))
    }
}

fn check_name(at: &str, name: &str) -> Result<(), ConfigError> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let rule = "1-64 characters of letters, digits, `-`, `_` or `.`";
    check_bytes(at, name, 64, ok, rule)
}

fn check_model_name(at: &str, name: &str) -> Result<(), ConfigError> {
    // `;` and `=` would break the label encoding of stat names (see metrics.rs).
    let ok = |b: u8| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b';' | b'=');
    let rule = "1-256 printable ASCII characters without spaces, quotes, `\\`, `;` or `=`";
    check_bytes(at, name, 256, ok, rule)
}

/// Browser origins: `scheme://host[:port]`, `*` allowed in the host; never a lone `*`
/// (a tenant's key would then work from any page).
fn compile_origins(at: &str, raw: &[String]) -> Result<Vec<Pattern>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, origin) in raw.iter().enumerate() {
        let here = format!("{at}[{i}]");
        let ok_byte = |b: u8| b.is_ascii_alphanumeric() || b"-.:/*[]".contains(&b);
        let scheme_ok = origin.starts_with("https://") || origin.starts_with("http://");
        let host = origin.split_once("://").map_or("", |(_, h)| h);
        let named = host.bytes().any(|b| b.is_ascii_alphanumeric());
        if !scheme_ok || !named || host.contains('/') || !origin.bytes().all(ok_byte) {
            return Err(ConfigError::at(
                here,
                "must be an origin like `https://app.example.com` (`*` may stand for part of the host)",
            ));
        }
        out.push(Pattern::new(&origin.to_ascii_lowercase()));
    }
    Ok(out)
}

/// A provider's own headers: names a header may have, never one Sluice sets itself (the
/// credential, routing, framing) or a pseudo-header.
fn provider_headers(
    at: &str,
    raw: &std::collections::BTreeMap<String, String>,
    credential: &str,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        let here = format!("{at}.headers.{name}");
        let lower = name.to_ascii_lowercase();
        let token = |b: u8| b.is_ascii_alphanumeric() || b"-_.".contains(&b);
        let reserved = [
            credential,
            "authorization",
            "x-api-key",
            "host",
            "content-length",
            "transfer-encoding",
        ];
        let internal = lower.starts_with(crate::headers::INTERNAL_PREFIX);
        if lower.is_empty()
            || !lower.bytes().all(token)
            || internal
            || reserved.contains(&lower.as_str())
        {
            return Err(ConfigError::at(
                here,
                "must be a header name Sluice does not set itself (not the credential, host, length or an x-sluice- header)",
            ));
        }
        check_header_value(&here, value)?;
        out.push((lower, value.clone()));
    }
    Ok(out)
}

fn check_header_value(at: &str, v: &str) -> Result<(), ConfigError> {
    if v.bytes().any(|b| b < 0x20 || b == 0x7f) {
        Err(ConfigError::at(at, "must not contain control characters"))
    } else {
        Ok(())
    }
}
