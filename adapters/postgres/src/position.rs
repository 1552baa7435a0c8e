//! The global order of the store.

use std::fmt;
use std::str::FromStr;

/// Where an event stands in the store as a whole: the writing transaction's
/// id, then the event's sequence number.
///
/// Why not the sequence alone: sequence numbers are taken when a row is
/// inserted, but rows become visible when their transaction commits, so a
/// reader that had seen sequence 11 could later find 10 committed behind
/// it. The store orders events by `(transaction, sequence)` and a global
/// read returns only events of transactions older than every transaction
/// still in progress (`pg_snapshot_xmin`): nothing can commit behind a
/// position once it was returned. Within one stream this order is the
/// version order (appends to a stream take its lock before their first
/// write, when PostgreSQL gives a transaction its id).
///
/// Its text form is `transaction/sequence`, for storing a checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GlobalPosition {
    /// The writing transaction's id (PostgreSQL `xid8`).
    pub transaction: u64,
    /// The event's sequence number.
    pub sequence: u64,
}

impl GlobalPosition {
    /// Before every event.
    pub const START: GlobalPosition = GlobalPosition {
        transaction: 0,
        sequence: 0,
    };
}

impl fmt::Display for GlobalPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.transaction, self.sequence)
    }
}

impl FromStr for GlobalPosition {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a position (`transaction/sequence`)");
        let (t, q) = s.split_once('/').ok_or_else(bad)?;
        Ok(GlobalPosition {
            transaction: t.parse().map_err(|_| bad())?,
            sequence: q.parse().map_err(|_| bad())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_by_transaction_then_sequence_and_round_trip_as_text() {
        let a = GlobalPosition {
            transaction: 99,
            sequence: 11,
        };
        let b = GlobalPosition {
            transaction: 100,
            sequence: 10,
        };
        assert!(GlobalPosition::START < a && a < b);
        assert_eq!("99/11".parse::<GlobalPosition>(), Ok(a));
        assert_eq!(b.to_string(), "100/10");
        assert!("100".parse::<GlobalPosition>().is_err());
    }
}
