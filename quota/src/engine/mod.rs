//! The Redis layer: each operation of the wire contract is one script call (one per
//! settlement), so every decision is atomic and uses Redis's clock.
//!
//! On Redis Cluster every key of one script must be in one hash slot. The keyspace gives a
//! tenant's keys one hash tag (`{t:acme}`) and a provider's another (`{p:openai}`), so a
//! call is split by hash tag there: a request's tenant limits are one atomic script, its
//! provider limits another, run in order, and a refusal by a later one gives back what the
//! earlier ones took (each group keeps its own reservation record, so settlement stays
//! exactly-once per group). On a single Redis (or Valkey, or a Sentinel-managed primary)
//! every call is one script, as written. The response cache's calls (`cache.rs`) name one
//! tenant's keys only, so they are one script on either.

mod cache;
mod checks;
mod reply;
mod scripts;

pub use cache::CacheAnswer;
pub use scripts::CALENDAR;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::ScriptInvocation;
use sluice::global::wire::{
    AdmitBatch, AdmitBatchReply, AdmitOutcome, AdmitReply, AdmitRequest, PeekReply, PeekRequest,
    RenewReply, RenewRequest, SettleOutcome, SettleReply, SettleRequest, Settlement,
};
use sluice::global::wire::{Lease, Reading, SettleItem};
use sluice::limits::{month_index, month_start_ms, LimitKind};
use sluice::shared::keys::{hash_tag, month_key, reservation};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::OnceCell;

use reply::Decided;
use scripts::Scripts;

/// How long a month's counters outlive the month, for late settlements and for reading.
const MONTH_KEPT_MS: u64 = 35 * 86_400_000;
/// A month can change between the service's guess and the script's run at most once in
/// practice; twice means a clock far from Redis's.
const MONTH_TRIES: usize = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The request cannot be served exactly as asked (HTTP 400).
    BadRequest(String),
    /// Redis failed or did not answer as the scripts do (HTTP 503).
    Redis(String),
}

impl From<redis::RedisError> for Error {
    fn from(error: redis::RedisError) -> Self {
        Error::Redis(format!("redis: {error}"))
    }
}

impl From<redis::ParsingError> for Error {
    fn from(error: redis::ParsingError) -> Self {
        Error::Redis(format!("redis: unexpected script reply: {error}"))
    }
}

/// Wall-clock ms since the Unix epoch.
pub type Clock = fn() -> u64;

pub fn system_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// How the service reaches Redis.
enum Redis {
    Single(ConnectionManager),
    /// Connected on first use (the service starts while the cluster is down).
    Cluster(Box<Cluster>),
}

struct Cluster {
    client: ClusterClient,
    connection: OnceCell<ClusterConnection>,
}

/// A connection for one call.
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

pub struct Engine {
    redis: Redis,
    scripts: Scripts,
    /// Only to guess the month of monthly keys; the scripts decide with Redis's clock.
    clock: Clock,
}

impl Engine {
    /// An engine for the Redis at `url`. Connects on first use and reconnects after a
    /// failure, so the service starts (and answers 503) while Redis is down.
    /// Fails only on a URL that is not one (the message says why).
    pub fn new(url: &str, clock: Clock) -> Result<Engine, String> {
        let client = redis::Client::open(url).map_err(|error| format!("redis URL: {error}"))?;
        // Fail fast while Redis is down: one quick retry, then 503 until it is back.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let redis = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|error| format!("redis: {error}"))?;
        Ok(Engine {
            redis: Redis::Single(redis),
            scripts: Scripts::new(),
            clock,
        })
    }

    /// An engine for the Redis Cluster that `nodes` (URLs) belong to; calls are split by
    /// hash slot. Connects on first use, so the service starts while the cluster is down.
    pub fn cluster(nodes: &[String], clock: Clock) -> Result<Engine, String> {
        let client = ClusterClient::builder(nodes.iter().map(String::as_str))
            .retries(1)
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(2))
            .build()
            .map_err(|error| format!("redis cluster: {error}"))?;
        Ok(Engine {
            redis: Redis::Cluster(Box::new(Cluster {
                client,
                connection: OnceCell::new(),
            })),
            scripts: Scripts::new(),
            clock,
        })
    }

    async fn connection(&self) -> Result<Connection, Error> {
        match &self.redis {
            Redis::Single(manager) => Ok(Connection::Single(manager.clone())),
            Redis::Cluster(cluster) => {
                let connection = cluster
                    .connection
                    .get_or_try_init(|| cluster.client.get_async_connection())
                    .await?;
                Ok(Connection::Cluster(connection.clone()))
            }
        }
    }

    /// The positions of `keys` grouped by hash tag, in first-seen order: one group per
    /// script. Everything is one group on a single Redis.
    fn groups<'k>(&self, keys: impl Iterator<Item = &'k str>) -> Vec<Vec<usize>> {
        let keys: Vec<&str> = keys.collect();
        if matches!(self.redis, Redis::Single(_)) {
            return vec![(0..keys.len()).collect()];
        }
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            let tag = hash_tag(key).unwrap_or(key);
            match groups.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, members)) => members.push(index),
                None => groups.push((tag, vec![index])),
            }
        }
        groups.into_iter().map(|(_, members)| members).collect()
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> Result<(), Error> {
        let ping = redis::cmd("PING");
        let _: String = match self.connection().await? {
            Connection::Single(mut c) => ping.query_async(&mut c).await?,
            Connection::Cluster(mut c) => ping.query_async(&mut c).await?,
        };
        Ok(())
    }

    /// Takes all of a request's demands, or none: one script per hash-tag group (one on a
    /// single Redis); a refusal by a later group gives back what the earlier ones took.
    pub async fn admit(&self, request: &AdmitRequest) -> Result<AdmitReply, Error> {
        let groups = self.groups(request.demands.iter().map(|d| d.key.as_str()));
        if groups.len() <= 1 {
            return self.admit_group(request).await;
        }
        let mut snapshots = vec![None; request.demands.len()];
        let mut month = 0;
        let mut taken: Vec<(AdmitRequest, u32)> = Vec::new();
        for members in &groups {
            let part = AdmitRequest {
                demands: pick(&request.demands, members),
                ..request.clone()
            };
            let decided = self.admit_group(&part).await;
            let outcome = match decided {
                Ok(AdmitReply::Admitted {
                    snapshots: part_snapshots,
                    month: part_month,
                }) => {
                    for (&i, snapshot) in members.iter().zip(part_snapshots) {
                        if let Some(slot) = snapshots.get_mut(i) {
                            *slot = Some(snapshot);
                        }
                    }
                    month = part_month;
                    taken.push((part, part_month));
                    continue;
                }
                Ok(AdmitReply::Rejected {
                    index,
                    retry_after_ms,
                    snapshot,
                }) => Ok(AdmitReply::Rejected {
                    index: members.get(index).copied().unwrap_or(index),
                    retry_after_ms,
                    snapshot,
                }),
                Err(error) => Err(error),
            };
            for (part, part_month) in &taken {
                // Best effort: what cannot be given back stays taken (conservative).
                let _ = self
                    .settle_group(&part.id, *part_month, &released(part))
                    .await;
            }
            return outcome;
        }
        Ok(AdmitReply::Admitted {
            snapshots: snapshots.into_iter().flatten().collect(),
            month,
        })
    }

    /// One script over `request`'s demands, which share a hash slot.
    async fn admit_group(&self, request: &AdmitRequest) -> Result<AdmitReply, Error> {
        checks::id(&request.id, "id")?;
        checks::duration(request.lease_ms, "lease_ms")?;
        checks::duration(request.hold_ms, "hold_ms")?;
        checks::distinct_keys(request.demands.iter().map(|demand| demand.key.as_str()))?;
        let mut limits = Vec::with_capacity(request.demands.len());
        for (index, demand) in request.demands.iter().enumerate() {
            let at = format!("demands[{index}]");
            checks::exact(demand.amount, &format!("{at}.amount"))?;
            checks::lease_amount(demand.kind, demand.amount, &format!("{at}.amount"))?;
            limits.push(checks::limit_args(demand.kind, &at)?);
        }
        let first_key = request
            .demands
            .first()
            .map_or("", |demand| demand.key.as_str());
        let record = reservation(first_key, &request.id);
        self.in_month(|month| {
            let mut call = self.scripts.admit.prepare_invoke();
            call.key(&record);
            for demand in &request.demands {
                call.key(limit_key(&demand.key, demand.kind, month));
            }
            month_args(&mut call, month);
            call.arg(&request.id)
                .arg(request.lease_ms)
                .arg(request.hold_ms);
            for (demand, limit) in request.demands.iter().zip(&limits) {
                call.arg(limit.kind)
                    .arg(demand.amount)
                    .arg(limit.first)
                    .arg(limit.second);
            }
            async move { reply::admit(self.run(&call).await?, request.demands.len()) }
        })
        .await
    }

    /// Decides each admission of a batch on its own (concurrently: the connection
    /// pipelines them), so that one that fails changes nothing for the others.
    pub async fn admit_batch(&self, batch: &AdmitBatch) -> AdmitBatchReply {
        let decisions = batch
            .admissions
            .iter()
            .map(|admission| self.admit(admission));
        let outcomes = futures_util::future::join_all(decisions)
            .await
            .into_iter()
            .map(|decided| match decided {
                Ok(reply) => AdmitOutcome::Decided(reply),
                Err(Error::BadRequest(error) | Error::Redis(error)) => {
                    AdmitOutcome::Failed { error }
                }
            })
            .collect();
        AdmitBatchReply { outcomes }
    }

    /// Settles each settlement in its own script, in order. On an error, the ones before
    /// are settled: a retry finds them `duplicate`.
    pub async fn settle(&self, request: &SettleRequest) -> Result<SettleReply, Error> {
        for (index, settlement) in request.settlements.iter().enumerate() {
            checks_settlement(settlement, &format!("settlements[{index}]"))?;
        }
        let mut outcomes = Vec::with_capacity(request.settlements.len());
        for settlement in &request.settlements {
            outcomes.push(self.settle_one(settlement).await?);
        }
        Ok(SettleReply { outcomes })
    }

    /// One settlement, one script per hash-tag group: settled if any group still had its
    /// reservation record.
    async fn settle_one(&self, settlement: &Settlement) -> Result<SettleOutcome, Error> {
        let groups = self.groups(settlement.items.iter().map(|i| i.key.as_str()));
        let mut outcome = SettleOutcome::Duplicate;
        for members in groups {
            let items = pick(&settlement.items, &members);
            if self
                .settle_group(&settlement.id, settlement.month, &items)
                .await?
                == SettleOutcome::Settled
            {
                outcome = SettleOutcome::Settled;
            }
        }
        Ok(outcome)
    }

    /// One script over `items`, which share a hash slot.
    async fn settle_group(
        &self,
        id: &str,
        month: u32,
        items: &[SettleItem],
    ) -> Result<SettleOutcome, Error> {
        let first_key = items.first().map_or("", |item| item.key.as_str());
        let mut call = self.scripts.settle.prepare_invoke();
        call.key(reservation(first_key, id));
        for item in items {
            call.key(limit_key(&item.key, item.kind, month));
        }
        call.arg(id).arg(month_expiry_ms(month));
        for item in items {
            let limit = checks::limit_args(item.kind, "")?;
            call.arg(limit.kind)
                .arg(item.reserved)
                .arg(item.actual)
                .arg(limit.first)
                .arg(limit.second);
        }
        reply::settle(self.run(&call).await?)
    }

    pub async fn renew(&self, request: &RenewRequest) -> Result<RenewReply, Error> {
        checks::duration(request.lease_ms, "lease_ms")?;
        for (index, lease) in request.leases.iter().enumerate() {
            checks::id(&lease.id, &format!("leases[{index}].id"))?;
        }
        let mut total = RenewReply {
            renewed: 0,
            lost: 0,
        };
        for members in self.groups(request.leases.iter().map(|l| l.key.as_str())) {
            let leases: Vec<Lease> = pick(&request.leases, &members);
            let mut call = self.scripts.renew.prepare_invoke();
            call.arg(request.lease_ms);
            for lease in &leases {
                call.key(&lease.key).arg(&lease.id);
            }
            let part = reply::renew(self.run(&call).await?)?;
            total.renewed += part.renewed;
            total.lost += part.lost;
        }
        Ok(total)
    }

    pub async fn peek(&self, request: &PeekRequest) -> Result<PeekReply, Error> {
        for (index, item) in request.limits.iter().enumerate() {
            checks::limit_args(item.kind, &format!("limits[{index}]"))?;
        }
        let mut readings: Vec<Option<Reading>> = vec![None; request.limits.len()];
        for members in self.groups(request.limits.iter().map(|l| l.key.as_str())) {
            let part = PeekRequest {
                limits: pick(&request.limits, &members),
            };
            let read = self.peek_group(&part).await?;
            for (&i, reading) in members.iter().zip(read.readings) {
                if let Some(slot) = readings.get_mut(i) {
                    *slot = Some(reading);
                }
            }
        }
        Ok(PeekReply {
            readings: readings.into_iter().flatten().collect(),
        })
    }

    /// One script over `request`'s limits, which share a hash slot.
    async fn peek_group(&self, request: &PeekRequest) -> Result<PeekReply, Error> {
        let mut limits = Vec::with_capacity(request.limits.len());
        for (index, item) in request.limits.iter().enumerate() {
            limits.push(checks::limit_args(item.kind, &format!("limits[{index}]"))?);
        }
        self.in_month(|month| {
            let mut call = self.scripts.peek.prepare_invoke();
            for item in &request.limits {
                call.key(limit_key(&item.key, item.kind, month));
            }
            call.arg(month).arg(month_start_ms(month.saturating_add(1)));
            for limit in &limits {
                call.arg(limit.kind).arg(limit.first).arg(limit.second);
            }
            async move { reply::peek(self.run(&call).await?, request.limits.len()) }
        })
        .await
    }

    /// Runs `attempt` with the service's month, then, if Redis's clock is in another
    /// month, once more with that one: monthly keys carry the month and must be named
    /// before the script reads Redis's clock.
    async fn in_month<T, F, Fut>(&self, attempt: F) -> Result<T, Error>
    where
        F: Fn(u32) -> Fut,
        Fut: std::future::Future<Output = Result<Decided<T>, Error>>,
    {
        let mut month = month_index((self.clock)());
        for _ in 0..MONTH_TRIES {
            match attempt(month).await? {
                Decided::Done(answer) => return Ok(answer),
                Decided::OtherMonth(redis_month) => month = redis_month,
            }
        }
        Err(Error::Redis(format!(
            "redis: the month moved again while deciding (now {})",
            month_key("", month).trim_start_matches(':')
        )))
    }

    async fn run(&self, call: &ScriptInvocation<'_>) -> Result<redis::Value, Error> {
        Ok(match self.connection().await? {
            Connection::Single(mut c) => call.invoke_async(&mut c).await?,
            Connection::Cluster(mut c) => call.invoke_async(&mut c).await?,
        })
    }
}

/// The items at `positions`, in that order.
fn pick<T: Clone>(items: &[T], positions: &[usize]) -> Vec<T> {
    positions
        .iter()
        .filter_map(|&i| items.get(i).cloned())
        .collect()
}

/// What gives back everything an admission took: each demand settled to nothing.
fn released(admission: &AdmitRequest) -> Vec<SettleItem> {
    admission
        .demands
        .iter()
        .map(|demand| SettleItem {
            key: demand.key.clone(),
            kind: demand.kind,
            reserved: demand.amount,
            actual: 0,
        })
        .collect()
}

fn checks_settlement(settlement: &Settlement, at: &str) -> Result<(), Error> {
    checks::id(&settlement.id, &format!("{at}.id"))?;
    for (index, item) in settlement.items.iter().enumerate() {
        let at = format!("{at}.items[{index}]");
        checks::exact(item.reserved, &format!("{at}.reserved"))?;
        checks::exact(item.actual, &format!("{at}.actual"))?;
        checks::limit_args(item.kind, &at)?;
    }
    Ok(())
}

/// A limit's Redis key: monthly limits add the month.
fn limit_key(key: &str, kind: LimitKind, month: u32) -> String {
    match kind {
        LimitKind::Monthly { .. } => month_key(key, month),
        LimitKind::Rate { .. } | LimitKind::Concurrency { .. } => key.to_string(),
    }
}

/// The month the service names, when it ends, and when its counters may go.
fn month_args(call: &mut ScriptInvocation<'_>, month: u32) {
    call.arg(month)
        .arg(month_start_ms(month.saturating_add(1)))
        .arg(month_expiry_ms(month));
}

fn month_expiry_ms(month: u32) -> u64 {
    month_start_ms(month.saturating_add(1)).saturating_add(MONTH_KEPT_MS)
}
