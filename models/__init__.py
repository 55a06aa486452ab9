"""The policy network: a decoder-only transformer, nothing RL-specific."""

from models.config import PRESETS, ModelConfig, get_config
from models.kv_cache import KVCache, LayerKV
from models.lora import LoRAConfig, add_lora, lora_off, merge_lora
from models.pretrained import from_pretrained, load_config, save_pretrained
from models.transformer import Transformer, positions_from_mask

__all__ = [
    "PRESETS",
    "KVCache",
    "LayerKV",
    "LoRAConfig",
    "ModelConfig",
    "Transformer",
    "add_lora",
    "from_pretrained",
    "get_config",
    "load_config",
    "lora_off",
    "merge_lora",
    "positions_from_mask",
    "save_pretrained",
]
