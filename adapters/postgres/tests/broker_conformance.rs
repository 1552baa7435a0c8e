//! The conformance suite against the real PostgreSQL, as a broker
//! (`postgres://`), through a fault proxy so the reconnect test can cut
//! every connection. A short visibility timeout keeps reclaims quick.

use std::sync::Arc;

use async_trait::async_trait;
use tidings_core::testkit::{FaultProxy, Harness};
use tidings_core::{Publisher, Subscriber};
use tidings_postgres::PostgresBroker;
use tokio::sync::OnceCell;

struct Postgres {
    proxy: OnceCell<FaultProxy>,
}

impl Postgres {
    fn new() -> Self {
        Postgres {
            proxy: OnceCell::new(),
        }
    }

    async fn proxy(&self) -> &FaultProxy {
        self.proxy
            .get_or_init(|| async {
                FaultProxy::start("127.0.0.1:5432")
                    .await
                    .unwrap_or_else(|e| panic!("starting the fault proxy failed: {e}"))
            })
            .await
    }
}

#[async_trait]
impl Harness for Postgres {
    async fn connect(&self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
        let addr = self.proxy().await.addr();
        let url = format!("postgres://postgres@{addr}/test?visibility=3s&poll=100ms");
        let broker = PostgresBroker::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}; scripts/brokers.sh starts PostgreSQL"));
        (broker.publisher(), broker.subscriber())
    }

    async fn disrupt(&self) -> bool {
        self.proxy().await.cut();
        true
    }
}

tidings_core::conformance_tests!(Postgres::new());
