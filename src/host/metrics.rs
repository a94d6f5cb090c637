//! Envoy stats behind the pure [`Metrics`] trait: one `define_metric` per label set
//! per VM, cached by a small integer key, so the request path builds no strings.

use crate::metrics::{stat_name, MetricKey, Metrics};
use crate::policy::Policy;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MetricType};
use std::collections::HashMap;
use std::rc::Rc;

pub struct HostMetrics {
    policy: Rc<Policy>,
    ids: HashMap<MetricKey, u32>,
}

impl HostMetrics {
    pub fn new(policy: Rc<Policy>) -> Self {
        HostMetrics {
            policy,
            ids: HashMap::new(),
        }
    }

    fn id(&mut self, key: MetricKey) -> Option<u32> {
        if let Some(&id) = self.ids.get(&key) {
            return Some(id);
        }
        let kind = match key {
            MetricKey::Counter(..)
            | MetricKey::Global(..)
            | MetricKey::Cache(..)
            | MetricKey::CasRetries
            | MetricKey::Fallback(..) => MetricType::Counter,
            MetricKey::Histogram(..) | MetricKey::QueueWait(..) => MetricType::Histogram,
            MetricKey::QueueWaiting(..) | MetricKey::QueueInFlight(..) => MetricType::Gauge,
        };
        let name = stat_name(&self.policy, &key);
        match hostcalls::define_metric(kind, &name) {
            Ok(id) => {
                self.ids.insert(key, id);
                Some(id)
            }
            Err(s) => {
                let _ = hostcalls::log(
                    LogLevel::Warn,
                    &format!("sluice: define_metric {name}: {s:?}"),
                );
                None
            }
        }
    }
}

impl Metrics for HostMetrics {
    fn add(&mut self, key: MetricKey, value: u64) {
        let Some(id) = self.id(key) else { return };
        // Defining the series was the point (it exists at 0 from now on).
        if value == 0
            && matches!(
                key,
                MetricKey::Counter(..) | MetricKey::Global(..) | MetricKey::CasRetries
            )
        {
            return;
        }
        let result = match key {
            MetricKey::Counter(..)
            | MetricKey::Global(..)
            | MetricKey::Cache(..)
            | MetricKey::CasRetries
            | MetricKey::Fallback(..) => {
                hostcalls::increment_metric(id, i64::try_from(value).unwrap_or(i64::MAX))
            }
            // Histograms take a sample, gauges take the value.
            MetricKey::Histogram(..)
            | MetricKey::QueueWait(..)
            | MetricKey::QueueWaiting(..)
            | MetricKey::QueueInFlight(..) => hostcalls::record_metric(id, value),
        };
        if let Err(s) = result {
            let _ = hostcalls::log(
                LogLevel::Warn,
                &format!("sluice: metric update failed: {s:?}"),
            );
        }
    }
}

/// Drops metrics when the real ones are busy (a re-entrant callback); records still count.
pub struct NoMetrics;

impl Metrics for NoMetrics {
    fn add(&mut self, _key: MetricKey, _value: u64) {}
}
