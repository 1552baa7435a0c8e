//! Message ids: the [`MessageId`] type, which holds an id without a heap
//! allocation, and fresh ids, UUID v7 made without a lock.
//!
//! `uuid::Uuid::now_v7` keeps its ordering counter behind a process-wide
//! mutex and reads the clock itself: about 560 instructions per message
//! (callgrind), plus a second clock read for the event time. Here one
//! clock read serves both, and the ordering counter is one atomic value;
//! the `uuid` crate still lays out the bits.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrayvec::ArrayString;

/// The longest id kept inline: the most that, with its length and the
/// enum's tag, fits 48 bytes — a UUID's 36 characters, a ULID's 26, a
/// UUID with a short prefix (`evt_…`).
const INLINE: usize = 40;

/// A message id: text, compared, hashed and ordered as its `str`.
///
/// Ids of up to 40 bytes — every UUID and ULID — are stored in the value
/// itself, so making, cloning or dropping one allocates nothing; a
/// message's id no longer costs a heap allocation on the thread that
/// publishes and a free on the thread that handles. Longer ids are kept on
/// the heap. It reads as a `&str` wherever one is expected:
///
/// ```
/// use tidings_core::{Message, MessageId};
/// let m = Message::new("{}").with_id("order-7");
/// assert_eq!(m.id, "order-7");
/// let s: &str = &m.id;
/// let owned: String = m.id.clone().into();
/// assert_eq!(MessageId::from(owned), m.id);
/// assert!(s.starts_with("order"));
/// ```
// Written here rather than taken from a small-string crate: `compact_str`,
// `smol_str` and `smartstring` keep at most 24 bytes inline, which a UUID
// (36) exceeds; `arrayvec` gives the checked inline buffer.
#[derive(Clone)]
pub struct MessageId(Repr);

#[derive(Clone)]
enum Repr {
    Inline(ArrayString<INLINE>),
    Heap(Box<str>),
}

impl MessageId {
    /// The id as text.
    #[inline]
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline(s) => s.as_str(),
            Repr::Heap(s) => s,
        }
    }
}

impl MessageId {
    /// An id written by `format_args!`, without a `String` in between
    /// when it fits inline: the broker-native ids adapters fall back on
    /// (`stream:sequence`, `topic:partition:offset`).
    ///
    /// ```
    /// use tidings_core::MessageId;
    /// let id = MessageId::from_fmt(format_args!("{}:{}", "ORDERS", 42));
    /// assert_eq!(id, "ORDERS:42");
    /// ```
    pub fn from_fmt(args: fmt::Arguments<'_>) -> Self {
        let mut inline = ArrayString::new();
        match fmt::Write::write_fmt(&mut inline, args) {
            Ok(()) => MessageId(Repr::Inline(inline)),
            // Longer than the inline buffer.
            Err(_) => MessageId(Repr::Heap(fmt::format(args).into_boxed_str())),
        }
    }
}

impl Default for MessageId {
    /// The empty id (a message made by [`Message::new`](super::Message::new)
    /// gets a fresh one instead).
    fn default() -> Self {
        MessageId(Repr::Inline(ArrayString::new()))
    }
}

impl Deref for MessageId {
    type Target = str;
    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for MessageId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<[u8]> for MessageId {
    fn as_ref(&self) -> &[u8] {
        self.as_str().as_bytes()
    }
}

impl Borrow<str> for MessageId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for MessageId {
    fn from(id: &str) -> Self {
        match ArrayString::from(id) {
            Ok(inline) => MessageId(Repr::Inline(inline)),
            Err(_) => MessageId(Repr::Heap(id.into())),
        }
    }
}

impl From<&String> for MessageId {
    fn from(id: &String) -> Self {
        id.as_str().into()
    }
}

impl From<String> for MessageId {
    fn from(id: String) -> Self {
        if id.len() <= INLINE {
            id.as_str().into()
        } else {
            MessageId(Repr::Heap(id.into_boxed_str()))
        }
    }
}

impl From<&MessageId> for MessageId {
    fn from(id: &MessageId) -> Self {
        id.clone()
    }
}

impl From<uuid::Uuid> for MessageId {
    fn from(id: uuid::Uuid) -> Self {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        (&*id.hyphenated().encode_lower(&mut text)).into()
    }
}

impl From<Box<str>> for MessageId {
    fn from(id: Box<str>) -> Self {
        if id.len() <= INLINE {
            (&*id).into()
        } else {
            MessageId(Repr::Heap(id))
        }
    }
}

impl From<std::borrow::Cow<'_, str>> for MessageId {
    fn from(id: std::borrow::Cow<'_, str>) -> Self {
        match id {
            std::borrow::Cow::Borrowed(id) => id.into(),
            std::borrow::Cow::Owned(id) => id.into(),
        }
    }
}

impl From<&MessageId> for String {
    fn from(id: &MessageId) -> Self {
        id.as_str().to_owned()
    }
}

impl From<MessageId> for String {
    fn from(id: MessageId) -> Self {
        match id.0 {
            Repr::Inline(s) => s.as_str().to_owned(),
            Repr::Heap(s) => s.into_string(),
        }
    }
}

impl PartialEq for MessageId {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for MessageId {}

impl PartialOrd for MessageId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for MessageId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for MessageId {
    // As the `str` hashes, so that maps keyed by ids can be looked up by `&str`.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

macro_rules! eq_text {
    ($($text:ty),+) => {$(
        impl PartialEq<$text> for MessageId {
            fn eq(&self, other: &$text) -> bool {
                self.as_str() == &other[..]
            }
        }
        impl PartialEq<MessageId> for $text {
            fn eq(&self, other: &MessageId) -> bool {
                &self[..] == other.as_str()
            }
        }
    )+};
}
eq_text!(str, &str, String);

impl fmt::Display for MessageId {
    // `pad`, not `write_str`: width and precision apply as to a `str`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl serde::Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = MessageId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message id")
            }
            fn visit_str<E>(self, id: &str) -> Result<MessageId, E> {
                Ok(id.into())
            }
            fn visit_string<E>(self, id: String) -> Result<MessageId, E> {
                Ok(id.into())
            }
            // As `String` accepts UTF-8 bytes (MessagePack, CBOR).
            fn visit_bytes<E: serde::de::Error>(self, id: &[u8]) -> Result<MessageId, E> {
                std::str::from_utf8(id)
                    .map(MessageId::from)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Bytes(id), &self))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

/// Bits of the counter that orders ids made in the same millisecond: the
/// 12 bits of `rand_a` and the top 6 of `rand_b` (RFC 9562, method 1). The
/// 56 bits after them are random. Each millisecond's counter starts at a
/// random value below 2^17, as `uuid`'s own context reseeds its counter,
/// so ids of different processes in the same millisecond differ in 73
/// random bits.
const COUNTER_BITS: u32 = 18;

/// The last id's millisecond and counter (`millis << COUNTER_BITS | counter`),
/// shared by the whole process so that its ids sort in the order they were
/// made, whichever thread made them.
static LAST: AtomicU64 = AtomicU64::new(0);

/// A fresh message id: a UUID v7, which sorts by creation time, and in the
/// order of creation within a process.
pub fn new_id() -> MessageId {
    id_at(since_epoch(SystemTime::now()))
}

/// A fresh id and the time it was made, to the microsecond (the precision
/// `ce_time` carries), from one clock read: what a new message takes.
pub(crate) fn id_and_time() -> (MessageId, SystemTime) {
    let since = since_epoch(SystemTime::now());
    (
        id_at(since),
        UNIX_EPOCH + Duration::from_micros(since.as_micros() as u64),
    )
}

fn since_epoch(now: SystemTime) -> Duration {
    now.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// A fresh id made `since` the Unix epoch.
fn id_at(since: Duration) -> MessageId {
    // 122 random bits from `uuid`'s generator (`fast-rng`: rand's
    // thread-local generator, seeded from the operating system).
    let random = uuid::Uuid::new_v4().as_u128();
    let seed = random as u64 & ((1 << (COUNTER_BITS - 1)) - 1);
    let stamp = next_stamp(since.as_millis() as u64, seed);
    let counter = stamp & ((1 << COUNTER_BITS) - 1);
    let mut bytes = [0u8; 10];
    // rand_a: the counter's top 12 bits (the builder sets the version in
    // the high nibble of byte 0); then its low 6 bits (the builder sets the
    // variant in the top two bits of byte 2); then randomness.
    bytes[0] = (counter >> 14) as u8 & 0x0f;
    bytes[1] = (counter >> 6) as u8;
    bytes[2] = counter as u8 & 0x3f;
    bytes[3..].copy_from_slice(&((random >> 64) as u64).to_le_bytes()[..7]);
    uuid::Builder::from_unix_timestamp_millis(stamp >> COUNTER_BITS, &bytes)
        .into_uuid()
        .into()
}

/// The next (millisecond, counter) after the last one handed out, and not
/// before `millis`; a new millisecond's counter starts at `seed`.
fn next_stamp(millis: u64, seed: u64) -> u64 {
    let last = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(after(last, millis, seed))
        })
        .unwrap_or_else(|last| last);
    after(last, millis, seed)
}

/// The stamp that follows `last` at `millis`. A counter that runs out
/// within a millisecond carries into the next one, as `uuid`'s own context
/// does; a clock that went back does not send ids back with it.
fn after(last: u64, millis: u64, seed: u64) -> u64 {
    if last >> COUNTER_BITS >= millis {
        last + 1
    } else {
        (millis << COUNTER_BITS) | seed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_takes_48_bytes_and_keeps_uuids_inline() {
        assert_eq!(std::mem::size_of::<MessageId>(), 48);
        assert_eq!(std::mem::size_of::<Option<MessageId>>(), 48);
        assert!(matches!(new_id().0, Repr::Inline(_)));
        let longest = "x".repeat(INLINE);
        assert!(matches!(MessageId::from(&longest).0, Repr::Inline(_)));
        assert!(matches!(
            MessageId::from(longest.clone()).0,
            Repr::Inline(_)
        ));
    }

    #[test]
    fn a_long_id_is_kept_whole_on_the_heap() {
        let long = format!("orders:{}:{}", "y".repeat(60), new_id());
        for id in [
            MessageId::from(long.as_str()),
            MessageId::from(long.clone()),
            MessageId::from_fmt(format_args!("{long}")),
        ] {
            assert!(matches!(id.0, Repr::Heap(_)));
            assert_eq!(id, long);
            assert_eq!(String::from(id), long);
        }
        let short = MessageId::from_fmt(format_args!("{}:{}", "S", 7));
        assert!(matches!(short.0, Repr::Inline(_)));
        assert_eq!(short, "S:7");
    }

    #[test]
    fn ids_compare_hash_and_order_as_their_text() {
        use std::collections::{BTreeSet, HashMap};
        let inline = MessageId::from("a".repeat(10));
        let heap = MessageId::from("b".repeat(100));
        // Equal whichever way they are stored, and to their text.
        assert_eq!(inline, MessageId::from("a".repeat(10).as_str()));
        assert_eq!(inline, *"a".repeat(10));
        assert_eq!("a".repeat(10), inline);
        assert_ne!(inline, heap);
        // Hashed as the `str`: a map keyed by ids is looked up by `&str`.
        let map: HashMap<MessageId, u8> = [(inline.clone(), 1), (heap.clone(), 2)].into();
        assert_eq!(map.get("a".repeat(10).as_str()), Some(&1));
        assert_eq!(map.get("b".repeat(100).as_str()), Some(&2));
        // Ordered as the `str`, across both forms.
        let order: Vec<_> = BTreeSet::from([heap.clone(), inline.clone()])
            .into_iter()
            .collect();
        assert_eq!(order, [inline.clone(), heap]);
        assert_eq!(format!("{inline}"), "a".repeat(10));
        // Width and precision as for a `str`.
        let short = MessageId::from("ab");
        assert_eq!(format!("{short:>4}|{short:.1}|{short:-<3}"), "  ab|a|ab-");
        assert_eq!(format!("{inline:?}"), format!("{:?}", "a".repeat(10)));
        assert_eq!(MessageId::default(), "");
        // Conversions keep the text, whichever way they go.
        let long = "c".repeat(60);
        assert_eq!(MessageId::from(long.clone().into_boxed_str()), long);
        assert_eq!(MessageId::from(std::borrow::Cow::Borrowed("d")), "d");
        assert_eq!(String::from(&inline), "a".repeat(10));
    }

    #[test]
    fn ids_travel_through_serde_as_strings() {
        let short = MessageId::from("order-7");
        let long = MessageId::from("z".repeat(80));
        let json = serde_json::to_string(&[&short, &long]).unwrap();
        assert_eq!(json, format!("[\"order-7\",\"{}\"]", "z".repeat(80)));
        let back: Vec<MessageId> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, [short, long]);
        // Escaped text is decoded, not borrowed.
        let escaped: MessageId = serde_json::from_str(r#""a\u0062c""#).unwrap();
        assert_eq!(escaped, "abc");
        assert!(serde_json::from_str::<MessageId>("7").is_err());
        // Bytes, where a format gives them, as `String` takes them.
        use serde::de::IntoDeserializer;
        let bytes: serde::de::value::BytesDeserializer<'_, serde::de::value::Error> =
            b"order-8".as_slice().into_deserializer();
        assert_eq!(
            <MessageId as serde::Deserialize>::deserialize(bytes).unwrap(),
            "order-8"
        );
        let invalid: serde::de::value::BytesDeserializer<'_, serde::de::value::Error> =
            [0xffu8].as_slice().into_deserializer();
        assert!(<MessageId as serde::Deserialize>::deserialize(invalid).is_err());
    }

    #[test]
    fn ids_are_uuid_v7_of_the_current_millisecond() {
        let before = SystemTime::now();
        let id = uuid::Uuid::parse_str(&new_id()).expect("a UUID");
        let after = SystemTime::now();
        assert_eq!(id.get_version(), Some(uuid::Version::SortRand));
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        let (secs, nanos) = id.get_timestamp().expect("v7 has a time").to_unix();
        let at = UNIX_EPOCH + Duration::new(secs, nanos);
        let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis();
        assert!(ms(before) <= ms(at) && ms(at) <= ms(after), "{at:?}");
    }

    #[test]
    fn ids_sort_in_the_order_they_were_made_across_threads() {
        // Each thread's ids increase; all ids are distinct; and an id made
        // after another one was seen (here: after the threads were joined)
        // sorts after it.
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..20_000).map(|_| new_id()).collect::<Vec<_>>()))
            .collect();
        let mut all = Vec::new();
        for thread in threads {
            let ids = thread.join().expect("joined");
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "a thread's ids out of order"
            );
            all.extend(ids);
        }
        let later = new_id();
        assert!(all.iter().all(|id| *id < later));
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 80_000);
    }

    #[test]
    fn a_full_counter_carries_into_the_next_millisecond() {
        let millis = 1_800_000_000_000;
        let full = (millis << COUNTER_BITS) | ((1 << COUNTER_BITS) - 1);
        assert_eq!(after(full, millis, 5), (millis + 1) << COUNTER_BITS);
        // A clock that went back does not send ids back with it.
        assert_eq!(after(full, millis - 5, 5), (millis + 1) << COUNTER_BITS);
        // A new millisecond starts at the seed.
        assert_eq!(
            after(full, millis + 3, 5),
            ((millis + 3) << COUNTER_BITS) | 5
        );
    }

    #[test]
    fn ids_of_one_millisecond_differ_beyond_the_counter() {
        // Two ids made with the same stamp (as two processes would) still
        // differ: the tail after the counter is random.
        let ids: std::collections::HashSet<_> =
            (0..1_000).map(|_| new_id()[21..].to_owned()).collect();
        assert_eq!(ids.len(), 1_000);
    }

    #[test]
    fn the_event_time_is_the_ids_time_to_the_microsecond() {
        let (id, time) = id_and_time();
        let since = time.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(since.subsec_nanos() % 1_000, 0);
        let (secs, nanos) = uuid::Uuid::parse_str(&id)
            .unwrap()
            .get_timestamp()
            .unwrap()
            .to_unix();
        // The same clock read: the id's millisecond is the event time's,
        // unless another thread's later read was counted first.
        let id_at = Duration::new(secs, nanos);
        assert!(
            id_at.as_millis() >= since.as_millis(),
            "{id_at:?} {since:?}"
        );
        assert!(
            id_at.as_millis() - since.as_millis() < 1_000,
            "{id_at:?} {since:?}"
        );
    }
}
