//! JWT verification for the WebSocket upgrade and REST, and dev tokens.
//!
//! The algorithm is pinned by configuration (a token that names another is refused — `none` included — and
//! an HS256 token is never checked against an RSA or Ed25519 public key), `exp` and `sub` are required,
//! `nbf` is checked when present, `iss`/`aud` are checked when configured. `sub` is the user id and must be a
//! valid one. A WebSocket lives no longer than its token: the edge closes it with 1008 at `exp` plus the
//! leeway ([`Verified::expires_at`]).
//!
//! Errors say why a token was refused without quoting it: neither a token nor any part of it is ever logged.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Config, JwtAlgorithm};

/// How long dev tokens live.
pub const DEV_TOKEN_TTL_SECS: u64 = 24 * 3600;
/// File in the data directory holding the dev HS256 secret.
const DEV_SECRET_FILE: &str = "dev-jwt-secret";

/// Why a token or a user id was refused (never says more to the client than `unauthorized`).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token in the request.
    #[error("missing bearer token")]
    Missing,
    /// The token failed verification.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Keys could not be loaded.
    #[error("auth setup: {0}")]
    Setup(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
}

/// A verified token: whose it is and until when it is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The user (`sub`).
    pub user: String,
    /// When the token stops being accepted: its `exp` plus the leeway (`None`: too far to represent).
    pub expires_at: Option<SystemTime>,
}

impl Verified {
    /// How long from now the token stays valid (`None`: for longer than can be represented).
    pub fn lifetime(&self) -> Option<Duration> {
        let at = self.expires_at?;
        Some(at.duration_since(SystemTime::now()).unwrap_or_default())
    }
}

/// Verifies tokens; mints them when it holds the HS256 secret.
pub struct Auth {
    decoding: DecodingKey,
    validation: Validation,
    encoding: Option<EncodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
}

/// Whether `user` is an acceptable user id: 1 to 64 of `A-Z a-z 0-9 _ . @ -`.
pub fn valid_user_id(user: &str) -> bool {
    (1..=64).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b))
}

impl Auth {
    /// Build from the configuration; creates the dev secret in the data directory when no key is configured.
    pub fn from_config(config: &Config) -> Result<Self, AuthError> {
        let setup = |e: jsonwebtoken::errors::Error| AuthError::Setup(e.to_string());
        let (algorithm, decoding, encoding) = match config.jwt_algorithm {
            JwtAlgorithm::Hs256 => {
                let secret = match &config.jwt_secret {
                    Some(s) => s.as_bytes().to_vec(),
                    None => dev_secret(&config.data_dir)?,
                };
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(&secret),
                    Some(EncodingKey::from_secret(&secret)),
                )
            }
            JwtAlgorithm::Rs256 | JwtAlgorithm::EdDsa => {
                let path = config
                    .jwt_public_key
                    .as_ref()
                    .ok_or_else(|| AuthError::Setup("no public key".into()))?;
                let pem = std::fs::read(path)
                    .map_err(|e| AuthError::Setup(format!("{}: {e}", path.display())))?;
                if config.jwt_algorithm == JwtAlgorithm::Rs256 {
                    (
                        Algorithm::RS256,
                        DecodingKey::from_rsa_pem(&pem).map_err(setup)?,
                        None,
                    )
                } else {
                    (
                        Algorithm::EdDSA,
                        DecodingKey::from_ed_pem(&pem).map_err(setup)?,
                        None,
                    )
                }
            }
        };
        let mut validation = Validation::new(algorithm);
        // jsonwebtoken checks `iss`/`aud` only when the token carries them: require them when configured.
        let mut required = vec!["exp", "sub"];
        required.extend(config.jwt_issuer.as_ref().map(|_| "iss"));
        required.extend(config.jwt_audience.as_ref().map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        validation.leeway = config.jwt_leeway_secs;
        // Off by default in jsonwebtoken: a token that is not valid yet is refused like an expired one.
        validation.validate_nbf = true;
        match &config.jwt_issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &config.jwt_audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(Self {
            decoding,
            validation,
            encoding,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
        })
    }

    /// The user a token was issued to.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        self.verify_until(token).map(|v| v.user)
    }

    /// The user a token was issued to, and until when it is valid.
    pub fn verify_until(&self, token: &str) -> Result<Verified, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::Invalid(refusal(&e).into()))?;
        if !valid_user_id(&data.claims.sub) {
            return Err(AuthError::Invalid("sub is not a valid user id".into()));
        }
        // jsonwebtoken accepts a token while `now <= exp + leeway` in whole seconds: it expires when the
        // second after that one begins.
        let expires_at = UNIX_EPOCH.checked_add(Duration::from_secs(
            data.claims
                .exp
                .saturating_add(self.validation.leeway)
                .saturating_add(1),
        ));
        Ok(Verified {
            user: data.claims.sub,
            expires_at,
        })
    }

    /// Whether this node can mint tokens (it holds an HS256 secret).
    pub fn can_mint(&self) -> bool {
        self.encoding.is_some()
    }

    /// Mint a token for `user` valid for `ttl_secs` (HS256 only), with the configured `iss`/`aud`.
    pub fn mint(&self, user: &str, ttl_secs: u64) -> Result<String, AuthError> {
        let key = self
            .encoding
            .as_ref()
            .ok_or_else(|| AuthError::Setup("tokens can be minted only with HS256".into()))?;
        if !valid_user_id(user) {
            return Err(AuthError::Invalid("not a valid user id".into()));
        }
        let now = switchboard_actors::conversation::now_ms() / 1000;
        let claims = Claims {
            sub: user.to_owned(),
            exp: now + ttl_secs,
            iat: Some(now),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
            .map_err(|e| AuthError::Setup(e.to_string()))
    }
}

/// Why jsonwebtoken refused a token, in words that quote nothing from it: its JSON errors would quote claim
/// values (`invalid type: string "…"`), which are part of the token.
fn refusal(e: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not valid yet (nbf)",
        ErrorKind::InvalidIssuer => "wrong iss",
        ErrorKind::InvalidAudience => "wrong aud",
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => "algorithm not the configured one",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) => "claims of the wrong shape",
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => "not a JWT",
        _ => "refused",
    }
}

/// Read the dev secret from the data directory, creating it on first start.
fn dev_secret(dir: &Path) -> Result<Vec<u8>, AuthError> {
    let path = dir.join(DEV_SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().as_bytes().to_vec()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AuthError::Setup(format!("{}: {e}", path.display()))),
    }
    std::fs::create_dir_all(dir).map_err(|e| AuthError::Setup(e.to_string()))?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    write_private(&path, &secret)
        .map_err(|e| AuthError::Setup(format!("{}: {e}", path.display())))?;
    Ok(secret.into_bytes())
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        Config::for_data_dir(dir)
    }

    #[test]
    fn minted_tokens_verify_and_survive_restart() {
        let dir = tempfile::tempdir().unwrap();
        let token = Auth::from_config(&config(dir.path()))
            .unwrap()
            .mint("alice", 60)
            .unwrap();
        // A second Auth (a restart) reads the same secret from the data directory.
        assert_eq!(
            Auth::from_config(&config(dir.path()))
                .unwrap()
                .verify(&token)
                .unwrap(),
            "alice"
        );
    }

    #[test]
    fn refuses_expired_foreign_and_other_algorithm_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::from_config(&config(dir.path())).unwrap();
        let now = switchboard_actors::conversation::now_ms() / 1000;
        let key = EncodingKey::from_secret(
            std::fs::read(dir.path().join(DEV_SECRET_FILE))
                .unwrap()
                .as_slice(),
        );
        let expired = Claims {
            sub: "a".into(),
            exp: now - 3600,
            iat: None,
            iss: None,
            aud: None,
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &expired, &key).unwrap();
        assert!(auth.verify(&t).is_err(), "expired");
        let other_alg = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &Claims {
                sub: "a".into(),
                exp: now + 60,
                iat: None,
                iss: None,
                aud: None,
            },
            &key,
        )
        .unwrap();
        assert!(auth.verify(&other_alg).is_err(), "algorithm not pinned");
        let foreign = EncodingKey::from_secret(b"someone else");
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "a".into(),
                exp: now + 60,
                iat: None,
                iss: None,
                aud: None,
            },
            &foreign,
        )
        .unwrap();
        assert!(auth.verify(&t).is_err(), "wrong key");
        let no_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub":"a"}),
            &key,
        )
        .unwrap();
        assert!(auth.verify(&no_exp).is_err(), "exp required");
        let bad_sub = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "a b/c".into(),
                exp: now + 60,
                iat: None,
                iss: None,
                aud: None,
            },
            &key,
        )
        .unwrap();
        assert!(auth.verify(&bad_sub).is_err(), "sub must be a user id");
        assert!(auth.verify("garbage").is_err());
    }

    #[test]
    fn checks_issuer_and_audience_when_configured() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.jwt_secret = Some("s3cret".into());
        c.jwt_issuer = Some("me".into());
        c.jwt_audience = Some("sb".into());
        let auth = Auth::from_config(&c).unwrap();
        let now = switchboard_actors::conversation::now_ms() / 1000;
        let key = EncodingKey::from_secret(b"s3cret");
        let good = serde_json::json!({"sub":"a","exp":now+60,"iss":"me","aud":"sb"});
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &good, &key).unwrap();
        assert_eq!(auth.verify(&t).unwrap(), "a");
        let wrong_iss = serde_json::json!({"sub":"a","exp":now+60,"iss":"you","aud":"sb"});
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &wrong_iss, &key).unwrap();
        assert!(auth.verify(&t).is_err());
        let no_aud = serde_json::json!({"sub":"a","exp":now+60,"iss":"me"});
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &no_aud, &key).unwrap();
        assert!(auth.verify(&t).is_err(), "aud is required when configured");
        let no_iss = serde_json::json!({"sub":"a","exp":now+60,"aud":"sb"});
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &no_iss, &key).unwrap();
        assert!(auth.verify(&t).is_err(), "iss is required when configured");
        // Tokens this node mints satisfy its own checks.
        assert_eq!(auth.verify(&auth.mint("bea", 60).unwrap()).unwrap(), "bea");
    }

    /// Base64url without padding, as JWTs encode their parts.
    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn refuses_tampered_premature_unsigned_and_confused_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.jwt_secret = Some("s3cret".into());
        let auth = Auth::from_config(&c).unwrap();
        let key = EncodingKey::from_secret(b"s3cret");
        let now = switchboard_actors::conversation::now_ms() / 1000;
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
        };
        let good = sign(serde_json::json!({"sub":"alice","exp":now+600}));
        let verified = auth.verify_until(&good).unwrap();
        assert_eq!(verified.user, "alice");
        let left = verified.lifetime().unwrap().as_secs();
        assert!((600..=631).contains(&left), "exp plus the leeway: {left}");

        let parts: Vec<&str> = good.split('.').collect();
        // A signature with one character changed.
        let mut sig = parts[2].to_owned().into_bytes();
        sig[0] = if sig[0] == b'A' { b'B' } else { b'A' };
        let flipped = format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            String::from_utf8(sig).unwrap()
        );
        assert!(auth.verify(&flipped).is_err(), "tampered signature");
        // Another user's claims under alice's signature.
        let claims = b64(format!(r#"{{"sub":"mallory","exp":{}}}"#, now + 600).as_bytes());
        let swapped = format!("{}.{claims}.{}", parts[0], parts[2]);
        assert!(auth.verify(&swapped).is_err(), "tampered claims");
        assert!(
            auth.verify(&format!("{}.{}.", parts[0], parts[1])).is_err(),
            "signature stripped"
        );

        let premature = sign(serde_json::json!({"sub":"alice","exp":now+600,"nbf":now+300}));
        assert!(auth.verify(&premature).is_err(), "not valid before nbf");
        let started = sign(serde_json::json!({"sub":"alice","exp":now+600,"nbf":now-5}));
        assert_eq!(auth.verify(&started).unwrap(), "alice", "valid after nbf");
        let long_expired = sign(serde_json::json!({"sub":"alice","exp":now-31}));
        assert!(
            auth.verify(&long_expired).is_err(),
            "expired past the leeway"
        );

        // `alg: none`, with no signature or with the real one.
        let claims = b64(format!(r#"{{"sub":"alice","exp":{}}}"#, now + 600).as_bytes());
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"None"}"#,
            r#"{"typ":"JWT"}"#,
        ] {
            let unsigned = format!("{}.{claims}.", b64(header.as_bytes()));
            assert!(auth.verify(&unsigned).is_err(), "{header}");
            let resigned = format!("{}.{claims}.{}", b64(header.as_bytes()), parts[2]);
            assert!(auth.verify(&resigned).is_err(), "{header} with a signature");
        }

        // An HS256 node refuses tokens signed with the fixtures' private keys (RS256, EdDSA).
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt");
        let rsa = std::fs::read(fixtures.join("rsa-private.pem")).unwrap();
        let ed = std::fs::read(fixtures.join("ed25519-private.pem")).unwrap();
        let claims = serde_json::json!({"sub":"alice","exp":now+600});
        for (alg, key) in [
            (Algorithm::RS256, EncodingKey::from_rsa_pem(&rsa).unwrap()),
            (Algorithm::EdDSA, EncodingKey::from_ed_pem(&ed).unwrap()),
        ] {
            let token = jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap();
            assert!(auth.verify(&token).is_err(), "{alg:?} on an HS256 node");
        }
    }

    /// The reason a refusal carries never quotes the token or its claims.
    #[test]
    fn refusals_quote_nothing_from_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::from_config(&config(dir.path())).unwrap();
        let claims = b64(br#"{"sub":"SECRETSUB","exp":"SECRETEXP","nbf":"x"}"#);
        let header = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
        for token in [
            format!("{header}.{claims}.c2lnbmF0dXJl"),
            format!("{header}.{claims}"),
            "SECRET!!.SECRET!!.SECRET!!".to_owned(),
        ] {
            let e = auth.verify(&token).unwrap_err().to_string();
            assert!(!e.contains("SECRET"), "{e}");
            assert!(!e.contains(&claims) && !e.contains("c2lnbmF0dXJl"), "{e}");
        }
    }

    /// RS256 and EdDSA verify with a public key from the configuration (test key pairs in
    /// tests/fixtures/jwt), refuse any other algorithm, and cannot mint.
    #[test]
    fn public_key_algorithms_verify_and_stay_pinned() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt");
        let now = switchboard_actors::conversation::now_ms() / 1000;
        let claims = serde_json::json!({"sub":"carol","exp":now+60});
        for (algorithm, alg, private, public) in [
            (
                JwtAlgorithm::Rs256,
                Algorithm::RS256,
                "rsa-private.pem",
                "rsa-public.pem",
            ),
            (
                JwtAlgorithm::EdDsa,
                Algorithm::EdDSA,
                "ed25519-private.pem",
                "ed25519-public.pem",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut c = config(dir.path());
            c.jwt_algorithm = algorithm;
            c.jwt_public_key = Some(fixtures.join(public));
            let auth = Auth::from_config(&c).unwrap();
            let pem = std::fs::read(fixtures.join(private)).unwrap();
            let key = match alg {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
                _ => EncodingKey::from_ed_pem(&pem).unwrap(),
            };
            let token = jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap();
            assert_eq!(auth.verify(&token).unwrap(), "carol", "{alg:?}");
            // An HS256 token "signed" with the public key (the classic confusion attack) is refused.
            let public_pem = std::fs::read(fixtures.join(public)).unwrap();
            let confused = jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(&public_pem),
            )
            .unwrap();
            assert!(auth.verify(&confused).is_err(), "{alg:?} must stay pinned");
            assert!(!auth.can_mint());
            assert!(auth.mint("carol", 60).is_err());
        }
    }
}
