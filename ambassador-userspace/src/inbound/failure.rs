//! Why a caller's credentials were refused: a reason from a small fixed set,
//! for the metric, the status and the one line the caller reads.

/// Why a caller was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Missing,
    Malformed,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    MissingClaim,
    Signature,
    Algorithm,
    UnknownKey,
    UnknownApiKey,
    /// The keys could not be had (a JWKS URL down with nothing fetched yet).
    KeysUnavailable,
}

impl Failure {
    /// The metric's `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not_yet_valid",
            Failure::Issuer => "wrong_issuer",
            Failure::Audience => "wrong_audience",
            Failure::MissingClaim => "missing_claim",
            Failure::Signature => "bad_signature",
            Failure::Algorithm => "algorithm",
            Failure::UnknownKey => "unknown_key",
            Failure::UnknownApiKey => "unknown_api_key",
            Failure::KeysUnavailable => "keys_unavailable",
        }
    }

    /// What the caller reads (never a token, key or claim value).
    pub fn message(self) -> &'static str {
        match self {
            Failure::Missing => "credentials required: a bearer token or an API key",
            Failure::Malformed => {
                "the bearer token is not a JWT this port accepts (shape, header or algorithm)"
            }
            Failure::Expired => "the token has expired",
            Failure::NotYetValid => "the token is not valid yet",
            Failure::Issuer => "the token's issuer is not accepted here",
            Failure::Audience => "the token is not meant for this audience",
            Failure::MissingClaim => "the token lacks a claim this port requires (exp, iss, aud)",
            Failure::Signature => "the token's signature does not verify",
            Failure::Algorithm => "the token's algorithm is not accepted for its key",
            Failure::UnknownKey => "the token names a key this port does not know",
            Failure::UnknownApiKey => "the API key is not known",
            Failure::KeysUnavailable => "the keys to check tokens cannot be had right now",
        }
    }

    /// 401 for the caller's credentials; 503 when the fault is ours.
    pub fn status(self) -> http::StatusCode {
        match self {
            Failure::KeysUnavailable => http::StatusCode::SERVICE_UNAVAILABLE,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }
}
