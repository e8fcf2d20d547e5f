"""Tiny models of generic-recipe backbones in their real diffusers formats, for tests (nothing downloaded)."""

from __future__ import annotations

import torch


def make_tiny_cogvideox_pipeline(seed: int = 0, max_text_seq_length: int = 16):
    """A tiny ``CogVideoXPipeline`` at diffusers' own CogVideoX test sizes (2-layer transformer without
    RoPE, as CogVideoX-2B: position embeddings for exactly ``max_text_seq_length`` text tokens; 4 latent
    channels; a 4-level VAE, 8x spatial and 4x temporal) with a word-level T5 tokenizer and a 1-layer
    T5 encoder. ``pipe.save_pretrained(folder)`` writes the folder a user downloads."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from m4v_convert.backbones.wan.testing import TINY_WORDS

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(seed)
    return CogVideoXPipeline(
        tokenizer=PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"),
        text_encoder=T5EncoderModel(T5Config(vocab_size=len(TINY_WORDS), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=4, relative_attention_num_buckets=8)).eval(),
        vae=AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4,
                                   up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                   latent_channels=4, layers_per_block=1, norm_num_groups=2).eval(),
        transformer=CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4,
                                                out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=2,
                                                sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                                max_text_seq_length=max_text_seq_length).eval(),
        scheduler=CogVideoXDDIMScheduler())
