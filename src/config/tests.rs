//! The configuration's own tests: every key checked, every table documented.

use std::time::Duration;

use super::*;

fn err(toml: &str) -> (String, String) {
    match Config::from_toml(toml) {
        Err(Error::Config { key, message }) => (key, message),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn a_full_file_loads() {
    let c = Config::from_toml(
        r#"
        url = "memory://"
        [options]
        exchange = "events"
        [retry]
        max_attempts = 7
        initial_backoff = "250ms"
        max_backoff = "1m"
        mode = "in-process"
        [idempotency]
        store = "memory"
        ttl = "2h"
        [breaker]
        failures = 3
        [publish_retry]
        max_attempts = 4
        "#,
    )
    .unwrap();
    assert_eq!(c.retry.max_attempts, 7);
    assert_eq!(c.retry.initial_backoff, Duration::from_millis(250));
    assert_eq!(c.retry.mode, RetryModeConfig::InProcess);
    assert_eq!(
        c.idempotency.as_ref().unwrap().ttl,
        Duration::from_secs(7200)
    );
    assert_eq!(
        c.breaker.as_ref().unwrap().open_for,
        Duration::from_secs(30)
    );
    assert_eq!(c.full_url(), "memory://?exchange=events");
}

#[test]
fn invalid_values_name_the_key_and_the_allowed_values() {
    let (key, message) = err("url = \"memory://\"\n[retry]\nmode = \"sometimes\"");
    assert_eq!(key, "retry.mode");
    assert!(
        message.contains("broker") && message.contains("in-process"),
        "{message}"
    );

    let (key, _) = err("url = \"memory://\"\n[retry]\nmax_attempts = 0");
    assert_eq!(key, "retry.max_attempts");

    let (key, message) = err("url = \"memory://\"\n[retry]\ninitial_backoff = \"soon\"");
    assert_eq!(key, "retry.initial_backoff");
    assert!(!message.is_empty());

    let (key, _) = err("url = \"memory://\"\n[idempotency]\nstore = \"redis\"");
    assert_eq!(key, "idempotency.redis_url");

    let (key, message) = err("url = \"memory://\"\ncolour = \"blue\"");
    assert!(message.contains("colour"), "{key}: {message}");
}

/// The reference in docs/configuration.md parses as it is.
#[test]
fn the_documented_example_is_valid() {
    let doc = include_str!("../../docs/configuration.md");
    let start = doc.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let end = start + doc[start..].find("```").expect("the block's end");
    let c = Config::from_toml(&doc[start..end]).unwrap();
    assert_eq!(c, {
        let mut expected = Config::from_url("memory://");
        expected.idempotency = Some(IdempotencyConfig {
            store: IdempotencyStoreConfig::Memory,
            ttl: Duration::from_secs(24 * 3600),
            redis_url: None,
        });
        expected.breaker = Some(BreakerConfig {
            failures: 10,
            open_for: Duration::from_secs(30),
            probes: 1,
        });
        expected.publish_retry = Some(PublishRetryConfig {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
        });
        expected
    });

    // The commented-out [tls], [telemetry] and [http] tables are valid too, once
    // uncommented (the prose comments between them are left out).
    let tls_start = doc[start..end].find("# [tls]").expect("a [tls] example") + start;
    let mut text = String::from("url = \"nats://h\"\n");
    for line in doc[tls_start..end].lines() {
        let code = line.trim_start_matches("# ");
        let is_code = code.starts_with('[')
            || code
                .split_once(" = ")
                .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if is_code {
            text.push_str(code);
            text.push('\n');
        }
    }
    let c: Config = Figment::from(Toml::string(&text))
        .extract()
        .unwrap_or_else(|e| panic!("{e}: {text}"));
    let tls = c.tls.clone().expect("a tls table");
    assert!(tls.ca_file.is_some() && tls.cert_file.is_some() && tls.key_file.is_some());
    assert!(c.full_url().contains("&tls_key_file="), "{}", c.full_url());
    assert_eq!(
        c.telemetry,
        Some(TelemetryConfig {
            enabled: true,
            parent: ParentConfig::Parent,
            prometheus: true,
        })
    );
    assert_eq!(c.http.map(|h| h.address.port()), Some(9464));
}

#[test]
fn tls_options_become_query_parameters() {
    let mut c = Config::from_url("nats://127.0.0.1:4222?jetstream=false");
    c.tls = Some(TlsConfig {
        ca_file: Some("/etc/ca dir/ca.pem".into()),
        cert_file: Some("client.pem".into()),
        key_file: Some("client.key".into()),
        server_name: Some("nats.internal".into()),
    });
    assert_eq!(
        c.full_url(),
        "nats://127.0.0.1:4222?jetstream=false&tls_ca_file=%2Fetc%2Fca%20dir%2Fca.pem\
         &tls_cert_file=client.pem&tls_key_file=client.key&tls_server_name=nats.internal"
    );
    c.url = "nats://h".into();
    c.options.insert("name".into(), "svc".into());
    c.tls = Some(TlsConfig {
        ca_file: Some("ca.pem".into()),
        ..TlsConfig::default()
    });
    assert_eq!(c.full_url(), "nats://h?name=svc&tls_ca_file=ca.pem");
    c.options.clear();
    c.tls = Some(TlsConfig::default());
    assert_eq!(c.full_url(), "nats://h");
}

#[test]
fn telemetry_is_checked() {
    let (key, message) = err("url = \"memory://\"\n[telemetry]\nparent = \"sideways\"");
    assert_eq!(key, "telemetry.parent", "{message}");
    let c = Config::from_toml("url = \"memory://\"").unwrap();
    assert!(!c.telemetry_enabled(), "off when absent");
    if cfg!(feature = "otel") {
        let c = Config::from_toml("url = \"memory://\"\n[telemetry]\nenabled = false").unwrap();
        assert!(!c.telemetry_enabled());
    } else {
        let (key, message) = err("url = \"memory://\"\n[telemetry]");
        assert_eq!(key, "telemetry");
        assert!(message.contains("otel"), "{message}");
    }
}

#[test]
fn http_and_prometheus_are_checked() {
    let (key, message) = err("url = \"memory://\"\n[telemetry]\nprometheus = true");
    assert_eq!(key, "telemetry.prometheus", "{message}");
    assert!(message.contains("[http]"), "says what to add: {message}");
    let (key, _) = err("url = \"memory://\"\n[http]\naddress = \"nowhere\"");
    assert_eq!(key, "http.address");
    let (key, _) = err("url = \"memory://\"\n[http]\nport = 9464");
    assert_eq!(key, "http.port", "unknown keys are named");
    let both =
        "url = \"memory://\"\n[telemetry]\nprometheus = true\n[http]\naddress = \"127.0.0.1:9464\"";
    if cfg!(feature = "prometheus") {
        let c = Config::from_toml(both).expect("valid");
        assert!(c.prometheus_enabled());
        assert_eq!(c.http.map(|h| h.address.port()), Some(9464));
    } else {
        let (key, message) = err(both);
        assert!(
            key == "telemetry.prometheus" || key == "http",
            "{key}: {message}"
        );
    }
}

#[test]
fn invalid_tls_options_name_the_key() {
    let (key, _) = err("url = \"memory://\"\n[tls]\ncert_file = \"c.pem\"");
    assert_eq!(key, "tls.key_file");
    let (key, _) = err("url = \"memory://\"\n[tls]\nkey_file = \"c.key\"");
    assert_eq!(key, "tls.cert_file");
    let (key, message) = err("url = \"memory://\"\n[tls]\nca = \"c.pem\"");
    assert!(message.contains("ca"), "{key}: {message}");
}

#[cfg(feature = "nats")]
#[test]
fn a_nats_tls_table_loads() {
    let c = Config::from_toml(
        "url = \"nats://h\"\n[tls]\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"c.key\"",
    )
    .unwrap();
    assert_eq!(
        c.full_url(),
        "nats://h?tls_ca_file=ca.pem&tls_cert_file=c.pem&tls_key_file=c.key"
    );
}

#[test]
fn credentials_never_show() {
    let mut c = Config::from_url("amqp://guest:hunter2@127.0.0.1:5672/%2f");
    c.options.insert("sasl_password".into(), "hunter3".into());
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("hunter3"),
        "{shown}"
    );
    assert_eq!(
        redact_text("bad url \"amqp://u:pw@h/\" here"),
        "bad url \"amqp://u:***@h/\" here"
    );
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail returns its own error type
fn loading_is_strict() {
    figment::Jail::expect_with(|jail| {
        // A named file that is not there.
        let e = Config::load("nowhere/tidings.toml").expect_err("missing file");
        assert!(e.to_string().contains("nowhere/tidings.toml"), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
        // A file that names no broker: no silent memory://.
        jail.create_file("empty.toml", "[retry]\nmax_attempts = 3\n")?;
        let e = Config::load("empty.toml").expect_err("no url");
        assert!(e.to_string().contains("no broker URL"), "{e}");
        // The environment can name it.
        jail.set_env("TIDINGS_URL", "memory://");
        let c = Config::load("empty.toml").expect("url from the environment");
        assert_eq!(c.url, "memory://");
        // A variable the loader does not know is an error naming it.
        jail.set_env("TIDINGS_RETRY__MAX_ATEMPTS", "4");
        let e = Config::load("empty.toml").expect_err("unknown variable");
        assert!(e.to_string().contains("max_atempts"), "{e}");
        jail.set_env("TIDINGS_RETRY__MAX_ATEMPTS", "");
        Ok(())
    });
    figment::Jail::expect_with(|jail| {
        jail.set_env("TIDINGS_URL", "redis://127.0.0.1:6379");
        let c = Config::from_env().expect("from the environment");
        assert_eq!(c.url, "redis://127.0.0.1:6379");
        Ok(())
    });
    figment::Jail::expect_with(|_| {
        let e = Config::from_env().expect_err("nothing set");
        assert!(e.to_string().contains("no broker URL"), "{e}");
        Ok(())
    });
    let e = Config::from_toml("[retry]\nmax_attempts = 3").expect_err("no url");
    assert!(e.to_string().contains("TIDINGS_URL"), "{e}");
}
