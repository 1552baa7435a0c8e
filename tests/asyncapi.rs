//! The AsyncAPI 3.0 document generated from a service's handlers and typed
//! topics is valid against the official AsyncAPI 3.0.0 JSON schema
//! (`@asyncapi/specs`, checked with ajv by `tests/node/validate-asyncapi.mjs`)
//! and says what the service registered.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tidings::asyncapi::schema_of;
use tidings::batch::BatchOptions;
use tidings::memory::MemoryBus;
use tidings::prelude::*;
use tidings::testkit::ChildProcess;

#[derive(Serialize, Deserialize, JsonSchema)]
struct Address {
    city: String,
}

#[derive(Serialize, Deserialize, JsonSchema)]
struct UserRegistered {
    email: String,
    address: Option<Address>,
}

impl EventType for UserRegistered {
    const TYPE: &'static str = "user.registered";
    const VERSION: Option<&'static str> = Some("2");
    fn schema() -> Option<serde_json::Value> {
        Some(schema_of::<Self>())
    }
}

#[derive(Serialize, Deserialize, JsonSchema)]
struct WelcomeSent {
    email: String,
}

impl EventType for WelcomeSent {
    const TYPE: &'static str = "mail.welcome-sent";
    fn schema() -> Option<serde_json::Value> {
        Some(schema_of::<Self>())
    }
}

#[tokio::test]
async fn the_document_is_valid_asyncapi_3_and_names_what_the_service_registered() {
    let bus = MemoryBus::new();
    let email = Consumer::group(bus.subscriber(), "email")
        .on::<UserRegistered, _, _>("users", |_: Event<UserRegistered>| async {
            Ok::<_, HandlerError>(())
        })
        .handle_type(
            "users",
            "user.deleted",
            |_: Event<serde_json::Value>| async { Ok::<_, HandlerError>(()) },
        )
        .handle("audit/all", |_: Event<serde_json::Value>| async {
            Ok::<_, HandlerError>(())
        })
        .handle_batch(
            "projections",
            BatchOptions::new(10),
            |_: Vec<Event<u32>>| async { Ok(()) },
        );
    let app = tidings::App::new().consumer("email", email);
    let document = app
        .asyncapi("email service", "1.4.0")
        .description("Sends the mails users expect.")
        .publishes::<WelcomeSent>("mail.events")
        .to_json();

    let operations = document["operations"].as_object().expect("operations");
    let mut names: Vec<&str> = operations.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "email.receive.audit_all.any",
            "email.receive.projections.any",
            "email.receive.users.user.deleted",
            "email.receive.users.user.registered",
            "send.mail.events.mail.welcome-sent",
        ]
    );
    assert_eq!(document["channels"]["audit_all"]["address"], "audit/all");
    let registered = &document["components"]["messages"]["users.user.registered"];
    assert_eq!(registered["x-schema-version"], "2");
    assert_eq!(
        registered["payload"]["properties"]["address"]["properties"]["city"]["type"], "string",
        "nested types are inlined: {registered}"
    );

    let path = std::env::temp_dir().join(format!("asyncapi-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_vec_pretty(&document).expect("json")).expect("written");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/node/validate-asyncapi.mjs");
    let (lines, ok) = ChildProcess::node(script, &[path.to_str().expect("utf-8 path")])
        .finish(Duration::from_secs(30))
        .await;
    let _ = std::fs::remove_file(&path);
    assert!(ok, "not valid AsyncAPI 3.0.0: {lines:?}\n{document:#}");
}
