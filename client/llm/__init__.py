"""The site's LLM: any OpenAI-compatible endpoint, or the embedded llama.cpp server with SmolLM2.

    from pmlm.client.llm import LLMConfig, open_llm
    with open_llm(LLMConfig.load("site.toml")) as llm:      # no base_url set -> embedded server
        answer = llm.chat([{"role": "user", "content": prompt}]).text
"""

from pmlm.client.llm.endpoint import (
    Completion,
    LLMBusy,
    LLMClient,
    LLMConfig,
    LLMConfigError,
    LLMEmptyAnswer,
    LLMError,
    LLMResponseError,
    LLMUnavailable,
    LLMUsage,
    site_llm_config,
)
from pmlm.client.llm.local_server import EmbeddedLLMServer, EmbeddedServerError, find_smollm2_gguf, open_llm

__all__ = [
    "Completion", "EmbeddedLLMServer", "EmbeddedServerError", "LLMBusy", "LLMClient", "LLMConfig",
    "LLMConfigError", "LLMEmptyAnswer", "LLMError", "LLMResponseError", "LLMUnavailable", "LLMUsage", "find_smollm2_gguf", "open_llm",
    "site_llm_config",
]
