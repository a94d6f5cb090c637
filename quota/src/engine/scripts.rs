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
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            admit: Script::new(with_prelude!("../scripts/admit.lua")),
            settle: Script::new(with_prelude!("../scripts/settle.lua")),
            renew: Script::new(with_prelude!("../scripts/renew.lua")),
            peek: Script::new(with_prelude!("../scripts/peek.lua")),
        }
    }
}
