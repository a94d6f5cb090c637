//! Which endpoint a request is for, and where it goes upstream.

use crate::auth::KeyPlacement;
use crate::errors::ApiFlavour;
use crate::policy::Provider;
use crate::usage::ResponseShape;

/// The operations the gateway serves: an API call it forwards, or a models query it
/// answers itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Api(Api),
    Models(ModelsQuery),
    /// `GET /v1/sluice/usage`: the calling tenant's limits, used and left.
    Usage,
}

/// `GET /v1/models` (every model the tenant may use) or `GET /v1/models/{id}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelsQuery {
    List,
    Get(String),
}

/// An API call forwarded to a provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    ChatCompletions,
    Embeddings,
    Responses,
    Messages,
    /// Anthropic's `POST /v1/messages/count_tokens`: forwarded to the provider (free
    /// there), admitted as a request without tokens.
    CountTokens,
}

impl Endpoint {
    /// Matches the path without its query string.
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path {
            "/v1/chat/completions" => Some(Endpoint::Api(Api::ChatCompletions)),
            "/v1/embeddings" => Some(Endpoint::Api(Api::Embeddings)),
            "/v1/responses" => Some(Endpoint::Api(Api::Responses)),
            "/v1/messages" => Some(Endpoint::Api(Api::Messages)),
            "/v1/messages/count_tokens" => Some(Endpoint::Api(Api::CountTokens)),
            "/v1/models" => Some(Endpoint::Models(ModelsQuery::List)),
            "/v1/sluice/usage" => Some(Endpoint::Usage),
            _ => {
                let id = path.strip_prefix("/v1/models/")?;
                (!id.is_empty() && !id.contains('/'))
                    .then(|| Endpoint::Models(ModelsQuery::Get(id.to_string())))
            }
        }
    }

    /// The API whose conventions (errors, headers, credentials) the client expects.
    pub fn flavour(&self) -> ApiFlavour {
        match self {
            Endpoint::Api(api) => api.flavour(),
            Endpoint::Models(_) | Endpoint::Usage => ApiFlavour::OpenAi,
        }
    }

    pub fn method(&self) -> &'static str {
        match self {
            Endpoint::Api(_) => "POST",
            Endpoint::Models(_) | Endpoint::Usage => "GET",
        }
    }

    pub fn key_placement(&self) -> KeyPlacement {
        match self {
            Endpoint::Api(Api::ChatCompletions | Api::Embeddings | Api::Responses) => {
                KeyPlacement::Bearer
            }
            Endpoint::Api(Api::Messages | Api::CountTokens)
            | Endpoint::Models(_)
            | Endpoint::Usage => KeyPlacement::BearerOrApiKey,
        }
    }
}

impl Api {
    /// Short name for records and logs.
    pub fn name(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat_completions",
            Api::Embeddings => "embeddings",
            Api::Responses => "responses",
            Api::Messages => "messages",
            Api::CountTokens => "count_tokens",
        }
    }

    pub fn flavour(self) -> ApiFlavour {
        match self {
            Api::Messages | Api::CountTokens => ApiFlavour::Anthropic,
            Api::ChatCompletions | Api::Embeddings | Api::Responses => ApiFlavour::OpenAi,
        }
    }

    /// Path after the provider's prefix.
    pub fn upstream_suffix(self) -> &'static str {
        match self {
            Api::ChatCompletions => "/chat/completions",
            Api::Embeddings => "/embeddings",
            Api::Responses => "/responses",
            Api::Messages => "/messages",
            Api::CountTokens => "/messages/count_tokens",
        }
    }

    /// How the provider reports usage in its responses; `None`: it reports none (a
    /// token count uses no tokens).
    pub fn response_shape(self) -> Option<ResponseShape> {
        match self {
            Api::ChatCompletions => Some(ResponseShape::ChatCompletions),
            Api::Embeddings => Some(ResponseShape::Embeddings),
            Api::Responses => Some(ResponseShape::Responses),
            Api::Messages => Some(ResponseShape::AnthropicMessages),
            Api::CountTokens => None,
        }
    }
}

/// Splits `:path` into path and query (`?` included).
pub fn split_path(full: &str) -> (&str, &str) {
    match full.find('?') {
        Some(i) => (full.get(..i).unwrap_or(full), full.get(i..).unwrap_or("")),
        None => (full, ""),
    }
}

/// The upstream request line for a provider.
pub fn upstream_path(provider: &Provider, suffix: &str, query: &str) -> String {
    let mut p = String::with_capacity(provider.path_prefix.len() + suffix.len() + query.len());
    p.push_str(&provider.path_prefix);
    p.push_str(suffix);
    p.push_str(query);
    p
}

/// A model-name pattern where `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    parts: Vec<String>,
    wildcard: bool,
}

impl Pattern {
    pub fn new(p: &str) -> Self {
        Pattern {
            parts: p.split('*').map(str::to_string).collect(),
            wildcard: p.contains('*'),
        }
    }

    pub fn matches(&self, s: &str) -> bool {
        let Some((first, rest)) = self.parts.split_first() else {
            return false;
        };
        if !self.wildcard {
            return first == s;
        }
        let Some(mut remaining) = s.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return false;
        };
        for part in middle {
            match remaining.find(part.as_str()) {
                Some(i) => remaining = remaining.get(i + part.len()..).unwrap_or(""),
                None => return false,
            }
        }
        remaining.len() >= last.len() && remaining.ends_with(last.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_from_paths() {
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions"),
            Some(Endpoint::Api(Api::ChatCompletions))
        );
        assert_eq!(
            Endpoint::from_path("/v1/messages"),
            Some(Endpoint::Api(Api::Messages))
        );
        assert_eq!(
            Endpoint::from_path("/v1/models/gpt-4.1"),
            Some(Endpoint::Models(ModelsQuery::Get("gpt-4.1".into())))
        );
        assert_eq!(Endpoint::from_path("/v1/models/"), None);
        assert_eq!(Endpoint::from_path("/v1/chat/completions/"), None);
        assert_eq!(Endpoint::from_path("/v2/chat/completions"), None);
        assert_eq!(Endpoint::from_path("/"), None);
        assert_eq!(
            Endpoint::Api(Api::Messages).flavour(),
            ApiFlavour::Anthropic
        );
    }

    #[test]
    fn split_path_keeps_query() {
        assert_eq!(
            split_path("/v1/messages?beta=true"),
            ("/v1/messages", "?beta=true")
        );
        assert_eq!(split_path("/v1/messages"), ("/v1/messages", ""));
    }

    #[test]
    fn patterns() {
        let p = Pattern::new("gpt-*");
        assert!(p.matches("gpt-4.1") && p.matches("gpt-") && !p.matches("gp"));
        assert!(Pattern::new("*").matches("anything"));
        assert!(Pattern::new("exact").matches("exact") && !Pattern::new("exact").matches("exact2"));
        let p = Pattern::new("claude-*-4-5*");
        assert!(p.matches("claude-sonnet-4-5-20250929"));
        assert!(p.matches("claude-x-4-5"));
        assert!(!p.matches("claude-sonnet-4"));
        let p = Pattern::new("a*a");
        assert!(p.matches("aa") && p.matches("aba") && !p.matches("a"));
        let p = Pattern::new("*-mini");
        assert!(p.matches("gpt-4.1-mini") && !p.matches("gpt-4.1-mini-x"));
    }
}
