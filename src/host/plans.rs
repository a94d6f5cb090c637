//! This worker's fallback plans, shared by the downstream filter (which registers a
//! request's plan when it routes it, and takes it back at `on_log`) and the upstream filter
//! (which rewrites and records each attempt). Both plugins run in this one VM: Envoy gives
//! plugins with the same `vm_id` and identical `vm_config` one VM per worker.

use crate::fallback::{Plan, PlanTable, Plans};
use crate::policy::Policy;
use std::rc::Rc;

thread_local! {
    static PLANS: PlanTable<Rc<Policy>> = PlanTable::default();
}

/// The registry seen from one configuration: plans registered through it carry its policy.
#[derive(Clone)]
pub(super) struct HostPlans {
    pub(super) policy: Rc<Policy>,
}

impl Plans for HostPlans {
    fn register(&self, id: &str, plan: Plan) -> bool {
        PLANS.with(|t| t.register_with(id, plan, self.policy.clone()))
    }

    fn take(&self, id: &str) -> Option<Plan> {
        PLANS.with(|t| t.remove(id))
    }
}

/// Runs `f` on request `id`'s plan and the policy it was made under, if it has one.
pub(super) fn with_plan<T>(id: &str, f: impl FnOnce(&mut Plan, &Policy) -> T) -> Option<T> {
    PLANS.with(|t| t.with(id, |plan, policy| f(plan, policy)))
}
