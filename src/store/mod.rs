//! Storage back ends of [`switchboard_actors::store::MessageStore`].
//!
//! - [`embedded`]: a write-ahead log and fjall in the data directory, the default for one node.
//! - [`cassandra`]: Apache Cassandra, selected with `--store cassandra://…`.
//! - [`failed`]: what a node runs with when its embedded store cannot open: it refuses every request and
//!   says why.

pub mod cassandra;
pub mod embedded;
pub mod failed;
