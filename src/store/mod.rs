//! Storage back ends of [`switchboard_actors::store::MessageStore`].
//!
//! - [`embedded`]: a write-ahead log and fjall in the data directory, the default for one node.
//! - [`cassandra`]: Apache Cassandra, selected with `--store cassandra://…`.

pub mod cassandra;
pub mod embedded;
