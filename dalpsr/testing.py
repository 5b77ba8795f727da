"""Tiny random components for tests and examples. Everything here builds offline, in code, with no download."""

from __future__ import annotations

import torch

from dalpsr.loaders.sd2 import clip_tokenizer

TINY_TEXT_DIM = 32


def get_dummy_tokenizer(model_max_length: int = 77):
    """The real CLIP tokenizer (49,408 tokens, SD2 padding with "!"), built offline."""
    return clip_tokenizer(model_max_length)


def get_dummy_components(
    seed: int = 0, scheduler: str = "ddim", vae_scale_factor: int = 2, unet_sample_size: int = 32
) -> dict:
    """Tiny random components for `DaLPSRPipeline(**components)`: an SD2-shaped model at toy size.

    By default the VAE downsamples by 2 and the UNet has two levels (pixel multiple 4, native tile 64 px), text
    width 32; the LR ControlNet is made from the UNet as in `DaLPSRPipeline.from_sd2`. `vae_scale_factor=8` and
    `unet_sample_size=64` give SD2-base's factor and 512-px native tile at toy width (for benchmarks).
    """
    if vae_scale_factor not in (2, 4, 8):
        raise ValueError(f"`vae_scale_factor` must be 2, 4 or 8; got {vae_scale_factor!r}.")
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        EulerDiscreteScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from dalpsr.pipelines.pipeline_dalpsr import build_lr_controlnet

    schedulers = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler}
    if scheduler not in schedulers:
        raise ValueError(f"`scheduler` must be one of {sorted(schedulers)}; got {scheduler!r}.")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=unet_sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 1)
    vae_levels = vae_scale_factor.bit_length()  # 2 → 2 levels, 4 → 3, 8 → 4
    vae = AutoencoderKL(
        block_out_channels=(16,) + (32,) * (vae_levels - 1),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
            projection_dim=TINY_TEXT_DIM,
            hidden_act="gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
    ).eval()
    torch.manual_seed(seed + 3)
    controlnet = build_lr_controlnet(unet, vae_scale_factor=vae_scale_factor)
    # A fresh ControlNet has zero output convolutions; give them small random weights so the LR branch
    # actually changes the result in tests.
    generator = torch.Generator().manual_seed(seed + 4)
    with torch.no_grad():
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        for block in [*zero_convs, controlnet.controlnet_cond_embedding.conv_out]:
            block.weight.copy_(torch.randn(block.weight.shape, generator=generator) * 0.05)
    sched = schedulers[scheduler](
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": get_dummy_tokenizer(),
        "unet": unet,
        "controlnet": controlnet,
        "scheduler": sched,
    }


def get_dummy_pipeline(seed: int = 0, scheduler: str = "ddim", **optional):
    """A `DaLPSRPipeline` over `get_dummy_components(seed)` (plus any optional components), on CPU."""
    from dalpsr.pipelines.pipeline_dalpsr import DaLPSRPipeline

    pipe = DaLPSRPipeline(**get_dummy_components(seed, scheduler), **optional)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_dummy_sd2(path, seed: int = 0) -> tuple[str, str]:
    """Write `get_dummy_components(seed)` as SD2-layout sub-folders (vae/, text_encoder/, tokenizer/, unet/,
    scheduler/) plus the LR ControlNet in `path/controlnet`.

    Returns `(sd2_folder, controlnet_folder)`, usable as `DaLPSRPipeline.from_sd2(sd2, controlnet=cn)` and as
    `--pretrained_model_name_or_path` / `--controlnet_model_name_or_path` of `training/train_lora.py`.
    """
    from pathlib import Path

    for name, component in get_dummy_components(seed).items():
        component.save_pretrained(Path(path) / name)
    return str(path), str(Path(path) / "controlnet")


_CAPTION_WORDS = (
    "a an the of in on at with and or but while by from to into over under near behind beside between "
    "is are was this that it its their his her there some two three many few one "
    "describe content image style detail main subjects appearance setting colours colors lighting textures "
    "do not comment blur noise quality photo picture close-up portrait view scene "
    "man woman child people dog cat bird horse car bus bicycle boat tree trees flower flowers grass field "
    "river lake sea beach mountain sky cloud clouds road street building house window door wall bridge "
    "table chair book cup plate food fruit hat shirt dress face eyes hair hand "
    "red green blue yellow white black brown grey gray orange pink purple golden dark bright light "
    "soft warm cold sunny cloudy old new small large tall wooden stone metal glass smooth rough "
    "sitting standing walking running parked flying lying wearing holding looking smiling "
    "morning evening sunset night daylight shadow shadows background foreground detailed sharp "
    "user assistant"
).split()


def get_dummy_caption_tokenizer(image_token: bool = True):
    """A small word-level tokenizer for the tiny captioning models (lower-cased words and punctuation).

    Special tokens: `<unk>`, `<s>` (prepended to every text), `</s>`, `<pad>` and the image placeholder
    `<image>` (declared as the tokenizer's `image_token` when `image_token`; BLIP-2's processor declares it
    itself); decoding joins words with spaces and tidies the space before punctuation.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials + list(dict.fromkeys(_CAPTION_WORDS)) + list(".,:;!?-'\n"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"} if image_token else None,
    )


# A LLaVA-1.5 style template ("USER: <image>\n... ASSISTANT:") written as a transformers chat template.
_TINY_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def get_dummy_llava(seed: int = 0):
    """A tiny random LLaVA (CLIP vision tower 32 px / patch 8, two-layer Llama) and its processor.

    Returns `(LlavaForConditionalGeneration, LlavaProcessor)`; ~0.1 M parameters, built offline.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = get_dummy_caption_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        chat_template=_TINY_LLAVA_CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    return model, processor


def get_dummy_blip2(seed: int = 0):
    """A tiny random BLIP-2 (ViT + Q-Former with 4 queries + two-layer OPT) and its processor.

    Returns `(Blip2ForConditionalGeneration, Blip2Processor)`; the processor has no chat template, so a
    captioner feeds it the bare instruction.
    """
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    tokenizer = get_dummy_caption_tokenizer(image_token=False)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=4)
    vision = Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_hidden_size=32,
        vocab_size=len(tokenizer),
    )
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=256,
        word_embed_proj_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config).eval()
    return model, processor


def get_dummy_captioner(seed: int = 0, **kwargs):
    """A `Captioner` over `get_dummy_llava(seed)`: real `generate`, random words, offline, on CPU.

    It reloads the same weights after `unload()`. `kwargs` go to `Captioner` (e.g. `cache=`, `batch_size=`).
    """
    from dalpsr.captioning import Captioner

    def loader():
        return get_dummy_llava(seed)

    model, processor = loader()
    settings = {"max_new_tokens": 12, "generation_kwargs": {"min_new_tokens": 4}, **kwargs}
    return Captioner(model, processor, model_id=f"dalpsr-testing/tiny-llava-seed{seed}", loader=loader, **settings)


TINY_IMAGE_DIM = 16


def get_dummy_image_encoder(seed: int = 0):
    """A tiny random `RAMImageEncoder` (Swin 32 px, patch 4, widths 8/16, window 4) → B × 17 × 16 embeddings."""
    from dalpsr.models.ram_encoder import RAMImageEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RAMImageEncoder(
            image_size=32,
            patch_size=4,
            embed_dim=8,
            depths=(2, 2),
            num_heads=(1, 2),
            window_size=4,
            projection_dim=TINY_IMAGE_DIM,
        ).eval()


def get_dummy_seesr_components(seed: int = 0, scheduler: str = "ddpm") -> dict:
    """`get_dummy_components` with SeeSR image cross-attention in UNet and ControlNet plus a tiny image encoder.

    The UNet and ControlNet keep the weights of `get_dummy_components(seed)`; their `image_attentions` are random.
    """
    from dalpsr.models.image_attention import SeeSRControlNetModel, SeeSRUNet2DConditionModel

    components = get_dummy_components(seed, scheduler)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 5)
        for name, cls in (("unet", SeeSRUNet2DConditionModel), ("controlnet", SeeSRControlNetModel)):
            stock = components[name]
            model = cls.from_config(
                stock.config, use_image_cross_attention=True, image_cross_attention_dim=TINY_IMAGE_DIM
            )
            missing = model.load_state_dict(stock.state_dict(), strict=False).missing_keys
            if any("image_attentions" not in key for key in missing):
                raise RuntimeError(f"SeeSR {name} does not extend the stock one: missing {missing}.")
            components[name] = model
    components["image_encoder"] = get_dummy_image_encoder(seed + 6)
    return components


TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def get_dummy_degradation_models(seed: int = 0):
    """A tiny random `DegradationEncoder` (open_clip ViT, 32 px) and a `RestorationPromptDecoder` whose candidate
    prompt embeddings come from that encoder's text tower: the shared feature stack at toy size."""
    from dalpsr.models.degradation_encoder import DegradationEncoder
    from dalpsr.models.prompt_decoder import RestorationPromptDecoder

    torch.manual_seed(seed)
    encoder = DegradationEncoder(clip_model=TINY_OPEN_CLIP, num_degradation_tokens=4, resize_mode="crop").eval()
    decoder = RestorationPromptDecoder(embed_dim=32, hidden_dim=32, num_layers=1, num_heads=2).eval()
    decoder.encode_candidates(encoder)
    return encoder, decoder


TINY_DAT_CONFIG = {"embed_dim": 32, "depth": [2, 2], "num_heads": [2, 2], "split_size": [2, 4], "img_size": 64}


def get_dummy_restorer(seed: int = 0, scale: int = 2, context_dim: int = 32, random_fusion: bool = True):
    """A tiny `DATRestorer` (2 residual groups) with fusion blocks for the tiny degradation encoder.

    The fusion outputs start at zero (exact DAT); `random_fusion=True` gives them small random weights so the
    degradation features change the result, as after fine-tuning.
    """
    from dalpsr.models.fusion import DATRestorer

    torch.manual_seed(seed)
    restorer = DATRestorer(
        dat_config={**TINY_DAT_CONFIG, "upscale": scale}, context_dim=context_dim, fusion_num_heads=2
    ).eval()
    if random_fusion:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in restorer.named_parameters():
                if name.startswith("fusion_blocks") and not param.any():
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return restorer


def rrdbnet_state_dict(
    seed: int = 0, num_filters: int = 8, num_blocks: int = 1, num_upsample: int = 2, in_nc: int = 3, out_nc: int = 3
) -> dict[str, torch.Tensor]:
    """Random RRDBNet weights in Real-ESRGAN's (BasicSR's) key layout: `conv_first`, `body.{b}.rdb{1..3}.conv{1..5}`,
    `conv_body`, `conv_up{i}` (one per ×2), `conv_hr`, `conv_last`; growth 32 channels (the value spandrel assumes)."""
    generator = torch.Generator().manual_seed(seed)
    growth, state = 32, {}

    def conv(name: str, out_ch: int, in_ch: int) -> None:
        state[f"{name}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=generator) * 0.05
        state[f"{name}.bias"] = torch.randn(out_ch, generator=generator) * 0.01

    conv("conv_first", num_filters, in_nc)
    for b in range(num_blocks):
        for r in range(1, 4):
            for c in range(1, 6):
                conv(f"body.{b}.rdb{r}.conv{c}", growth if c < 5 else num_filters, num_filters + (c - 1) * growth)
    for name in ["conv_body", *[f"conv_up{i}" for i in range(1, num_upsample + 1)], "conv_hr"]:
        conv(name, num_filters, num_filters)
    conv("conv_last", out_nc, num_filters)
    return state


def compact_state_dict(
    seed: int = 0, num_feat: int = 8, num_conv: int = 2, upscale: int = 4, in_nc: int = 3, out_nc: int = 3
) -> dict[str, torch.Tensor]:
    """Random SRVGGNetCompact weights (realesr-animevideov3's layout): convolutions `body.{2i}`, PReLU `body.{2i+1}`."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    channels = [in_nc] + [num_feat] * (num_conv + 1)
    for i in range(num_conv + 2):
        out_ch = num_feat if i <= num_conv else out_nc * upscale * upscale
        state[f"body.{2 * i}.weight"] = torch.randn(out_ch, channels[i], 3, 3, generator=generator) * 0.1
        state[f"body.{2 * i}.bias"] = torch.randn(out_ch, generator=generator) * 0.01
        if i <= num_conv:
            state[f"body.{2 * i + 1}.weight"] = torch.rand(num_feat, generator=generator) * 0.3
    return state


def get_dummy_spandrel_restorer(seed: int = 0, kind: str = "rrdb"):
    """A tiny `SpandrelRestorer` (×4) over random `rrdbnet_state_dict` ("rrdb") or `compact_state_dict` ("compact")."""
    from dalpsr.models.restorer import SpandrelRestorer

    state = rrdbnet_state_dict(seed) if kind == "rrdb" else compact_state_dict(seed)
    return SpandrelRestorer.from_state_dict(state)
