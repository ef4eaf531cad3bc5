"""Our parameter names <-> diffusers' (`UVit2DModel`, `VQModel`), as ordered rename rules.

Every rule maps one of our names (left, a regex) to the diffusers name (right). Layouts differ in three places:
our token-embedding projection and the two head projections are Linear layers where diffusers has 1x1 convs, and
our GRN gamma/beta are vectors where diffusers stores (1, 1, 1, C).
"""

from __future__ import annotations

from .mapping import LINEAR_AS_CONV1X1, VECTOR_AS_4D, KeyMap

UVIT_KEYMAP = KeyMap(
    rules=[
        (r"text_proj\.(.*)", r"encoder_proj.\1"),
        (r"text_norm\.(.*)", r"encoder_proj_layer_norm.\1"),
        (r"cond_embed\.fc1\.(.*)", r"cond_embed.linear_1.\1"),
        (r"cond_embed\.fc2\.(.*)", r"cond_embed.linear_2.\1"),
        (r"token_embed\.embed\.(.*)", r"embed.embeddings.\1"),
        (r"token_embed\.norm\.(.*)", r"embed.layer_norm.\1"),
        (r"token_embed\.proj\.(.*)", r"embed.conv.\1"),
        # conv stages
        (r"down\.resample\.(.*)", r"down_block.downsample.\1"),
        (r"up\.resample\.(.*)", r"up_block.upsample.\1"),
        (r"(down|up)\.res_blocks\.(\d+)\.fc1\.(.*)", r"\1_block.res_blocks.\2.channelwise_linear_1.\3"),
        (r"(down|up)\.res_blocks\.(\d+)\.fc2\.(.*)", r"\1_block.res_blocks.\2.channelwise_linear_2.\3"),
        (r"(down|up)\.res_blocks\.(\d+)\.grn\.(.*)", r"\1_block.res_blocks.\2.channelwise_norm.\3"),
        (r"(down|up)\.res_blocks\.(\d+)\.modulation\.(.*)", r"\1_block.res_blocks.\2.cond_embeds_mapper.\3"),
        (r"(down|up)\.res_blocks\.(\d+)\.(depthwise|norm)\.(.*)", r"\1_block.res_blocks.\2.\3.\4"),
        (r"(down|up)\.attn_blocks\.(\d+)\.context_proj\.(.*)", r"\1_block.attention_blocks.\2.kv_mapper.\3"),
        (r"(down|up)\.attn_blocks\.(\d+)\.(attn[12])\.(q|k|v)\.(.*)", r"\1_block.attention_blocks.\2.\3.to_\4.\5"),
        (r"(down|up)\.attn_blocks\.(\d+)\.(attn[12])\.out\.(.*)", r"\1_block.attention_blocks.\2.\3.to_out.0.\4"),
        (r"(down|up)\.attn_blocks\.(\d+)\.(norm[12])\.(.*)", r"\1_block.attention_blocks.\2.\3.\4"),
        # transformer
        (r"to_hidden_norm\.(.*)", r"project_to_hidden_norm.\1"),
        (r"to_hidden\.(.*)", r"project_to_hidden.\1"),
        (r"layers\.(\d+)\.attn_norm\.norm\.(.*)", r"transformer_layers.\1.norm1.norm.\2"),
        (r"layers\.(\d+)\.attn_norm\.modulation\.(.*)", r"transformer_layers.\1.norm1.linear.\2"),
        (r"layers\.(\d+)\.cross_norm\.norm\.(.*)", r"transformer_layers.\1.norm2.norm.\2"),
        (r"layers\.(\d+)\.cross_norm\.modulation\.(.*)", r"transformer_layers.\1.norm2.linear.\2"),
        (r"layers\.(\d+)\.ff_norm\.norm\.(.*)", r"transformer_layers.\1.norm3.norm.\2"),
        (r"layers\.(\d+)\.ff_norm\.modulation\.(.*)", r"transformer_layers.\1.norm3.linear.\2"),
        (r"layers\.(\d+)\.attn\.(q|k|v)\.(.*)", r"transformer_layers.\1.attn1.to_\2.\3"),
        (r"layers\.(\d+)\.attn\.out\.(.*)", r"transformer_layers.\1.attn1.to_out.0.\2"),
        (r"layers\.(\d+)\.cross_attn\.(q|k|v)\.(.*)", r"transformer_layers.\1.attn2.to_\2.\3"),
        (r"layers\.(\d+)\.cross_attn\.out\.(.*)", r"transformer_layers.\1.attn2.to_out.0.\2"),
        (r"layers\.(\d+)\.ff\.proj_in\.(.*)", r"transformer_layers.\1.ff.net.0.proj.\2"),
        (r"layers\.(\d+)\.ff\.proj_out\.(.*)", r"transformer_layers.\1.ff.net.2.\2"),
        (r"from_hidden_norm\.(.*)", r"project_from_hidden_norm.\1"),
        (r"from_hidden\.(.*)", r"project_from_hidden.\1"),
        # head
        (r"head\.proj\.(.*)", r"mlm_layer.conv1.\1"),
        (r"head\.norm\.(.*)", r"mlm_layer.layer_norm.\1"),
        (r"head\.logits\.(.*)", r"mlm_layer.conv2.\1"),
    ],
    layouts=[
        (r"(token_embed\.proj|head\.proj|head\.logits)\.weight", LINEAR_AS_CONV1X1),
        (r"(down|up)\.res_blocks\.\d+\.grn\.(gamma|beta)", VECTOR_AS_4D),
    ],
)


VQGAN_KEYMAP = KeyMap(
    rules=[
        (
            r"encoder\.levels\.(\d+)\.blocks\.(\d+)\.shortcut\.(.*)",
            r"encoder.down_blocks.\1.resnets.\2.conv_shortcut.\3",
        ),
        (r"encoder\.levels\.(\d+)\.blocks\.(\d+)\.(.*)", r"encoder.down_blocks.\1.resnets.\2.\3"),
        (r"encoder\.levels\.(\d+)\.resample\.conv\.(.*)", r"encoder.down_blocks.\1.downsamplers.0.conv.\2"),
        (r"decoder\.levels\.(\d+)\.blocks\.(\d+)\.shortcut\.(.*)", r"decoder.up_blocks.\1.resnets.\2.conv_shortcut.\3"),
        (r"decoder\.levels\.(\d+)\.blocks\.(\d+)\.(.*)", r"decoder.up_blocks.\1.resnets.\2.\3"),
        (r"decoder\.levels\.(\d+)\.resample\.conv\.(.*)", r"decoder.up_blocks.\1.upsamplers.0.conv.\2"),
        (r"(encoder|decoder)\.mid\.(\d+)\.shortcut\.(.*)", r"\1.mid_block.resnets.\2.conv_shortcut.\3"),
        (r"(encoder|decoder)\.mid\.(\d+)\.(.*)", r"\1.mid_block.resnets.\2.\3"),
        (r"(encoder|decoder)\.norm_out\.(.*)", r"\1.conv_norm_out.\2"),
        (r"quantizer\.codebook\.(.*)", r"quantize.embedding.\1"),
    ],
)
