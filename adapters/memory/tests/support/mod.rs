//! What the in-process bus's tests share.

use std::time::Duration;

use futures::StreamExt;
use tidings_core::{Delivery, DeliveryStream};

/// The stream's next delivery, waited for at most 5 s.
pub async fn next(stream: &mut Box<dyn DeliveryStream>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a delivery within 5 s")
        .expect("open")
        .expect("ok")
}
