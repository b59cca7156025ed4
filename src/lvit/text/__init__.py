"""Reports -> token embeddings: encoders (MiniLM, local Hugging Face, learned) and the on-disk cache."""

from .base import DEFAULT_MAX_TOKENS, TextEncoder, backend_names, get_text_encoder, register_backend
from .cache import (
    CACHE_DIRNAME,
    CachedEncoder,
    cache_file,
    default_cache_dir,
    encode_cached,
)
from .encoders import HFEncoder, MiniLMEncoder, minilm_path
from .learned import LearnedEncoder, LearnedTextEmbedding, word_tokens
from .reports import (
    EOF_PAD,
    OFFICIAL_MIN_WORDS,
    prepare_report,
    swap_left_right,
    text_sha256,
)

__all__ = [
    "CACHE_DIRNAME",
    "DEFAULT_MAX_TOKENS",
    "EOF_PAD",
    "OFFICIAL_MIN_WORDS",
    "CachedEncoder",
    "HFEncoder",
    "LearnedEncoder",
    "LearnedTextEmbedding",
    "MiniLMEncoder",
    "TextEncoder",
    "backend_names",
    "register_backend",
    "cache_file",
    "default_cache_dir",
    "encode_cached",
    "get_text_encoder",
    "minilm_path",
    "prepare_report",
    "swap_left_right",
    "text_sha256",
    "word_tokens",
]
