//! Storage back ends of [`switchboard_actors::store::MessageStore`].
//!
//! - [`embedded`]: redb in the data directory, the default for one node.

pub mod embedded;
