//! OpenTelemetry tracing and metrics for Tidings (work in progress).
