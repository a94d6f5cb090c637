//! The compiled, immutable policy every request is judged against.

use crate::auth::KeyIndex;
use crate::errors::ApiFlavour;
use crate::routing::Pattern;
use std::collections::HashMap;
use std::fmt;

/// Defines an id type: the position of an entry in one of the policy's tables, so that an
/// index into one table can never be used for another.
macro_rules! policy_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(u32);

        impl $name {
            pub const fn new(index: u32) -> Self {
                $name(index)
            }

            /// The id of the entry at `index`; `None` past `u32::MAX` entries.
            pub fn from_index(index: usize) -> Option<Self> {
                u32::try_from(index).ok().map($name)
            }

            /// The entry's position in its table.
            pub fn index(self) -> usize {
                usize::try_from(self.0).unwrap_or(usize::MAX)
            }
        }
    };
}

policy_id!(
    /// A tenant, by its position in the configuration's `tenants`.
    TenantId
);
policy_id!(
    /// A model of the catalogue, by its position in the configuration's `models`.
    ModelId
);
policy_id!(
    /// A provider account, by its position in the configuration's `providers`.
    ProviderId
);
policy_id!(
    /// One of a tenant's keys, by its position in that tenant's `keys`.
    KeyId
);

#[derive(Debug)]
pub struct Policy {
    pub max_body_bytes: u64,
    pub default_max_output_tokens: u64,
    pub providers: Vec<Provider>,
    pub catalog: ModelCatalog,
    pub tenants: Vec<Tenant>,
    pub keys: KeyIndex,
    /// Allow-lists by model id, shared by the tenants of a tier.
    pub allow_sets: Vec<Vec<bool>>,
    /// Which limits live in Redis, through the quota service; `None`: all are local.
    pub global: Option<GlobalLimits>,
    /// Where cached responses live.
    pub cache_store: crate::cache::CacheStore,
    /// How requests move to a model's next deployment.
    pub fallback: crate::fallback::Fallback,
}

/// The `global` section: which limits are decided by the quota service (over Redis) for
/// every Envoy replica at once, and how this Envoy talks to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalLimits {
    /// The Envoy cluster of the quota service.
    pub cluster: String,
    /// `:authority` of the callouts.
    pub authority: String,
    /// Longest wait for one callout.
    pub timeout_ms: u64,
    /// Tenant and tenant-on-model limits that are global.
    pub tenant_measures: MeasureSet,
    /// Provider-account limits that are global.
    pub provider_measures: MeasureSet,
    pub on_engine_failure: OnEngineFailure,
    /// A global concurrency slot's lease, renewed while its request runs.
    pub lease_ms: u64,
    /// Tries to deliver one settlement before it is counted as lost.
    pub settle_attempts: u32,
}

impl GlobalLimits {
    /// Whether the limit `id` is decided by the quota service.
    pub fn covers(&self, id: LimitId) -> bool {
        match id.scope {
            LimitScope::Tenant | LimitScope::TenantModel => {
                self.tenant_measures.contains(id.measure)
            }
            LimitScope::Provider => self.provider_measures.contains(id.measure),
        }
    }
}

/// What a request gets when the quota service does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnEngineFailure {
    /// A 503 `quota_engine_unavailable`.
    Deny,
    /// This Envoy's own (local) limits decide instead; never no limit at all.
    Local,
}

/// A set of [`LimitMeasure`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MeasureSet(u8);

impl MeasureSet {
    pub fn with(self, measure: LimitMeasure) -> Self {
        MeasureSet(self.0 | measure.bit())
    }

    pub fn contains(self, measure: LimitMeasure) -> bool {
        self.0 & measure.bit() != 0
    }
}

impl Policy {
    /// One line for the log when a configuration is taken.
    pub fn summary(&self) -> String {
        format!(
            "sluice: configured {} tenants, {} keys, {} models, {} providers",
            self.tenants.len(),
            self.keys.len(),
            self.catalog.models.len(),
            self.providers.len()
        )
    }

    pub fn tenant(&self, id: TenantId) -> Option<&Tenant> {
        self.tenants.get(id.index())
    }

    pub fn model(&self, id: ModelId) -> Option<&Model> {
        self.catalog.models.get(id.index())
    }

    pub fn provider(&self, id: ProviderId) -> Option<&Provider> {
        self.providers.get(id.index())
    }

    /// Every provider with its id, in configuration order.
    pub fn providers_by_id(&self) -> impl Iterator<Item = (ProviderId, &Provider)> {
        self.providers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((ProviderId::from_index(i)?, p)))
    }

    pub fn may_use(&self, tenant: TenantId, model: ModelId) -> bool {
        self.tenant(tenant)
            .and_then(|t| self.allow_sets.get(t.allow_set))
            .and_then(|set| set.get(model.index()))
            .copied()
            .unwrap_or(false)
    }

    /// The cache rule for `tenant`'s requests to `model`, if they are cached.
    pub fn cache_rule(&self, tenant: TenantId, model: ModelId) -> Option<&crate::cache::CacheRule> {
        let rule = self.tenant(tenant)?.cache.as_ref()?;
        rule.models
            .get(model.index())
            .copied()
            .unwrap_or(false)
            .then_some(rule)
    }

    /// Whether some tenant lets pages of `origin` call the gateway (a preflight carries no
    /// key, so it is answered for the union).
    pub fn any_tenant_allows(&self, origin: &str) -> bool {
        self.tenants
            .iter()
            .any(|t| t.allowed_origins.iter().any(|p| p.matches(origin)))
    }

    /// Models the tenant may use, in configuration order.
    pub fn models_for(&self, tenant: TenantId) -> impl Iterator<Item = &Model> {
        self.catalog
            .models
            .iter()
            .enumerate()
            .filter(move |(i, _)| ModelId::from_index(*i).is_some_and(|m| self.may_use(tenant, m)))
            .map(|(_, m)| m)
    }
}

impl Tenant {
    pub fn key_id(&self, key: KeyId) -> Option<&str> {
        self.key_ids.get(key.index()).map(String::as_str)
    }
}

#[derive(Debug)]
pub struct Tenant {
    pub id: String,
    pub tier: String,
    /// Key ids (never the keys), by [`KeyId`].
    pub key_ids: Vec<String>,
    pub allow_set: usize,
    pub limits: Limits,
    pub model_limits: HashMap<ModelId, Limits>,
    pub queueing: Queueing,
    /// Its response cache (from its tier, or its own); `None`: off.
    pub cache: Option<crate::cache::CacheRule>,
    /// `anthropic-beta` values its tier lets through.
    pub anthropic_betas: Vec<Pattern>,
    /// Its tier lowers output caps to what its monthly budget can still pay for.
    pub clamp_output_to_budget: bool,
    /// Browser origins allowed to use its keys.
    pub allowed_origins: Vec<Pattern>,
}

/// Client headers that select an account or a billing target at a provider, or carry a
/// credential of its own: never forwarded (Sluice's key decides who pays). A provider's
/// own values come from its `headers`.
pub const ACCOUNT_HEADERS: [&str; 5] = [
    "openai-organization",
    "openai-project",
    "x-goog-user-project",
    "x-goog-api-key",
    "api-key",
];

impl Tenant {
    /// The comma-separated `anthropic-beta` values of `header` this tenant may send.
    pub fn allowed_betas(&self, header: &str) -> String {
        header
            .split(',')
            .map(str::trim)
            .filter(|beta| !beta.is_empty() && self.anthropic_betas.iter().any(|p| p.matches(beta)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// How a tenant waits for a full provider (from its tier, queue length its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queueing {
    pub priority: u8,
    pub weight: u32,
    pub max_wait_ms: u64,
    pub max_queue_length: u32,
}

/// Compiled limits; `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    /// Bucket capacity = rate x burst_milli / 1000.
    pub burst_milli: u64,
    pub concurrent_requests: Option<u64>,
    pub monthly_tokens: Option<u64>,
    pub monthly_budget_micro_usd: Option<u64>,
}

#[derive(Debug)]
pub struct Model {
    pub name: String,
    pub upstream_name: String,
    /// Where it is served, in configuration order.
    pub deployments: Vec<Deployment>,
    /// Configured with `deployments`: a request may fall back to the next one. With
    /// `providers`, it goes to the first that speaks its API, and only there.
    pub fallback: bool,
    pub price: Price,
    /// The most output tokens it produces per request, when configured.
    pub max_output_tokens: Option<u64>,
}

impl Provider {
    /// The cluster of the request's attempts: its fallback cluster when the request has
    /// several deployments to try.
    pub fn cluster_for(&self, fallback: bool) -> &str {
        match (&self.fallback_cluster, fallback) {
            (Some(c), true) => c,
            _ => &self.cluster,
        }
    }
}

/// One deployment of a model: a provider account and the model's name and price there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    pub provider: ProviderId,
    pub upstream_name: String,
    pub weight: u32,
    pub rank: u32,
    pub price: Price,
}

/// Prices in integer micro-USD per million tokens, so cost arithmetic is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input_micro_usd_per_mtok: u64,
    pub cached_input_micro_usd_per_mtok: u64,
    pub cache_write_micro_usd_per_mtok: u64,
    pub output_micro_usd_per_mtok: u64,
}

#[derive(Debug, Default)]
pub struct ModelCatalog {
    pub models: Vec<Model>,
    /// Names and literal aliases.
    pub exact: HashMap<String, ModelId>,
    /// `*` aliases, tried in configuration order after exact names.
    pub patterns: Vec<(Pattern, ModelId)>,
}

impl ModelCatalog {
    pub fn resolve(&self, requested: &str) -> Option<ModelId> {
        if let Some(&id) = self.exact.get(requested) {
            return Some(id);
        }
        self.patterns
            .iter()
            .find(|(p, _)| p.matches(requested))
            .map(|(_, id)| *id)
    }
}

#[derive(Debug)]
pub struct Provider {
    pub limits: Limits,
    /// The provider's fair queue, when it has a capacity (`max_in_flight`).
    pub queue: Option<QueueSpec>,
    pub name: String,
    pub api: ApiFlavour,
    pub cluster: String,
    /// The cluster of requests with fallback, when it is another (see the configuration).
    pub fallback_cluster: Option<String>,
    pub path_prefix: String,
    pub authority: Option<String>,
    pub credential: Credential,
    /// Headers set on every request to it (lowercase names).
    pub headers: Vec<(String, String)>,
}

/// A provider's fair queue: requests in flight across all workers before new ones wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Its shared-data key (`shared/keys.rs`).
    pub key: String,
    pub capacity: u32,
}

/// The provider key as the header to send; its value never prints.
pub struct Credential {
    header: String,
    value: String,
}

impl Credential {
    pub fn new(header: String, value: String) -> Self {
        Credential { header, value }
    }
    pub fn header(&self) -> &str {
        &self.header
    }
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}: <redacted>)", self.header)
    }
}

/// Whose limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitScope {
    Tenant,
    TenantModel,
    Provider,
}

/// What a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitMeasure {
    RequestsPerMinute,
    TokensPerMinute,
    ConcurrentRequests,
    MonthlyTokens,
    MonthlyBudget,
}

impl LimitMeasure {
    pub const ALL: [LimitMeasure; 5] = [
        LimitMeasure::RequestsPerMinute,
        LimitMeasure::TokensPerMinute,
        LimitMeasure::ConcurrentRequests,
        LimitMeasure::MonthlyTokens,
        LimitMeasure::MonthlyBudget,
    ];

    /// The name of its field in the configuration's `limits`.
    pub fn config_name(self) -> &'static str {
        match self {
            LimitMeasure::RequestsPerMinute => "requests_per_minute",
            LimitMeasure::TokensPerMinute => "tokens_per_minute",
            LimitMeasure::ConcurrentRequests => "concurrent_requests",
            LimitMeasure::MonthlyTokens => "monthly_tokens",
            LimitMeasure::MonthlyBudget => "monthly_budget_usd",
        }
    }

    fn bit(self) -> u8 {
        match self {
            LimitMeasure::RequestsPerMinute => 1,
            LimitMeasure::TokensPerMinute => 2,
            LimitMeasure::ConcurrentRequests => 4,
            LimitMeasure::MonthlyTokens => 8,
            LimitMeasure::MonthlyBudget => 16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LimitId {
    pub scope: LimitScope,
    pub measure: LimitMeasure,
}

impl LimitId {
    /// Monthly limits are quotas: exhausted until the month ends, not worth retrying.
    pub fn is_quota(self) -> bool {
        matches!(
            self.measure,
            LimitMeasure::MonthlyTokens | LimitMeasure::MonthlyBudget
        )
    }

    pub fn reason(self) -> &'static str {
        use LimitMeasure::*;
        use LimitScope::*;
        match (self.scope, self.measure) {
            (Tenant, RequestsPerMinute) => "requests_per_minute",
            (Tenant, TokensPerMinute) => "tokens_per_minute",
            (Tenant, ConcurrentRequests) => "concurrent_requests",
            (Tenant, MonthlyTokens) => "monthly_tokens",
            (Tenant, MonthlyBudget) => "monthly_budget",
            (TenantModel, RequestsPerMinute) => "model_requests_per_minute",
            (TenantModel, TokensPerMinute) => "model_tokens_per_minute",
            (TenantModel, ConcurrentRequests) => "model_concurrent_requests",
            (TenantModel, MonthlyTokens) => "model_monthly_tokens",
            (TenantModel, MonthlyBudget) => "model_monthly_budget",
            (Provider, RequestsPerMinute) => "provider_requests_per_minute",
            (Provider, TokensPerMinute) => "provider_tokens_per_minute",
            (Provider, ConcurrentRequests) => "provider_concurrent_requests",
            (Provider, MonthlyTokens) => "provider_monthly_tokens",
            (Provider, MonthlyBudget) => "provider_monthly_budget",
        }
    }
}
