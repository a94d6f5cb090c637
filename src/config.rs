//! The plugin configuration as users write it, parsed strictly and compiled into a [`Policy`].
//!
//! Every struct denies unknown fields, and every error names the field at fault
//! (`tenants[1].tier: ...`), because Envoy shows our log line and nothing else.

use crate::auth::{KeyDigest, KeyIndex};
use crate::errors::ApiFlavour;
use crate::policy::{
    Credential, Limits, Model, ModelCatalog, Policy, Price, Provider, Queueing, Tenant,
};
use crate::routing::Pattern;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// Default request body limit: 1 MiB, Envoy's default connection buffer limit.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;
/// Output tokens reserved for a request that sets no maximum.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Output tokens reserved at admission when a request sets no `max_tokens`
    /// (`max_completion_tokens`, `max_output_tokens`).
    #[serde(default = "default_max_output_tokens")]
    pub default_max_output_tokens: u64,
    pub providers: Vec<RawProvider>,
    pub models: Vec<RawModel>,
    pub tiers: BTreeMap<String, RawTier>,
    pub tenants: Vec<RawTenant>,
}

fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}

fn default_max_output_tokens() -> u64 {
    DEFAULT_MAX_OUTPUT_TOKENS
}

/// Limits of a tier, a tenant (overriding its tier field by field) or a tenant+model.
/// An absent field means no limit (or, in an override, the tier's value).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Bucket capacity = rate x burst (default 1.0: at most one minute's worth at once).
    #[serde(default)]
    pub burst: Option<f64>,
    #[serde(default)]
    pub concurrent_requests: Option<u64>,
    /// Per calendar month (UTC), input + output tokens.
    #[serde(default)]
    pub monthly_tokens: Option<u64>,
    /// Per calendar month (UTC), priced from the model table.
    #[serde(default)]
    pub monthly_budget_usd: Option<f64>,
}

impl RawLimits {
    /// `self` with every field `over` sets replaced.
    fn overridden_by(&self, over: &RawLimits) -> RawLimits {
        RawLimits {
            requests_per_minute: over.requests_per_minute.or(self.requests_per_minute),
            tokens_per_minute: over.tokens_per_minute.or(self.tokens_per_minute),
            burst: over.burst.or(self.burst),
            concurrent_requests: over.concurrent_requests.or(self.concurrent_requests),
            monthly_tokens: over.monthly_tokens.or(self.monthly_tokens),
            monthly_budget_usd: over.monthly_budget_usd.or(self.monthly_budget_usd),
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawApi {
    Openai,
    Anthropic,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub name: String,
    pub api: RawApi,
    /// Envoy cluster that reaches this provider.
    pub cluster: String,
    /// Prepended to the endpoint (`/chat/completions`, `/messages`, ...). `"/v1"` for OpenAI.
    #[serde(default)]
    pub path_prefix: String,
    /// Host sent upstream; the client's is kept when absent.
    #[serde(default)]
    pub authority: Option<String>,
    /// Environment variable (exposed to the VM) holding the provider key.
    pub api_key_env: String,
    /// Header that carries the key. Default: `authorization` (as `Bearer <key>`) for
    /// `openai`, `x-api-key` for `anthropic`.
    #[serde(default)]
    pub api_key_header: Option<String>,
    /// The provider account's own limits, so the gateway never trips the provider's 429.
    #[serde(default)]
    pub limits: RawLimits,
    /// Most requests in flight to this provider, across all workers; more wait in a fair
    /// queue (by tier priority, then weight) instead of failing.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Providers serving this model; a request goes to the first that speaks its API.
    pub providers: Vec<String>,
    /// Name the provider knows the model by; defaults to `name`.
    #[serde(default)]
    pub upstream_model: Option<String>,
    pub price: RawPrice,
}

/// USD per million tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input: f64,
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Cache creation (Anthropic cache writes); defaults to `input`.
    #[serde(default)]
    pub cache_write: Option<f64>,
    #[serde(default)]
    pub output: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    /// Model names or `*` patterns this tier may use.
    pub models: Vec<String>,
    #[serde(default)]
    pub limits: RawLimits,
    /// When a provider is full: higher priority is served first (default 0).
    #[serde(default)]
    pub priority: u8,
    /// Share of the provider among tenants of equal priority (default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Longest a request of this tier waits for a full provider (default 30 s).
    #[serde(default = "default_max_queue_wait_ms")]
    pub max_queue_wait_ms: u64,
}

fn default_weight() -> u32 {
    1
}

fn default_max_queue_wait_ms() -> u64 {
    30_000
}

fn default_max_queue_length() -> u32 {
    100
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub id: String,
    pub tier: String,
    pub keys: Vec<RawKey>,
    /// Replaces the tier's model allow-list for this tenant.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Overrides the tier's limits, field by field.
    #[serde(default)]
    pub limits: RawLimits,
    /// Extra limits for this tenant on one model (by model name), checked with the others.
    #[serde(default)]
    pub model_limits: BTreeMap<String, RawLimits>,
    /// Most requests this tenant may have waiting for one full provider (default 100).
    #[serde(default = "default_max_queue_length")]
    pub max_queue_length: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    /// Names the key in logs and metrics; never the key itself.
    pub id: String,
    /// Lowercase hex SHA-256 of the key.
    pub sha256: String,
}

/// A configuration the filter refuses, with the place it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            write!(f, "invalid sluice configuration: {}", self.message)
        } else {
            write!(
                f,
                "invalid sluice configuration at `{}`: {}",
                self.path, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parses and compiles a configuration. `env` resolves provider key variables.
pub fn compile(json: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Policy, ConfigError> {
    let raw = parse(json)?;
    compile_raw(raw, env)
}

pub fn parse(json: &[u8]) -> Result<RawConfig, ConfigError> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::at(path, e.into_inner().to_string())
    })
}

fn compile_raw(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Policy, ConfigError> {
    if raw.max_body_bytes == 0 || raw.max_body_bytes > 64 * 1024 * 1024 {
        return Err(ConfigError::at(
            "max_body_bytes",
            "must be between 1 and 67108864 (64 MiB)",
        ));
    }

    let providers = compile_providers(&raw.providers, env)?;
    let provider_ids: HashMap<&str, usize> = providers
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    let catalog = compile_models(&raw.models, &provider_ids)?;

    if raw.tiers.is_empty() {
        return Err(ConfigError::at("tiers", "at least one tier is required"));
    }
    let mut allow_sets: Vec<Vec<bool>> = Vec::new();
    let mut tier_sets: HashMap<&str, usize> = HashMap::new();
    for (name, tier) in &raw.tiers {
        check_name(&format!("tiers.{name}"), name)?;
        compile_limits(&format!("tiers.{name}.limits"), &tier.limits)?;
        if tier.weight == 0 || tier.weight > 1000 {
            return Err(ConfigError::at(
                format!("tiers.{name}.weight"),
                "must be between 1 and 1000",
            ));
        }
        if tier.max_queue_wait_ms == 0 || tier.max_queue_wait_ms > 600_000 {
            return Err(ConfigError::at(
                format!("tiers.{name}.max_queue_wait_ms"),
                "must be between 1 and 600000 (10 minutes)",
            ));
        }
        let set = compile_allow_list(&format!("tiers.{name}.models"), &tier.models, &catalog)?;
        tier_sets.insert(name.as_str(), allow_sets.len());
        allow_sets.push(set);
    }

    let mut tenants = Vec::with_capacity(raw.tenants.len());
    let mut keys = KeyIndex::default();
    let mut tenant_ids = HashSet::new();
    for (t, rt) in raw.tenants.iter().enumerate() {
        let at = format!("tenants[{t}]");
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
        if rt.keys.is_empty() {
            return Err(ConfigError::at(
                format!("{at}.keys"),
                "a tenant needs at least one key",
            ));
        }
        let mut key_ids = Vec::with_capacity(rt.keys.len());
        for (k, key) in rt.keys.iter().enumerate() {
            check_name(&format!("{at}.keys[{k}].id"), &key.id)?;
            let digest = KeyDigest::from_hex(&key.sha256).ok_or_else(|| {
                ConfigError::at(
                    format!("{at}.keys[{k}].sha256"),
                    "must be 64 hex characters (the SHA-256 of the key; see `make key`)",
                )
            })?;
            if !keys.insert(digest, t, k) {
                return Err(ConfigError::at(
                    format!("{at}.keys[{k}].sha256"),
                    "this key digest is already used by another key",
                ));
            }
            key_ids.push(key.id.clone());
        }
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
        if rt.max_queue_length == 0 || rt.max_queue_length > 4096 {
            return Err(ConfigError::at(
                format!("{at}.max_queue_length"),
                "must be between 1 and 4096",
            ));
        }
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
        });
    }

    if raw.default_max_output_tokens == 0 || raw.default_max_output_tokens > 10_000_000 {
        return Err(ConfigError::at(
            "default_max_output_tokens",
            "must be between 1 and 10000000",
        ));
    }
    Ok(Policy {
        max_body_bytes: raw.max_body_bytes,
        default_max_output_tokens: raw.default_max_output_tokens,
        providers,
        catalog,
        tenants,
        keys,
        allow_sets,
    })
}

fn compile_providers(
    raw: &[RawProvider],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Provider>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::at(
            "providers",
            "at least one provider is required",
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        let at = format!("providers[{i}]");
        check_name(&format!("{at}.name"), &p.name)?;
        if !seen.insert(p.name.as_str()) {
            return Err(ConfigError::at(
                format!("{at}.name"),
                format!("duplicate provider `{}`", p.name),
            ));
        }
        check_header_value(&format!("{at}.cluster"), &p.cluster)?;
        if p.cluster.is_empty() {
            return Err(ConfigError::at(
                format!("{at}.cluster"),
                "must not be empty",
            ));
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
        out.push(Provider {
            limits,
            max_in_flight: p.max_in_flight,
            name: p.name.clone(),
            api,
            cluster: p.cluster.clone(),
            path_prefix: p.path_prefix.clone(),
            authority: p.authority.clone(),
            credential: Credential::new(header, value),
        });
    }
    Ok(out)
}

fn compile_models(
    raw: &[RawModel],
    provider_ids: &HashMap<&str, usize>,
) -> Result<ModelCatalog, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::at("models", "at least one model is required"));
    }
    let mut catalog = ModelCatalog::default();
    for (i, m) in raw.iter().enumerate() {
        let at = format!("models[{i}]");
        check_model_name(&format!("{at}.name"), &m.name)?;
        if m.name.contains('*') {
            return Err(ConfigError::at(
                format!("{at}.name"),
                "a model name cannot be a pattern; put patterns in `aliases`",
            ));
        }
        if m.providers.is_empty() {
            return Err(ConfigError::at(
                format!("{at}.providers"),
                "at least one provider is required",
            ));
        }
        let mut providers = Vec::with_capacity(m.providers.len());
        for (j, p) in m.providers.iter().enumerate() {
            let Some(&id) = provider_ids.get(p.as_str()) else {
                return Err(ConfigError::at(
                    format!("{at}.providers[{j}]"),
                    format!("unknown provider `{p}`"),
                ));
            };
            providers.push(id);
        }
        let upstream = m.upstream_model.clone().unwrap_or_else(|| m.name.clone());
        check_model_name(&format!("{at}.upstream_model"), &upstream)?;
        let price = compile_price(&format!("{at}.price"), &m.price)?;
        let id = catalog.models.len();
        catalog.models.push(Model {
            name: m.name.clone(),
            upstream_name: upstream,
            providers,
            price,
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
                if catalog.models.get(owner).map(|o| o.name.as_str()) == Some(alias.as_str()) {
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

fn check_name(at: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::at(
            at,
            format!("`{name}` must be 1-64 characters of letters, digits, `-`, `_` or `.`"),
        ))
    }
}

fn check_model_name(at: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            // `;` and `=` would break the label encoding of stat names (see metrics.rs).
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b';' | b'='));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::at(
            at,
            format!("`{name}` must be 1-256 printable ASCII characters without spaces, quotes, `\\`, `;` or `=`"),
        ))
    }
}

fn check_header_value(at: &str, v: &str) -> Result<(), ConfigError> {
    if v.bytes().any(|b| b < 0x20 || b == 0x7f) {
        Err(ConfigError::at(at, "must not contain control characters"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::sha256_hex;

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
                &|v: &mut serde_json::Value| {
                    v["tenants"][0]["keys"][0]["key"] = "sk-inline-1".into()
                },
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
        v["tiers"]["gold"]["limits"] = serde_json::json!({"requests_per_minute": 100, "tokens_per_minute": 1000, "burst": 2.0});
        v["tenants"][0]["limits"] =
            serde_json::json!({"tokens_per_minute": 50, "monthly_budget_usd": 5.25});
        v["tenants"][0]["model_limits"] =
            serde_json::json!({"gpt-4.1": {"requests_per_minute": 3}});
        v["providers"][0]["limits"] = serde_json::json!({"requests_per_minute": 500});
        let p = compile_value(&v).unwrap();
        let l = &p.tenants[0].limits;
        assert_eq!(l.requests_per_minute, Some(100));
        assert_eq!(l.tokens_per_minute, Some(50));
        assert_eq!(l.burst_milli, 2000);
        assert_eq!(l.concurrent_requests, None);
        assert_eq!(l.monthly_budget_micro_usd, Some(5_250_000));
        assert_eq!(p.tenants[0].model_limits[&0].requests_per_minute, Some(3));
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
}
