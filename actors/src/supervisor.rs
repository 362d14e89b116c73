//! Erlang restart intensity, shared by every supervisor in the tree.
//!
//! ractor has no restart strategies of its own: a supervisor receives `SupervisionEvent::ActorFailed` and
//! decides. Each family supervisor (today: conversations) keeps one [`RestartBudget`]: a failed child is
//! restarted while fewer than `max_restarts` happened in the last `window`; past that the supervisor fails
//! itself — it escalates — and the root stops the node, as an Erlang application whose top supervisor exits.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// At most `max_restarts` restarts in any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartIntensity {
    /// Restarts allowed inside the window.
    pub max_restarts: u32,
    /// The sliding window.
    pub window: Duration,
}

impl Default for RestartIntensity {
    fn default() -> Self {
        Self {
            max_restarts: 20,
            window: Duration::from_secs(10),
        }
    }
}

/// What a supervisor does with a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Restart the child.
    Restart,
    /// Too many restarts: fail the supervisor.
    Escalate,
}

/// The failures a supervisor has seen recently.
#[derive(Debug, Clone)]
pub struct RestartBudget {
    intensity: RestartIntensity,
    recent: VecDeque<Instant>,
}

impl RestartBudget {
    /// A fresh budget.
    pub fn new(intensity: RestartIntensity) -> Self {
        Self {
            intensity,
            recent: VecDeque::new(),
        }
    }

    /// Record a failure at `now` and decide.
    pub fn on_failure(&mut self, now: Instant) -> Decision {
        while let Some(&oldest) = self.recent.front() {
            if now.duration_since(oldest) >= self.intensity.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() >= self.intensity.max_restarts as usize {
            return Decision::Escalate;
        }
        self.recent.push_back(now);
        Decision::Restart
    }
}

/// The error a supervisor fails with when it escalates.
#[derive(Debug, thiserror::Error)]
#[error("{family} supervisor: more than {max} restarts in {window:?}, escalating")]
pub struct Escalation {
    /// Which family.
    pub family: &'static str,
    /// The intensity's limit.
    pub max: u32,
    /// The intensity's window.
    pub window: Duration,
}

impl Escalation {
    /// The escalation for a family and its intensity.
    pub fn new(family: &'static str, intensity: RestartIntensity) -> Self {
        Self {
            family,
            max: intensity.max_restarts,
            window: intensity.window,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_until_the_budget_is_spent_then_escalates() {
        let mut b = RestartBudget::new(RestartIntensity {
            max_restarts: 3,
            window: Duration::from_secs(5),
        });
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(
                b.on_failure(t0 + Duration::from_millis(i)),
                Decision::Restart
            );
        }
        assert_eq!(
            b.on_failure(t0 + Duration::from_secs(1)),
            Decision::Escalate
        );
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut b = RestartBudget::new(RestartIntensity {
            max_restarts: 2,
            window: Duration::from_secs(5),
        });
        let t0 = Instant::now();
        assert_eq!(b.on_failure(t0), Decision::Restart);
        assert_eq!(b.on_failure(t0 + Duration::from_secs(1)), Decision::Restart);
        assert_eq!(
            b.on_failure(t0 + Duration::from_secs(2)),
            Decision::Escalate
        );
        // Five seconds after the first failure it no longer counts.
        assert_eq!(b.on_failure(t0 + Duration::from_secs(5)), Decision::Restart);
    }
}
