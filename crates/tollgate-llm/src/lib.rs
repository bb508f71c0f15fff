//! LLM wire formats, with no sockets and no async runtime.
