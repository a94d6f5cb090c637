//! The plugin configuration as users write it, parsed strictly and compiled into a [`Policy`].
//!
//! Every struct denies unknown fields, and every error names the field at fault
//! (`tenants[1].tier: ...`), because Envoy shows our log line and nothing else.

mod compile;
#[cfg(test)]
mod tests;

use crate::policy::Policy;
use serde::Deserialize;
use std::collections::BTreeMap;
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
    /// Limits shared by every Envoy replica, in Redis through the quota service.
    #[serde(default)]
    pub global: Option<RawGlobal>,
    /// Where the response cache lives (tiers and tenants turn it on with their `cache`).
    #[serde(default)]
    pub cache_store: RawCacheStore,
    /// How a request moves to a model's next deployment (`deployments` of a model).
    #[serde(default)]
    pub fallback: RawFallback,
}

/// The `fallback` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    /// Most attempts per request, the first included (default 3).
    #[serde(default = "default_fallback_attempts")]
    pub max_attempts: u32,
    /// Provider statuses that send a request to the next deployment (default 429, 500,
    /// 502, 503, 529); must match the route's `retriable_status_codes`.
    #[serde(default = "default_fallback_statuses")]
    pub statuses: Vec<u16>,
    /// Failures in a row (those statuses, resets, connect failures) after which a
    /// deployment is skipped for `cooldown_ms` (default 3).
    #[serde(default = "default_fallback_failures")]
    pub failures_to_cool_down: u32,
    /// How long a failing deployment is skipped (default 30 s).
    #[serde(default = "default_fallback_cooldown_ms")]
    pub cooldown_ms: u64,
    /// Longest `retry-after` honoured as a skip (default 10 minutes).
    #[serde(default = "default_fallback_retry_after_max_ms")]
    pub retry_after_max_ms: u64,
    /// Adds `x-sluice-deployment` (the provider that served) to responses, for debugging.
    #[serde(default)]
    pub deployment_header: bool,
    /// Attempts at the last deployment after the chain is used up (one deployment: retries
    /// of it), on the same statuses (default 0).
    #[serde(default)]
    pub retries: u32,
}

impl Default for RawFallback {
    fn default() -> Self {
        RawFallback {
            max_attempts: default_fallback_attempts(),
            statuses: default_fallback_statuses(),
            failures_to_cool_down: default_fallback_failures(),
            cooldown_ms: default_fallback_cooldown_ms(),
            retry_after_max_ms: default_fallback_retry_after_max_ms(),
            deployment_header: false,
            retries: 0,
        }
    }
}

fn default_fallback_attempts() -> u32 {
    3
}

fn default_fallback_statuses() -> Vec<u16> {
    vec![429, 500, 502, 503, 529]
}

fn default_fallback_failures() -> u32 {
    3
}

fn default_fallback_cooldown_ms() -> u64 {
    30_000
}

fn default_fallback_retry_after_max_ms() -> u64 {
    600_000
}

/// The `cache_store` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheStore {
    /// `local` (this Envoy's shared data, the default) or `global` (Redis through the quota
    /// service of the `global` section, shared by every replica).
    #[serde(default = "default_cache_engine")]
    pub engine: String,
    /// Local: the fixed number of shared-data slots (default 1024).
    #[serde(default = "default_cache_slots")]
    pub slots: u32,
    /// Global: most bytes of entries per tenant in Redis (default 64 MiB).
    #[serde(default = "default_cache_tenant_max_bytes")]
    pub tenant_max_bytes: u64,
}

impl Default for RawCacheStore {
    fn default() -> Self {
        RawCacheStore {
            engine: default_cache_engine(),
            slots: default_cache_slots(),
            tenant_max_bytes: default_cache_tenant_max_bytes(),
        }
    }
}

fn default_cache_engine() -> String {
    "local".into()
}

fn default_cache_slots() -> u32 {
    1024
}

fn default_cache_tenant_max_bytes() -> u64 {
    64 * 1024 * 1024
}

/// A tier's or tenant's `cache`: which responses are stored and how.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// Model names or `*` patterns whose responses are cached (default: every model).
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// How long an entry serves (default 3600 s).
    #[serde(default = "default_cache_ttl_s")]
    pub ttl_s: u64,
    /// Largest response stored (default 64 KiB); larger ones pass uncached.
    #[serde(default = "default_cache_max_entry_bytes")]
    pub max_entry_bytes: u64,
    /// Requests sampled above this temperature are not cached (default 0; a request
    /// without `temperature` counts as 1, the APIs' default).
    #[serde(default)]
    pub max_temperature: f64,
    /// Share of the price a hit is charged to limits and budget (default 0: free).
    #[serde(default)]
    pub hit_price: f64,
    /// Longest an identical request waits for the one fetching its response (default 30 s).
    #[serde(default = "default_cache_wait_ms")]
    pub wait_ms: u64,
}

fn default_cache_ttl_s() -> u64 {
    3600
}

fn default_cache_max_entry_bytes() -> u64 {
    64 * 1024
}

fn default_cache_wait_ms() -> u64 {
    30_000
}

/// The `global` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGlobal {
    /// The Envoy cluster that reaches the quota service (`sluice-quota`).
    pub cluster: String,
    /// `:authority` of the callouts; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    /// Longest wait for the quota service, per call (default 50 ms).
    #[serde(default = "default_global_timeout_ms")]
    pub timeout_ms: u64,
    /// Which tenant (and tenant-on-model) limits are global, by their `limits` field name
    /// (default: the monthly quotas).
    #[serde(default = "default_global_limits")]
    pub limits: Vec<String>,
    /// Which provider-account limits are global (default: none).
    #[serde(default)]
    pub provider_limits: Vec<String>,
    /// `deny` (default: 503) or `local` (this Envoy's own limits decide).
    #[serde(default = "default_on_engine_failure")]
    pub on_engine_failure: String,
    /// Lease of a global concurrency slot, renewed while its request runs (default 30 s).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Tries to deliver a settlement before it is counted as lost (default 3).
    #[serde(default = "default_settle_attempts")]
    pub settle_attempts: u32,
}

fn default_global_timeout_ms() -> u64 {
    50
}

fn default_global_limits() -> Vec<String> {
    vec!["monthly_tokens".into(), "monthly_budget_usd".into()]
}

fn default_on_engine_failure() -> String {
    "deny".into()
}

fn default_lease_ms() -> u64 {
    30_000
}

fn default_settle_attempts() -> u32 {
    3
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
#[serde(default, deny_unknown_fields)]
pub struct RawLimits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    /// Bucket capacity = rate x burst (default 1.0: at most one minute's worth at once).
    pub burst: Option<f64>,
    pub concurrent_requests: Option<u64>,
    /// Per calendar month (UTC), input + output tokens.
    pub monthly_tokens: Option<u64>,
    /// Per calendar month (UTC), priced from the model table.
    pub monthly_budget_usd: Option<f64>,
}

impl RawLimits {
    /// `self` with every field `over` sets replaced.
    pub(crate) fn overridden_by(&self, over: &RawLimits) -> RawLimits {
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
    /// Envoy cluster for the attempts of requests with fallback (it carries Sluice's
    /// upstream filter); default `cluster`. Lets requests without fallback go through a
    /// cluster without that filter, which they would pay for.
    #[serde(default)]
    pub fallback_cluster: Option<String>,
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
    /// Headers sent to this provider with every request (e.g. `openai-organization`),
    /// replacing any the client sent.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Providers serving this model; a request goes to the first that speaks its API.
    /// Give either this or `deployments`.
    #[serde(default)]
    pub providers: Vec<String>,
    /// Where the model is served, for fallback: a request tries the deployments that speak
    /// its API, lowest `rank` first, spread by `weight` within a rank. Give either this or
    /// `providers`.
    #[serde(default)]
    pub deployments: Vec<RawDeployment>,
    /// Name the provider knows the model by; defaults to `name`.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// The most output tokens the model produces per request: a request asking for more
    /// is refused with the provider's error, and no more is ever reserved.
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    pub price: RawPrice,
}

/// One deployment of a model: a provider account and how the model is named there.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeployment {
    pub provider: String,
    /// Name the provider knows the model by; defaults to the model's `upstream_model`.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Share of the rank's requests sent here first (default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Tried only when every deployment of a lower rank is unavailable (default 0).
    #[serde(default)]
    pub rank: u32,
    /// This deployment's prices; defaults to the model's.
    #[serde(default)]
    pub price: Option<RawPrice>,
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
    /// The response cache for this tier's tenants (default: off).
    #[serde(default)]
    pub cache: Option<RawCache>,
    /// `anthropic-beta` values (or `*` patterns) this tier's clients may send; others are
    /// dropped (default: none, as betas can change what a request costs).
    #[serde(default)]
    pub anthropic_betas: Vec<String>,
    /// Lower a request's output cap to what the tenant's remaining monthly budget (and
    /// monthly tokens) can pay for, instead of refusing it (default false).
    #[serde(default)]
    pub clamp_output_to_budget: bool,
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
    /// Replaces the tier's `cache` as a whole (`models: []` turns it off).
    #[serde(default)]
    pub cache: Option<RawCache>,
    /// Browser origins (`https://app.acme.com`, or `*` patterns) whose pages may call the
    /// gateway with this tenant's keys (CORS). Default: none.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
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
    pub(crate) fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
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
    compile::policy(raw, env)
}

pub fn parse(json: &[u8]) -> Result<RawConfig, ConfigError> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::at(path, e.into_inner().to_string())
    })
}
