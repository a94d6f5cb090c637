//! The compiled, immutable policy every request is judged against.

use crate::auth::KeyIndex;
use crate::errors::ApiFlavour;
use crate::routing::Pattern;
use std::collections::HashMap;
use std::fmt;

pub type TenantId = usize;
pub type ModelId = usize;
pub type ProviderId = usize;

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
}

impl Policy {
    pub fn tenant(&self, id: TenantId) -> Option<&Tenant> {
        self.tenants.get(id)
    }

    pub fn model(&self, id: ModelId) -> Option<&Model> {
        self.catalog.models.get(id)
    }

    pub fn provider(&self, id: ProviderId) -> Option<&Provider> {
        self.providers.get(id)
    }

    pub fn may_use(&self, tenant: TenantId, model: ModelId) -> bool {
        self.tenants
            .get(tenant)
            .and_then(|t| self.allow_sets.get(t.allow_set))
            .and_then(|set| set.get(model))
            .copied()
            .unwrap_or(false)
    }

    /// Models the tenant may use, in configuration order.
    pub fn models_for(&self, tenant: TenantId) -> impl Iterator<Item = &Model> {
        self.catalog
            .models
            .iter()
            .enumerate()
            .filter(move |(id, _)| self.may_use(tenant, *id))
            .map(|(_, m)| m)
    }

    /// The first provider of `model` that speaks `api`.
    pub fn provider_for(&self, model: ModelId, api: ApiFlavour) -> Option<(ProviderId, &Provider)> {
        self.model(model)?
            .providers
            .iter()
            .filter_map(|&id| self.provider(id).map(|p| (id, p)))
            .find(|(_, p)| p.api == api)
    }
}

#[derive(Debug)]
pub struct Tenant {
    pub id: String,
    pub tier: String,
    pub key_ids: Vec<String>,
    pub allow_set: usize,
    pub limits: Limits,
    pub model_limits: HashMap<ModelId, Limits>,
    pub queueing: Queueing,
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
    pub providers: Vec<ProviderId>,
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
    /// Requests in flight across all workers before new ones queue.
    pub max_in_flight: Option<u32>,
    pub name: String,
    pub api: ApiFlavour,
    pub cluster: String,
    pub path_prefix: String,
    pub authority: Option<String>,
    pub credential: Credential,
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
