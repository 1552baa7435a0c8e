//! The conformance suite against the real RabbitMQ (quorum queues, the default),
//! through a fault proxy so that the reconnect test can cut connections.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use tidings_amqp::QueueType;
use tidings_core::testkit::{FaultProxy, Harness};
use tidings_core::{Publisher, Subscriber};
use tokio::sync::OnceCell;

struct Rabbit {
    proxy: OnceCell<FaultProxy>,
    queue_type: QueueType,
}

impl Rabbit {
    fn new(queue_type: QueueType) -> Self {
        Rabbit {
            proxy: OnceCell::new(),
            queue_type,
        }
    }

    async fn proxy(&self) -> &FaultProxy {
        self.proxy
            .get_or_init(|| async {
                FaultProxy::start(common::BROKER)
                    .await
                    .expect("start the fault proxy")
            })
            .await
    }
}

#[async_trait]
impl Harness for Rabbit {
    async fn connect(&self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
        let addr = self.proxy().await.addr().to_string();
        let bus = common::connect(common::config(&addr, self.queue_type)).await;
        (bus.publisher(), bus.subscriber())
    }

    async fn disrupt(&self) -> bool {
        self.proxy().await.cut();
        true
    }
}

mod quorum {
    use super::*;
    tidings_core::conformance_tests!(Rabbit::new(QueueType::Quorum));
}

mod classic {
    use super::*;
    tidings_core::conformance_tests!(Rabbit::new(QueueType::Classic));
}
