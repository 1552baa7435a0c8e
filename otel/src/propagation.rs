//! W3C Trace Context over message headers.

use std::str::FromStr;
use std::sync::OnceLock;

use opentelemetry::Context;
use opentelemetry::propagation::text_map_propagator::FieldIter;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};

use crate::names::header::{TRACEPARENT, TRACESTATE};

/// The W3C Trace Context propagator (`traceparent`, `tracestate`): the
/// layers' default, so that trace context travels even when the application
/// set no global propagator. It writes no `tracestate` when the state is empty.
///
/// It is the same format as `opentelemetry_sdk`'s `TraceContextPropagator`,
/// here so that this crate does not depend on the SDK.
#[derive(Debug, Clone, Copy, Default)]
pub struct W3cTraceContext;

fn fields() -> &'static [String; 2] {
    static FIELDS: OnceLock<[String; 2]> = OnceLock::new();
    FIELDS.get_or_init(|| [TRACEPARENT.to_owned(), TRACESTATE.to_owned()])
}

fn lower_hex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses a `traceparent` value (and an optional `tracestate`) into a remote span context.
pub(crate) fn parse_traceparent(value: &str, state: Option<&str>) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    if version.len() != 2 || trace_id.len() != 32 || span_id.len() != 16 || flags.len() != 2 {
        return None;
    }
    if ![version, trace_id, span_id, flags]
        .iter()
        .all(|p| lower_hex(p))
    {
        return None;
    }
    let version = u8::from_str_radix(version, 16).ok()?;
    // Version 255 is invalid; version 0 has exactly four fields.
    if version == 255 || (version == 0 && rest.is_some()) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?) & TraceFlags::SAMPLED;
    let state = state
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    let cx = SpanContext::new(trace_id, span_id, flags, true, state);
    cx.is_valid().then_some(cx)
}

impl TextMapPropagator for W3cTraceContext {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return;
        }
        injector.set(
            TRACEPARENT,
            format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                (sc.trace_flags() & TraceFlags::SAMPLED).to_u8()
            ),
        );
        let state = sc.trace_state().header();
        if !state.is_empty() {
            injector.set(TRACESTATE, state);
        }
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        match extractor
            .get(TRACEPARENT)
            .and_then(|tp| parse_traceparent(tp, extractor.get(TRACESTATE)))
        {
            Some(sc) => cx.with_remote_span_context(sc),
            None => cx.clone(),
        }
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(fields())
    }
}

/// An injector into message headers that skips empty values (an empty
/// `tracestate` written by some propagators).
pub(crate) struct HeaderInjector<'a>(pub(crate) &'a mut tidings_core::message::Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            self.0.insert(key.to_owned(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn round_trip() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex"),
            SpanId::from_hex("00f067aa0ba902b7").expect("hex"),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(sc.clone());
        let mut headers = HashMap::new();
        W3cTraceContext.inject_context(&cx, &mut HeaderInjector(&mut headers));
        assert_eq!(
            headers.get(TRACEPARENT).map(String::as_str),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert!(
            !headers.contains_key(TRACESTATE),
            "empty tracestate skipped"
        );
        let back = W3cTraceContext.extract(&headers);
        let back = back.span().span_context().clone();
        assert_eq!(back.trace_id(), sc.trace_id());
        assert_eq!(back.span_id(), sc.span_id());
        assert!(back.is_remote() && back.is_sampled());
    }

    #[test]
    fn tracestate_kept() {
        let sc = parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            Some("congo=t61rcWkgMzE"),
        )
        .expect("valid");
        assert_eq!(sc.trace_state().get("congo"), Some("t61rcWkgMzE"));
        assert!(!sc.is_sampled());
    }

    #[test]
    fn invalid_rejected() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad, None).is_none(), "{bad}");
        }
        assert!(
            parse_traceparent(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
                None
            )
            .is_some(),
            "a later version may add fields"
        );
    }
}
