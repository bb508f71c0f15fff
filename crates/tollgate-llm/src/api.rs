//! Which LLM API a request speaks, told from its path.
//!
//! Matching is by suffix on whole path segments, so the same rule serves the canonical
//! `/v1/...` paths, prefixed mounts (`/openai/v1/chat/completions`) and Azure deployments
//! (`/openai/deployments/{name}/chat/completions`). `messages` is the one exception: a
//! bare `.../messages` suffix also ends OpenAI Assistants paths
//! (`/v1/threads/{id}/messages`), so it only matches as `/messages` or `.../v1/messages`.

use std::fmt;

/// The request/response shape of an LLM endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// OpenAI `POST /v1/chat/completions`.
    Chat,
    /// OpenAI legacy `POST /v1/completions`.
    Completions,
    /// OpenAI `POST /v1/responses`.
    Responses,
    /// OpenAI `POST /v1/embeddings`.
    Embeddings,
    /// Anthropic `POST /v1/messages`.
    Messages,
}

impl Api {
    /// All variants, for configuration validation and exhaustive tests.
    pub const ALL: [Api; 5] = [
        Api::Chat,
        Api::Completions,
        Api::Responses,
        Api::Embeddings,
        Api::Messages,
    ];

    /// Tells the API from a request path (a query string, if any, is ignored).
    ///
    /// Returns `None` for anything that is not one of the five generation/embedding
    /// endpoints, including sub-resources such as `/v1/messages/count_tokens` or
    /// `/v1/responses/{id}`: those carry no usage to meter.
    pub fn from_path(path: &str) -> Option<Api> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let mut segments = path.rsplit('/').filter(|s| !s.is_empty());
        let last = segments.next()?;
        let previous = segments.next();
        match last {
            "completions" if previous == Some("chat") => Some(Api::Chat),
            "completions" => Some(Api::Completions),
            "responses" => Some(Api::Responses),
            "embeddings" => Some(Api::Embeddings),
            "messages" if matches!(previous, None | Some("v1")) => Some(Api::Messages),
            _ => None,
        }
    }

    /// Short stable name, used in metric labels, logs and CEL attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Completions => "completions",
            Api::Responses => "responses",
            Api::Embeddings => "embeddings",
            Api::Messages => "messages",
        }
    }

    /// Whether this API's streams can carry an OpenAI usage-only chunk that the
    /// gateway may have asked for and must then hide from the client.
    pub(crate) fn has_usage_chunk(self) -> bool {
        matches!(self, Api::Chat | Api::Completions)
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths() {
        assert_eq!(Api::from_path("/v1/chat/completions"), Some(Api::Chat));
        assert_eq!(Api::from_path("/v1/completions"), Some(Api::Completions));
        assert_eq!(Api::from_path("/v1/responses"), Some(Api::Responses));
        assert_eq!(Api::from_path("/v1/embeddings"), Some(Api::Embeddings));
        assert_eq!(Api::from_path("/v1/messages"), Some(Api::Messages));
    }

    #[test]
    fn unversioned_prefixed_and_azure_paths() {
        assert_eq!(Api::from_path("/chat/completions"), Some(Api::Chat));
        assert_eq!(Api::from_path("/messages"), Some(Api::Messages));
        assert_eq!(
            Api::from_path(
                "/openai/deployments/gpt-5-nano/chat/completions?api-version=2024-02-01"
            ),
            Some(Api::Chat)
        );
        // Azure's recorded URL in the corpus has a doubled slash.
        assert_eq!(
            Api::from_path("//openai/deployments/test-openai/chat/completions"),
            Some(Api::Chat)
        );
        assert_eq!(
            Api::from_path("/openai/deployments/x/embeddings"),
            Some(Api::Embeddings)
        );
        assert_eq!(
            Api::from_path("/openai/v1/responses/"),
            Some(Api::Responses)
        );
        assert_eq!(
            Api::from_path("/anthropic/v1/messages"),
            Some(Api::Messages)
        );
    }

    #[test]
    fn whole_segments_only() {
        assert_eq!(
            Api::from_path("/v1/xchat/completions"),
            Some(Api::Completions)
        );
        assert_eq!(Api::from_path("/v1/mychat-completions"), None);
        assert_eq!(Api::from_path("/v1/notresponses"), None);
        assert_eq!(Api::from_path("/v1/messages/count_tokens"), None);
        assert_eq!(Api::from_path("/v1/responses/resp_123"), None);
        assert_eq!(Api::from_path("/v1/threads/thread_1/messages"), None);
        assert_eq!(Api::from_path("/v1/models"), None);
        assert_eq!(Api::from_path(""), None);
        assert_eq!(Api::from_path("/"), None);
    }

    #[test]
    fn names_are_stable() {
        let names: Vec<&str> = Api::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(
            names,
            ["chat", "completions", "responses", "embeddings", "messages"]
        );
        assert_eq!(Api::Messages.to_string(), "messages");
    }
}
