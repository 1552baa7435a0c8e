//! Dead-letter tooling on any adapter: list and inspect dead letters, replay
//! one or all (filtered by topic or time), purge, and a hook that fires when a
//! dead-letter destination grows past a threshold.
//!
//! The [`DeadLetterInbox`] consumes a dead-letter topic in the
//! [`DEAD_LETTER_GROUP`] group — from the first letter the destination
//! keeps where the broker keeps history (Redis, Kafka, JetStream, the
//! in-process bus with history), so an inbox opened after the failure sees
//! it — and **holds** the letters it fetched,
//! unsettled, while you look at them: replaying or purging settles a letter;
//! closing the inbox (or dropping it) hands back whatever is left, and the
//! broker keeps it. Replay publishes the original message — same id,
//! payload, key and metadata, without the dead-letter headers — to its
//! original topic, **for the group that failed it**: it carries
//! [`header::REPLAY_FOR`], and the consumers of the topic's other groups
//! ack it without running their handlers (they handled it the first time).
//! [`ReplayTo::AllGroups`] replays to every group instead.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tidings_core::delivery::{DEAD_LETTER_GROUP, header};
use tidings_core::{
    DeadLetter, Delivery, DeliveryStream, Error, Message, Publisher, Result, StartFrom, Subscriber,
    Subscription,
};

/// Which letters an operation applies to.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only letters from this original topic.
    pub topic: Option<String>,
    /// Only letters whose last failure is at or after this time.
    pub since: Option<SystemTime>,
    /// Only letters whose last failure is before this time.
    pub until: Option<SystemTime>,
    /// Only the letters with these message ids.
    pub ids: Option<HashSet<String>>,
}

impl Filter {
    fn matches(&self, letter: &DeadLetter) -> bool {
        self.topic.as_ref().is_none_or(|t| *t == letter.topic)
            && self.since.is_none_or(|s| letter.last_failure >= s)
            && self.until.is_none_or(|u| letter.last_failure < u)
    }

    fn picks(&self, message: &Message, letter: &DeadLetter) -> bool {
        self.ids
            .as_ref()
            .is_none_or(|ids| ids.contains(message.id.as_str()))
            && self.matches(letter)
    }
}

type Hook = Box<dyn Fn(usize) + Send + Sync>;

/// Which groups a replayed letter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplayTo {
    /// Only the group that dead-lettered it (the default); a letter that
    /// names no group goes to every group.
    #[default]
    FailedGroup,
    /// Every group of the original topic.
    AllGroups,
}

/// Dead letters of one dead-letter topic, held for inspection; see the [module docs](self).
pub struct DeadLetterInbox {
    publisher: Arc<dyn Publisher>,
    stream: Box<dyn DeliveryStream>,
    held: Vec<(Delivery, DeadLetter)>,
    threshold: Option<(usize, Hook)>,
    replay_to: ReplayTo,
}

impl DeadLetterInbox {
    /// Opens the inbox of `dead_letter_topic` (from
    /// [`Subscriber::dead_letter_topic`]); replays go out through `publisher`.
    /// Holds at most `capacity` letters at once.
    pub async fn open(
        subscriber: &dyn Subscriber,
        publisher: Arc<dyn Publisher>,
        dead_letter_topic: &str,
        capacity: usize,
    ) -> Result<Self> {
        // From the first letter the destination keeps, where the broker
        // keeps history: an inbox opened after the failure (the usual case)
        // sees the letters written before it. (A group that exists already
        // goes on from where it stands.)
        let start = if subscriber.capabilities().replay {
            StartFrom::Earliest
        } else {
            StartFrom::Latest
        };
        let stream = subscriber
            .subscribe(
                Subscription::group(dead_letter_topic, DEAD_LETTER_GROUP)
                    .with_prefetch(capacity)
                    .starting_at(start),
            )
            .await?;
        Ok(DeadLetterInbox {
            publisher,
            stream,
            held: Vec::new(),
            threshold: None,
            replay_to: ReplayTo::default(),
        })
    }

    /// Calls `hook` with the number of held letters whenever a fetch leaves
    /// at least `threshold` of them.
    pub fn on_threshold(&mut self, threshold: usize, hook: impl Fn(usize) + Send + Sync + 'static) {
        self.threshold = Some((threshold, Box::new(hook)));
    }

    /// Takes the letters that arrive until none came for `idle`, and returns
    /// how many are held now. Messages on the topic that are not dead letters
    /// are held too, with an empty reason, so nothing is lost.
    pub async fn fetch(&mut self, idle: Duration) -> usize {
        while let Ok(Some(item)) = tokio::time::timeout(idle, self.stream.next()).await {
            match item {
                Ok(delivery) => {
                    let letter = DeadLetter::from_message(delivery.message())
                        .unwrap_or_else(|| unknown(&delivery));
                    self.held.push((delivery, letter));
                }
                Err(error) => tracing::warn!(%error, "reading dead letters"),
            }
        }
        if let Some((threshold, hook)) = &self.threshold
            && self.held.len() >= *threshold
        {
            hook(self.held.len());
        }
        self.held.len()
    }

    /// The held letters: each message with what its dead-letter headers say.
    /// Letters the broker has since handed to another reader (Kafka, after a
    /// rebalance) are not listed: that reader has them now.
    pub fn list(&self) -> impl Iterator<Item = (&Message, &DeadLetter)> {
        self.held
            .iter()
            .filter(|(d, _)| d.is_held())
            .map(|(d, l)| (d.message(), l))
    }

    /// Drops the letters another reader holds now, so that this inbox never
    /// replays or purges what that one may replay too.
    fn forget_lost(&mut self) {
        self.held.retain(|(d, _)| d.is_held());
    }

    /// One held letter by message id.
    pub fn get(&self, id: &str) -> Option<(&Message, &DeadLetter)> {
        self.list().find(|(m, _)| m.id == id)
    }

    fn take(&mut self, id: &str) -> Result<(Delivery, DeadLetter)> {
        self.forget_lost();
        let index = self
            .held
            .iter()
            .position(|(d, _)| d.message().id == id)
            .ok_or_else(|| Error::Config {
                key: "id".into(),
                message: format!("no held dead letter has id {id}; fetch first"),
            })?;
        Ok(self.held.swap_remove(index))
    }

    /// Which groups replays are for from now on (default: the group that
    /// failed each letter).
    pub fn replay_to(&mut self, target: ReplayTo) {
        self.replay_to = target;
    }

    /// Republishes one letter to its original topic (for the group that
    /// failed it, unless [`replay_to`](Self::replay_to) says otherwise),
    /// then removes it.
    pub async fn replay(&mut self, id: &str) -> Result<()> {
        let (delivery, letter) = self.take(id)?;
        if self.replay_one(delivery, letter).await? {
            Ok(())
        } else {
            Err(Error::Config {
                key: "id".into(),
                message: format!(
                    "dead letter {id} was handed to another reader of the dead letters"
                ),
            })
        }
    }

    /// Replays one letter; `false` when another reader holds it now (it is
    /// that reader's to replay, and this inbox drops it).
    async fn replay_one(&mut self, delivery: Delivery, letter: DeadLetter) -> Result<bool> {
        match replay_letter(&*self.publisher, self.replay_to, delivery, letter).await {
            Replayed::Done(done) => done,
            Replayed::Kept(kept, error) => {
                self.held.push(*kept);
                Err(error)
            }
        }
    }

    /// Deletes one held letter.
    pub async fn purge_one(&mut self, id: &str) -> Result<()> {
        let (mut delivery, _) = self.take(id)?;
        delivery.ack().await
    }

    /// Replays every held letter the filter matches; returns how many.
    ///
    /// Up to [`REPLAY_WINDOW`] replays are under way at once, started in
    /// the order the letters were read (so each publish is issued in that
    /// order), which keeps a bulk replay at the broker's pipelined speed
    /// rather than one round trip per letter. On an error the letters not
    /// replayed stay held, and the first error is returned.
    pub async fn replay_all(&mut self, filter: &Filter) -> Result<usize> {
        let chosen = self.choose(filter);
        let (publisher, target) = (self.publisher.clone(), self.replay_to);
        let mut results = futures::stream::iter(chosen)
            .map(|(delivery, letter)| replay_letter(&*publisher, target, delivery, letter))
            .buffered(REPLAY_WINDOW);
        let (mut replayed, mut first_error) = (0, None);
        while let Some(result) = results.next().await {
            match result {
                Replayed::Done(Ok(true)) => replayed += 1,
                Replayed::Done(Ok(false)) => {}
                Replayed::Done(Err(error)) => {
                    first_error.get_or_insert(error);
                }
                Replayed::Kept(kept, error) => {
                    self.held.push(*kept);
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(replayed),
        }
    }

    /// Deletes the held letters the filter matches; returns how many.
    pub async fn purge(&mut self, filter: &Filter) -> Result<usize> {
        let chosen = self.choose(filter);
        let count = chosen.len();
        let mut acks = futures::stream::iter(chosen)
            .map(|(mut delivery, _)| async move { delivery.ack().await })
            .buffered(REPLAY_WINDOW);
        let mut first_error = None;
        while let Some(acked) = acks.next().await {
            if let Err(error) = acked {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(count), Err)
    }

    /// Takes the held letters the filter matches out of the inbox (the
    /// ones another reader holds now are dropped first).
    fn choose(&mut self, filter: &Filter) -> Vec<(Delivery, DeadLetter)> {
        self.forget_lost();
        let (chosen, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(d, l)| filter.picks(d.message(), l));
        self.held = kept;
        chosen
    }

    /// Stops reading, hands the letters still held back to the broker, and
    /// returns once the adapter finished closing (Kafka: the acks of replayed
    /// and purged letters are committed), so they are not read again.
    pub async fn close(mut self) -> Result<()> {
        // Intake first, so what is handed back goes to the next reader (an
        // inbox opened next, by this process or another) at once, not back
        // into this closing subscription.
        self.stream.close().await?;
        let mut handed_back = Ok(());
        for (mut delivery, _) in std::mem::take(&mut self.held) {
            if let Err(e) = delivery.release().await {
                // The broker hands it back after its timeout anyway.
                handed_back = Err(e);
            }
        }
        self.stream.closed().await;
        handed_back
    }
}

/// How many replays (or purges) of a bulk operation are under way at once.
pub const REPLAY_WINDOW: usize = 64;

/// What became of one letter's replay.
enum Replayed {
    /// Replayed and acked (`true`), left to the reader that holds it now
    /// (`false`), or published but not acked (the error).
    Done(Result<bool>),
    /// Not published: the letter stays held.
    Kept(Box<(Delivery, DeadLetter)>, Error),
}

/// Republishes one letter for `target` and acks it once the broker has the
/// replay.
async fn replay_letter(
    publisher: &dyn Publisher,
    target: ReplayTo,
    mut delivery: Delivery,
    letter: DeadLetter,
) -> Replayed {
    // Checked just before publishing: a revoke waits for the letters an
    // inbox holds (within the broker's rebalance timeout), so the window
    // left is one publish long.
    if !delivery.is_held() {
        return Replayed::Done(Ok(false));
    }
    let mut original = restore(delivery.message());
    if let (ReplayTo::FailedGroup, Some(group)) = (target, &letter.group) {
        original
            .headers
            .insert(header::REPLAY_FOR.to_owned(), group.clone());
    }
    match publisher.publish(&letter.topic, original).await {
        Ok(_) => Replayed::Done(delivery.ack().await.map(|()| true)),
        Err(error) => Replayed::Kept(Box::new((delivery, letter)), error),
    }
}

/// The original message of a dead letter: the same id, key, payload and
/// metadata, without the dead-letter headers, marked with the replay time
/// (`tidings-replayed-at`) so brokers that deduplicate publishes by id
/// store it again.
pub fn restore(letter: &Message) -> Message {
    let mut original = letter.clone();
    original.headers.retain(|name, _| {
        !name.starts_with("tidings-dlq-") && name != header::ATTEMPT && name != header::REPLAY_FOR
    });
    original.headers.insert(
        header::REPLAYED_AT.to_owned(),
        tidings_core::time::now_rfc3339(),
    );
    original
}

fn unknown(delivery: &Delivery) -> DeadLetter {
    DeadLetter {
        reason: tidings_core::DeadLetterReason::Permanent,
        error: "not a dead letter: no tidings-dlq headers".into(),
        attempts: 0,
        first_failure: None,
        last_failure: SystemTime::now(),
        topic: delivery.topic().to_owned(),
        group: delivery.group().map(str::to_owned),
    }
}
