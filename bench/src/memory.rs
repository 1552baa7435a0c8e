//! The in-process bus, and a bare `tokio::sync::mpsc` hand-off as its baseline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidings::memory::{MemoryBus, MemoryConfig};
use tidings::{Consumer, Event, Message, Publisher, Raw, Subscriber};

use crate::Args;
use crate::common::{Clock, Sink, report, rss_mb, wait_done};

/// Runs the selected cases on the in-process bus.
pub async fn run(args: &Args) {
    let clock = Arc::new(Clock(Instant::now()));
    for case in &args.case {
        match case.as_str() {
            "publish" | "publish-batch" => memory_publish(args, &clock, case).await,
            "e2e-stack" => memory_stack(args, &clock).await,
            "e2e-otel" => memory_otel(args, &clock).await,
            "allocs" => memory_allocs(args, &clock).await,
            "e2e" => {
                for &handlers in &args.handlers {
                    memory_e2e(args, &clock, handlers).await;
                    mpsc_e2e(args, &clock, handlers).await;
                }
            }
            other => eprintln!("unknown case `{other}`"),
        }
    }
}

fn bus(count: u64) -> MemoryBus {
    MemoryBus::with_config(MemoryConfig {
        group_capacity: count as usize + 1,
        ..MemoryConfig::default()
    })
}

async fn memory_publish(args: &Args, clock: &Arc<Clock>, case: &str) {
    let bus = bus(args.count);
    bus.declare_group("bench", "sink").await.expect("declare");
    let start = Instant::now();
    if case == "publish" {
        for _ in 0..args.count {
            bus.publish("bench", Message::new(clock.payload(args.payload)))
                .await
                .expect("publish");
        }
    } else {
        let mut left = args.count;
        while left > 0 {
            let n = left.min(1000);
            let batch = (0..n)
                .map(|_| Message::new(clock.payload(args.payload)))
                .collect();
            for r in bus.publish_batch("bench", batch).await {
                r.expect("publish");
            }
            left -= n;
        }
    }
    let elapsed = start.elapsed();
    report(
        "tidings",
        "memory",
        case,
        args.count,
        elapsed,
        &format!("{} B payloads", args.payload),
    );
}

async fn memory_e2e(args: &Args, clock: &Arc<Clock>, handlers: usize) {
    // A bounded group queue, so the publisher waits for the handlers as in steady state.
    let bus = MemoryBus::with_config(MemoryConfig {
        group_capacity: 1024,
        ..MemoryConfig::default()
    });
    let sink = Sink::new(args.count, clock.clone());
    let s = sink.clone();
    let consumer = Consumer::group(bus.subscriber(), "bench")
        .concurrency(handlers)
        .prefetch(256.max(handlers * 4))
        .handle("bench", move |e: Event<Bytes, Raw>| {
            s.record(&e.data);
            std::future::ready(Ok(()))
        })
        .start()
        .await
        .expect("start");
    let rss_before = rss_mb();
    // Paced: `per_tick` messages every millisecond.
    let per_tick = args.rate.map(|rate| (rate / 1000).max(1));
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let start = Instant::now();
    for i in 0..args.count {
        if let Some(n) = per_tick
            && i % n == 0
        {
            tick.tick().await;
        }
        bus.publish("bench", Message::new(clock.payload(args.payload)))
            .await
            .expect("publish");
    }
    wait_done(&sink, 600).await;
    let elapsed = start.elapsed();
    consumer.shutdown(Duration::from_secs(10)).await;
    let detail = format!(
        "handlers={handlers} {}; rss {:.1} MB -> {:.1} MB",
        sink.summary(),
        rss_before,
        rss_mb()
    );
    let paced = args
        .rate
        .map_or(String::new(), |rate| format!("-paced-{rate}"));
    report(
        "tidings",
        "memory",
        &format!("e2e/h{handlers}{paced}"),
        args.count,
        elapsed,
        &detail,
    );
}

/// The baseline: the same hand-off through a bare `tokio::sync::mpsc` channel
/// to `handlers` worker tasks, no runtime, no acks.
async fn mpsc_e2e(args: &Args, clock: &Arc<Clock>, handlers: usize) {
    let sink = Sink::new(args.count, clock.clone());
    let mut lanes = Vec::new();
    for _ in 0..handlers {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(256);
        let s = sink.clone();
        tokio::spawn(async move {
            while let Some(payload) = rx.recv().await {
                s.record(&payload);
            }
        });
        lanes.push(tx);
    }
    let start = Instant::now();
    for i in 0..args.count as usize {
        lanes[i % handlers]
            .send(clock.payload(args.payload))
            .await
            .expect("send");
    }
    wait_done(&sink, 600).await;
    let elapsed = start.elapsed();
    let detail = format!("handlers={handlers} {}", sink.summary());
    report(
        "tokio-mpsc",
        "memory",
        &format!("e2e/h{handlers}"),
        args.count,
        elapsed,
        &detail,
    );
}

/// Allocations per message, counted by the bench's allocator on a warm
/// bus: publishing alone, publish → handler → ack, and the bare mpsc
/// hand-off. Every case includes the payload the bench allocates for each
/// message (one allocation).
async fn memory_allocs(args: &Args, clock: &Arc<Clock>) {
    use crate::alloc::Counting;
    let n = args.count.min(100_000);
    let per_message = |(allocations, bytes): (u64, u64)| {
        format!(
            "{:.2} allocations, {:.0} bytes per message",
            allocations as f64 / n as f64,
            bytes as f64 / n as f64
        )
    };

    println!(
        "  a Message is {} bytes, a Delivery {} bytes",
        std::mem::size_of::<Message>(),
        std::mem::size_of::<tidings::Delivery>()
    );
    // Publishing alone, to a declared group nobody reads.
    let bus = bus(2 * n);
    bus.declare_group("bench", "sink").await.expect("declare");
    for _ in 0..n {
        bus.publish("bench", Message::new(clock.payload(args.payload)))
            .await
            .expect("publish");
    }
    Counting::start();
    for _ in 0..n {
        bus.publish("bench", Message::new(clock.payload(args.payload)))
            .await
            .expect("publish");
    }
    println!(
        "ALLOCS tidings memory publish: {}",
        per_message(Counting::stop())
    );
    // The same through the facade's `Bus`, as a service built with
    // `tidings::connect` publishes.
    let behind = self::bus(2 * n);
    behind
        .declare_group("bench", "sink")
        .await
        .expect("declare");
    let facade = tidings::Bus::new(Arc::new(behind.clone()), Arc::new(behind));
    for round in 0..2 {
        if round == 1 {
            Counting::start();
        }
        for _ in 0..n {
            facade
                .publish("bench", Message::new(clock.payload(args.payload)))
                .await
                .expect("publish");
        }
    }
    println!(
        "ALLOCS tidings memory publish-via-bus: {}",
        per_message(Counting::stop())
    );

    // Publish → handler → ack, after a warm-up of as many messages.
    let bus = MemoryBus::with_config(MemoryConfig {
        group_capacity: 1024,
        ..MemoryConfig::default()
    });
    let sink = Sink::new(2 * n, clock.clone());
    let s = sink.clone();
    let consumer = Consumer::group(bus.subscriber(), "bench")
        .concurrency(1)
        .handle("bench", move |e: Event<Bytes, Raw>| {
            s.record(&e.data);
            std::future::ready(Ok(()))
        })
        .start()
        .await
        .expect("start");
    for round in 0..2 {
        if round == 1 {
            Counting::start();
        }
        for _ in 0..n {
            bus.publish("bench", Message::new(clock.payload(args.payload)))
                .await
                .expect("publish");
        }
        while sink.handled.load(std::sync::atomic::Ordering::Relaxed) < (round + 1) * n {
            tokio::task::yield_now().await;
        }
    }
    println!(
        "ALLOCS tidings memory e2e/h1: {}",
        per_message(Counting::stop())
    );
    consumer.shutdown(Duration::from_secs(10)).await;

    // The bare hand-off.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let handled = tokio::spawn(async move {
        let mut seen = 0u64;
        while rx.recv().await.is_some() {
            seen += 1;
        }
        seen
    });
    for _ in 0..n {
        tx.send(clock.payload(args.payload)).await.expect("send");
    }
    Counting::start();
    for _ in 0..n {
        tx.send(clock.payload(args.payload)).await.expect("send");
    }
    drop(tx);
    let seen = handled.await.expect("receiver");
    assert_eq!(seen, 2 * n);
    println!(
        "ALLOCS tokio-mpsc memory e2e/h1: {}",
        per_message(Counting::stop())
    );
}

/// The full middleware stack (chain depth, in-memory idempotency, retry,
/// circuit breaker, timeout, concurrency limit; or the layers
/// `TIDINGS_BENCH_STACK` names, see [`stack_layers`]) around a no-op
/// handler, against the same handler with no layers, in the same run.
async fn memory_stack(args: &Args, clock: &Arc<Clock>) {
    use tidings::layers::prelude::*;
    let mut rates = Vec::new();
    for layered in [false, true] {
        let bus = MemoryBus::with_config(MemoryConfig {
            group_capacity: 1024,
            ..MemoryConfig::default()
        });
        let sink = Sink::new(args.count, clock.clone());
        let s = sink.clone();
        let mut builder = Consumer::group(bus.subscriber(), "bench")
            .concurrency(1)
            .prefetch(256);
        if layered {
            let wanted = stack_layers();
            let on = |name: &str| wanted.iter().any(|w| w == name);
            if on("depth") {
                builder = builder.layer(MaxChainDepth(16));
            }
            if on("idempotency") {
                builder = builder.layer(Idempotency::in_memory(Duration::from_secs(3600)));
            }
            if on("retry") {
                builder = builder.layer(
                    Retry::exponential(Duration::from_millis(100)).mode(RetryMode::InProcess),
                );
            }
            if on("breaker") {
                builder = builder.layer(CircuitBreaker::new(Threshold::Consecutive(100)));
            }
            if on("timeout") {
                builder = builder.layer(Timeout(Duration::from_secs(30)));
            }
            if on("limit") {
                builder = builder.layer(ConcurrencyLimit::new(64));
            }
        }
        let consumer = builder
            .handle("bench", move |e: Event<Bytes, Raw>| {
                s.record(&e.data);
                std::future::ready(Ok(()))
            })
            .start()
            .await
            .expect("start");
        let start = Instant::now();
        for _ in 0..args.count {
            bus.publish("bench", Message::new(clock.payload(args.payload)))
                .await
                .expect("publish");
        }
        wait_done(&sink, 600).await;
        let elapsed = start.elapsed();
        consumer.shutdown(Duration::from_secs(10)).await;
        let case = match (layered, std::env::var_os("TIDINGS_BENCH_STACK")) {
            (false, _) => "e2e-no-layers".to_owned(),
            (true, None) => "e2e-stack".to_owned(),
            (true, Some(_)) => format!("e2e-stack[{}]", stack_layers().join(",")),
        };
        report(
            "tidings",
            "memory",
            &case,
            args.count,
            elapsed,
            &sink.summary(),
        );
        rates.push(elapsed.as_nanos() as f64 / args.count as f64);
    }
    println!(
        "  middleware stack adds {:.0} ns per message",
        rates[1] - rates[0]
    );
}

/// The layers of `e2e-stack`: all of them, or the comma-separated names in
/// `TIDINGS_BENCH_STACK` (depth, idempotency, retry, breaker, timeout,
/// limit; always stacked in that order), to see what each one costs. The
/// case is then reported as `e2e-stack[<names>]`.
fn stack_layers() -> Vec<String> {
    let all = "depth,idempotency,retry,breaker,timeout,limit";
    let wanted = std::env::var("TIDINGS_BENCH_STACK").unwrap_or_else(|_| all.into());
    let wanted: Vec<String> = wanted
        .split(',')
        .map(|w| w.trim().to_owned())
        .filter(|w| !w.is_empty())
        .collect();
    for name in &wanted {
        assert!(
            all.split(',').any(|known| known == name),
            "TIDINGS_BENCH_STACK: unknown layer `{name}` (known: {all})"
        );
    }
    wanted
}

/// The OpenTelemetry layers (publish and process) around a no-op handler,
/// against no layers, in the same run: once with the global no-op providers
/// (nothing installed), once with SDK providers that record every span and
/// metric and hand them (batch span processor, periodic metric reader) to
/// exporters that drop them.
async fn memory_otel(args: &Args, clock: &Arc<Clock>) {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::metrics::data::ResourceMetrics;
    use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
    use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use tidings::middleware::LayeredPublisher;
    use tidings::otel::Telemetry;

    #[derive(Debug)]
    struct DropSpans;
    impl SpanExporter for DropSpans {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            Ok(())
        }
    }
    struct DropMetrics;
    impl PushMetricExporter for DropMetrics {
        async fn export(&self, _metrics: &ResourceMetrics) -> OTelSdkResult {
            Ok(())
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
            Ok(())
        }
        fn temporality(&self) -> Temporality {
            Temporality::Cumulative
        }
    }

    /// SDK providers with exporters that drop everything, and the telemetry a
    /// variant uses: none, the global no-op providers, or the SDK providers.
    fn telemetry_for(variant: &str) -> (SdkTracerProvider, SdkMeterProvider, Option<Telemetry>) {
        let tracer_provider = SdkTracerProvider::builder()
            .with_batch_exporter(DropSpans)
            .build();
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(DropMetrics).build())
            .build();
        let telemetry = if variant.ends_with("otel-sdk-drop") {
            Some(
                Telemetry::builder()
                    .tracer(tracer_provider.tracer("bench"))
                    .meter(meter_provider.meter("bench"))
                    .build(),
            )
        } else if variant.ends_with("otel-noop-global") {
            Some(Telemetry::builder().build())
        } else {
            None
        };
        (tracer_provider, meter_provider, telemetry)
    }

    let mut rates = Vec::new();
    for variant in ["e2e-no-layers", "e2e-otel-noop-global", "e2e-otel-sdk-drop"] {
        // The providers live for the run (they own the exporters), then shut down.
        let (tracer_provider, meter_provider, telemetry) = telemetry_for(variant);
        let bus = MemoryBus::with_config(MemoryConfig {
            group_capacity: 1024,
            ..MemoryConfig::default()
        });
        let publisher: Arc<dyn Publisher> = match &telemetry {
            Some(t) => Arc::new(
                LayeredPublisher::new(bus.publisher()).layer(Arc::new(t.publish_layer("memory"))),
            ),
            None => bus.publisher(),
        };
        let sink = Sink::new(args.count, clock.clone());
        let s = sink.clone();
        let mut builder = Consumer::group(bus.subscriber(), "bench")
            .concurrency(1)
            .prefetch(256);
        if let Some(t) = &telemetry {
            builder = builder.layer(t.process_layer("memory"));
        }
        let consumer = builder
            .handle("bench", move |e: Event<Bytes, Raw>| {
                s.record(&e.data);
                std::future::ready(Ok(()))
            })
            .start()
            .await
            .expect("start");
        let start = Instant::now();
        for _ in 0..args.count {
            publisher
                .publish("bench", Message::new(clock.payload(args.payload)))
                .await
                .expect("publish");
        }
        wait_done(&sink, 600).await;
        let elapsed = start.elapsed();
        consumer.shutdown(Duration::from_secs(10)).await;
        report(
            "tidings",
            "memory",
            variant,
            args.count,
            elapsed,
            &sink.summary(),
        );
        rates.push(elapsed.as_nanos() as f64 / args.count as f64);
        let _ = tracer_provider.shutdown();
        let _ = meter_provider.shutdown();
    }
    println!(
        "  otel layers add {:.0} ns per message with the global no-op providers, {:.0} ns with SDK providers and dropping exporters (e2e, wall clock)",
        rates[1] - rates[0],
        rates[2] - rates[0]
    );

    // The same layers called directly, one task, no bus: publish through the
    // publish layer into a slot, then run the handler stack on a delivery of
    // that message. This is the CPU the layers cost per message.
    use tidings::handler::Endpoint;
    use tidings::middleware::{Middleware, Next};
    use tidings::{Acker, DeadLetter, Delivery, HandlerResult, Receipt};
    struct Slot(std::sync::Mutex<Option<Message>>);
    #[async_trait::async_trait]
    impl Publisher for Slot {
        async fn publish(&self, _topic: &str, message: Message) -> tidings::Result<Receipt> {
            *self.0.lock().expect("slot") = Some(message);
            Ok(Receipt::Accepted)
        }
        async fn close(&self) -> tidings::Result<()> {
            Ok(())
        }
    }
    struct NoAck;
    #[async_trait::async_trait]
    impl Acker for NoAck {
        async fn ack(self: Box<Self>) -> tidings::Result<()> {
            Ok(())
        }
        async fn nack(self: Box<Self>, _delay: Option<Duration>) -> tidings::Result<()> {
            Ok(())
        }
        async fn dead_letter(self: Box<Self>, _letter: DeadLetter) -> tidings::Result<()> {
            Ok(())
        }
    }
    struct Noop;
    impl Endpoint for Noop {
        fn call(&self, _d: &Delivery) -> futures::future::BoxFuture<'static, HandlerResult> {
            Box::pin(std::future::ready(Ok(())))
        }
    }
    let mut direct = Vec::new();
    for variant in [
        "direct-no-layers",
        "direct-otel-noop-global",
        "direct-otel-sdk-drop",
    ] {
        // The providers live for the run (they own the exporters), then shut down.
        let (tracer_provider, meter_provider, telemetry) = telemetry_for(variant);
        let slot = Arc::new(Slot(std::sync::Mutex::new(None)));
        let mut publisher = LayeredPublisher::new(slot.clone());
        let mut stack: Vec<Arc<dyn Middleware>> = Vec::new();
        if let Some(t) = &telemetry {
            publisher = publisher.layer(Arc::new(t.publish_layer("memory")));
            stack.push(Arc::new(t.process_layer("memory")));
        }
        let topic: Arc<str> = "bench".into();
        let group: Arc<str> = "bench".into();
        let start = Instant::now();
        for _ in 0..args.count {
            publisher
                .publish("bench", Message::new(clock.payload(args.payload)))
                .await
                .expect("publish");
            let message = slot.0.lock().expect("slot").take().expect("published");
            let delivery = Delivery::new(
                Arc::new(message),
                topic.clone(),
                Some(group.clone()),
                1,
                Box::new(NoAck),
            );
            Next::new(&stack, &Noop)
                .run(&delivery)
                .await
                .expect("handled");
        }
        let elapsed = start.elapsed();
        report(
            "tidings",
            "memory",
            variant,
            args.count,
            elapsed,
            "one task, no bus",
        );
        direct.push(elapsed.as_nanos() as f64 / args.count as f64);
        let _ = tracer_provider.shutdown();
        let _ = meter_provider.shutdown();
    }
    println!(
        "  otel layers cost {:.0} ns per message (publish + handle) with the global no-op providers, {:.0} ns with SDK providers and dropping exporters (direct)",
        direct[1] - direct[0],
        direct[2] - direct[0]
    );
}
