//! Reads shared by the socket (`sync`) and REST (history, inbox): membership checks and paging rules live
//! here once.

use crate::protocol::{ErrorCode, ProtocolError};
use crate::store::{
    inbox_order, ConversationInfo, HistoryQuery, Membership, Message, MessageStore, Page, MAX_PAGE,
};

/// Messages replayed by one `sync`.
pub const SYNC_LIMIT: usize = MAX_PAGE;

/// `Ok` if `user` may read `conv`; `unknown_conversation` or `not_member` otherwise.
pub async fn authorize(
    store: &dyn MessageStore,
    conv: &str,
    user: &str,
) -> Result<(), ProtocolError> {
    match store
        .membership(conv, user)
        .await
        .map_err(crate::conversation::store_error)?
    {
        Membership::Member => Ok(()),
        Membership::NotMember => Err(ProtocolError::new(
            ErrorCode::NotMember,
            "you are not a member of this conversation",
        )),
        Membership::Unknown => Err(ProtocolError::new(
            ErrorCode::UnknownConversation,
            "no such conversation",
        )),
    }
}

/// What a client missed: up to [`SYNC_LIMIT`] messages with `seq > after_seq`.
pub async fn sync(
    store: &dyn MessageStore,
    user: &str,
    conv: &str,
    after_seq: u64,
) -> Result<Page, ProtocolError> {
    page(
        store,
        user,
        conv,
        HistoryQuery {
            before: None,
            after: Some(after_seq),
            limit: SYNC_LIMIT,
        },
    )
    .await
}

/// A history page for a member.
pub async fn page(
    store: &dyn MessageStore,
    user: &str,
    conv: &str,
    query: HistoryQuery,
) -> Result<Page, ProtocolError> {
    if query.limit == 0 || query.limit > MAX_PAGE {
        return Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!("limit must be 1 to {MAX_PAGE}"),
        ));
    }
    authorize(store, conv, user).await?;
    store
        .messages(conv, query)
        .await
        .map_err(crate::conversation::store_error)
}

/// The user's conversations with their newest message, most recent activity first.
pub async fn inbox(
    store: &dyn MessageStore,
    user: &str,
) -> Result<Vec<(ConversationInfo, Option<Message>)>, ProtocolError> {
    let err = crate::conversation::store_error;
    let mut entries = Vec::new();
    for conv in store.user_conversations(user).await.map_err(err)? {
        if let Some(info) = store.conversation(&conv).await.map_err(err)? {
            let last = store.last_message(&conv).await.map_err(err)?;
            entries.push((info, last));
        }
    }
    entries.sort_by(|a, b| inbox_order((&a.0, a.1.as_ref()), (&b.0, b.1.as_ref())));
    Ok(entries)
}
