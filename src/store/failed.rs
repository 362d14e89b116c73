//! The store of a node whose embedded store could not open (a full disk, a damaged file): it answers every
//! request with `store_unavailable` and says why, so the node stays up and tells its operator what is wrong
//! (`/readyz`, the log, `switchboard_store_failed`) rather than exiting and being restarted into the same
//! failure over and over.

use std::collections::HashMap;

use async_trait::async_trait;
use switchboard_actors::store::{
    Appended, ConvId, ConversationInfo, HistoryQuery, Membership, MessageStore, NewMessage, Page,
    StoreError, UserId,
};

/// Refuses everything with the reason the real store could not open.
pub struct FailedStore {
    error: StoreError,
    hint: &'static str,
}

impl FailedStore {
    /// A store that failed to open with `error`; `hint` says what to do about it.
    pub fn new(error: StoreError, hint: &'static str) -> Self {
        metrics::gauge!("switchboard_store_failed").set(1.0);
        // Unavailable whatever the cause: to a client the store is down (`store_unavailable`, retry later),
        // not a message that cannot be read.
        let error = StoreError::Unavailable(format!("the store could not open: {error}"));
        Self { error, hint }
    }

    fn refuse<T>(&self) -> Result<T, StoreError> {
        Err(self.error.clone())
    }
}

#[async_trait]
impl MessageStore for FailedStore {
    fn failure(&self) -> Option<String> {
        Some(format!("{} ({})", self.error, self.hint))
    }

    async fn create_conversation(
        &self,
        _: ConversationInfo,
        _: Vec<UserId>,
    ) -> Result<(ConversationInfo, bool), StoreError> {
        self.refuse()
    }

    async fn conversation(&self, _: &str) -> Result<Option<ConversationInfo>, StoreError> {
        self.refuse()
    }

    async fn members(&self, _: &str) -> Result<Vec<UserId>, StoreError> {
        self.refuse()
    }

    async fn membership(&self, _: &str, _: &str) -> Result<Membership, StoreError> {
        self.refuse()
    }

    async fn add_member(&self, _: &str, _: &str) -> Result<bool, StoreError> {
        self.refuse()
    }

    async fn remove_member(&self, _: &str, _: &str) -> Result<bool, StoreError> {
        self.refuse()
    }

    async fn owners(&self, _: &str) -> Result<Vec<UserId>, StoreError> {
        self.refuse()
    }

    async fn set_owner(&self, _: &str, _: &str, _: bool) -> Result<bool, StoreError> {
        self.refuse()
    }

    async fn user_conversations(&self, _: &str) -> Result<Vec<ConvId>, StoreError> {
        self.refuse()
    }

    async fn last_message(
        &self,
        _: &str,
    ) -> Result<Option<switchboard_actors::store::Message>, StoreError> {
        self.refuse()
    }

    async fn append(
        &self,
        _: &str,
        _: u64,
        _: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, StoreError> {
        self.refuse()
    }

    async fn set_read(&self, _: &str, _: &str, _: u64) -> Result<(), StoreError> {
        self.refuse()
    }

    async fn read_positions(&self, _: &str) -> Result<HashMap<ConvId, u64>, StoreError> {
        self.refuse()
    }

    async fn messages(&self, _: &str, _: HistoryQuery) -> Result<Page, StoreError> {
        self.refuse()
    }
}
