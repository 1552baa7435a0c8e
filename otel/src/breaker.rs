//! The circuit breaker state gauge.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, ObservableGauge};
use tidings_middleware::{BreakerState, CircuitBreaker};

use crate::names::{attr, metric};

/// Reports a circuit breaker's state as the gauge `tidings.circuit_breaker.state`
/// (0 closed, 1 half-open, 2 open) at every metric collection, for as long as
/// it is kept. Made by [`Telemetry::observe_breaker`](crate::Telemetry::observe_breaker).
pub struct BreakerGauge {
    _gauge: ObservableGauge<u64>,
}

impl std::fmt::Debug for BreakerGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerGauge").finish_non_exhaustive()
    }
}

/// The gauge's value for a state.
pub(crate) fn state_value(state: BreakerState) -> u64 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    }
}

impl BreakerGauge {
    pub(crate) fn new(meter: &Meter, name: String, breaker: &CircuitBreaker) -> Self {
        // The watch receiver reads the latest state without locking the breaker.
        let states = breaker.watch();
        let labels = [KeyValue::new(attr::BREAKER_NAME, name)];
        let gauge = meter
            .u64_observable_gauge(metric::BREAKER_STATE)
            .with_description("Circuit breaker state: 0 closed, 1 half-open, 2 open")
            .with_unit("{state}")
            .with_callback(move |observer| {
                observer.observe(state_value(*states.borrow()), &labels);
            })
            .build();
        BreakerGauge { _gauge: gauge }
    }
}
