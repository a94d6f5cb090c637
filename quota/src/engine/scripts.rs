//! The Lua scripts, each prefixed with the helpers it shares with the others. Redis runs a
//! script atomically, so each call below is one all-or-nothing decision.

use redis::Script;

/// Helpers, the calendar and the limit kinds, in that order (each uses the ones before).
macro_rules! with_prelude {
    ($body:literal) => {
        concat!(
            include_str!("../scripts/common.lua"),
            include_str!("../scripts/calendar.lua"),
            include_str!("../scripts/limits.lua"),
            include_str!($body),
        )
    };
}

/// The helpers alone: the cache's scripts count bytes and read the clock, nothing more.
macro_rules! with_common {
    ($body:literal) => {
        concat!(include_str!("../scripts/common.lua"), include_str!($body))
    };
}

/// The calendar alone, with `month_of(ms)` defined: tests check it against
/// `sluice::limits::month_index`.
pub const CALENDAR: &str = concat!(
    include_str!("../scripts/common.lua"),
    include_str!("../scripts/calendar.lua"),
);

pub(crate) struct Scripts {
    pub(crate) admit: Script,
    pub(crate) settle: Script,
    pub(crate) renew: Script,
    pub(crate) peek: Script,
    pub(crate) cache_lookup: Script,
    pub(crate) cache_store: Script,
    pub(crate) cache_release: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            admit: Script::new(with_prelude!("../scripts/admit.lua")),
            settle: Script::new(with_prelude!("../scripts/settle.lua")),
            renew: Script::new(with_prelude!("../scripts/renew.lua")),
            peek: Script::new(with_prelude!("../scripts/peek.lua")),
            cache_lookup: Script::new(with_common!("../scripts/cache_lookup.lua")),
            cache_store: Script::new(with_common!("../scripts/cache_store.lua")),
            cache_release: Script::new(with_common!("../scripts/cache_release.lua")),
        }
    }
}
