//! Getting ready against Switchboard: tokens (dev login or minted with the node's HS256 secret) and
//! conversations (REST).

use std::net::SocketAddrV4;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{stream, StreamExt, TryStreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::Error;

/// Requests in flight at once during setup.
const SETUP_CONCURRENCY: usize = 32;

/// The claims Switchboard checks.
#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Sign an HS256 token for `user` valid for a day.
pub(crate) fn mint(
    secret: &[u8],
    user: &str,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, Error> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = Claims {
        sub: user,
        exp: now + 86_400,
        iss: issuer,
        aud: audience,
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

/// A REST client for one Switchboard node.
pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
}

#[derive(Deserialize)]
struct TokenReply {
    token: String,
}

#[derive(Deserialize)]
struct ConvReply {
    id: String,
}

impl Api {
    /// A client for `http://server`.
    pub(crate) fn new(server: SocketAddrV4) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(SETUP_CONCURRENCY)
            .build()?;
        Ok(Self {
            http,
            base: format!("http://{server}"),
        })
    }

    /// One dev-login token per user, in order.
    pub(crate) async fn dev_tokens(&self, users: &[String]) -> Result<Vec<String>, Error> {
        stream::iter(users)
            .map(|user| async move {
                let reply = self
                    .http
                    .post(format!("{}/v1/dev/token", self.base))
                    .json(&json!({ "user": user }))
                    .send()
                    .await?;
                let status = reply.status();
                if !status.is_success() {
                    let hint = if status == reqwest::StatusCode::NOT_FOUND {
                        " (dev login is off: pass --jwt-secret or --jwt-secret-file)"
                    } else {
                        ""
                    };
                    return Err(format!("POST /v1/dev/token: {status}{hint}").into());
                }
                Ok::<_, Error>(reply.json::<TokenReply>().await?.token)
            })
            .buffered(SETUP_CONCURRENCY)
            .try_collect()
            .await
    }

    async fn create(&self, token: &str, body: serde_json::Value) -> Result<String, Error> {
        let reply = self
            .http
            .post(format!("{}/v1/conversations", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await?;
        let status = reply.status();
        if !status.is_success() {
            let text = reply.text().await.unwrap_or_default();
            return Err(format!("POST /v1/conversations: {status} {text}").into());
        }
        Ok(reply.json::<ConvReply>().await?.id)
    }

    /// Create DMs: `(creator token, other user)` → conversation id, in order.
    pub(crate) async fn create_dms(
        &self,
        pairs: &[(String, String)],
    ) -> Result<Vec<String>, Error> {
        stream::iter(pairs)
            .map(|(token, other)| self.create(token, json!({"kind": "dm", "members": [other]})))
            .buffered(SETUP_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Create one group of `members` (the creator is added by the server).
    pub(crate) async fn create_group(
        &self,
        token: &str,
        name: &str,
        members: &[String],
    ) -> Result<String, Error> {
        self.create(
            token,
            json!({"kind": "group", "name": name, "members": members}),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_with_the_same_secret() {
        let token = mint(b"s3cret", "alice", Some("sb"), None).unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::HS256);
        v.set_issuer(&["sb"]);
        v.validate_aud = false;
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"s3cret"),
            &v,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "alice");
        assert!(data.claims.get("aud").is_none());
        assert!(jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"other"),
            &v,
        )
        .is_err());
    }
}
